//! Smoke tests of the network-namespace harness (SPEC §9): addressing,
//! reachability, isolation between clusters, `run_in` sockets, and cleanup
//! on drop and on panic. Needs root (they fail, not pass, without it).
#![allow(clippy::unwrap_used)]

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::process::Command;
use std::time::Duration;

use skymesh_tests::netns::{COORDINATOR_IP, Netns, Topology, wait_until};

/// Namespaces `ip netns list` shows.
fn listed_namespaces() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// Whether `pid` is alive (a zombie that nobody reaped yet counts as dead).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => {
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .unwrap_or("?");
            state != "Z" && state != "X"
        }
    }
}

/// Pings until a reply or 5 s (ARP on fresh bridges can take a moment).
fn reaches(from: &Netns, to: std::net::Ipv4Addr) -> bool {
    wait_until(Duration::from_secs(5), || from.ping(to))
}

#[test]
fn three_clusters_reach_over_wan_but_not_across_lans() {
    let topo = Topology::new(3, 1).unwrap();
    assert_eq!(topo.n_clusters(), 3);
    assert_eq!(topo.cluster_name(2), "c2");
    assert_eq!(topo.workload_cidr(3), "10.3.0.0/16");
    assert_eq!(topo.gateway_wan_ip(1).to_string(), "198.51.100.11");
    assert_eq!(topo.app_ip(2, 1).to_string(), "10.2.0.11");
    assert_eq!(topo.coordinator_url(), "https://198.51.100.1:7400");
    for i in 1..=3 {
        let iface = topo.iface(i);
        assert!(iface.len() <= 15, "{iface}");
        assert!(iface.contains(topo.id()), "{iface}");
    }

    let addrs = topo.app(1, 1).run(&["ip", "-4", "-o", "addr"]).unwrap();
    assert!(addrs.contains("10.1.0.11/16"), "{addrs}");
    let routes = topo.app(1, 1).run(&["ip", "route"]).unwrap();
    assert!(routes.contains("default via 10.1.0.1"), "{routes}");
    let fwd = topo
        .gateway(2)
        .run(&["cat", "/proc/sys/net/ipv4/ip_forward"])
        .unwrap();
    assert_eq!(fwd.trim(), "1");

    // App in c1 → its gateway.
    assert!(
        reaches(topo.app(1, 1), topo.gateway_lan_ip(1)),
        "{}",
        topo.dump()
    );
    // Gateway c1 → gateway c2 over the WAN.
    assert!(
        reaches(topo.gateway(1), topo.gateway_wan_ip(2)),
        "{}",
        topo.dump()
    );
    // WAN (the coordinator's namespace) → every gateway, and back.
    for i in 1..=3 {
        assert!(reaches(topo.wan(), topo.gateway_wan_ip(i)), "gw{i}");
        assert!(reaches(topo.gateway(i), COORDINATOR_IP), "gw{i} → wan");
    }
    // No tunnels yet: app c1 does not reach app c2 (gateway c1 has no route
    // to 10.2.0.0/16), nor does gateway c1 reach c2's LAN.
    assert!(!topo.app(1, 1).ping(topo.app_ip(2, 1)));
    assert!(!topo.gateway(1).ping(topo.app_ip(2, 1)));
    assert!(!topo.app(1, 1).ping(topo.app_ip(3, 1)));

    // Control: the isolation comes from the missing routes alone. With
    // static routes between gateways c1 and c2 (what tunnels will provide),
    // the apps reach each other through both gateways.
    let (gw1, gw2) = (topo.gateway_wan_ip(1), topo.gateway_wan_ip(2));
    topo.gateway(1)
        .ip(&[
            "route",
            "add",
            &topo.workload_cidr(2),
            "via",
            &gw2.to_string(),
        ])
        .unwrap();
    topo.gateway(2)
        .ip(&[
            "route",
            "add",
            &topo.workload_cidr(1),
            "via",
            &gw1.to_string(),
        ])
        .unwrap();
    assert!(
        reaches(topo.app(1, 1), topo.app_ip(2, 1)),
        "{}",
        topo.dump()
    );
    assert!(!topo.app(1, 1).ping(topo.app_ip(3, 1)));
}

