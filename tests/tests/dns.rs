//! End-to-end DNS (SPEC §6): the real `dig` in app hosts of three clusters
//! asking their gateway's meshd, with services made by the real skyctl.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use skymesh_tests::mesh::Mesh;
use skymesh_tests::netns::{NsProcess, wait_until};

/// `dig @<gateway> ARGS` from cluster `i`'s first app host.
fn dig(mesh: &Mesh, i: usize, args: &[&str]) -> String {
    let server = format!("@{}", mesh.topo.gateway_lan_ip(i));
    let mut full = vec!["dig", server.as_str(), "+time=1", "+tries=1"];
    full.extend(args);
    String::from_utf8_lossy(&mesh.topo.app(i, 1).exec(&full).stdout).to_string()
}

fn short(mesh: &Mesh, i: usize, name: &str, ty: &str) -> Vec<String> {
    let mut v: Vec<String> = dig(mesh, i, &["+short", name, ty])
        .lines()
        .map(str::to_string)
        .filter(|l| !l.is_empty() && !l.starts_with(';'))
        .collect();
    v.sort();
    v
}

fn status(mesh: &Mesh, i: usize, name: &str) -> String {
    let out = dig(mesh, i, &[name, "A"]);
    out.split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("no answer")
        .to_string()
}

/// A TCP listener in an app host (a job's health-checked port).
fn listen(mesh: &Mesh, i: usize, k: usize, port: u16) -> NsProcess {
    let ip = mesh.topo.app_ip(i, k).to_string();
    let log = mesh.topo.dir().join(format!("nc-{i}-{k}-{port}.log"));
    mesh.topo
        .app(i, k)
        .spawn(&["nc", "-l", "-k", &ip, &port.to_string()], &log)
        .unwrap()
}

