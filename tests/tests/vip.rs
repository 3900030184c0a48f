//! End-to-end service VIPs (SPEC §5): three clusters, two replicas each,
//! every replica answering with its own name; connections to the VIP from
//! app hosts, balanced by the real meshd of the client's cluster.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use skymesh_tests::mesh::Mesh;
use skymesh_tests::netns::{Netns, wait_until};
use skymesh_tests::replica::{Replica, TCP_PORT, UDP_PORT, ask_name, job_entry};

/// Three clusters, two replicas each (`web-<c>-<k>` on app host k of
/// cluster c), registered through each gateway's `--jobs` file.
fn mesh_with_replicas() -> (Mesh, Vec<Replica>) {
    with_replicas(Mesh::start(3, 2).unwrap())
}

fn with_replicas(mesh: Mesh) -> (Mesh, Vec<Replica>) {
    let mut replicas = Vec::new();
    for c in 1..=3 {
        let mut jobs = String::new();
        for k in 1..=2 {
            let ip = mesh.topo.app_ip(c, k);
            let name = format!("web-{c}-{k}");
            replicas.push(Replica::start(mesh.topo.app(c, k), ip, &name));
            jobs.push_str(&job_entry(
                &name,
                ip,
                &[&format!("http:{TCP_PORT}"), &format!("dns:{UDP_PORT}/UDP")],
            ));
        }
        std::fs::write(mesh.jobs_file(c), jobs).unwrap();
    }
    assert!(mesh.wait_for_tunnels(Duration::from_secs(20)));
    (mesh, replicas)
}

/// Opens `n` TCP connections from `ns` to `dst` and counts the names that
/// answer (errors are counted under "<error>").
fn tcp_names(ns: &Netns, dst: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    ns.run_in(move || {
        let mut seen = BTreeMap::new();
        for _ in 0..n {
            let name = ask_name(dst, Duration::from_secs(2))
                .unwrap_or_else(|e| format!("<error: {}>", e.kind()));
            *seen.entry(name).or_insert(0) += 1;
        }
        seen
    })
    .unwrap()
}

/// Sends one datagram from each of `n` fresh sockets (distinct flows) and
/// counts the names that answer.
fn udp_names(ns: &Netns, dst: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    ns.run_in(move || {
        let mut seen = BTreeMap::new();
        for _ in 0..n {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let _ = s.send_to(b"who?", dst);
            let mut buf = [0u8; 64];
            let name = match s.recv(&mut buf) {
                Ok(n) => String::from_utf8_lossy(&buf[..n]).to_string(),
                Err(e) => format!("<error: {}>", e.kind()),
            };
            *seen.entry(name).or_insert(0) += 1;
        }
        seen
    })
    .unwrap()
}

#[test]
fn vip_balances_across_every_replica_and_fails_over() {
    let (mut mesh, replicas) = mesh_with_replicas();
    mesh.sky(&[
        "create",
        "service",
        "web",
        "-s",
        "app=web",
        "-p",
        "http:80:8080",
        "-p",
        "dns:53:9090/UDP",
    ])
    .unwrap();
    assert!(
        mesh.wait_for_ready("web", 6, Duration::from_secs(15)),
        "{}",
        mesh.sky(&["get", "endpoints", "web", "-o", "wide"])
            .unwrap()
    );
    let vip = mesh.service_vip("web").unwrap();
    let client = mesh.topo.app(1, 1);

    // ping to the VIP is answered by meshd.
    assert!(
        wait_until(Duration::from_secs(3), || client.ping(vip)),
        "ping {vip}"
    );

    // 120 TCP connections reach all 6 replicas, none fewer than 8.
    let seen = tcp_names(client, SocketAddr::from((vip, 80)), 120);
    eprintln!("TCP spread: {seen:?}");
    assert_eq!(seen.len(), 6, "{seen:?}");
    assert!(seen.values().all(|n| *n >= 8), "{seen:?}");
    // The same for UDP flows.
    let seen = udp_names(client, SocketAddr::from((vip, 53)), 120);
    eprintln!("UDP spread: {seen:?}");
    assert_eq!(seen.len(), 6, "{seen:?}");
    assert!(seen.values().all(|n| *n >= 8), "{seen:?}");
    // Connections per service and per backend are exported.
    assert!(
        wait_until(Duration::from_secs(3), || mesh.metric(
            1,
            r#"skymesh_service_connections_total{service="default/web"}"#
        ) >= 120.0),
        "{}",
        mesh.metrics(1).unwrap_or_default()
    );
    assert!(
        mesh.metric(
            1,
            r#"skymesh_backend_connections_total{service="default/web",backend="c2/web-2-1"}"#
        ) >= 8.0
    );
    // A port the service does not define is refused at once.
    let refused = client
        .run_in(move || {
            TcpStream::connect_timeout(&SocketAddr::from((vip, 81)), Duration::from_secs(2))
                .map(|_| ())
        })
        .unwrap();
    assert_eq!(
        refused.unwrap_err().kind(),
        std::io::ErrorKind::ConnectionRefused
    );

    // A long-lived connection to a replica that stays alive (cluster 2).
    let long = client
        .run_in(move || {
            for _ in 0..50 {
                let s = TcpStream::connect_timeout(
                    &SocketAddr::from((vip, 80)),
                    Duration::from_secs(2),
                )
                .unwrap();
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                if line.trim() == "web-2-1" {
                    return (s, r);
                }
            }
            panic!("no connection landed on web-2-1");
        })
        .unwrap();

    // Kill one replica (c1's second) and take cluster 3's gateway down.
    replicas[1].stop();
    mesh.stop_meshd(3);
    std::thread::sleep(Duration::from_secs(3));
    let seen = tcp_names(mesh.topo.app(1, 1), SocketAddr::from((vip, 80)), 100);
    eprintln!("after failures: {seen:?}");
    assert_eq!(seen.values().sum::<usize>(), 100);
    for dead in ["web-1-2", "web-3-1", "web-3-2"] {
        assert!(!seen.contains_key(dead), "{dead} got connections: {seen:?}");
    }
    assert!(
        seen.keys().all(|k| k.starts_with("web-")),
        "all 100 succeed: {seen:?}"
    );
    // The long-lived connection is undisturbed.
    let (mut s, mut r) = long;
    s.write_all(b"still there?\n").unwrap();
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert_eq!(line, "still there?\n");
}

