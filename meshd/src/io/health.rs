//! Health I/O: TCP checks of local jobs and UDP probes of peer gateways
//! through the tunnels, feeding the pure state machines of
//! [`crate::core::health`].
//!
//! Probes are tiny UDP datagrams between meshd instances on their overlay
//! addresses, so they cross the real path (kernel → TUN → WireGuard → peer
//! TUN → peer meshd) and their answer proves the tunnel carries traffic.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use skymesh_proto::v1::Protocol;
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::core::health::{JobCheck, PeerProbe};
use crate::state::{Key, NetState};

/// UDP port of peer probes on overlay addresses.
pub const PROBE_PORT: u16 = 51899;
/// Interval of job checks (SPEC §4).
pub const INTERVAL: Duration = Duration::from_secs(1);
/// Resolution of the probe clock (probe pacing is in core::health).
const PROBE_CLOCK: Duration = Duration::from_millis(100);
const MAGIC: &[u8; 4] = b"SKYP";
const REQUEST: u8 = 0;
const REPLY: u8 = 1;

/// Peer health as probes see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerHealth {
    pub up: bool,
    /// Missed its latest probe, not down yet: no new flows.
    pub suspect: bool,
    pub rtt: Option<Duration>,
}

/// Readiness of local jobs.
pub type JobReadiness = BTreeMap<Key, bool>;

/// Checks every local job of the netmap once per [`INTERVAL`]: a TCP
/// connect to each TCP port within the interval (a job without TCP ports
/// is ready while it is registered).
pub async fn run_job_checks(
    netmap: watch::Receiver<Arc<NetState>>,
    out: watch::Sender<JobReadiness>,
    cancel: CancellationToken,
) {
    let mut checks: BTreeMap<Key, JobCheck> = BTreeMap::new();
    let mut tick = tokio::time::interval(INTERVAL);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let state = netmap.borrow().clone();
        let mut probes = Vec::new();
        for (key, job) in &state.jobs {
            let Some(spec) = &job.spec else { continue };
            let Ok(ip) = spec.ip.parse::<Ipv4Addr>() else {
                continue;
            };
            let ports: Vec<u16> = spec
                .ports
                .iter()
                .filter(|p| p.protocol() != Protocol::Udp)
                .filter_map(|p| u16::try_from(p.port).ok())
                .collect();
            let key = key.clone();
            probes.push(async move {
                let mut ok = true;
                for port in ports {
                    let c = tokio::time::timeout(INTERVAL * 9 / 10, TcpStream::connect((ip, port)))
                        .await;
                    ok &= matches!(c, Ok(Ok(_)));
                }
                (key, ok)
            });
        }
        let results = futures::future::join_all(probes).await;
        checks.retain(|k, _| state.jobs.contains_key(k));
        let mut changed = false;
        for (key, ok) in results {
            let c = checks.entry(key.clone()).or_default();
            if c.observe(ok) {
                tracing::info!(namespace = %key.0, job = %key.1, ready = c.ready, "job readiness changed");
                changed = true;
            }
        }
        let now: JobReadiness = checks.iter().map(|(k, c)| (k.clone(), c.ready)).collect();
        if changed || *out.borrow() != now {
            out.send_replace(now);
        }
    }
}

fn encode(kind: u8, seq: u64) -> [u8; 13] {
    let mut b = [0u8; 13];
    b[..4].copy_from_slice(MAGIC);
    b[4] = kind;
    b[5..].copy_from_slice(&seq.to_be_bytes());
    b
}

fn decode(b: &[u8]) -> Option<(u8, u64)> {
    if b.len() != 13 || &b[..4] != MAGIC {
        return None;
    }
    Some((b[4], u64::from_be_bytes(b[5..13].try_into().ok()?)))
}

/// Answers probes and probes every peer (once a second while it answers,
/// faster after a miss: see [`crate::core::health::PeerProbe`]).
pub async fn run_probes(
    overlay_ip: Ipv4Addr,
    netmap: watch::Receiver<Arc<NetState>>,
    out: watch::Sender<BTreeMap<String, PeerHealth>>,
    cancel: CancellationToken,
) -> Result<()> {
    let sock = UdpSocket::bind((overlay_ip, PROBE_PORT))
        .await
        .with_context(|| format!("failed to bind probe socket {overlay_ip}:{PROBE_PORT}"))?;
    let mut state: BTreeMap<String, PeerProbe> = BTreeMap::new();
    // The state machines decide when a probe is due or missed; this clock
    // only has to be fine enough for their deadlines.
    let mut tick = tokio::time::interval(PROBE_CLOCK);
    let mut buf = [0u8; 64];
    loop {
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            _ = tick.tick() => {
                let nm = netmap.borrow().clone();
                state.retain(|name, _| nm.peers.contains_key(name));
                let now = Instant::now();
                for (name, peer) in &nm.peers {
                    let Ok(ip) = peer.overlay_ip.parse::<Ipv4Addr>() else { continue };
                    let p = state.entry(name.clone()).or_default();
                    let (seq, changed) = p.poll(now);
                    if changed {
                        tracing::warn!(peer = %name, "peer gateway missed 3 probes: down");
                    }
                    if let Some(seq) = seq {
                        let _ = sock.send_to(&encode(REQUEST, seq), (ip, PROBE_PORT)).await;
                    }
                }
                publish(&state, &out);
            }
            r = sock.recv_from(&mut buf) => {
                let Ok((n, src)) = r else { continue };
                match decode(&buf[..n]) {
                    Some((REQUEST, seq)) => {
                        let _ = sock.send_to(&encode(REPLY, seq), src).await;
                    }
                    Some((REPLY, seq)) => {
                        let nm = netmap.borrow().clone();
                        let SocketAddr::V4(src) = src else { continue };
                        let src_ip = src.ip().to_string();
                        if let Some((name, _)) = nm.peers.iter().find(|(_, p)| p.overlay_ip == src_ip)
                            && let Some(p) = state.get_mut(name)
                            && p.answer(seq, Instant::now())
                        {
                            tracing::info!(peer = %name, "peer gateway answers probes: up");
                            publish(&state, &out);
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}

fn publish(state: &BTreeMap<String, PeerProbe>, out: &watch::Sender<BTreeMap<String, PeerHealth>>) {
    let now: BTreeMap<String, PeerHealth> = state
        .iter()
        .map(|(k, p)| {
            (
                k.clone(),
                PeerHealth {
                    up: p.up,
                    suspect: p.suspect(),
                    rtt: p.rtt,
                },
            )
        })
        .collect();
    if *out.borrow() != now {
        out.send_replace(now);
    }
}
