//! The coordinator client: join, the netmap stream, status reports and job
//! registration.
//!
//! The netmap stream is turned into a `watch` channel of [`NetState`]
//! snapshots. When the stream drops, meshd keeps forwarding with the last
//! netmap (fail-static), reconnects with exponential backoff and resumes
//! from the last revision it applied; every applied update is also cached
//! on disk so a restart during an outage still brings the tunnels up.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail};
use arc_swap::ArcSwap;
use futures::{FutureExt as _, StreamExt as _};
use skymesh_proto::Bearer;
use skymesh_proto::tls::ClientTls;
use skymesh_proto::v1::{
    JobHealth, JoinRequest, JoinResponse, NetmapRequest, PeerHealth as ProtoPeerHealth,
    StatusReport, SyncJobsRequest, gateway_client::GatewayClient,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use super::device::DeviceStats;
use super::endpoint::Reported;
use super::health::{JobReadiness, PeerHealth};
use crate::state::NetState;
use crate::statedir::StateDir;

/// An authenticated gateway-API client.
pub type Gateway = GatewayClient<InterceptedService<Channel, Bearer>>;

const BACKOFF_MIN: Duration = Duration::from_millis(200);
/// Longest time the netmap cache lags behind the applied netmap.
pub const CACHE_INTERVAL: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Status reports at least this often (the coordinator marks a gateway
/// NotReady after 30 s of silence).
pub const REPORT_INTERVAL: Duration = Duration::from_secs(5);

/// The coordinator URLs of `--coordinator` (comma-separated).
pub fn urls(arg: &str) -> Vec<&str> {
    arg.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect()
}

/// A channel to the coordinator(s) that connects on first use and
/// reconnects by itself. With several URLs (coordinator replicas sharing
/// one etcd) requests go to whichever replica is reachable.
pub fn channel(arg: &str, tls: &ClientTls) -> Result<Channel> {
    let endpoints = urls(arg)
        .into_iter()
        .map(|url| {
            Ok(tls
                .endpoint(url)
                .map_err(|e| anyhow::anyhow!("--coordinator {e}"))?
                .connect_timeout(Duration::from_secs(3))
                .tcp_keepalive(Some(Duration::from_secs(10)))
                .http2_keep_alive_interval(Duration::from_secs(5))
                .keep_alive_timeout(Duration::from_secs(5))
                .keep_alive_while_idle(true))
        })
        .collect::<Result<Vec<_>>>()?;
    match endpoints.as_slice() {
        [] => bail!("--coordinator needs at least one URL"),
        [one] => Ok(one.connect_lazy()),
        _ => Ok(Channel::balance_list(endpoints.into_iter())),
    }
}

/// A gateway client presenting `token`.
pub fn client(ch: Channel, token: &str) -> Result<Gateway> {
    Ok(GatewayClient::with_interceptor(
        ch,
        Bearer::new(Some(token)).context("token is not printable ASCII")?,
    )
    // A large mesh's netmap snapshot is well over tonic's 4 MiB default.
    .max_decoding_message_size(skymesh_proto::MAX_MESSAGE_BYTES))
}

/// The local address this host would use to reach the coordinator: the
/// default underlay endpoint when `--endpoint` is not given.
pub fn detect_local_ip(url: &str) -> Result<IpAddr> {
    let uri: tonic::codegen::http::Uri = skymesh_proto::tls::normalize_url(url)
        .parse()
        .with_context(|| format!("invalid --coordinator URL {url:?}"))?;
    let host = uri.host().context("--coordinator URL has no host")?;
    let port = uri.port_u16().unwrap_or(7400);
    let target = std::net::ToSocketAddrs::to_socket_addrs(&(host.trim_matches(['[', ']']), port))?
        .next()
        .context("cannot resolve the coordinator's host")?;
    let sock = std::net::UdpSocket::bind((IpAddr::from([0u8, 0, 0, 0]), 0))?;
    sock.connect(target)?;
    Ok(sock.local_addr()?.ip())
}

/// Joins the mesh with a join token.
pub async fn join(
    ch: Channel,
    token: &str,
    cluster: &str,
    public_key: String,
    endpoint: SocketAddr,
) -> Result<JoinResponse> {
    let mut gw = client(ch, token)?;
    let r = gw
        .join(JoinRequest {
            cluster: cluster.to_string(),
            public_key,
            endpoint: endpoint.to_string(),
        })
        .await;
    match r {
        Ok(r) => Ok(r.into_inner()),
        Err(s) => bail!("join refused by the coordinator: {}", s.message()),
    }
}

/// Follows the netmap stream forever (until `cancel`), publishing every
/// applied state.
pub async fn run_netmap(
    mut gw: Gateway,
    tls: ClientTls,
    cluster: String,
    mut state: NetState,
    tx: watch::Sender<Arc<NetState>>,
    cancel: CancellationToken,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let req = NetmapRequest {
            cluster: cluster.clone(),
            resource_version: state.resume_from(),
        };
        let result = tokio::select! {
            () = cancel.cancelled() => return,
            r = gw.netmap(req) => r,
        };
        match result {
            Ok(resp) => {
                let mut stream = resp.into_inner();
                tracing::info!(from = state.resume_from(), "netmap stream connected");
                loop {
                    let msg = tokio::select! {
                        () = cancel.cancelled() => return,
                        m = stream.message() => m,
                    };
                    match msg {
                        Ok(Some(u)) => {
                            backoff = BACKOFF_MIN;
                            state.apply(u);
                            // Apply every update already received before
                            // publishing: a burst costs one rebuild of the
                            // DNS records and balancer tables, not one per
                            // update.
                            while let Some(Some(Ok(u))) = stream.next().now_or_never() {
                                state.apply(u);
                            }
                            tx.send_replace(Arc::new(state.clone()));
                        }
                        Ok(None) => {
                            tracing::warn!("netmap stream ended; keeping the last netmap");
                            break;
                        }
                        // A stopping coordinator: a normal reconnect,
                        // not a failure.
                        Err(s)
                            if s.code() == tonic::Code::Unavailable
                                && s.message() == skymesh_proto::COORDINATOR_SHUTTING_DOWN =>
                        {
                            tracing::info!(
                                revision = state.revision,
                                "the coordinator is shutting down; reconnecting and resuming from the last revision"
                            );
                            break;
                        }
                        Err(s) => {
                            tracing::warn!(code = ?s.code(), error = %s.message(), "netmap stream failed; keeping the last netmap");
                            break;
                        }
                    }
                }
            }
            Err(s) => match tls.refusal() {
                Some(why) => {
                    tracing::error!("refused the coordinator: {why}; keeping the last netmap")
                }
                None => {
                    tracing::warn!(code = ?s.code(), error = %s.message(), "coordinator unreachable; keeping the last netmap")
                }
            },
        }
        let pause = backoff + Duration::from_millis(rand::random::<u64>() % 100);
        backoff = (backoff * 2).min(BACKOFF_MAX);
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(pause) => {}
        }
    }
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|d| i64::try_from(d.as_secs()).ok())
        .unwrap_or(0)
}

