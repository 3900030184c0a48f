//! Sections 4 and 7, which share one coordinator holding 10,000 services:
//!
//! - DNS (section 4): dnsperf against meshd's embedded DNS (`--dns-listen`) holding
//!   every service, and against dnsmasq serving the same names from a hosts
//!   file, same query file, same namespaces (dnsperf in an app host, both
//!   servers on the gateway's LAN address), in turns.
//! - Scale (section 7): then 99 simulated gateways join (created and joined through
//!   the gateway API with generated keys, no meshd); the coordinator's RSS
//!   from `/proc` and the encoded size of one cluster's Netmap snapshot.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use base64::Engine as _;
use futures::StreamExt as _;
use prost::Message as _;
use rand::seq::SliceRandom as _;
use skymesh_proto::Bearer;
use skymesh_proto::v1::{
    Cluster, ClusterSpec, CreateRequest, JoinRequest, NetmapRequest, NetmapUpdate, ObjectMeta,
    Protocol, Service, ServicePort, ServiceSpec, api_client::ApiClient,
    gateway_client::GatewayClient, netmap_update::Update,
};
use skymesh_tests::mesh::{DNS_PORT, Mesh};
use skymesh_tests::netns::{Netns, NsProcess, wait_until};

use crate::Cfg;
use crate::report::{Better, Cell, Row, Table, Unit};
use crate::tools::DnsProbe;

/// dnsmasq's port (meshd has 53 on the same address).
const DNSMASQ_PORT: u16 = 5353;
/// Concurrent creates in flight.
const IN_FLIGHT: usize = 64;

/// A TLS endpoint of the mesh's coordinator and its admin token.
fn coordinator(mesh: &Mesh) -> Result<(tonic::transport::Endpoint, String)> {
    let token = std::fs::read_to_string(mesh.topo.dir().join("coordinator/admin.token"))
        .context("reading the coordinator's admin token")?;
    Ok((mesh.coordinator_endpoint()?, token.trim().to_string()))
}

/// VmRSS and VmHWM (bytes) of the process named `comm` inside `ns`.
pub fn rss_of(ns: &Netns, comm: &str) -> Result<(f64, f64)> {
    let out = std::process::Command::new("ip")
        .args(["netns", "pids", ns.name()])
        .output()?;
    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if name.trim() != comm {
            continue;
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kb = |key: &str| -> Option<f64> {
            status
                .lines()
                .find(|l| l.starts_with(key))?
                .split_whitespace()
                .nth(1)?
                .parse::<f64>()
                .ok()
                .map(|k| k * 1024.0)
        };
        return Ok((
            kb("VmRSS:").context("no VmRSS")?,
            kb("VmHWM:").context("no VmHWM")?,
        ));
    }
    bail!("no {comm} process in {}", ns.name())
}

/// Creates `n` ClusterIP services `svc-00000`.. through the gRPC API from
/// the WAN namespace, [`IN_FLIGHT`] at a time. Returns (name, VIP) pairs
/// and the creates per second.
fn create_services(mesh: &Mesh, n: usize) -> Result<(Vec<(String, String)>, f64)> {
    let (url, token) = coordinator(mesh)?;
    mesh.topo.wan().run_async(move || async move {
        let ch = url.connect().await?;
        let api = ApiClient::with_interceptor(ch, Bearer::new(Some(&token))?);
        let t0 = Instant::now();
        let results: Vec<Result<(String, String)>> = futures::stream::iter(0..n)
            .map(|i| {
                let mut api = api.clone();
                async move {
                    let name = format!("svc-{i:05}");
                    let svc = Service {
                        metadata: Some(ObjectMeta {
                            name: name.clone(),
                            namespace: "default".into(),
                            ..Default::default()
                        }),
                        spec: Some(ServiceSpec {
                            ports: vec![ServicePort {
                                name: "http".into(),
                                port: 80,
                                target_port: 8080,
                                protocol: Protocol::Tcp as i32,
                            }],
                            ..Default::default()
                        }),
                        status: None,
                    };
                    let resp = api
                        .create(CreateRequest {
                            object: Some(svc.into()),
                        })
                        .await
                        .with_context(|| format!("creating service {name}"))?
                        .into_inner();
                    let vip = match resp.object.and_then(|o| o.obj) {
                        Some(skymesh_proto::v1::object::Obj::Service(s)) => {
                            s.status.map(|s| s.cluster_ip).unwrap_or_default()
                        }
                        _ => String::new(),
                    };
                    ensure!(!vip.is_empty(), "service {name} got no VIP");
                    if (i + 1) % 1000 == 0 {
                        eprintln!(
                            "[dns] {} services created ({:.0} s)",
                            i + 1,
                            t0.elapsed().as_secs_f64()
                        );
                    }
                    Ok((name, vip))
                }
            })
            .buffer_unordered(IN_FLIGHT)
            .collect()
            .await;
        let rate = n as f64 / t0.elapsed().as_secs_f64();
        let out = results.into_iter().collect::<Result<Vec<_>>>()?;
        Ok((out, rate))
    })?
}

