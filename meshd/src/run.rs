//! Start-up and wiring: key, join, netmap, TUN, routes, and every task.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use arc_swap::ArcSwap;
use base64::Engine as _;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::core::engine::Engine;
use crate::core::lb::{Health, Lb, LbConfig, LbTable, routable};
use crate::core::node::Node;
use crate::io::endpoint::{self, Endpoint};
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
    /// `--endpoint` (an address or a host name).
    pub endpoint: Option<Endpoint>,
    pub listen_port: u16,
    pub state_dir: PathBuf,
    pub interface: String,
    pub dns_listen: Option<SocketAddr>,
    /// Zones of the embedded DNS (`--dns-zone`); empty = the defaults
    /// ([`skymesh_dns::config::DEFAULT_ZONES`]).
    pub dns_zones: Vec<String>,
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
    /// Threads that seal and send WireGuard datagrams (`--crypto-threads`).
    pub crypto_threads: usize,
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

/// Runs meshd until `cancel` fires or a task fails: joins (once), waits
/// for a netmap, opens the TUN, starts every task, and supervises them.
pub async fn run(cfg: Config, cancel: CancellationToken) -> Result<()> {
    let cluster = skymesh_proto::validate::name("--cluster", &cfg.cluster)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    // /healthz answers (503) while meshd joins and waits for a netmap.
    let observed = metrics::Observed::default();
    let listener = match cfg.metrics_listen {
        Some(addr) => Some(tokio::spawn(metrics::serve(
            metrics::bind(addr).await?,
            observed.clone(),
            cancel.clone(),
        ))),
        None => None,
    };
    let dir = StateDir::open(&cfg.state_dir)?;
    let (private_key, _) = dir.private_key()?;
    let node = Node::new(private_key);
    // A host name must resolve now: the join and the NodePort listeners
    // need an address. The reporter looks it up again every report.
    let endpoint = match &cfg.endpoint {
        Some(e) => Some(e.resolve().await?),
        None => None,
    };
    let (gw, tls) = join(&cfg, endpoint, &cluster, &dir, &node).await?;
    let nm_rx = start_netmap(&dir, &cluster, gw.clone(), tls, &cancel);
    let Some(first) = first_netmap(nm_rx.clone(), &cancel).await? else {
        return Ok(());
    };
    observed.set_stage(metrics::Stage::StartingTun);
    let (dev, overlay_ip) = open_tun(&cfg, &first)?;
    let udp = device::bind_udp(cfg.listen_port)?;

    let mut w = Tasks::new(cfg, endpoint, cluster, gw, nm_rx, cancel);
    if let Some(listener) = listener {
        w.set
            .spawn(async move { listener.await.context("metrics server task")? });
    }
    w.packet_path(node, dev, udp, &first)?;
    w.routes();
    w.nodeport()?;
    w.uapi(private_key);
    w.health(overlay_ip);
    w.reporting();
    w.observability(&first, &observed).await?;
    observed.set_stage(metrics::Stage::Ready);
    // Every task has what it needs of the first netmap: do not hold it (and
    // what the later ones no longer share with it) while meshd runs.
    drop(first);
    tracing::info!(cluster = %w.cluster, "meshd running");
    w.supervise().await
}

