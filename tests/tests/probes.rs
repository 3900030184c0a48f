//! End-to-end readiness probes (SPEC §4): jobs made with the real
//! `skyctl create job --probe`, checked by the real meshd of their
//! cluster, against real listeners in app hosts: a UDP port that closes,
//! an HTTP server that starts answering 500, an address that stops
//! answering pings.
#![allow(clippy::unwrap_used)]

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::time::{Duration, Instant};

use skymesh_tests::mesh::Mesh;
use skymesh_tests::netns::{Netns, wait_until};
use skymesh_tests::replica::{Replica, UDP_PORT};

/// Job `name`'s `ready` as `skyctl get job NAME -o json` shows it.
fn ready(mesh: &Mesh, name: &str) -> Option<bool> {
    let json = mesh.sky(&["get", "job", name, "-o", "json"]).ok()?;
    let v: serde_json::Value = serde_json::from_str(&json).ok()?;
    Some(
        v.pointer("/status/ready")
            .and_then(|r| r.as_bool())
            .unwrap_or(false),
    )
}

/// Waits up to `timeout` for job `name` to be `want`; how long it took.
fn wait_ready(mesh: &Mesh, name: &str, want: bool, timeout: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    wait_until(timeout, || ready(mesh, name) == Some(want)).then(|| t0.elapsed())
}

/// A job `name` at `ip` in cluster c1, made with skyctl.
fn create_job(mesh: &Mesh, name: &str, ip: Ipv4Addr, extra: &[&str]) {
    let ip = ip.to_string();
    let mut args = vec!["create", "job", name, "--cluster", "c1", "--ip", &ip];
    args.extend(extra);
    mesh.sky(&args).unwrap();
}

/// An HTTP server in `ns` at `ip:port` answering every request with the
/// current `status` (and its connection closed). Stops when `alive` is
/// cleared.
fn http_server(ns: &Netns, ip: Ipv4Addr, port: u16, status: Arc<AtomicU16>) -> Arc<AtomicBool> {
    let alive = Arc::new(AtomicBool::new(true));
    let listener = ns
        .run_in(move || TcpListener::bind((ip, port)))
        .unwrap()
        .unwrap();
    listener.set_nonblocking(true).unwrap();
    let a = alive.clone();
    std::thread::spawn(move || {
        while a.load(Ordering::SeqCst) {
            let Ok((mut c, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            };
            let _ = c.set_nonblocking(false);
            let _ = c.set_read_timeout(Some(Duration::from_millis(500)));
            let mut buf = [0u8; 1024];
            let _ = c.read(&mut buf);
            let code = status.load(Ordering::SeqCst);
            let _ = write!(
                c,
                "HTTP/1.1 {code} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
        }
    });
    alive
}

#[test]
fn udp_http_and_icmp_probes_follow_their_jobs() {
    let mesh = Mesh::start(1, 3).unwrap();
    let (a1, a2, a3) = (
        mesh.topo.app_ip(1, 1),
        mesh.topo.app_ip(1, 2),
        mesh.topo.app_ip(1, 3),
    );
    let udp_port = format!("dns:{UDP_PORT}/udp");

    // Bad probes: refused before anything is written, one line naming the
    // flag.
    for (probe, ports) in [
        ("ping", ""),
        ("udp", "8080"),
        ("http:/a", "53/udp"),
        ("icmp:1", ""),
    ] {
        let ip = a1.to_string();
        let mut args = vec![
            "create",
            "job",
            "bad",
            "--cluster",
            "c1",
            "--ip",
            &ip,
            "--probe",
            probe,
        ];
        if !ports.is_empty() {
            args.extend(["--port", ports]);
        }
        let out = mesh.skyctl(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "--probe {probe}: {err}");
        assert!(
            err.contains("--probe") && err.trim().lines().count() == 1,
            "--probe {probe}: {err}"
        );
    }
    assert!(mesh.sky(&["get", "job", "bad"]).is_err(), "nothing written");

    // A UDP-only job: with the default probe it is never checked (ready);
    // with `--probe udp` it follows its port.
    let replica = Replica::start(mesh.topo.app(1, 1), a1, "udp-1");
    create_job(&mesh, "udp-default", a1, &["--port", &udp_port]);
    create_job(&mesh, "udp-1", a1, &["--port", &udp_port, "--probe", "udp"]);
    // An HTTP job whose server answers 200, then 500.
    let status = Arc::new(AtomicU16::new(200));
    let http = http_server(mesh.topo.app(1, 2), a2, 8081, status.clone());
    create_job(
        &mesh,
        "web-1",
        a2,
        &["--port", "8081", "--probe", "http:/healthz"],
    );
    // Pings: a live host, an address nobody has, and `none` for it.
    create_job(&mesh, "ping-1", a3, &["--probe", "icmp"]);
    let nobody = Ipv4Addr::new(10, 1, 0, 99);
    create_job(&mesh, "ping-nobody", nobody, &["--probe", "icmp"]);
    create_job(&mesh, "none-nobody", nobody, &["--probe", "none"]);
    let wide = mesh.sky(&["get", "jobs", "-o", "wide"]).unwrap();
    assert!(
        wide.contains("PROBE") && wide.contains("http:/healthz"),
        "{wide}"
    );

    let up = Duration::from_secs(10);
    for job in ["udp-default", "udp-1", "web-1", "ping-1", "none-nobody"] {
        assert!(
            wait_ready(&mesh, job, true, up).is_some(),
            "{job} never ready:\n{}",
            mesh.meshd_log(1)
        );
    }
    // Not once ready in all that time.
    assert_eq!(
        ready(&mesh, "ping-nobody"),
        Some(false),
        "a dead IP answers no ping"
    );

    // Failures: 2 failed checks, a second apart, then the report.
    let down = Duration::from_secs(6);
    replica.stop();
    let t = wait_ready(&mesh, "udp-1", false, down).expect("closed UDP port still ready");
    eprintln!("udp port closed -> job not ready in {t:?}");
    status.store(500, Ordering::SeqCst);
    let t = wait_ready(&mesh, "web-1", false, down).expect("HTTP 500 still ready");
    eprintln!("http 500 -> job not ready in {t:?}");
    mesh.topo
        .app(1, 3)
        .ip(&["addr", "del", &format!("{a3}/16"), "dev", "eth0"])
        .unwrap();
    let t = wait_ready(&mesh, "ping-1", false, down).expect("address gone, still ready");
    eprintln!("address gone -> icmp job not ready in {t:?}");
    assert_eq!(ready(&mesh, "udp-default"), Some(true), "never checked");
    assert_eq!(ready(&mesh, "none-nobody"), Some(true), "never checked");

    // And back: one success is enough.
    let _replica = Replica::start(mesh.topo.app(1, 1), a1, "udp-1");
    status.store(204, Ordering::SeqCst);
    mesh.topo
        .app(1, 3)
        .ip(&["addr", "add", &format!("{a3}/16"), "dev", "eth0"])
        .unwrap();
    for job in ["udp-1", "web-1", "ping-1"] {
        let t = wait_ready(&mesh, job, true, down).unwrap_or_else(|| panic!("{job} not back"));
        eprintln!("{job} back -> ready in {t:?}");
    }
    http.store(false, Ordering::SeqCst);
}