#[test]
fn traffic_policies_affinity_and_user_endpoints() {
    let (mesh, _replicas) = mesh_with_replicas();
    let client = mesh.topo.app(1, 1);
    mesh.sky(&[
        "create",
        "service",
        "near",
        "-s",
        "app=web",
        "-p",
        "80:8080",
        "--traffic-policy",
        "PreferLocal",
    ])
    .unwrap();
    mesh.sky(&[
        "create",
        "service",
        "here",
        "-s",
        "app=web",
        "-p",
        "80:8080",
        "--traffic-policy",
        "Local",
    ])
    .unwrap();
    mesh.sky(&[
        "create",
        "service",
        "sticky",
        "-s",
        "app=web",
        "-p",
        "80:8080",
        "--session-affinity",
        "ClientIP",
    ])
    .unwrap();
    for s in ["near", "here", "sticky"] {
        assert!(mesh.wait_for_ready(s, 6, Duration::from_secs(15)));
    }
    for s in ["near", "here"] {
        let seen = tcp_names(
            client,
            SocketAddr::from((mesh.service_vip(s).unwrap(), 80)),
            40,
        );
        eprintln!("{s}: {seen:?}");
        assert!(
            seen.keys().all(|k| k.starts_with("web-1-")),
            "{s} stays local: {seen:?}"
        );
        assert_eq!(seen.len(), 2, "{s} uses both local replicas: {seen:?}");
    }
    let seen = tcp_names(
        client,
        SocketAddr::from((mesh.service_vip("sticky").unwrap(), 80)),
        30,
    );
    assert_eq!(seen.len(), 1, "ClientIP pins the client: {seen:?}");

    // A service without a selector uses user-made Endpoints.
    mesh.sky(&["create", "service", "solo", "-p", "80:8080"])
        .unwrap();
    mesh.sky(&[
        "create",
        "endpoints",
        "solo",
        "--num_endpoints",
        "1",
        "--exposed",
        "--primary_cluster",
        "c2",
        "-s",
        "app=web",
    ])
    .unwrap();
    let vip = mesh.service_vip("solo").unwrap();
    assert!(mesh.wait_for_ready("solo", 1, Duration::from_secs(15)));
    let seen = tcp_names(client, SocketAddr::from((vip, 80)), 20);
    assert_eq!(
        seen.len(),
        1,
        "every connection to the single job: {seen:?}"
    );
    assert!(seen.keys().all(|k| k.starts_with("web-2-")), "{seen:?}");
    // Without --exposed, clients in c1 are refused.
    mesh.sky(&["create", "service", "private", "-p", "80:8080"])
        .unwrap();
    mesh.sky(&[
        "create",
        "endpoints",
        "private",
        "--num_endpoints",
        "1",
        "--primary_cluster",
        "c2",
        "-s",
        "app=web",
    ])
    .unwrap();
    let vip = mesh.service_vip("private").unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let seen = tcp_names(client, SocketAddr::from((vip, 80)), 5);
    assert!(
        seen.keys().all(|k| k.starts_with("<error")),
        "refused in c1: {seen:?}"
    );
    let local = tcp_names(mesh.topo.app(2, 1), SocketAddr::from((vip, 80)), 5);
    assert!(
        local.keys().all(|k| k.starts_with("web-2-")),
        "reachable in c2: {local:?}"
    );
}

