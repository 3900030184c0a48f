//! Graceful stop (issue #15): SIGTERM stops the coordinator and meshd
//! within 2 s whatever streams are open; a restarted coordinator on the
//! same data dir serves at once, and the clients it had (a gateway's netmap
//! stream, `skyctl get service --watch`) resume from their revision with
//! nothing lost and nothing repeated. Real binaries in network namespaces
//! (needs root).
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use skymesh_proto::v1::{Kind, WatchRequest};
use skymesh_tests::mesh::Mesh;
use skymesh_tests::netns::{require_root, wait_until};
use skymesh_tests::{Bearer, Coordinator};

/// What SIGTERM may take, at most, to stop a process.
const STOP_WITHIN: Duration = Duration::from_secs(2);
/// How long a stop is waited for before SIGKILL (longer than
/// [`STOP_WITHIN`], so that a slow stop is measured, not cut).
const GRACE: Duration = Duration::from_secs(10);

/// `dig @<gateway> +short NAME A` from cluster `i`'s first app host.
fn resolve(mesh: &Mesh, i: usize, name: &str) -> Vec<String> {
    let server = format!("@{}", mesh.topo.gateway_lan_ip(i));
    let out = mesh
        .topo
        .app(i, 1)
        .exec(&["dig", &server, "+time=1", "+tries=1", "+short", name, "A"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with(';'))
        .map(str::to_string)
        .collect()
}

/// One printed watch event: (type, name, resource version).
type Printed = (String, String, u64);

/// The JSON documents skyctl printed: the initial list, then one per event.
fn printed(stdout: &Path) -> (serde_json::Value, Vec<Printed>) {
    let text = std::fs::read_to_string(stdout).unwrap_or_default();
    let mut docs = serde_json::Deserializer::from_str(&text).into_iter::<serde_json::Value>();
    let list = match docs.next() {
        Some(Ok(v)) => v,
        _ => return (serde_json::Value::Null, Vec::new()),
    };
    let events = docs
        .map_while(Result::ok)
        .map(|d| {
            let meta = &d["object"]["metadata"];
            (
                d["type"].as_str().unwrap_or("?").to_string(),
                meta["name"].as_str().unwrap_or("?").to_string(),
                meta["resource_version"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    (list, events)
}

fn has(events: &[Printed], ty: &str, name: &str) -> bool {
    events.iter().any(|(t, n, _)| t == ty && n == name)
}

/// `(name, resource version)` of every service, as `skyctl get` lists them.
fn services(mesh: &Mesh) -> BTreeMap<String, u64> {
    let json = mesh.sky(&["get", "services", "-o", "json"]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                o["metadata"]["name"].as_str().unwrap().to_string(),
                o["metadata"]["resource_version"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn create_service(mesh: &Mesh, name: &str) {
    mesh.sky(&["create", "service", name, "-p", "80"]).unwrap();
}

#[test]
fn coordinator_stops_within_2s_and_its_clients_resume() {
    require_root().unwrap();
    let mut mesh = Mesh::start(1, 1).unwrap();
    let connects = |mesh: &Mesh| mesh.meshd_log(1).matches("netmap stream connected").count();
    assert!(
        wait_until(Duration::from_secs(20), || connects(&mesh) >= 1),
        "the gateway's netmap stream is open"
    );
    create_service(&mesh, "before");

    // A watch, open across the restart.
    let out = mesh.topo.dir().join("watch.out");
    let err = mesh.topo.dir().join("watch.err");
    let watch = mesh
        .spawn_skyctl(&["get", "service", "--watch", "-o", "json"], &out, &err)
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || printed(&out).0["items"]
            .as_array()
            .is_some()),
        "the watch printed its list: {}",
        std::fs::read_to_string(&out).unwrap_or_default()
    );
    create_service(&mesh, "s1");
    create_service(&mesh, "s2");
    assert!(
        wait_until(Duration::from_secs(5), || {
            let (_, ev) = printed(&out);
            has(&ev, "ADDED", "s1") && has(&ev, "ADDED", "s2")
        }),
        "the watch printed s1 and s2: {:?}",
        printed(&out).1
    );
    assert!(
        wait_until(Duration::from_secs(5), || !resolve(
            &mesh,
            1,
            "s2.default.svc"
        )
        .is_empty()),
        "the gateway resolves s2 before the stop"
    );

    // SIGTERM with both streams open: the coordinator exits within 2 s and
    // closes its store.
    let (status, took) = mesh.terminate_coordinator(GRACE);
    eprintln!("coordinator exit after SIGTERM took {took:?} ({status:?})");
    assert!(
        status.is_some_and(|s| s.success()),
        "the coordinator exits cleanly on SIGTERM ({status:?} after {took:?})"
    );
    assert!(took < STOP_WITHIN, "the coordinator stopped in {took:?}");
    let log = mesh.coordinator_log();
    assert!(
        log.contains("embedded store closed"),
        "the store is closed before exit:\n{log}"
    );
    assert!(watch.is_running(), "the watch outlives the coordinator");

    // A new coordinator on the same data dir and address serves at once.
    let t0 = Instant::now();
    mesh.start_coordinator().unwrap();
    eprintln!(
        "restart on the same data dir listened after {:?}",
        t0.elapsed()
    );
    assert!(
        !mesh.coordinator_log().contains("Database already open"),
        "the store opened at once:\n{}",
        mesh.coordinator_log()
    );
    // Changes right away, while the clients may still be backing off: they
    // come with the resumed streams.
    create_service(&mesh, "s3");
    mesh.sky(&["delete", "service", "s1"]).unwrap();
    create_service(&mesh, "s4");

    assert!(
        wait_until(Duration::from_secs(15), || {
            let (_, ev) = printed(&out);
            has(&ev, "ADDED", "s3") && has(&ev, "DELETED", "s1") && has(&ev, "ADDED", "s4")
        }),
        "the watch resumed and printed s3, s1's deletion and s4: {:?}\nstderr:\n{}",
        printed(&out).1,
        std::fs::read_to_string(&err).unwrap_or_default()
    );
    assert!(
        wait_until(Duration::from_secs(15), || {
            !resolve(&mesh, 1, "s4.default.svc").is_empty()
                && resolve(&mesh, 1, "s1.default.svc").is_empty()
        }),
        "the gateway got the new netmap (s4 resolves, s1 no longer)"
    );
    let meshd = mesh.meshd_log(1);
    assert!(
        meshd.contains("the coordinator is shutting down; reconnecting"),
        "meshd took the end of its stream as a reconnect:\n{meshd}"
    );
    assert!(connects(&mesh) >= 2, "meshd reconnected:\n{meshd}");
    let log = mesh.coordinator_log();
    assert!(
        log.contains("netmap stream resumed"),
        "the gateway resumed from its revision (no new snapshot):\n{log}"
    );

    // Every change exactly once: each (type, name, revision) once, each
    // service ADDED once (`before` only in the list), and the last event
    // printed per live service is its current version. Services still
    // change (their status) after the last create, so wait for that.
    let live = |mesh: &Mesh| services(mesh);
    let settled = wait_until(Duration::from_secs(10), || {
        let (_, ev) = printed(&out);
        let mut last: BTreeMap<String, u64> = BTreeMap::new();
        for (t, n, rv) in &ev {
            if t == "DELETED" {
                last.remove(n);
            } else {
                last.insert(n.clone(), *rv);
            }
        }
        let now = live(&mesh);
        now.iter()
            .filter(|(n, _)| *n != "before")
            .all(|(n, rv)| last.get(n) == Some(rv))
            && last.keys().all(|n| now.contains_key(n))
    });
    let (list, events) = printed(&out);
    eprintln!(
        "the watch printed {} events across the restart: {events:?}",
        events.len()
    );
    assert!(
        settled,
        "the watch shows every service's current version: printed {events:?}, live {:?}",
        live(&mesh)
    );
    let mut seen = BTreeSet::new();
    for e in &events {
        assert!(seen.insert(e.clone()), "printed twice: {e:?} in {events:?}");
    }
    for name in ["s1", "s2", "s3", "s4"] {
        let added = events
            .iter()
            .filter(|(t, n, _)| t == "ADDED" && n == name)
            .count();
        assert_eq!(added, 1, "{name} ADDED once: {events:?}");
    }
    assert!(
        !has(&events, "ADDED", "before"),
        "`before` is in the list, not an ADDED event: {events:?}"
    );
    assert_eq!(list["items"].as_array().map(Vec::len), Some(1));
    let stderr = std::fs::read_to_string(&err).unwrap_or_default();
    assert!(
        stderr.contains("coordinator shutting down") && stderr.contains("watch resumed"),
        "the watch said it reconnected:\n{stderr}"
    );
    assert!(watch.is_running(), "the watch still runs");
}

/// Sends `sig` (e.g. `-STOP`) to process `pid`.
fn signal(pid: &str, sig: &str) {
    let st = std::process::Command::new("kill")
        .args([sig, pid])
        .status()
        .unwrap();
    assert!(st.success(), "kill {sig} {pid}");
}

/// meshd's status report interval (`meshd::io::control::REPORT_INTERVAL`).
fn control_report_interval() -> Duration {
    Duration::from_secs(5)
}

/// Whether cluster 1's TUN interface exists.
fn iface_exists(mesh: &Mesh) -> bool {
    let iface = mesh.topo.iface(1);
    mesh.topo
        .gateway(1)
        .exec(&["ip", "link", "show", &iface])
        .status
        .success()
}

/// meshd exited 0 within [`STOP_WITHIN`] of its SIGTERM and took its TUN
/// interface with it (`when`: the coordinator's state, for the messages).
fn assert_meshd_stopped(
    mesh: &Mesh,
    status: Option<std::process::ExitStatus>,
    took: Duration,
    when: &str,
) {
    eprintln!("meshd exit after SIGTERM{when}, took {took:?} ({status:?})");
    assert!(
        status.is_some_and(|s| s.success()),
        "meshd exits cleanly on SIGTERM{when} ({status:?} after {took:?}):\n{}",
        mesh.meshd_log(1)
    );
    assert!(took < STOP_WITHIN, "meshd stopped in {took:?}");
    assert!(!iface_exists(mesh), "the TUN interface is gone");
}

#[test]
fn meshd_stops_within_2s_with_or_without_the_coordinator() {
    require_root().unwrap();
    let mut mesh = Mesh::start(2, 1).unwrap();
    assert!(
        mesh.wait_for_tunnels(Duration::from_secs(20)),
        "both gateways have a handshake"
    );
    assert!(iface_exists(&mesh));

    // Coordinator up, netmap stream open.
    let (status, took) = mesh.terminate_meshd(1, GRACE);
    assert_meshd_stopped(&mesh, status, took, "");

    // It comes back from its state dir.
    mesh.start_meshd(1, None).unwrap();
    let dst = mesh.topo.app_ip(2, 1);
    assert!(
        wait_until(Duration::from_secs(15), || mesh.topo.app(1, 1).ping(dst)),
        "tunnel back after the restart:\n{}",
        mesh.meshd_log(1)
    );

    // Coordinator frozen (SIGSTOP: connections stay up, calls hang; a
    // status report is due every 5 s): still within 2 s.
    let pid = mesh.coordinator_pid().unwrap().to_string();
    signal(&pid, "-STOP");
    std::thread::sleep(control_report_interval() + Duration::from_secs(1));
    let (status, took) = mesh.terminate_meshd(1, GRACE);
    signal(&pid, "-CONT");
    assert_meshd_stopped(&mesh, status, took, ", coordinator frozen");

    // Coordinator gone (reports and reconnects failing): still within 2 s.
    mesh.start_meshd(1, None).unwrap();
    assert!(
        wait_until(Duration::from_secs(15), || mesh.topo.app(1, 1).ping(dst)),
        "tunnel back after the restart:\n{}",
        mesh.meshd_log(1)
    );
    mesh.stop_coordinator();
    std::thread::sleep(Duration::from_secs(1));
    let (status, took) = mesh.terminate_meshd(1, GRACE);
    assert_meshd_stopped(&mesh, status, took, ", coordinator down");

    // And starts again from its cached netmap (fail-static).
    mesh.start_meshd(1, None).unwrap();
    assert!(
        wait_until(Duration::from_secs(15), || mesh.topo.app(1, 1).ping(dst)),
        "tunnel back from the cached netmap:\n{}",
        mesh.meshd_log(1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_stops_at_the_drain_deadline_with_a_client_that_does_not_read() {
    let mut c = Coordinator::start().unwrap();
    // A watch whose client never reads: with a 16-byte stream window the
    // coordinator cannot even send the first response, let alone the
    // UNAVAILABLE that ends the stream, so the connection never drains.
    let channel = c
        .tls()
        .unwrap()
        .endpoint(&c.url())
        .unwrap()
        .initial_stream_window_size(Some(16))
        .connect()
        .await
        .unwrap();
    let mut api = skymesh_proto::v1::api_client::ApiClient::with_interceptor(
        channel,
        Bearer::new(Some(&c.token())).unwrap(),
    );
    let stuck = api
        .watch(WatchRequest {
            kind: Kind::Namespace as i32,
            all_namespaces: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let (status, took) = tokio::task::block_in_place(|| c.terminate(GRACE));
    eprintln!("coordinator exit with a stuck client took {took:?} ({status:?})");
    assert!(
        status.is_some_and(|s| s.success()),
        "the coordinator exits cleanly ({status:?} after {took:?}):\n{}",
        c.log()
    );
    assert!(took < STOP_WITHIN, "the coordinator stopped in {took:?}");
    let log = c.log();
    assert!(
        log.contains("connections still open at the drain deadline"),
        "the drain deadline cut the stuck connection:\n{log}"
    );
    assert!(
        log.contains("embedded store closed"),
        "the store is closed before exit:\n{log}"
    );
    drop(stuck);
    // The data dir opens at once in a new coordinator.
    c.restart().unwrap();
    let ns = c.skyctl(&["get", "namespaces"]);
    assert!(
        ns.status.success() && String::from_utf8_lossy(&ns.stdout).contains("default"),
        "the restarted coordinator serves: {}",
        String::from_utf8_lossy(&ns.stderr)
    );
}
