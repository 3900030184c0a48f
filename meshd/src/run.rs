//! Start-up and wiring: key, join, netmap, TUN, routes, and every task.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use arc_swap::ArcSwap;
use base64::Engine as _;
use ipnet::Ipv4Net;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::core::engine::Engine;
use crate::core::lb::{Health, Lb, LbConfig, LbTable, routable};
use crate::core::node::Node;
use crate::io::{control, device, health, metrics, nodeport, tun, uapi};
use crate::state::NetState;
use crate::statedir::StateDir;
use skymesh_proto::tls::{ClientTls, Trust};

/// meshd's configuration (its flags, SPEC §4).
#[derive(Debug, Clone)]
pub struct Config {
    pub coordinator: String,
    pub cluster: String,
    pub join_token: Option<String>,
    pub endpoint: Option<SocketAddr>,
    pub listen_port: u16,
    pub state_dir: PathBuf,
    pub interface: String,
    pub dns_listen: Option<SocketAddr>,
    /// Upstream resolvers for names outside the mesh zones; empty = the
    /// host's /etc/resolv.conf.
    pub dns_upstreams: Vec<SocketAddr>,
    /// Clients besides loopback and the workload CIDRs that may use DNS
    /// recursion (`--dns-allow`).
    pub dns_allow: Vec<ipnet::IpNet>,
    pub metrics_listen: Option<SocketAddr>,
    pub jobs: Option<PathBuf>,
    /// TUN and UDP segmentation offloads (off: one packet per syscall).
    pub offload: bool,
    /// Bounds on the balancer's flow table (`--max-flows`, ...).
    pub flow_limits: crate::core::lb::FlowLimits,
}

/// What the coordinator is verified with: the CA pinned at the first join,
/// else (first start) the fingerprint the join token carries. `None`: only a
/// loopback `http://` coordinator can be used.
fn coordinator_trust(dir: &StateDir, joined: bool, token: Option<&str>) -> Result<Option<Trust>> {
    if let Some(t) = dir.ca()? {
        return Ok(Some(t));
    }
    if joined {
        // Joined before the coordinator spoke TLS: nothing pinned yet.
        tracing::warn!(
            "no pinned coordinator CA in {}: copy the coordinator's ca.crt there to use https://",
            dir.path().display()
        );
        return Ok(None);
    }
    match token
        .map(skymesh_proto::tls::join_token_fingerprint)
        .transpose()
    {
        Ok(fp) => Ok(fp.flatten().map(Trust::Fingerprint)),
        Err(e) => bail!("{e}"),
    }
}

