//! Memory meshd's per-service state takes for 10,000 services (issue #14):
//! the netmap (as meshd holds it: the netmap task's copy and the published
//! one), the balancer's table (Maglev tables included) and the DNS records.
//!
//! Measured as growth of this process's resident anonymous memory
//! (`RssAnon`), so everything counts: allocations, the allocator's
//! overhead, and freed memory it did not give back. `unsafe_code` is
//! forbidden in the workspace, so there is no counting allocator here; the
//! figure can only overstate what the state costs, never understate it.
//!
//! One test function in its own binary: nothing else allocates meanwhile.
#![allow(clippy::unwrap_used)]

use std::net::Ipv4Addr;

use meshd::core::lb::{FlowLimits, Health, LbConfig, LbTable};
use meshd::state::NetState;
use skymesh_proto::v1::{
    EndpointAddress, Endpoints, EndpointsClusterStatus, EndpointsStatus, ObjectMeta, Peer,
    Protocol, Service, ServicePort, ServiceSpec, ServiceStatus, ServiceType,
};

/// Resident anonymous memory of this process, in bytes.
fn rss_anon() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: usize = status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    kb * 1024
}

/// `f`'s result and how much resident memory it added.
fn held<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = rss_anon();
    let v = f();
    (v, rss_anon().saturating_sub(before))
}

const N: usize = 10_000;

fn meta(name: &str, i: usize) -> Option<ObjectMeta> {
    Some(ObjectMeta {
        name: name.into(),
        namespace: "default".into(),
        uid: format!("{:032x}", i),
        resource_version: 1000 + i as u64,
        creation_timestamp: 1_700_000_000,
        ..Default::default()
    })
}

/// Service `i` as the benchmark creates it: ClusterIP, port `http` 80 →
/// 8080, a VIP in 100.65/16.
fn service(i: usize) -> Service {
    let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 65, 0, 1)) + i as u32);
    Service {
        metadata: meta(&format!("svc-{i:05}"), i),
        spec: Some(ServiceSpec {
            r#type: ServiceType::ClusterIp as i32,
            ports: vec![ServicePort {
                name: "http".into(),
                port: 80,
                target_port: 8080,
                protocol: Protocol::Tcp as i32,
            }],
            ..Default::default()
        }),
        status: Some(ServiceStatus {
            cluster_ip: vip.to_string(),
            external_ips: vec![],
        }),
    }
}

/// `k` ready replicas of service `i`, spread over clusters c1..c3.
fn endpoints(i: usize, k: usize) -> Endpoints {
    let clusters = (1..=3)
        .map(|c| EndpointsClusterStatus {
            cluster: format!("c{c}"),
            exposed: true,
            addresses: (0..k)
                .filter(|r| r % 3 + 1 == c)
                .map(|r| EndpointAddress {
                    ip: format!("10.{c}.{}.{}", i / 250, (i % 250) + r / 3),
                    ports: vec![],
                    job: format!("svc-{i:05}-{r}"),
                    ready: true,
                })
                .collect(),
        })
        .collect();
    Endpoints {
        metadata: meta(&format!("svc-{i:05}"), i),
        spec: None,
        status: Some(EndpointsStatus { clusters }),
    }
}

/// The mesh seen from c1 with `N` services, each with `replicas(i)`
/// replicas (0: no Endpoints object).
fn mesh(replicas: impl Fn(usize) -> usize) -> NetState {
    let mut s = NetState {
        revision: 1,
        cluster: "c1".into(),
        overlay_ip: "100.64.0.1".into(),
        overlay_cidr: "100.64.0.0/16".into(),
        service_cidr: "100.65.0.0/16".into(),
        workload_cidrs: vec!["10.1.0.0/16".into()],
        ..Default::default()
    };
    for (i, c) in [(2, "c2"), (3, "c3")] {
        s.peers.insert(
            c.into(),
            Peer {
                cluster: c.into(),
                allowed_ips: vec![format!("100.64.0.{i}/32"), format!("10.{i}.0.0/16")],
                ..Default::default()
            },
        );
    }
    s.reparse();
    for i in 0..N {
        let key = ("default".to_string(), format!("svc-{i:05}"));
        s.services.insert(key.clone(), service(i));
        let k = replicas(i);
        if k > 0 {
            s.endpoints.insert(key, endpoints(i, k));
        }
    }
    s
}

