//! Floods against a gateway, end to end in network namespaces: whatever an
//! attacker sends, legitimate clients keep getting through.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead as _, BufReader};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use skymesh_tests::mesh::Mesh;
use skymesh_tests::netns::{Netns, wait_until};
use skymesh_tests::replica::{Replica, TCP_PORT};

/// The flow table of cluster 1's gateway in these tests: small, so that a
/// flood fills it many times over within seconds even from a slow sender.
const MAX_FLOWS: &str = "8192";

/// Two clusters of three app hosts; `web` has a replica on app host 3 of
/// each (one local to cluster 1, one behind the tunnel). Cluster 1's meshd
/// runs with `extra` flags.
fn mesh_with_web(extra: &[&str]) -> (Mesh, Vec<Replica>, Ipv4Addr) {
    let mut mesh = Mesh::start(2, 3).unwrap();
    mesh.stop_meshd(1);
    mesh.set_meshd_args(1, extra);
    mesh.start_meshd(1, None).unwrap();
    let mut replicas = Vec::new();
    for c in 1..=2 {
        let ip = mesh.topo.app_ip(c, 3);
        let name = format!("web-{c}");
        replicas.push(Replica::start(mesh.topo.app(c, 3), ip, &name));
        std::fs::write(
            mesh.jobs_file(c),
            format!(
                "[[job]]\nname = \"{name}\"\nip = \"{ip}\"\nlabels = {{ app = \"web\" }}\nports = [\"http:{TCP_PORT}\"]\n"
            ),
        )
        .unwrap();
    }
    assert!(mesh.wait_for_tunnels(Duration::from_secs(20)));
    mesh.sky(&[
        "create",
        "service",
        "web",
        "-s",
        "app=web",
        "-p",
        "http:80:8080",
    ])
    .unwrap();
    assert!(
        wait_until(Duration::from_secs(15), || {
            let ep = mesh
                .sky(&["get", "endpoints", "web", "-o", "json"])
                .unwrap_or_default();
            ep.matches("\"ready\": true").count() + ep.matches("\"ready\":true").count() >= 2
        }),
        "{}",
        mesh.sky(&["get", "endpoints", "web", "-o", "wide"])
            .unwrap_or_default()
    );
    let json = mesh.sky(&["get", "service", "web", "-o", "json"]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let vip = v
        .pointer("/status/cluster_ip")
        .and_then(|i| i.as_str())
        .unwrap()
        .parse()
        .unwrap();
    (mesh, replicas, vip)
}

/// One new connection to `dst` from `ns`, as a client would make it: the
/// time until the replica's name arrived, or why it did not within 3 s.
fn connect(ns: &Netns, dst: SocketAddr) -> Result<Duration, String> {
    ns.run_in(move || {
        let t0 = Instant::now();
        let s = TcpStream::connect_timeout(&dst, Duration::from_secs(3))
            .map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        BufReader::new(s)
            .read_line(&mut line)
            .map_err(|e| format!("read: {e}"))?;
        if line.starts_with("web-") {
            Ok(t0.elapsed())
        } else {
            Err(format!("answer {line:?}"))
        }
    })
    .unwrap()
}

fn summary(results: &[Result<Duration, String>]) -> String {
    let mut ok: Vec<Duration> = results
        .iter()
        .filter_map(|r| r.as_ref().ok().copied())
        .collect();
    ok.sort();
    let errors: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    format!(
        "{} of {} connected (median {:?}, max {:?}); errors: {errors:?}",
        ok.len(),
        results.len(),
        ok.get(ok.len() / 2),
        ok.last()
    )
}

#[test]
fn a_syn_flood_from_spoofed_sources_does_not_deny_a_vip() {
    let (mesh, _replicas, vip) = mesh_with_web(&["--max-flows", MAX_FLOWS]);
    let dst = SocketAddr::from((vip, 80));
    let (flooder, client) = (mesh.topo.app(1, 1), mesh.topo.app(1, 2));
    for _ in 0..5 {
        connect(client, dst).unwrap();
    }
    // ~25,000 SYNs a second from random spoofed sources, for 20 s.
    let log = mesh.topo.dir().join("hping3.log");
    let flood = flooder
        .spawn(
            &[
                "hping3",
                "-q",
                "-S",
                "--rand-source",
                "-p",
                "80",
                "-i",
                "u40",
                &vip.to_string(),
            ],
            &log,
        )
        .unwrap();
    let start = Instant::now();
    let mut during = Vec::new();
    while start.elapsed() < Duration::from_secs(20) {
        during.push(connect(client, dst));
        assert!(flood.is_running(), "hping3 ended: {}", flood.log());
        std::thread::sleep(Duration::from_millis(250));
    }
    let evicted_during = mesh.metric(1, "skymesh_lb_evicted_flows_total");
    flood.kill();
    let after: Vec<_> = (0..20).map(|_| connect(client, dst)).collect();
    eprintln!("during the flood: {}", summary(&during));
    eprintln!("right after: {}", summary(&after));
    eprintln!("flows evicted during the flood: {evicted_during}");
    // The flood did fill the table, many times over.
    assert!(
        evicted_during > 2.0 * 8192.0,
        "the flood never filled the flow table (evicted {evicted_during}): {}",
        mesh.metrics(1).unwrap_or_default()
    );
    assert_eq!(
        mesh.metric(1, r#"skymesh_lb_drops_total{reason="flow_table_full"}"#),
        0.0
    );
    assert!(during.iter().all(Result::is_ok), "{}", summary(&during));
    assert!(after.iter().all(Result::is_ok), "{}", summary(&after));
}