/// Runs meshd until `cancel` fires or a task fails.
pub async fn run(cfg: Config, cancel: CancellationToken) -> Result<()> {
    let cluster = skymesh_proto::validate::name("--cluster", &cfg.cluster)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let dir = StateDir::open(&cfg.state_dir)?;
    let (private_key, _) = dir.private_key()?;
    let node = Node::new(private_key);
    let public_b64 = base64::engine::general_purpose::STANDARD.encode(node.public_key());
    let credential = dir.credential();
    let tls = ClientTls::new(coordinator_trust(
        &dir,
        credential.is_some(),
        cfg.join_token.as_deref(),
    )?);
    let ch = control::channel(&cfg.coordinator, &tls)?;

    let credential = match credential {
        Some(c) => c,
        None => {
            let Some(token) = &cfg.join_token else {
                bail!(
                    "first start needs a join token: --join-token-file FILE or MESHD_JOIN_TOKEN (skyctl create cluster {cluster} prints one)"
                );
            };
            let endpoint = match cfg.endpoint {
                Some(e) => e,
                None => {
                    SocketAddr::new(control::detect_local_ip(&cfg.coordinator)?, cfg.listen_port)
                }
            };
            let r = match control::join(ch.clone(), token, &cluster, public_b64.clone(), endpoint)
                .await
            {
                Ok(r) => r,
                Err(e) => match tls.refusal() {
                    Some(why) => bail!("refused to join through {}: {why}", cfg.coordinator),
                    None => return Err(e),
                },
            };
            // The CA first: a credential without it could not be used.
            if let Some(ca) = tls.pinned_ca() {
                dir.save_ca(&skymesh_proto::tls::to_pem(&ca))?;
                tracing::info!(ca = %skymesh_proto::tls::Fingerprint::of(&ca), "pinned the coordinator's CA");
            }
            dir.save_credential(&r.credential)?;
            tracing::info!(%cluster, overlay_ip = %r.overlay_ip, %endpoint, public_key = %public_b64, "joined the mesh");
            r.credential
        }
    };
    let gw = control::client(ch, &credential)?;

    // The netmap: from the disk cache when there is one (fail-static), and
    // from the coordinator as soon as it answers.
    let cached = dir.netmap().filter(|s| s.cluster == cluster);
    if cached.is_some() {
        tracing::info!("starting from the cached netmap");
    }
    let (nm_tx, mut nm_rx) = watch::channel(Arc::new(cached.clone().unwrap_or_default()));
    tokio::spawn(control::run_cache_writer(
        nm_tx.subscribe(),
        dir.clone(),
        cancel.clone(),
    ));
    tokio::spawn(control::run_netmap(
        gw.clone(),
        tls.clone(),
        cluster.clone(),
        cached.unwrap_or_default(),
        nm_tx,
        cancel.clone(),
    ));
    let first = loop {
        let s = nm_rx.borrow_and_update().clone();
        if !s.overlay_ip.is_empty() {
            break s;
        }
        tracing::info!("waiting for the first netmap from the coordinator");
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            r = nm_rx.changed() => r.context("netmap task ended")?,
        }
    };

    let overlay_ip: Ipv4Addr = first
        .overlay_ip
        .parse()
        .context("netmap has an invalid overlay IP")?;
    let overlay: Ipv4Net = first
        .overlay_cidr
        .parse()
        .context("netmap has an invalid overlay CIDR")?;
    let dev = tun::create(
        &cfg.interface,
        overlay_ip,
        overlay.prefix_len(),
        cfg.offload,
    )?;
    // Only IPv4 crosses the mesh; keep the kernel's IPv6 chatter off the TUN.
    let _ = std::fs::write(
        format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", cfg.interface),
        "1",
    );
    tun::enable_forwarding()?;
    tracing::info!(interface = %cfg.interface, %overlay_ip, mtu = tun::MTU, "TUN interface up");
    let udp = device::bind_udp(cfg.listen_port)?;

    let stats = Arc::new(ArcSwap::from_pointee(device::DeviceStats::default()));
    let mut tasks = tokio::task::JoinSet::new();

    // Health first: the balancer's table depends on it.
    let (peers_tx, peers_rx) = watch::channel(BTreeMap::new());
    let (jobs_tx, jobs_rx) = watch::channel(BTreeMap::new());
    let lb_cfg = LbConfig::from_state(&first, rand::random(), cfg.flow_limits)
        .context("netmap has no valid service CIDR")?;
    let (lb_tx, lb_rx) = watch::channel(Arc::new(LbTable::build(
        &first,
        &lb_cfg,
        &Health::default(),
    )));
    {
        let (cfg, nm, p, j, c) = (
            lb_cfg.clone(),
            nm_rx.clone(),
            peers_rx.clone(),
            jobs_rx.clone(),
            cancel.clone(),
        );
        tasks.spawn(async move {
            run_lb_tables(cfg, nm, p, j, lb_tx, c).await;
            Ok(())
        });
    }
    let engine = Engine::new(node, Lb::new(lb_cfg), std::time::Instant::now());
    tasks.spawn(device::spawn(
        engine,
        dev,
        udp,
        cfg.offload,
        nm_rx.clone(),
        lb_rx,
        stats.clone(),
        cancel.clone(),
    )?);
    {
        let mut rx = nm_rx.clone();
        let iface = cfg.interface.clone();
        let cancel = cancel.clone();
        tasks.spawn(async move {
            let mut routes = tun::Routes::new(&iface);
            loop {
                let s = rx.borrow_and_update().clone();
                routes.sync(&tun::desired_routes(&s)).await;
                tokio::select! {
                    () = cancel.cancelled() => return Ok(()),
                    r = rx.changed() => if r.is_err() { return Ok(()) },
                    // Retry failed route changes.
                    () = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
            }
        });
    }
    // NodePort/LoadBalancer services on the underlay address.
    let underlay = match cfg.endpoint {
        Some(e) => e.ip(),
        None => control::detect_local_ip(&cfg.coordinator)?,
    };
    {
        let (rx, c) = (nm_rx.clone(), cancel.clone());
        tasks.spawn(async move {
            nodeport::run(underlay, rx, c).await;
            Ok(())
        });
    }
    tasks.spawn(uapi::serve(
        cfg.interface.clone(),
        stats.clone(),
        private_key,
        cancel.clone(),
    ));

    tasks.spawn(health::run_probes(
        overlay_ip,
        nm_rx.clone(),
        peers_tx,
        cancel.clone(),
    ));
    {
        let (rx, c) = (nm_rx.clone(), cancel.clone());
        tasks.spawn(async move {
            health::run_job_checks(rx, jobs_tx, c).await;
            Ok(())
        });
    }
    {
        let endpoint = cfg.endpoint;
        let (gw, cl, st, p, j, c) = (
            gw.clone(),
            cluster.clone(),
            stats.clone(),
            peers_rx.clone(),
            jobs_rx.clone(),
            cancel.clone(),
        );
        tasks.spawn(async move {
            control::run_reporter(gw, cl, endpoint, st, p, j, c).await;
            Ok(())
        });
    }
    if let Some(file) = cfg.jobs.clone() {
        let (gw, cl, c) = (gw.clone(), cluster.clone(), cancel.clone());
        tasks.spawn(async move {
            control::run_job_sync(gw, cl, file, c).await;
            Ok(())
        });
    }
    let mut registry = prometheus_client::registry::Registry::default();
    let m = metrics::Metrics::register(&mut registry);
    {
        let (st, p, j, c) = (
            stats.clone(),
            peers_rx.clone(),
            jobs_rx.clone(),
            cancel.clone(),
        );
        tasks.spawn(async move {
            metrics::run_updater(m, st, p, j, c).await;
            Ok(())
        });
    }
    if let Some(addr) = cfg.dns_listen {
        let dns_cfg = skymesh_dns::DnsConfig {
            listen: addr,
            service_cidr: first.service_cidr.parse().ok(),
            upstreams: if cfg.dns_upstreams.is_empty() {
                skymesh_dns::Upstreams::default()
            } else {
                skymesh_dns::Upstreams::Static(cfg.dns_upstreams.clone())
            },
            recursion_allow: cfg.dns_allow.clone(),
            ..Default::default()
        };
        let (handle, dns_done) = spawn_dns(dns_cfg, &mut registry, cancel.clone())
            .await
            .with_context(|| format!("failed to start DNS on --dns-listen {addr}"))?;
        tracing::info!(addr = %handle.local_addr(), "DNS listening");
        tasks.spawn(dns_done);
        let (rx, peers, jobs, c) = (
            nm_rx.clone(),
            peers_rx.clone(),
            jobs_rx.clone(),
            cancel.clone(),
        );
        tasks.spawn(async move {
            feed_dns(handle, rx, peers, jobs, c).await;
            Ok(())
        });
    }
    if let Some(addr) = cfg.metrics_listen {
        tasks.spawn(metrics::serve(addr, Arc::new(registry), cancel.clone()));
    }
    tracing::info!(%cluster, "meshd running");

    // The first task to fail stops everything.
    let mut result = Ok(());
    while let Some(r) = tasks.join_next().await {
        let r = match r {
            Ok(r) => r,
            Err(e) => Err(anyhow::anyhow!("task panicked: {e}")),
        };
        if let Err(e) = r {
            if result.is_ok() {
                result = Err(e);
            }
            cancel.cancel();
        }
    }
    result
}

