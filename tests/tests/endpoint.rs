//! `meshd --endpoint HOST:PORT` (SPEC §4, issue #16 item 5): a gateway
//! given a host name instead of an address. The name resolves from the
//! gateway namespace's own `/etc/hosts` (`/etc/netns/<ns>/hosts`, which
//! `ip netns exec` mounts), its resolver is the namespace's loopback, so no
//! lookup leaves the namespace.
//!
//! The gateway moves to a new WAN address and its name with it; the
//! coordinator (and through it every peer) follows within a few reports,
//! and the tunnel keeps carrying traffic. A name that stops resolving keeps
//! the last address; one that never resolved stops meshd at start with one
//! line.
#![allow(clippy::unwrap_used)]

use std::net::Ipv4Addr;
use std::time::Duration;

use skymesh_tests::mesh::Mesh;
use skymesh_tests::netns::{WAN_CIDR, wait_until};

/// Cluster `name`'s endpoint as the coordinator records it.
fn recorded_endpoint(mesh: &Mesh, name: &str) -> Option<String> {
    let json = mesh.sky(&["get", "cluster", name, "-o", "json"]).ok()?;
    let v: serde_json::Value = serde_json::from_str(&json).ok()?;
    v.pointer("/status/endpoint")
        .and_then(|e| e.as_str())
        .map(str::to_string)
}

/// The hosts file of gateway 1's namespace, with `gw1.mesh.test` at `ip`
/// (or without it).
fn hosts(ip: Option<Ipv4Addr>) -> String {
    let mut s = String::from("127.0.0.1 localhost\n");
    if let Some(ip) = ip {
        s.push_str(&format!("{ip} gw1.mesh.test gw1\n"));
    }
    s
}

