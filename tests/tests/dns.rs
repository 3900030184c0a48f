//! End-to-end DNS (SPEC §6): the real `dig` in app hosts of three clusters
//! asking their gateway's meshd, with services made by the real skyctl.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use skymesh_tests::mesh::Mesh;
use skymesh_tests::netns::{NsProcess, wait_until};
use skymesh_tests::replica::{Replica, TCP_PORT};

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

/// A headless service `name` over the `app=hl` jobs, with a named port.
fn headless(mesh: &Mesh, name: &str) {
    mesh.sky(&[
        "create",
        "service",
        name,
        "-t",
        "Headless",
        "-s",
        "app=hl",
        "-p",
        &format!("http:80:{TCP_PORT}"),
    ])
    .unwrap();
}

/// The first app host's IP of each cluster in `v`.
fn ips(mesh: &Mesh, v: &[usize]) -> Vec<String> {
    v.iter()
        .map(|i| mesh.topo.app_ip(*i, 1).to_string())
        .collect()
}

/// What cluster `i` answers for headless service `svc`, as replica IPs: its
/// A records, its SRV targets' replicas, and `hl-<j>.<svc>` for each job.
fn answers(mesh: &Mesh, i: usize, svc: &str) -> Vec<Vec<String>> {
    let a = short(mesh, i, &format!("{svc}.default.svc"), "A");
    let mut srv: Vec<String> = short(mesh, i, &format!("_http._tcp.{svc}.default.svc"), "SRV")
        .iter()
        .filter_map(|l| l.split_whitespace().nth(3).map(str::to_string))
        .filter_map(|target| (1..=3).find(|j| target.starts_with(&format!("hl-{j}."))))
        .map(|j| mesh.topo.app_ip(j, 1).to_string())
        .collect();
    srv.sort();
    let jobs: Vec<String> = (1..=3)
        .flat_map(|j| short(mesh, i, &format!("hl-{j}.{svc}.default.svc"), "A"))
        .collect();
    vec![a, srv, jobs]
}

/// A cluster's phase as `skyctl get cluster -o json` shows it.
fn phase(mesh: &Mesh, c: &str) -> String {
    let json = mesh
        .sky(&["get", "cluster", c, "-o", "json"])
        .unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap_or_default();
    v.pointer("/status/phase")
        .and_then(|p| p.as_str())
        .unwrap_or("")
        .to_string()
}

/// A job's readiness as `skyctl get job -o json` shows it.
fn job_ready(mesh: &Mesh, j: &str) -> bool {
    let json = mesh
        .sky(&["get", "job", j, "-o", "json"])
        .unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap_or_default();
    v.pointer("/status/ready")
        .and_then(|r| r.as_bool())
        .unwrap_or(false)
}