/// The control client, after joining the mesh on the first start (the
/// credential, and the coordinator's CA, are saved for later starts).
async fn join(
    cfg: &Config,
    endpoint: Option<SocketAddr>,
    cluster: &str,
    dir: &StateDir,
    node: &Node,
) -> Result<(control::Gateway, ClientTls)> {
    let public_b64 = base64::engine::general_purpose::STANDARD.encode(node.public_key());
    let credential = dir.credential();
    let tls = ClientTls::new(coordinator_trust(
        dir,
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
            let endpoint = match endpoint {
                Some(e) => e,
                None => {
                    SocketAddr::new(control::detect_local_ip(&cfg.coordinator)?, cfg.listen_port)
                }
            };
            let r = match control::join(ch.clone(), token, cluster, public_b64.clone(), endpoint)
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
    Ok((control::client(ch, &credential)?, tls))
}

/// The netmap: from the disk cache when there is one (fail-static), and
/// from the coordinator as soon as it answers; written back to the cache.
fn start_netmap(
    dir: &StateDir,
    cluster: &str,
    gw: control::Gateway,
    tls: ClientTls,
    cancel: &CancellationToken,
) -> watch::Receiver<Arc<NetState>> {
    let cached = dir.netmap().filter(|s| s.cluster == cluster);
    if cached.is_some() {
        tracing::info!("starting from the cached netmap");
    }
    let (nm_tx, nm_rx) = watch::channel(Arc::new(cached.clone().unwrap_or_default()));
    tokio::spawn(control::run_cache_writer(
        nm_tx.subscribe(),
        dir.clone(),
        cancel.clone(),
    ));
    tokio::spawn(control::run_netmap(
        gw,
        tls,
        cluster.to_owned(),
        cached.unwrap_or_default(),
        nm_tx,
        cancel.clone(),
    ));
    nm_rx
}

/// The first usable netmap (one with an overlay IP); `None` if `cancel`
/// fired first.
async fn first_netmap(
    mut nm_rx: watch::Receiver<Arc<NetState>>,
    cancel: &CancellationToken,
) -> Result<Option<Arc<NetState>>> {
    loop {
        let s = nm_rx.borrow_and_update().clone();
        if !s.overlay_ip.is_empty() {
            return Ok(Some(s));
        }
        tracing::info!("waiting for the first netmap from the coordinator");
        tokio::select! {
            () = cancel.cancelled() => return Ok(None),
            r = nm_rx.changed() => r.context("netmap task ended")?,
        }
    }
}

/// Creates the TUN interface on the netmap's overlay address and turns on
/// forwarding.
fn open_tun(cfg: &Config, first: &NetState) -> Result<(tun_rs::SyncDevice, Ipv4Addr)> {
    let overlay_ip = first
        .net
        .overlay_ip
        .context("netmap has an invalid overlay IP")?;
    let overlay = first
        .net
        .overlay_cidr
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
    Ok((dev, overlay_ip))
}

/// Every long-running task of a gateway and the channels between them.
struct Tasks {
    cfg: Config,
    /// What `--endpoint` resolved to at start.
    endpoint: Option<SocketAddr>,
    cluster: String,
    gw: control::Gateway,
    nm_rx: watch::Receiver<Arc<NetState>>,
    stats: Arc<ArcSwap<device::DeviceStats>>,
    /// Peer probes' results (the sender until [`Tasks::health`] takes it).
    peers_tx: Option<watch::Sender<BTreeMap<String, health::PeerHealth>>>,
    peers_rx: watch::Receiver<BTreeMap<String, health::PeerHealth>>,
    jobs_tx: Option<watch::Sender<health::JobReadiness>>,
    jobs_rx: watch::Receiver<health::JobReadiness>,
    set: tokio::task::JoinSet<Result<()>>,
    cancel: CancellationToken,
}

impl Tasks {
    fn new(
        cfg: Config,
        endpoint: Option<SocketAddr>,
        cluster: String,
        gw: control::Gateway,
        nm_rx: watch::Receiver<Arc<NetState>>,
        cancel: CancellationToken,
    ) -> Tasks {
        let (peers_tx, peers_rx) = watch::channel(BTreeMap::new());
        let (jobs_tx, jobs_rx) = watch::channel(BTreeMap::new());
        Tasks {
            cfg,
            endpoint,
            cluster,
            gw,
            nm_rx,
            stats: Arc::new(ArcSwap::from_pointee(device::DeviceStats::default())),
            peers_tx: Some(peers_tx),
            peers_rx,
            jobs_tx: Some(jobs_tx),
            jobs_rx,
            set: tokio::task::JoinSet::new(),
            cancel,
        }
    }

    /// The balancer's tables (rebuilt off the packet path on netmap and
    /// health changes) and the packet path itself.
    fn packet_path(
        &mut self,
        node: Node,
        dev: tun_rs::SyncDevice,
        udp: std::net::UdpSocket,
        first: &NetState,
    ) -> Result<()> {
        let lb_cfg = LbConfig::from_state(first, rand::random(), self.cfg.flow_limits)
            .context("netmap has no valid service CIDR")?;
        let (lb_tx, lb_rx) =
            watch::channel(Arc::new(LbTable::build(first, &lb_cfg, &Health::default())));
        let (cfg, nm, p, j, c) = (
            lb_cfg.clone(),
            self.nm_rx.clone(),
            self.peers_rx.clone(),
            self.jobs_rx.clone(),
            self.cancel.clone(),
        );
        self.set.spawn(async move {
            run_lb_tables(cfg, nm, p, j, lb_tx, c).await;
            Ok(())
        });
        let engine = Engine::new(node, Lb::new(lb_cfg), std::time::Instant::now());
        self.set.spawn(device::spawn(
            engine,
            dev,
            udp,
            self.cfg.offload,
            self.cfg.crypto_threads,
            self.nm_rx.clone(),
            lb_rx,
            self.stats.clone(),
            self.cancel.clone(),
        )?);
        Ok(())
    }

    /// Keeps the kernel's routes through the TUN equal to the netmap's.
    fn routes(&mut self) {
        let mut rx = self.nm_rx.clone();
        let iface = self.cfg.interface.clone();
        let cancel = self.cancel.clone();
        self.set.spawn(async move {
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

    /// NodePort/LoadBalancer services on the underlay address.
    fn nodeport(&mut self) -> Result<()> {
        let underlay = match self.endpoint {
            Some(e) => e.ip(),
            None => control::detect_local_ip(&self.cfg.coordinator)?,
        };
        let (rx, c) = (self.nm_rx.clone(), self.cancel.clone());
        self.set.spawn(async move {
            nodeport::run(underlay, rx, c).await;
            Ok(())
        });
        Ok(())
    }

    /// The `wg show` socket.
    fn uapi(&mut self, private_key: [u8; 32]) {
        self.set.spawn(uapi::serve(
            self.cfg.interface.clone(),
            self.stats.clone(),
            private_key,
            self.cancel.clone(),
        ));
    }

    /// Probes of peer gateways and checks of local jobs.
    fn health(&mut self, overlay_ip: Ipv4Addr) {
        if let Some(peers_tx) = self.peers_tx.take() {
            self.set.spawn(health::run_probes(
                overlay_ip,
                self.nm_rx.clone(),
                peers_tx,
                self.cancel.clone(),
            ));
        }
        if let Some(jobs_tx) = self.jobs_tx.take() {
            let (rx, c) = (self.nm_rx.clone(), self.cancel.clone());
            self.set.spawn(async move {
                health::run_job_checks(rx, jobs_tx, c).await;
                Ok(())
            });
        }
    }

    /// Status reports to the coordinator, and the jobs file synced to it.
    fn reporting(&mut self) {
        let endpoint = self
            .cfg
            .endpoint
            .clone()
            .zip(self.endpoint)
            .map(|(e, at_start)| endpoint::Reported::new(e, at_start));
        let (gw, cl, st, p, j, c) = (
            self.gw.clone(),
            self.cluster.clone(),
            self.stats.clone(),
            self.peers_rx.clone(),
            self.jobs_rx.clone(),
            self.cancel.clone(),
        );
        self.set.spawn(async move {
            control::run_reporter(gw, cl, endpoint, st, p, j, c).await;
            Ok(())
        });
        if let Some(file) = self.cfg.jobs.clone() {
            let (gw, cl, c) = (self.gw.clone(), self.cluster.clone(), self.cancel.clone());
            self.set.spawn(async move {
                control::run_job_sync(gw, cl, file, c).await;
                Ok(())
            });
        }
    }

    /// Metrics (published to the listener bound at start), and DNS with
    /// its record feed (both optional).
    async fn observability(
        &mut self,
        first: &NetState,
        observed: &metrics::Observed,
    ) -> Result<()> {
        let mut registry = prometheus_client::registry::Registry::default();
        let m = metrics::Metrics::register(&mut registry);
        let (st, p, j, c) = (
            self.stats.clone(),
            self.peers_rx.clone(),
            self.jobs_rx.clone(),
            self.cancel.clone(),
        );
        self.set.spawn(async move {
            metrics::run_updater(m, st, p, j, c).await;
            Ok(())
        });
        if let Some(addr) = self.cfg.dns_listen {
            let mut dns_cfg = skymesh_dns::DnsConfig {
                listen: addr,
                service_cidr: first.net.service_cidr,
                upstreams: if self.cfg.dns_upstreams.is_empty() {
                    skymesh_dns::Upstreams::default()
                } else {
                    skymesh_dns::Upstreams::Static(self.cfg.dns_upstreams.clone())
                },
                recursion_allow: self.cfg.dns_allow.clone(),
                ..Default::default()
            };
            if !self.cfg.dns_zones.is_empty() {
                dns_cfg.zones.clone_from(&self.cfg.dns_zones);
            }
            let (handle, dns_done) = spawn_dns(dns_cfg, &mut registry, self.cancel.clone())
                .await
                .with_context(|| format!("failed to start DNS on --dns-listen {addr}"))?;
            tracing::info!(addr = %handle.local_addr(), "DNS listening");
            self.set.spawn(dns_done);
            let (rx, peers, jobs, c) = (
                self.nm_rx.clone(),
                self.peers_rx.clone(),
                self.jobs_rx.clone(),
                self.cancel.clone(),
            );
            self.set.spawn(async move {
                feed_dns(handle, rx, peers, jobs, c).await;
                Ok(())
            });
        }
        observed.publish(registry);
        Ok(())
    }

    /// Waits for every task; the first to fail stops everything, and its
    /// error is the result.
    async fn supervise(mut self) -> Result<()> {
        let mut result = Ok(());
        while let Some(r) = self.set.join_next().await {
            let r = match r {
                Ok(r) => r,
                Err(e) => Err(anyhow::anyhow!("task panicked: {e}")),
            };
            if let Err(e) = r {
                if result.is_ok() {
                    result = Err(e);
                }
                self.cancel.cancel();
            }
        }
        result
    }
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
    let routes = |c: &str, a: &skymesh_proto::v1::EndpointAddress| {
        a.ip.parse().is_ok_and(|ip| routable(s, health, c, ip))
    };
    // Shared with the netmap unless an address has to go: then a copy
    // without it.
    let endpoints = s
        .endpoints
        .values()
        .map(|e| {
            let clusters = e.status.iter().flat_map(|st| st.clusters.iter());
            if clusters
                .flat_map(|c| c.addresses.iter().map(move |a| (c, a)))
                .all(|(c, a)| routes(&c.cluster, a))
            {
                return e.clone();
            }
            let mut e = skymesh_proto::v1::Endpoints::clone(e);
            for c in e.status.iter_mut().flat_map(|st| st.clusters.iter_mut()) {
                c.addresses.retain(|a| routes(&c.cluster, a));
            }
            Arc::new(e)
        })
        .collect();
    skymesh_dns::MeshView {
        cluster: s.cluster.clone(),
        services: s.services.values().cloned().collect(),
        endpoints,
        local_unready: jobs
            .iter()
            .filter(|(_, ready)| !**ready)
            .map(|(k, _)| k.clone())
            .collect(),
        local_cidrs: s.net.workload_cidrs.clone(),
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
    // What the current table was built from. Peer health changes with
    // every probe (its RTT), the balancer's input only when a gateway goes
    // down, turns suspect or comes back: the same input, no new table.
    let mut built: Option<(Arc<NetState>, Health)> = None;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            r = nm.changed() => if r.is_err() { return },
            r = peers.changed() => if r.is_err() { return },
            r = jobs.changed() => if r.is_err() { return },
        }
        let state = nm.borrow_and_update().clone();
        let h = lb_health(&peers.borrow_and_update(), &jobs.borrow_and_update());
        if built
            .as_ref()
            .is_some_and(|(s, bh)| Arc::ptr_eq(s, &state) && *bh == h)
        {
            continue;
        }
        let prev = out.borrow().clone();
        let t = LbTable::rebuild(Some(&prev), &state, &cfg, &h);
        out.send_replace(Arc::new(t));
        built = Some((state, h));
    }
}