/// Starts the DNS server on a thread of its own ([`crate::io::thread`]):
/// hickory-server spawns a task per query, and on the shared runtime those
/// hopped between workers. Returns the handle that feeds it records and a
/// future that ends with the server.
async fn spawn_dns(
    cfg: skymesh_dns::DnsConfig,
    registry: &mut prometheus_client::registry::Registry,
    cancel: CancellationToken,
) -> Result<(
    skymesh_dns::DnsHandle,
    impl std::future::Future<Output = Result<()>> + Send + use<>,
)> {
    type Started = (
        Result<skymesh_dns::DnsHandle, skymesh_dns::Error>,
        prometheus_client::registry::Registry,
    );
    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<Started>();
    // The metrics registry travels to the thread (the server registers its
    // metrics while binding) and back.
    let mut reg = std::mem::take(registry);
    let done = crate::io::thread::spawn("meshd-dns", move || async move {
        match skymesh_dns::DnsServer::bind(cfg, &mut reg, cancel).await {
            Ok((server, handle)) => {
                let _ = started_tx.send((Ok(handle), reg));
                server.run().await.context("DNS server failed")
            }
            Err(e) => {
                let _ = started_tx.send((Err(e), reg));
                Ok(())
            }
        }
    })?;
    let Ok((started, reg)) = started_rx.await else {
        // The thread ended before binding: its result says why.
        done.await?;
        anyhow::bail!("the DNS thread ended before binding");
    };
    *registry = reg;
    Ok((started?, done))
}