/// SPEC §6: answers hold only addresses the balancer would route. When
/// cluster c3's gateway dies, every answer that lists replicas — headless
/// A, SRV, `<job>.<svc>` and a standalone exposed Endpoints — drops c3's
/// replica within 5 s in the other clusters (their peer probes mark c3
/// down), also for names made after the gateway died (the issue's
/// quickstart case). The coordinator then marks c3 NotReady and its job
/// not ready within 15 s, `get tunnels` shows what the gateways see, and
/// everything comes back when the gateway does.
#[test]
fn a_dead_gateways_replicas_leave_every_answer() {
    let mut mesh = Mesh::start(3, 1).unwrap();
    let mut replicas = Vec::new();
    for i in 1..=3 {
        let ip = mesh.topo.app_ip(i, 1);
        replicas.push(Replica::start(mesh.topo.app(i, 1), ip, &format!("hl-{i}")));
        mesh.sky(&[
            "create",
            "job",
            &format!("hl-{i}"),
            "--cluster",
            &format!("c{i}"),
            "--ip",
            &ip.to_string(),
            "-l",
            "app=hl",
            "--port",
            &format!("http:{TCP_PORT}"),
        ])
        .unwrap();
    }
    // One service before the failure, one after (as in the issue).
    headless(&mesh, "hl");
    let all = ips(&mesh, &[1, 2, 3]);
    assert!(
        wait_until(Duration::from_secs(15), || (1..=3).all(|i| short(
            &mesh,
            i,
            "hl.default.svc",
            "A"
        ) == all)),
        "{:?}",
        short(&mesh, 1, "hl.default.svc", "A")
    );
    assert_eq!(
        answers(&mesh, 1, "hl"),
        vec![all.clone(), all.clone(), all.clone()]
    );

    mesh.stop_meshd(3);
    let t0 = Instant::now();
    headless(&mesh, "late");
    mesh.sky(&["create", "endpoints", "st", "-s", "app=hl", "--exposed"])
        .unwrap();
    let rest = ips(&mesh, &[1, 2]);
    let want = vec![rest.clone(), rest.clone(), rest.clone()];
    for i in [1, 2] {
        for svc in ["hl", "late"] {
            assert!(
                wait_until(
                    Duration::from_secs(5).saturating_sub(t0.elapsed()),
                    || answers(&mesh, i, svc) == want
                ),
                "c{i} {svc}: c3's replica still answered 5 s after its gateway died: {:?}",
                answers(&mesh, i, svc)
            );
        }
        assert!(
            wait_until(
                Duration::from_secs(5).saturating_sub(t0.elapsed()),
                || short(&mesh, i, "st.default.svc", "A") == rest
            ),
            "c{i}: standalone endpoints: {:?}",
            short(&mesh, i, "st.default.svc", "A")
        );
    }
    eprintln!(
        "gateway c3 killed -> its replica gone from headless, SRV, job and endpoints answers in c1 and c2 in {:?}",
        t0.elapsed()
    );

    // The coordinator: c3 NotReady, its job not ready, within 15 s.
    assert!(
        wait_until(
            Duration::from_secs(15).saturating_sub(t0.elapsed()),
            || phase(&mesh, "c3") == "NotReady" && !job_ready(&mesh, "hl-3")
        ),
        "after {:?}: c3 {}, hl-3 ready {}",
        t0.elapsed(),
        phase(&mesh, "c3"),
        job_ready(&mesh, "hl-3")
    );
    eprintln!(
        "gateway c3 killed -> c3 NotReady, hl-3 not ready in {:?}",
        t0.elapsed()
    );
    assert_eq!(
        (phase(&mesh, "c1"), phase(&mesh, "c2")),
        ("Ready".into(), "Ready".into())
    );
    assert!(job_ready(&mesh, "hl-1") && job_ready(&mesh, "hl-2"));
    let eps = mesh.sky(&["get", "endpoints", "hl", "-o", "json"]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&eps).unwrap();
    let c3 = v["status"]["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["cluster"] == "c3")
        .cloned()
        .unwrap();
    assert!(
        c3["addresses"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["ready"] != true),
        "c3's replica is no ready endpoint: {c3}"
    );
    // Tunnels: c1 and c2 see c3 down; c3's own rows are unknown.
    let tunnels = mesh.sky(&["get", "tunnels"]).unwrap();
    let row = |from: &str, to: &str| {
        tunnels
            .lines()
            .find(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                w.len() > 2 && w[0] == from && w[1] == to
            })
            .map(|l| l.split_whitespace().nth(2).unwrap_or("").to_string())
            .unwrap_or_default()
    };
    assert_eq!(row("c1", "c3"), "down", "{tunnels}");
    assert_eq!(row("c2", "c3"), "down", "{tunnels}");
    assert_eq!(row("c1", "c2"), "up", "{tunnels}");
    assert_eq!(row("c3", "c1"), "unknown", "{tunnels}");
    let clusters = mesh.sky(&["get", "clusters"]).unwrap();
    assert!(
        clusters
            .lines()
            .any(|l| l.starts_with("c3 ") && l.contains("NotReady")),
        "{clusters}"
    );

    // Back: the gateway's reports set everything again.
    mesh.start_meshd(3, None).unwrap();
    let t1 = Instant::now();
    assert!(
        wait_until(Duration::from_secs(20), || phase(&mesh, "c3") == "Ready"
            && job_ready(&mesh, "hl-3")
            && answers(&mesh, 1, "late")
                == vec![all.clone(), all.clone(), all.clone()]),
        "c3 {} hl-3 {} c1 late {:?}",
        phase(&mesh, "c3"),
        job_ready(&mesh, "hl-3"),
        answers(&mesh, 1, "late")
    );
    eprintln!(
        "gateway c3 restarted -> Ready, its replica answered again in {:?}",
        t1.elapsed()
    );
    drop(replicas);
}