#[test]
fn names_resolve_in_exposing_clusters_and_follow_changes() {
    let mesh = Mesh::start(3, 2).unwrap();
    let all = [1, 2, 3];

    // Create: resolves within 1 s in the exposing clusters, NXDOMAIN in c3.
    mesh.sky(&[
        "create",
        "service",
        "web",
        "-s",
        "app=web",
        "-p",
        "http:80:8080",
        "-c",
        "c1",
        "-c",
        "c2",
    ])
    .unwrap();
    let vip = mesh.service_vip("web").unwrap().to_string();
    let t0 = Instant::now();
    assert!(
        wait_until(Duration::from_secs(1), || [1, 2].iter().all(|i| short(
            &mesh,
            *i,
            "web.default.svc",
            "A"
        ) == [
            vip.clone()
        ])),
        "web.default.svc -> {vip} in c1 and c2 within 1 s"
    );
    eprintln!("create -> resolvable in c1, c2: {:?}", t0.elapsed());
    assert_eq!(
        status(&mesh, 3, "web.default.svc"),
        "NXDOMAIN",
        "not exposed in c3"
    );
    assert!(
        dig(&mesh, 3, &["web.default.svc"]).contains("SOA"),
        "NXDOMAIN carries the SOA"
    );
    for i in [1, 2] {
        assert_eq!(
            short(&mesh, i, "web.default.svc.clusterset.local", "A"),
            std::slice::from_ref(&vip)
        );
        assert_eq!(
            short(&mesh, i, "WEB.Default.SVC", "A"),
            std::slice::from_ref(&vip),
            "case-insensitive"
        );
    }
    assert_eq!(
        status(&mesh, 3, "web.default.svc.clusterset.local"),
        "NXDOMAIN"
    );
    assert_eq!(status(&mesh, 1, "nope.default.svc"), "NXDOMAIN");

    // SRV for the named port, PTR for the VIP.
    let srv = short(&mesh, 1, "_http._tcp.web.default.svc", "SRV");
    assert_eq!(srv.len(), 1, "{srv:?}");
    assert!(srv[0].contains(" 80 web.default.svc."), "{srv:?}");
    let ptr = dig(&mesh, 2, &["+short", "-x", &vip]);
    assert!(ptr.contains("web.default.svc."), "{ptr}");

    // ExternalName: CNAME.
    mesh.sky(&[
        "create",
        "service",
        "docs",
        "-t",
        "ExternalName",
        "--external-name",
        "docs.example.com",
    ])
    .unwrap();
    assert!(wait_until(Duration::from_secs(1), || {
        short(&mesh, 3, "docs.default.svc", "CNAME") == ["docs.example.com."]
    }));

    // Headless: every ready replica in every cluster; a replica failing its
    // health check leaves the answer within 3 s.
    let _l1 = listen(&mesh, 1, 1, 5432);
    let mut l2 = Some(listen(&mesh, 2, 1, 5432));
    mesh.sky(&[
        "create",
        "job",
        "db-1",
        "--cluster",
        "c1",
        "--ip",
        "10.1.0.11",
        "--port",
        "pg:5432",
        "-l",
        "app=db",
    ])
    .unwrap();
    mesh.sky(&[
        "create",
        "job",
        "db-2",
        "--cluster",
        "c2",
        "--ip",
        "10.2.0.11",
        "--port",
        "pg:5432",
        "-l",
        "app=db",
    ])
    .unwrap();
    mesh.sky(&[
        "create",
        "service",
        "db",
        "-t",
        "Headless",
        "-s",
        "app=db",
        "-p",
        "pg:5432:5432",
    ])
    .unwrap();
    let both = vec!["10.1.0.11".to_string(), "10.2.0.11".to_string()];
    assert!(
        wait_until(Duration::from_secs(10), || all.iter().all(|i| short(
            &mesh,
            *i,
            "db.default.svc",
            "A"
        ) == both)),
        "headless answers every ready replica in every cluster: {:?}",
        short(&mesh, 3, "db.default.svc", "A")
    );
    assert_eq!(short(&mesh, 3, "db-2.db.default.svc", "A"), ["10.2.0.11"]);
    let srv = short(&mesh, 3, "_pg._tcp.db.default.svc", "SRV");
    assert_eq!(srv.len(), 2, "one SRV per replica: {srv:?}");
    if let Some(p) = l2.take() {
        p.kill();
    }
    let t0 = Instant::now();
    assert!(
        wait_until(Duration::from_secs(3), || {
            all.iter()
                .all(|i| short(&mesh, *i, "db.default.svc", "A") == ["10.1.0.11"])
        }),
        "db-2 gone everywhere within 3 s: {:?}",
        all.map(|i| short(&mesh, i, "db.default.svc", "A"))
    );
    eprintln!(
        "replica failure -> out of DNS everywhere: {:?}",
        t0.elapsed()
    );

    // Delete: NXDOMAIN within 1 s.
    mesh.sky(&["delete", "service", "web"]).unwrap();
    let t0 = Instant::now();
    assert!(
        wait_until(Duration::from_secs(1), || [1, 2].iter().all(|i| status(
            &mesh,
            *i,
            "web.default.svc"
        ) == "NXDOMAIN")),
        "deleted service is NXDOMAIN within 1 s"
    );
    eprintln!("delete -> NXDOMAIN: {:?}", t0.elapsed());

    // Garbage does not stop the server.
    let gw = mesh.topo.gateway_lan_ip(1).to_string();
    let junk = mesh.topo.app(1, 1).sh(&format!(
        "head -c 700 /dev/urandom | nc -u -w1 {gw} 53; printf '\\x00\\x01\\x02' | nc -u -w1 {gw} 53; head -c 40 /dev/urandom | nc -w1 {gw} 53; true"
    ));
    assert!(junk.status.success());
    assert_eq!(
        short(&mesh, 1, "db.default.svc", "A"),
        ["10.1.0.11"],
        "still serving"
    );

    // Hundreds of queries answered above, and not one log line each
    // (hickory-server logs every query at info; meshd quiets it).
    let log = mesh.meshd_log(1);
    let per_query = log
        .lines()
        .filter(|l| l.contains("query:") || l.contains("request:"))
        .count();
    assert_eq!(per_query, 0, "no log line per DNS query:\n{log}");
}

#[test]
fn hundred_replica_headless_answer_truncates_over_udp() {
    let mesh = Mesh::start(1, 1).unwrap();
    mesh.sky(&[
        "create", "service", "big", "-t", "Headless", "-s", "app=big",
    ])
    .unwrap();
    // 100 jobs without ports (ready while registered).
    let skyctl = skymesh_tests::bin_path("skyctl");
    let token_file = mesh.topo.dir().join("coordinator/admin.token");
    let script = format!(
        "for i in $(seq 1 100); do {} --coordinator {} --token-file {} create job big-$i --cluster c1 --ip 10.1.1.$i -l app=big >/dev/null || exit 1; done",
        skyctl.display(),
        mesh.topo.coordinator_url(),
        token_file.display()
    );
    assert!(mesh.topo.wan().sh(&script).status.success());
    assert!(
        wait_until(Duration::from_secs(20), || dig(
            &mesh,
            1,
            &["+tcp", "+short", "big.default.svc"]
        )
        .lines()
        .count()
            == 100),
        "100 ready replicas over TCP, got {}",
        dig(&mesh, 1, &["+tcp", "+short", "big.default.svc"])
            .lines()
            .count()
    );
    let udp = dig(
        &mesh,
        1,
        &["+notcp", "+ignore", "+noedns", "big.default.svc"],
    );
    assert!(udp.contains(" tc"), "UDP answer is truncated: {udp}");
}