#[test]
fn nodeport_services_are_reachable_from_outside_the_mesh() {
    let (mesh, _replicas) = mesh_with_replicas();
    mesh.sky(&[
        "create",
        "service",
        "edge",
        "-t",
        "NodePort",
        "-s",
        "app=web",
        "-p",
        "8443:8080",
        "-p",
        "5353:9090/UDP",
        "-c",
        "c1",
    ])
    .unwrap();
    assert!(mesh.wait_for_ready("edge", 6, Duration::from_secs(15)));
    let gw1 = mesh.topo.gateway_wan_ip(1);
    // The coordinator lists the exposing gateway's underlay address.
    assert!(
        wait_until(Duration::from_secs(5), || mesh
            .sky(&["get", "service", "edge"])
            .unwrap_or_default()
            .contains(&gw1.to_string())),
        "{}",
        mesh.sky(&["get", "service", "edge"]).unwrap()
    );
    // A client outside the mesh (the WAN) reaches replicas in every cluster.
    let outside = mesh.topo.wan();
    assert!(wait_until(Duration::from_secs(5), || {
        tcp_names(outside, SocketAddr::from((gw1, 8443)), 1)
            .keys()
            .all(|k| k.starts_with("web-"))
    }));
    let seen = tcp_names(outside, SocketAddr::from((gw1, 8443)), 60);
    eprintln!("NodePort TCP from outside: {seen:?}");
    assert_eq!(seen.len(), 6, "{seen:?}");
    let seen = udp_names(outside, SocketAddr::from((gw1, 5353)), 30);
    eprintln!("NodePort UDP from outside: {seen:?}");
    assert!(seen.keys().all(|k| k.starts_with("web-")), "{seen:?}");
    // Not exposed on c2's gateway.
    let gw2 = mesh.topo.gateway_wan_ip(2);
    let refused = tcp_names(outside, SocketAddr::from((gw2, 8443)), 1);
    assert!(
        refused.keys().all(|k| k.starts_with("<error")),
        "{refused:?}"
    );
}

#[test]
fn vips_keep_working_with_two_coordinators_on_etcd_when_one_dies() {
    let (mut mesh, _replicas) = with_replicas(Mesh::start_on_etcd(3, 2).unwrap());
    mesh.sky(&["create", "service", "web", "-s", "app=web", "-p", "80:8080"])
        .unwrap();
    assert!(mesh.wait_for_ready("web", 6, Duration::from_secs(15)));
    let vip = mesh.service_vip("web").unwrap();
    let seen = tcp_names(mesh.topo.app(1, 1), SocketAddr::from((vip, 80)), 60);
    assert_eq!(seen.len(), 6, "{seen:?}");

    // Kill the first coordinator mid-test; skyctl and every meshd were
    // given both.
    mesh.stop_coordinator();
    mesh.sky(&["create", "service", "api", "-s", "app=web", "-p", "81:8080"])
        .unwrap();
    // Endpoints need the controllers, which may have to move to the
    // survivor (lease of 5 s).
    assert!(
        wait_until(Duration::from_secs(20), || {
            let ep = mesh
                .sky(&["get", "endpoints", "api", "-o", "json"])
                .unwrap_or_default();
            ep.matches("\"ready\": true").count() >= 6
        }),
        "{}",
        mesh.sky(&["get", "endpoints", "api", "-o", "wide"])
            .unwrap_or_default()
    );
    let vip2 = mesh.service_vip("api").unwrap();
    assert_ne!(vip, vip2);
    // The new service reaches meshd through the surviving replica.
    let client = mesh.topo.app(1, 1);
    assert!(
        wait_until(Duration::from_secs(10), || {
            tcp_names(client, SocketAddr::from((vip2, 81)), 1)
                .keys()
                .all(|k| k.starts_with("web-"))
        }),
        "new VIP works after losing a coordinator"
    );
    let seen = tcp_names(client, SocketAddr::from((vip2, 81)), 60);
    eprintln!("after losing a coordinator: {seen:?}");
    assert_eq!(seen.len(), 6, "{seen:?}");
    // And the old one still balances.
    let seen = tcp_names(client, SocketAddr::from((vip, 80)), 30);
    assert!(seen.keys().all(|k| k.starts_with("web-")), "{seen:?}");
}