/// SPEC §6: `--dns-zone` (repeatable) replaces the default zones, e.g.
/// with Space Cloud's `<service>.<project>.svc.cluster.local`; a zone
/// that is no domain name stops meshd at start with one line naming the
/// flag.
#[test]
fn dns_zones_are_configurable() {
    let bad = std::process::Command::new(skymesh_tests::bin_path("meshd"))
        .args([
            "--coordinator",
            "https://127.0.0.1:1",
            "--cluster",
            "c1",
            "--dns-zone",
            "a..b",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(2), "{err}");
    assert!(
        err.lines().next().unwrap_or("").contains("--dns-zone"),
        "{err}"
    );

    let mut mesh = Mesh::start(1, 1).unwrap();
    mesh.sky(&["create", "namespace", "myproject"]).unwrap();
    mesh.sky(&["create", "service", "orders", "-n", "myproject", "-p", "80"])
        .unwrap();
    let vip = {
        let json = mesh
            .sky(&["get", "service", "orders", "-n", "myproject", "-o", "json"])
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        v["status"]["cluster_ip"].as_str().unwrap().to_string()
    };
    assert!(
        wait_until(Duration::from_secs(10), || short(
            &mesh,
            1,
            "orders.myproject.svc",
            "A"
        ) == [vip.clone()]),
        "default zone"
    );
    assert!(short(&mesh, 1, "orders.myproject.svc.cluster.local", "A").is_empty());

    mesh.stop_meshd(1);
    mesh.set_meshd_args(
        1,
        &["--dns-zone", "svc.cluster.local", "--dns-zone", "SVC."],
    );
    mesh.start_meshd(1, None).unwrap();
    assert!(
        wait_until(Duration::from_secs(15), || short(
            &mesh,
            1,
            "orders.myproject.svc.cluster.local",
            "A"
        ) == [vip.clone()]),
        "Space Cloud's form: {:?}\n{}",
        short(&mesh, 1, "orders.myproject.svc.cluster.local", "A"),
        mesh.meshd_log(1)
    );
    assert_eq!(
        short(&mesh, 1, "orders.myproject.svc", "A"),
        std::slice::from_ref(&vip),
        "svc is listed too"
    );
    assert_eq!(
        status(&mesh, 1, "nope.myproject.svc.cluster.local"),
        "NXDOMAIN",
        "an unknown name inside the zone"
    );
    assert_ne!(
        short(&mesh, 1, "orders.myproject.svc.clusterset.local", "A"),
        std::slice::from_ref(&vip),
        "the replaced default zone is no longer served"
    );
    // PTR records point into the first zone.
    let ptr = dig(&mesh, 1, &["+short", "-x", &vip]);
    assert!(ptr.contains("orders.myproject.svc.cluster.local."), "{ptr}");
}

/// SPEC §2: `create endpoints` without `--primary_cluster` applies
/// `--num_endpoints` and `--exposed` to each cluster on its own. With
/// `--exposed` every cluster resolves at most N replicas of each cluster;
/// without, each cluster's replicas serve only that cluster's clients: the
/// standalone name does not resolve, and a Service without a selector in
/// front of it balances a client only over its own cluster's replicas.
#[test]
fn endpoints_without_a_primary_cluster_apply_per_cluster() {
    let mesh = Mesh::start(2, 2).unwrap();
    let mut replicas = Vec::new();
    for i in 1..=2 {
        for k in 1..=2 {
            let ip = mesh.topo.app_ip(i, k);
            let name = format!("pe-{i}-{k}");
            replicas.push(Replica::start(mesh.topo.app(i, k), ip, &name));
            mesh.sky(&[
                "create",
                "job",
                &name,
                "--cluster",
                &format!("c{i}"),
                "--ip",
                &ip.to_string(),
                "-l",
                "app=pe",
                "--port",
                &TCP_PORT.to_string(),
            ])
            .unwrap();
        }
    }
    mesh.sky(&[
        "create",
        "endpoints",
        "one",
        "-s",
        "app=pe",
        "--num_endpoints",
        "1",
        "--exposed",
    ])
    .unwrap();
    mesh.sky(&["create", "endpoints", "mine", "-s", "app=pe"])
        .unwrap();
    // `one`: the first ready job of each cluster, from both clusters.
    let mut want = vec![
        mesh.topo.app_ip(1, 1).to_string(),
        mesh.topo.app_ip(2, 1).to_string(),
    ];
    want.sort();
    assert!(
        wait_until(Duration::from_secs(15), || [1, 2].iter().all(|i| short(
            &mesh,
            *i,
            "one.default.svc",
            "A"
        ) == want)),
        "c1 {:?} c2 {:?}",
        short(&mesh, 1, "one.default.svc", "A"),
        short(&mesh, 2, "one.default.svc", "A")
    );
    // `mine`: every job, each cluster's for itself.
    let json = mesh
        .sky(&["get", "endpoints", "mine", "-o", "json"])
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let clusters = v["status"]["clusters"].as_array().unwrap();
    assert_eq!(clusters.len(), 2, "{json}");
    for c in clusters {
        assert_eq!(c["exposed"], false, "{json}");
        assert_eq!(c["addresses"].as_array().unwrap().len(), 2, "{json}");
    }
    assert_eq!(status(&mesh, 1, "mine.default.svc"), "NXDOMAIN");

    // Behind a Service without a selector: each cluster's clients reach
    // only their own cluster's replicas.
    mesh.sky(&["create", "service", "mine", "-p", &format!("80:{TCP_PORT}")])
        .unwrap();
    let vip = mesh.service_vip("mine").unwrap();
    let hello = |i: usize| -> String {
        let script = format!("timeout 2 bash -c 'exec 3<>/dev/tcp/{vip}/80; head -n1 <&3'");
        String::from_utf8_lossy(&mesh.topo.app(i, 1).sh(&script).stdout)
            .trim()
            .to_string()
    };
    for i in [1, 2] {
        let mut seen = std::collections::BTreeSet::new();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(20) && seen.len() < 2 {
            let who = hello(i);
            if !who.is_empty() {
                assert!(
                    who.starts_with(&format!("pe-{i}-")),
                    "a client of c{i} reached {who}"
                );
                seen.insert(who);
            }
        }
        assert_eq!(
            seen.len(),
            2,
            "c{i} reached both of its own replicas: {seen:?}"
        );
    }
    drop(replicas);
}