#[test]
fn endpoint_host_name_is_resolved_at_start_and_on_each_report() {
    let mut mesh = Mesh::start(2, 1).unwrap();
    assert!(
        mesh.wait_for_tunnels(Duration::from_secs(30)),
        "tunnels did not come up"
    );
    let old_ip = mesh.topo.gateway_wan_ip(1);
    let new_ip = Ipv4Addr::new(198, 51, 100, 111);
    mesh.topo
        .gateway(1)
        .set_etc_file("hosts", &hosts(Some(old_ip)))
        .unwrap();
    // Names not in the hosts file go to a resolver that is not there: the
    // lookup fails at once, inside the namespace.
    mesh.topo
        .gateway(1)
        .set_etc_file(
            "resolv.conf",
            "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n",
        )
        .unwrap();

    // A name that does not resolve stops meshd at start, with one line.
    mesh.stop_meshd(1);
    mesh.set_meshd_endpoint(1, Some("nosuch.mesh.test:51820"));
    mesh.start_meshd(1, None).unwrap();
    assert!(
        wait_until(Duration::from_secs(15), || mesh.meshd_exited(1).is_some()),
        "meshd started although its --endpoint does not resolve:\n{}",
        mesh.meshd_log(1)
    );
    assert!(!mesh.meshd_exited(1).unwrap().success());
    let log = mesh.meshd_log(1);
    let line = log
        .lines()
        .find(|l| l.contains("--endpoint nosuch.mesh.test:51820: cannot resolve the host name"))
        .unwrap_or_else(|| panic!("no error naming --endpoint:\n{log}"));
    assert!(line.contains("ERROR"), "{line}");
    // A malformed one is refused before anything starts.
    let out = mesh.topo.gateway(1).exec(&[
        skymesh_tests::bin_path("meshd").to_str().unwrap(),
        "--coordinator",
        &mesh.topo.coordinator_url(),
        "--cluster",
        "c1",
        "--endpoint",
        "gw_1.mesh.test:51820",
        // Never the host's default state directory, should the check
        // ever come too late.
        "--state-dir",
        mesh.topo.dir().join("malformed-endpoint").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--endpoint") && err.contains("label \"gw_1\""),
        "{err}"
    );

    // The name resolves: meshd starts and reports the address behind it.
    mesh.stop_meshd(1);
    mesh.set_meshd_endpoint(1, Some("gw1.mesh.test:51820"));
    mesh.start_meshd(1, None).unwrap();
    let want_old = format!("{old_ip}:51820");
    assert!(
        wait_until(Duration::from_secs(20), || {
            recorded_endpoint(&mesh, "c1").as_deref() == Some(want_old.as_str())
        }),
        "c1's endpoint is {:?}, want {want_old}:\n{}",
        recorded_endpoint(&mesh, "c1"),
        mesh.meshd_log(1)
    );
    let app1_ip = mesh.topo.app_ip(1, 1);
    assert!(
        wait_until(Duration::from_secs(20), || mesh
            .topo
            .app(2, 1)
            .ping(app1_ip)),
        "no traffic across the tunnel to c1:\n{}",
        mesh.meshd_log(1)
    );

    // The gateway moves to a new WAN address, and its name with it. meshd
    // is not restarted: its next reports carry the new address, the
    // coordinator passes it to c2, and c2 sends to the new address. The old
    // address stays (the control connection uses it), but new datagrams
    // leave from the new one.
    mesh.topo
        .gateway(1)
        .ip(&["addr", "add", &format!("{new_ip}/24"), "dev", "wan0"])
        .unwrap();
    mesh.topo
        .gateway(1)
        .ip(&[
            "route",
            "replace",
            WAN_CIDR,
            "dev",
            "wan0",
            "proto",
            "kernel",
            "scope",
            "link",
            "src",
            &new_ip.to_string(),
        ])
        .unwrap();
    mesh.topo
        .gateway(1)
        .set_etc_file("hosts", &hosts(Some(new_ip)))
        .unwrap();
    let want_new = format!("{new_ip}:51820");
    assert!(
        wait_until(Duration::from_secs(20), || {
            recorded_endpoint(&mesh, "c1").as_deref() == Some(want_new.as_str())
        }),
        "c1's endpoint is {:?} after its name moved to {new_ip}:\n{}",
        recorded_endpoint(&mesh, "c1"),
        mesh.meshd_log(1)
    );
    assert!(
        mesh.meshd_log(1)
            .contains("the --endpoint host name resolves to a new address"),
        "{}",
        mesh.meshd_log(1)
    );
    assert!(
        wait_until(Duration::from_secs(20), || {
            mesh.wg(2, &["endpoints"])
                .is_ok_and(|s| s.contains(&want_new))
        }),
        "c2 does not reach c1 at {want_new}: {:?}",
        mesh.wg(2, &["endpoints"])
    );
    assert!(
        wait_until(Duration::from_secs(20), || mesh
            .topo
            .app(2, 1)
            .ping(app1_ip)),
        "no traffic to c1 at its new address:\n{}",
        mesh.meshd_log(1)
    );

    // The name stops resolving: meshd keeps running and keeps reporting
    // the last address, and says so once.
    mesh.topo
        .gateway(1)
        .set_etc_file("hosts", &hosts(None))
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || {
            mesh.meshd_log(1)
                .contains("cannot resolve the --endpoint host name; reporting the last address")
        }),
        "{}",
        mesh.meshd_log(1)
    );
    // Two more reports (5 s apart) with the name still gone.
    std::thread::sleep(Duration::from_secs(11));
    assert!(mesh.meshd_exited(1).is_none(), "{}", mesh.meshd_log(1));
    assert_eq!(
        recorded_endpoint(&mesh, "c1").as_deref(),
        Some(want_new.as_str())
    );
    assert_eq!(
        mesh.meshd_log(1)
            .matches("cannot resolve the --endpoint host name")
            .count(),
        1,
        "the failing lookup is logged once, not per report"
    );
    assert!(
        mesh.topo.app(2, 1).ping(app1_ip),
        "traffic stopped while the name was gone"
    );
}