#[test]
fn run_in_sockets_live_in_their_namespace() {
    let topo = Topology::new(2, 1).unwrap();
    // A listener in app c1, on its LAN address: only reachable inside c1.
    let listener = topo
        .app(1, 1)
        .run_in(|| TcpListener::bind((topo.app_ip(1, 1), 0)))
        .unwrap()
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).unwrap();
        s.write_all(&buf).unwrap();
    });
    // The gateway of c1 connects (std sockets made in run_in).
    let echoed = topo
        .gateway(1)
        .run_in(|| {
            let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
            c.write_all(b"hello").unwrap();
            let mut buf = [0u8; 5];
            c.read_exact(&mut buf).unwrap();
            buf
        })
        .unwrap();
    assert_eq!(&echoed, b"hello");
    server.join().unwrap();

    // The machine's own namespace has no such address.
    assert!(TcpListener::bind(addr).is_err());

    // Async: a tokio server in the WAN namespace on the coordinator address,
    // a tokio client in gateway c2.
    let listener = topo
        .wan()
        .run_in(|| std::net::TcpListener::bind((COORDINATOR_IP, 0)))
        .unwrap()
        .unwrap();
    let waddr: SocketAddr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    let server = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async move {
                use tokio::io::AsyncWriteExt as _;
                let l = tokio::net::TcpListener::from_std(listener).unwrap();
                let (mut s, peer) = l.accept().await.unwrap();
                s.write_all(peer.ip().to_string().as_bytes()).await.unwrap();
            })
    });
    let seen = topo
        .gateway(2)
        .run_async(|| async move {
            use tokio::io::AsyncReadExt as _;
            let mut s = tokio::net::TcpStream::connect(waddr).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        })
        .unwrap();
    assert_eq!(seen, topo.gateway_wan_ip(2).to_string());
    server.join().unwrap();
}

#[test]
fn drop_removes_namespaces_and_processes() {
    let topo = Topology::new(2, 1).unwrap();
    let names = topo.namespaces();
    assert_eq!(names.len(), 5, "{names:?}");
    let listed = listed_namespaces();
    for n in &names {
        assert!(listed.contains(n), "{n} not in {listed:?}");
        assert!(n.contains(topo.id()));
    }

    // A plain long-running process, one with a child in its group, and one
    // that escapes its process group (setsid) but stays in the namespace.
    let log = topo.dir().join("sleep.log");
    let p1 = topo.gateway(1).spawn(&["sleep", "1000"], &log).unwrap();
    let pidfile = topo.dir().join("child.pid");
    let script = format!(
        "sleep 1000 & echo $! > {}; echo started; wait",
        pidfile.display()
    );
    let p2 = topo
        .app(2, 1)
        .spawn(&["sh", "-c", &script], &topo.dir().join("sh.log"))
        .unwrap();
    let escfile = topo.dir().join("escaped.pid");
    let esc_script = format!(
        "setsid sh -c 'echo $$ > {}; exec sleep 1000' &",
        escfile.display()
    );
    let p3 = topo
        .wan()
        .spawn(&["sh", "-c", &esc_script], &topo.dir().join("esc.log"))
        .unwrap();
    assert!(wait_until(Duration::from_secs(5), || {
        pidfile.exists() && escfile.exists() && p2.log().contains("started")
    }));
    let child: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let escaped: u32 = std::fs::read_to_string(&escfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let (pid1, pid2, pid3) = (p1.pid(), p2.pid(), p3.pid());
    assert!(p1.is_running());
    for pid in [pid1, pid2, child, escaped] {
        assert!(alive(pid), "{pid} should run");
    }
    // The escaped process is inside the WAN namespace.
    let inside = Command::new("ip")
        .args(["netns", "pids", topo.wan().name()])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&inside.stdout).contains(&escaped.to_string()));

    // Dropping one handle kills just that process.
    drop(p1);
    assert!(!alive(pid1));

    let dir = topo.dir().to_path_buf();
    drop(topo);
    let listed = listed_namespaces();
    for n in &names {
        assert!(!listed.contains(n), "{n} still listed: {listed:?}");
        assert!(!std::path::Path::new("/run/netns").join(n).exists());
    }
    for pid in [pid2, pid3, child, escaped] {
        assert!(
            wait_until(Duration::from_secs(5), || !alive(pid)),
            "{pid} survived"
        );
    }
    assert!(!dir.exists(), "temp dir {} left", dir.display());
    // Handles outliving the topology are harmless.
    assert!(!p2.is_running());
    drop((p2, p3));
}