fn lb_cfg() -> LbConfig {
    LbConfig {
        cluster: "c1".into(),
        service_cidr: "100.65.0.0/16".parse().unwrap(),
        hash_key: [1, 2],
        limits: FlowLimits::default(),
        gateway_ip: None,
    }
}

fn dns_cfg() -> skymesh_dns::DnsConfig {
    skymesh_dns::DnsConfig {
        service_cidr: Some("100.65.0.0/16".parse().unwrap()),
        ..Default::default()
    }
}

/// What meshd holds for `N` services, in bytes, by part.
#[derive(Debug)]
struct Figures {
    /// The netmap task's state and the published copy.
    netmap: usize,
    lb: usize,
    dns: usize,
}

impl Figures {
    fn total(&self) -> usize {
        self.netmap + self.lb + self.dns
    }
}

fn measure(label: &str, replicas: impl Fn(usize) -> usize) -> Figures {
    // The netmap task keeps its state and publishes a clone of it
    // (`control::run_netmap`); every task reads the published one.
    let ((state, published), netmap) = held(|| {
        let s = mesh(&replicas);
        let p = std::sync::Arc::new(s.clone());
        (s, p)
    });
    let (lb, lb_bytes) = held(|| LbTable::build(&published, &lb_cfg(), &Health::default()));
    let (records, dns) = held(|| {
        let view = meshd::run::dns_view(&published, &Health::default(), &Default::default());
        skymesh_dns::RecordSet::build(&view, &dns_cfg())
    });
    let f = Figures {
        netmap,
        lb: lb_bytes,
        dns,
    };
    let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
    eprintln!(
        "{label}: netmap (2 copies) {:.1} MiB, LbTable {:.1} MiB, DNS records {:.1} MiB \
         ({} names): {:.1} MiB, {} B per service",
        mib(f.netmap),
        mib(f.lb),
        mib(f.dns),
        records.len(),
        mib(f.total()),
        f.total() / N
    );
    assert_eq!(lb.vips().count(), N);
    drop((records, lb, published, state));
    f
}

/// The scenarios, each measured in a process of its own (memory freed by
/// one would otherwise be reused by the next without showing), and the
/// most each may take in all, in MiB.
///
/// Measured (debug build, RssAnon growth): the first takes 18.1 MiB
/// (netmap 9.3, LbTable 3.3, DNS records 5.5); it took 49.9 MiB while the
/// DNS records were hickory RRsets per name and zone (about 36 of it), and
/// 60.5 MiB while they were keyed by `LowerName`. The second takes 51.8
/// MiB, and took 82.2 MiB with RRsets, 102.7 MiB while its Endpoints were
/// copied into both netmaps and into every DNS view.
///
/// The whole meshd process is measured by the benchmark (`skymesh-bench
/// --only dns`: meshd's RSS and peak RSS holding 10,000 services).
const SCENARIOS: [(&str, usize); 2] = [("no-endpoints", 21), ("1-3-replicas", 58)];
const TEST: &str = "state_for_10000_services_stays_small";

#[test]
fn state_for_10000_services_stays_small() {
    if let Ok(s) = std::env::var("MESHD_MEMORY_SCENARIO") {
        let f = match s.as_str() {
            // As in the benchmark: ClusterIP services without endpoints.
            "no-endpoints" => measure(&s, |_| 0),
            _ => measure(&s, |i| 1 + i % 3),
        };
        println!("figures {} {} {}", f.netmap, f.lb, f.dns);
        return;
    }
    for (s, bound) in SCENARIOS {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([TEST, "--exact", "--nocapture", "--test-threads=1"])
            .env("MESHD_MEMORY_SCENARIO", s)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{s}: {stdout}");
        let n: Vec<usize> = stdout
            .lines()
            // libtest may print "test <name> ... " on the same line first.
            .find_map(|l| l.split_once("figures ").map(|(_, f)| f))
            .unwrap()
            .split_whitespace()
            .map(|x| x.parse().unwrap())
            .collect();
        let f = Figures {
            netmap: n[0],
            lb: n[1],
            dns: n[2],
        };
        eprintln!("{s}: {f:?}");
        assert!(
            f.total() <= bound << 20,
            "{s}: the state for {N} services takes {} MiB, more than {bound} MiB: {f:?}",
            f.total() >> 20
        );
    }
}