/// Builds a status report from the device counters and health.
pub fn report(
    cluster: &str,
    endpoint: Option<SocketAddr>,
    stats: &DeviceStats,
    peers: &BTreeMap<String, PeerHealth>,
    jobs: &JobReadiness,
) -> StatusReport {
    StatusReport {
        cluster: cluster.to_string(),
        endpoint: endpoint.map(|e| e.to_string()).unwrap_or_default(),
        peers: stats
            .peers
            .iter()
            .map(|p| {
                let h = peers.get(&p.name);
                ProtoPeerHealth {
                    peer: p.name.clone(),
                    up: h.is_some_and(|h| h.up && h.rtt.is_some()),
                    last_handshake: p.last_handshake.map_or(0, unix),
                    rtt_us: h
                        .and_then(|h| h.rtt)
                        .map_or(0, |d| u32::try_from(d.as_micros()).unwrap_or(u32::MAX)),
                    rx_bytes: p.rx_bytes,
                    tx_bytes: p.tx_bytes,
                }
            })
            .collect(),
        jobs: jobs
            .iter()
            .map(|((ns, name), ready)| JobHealth {
                namespace: ns.clone(),
                name: name.clone(),
                ready: *ready,
            })
            .collect(),
    }
}

/// Keeps the on-disk netmap cache (fail-static across restarts) at most
/// [`CACHE_INTERVAL`] behind the applied netmap, and writes the newest one
/// when meshd stops.
pub async fn run_cache_writer(
    mut rx: watch::Receiver<Arc<NetState>>,
    dir: StateDir,
    cancel: CancellationToken,
) {
    let save = |rx: &mut watch::Receiver<Arc<NetState>>| {
        let s = rx.borrow_and_update().clone();
        if let Err(e) = dir.save_netmap(&s) {
            tracing::warn!(error = %e, "failed to cache the netmap");
        }
    };
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            r = rx.changed() => if r.is_err() { return },
        }
        save(&mut rx);
        tokio::select! {
            () = cancel.cancelled() => break,
            () = tokio::time::sleep(CACHE_INTERVAL) => {}
        }
    }
    // Stopping: cache what was applied since the last write, so that the
    // next start resumes from the newest revision.
    if rx.has_changed().unwrap_or(false) {
        save(&mut rx);
    }
}