#[test]
fn panic_inside_still_cleans_up() {
    let mut names = Vec::new();
    let mut pid = 0;
    let result = catch_unwind(AssertUnwindSafe(|| {
        let topo = Topology::new(2, 1).unwrap();
        names = topo.namespaces();
        let p = topo
            .gateway(2)
            .spawn(&["sleep", "1000"], &topo.dir().join("sleep.log"))
            .unwrap();
        pid = p.pid();
        std::mem::forget(p); // only the topology is left to kill it
        panic!("deliberate panic inside a topology");
    }));
    assert!(result.is_err());
    assert_eq!(names.len(), 5);
    let listed = listed_namespaces();
    for n in &names {
        assert!(
            !listed.contains(n),
            "{n} still listed after panic: {listed:?}"
        );
    }
    assert!(pid != 0 && !alive(pid), "process {pid} survived the panic");
}

#[test]
fn parallel_topologies_and_standalone_namespaces_do_not_collide() {
    let a = Topology::new(1, 2).unwrap();
    let b = Topology::new(1, 0).unwrap();
    assert_ne!(a.id(), b.id());
    assert_ne!(a.iface(1), b.iface(1));
    for n in a.namespaces() {
        assert!(!b.namespaces().contains(&n));
    }
    assert_eq!(a.n_apps(1), 2);
    assert!(reaches(a.app(1, 2), a.app_ip(1, 1)));
    // Both labs use the same addresses, each in its own namespaces.
    assert!(reaches(b.gateway(1), COORDINATOR_IP));

    let ns = Netns::new("solo").unwrap();
    assert!(ns.name().starts_with("sk") && ns.name().ends_with("-solo"));
    let out = ns.sh("ip -o link | wc -l");
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1", "only lo");
    let out = ns.exec(&["sh", "-c", "echo out; echo err >&2; exit 3"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(ns.run(&["false"]).is_err());

    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("logs/echo.log");
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "echo hi $GREETING; sleep 1000"])
        .env("GREETING", "there");
    let p = ns.spawn_command(&cmd, &log).unwrap();
    assert!(wait_until(Duration::from_secs(5), || p
        .log()
        .contains("hi there")));
    assert!(p.terminate(Duration::from_secs(5)).is_some());
    assert!(!p.is_running());
    let name = ns.name().to_string();
    drop(ns);
    assert!(!listed_namespaces().contains(&name));
}

#[test]
fn wan_host_joins_the_wan() {
    let mut topo = Topology::new(1, 0).unwrap();
    let ip = "198.51.100.200".parse().unwrap();
    let host = topo.add_wan_host("wgo", ip).unwrap();
    assert!(host.name().ends_with("-wgo"));
    assert!(reaches(topo.wan_host("wgo"), topo.gateway_wan_ip(1)));
    assert!(reaches(topo.gateway(1), ip));
    assert!(topo.add_wan_host("dup", ip).is_err());
    assert!(
        topo.add_wan_host("gwclash", topo.gateway_wan_ip(1))
            .is_err()
    );
    assert!(
        topo.add_wan_host("far", "10.0.0.1".parse().unwrap())
            .is_err()
    );
    let wg = topo.iface_named("wg");
    assert!(wg.len() <= 15 && wg.starts_with(&format!("sk{}", topo.id())));
}