/// SPEC §6: names outside the mesh zones are forwarded only for this
/// cluster's own clients (and loopback, and `--dns-allow`); a client of
/// another cluster asking gateway 1 across the mesh gets REFUSED for them,
/// while mesh names still answer. The upstream is a real dnsmasq on the WAN.
#[test]
fn recursion_only_for_local_clients() {
    let mut mesh = Mesh::start(2, 1).unwrap();
    mesh.topo
        .add_wan_host("up", std::net::Ipv4Addr::new(198, 51, 100, 53))
        .unwrap();
    let log = mesh.topo.dir().join("dnsmasq.log");
    let dnsmasq = mesh
        .topo
        .wan_host("up")
        .spawn(
            &[
                "dnsmasq",
                "-k",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--listen-address=198.51.100.53",
                "--address=/example.test/192.0.2.80",
                "--pid-file=",
                "--user=root",
            ],
            &log,
        )
        .unwrap();
    let ask = |mesh: &Mesh, from: usize| {
        let server = format!("@{}", mesh.topo.gateway_lan_ip(1));
        let out = mesh.topo.app(from, 1).exec(&[
            "dig",
            &server,
            "+time=2",
            "+tries=1",
            "web.example.test",
            "A",
        ]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    mesh.set_meshd_args(1, &["--dns-upstream", "198.51.100.53:53"]);
    mesh.stop_meshd(1);
    mesh.start_meshd(1, None).unwrap();
    assert!(mesh.wait_for_tunnels(Duration::from_secs(20)));
    assert!(
        wait_until(Duration::from_secs(15), || ask(&mesh, 1)
            .contains("192.0.2.80")),
        "a local client is forwarded: {}",
        ask(&mesh, 1)
    );
    let other = ask(&mesh, 2);
    assert!(
        other.contains("status: REFUSED"),
        "another cluster's client: {other}"
    );
    // Mesh names are no recursion: gateway 1 answers them for anyone.
    let server = format!("@{}", mesh.topo.gateway_lan_ip(1));
    let out = mesh.topo.app(2, 1).exec(&[
        "dig",
        &server,
        "+time=2",
        "+tries=1",
        "nope.default.svc",
        "A",
    ]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("status: NXDOMAIN"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // --dns-allow widens it.
    mesh.set_meshd_args(
        1,
        &[
            "--dns-upstream",
            "198.51.100.53:53",
            "--dns-allow",
            "10.2.0.0/16",
        ],
    );
    mesh.stop_meshd(1);
    mesh.start_meshd(1, None).unwrap();
    assert!(
        wait_until(Duration::from_secs(15), || ask(&mesh, 2)
            .contains("192.0.2.80")),
        "--dns-allow: {}",
        ask(&mesh, 2)
    );
    drop(dnsmasq);
}

/// SPEC §6: answers hold only addresses the balancer would route. When
/// cluster c3's gateway dies, c1's headless answer drops c3's replica
/// within 5 s (c1's peer probes mark c3 down), without waiting for the
/// coordinator, which still lists it.
#[test]
fn a_dead_gateways_replicas_leave_headless_answers() {
    let mut mesh = Mesh::start(3, 1).unwrap();
    mesh.sky(&["create", "service", "hl", "-t", "Headless", "-s", "app=hl"])
        .unwrap();
    for i in 1..=3 {
        let ip = mesh.topo.app_ip(i, 1).to_string();
        mesh.sky(&[
            "create",
            "job",
            &format!("hl-{i}"),
            "--cluster",
            &format!("c{i}"),
            "--ip",
            &ip,
            "-l",
            "app=hl",
        ])
        .unwrap();
    }
    let all: Vec<String> = (1..=3)
        .map(|i| mesh.topo.app_ip(i, 1).to_string())
        .collect();
    assert!(
        wait_until(Duration::from_secs(10), || short(
            &mesh,
            1,
            "hl.default.svc",
            "A"
        ) == all),
        "{:?}",
        short(&mesh, 1, "hl.default.svc", "A")
    );
    mesh.stop_meshd(3);
    let t0 = Instant::now();
    let rest = all[..2].to_vec();
    assert!(
        wait_until(Duration::from_secs(5), || short(
            &mesh,
            1,
            "hl.default.svc",
            "A"
        ) == rest),
        "c3's replica still answered after 5 s: {:?}",
        short(&mesh, 1, "hl.default.svc", "A")
    );
    eprintln!(
        "gateway c3 killed -> its replica gone from c1's answer in {:?}",
        t0.elapsed()
    );
    // The coordinator has not noticed yet: the endpoints still list it.
    let eps = mesh.sky(&["get", "endpoints", "hl", "-o", "wide"]).unwrap();
    eprintln!("coordinator's endpoints meanwhile: {eps}");
}