/// The DNS view of a netmap: its services, its endpoints with only the
/// addresses the balancer would route ([`routable`]: none behind a gateway
/// that is down, none outside its cluster's CIDRs), and the local jobs
/// failing their health checks (known here before the coordinator).
pub fn dns_view(
    s: &NetState,
    health: &Health,
    jobs: &health::JobReadiness,
) -> skymesh_dns::MeshView {
    let mut endpoints: Vec<_> = s.endpoints.values().cloned().collect();
    for e in &mut endpoints {
        for c in e.status.iter_mut().flat_map(|st| st.clusters.iter_mut()) {
            c.addresses.retain(|a| {
                a.ip.parse()
                    .is_ok_and(|ip| routable(s, health, &c.cluster, ip))
            });
        }
    }
    skymesh_dns::MeshView {
        cluster: s.cluster.clone(),
        services: s.services.values().cloned().collect(),
        endpoints,
        local_unready: jobs
            .iter()
            .filter(|(_, ready)| !**ready)
            .map(|(k, _)| k.clone())
            .collect(),
        local_cidrs: s
            .workload_cidrs
            .iter()
            .filter_map(|c| c.parse().ok())
            .collect(),
    }
}

/// Rebuilds the DNS records whenever the netmap or local job health changes.
async fn feed_dns(
    handle: skymesh_dns::DnsHandle,
    mut nm: watch::Receiver<Arc<NetState>>,
    mut peers: watch::Receiver<BTreeMap<String, health::PeerHealth>>,
    mut jobs: watch::Receiver<health::JobReadiness>,
    cancel: CancellationToken,
) {
    loop {
        let jobs_now = jobs.borrow_and_update().clone();
        let health = lb_health(&peers.borrow_and_update(), &jobs_now);
        let view = dns_view(&nm.borrow_and_update(), &health, &jobs_now);
        handle.update(&view);
        // Peer health changes every probe (its RTT); the answers change only
        // when a gateway goes down or comes back.
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                r = nm.changed() => if r.is_err() { return } else { break },
                r = jobs.changed() => if r.is_err() { return } else { break },
                r = peers.changed() => if r.is_err() { return },
            }
            let now = lb_health(&peers.borrow_and_update(), &jobs.borrow());
            if now.peers_down != health.peers_down {
                break;
            }
        }
    }
}

/// The balancer's health input: peers whose gateway stopped answering
/// probes, local jobs failing their checks.
pub fn lb_health(
    peers: &BTreeMap<String, health::PeerHealth>,
    jobs: &health::JobReadiness,
) -> Health {
    Health {
        peers_down: peers
            .iter()
            .filter(|(_, h)| !h.up)
            .map(|(n, _)| n.clone())
            .collect(),
        peers_suspect: peers
            .iter()
            .filter(|(_, h)| h.suspect)
            .map(|(n, _)| n.clone())
            .collect(),
        local_unready: jobs
            .iter()
            .filter(|(_, r)| !**r)
            .map(|(k, _)| k.clone())
            .collect(),
    }
}

/// Rebuilds the balancer's table whenever the netmap or health changes (off
/// the packet loop: Maglev tables of unchanged services are reused).
async fn run_lb_tables(
    cfg: LbConfig,
    mut nm: watch::Receiver<Arc<NetState>>,
    mut peers: watch::Receiver<BTreeMap<String, health::PeerHealth>>,
    mut jobs: watch::Receiver<health::JobReadiness>,
    out: watch::Sender<Arc<LbTable>>,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            r = nm.changed() => if r.is_err() { return },
            r = peers.changed() => if r.is_err() { return },
            r = jobs.changed() => if r.is_err() { return },
        }
        let state = nm.borrow_and_update().clone();
        let h = lb_health(&peers.borrow_and_update(), &jobs.borrow_and_update());
        let prev = out.borrow().clone();
        let t = LbTable::rebuild(Some(&prev), &state, &cfg, &h);
        out.send_replace(Arc::new(t));
    }
}