/// One dnsperf run from `ns` against `server:port`: (QPS, p99 latency ms,
/// lost percent).
fn dnsperf(
    ns: &Netns,
    server: Ipv4Addr,
    port: u16,
    file: &Path,
    secs: u32,
) -> Result<(f64, f64, f64)> {
    let out = ns.exec(&[
        "dnsperf",
        "-s",
        &server.to_string(),
        "-p",
        &port.to_string(),
        "-d",
        &file.to_string_lossy(),
        "-l",
        &secs.to_string(),
        "-t",
        "2",
        "-v",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "dnsperf against {server}:{port} failed: {}{}",
        text.lines().rev().take(5).collect::<Vec<_>>().join("\n"),
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |key: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.trim_start().starts_with(key))?
            .split(':')
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    let qps = field("Queries per second").context("dnsperf printed no QPS")?;
    let sent = field("Queries sent").unwrap_or(0.0);
    let lost = field("Queries lost").unwrap_or(0.0);
    // -v: one line per answered query, its latency (seconds) last.
    let lat: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with("> "))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .map(|s| s * 1000.0)
        .collect();
    ensure!(!lat.is_empty(), "dnsperf -v printed no per-query latencies");
    let p99 = crate::report::percentile(&lat, 99.0).unwrap_or(f64::NAN);
    let lost_pct = if sent > 0.0 { 100.0 * lost / sent } else { 0.0 };
    Ok((qps, p99, lost_pct))
}

