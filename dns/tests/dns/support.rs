//! Fixtures: a server on port 0, mesh objects, `dig` and its output.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Once;
use std::time::Duration;

use prometheus_client::registry::Registry;
use skymesh_dns::{DnsConfig, DnsHandle, DnsServer, Error, MeshView, Upstreams};
use skymesh_proto::v1::{
    EndpointAddress, Endpoints, EndpointsClusterStatus, EndpointsSpec, EndpointsStatus, ObjectMeta,
    Protocol, Service, ServicePort, ServiceSpec, ServiceStatus, ServiceType,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const CLUSTER: &str = "east";

/// Tracing to the test writer, once (`RUST_LOG` filters).
pub fn subscribe() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .try_init();
    });
}

pub struct TestServer {
    pub handle: DnsHandle,
    pub addr: SocketAddr,
    task: JoinHandle<Result<(), Error>>,
}

impl TestServer {
    /// Stops the server and checks that it stopped cleanly and promptly.
    pub async fn stop(self) {
        self.handle.shutdown();
        let result = tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("server did not stop within 5 s");
        result
            .expect("server task panicked")
            .expect("server failed");
    }
}

pub fn config(upstreams: Vec<SocketAddr>) -> DnsConfig {
    DnsConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        service_cidr: Some("100.65.0.0/16".parse().unwrap()),
        upstreams: Upstreams::Static(upstreams),
        upstream_timeout: Duration::from_secs(1),
        ..DnsConfig::default()
    }
}

/// A server for `config` serving `view`.
pub async fn start_with(config: DnsConfig, view: &MeshView) -> TestServer {
    subscribe();
    let mut registry = Registry::default();
    let (server, handle) = DnsServer::bind(config, &mut registry, CancellationToken::new())
        .await
        .unwrap();
    let addr = server.local_addr();
    assert_eq!(addr, handle.local_addr());
    assert_ne!(addr.port(), 0);
    let task = tokio::spawn(server.run());
    handle.update(view);
    TestServer { handle, addr, task }
}

/// A server with the default zones, no upstream, serving `view`.
pub async fn start(view: &MeshView) -> TestServer {
    start_with(config(vec![]), view).await
}

pub fn meta(ns: &str, name: &str) -> Option<ObjectMeta> {
    Some(ObjectMeta {
        name: name.into(),
        namespace: ns.into(),
        ..ObjectMeta::default()
    })
}

pub fn service(ns: &str, name: &str, ty: ServiceType, vip: &str, clusters: &[&str]) -> Service {
    Service {
        metadata: meta(ns, name),
        spec: Some(ServiceSpec {
            r#type: ty.into(),
            ports: vec![ServicePort {
                name: "http".into(),
                port: 80,
                target_port: 8080,
                protocol: Protocol::Tcp.into(),
            }],
            clusters: clusters.iter().map(|c| (*c).to_owned()).collect(),
            ..ServiceSpec::default()
        }),
        status: Some(ServiceStatus {
            cluster_ip: vip.into(),
            external_ips: vec![],
        }),
    }
}

pub fn external(ns: &str, name: &str, target: &str) -> Service {
    let mut s = service(ns, name, ServiceType::ExternalName, "", &[]);
    s.spec.as_mut().unwrap().external_name = target.into();
    s
}

/// `(job, ip)` of ready replicas.
pub type Jobs = Vec<(String, String)>;

/// Endpoints with one status entry per `(cluster, exposed, [(job, ip)])`, all ready.
pub fn endpoints(ns: &str, name: &str, entries: &[(&str, bool, Jobs)]) -> Endpoints {
    Endpoints {
        metadata: meta(ns, name),
        spec: Some(EndpointsSpec::default()),
        status: Some(EndpointsStatus {
            clusters: entries
                .iter()
                .map(|(cluster, exposed, addrs)| EndpointsClusterStatus {
                    cluster: (*cluster).into(),
                    exposed: *exposed,
                    addresses: addrs
                        .iter()
                        .map(|(job, ip)| EndpointAddress {
                            ip: ip.clone(),
                            ports: vec![],
                            job: job.clone(),
                            ready: true,
                        })
                        .collect(),
                })
                .collect(),
        }),
    }
}

