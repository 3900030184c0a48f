//! End-to-end service policy (README "Service policy", issue #18): calls
//! to VIPs and to job IPs, judged by the real meshd of the caller's
//! cluster and of the replica's. The first test has three clusters: `web`
//! (whitelisting `default/frontend`) has a replica in c2 and one in c3;
//! `frontend` and `batch` run in c1. The second, two, with jobs that no
//! service selects.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use skymesh_tests::mesh::Mesh;
use skymesh_tests::netns::{Netns, wait_until};
use skymesh_tests::replica::{Replica, TCP_PORT, UDP_PORT, ask_name, labelled_job_entry};

/// `n` connections from `ns` to `dst`: the names that answered, and the
/// errors by kind; and the slowest attempt.
fn calls(ns: &Netns, dst: SocketAddr, n: usize) -> (BTreeMap<String, usize>, Duration) {
    ns.run_in(move || {
        let mut seen = BTreeMap::new();
        let mut slowest = Duration::ZERO;
        for _ in 0..n {
            let t0 = Instant::now();
            let name = ask_name(dst, Duration::from_secs(2))
                .unwrap_or_else(|e| format!("<{:?}>", e.kind()));
            slowest = slowest.max(t0.elapsed());
            *seen.entry(name).or_insert(0) += 1;
        }
        (seen, slowest)
    })
    .unwrap()
}

/// `skyctl create service NAME -s app=NAME -p PORT`, then `extra`.
fn create_service(mesh: &Mesh, name: &str, port: &str, extra: &[&str]) {
    let selector = format!("app={name}");
    let mut args = vec!["create", "service", name, "-s", &selector, "-p", port];
    args.extend_from_slice(extra);
    mesh.sky(&args).unwrap();
}

/// Applies the skymesh document `yaml` with `skyctl apply -f`.
fn apply(mesh: &Mesh, name: &str, yaml: &str) {
    let out = mesh.apply(name, yaml).unwrap();
    assert!(out.contains("configured"), "{out}");
}

fn service_doc(name: &str, app: &str, lists: &str) -> String {
    format!(
        "kind: Service\nmetadata:\n  name: {name}\nspec:\n  selector:\n    app: {app}\n  ports:\n    - name: http\n      port: 80\n      target_port: {TCP_PORT}\n{lists}"
    )
}