/// Runs sections 4 and 7.
pub fn run(cfg: &Cfg) -> Result<Vec<Table>> {
    eprintln!("[dns] starting a 1-cluster mesh");
    let mut mesh = Mesh::start(1, 1)?;
    crate::cleanup::register(&mesh.topo);
    let gw_ip = mesh.topo.gateway_lan_ip(1);
    let mut probe = DnsProbe::new(mesh.topo.app(1, 1), SocketAddr::from((gw_ip, DNS_PORT)))?;
    ensure!(
        wait_until(Duration::from_secs(20), || probe
            .ask("x.default.svc")
            .is_some()),
        "meshd's DNS does not answer on {gw_ip}:{DNS_PORT}"
    );
    let rss_empty = rss_of(mesh.topo.wan(), "coordinator")?;

    eprintln!(
        "[dns] creating {} services through the gRPC API",
        cfg.services
    );
    let (services, create_rate) = create_services(&mesh, cfg.services)?;
    eprintln!("[dns] {create_rate:.0} creates/s");
    let t0 = Instant::now();
    let last = services
        .iter()
        .map(|(n, _)| n.clone())
        .max()
        .context("no services")?;
    // meshd may apply a burst of deltas slowly; give it time but say so.
    let catch_up = Duration::from_secs(60 + cfg.services as u64 / 20);
    if !wait_until(catch_up, || probe.resolves(&format!("{last}.default.svc"))) {
        let log = mesh.meshd_log(1);
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        bail!(
            "meshd did not resolve {last}.default.svc within {catch_up:?}; its log ends:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    let caught_up = t0.elapsed().as_secs_f64();
    // (RSS, peak RSS): the peak is what the host must have room for while
    // the services stream in.
    let meshd_rss = rss_of(mesh.topo.gateway(1), "meshd");

    // The same names for dnsmasq, from a hosts file.
    let dir = mesh.topo.dir().to_path_buf();
    let hosts: String = services
        .iter()
        .map(|(n, vip)| format!("{vip} {n}.default.svc\n"))
        .collect();
    std::fs::write(dir.join("services.hosts"), hosts)?;
    let mut queries: Vec<String> = services
        .iter()
        .map(|(n, _)| format!("{n}.default.svc A\n"))
        .collect();
    queries.shuffle(&mut rand::rng());
    let qfile = dir.join("queries.txt");
    std::fs::write(&qfile, queries.concat())?;
    let dnsmasq = start_dnsmasq(&mesh, &dir)?;
    let mut dprobe = DnsProbe::new(mesh.topo.app(1, 1), SocketAddr::from((gw_ip, DNSMASQ_PORT)))?;
    ensure!(
        wait_until(Duration::from_secs(10), || dprobe
            .resolves(&format!("{last}.default.svc"))),
        "dnsmasq does not resolve {last}.default.svc: {}",
        dnsmasq.log()
    );

    let app = mesh.topo.app(1, 1);
    let mut m: [Vec<(f64, f64, f64)>; 2] = [Vec::new(), Vec::new()];
    let mut err: [Option<String>; 2] = [None, None];
    for run in 0..cfg.runs {
        for (i, port) in [DNS_PORT, DNSMASQ_PORT].into_iter().enumerate() {
            if err[i].is_some() {
                continue;
            }
            match dnsperf(app, gw_ip, port, &qfile, cfg.dnsperf_secs) {
                Ok(r) => {
                    eprintln!(
                        "[dns] run {}/{} {:<8} {:.0} QPS, p99 {:.2} ms, lost {:.2} %",
                        run + 1,
                        cfg.runs,
                        ["meshd", "dnsmasq"][i],
                        r.0,
                        r.1,
                        r.2
                    );
                    m[i].push(r);
                }
                Err(e) => err[i] = Some(format!("{e:#}")),
            }
        }
    }
    drop(dnsmasq);
    let cell = |i: usize, f: fn(&(f64, f64, f64)) -> f64| match &err[i] {
        Some(e) => Cell::Failed(e.clone()),
        None => Cell::from_samples(&m[i].iter().map(f).collect::<Vec<_>>()),
    };
    let mut dns = Table::new(
        "4. DNS",
        "meshd DNS",
        &["dnsmasq"],
        format!(
            "dnsperf (default 100 queries in flight, `-v` for per-query latencies, {} s per run, \
             median of {} runs) from an app host against the gateway's LAN address: meshd's \
             embedded DNS holding {} services (ClusterIP, made through the gRPC API) vs dnsmasq \
             serving the same names and VIPs from a hosts file; the same shuffled query file of \
             every name (A records).",
            cfg.dnsperf_secs, cfg.runs, cfg.services
        ),
    );
    for (metric, unit, better, f) in [
        (
            "queries per second",
            Unit::PerSec,
            Better::Higher,
            (|r: &(f64, f64, f64)| r.0) as fn(&(f64, f64, f64)) -> f64,
        ),
        (
            "latency p99 (under full load)",
            Unit::Ms,
            Better::Lower,
            |r| r.1,
        ),
        ("queries lost", Unit::Pct, Better::Lower, |r| r.2),
    ] {
        dns.rows.push(Row {
            metric: metric.into(),
            unit,
            better,
            skymesh: cell(0, f),
            peers: vec![cell(1, f)],
        });
    }

    // 7. Scale: stop the real gateway (it would probe 99 fake peers), add
    // simulated ones.
    mesh.stop_meshd(1);
    let scale = scale(cfg, &mesh, rss_empty, create_rate, caught_up, meshd_rss);
    Ok(vec![dns, scale])
}

fn start_dnsmasq(mesh: &Mesh, dir: &Path) -> Result<NsProcess> {
    let gw = mesh.topo.gateway(1);
    let hosts = dir.join("services.hosts");
    let args = [
        "dnsmasq".to_string(),
        "-k".into(),
        "-C".into(),
        "/dev/null".into(),
        "--no-resolv".into(),
        "--no-hosts".into(),
        format!("--addn-hosts={}", hosts.display()),
        format!("--listen-address={}", mesh.topo.gateway_lan_ip(1)),
        "--bind-interfaces".into(),
        format!("--port={DNSMASQ_PORT}"),
        "--user=root".into(),
        "--group=root".into(),
        "--pid-file".into(),
        "--log-facility=-".into(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    gw.spawn(&args, &dir.join("dnsmasq.log"))
}

/// Section 7 on the DNS section's coordinator.
fn scale(
    cfg: &Cfg,
    mesh: &Mesh,
    rss_empty: (f64, f64),
    create_rate: f64,
    caught_up: f64,
    meshd_rss: Result<(f64, f64)>,
) -> Table {
    let mut t = Table::new(
        "7. Scale",
        "skymesh",
        &[],
        format!(
            "The DNS section's coordinator: 1 real cluster, then {} simulated gateways \
             created and joined through the gateway API with generated keys (no meshd), \
             holding {} ClusterIP services. Sizes from `/proc/<pid>/status`; the snapshot is \
             the encoded first NetmapUpdate of one simulated cluster's stream (median of {} \
             streams).",
            cfg.clusters - 1,
            cfg.services,
            cfg.runs
        ),
    );
    t.rows.push(Row::solo(
        &format!(
            "creating {} services through gRPC ({IN_FLIGHT} in flight)",
            cfg.services
        ),
        Unit::PerSec,
        Better::Higher,
        Cell::from_samples(&[create_rate]),
    ));
    t.rows.push(Row::solo(
        "last create acknowledged → resolvable in meshd's DNS",
        Unit::Secs,
        Better::Lower,
        Cell::from_samples(&[caught_up]),
    ));
    t.rows.push(Row::solo(
        &format!("meshd RSS holding {} services", cfg.services),
        Unit::Bytes,
        Better::Lower,
        Cell::from_result(
            meshd_rss
                .as_ref()
                .map(|r| vec![r.0])
                .map_err(|e| anyhow::anyhow!("{e:#}")),
        ),
    ));
    t.rows.push(Row::solo(
        "meshd peak RSS (VmHWM)",
        Unit::Bytes,
        Better::Lower,
        Cell::from_result(meshd_rss.map(|r| vec![r.1])),
    ));
    t.rows.push(Row::solo(
        "coordinator RSS, 1 cluster, no services",
        Unit::Bytes,
        Better::Lower,
        Cell::from_samples(&[rss_empty.0]),
    ));
    let sim = simulate(cfg, mesh);
    let (rss, snap, secs) = match sim {
        Ok((rss, sizes, times)) => (
            Cell::from_samples(&[rss.0]),
            (Cell::from_samples(&sizes), Cell::from_samples(&[rss.1])),
            Cell::from_samples(&times),
        ),
        Err(e) => {
            let f = Cell::Failed(format!("{e:#}"));
            (f.clone(), (f.clone(), f.clone()), f)
        }
    };
    let label = format!("{} clusters, {} services", cfg.clusters, cfg.services);
    t.rows.push(Row::solo(
        &format!("coordinator RSS, {label}"),
        Unit::Bytes,
        Better::Lower,
        rss,
    ));
    t.rows.push(Row::solo(
        "coordinator peak RSS (VmHWM)",
        Unit::Bytes,
        Better::Lower,
        snap.1,
    ));
    t.rows.push(Row::solo(
        &format!("netmap snapshot of one cluster, {label}"),
        Unit::Bytes,
        Better::Lower,
        snap.0,
    ));
    t.rows.push(Row::solo(
        "netmap stream open → snapshot received",
        Unit::Ms,
        Better::Lower,
        secs,
    ));
    t
}

/// The coordinator's (RSS, HWM), the snapshot sizes and times (ms).
type Simulated = ((f64, f64), Vec<f64>, Vec<f64>);

/// Creates and joins the simulated clusters; returns what [`Simulated`]
/// holds.
fn simulate(cfg: &Cfg, mesh: &Mesh) -> Result<Simulated> {
    let (url, token) = coordinator(mesh)?;
    let n = cfg.clusters.saturating_sub(1);
    let runs = cfg.runs;
    eprintln!("[scale] creating and joining {n} simulated clusters");
    let (sizes, times) = mesh.topo.wan().run_async(move || async move {
        let ch = url.connect().await?;
        let api = ApiClient::with_interceptor(ch.clone(), Bearer::new(Some(&token))?);
        let creds: Vec<Result<(String, String)>> = futures::stream::iter(2..2 + n)
            .map(|i| {
                let (mut api, ch) = (api.clone(), ch.clone());
                async move { join_fake(&mut api, ch, i).await }
            })
            // One at a time: concurrent joins lose CAS races in the
            // coordinator ("join lost too many races").
            .buffer_unordered(1)
            .collect()
            .await;
        let creds = creds.into_iter().collect::<Result<Vec<_>>>()?;
        let (name, cred) = creds.last().context("no simulated cluster")?.clone();
        let mut gw = GatewayClient::with_interceptor(ch, Bearer::new(Some(&cred))?)
            .max_decoding_message_size(256 << 20);
        // The netmap is served from the coordinator's watch cache, which
        // follows the store (10,000 service writes, their events, then the
        // joins) a little behind: measure once it holds every peer.
        let mut snapshot = async || -> Result<NetmapUpdate> {
            let mut s = gw
                .netmap(NetmapRequest {
                    cluster: name.clone(),
                    resource_version: 0,
                })
                .await?
                .into_inner();
            s.message().await?.context("netmap stream ended")
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let first = snapshot().await?;
            if let Some(Update::Snapshot(nm)) = &first.update
                && nm.peers.len() + 1 >= n
            {
                break;
            }
            if Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let (mut sizes, mut times) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            let t0 = Instant::now();
            let first = snapshot().await?;
            times.push(t0.elapsed().as_secs_f64() * 1000.0);
            let Some(Update::Snapshot(nm)) = &first.update else {
                bail!("the netmap stream did not start with a snapshot");
            };
            ensure!(
                !nm.services.is_empty() && nm.peers.len() + 1 >= n,
                "snapshot holds {} services and {} peers",
                nm.services.len(),
                nm.peers.len()
            );
            sizes.push(first.encoded_len() as f64);
        }
        Ok::<_, anyhow::Error>((sizes, times))
    })??;
    let rss = rss_of(mesh.topo.wan(), "coordinator")?;
    Ok((rss, sizes, times))
}

/// Creates cluster `sim-<i>` (workload `10.<i>.0.0/16`) and joins it with a
/// generated key; returns its name and credential.
async fn join_fake(
    api: &mut ApiClient<
        tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>,
    >,
    ch: tonic::transport::Channel,
    i: usize,
) -> Result<(String, String)> {
    let name = format!("sim-{i:03}");
    let created = api
        .create(CreateRequest {
            object: Some(
                Cluster {
                    metadata: Some(ObjectMeta {
                        name: name.clone(),
                        ..Default::default()
                    }),
                    spec: Some(ClusterSpec {
                        workload_cidrs: vec![format!("10.{i}.0.0/16")],
                    }),
                    status: None,
                }
                .into(),
            ),
        })
        .await
        .with_context(|| format!("creating cluster {name}"))?
        .into_inner();
    let key: [u8; 32] = rand::random();
    let mut gw = GatewayClient::with_interceptor(ch, Bearer::new(Some(&created.join_token))?);
    let joined = gw
        .join(JoinRequest {
            cluster: name.clone(),
            public_key: base64::engine::general_purpose::STANDARD.encode(key),
            endpoint: format!("198.51.100.250:{}", 40000 + i),
        })
        .await
        .with_context(|| format!("joining {name}"))?
        .into_inner();
    Ok((name, joined.credential))
}