/// Reports status every [`REPORT_INTERVAL`] and whenever health changes,
/// with the `--endpoint` given on the command line (if any; a host name
/// looked up again for each report), so that the peers learn a changed
/// one.
pub async fn run_reporter(
    mut gw: Gateway,
    cluster: String,
    mut endpoint: Option<Reported>,
    stats: Arc<ArcSwap<DeviceStats>>,
    mut peers: watch::Receiver<BTreeMap<String, PeerHealth>>,
    mut jobs: watch::Receiver<JobReadiness>,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(REPORT_INTERVAL);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
            r = peers.changed() => if r.is_err() { return },
            r = jobs.changed() => if r.is_err() { return },
        }
        let at = match endpoint.as_mut() {
            Some(e) => tokio::select! {
                () = cancel.cancelled() => return,
                a = e.current() => Some(a),
            },
            None => None,
        };
        let r = report(
            &cluster,
            at,
            &stats.load(),
            &peers.borrow_and_update(),
            &jobs.borrow_and_update(),
        );
        // A frozen coordinator holds a call until the keepalive gives up:
        // never let that delay a stop.
        let sent = tokio::select! {
            () = cancel.cancelled() => return,
            r = gw.report_status(r) => r,
        };
        if let Err(s) = sent {
            tracing::debug!(code = ?s.code(), error = %s.message(), "status report failed");
        }
    }
}

/// Registers the jobs of `file` with the coordinator, again whenever the
/// file changes.
pub async fn run_job_sync(
    mut gw: Gateway,
    cluster: String,
    file: PathBuf,
    cancel: CancellationToken,
) {
    let mut synced: Option<SystemTime> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let mtime = std::fs::metadata(&file).and_then(|m| m.modified()).ok();
        if mtime.is_some() && mtime == synced {
            continue;
        }
        let jobs = match super::jobs::load(&file) {
            Ok(j) => j,
            Err(e) => {
                if synced != mtime || synced.is_none() {
                    tracing::error!("{e:#}");
                }
                synced = mtime;
                continue;
            }
        };
        let n = jobs.len();
        let synced_now = tokio::select! {
            () = cancel.cancelled() => return,
            r = gw.sync_jobs(SyncJobsRequest {
                cluster: cluster.clone(),
                jobs,
            }) => r,
        };
        match synced_now {
            Ok(_) => {
                tracing::info!(file = %file.display(), jobs = n, "jobs registered");
                synced = mtime;
            }
            Err(s) => {
                tracing::warn!(code = ?s.code(), error = %s.message(), "job registration failed; retrying")
            }
        }
    }
}