pub fn jobs(prefix: &str, net: &str, n: usize) -> Jobs {
    (0..n)
        .map(|i| {
            (
                format!("{prefix}-{i}"),
                format!("{net}.{}.{}", i / 200, i % 200 + 1),
            )
        })
        .collect()
}

/// The mesh most tests use, seen from cluster `east`.
pub fn mesh() -> MeshView {
    MeshView {
        cluster: CLUSTER.into(),
        services: vec![
            service("default", "web", ServiceType::ClusterIp, "100.65.0.10", &[]),
            service(
                "default",
                "api",
                ServiceType::ClusterIp,
                "100.65.0.11",
                &["west"],
            ),
            service("shop", "cart", ServiceType::Headless, "", &[]),
            service("default", "big", ServiceType::Headless, "", &[]),
            external("default", "docs", "docs.example.org"),
        ]
        .into_iter()
        .map(std::sync::Arc::new)
        .collect(),
        endpoints: vec![
            endpoints(
                "shop",
                "cart",
                &[
                    ("east", false, jobs("cart-e", "10.1", 2)),
                    ("west", true, jobs("cart-w", "10.2", 2)),
                    ("north", false, jobs("cart-n", "10.3", 1)),
                ],
            ),
            endpoints(
                "default",
                "big",
                &[("west", true, jobs("big", "10.9", 100))],
            ),
        ]
        .into_iter()
        .map(std::sync::Arc::new)
        .collect(),
        local_unready: HashSet::new(),
        local_cidrs: Vec::new(),
    }
}

/// dig's answer: header status and flags, and the records of each section
/// as whitespace-separated fields (`name ttl class type rdata...`).
#[derive(Debug, Default)]
pub struct Dig {
    pub status: String,
    pub flags: Vec<String>,
    pub answer: Vec<Vec<String>>,
    pub authority: Vec<Vec<String>>,
    pub raw: String,
}

impl Dig {
    /// The rdata (fields after the type) of answer records of type `rtype`, sorted.
    pub fn rdata(&self, rtype: &str) -> Vec<String> {
        let mut out: Vec<String> = self
            .answer
            .iter()
            .filter(|f| f.get(3).map(String::as_str) == Some(rtype))
            .map(|f| f[4..].join(" "))
            .collect();
        out.sort();
        out
    }

    pub fn has_flag(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }
}

/// Runs `dig @127.0.0.1 -p PORT args...` and parses its output.
pub async fn dig(addr: SocketAddr, args: &[&str]) -> Dig {
    let port = addr.port().to_string();
    let server = format!("@{}", addr.ip());
    let output = tokio::process::Command::new("dig")
        .args([server.as_str(), "-p", &port, "+time=2", "+tries=1"])
        .args(args)
        .output()
        .await;
    let output = match output {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!(
                "`dig` is not installed: install bind9-dnsutils (apt-get install -y bind9-dnsutils)"
            )
        }
        Err(e) => panic!("cannot run dig: {e}"),
    };
    let raw = String::from_utf8_lossy(&output.stdout).into_owned();
    parse_dig(raw)
}

fn parse_dig(raw: String) -> Dig {
    let mut out = Dig::default();
    let mut section = "";
    for line in raw.lines() {
        if let Some(rest) = line.strip_prefix(";; ->>HEADER<<-") {
            if let Some(status) = rest.split("status: ").nth(1) {
                out.status = status
                    .split(',')
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_owned();
            }
        } else if let Some(rest) = line.strip_prefix(";; flags:") {
            let flags = rest.split(';').next().unwrap_or_default();
            out.flags = flags.split_whitespace().map(str::to_owned).collect();
        } else if line.starts_with(";; ANSWER SECTION:") {
            section = "answer";
        } else if line.starts_with(";; AUTHORITY SECTION:") {
            section = "authority";
        } else if line.trim().is_empty() || line.starts_with(';') {
            section = "";
        } else {
            let fields: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
            match section {
                "answer" => out.answer.push(fields),
                "authority" => out.authority.push(fields),
                _ => {}
            }
        }
    }
    out.raw = raw;
    out
}