#[test]
fn vip_calls_follow_the_whitelists_and_upstreams() {
    let mesh = Mesh::start(3, 2).unwrap();
    let mut replicas = Vec::new();
    for c in [2, 3] {
        let ip = mesh.topo.app_ip(c, 1);
        let name = format!("web-{c}");
        replicas.push(Replica::start(mesh.topo.app(c, 1), ip, &name));
        let entry = labelled_job_entry(&name, ip, "web", &[&format!("http:{TCP_PORT}")]);
        std::fs::write(mesh.jobs_file(c), entry).unwrap();
    }
    let (frontend, batch) = (mesh.topo.app_ip(1, 1), mesh.topo.app_ip(1, 2));
    std::fs::write(
        mesh.jobs_file(1),
        labelled_job_entry("frontend-1", frontend, "frontend", &[])
            + &labelled_job_entry("batch-1", batch, "batch", &[]),
    )
    .unwrap();
    assert!(mesh.wait_for_tunnels(Duration::from_secs(20)));
    for name in ["frontend", "batch"] {
        create_service(&mesh, name, "80", &[]);
    }
    let web_port = format!("http:80:{TCP_PORT}");
    create_service(
        &mesh,
        "web",
        &web_port,
        &["--whitelist", "default/frontend"],
    );
    assert!(
        mesh.wait_for_ready("web", 2, Duration::from_secs(15)),
        "{}",
        mesh.sky(&["get", "endpoints", "-o", "wide"]).unwrap()
    );
    assert!(mesh.wait_for_ready("batch", 1, Duration::from_secs(15)));
    let vip = SocketAddr::from((mesh.service_vip("web").unwrap(), 80));
    let (fe_ns, batch_ns) = (mesh.topo.app(1, 1), mesh.topo.app(1, 2));

    // frontend → web succeeds, balanced over both clusters.
    assert!(
        wait_until(Duration::from_secs(10), || {
            calls(fe_ns, vip, 1).0.keys().all(|k| k.starts_with("web-"))
        }),
        "frontend never reached web: {}",
        mesh.meshd_log(1)
    );
    let (seen, _) = calls(fe_ns, vip, 40);
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        ["web-2", "web-3"],
        "{seen:?}"
    );

    // batch → web is refused at once (a reset), and counted.
    let (seen, slowest) = calls(batch_ns, vip, 5);
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        ["<ConnectionRefused>"],
        "{seen:?}"
    );
    assert!(
        slowest < Duration::from_millis(500),
        "refused after {slowest:?}"
    );
    let denied = r#"skymesh_policy_denied_total{service="default/web",from="default/batch"}"#;
    assert!(
        wait_until(Duration::from_secs(5), || mesh.metric(1, denied) >= 5.0),
        "{}",
        mesh.metrics(1).unwrap_or_default()
    );

    // By job IP too: batch's gateway resets the connection, frontend's
    // goes through.
    let web2 = SocketAddr::from((mesh.topo.app_ip(2, 1), TCP_PORT));
    let (seen, slowest) = calls(batch_ns, web2, 3);
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        ["<ConnectionRefused>"],
        "{seen:?}"
    );
    assert!(slowest < Duration::from_millis(500));
    let (seen, _) = calls(fe_ns, web2, 3);
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["web-2"], "{seen:?}");
    // UDP to the job's IP: batch gets ICMP administratively prohibited at
    // once, frontend the replica's answer (its reply passes both gateways
    // as a reply, tracked, not judged as a call).
    let web2_udp = SocketAddr::from((mesh.topo.app_ip(2, 1), UDP_PORT));
    let ask_udp = |ns: &Netns| {
        let t0 = Instant::now();
        let r = ns
            .run_in(move || -> std::io::Result<String> {
                let s = UdpSocket::bind("0.0.0.0:0")?;
                s.connect(web2_udp)?;
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                s.send(b"hello")?;
                let mut b = [0u8; 256];
                let n = s.recv(&mut b)?;
                Ok(String::from_utf8_lossy(&b[..n]).to_string())
            })
            .unwrap();
        (r, t0.elapsed())
    };
    let (r, took) = ask_udp(batch_ns);
    let e = r.expect_err("batch reached web-2 over UDP");
    assert_ne!(e.kind(), std::io::ErrorKind::WouldBlock, "no ICMP: {e}");
    assert!(took < Duration::from_millis(500), "refused after {took:?}");
    assert_eq!(ask_udp(fe_ns).0.unwrap(), "web-2");
    assert!(wait_until(Duration::from_secs(5), || mesh
        .metric(1, denied)
        >= 9.0));

    // Adding default/batch to the whitelist lets batch in within 1 s.
    apply(
        &mesh,
        "web",
        &service_doc(
            "web",
            "web",
            "  whitelists: [default/frontend, default/batch]\n",
        ),
    );
    let t0 = Instant::now();
    assert!(
        wait_until(Duration::from_secs(5), || {
            calls(batch_ns, vip, 1)
                .0
                .keys()
                .all(|k| k.starts_with("web-"))
        }),
        "batch still refused"
    );
    let took = t0.elapsed();
    eprintln!("batch let in after {took:?}");
    assert!(took < Duration::from_secs(1), "batch let in after {took:?}");
    // batch keeps a connection open (the replica echoes lines).
    let mut open = batch_ns
        .run_in(move || TcpStream::connect_timeout(&vip, Duration::from_secs(2)))
        .unwrap()
        .unwrap();
    open.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut reader = BufReader::new(open.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("web-"), "{line}");

    // frontend with upstreams [default/db] may no longer call web.
    apply(
        &mesh,
        "frontend",
        &service_doc("frontend", "frontend", "  upstreams: [default/db]\n")
            .replace(&format!("target_port: {TCP_PORT}"), "target_port: 80"),
    );
    let t0 = Instant::now();
    assert!(
        wait_until(Duration::from_secs(5), || {
            calls(fe_ns, vip, 1).0.contains_key("<ConnectionRefused>")
        }),
        "frontend still calls web despite its upstreams"
    );
    eprintln!("frontend refused after {:?}", t0.elapsed());
    assert!(t0.elapsed() < Duration::from_secs(1));
    let up = r#"skymesh_policy_denied_total{service="default/web",from="default/frontend"}"#;
    assert!(wait_until(Duration::from_secs(5), || mesh.metric(1, up) >= 1.0));
    // batch is unaffected, and its connection still echoes.
    let (seen, _) = calls(batch_ns, vip, 10);
    assert!(seen.keys().all(|k| k.starts_with("web-")), "{seen:?}");
    let mut echo = |open: &mut TcpStream| -> std::io::Result<()> {
        open.write_all(b"ping\n")?;
        line.clear();
        match reader.read_line(&mut line)? {
            0 => Err(std::io::ErrorKind::UnexpectedEof.into()),
            _ => Ok(()),
        }
    };
    echo(&mut open).unwrap();

    // Taking default/batch off the whitelist cuts that connection within
    // 1 s: its next packet is answered with a reset.
    apply(
        &mesh,
        "web",
        &service_doc("web", "web", "  whitelists: [default/frontend]\n"),
    );
    let t0 = Instant::now();
    let mut cut = None;
    while t0.elapsed() < Duration::from_secs(5) {
        if let Err(e) = echo(&mut open) {
            cut = Some(e);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = t0.elapsed();
    let e = cut.expect("batch's open connection survived the whitelist change");
    eprintln!("batch's connection cut after {took:?}: {e}");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    assert!(took < Duration::from_secs(1), "cut after {took:?}");
    // The replica's end was reset by the same segment, not left open.
    let batch_ip = batch.to_string();
    let held = |c: usize| {
        mesh.topo
            .app(c, 1)
            .run(&["ss", "-Htn", "state", "established", "dst", &batch_ip])
            .unwrap()
    };
    assert!(
        wait_until(Duration::from_secs(1), || held(2).trim().is_empty()
            && held(3).trim().is_empty()),
        "a replica still holds batch's connection: {}{}",
        held(2),
        held(3)
    );
    drop(replicas);
}

/// Jobs no service selects are known by their namespace in every cluster
/// (the netmap's job addresses), not only in their own: `default/*` lets
/// frontend (c1) call `loner`, a job in c2 that no service selects, by its
/// IP, and lets `stray` (c2, no service either) call web's replica in c1
/// through web's VIP; `shop/*` does not let batch call `loner`.
#[test]
fn jobs_no_service_selects_are_known_by_namespace_everywhere() {
    let mesh = Mesh::start(2, 3).unwrap();
    let web_ip = mesh.topo.app_ip(1, 1);
    let (frontend, batch) = (mesh.topo.app_ip(1, 2), mesh.topo.app_ip(1, 3));
    let (loner, stray) = (mesh.topo.app_ip(2, 1), mesh.topo.app_ip(2, 2));
    let _replicas = [
        Replica::start(mesh.topo.app(1, 1), web_ip, "web-1"),
        Replica::start(mesh.topo.app(2, 1), loner, "loner-2"),
    ];
    std::fs::write(
        mesh.jobs_file(1),
        labelled_job_entry("web-1", web_ip, "web", &[&format!("http:{TCP_PORT}")])
            + &labelled_job_entry("frontend-1", frontend, "frontend", &[])
            + &labelled_job_entry("batch-1", batch, "batch", &[]),
    )
    .unwrap();
    std::fs::write(
        mesh.jobs_file(2),
        labelled_job_entry("loner-2", loner, "loner", &[&format!("http:{TCP_PORT}")])
            + &labelled_job_entry("stray-2", stray, "stray", &[]),
    )
    .unwrap();
    assert!(mesh.wait_for_tunnels(Duration::from_secs(20)));
    for (name, list) in [
        ("frontend", "--upstream=default/*"),
        ("batch", "--upstream=shop/*"),
    ] {
        create_service(&mesh, name, "80", &[list]);
    }
    let web_port = format!("http:80:{TCP_PORT}");
    create_service(&mesh, "web", &web_port, &["--whitelist=default/*"]);
    for (svc, n) in [("web", 1), ("frontend", 1), ("batch", 1)] {
        assert!(
            mesh.wait_for_ready(svc, n, Duration::from_secs(15)),
            "{svc}: {}",
            mesh.sky(&["get", "endpoints", "-o", "wide"]).unwrap()
        );
    }
    let loner_addr = SocketAddr::from((loner, TCP_PORT));
    let (fe_ns, batch_ns) = (mesh.topo.app(1, 2), mesh.topo.app(1, 3));
    assert!(
        wait_until(Duration::from_secs(10), || calls(fe_ns, loner_addr, 1)
            .0
            .contains_key("loner-2")),
        "frontend (upstreams default/*) never reached loner-2: {:?}\n{}",
        calls(fe_ns, loner_addr, 1).0,
        mesh.meshd_log(1)
    );
    let (seen, _) = calls(batch_ns, loner_addr, 3);
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        ["<ConnectionRefused>"],
        "batch (upstreams shop/*) reached loner-2: {seen:?}"
    );
    // stray's call to web's VIP is judged by c1 too (it owns web-1), with
    // stray known there only by its address.
    let vip = SocketAddr::from((mesh.service_vip("web").unwrap(), 80));
    let stray_ns = mesh.topo.app(2, 2);
    assert!(
        wait_until(Duration::from_secs(10), || calls(stray_ns, vip, 1)
            .0
            .contains_key("web-1")),
        "stray (default, no service) never reached web (whitelists default/*): {:?}\n{}",
        calls(stray_ns, vip, 1).0,
        mesh.meshd_log(1)
    );
    let (seen, _) = calls(stray_ns, vip, 5);
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["web-1"], "{seen:?}");
}
