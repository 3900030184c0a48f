//! Health I/O: readiness probes of local jobs (tcp, http, icmp, udp) and UDP
//! probes of peer gateways
//! through the tunnels, feeding the pure state machines of
//! [`crate::core::health`].
//!
//! Probes are tiny UDP datagrams between meshd instances on their overlay
//! addresses, so they cross the real path (kernel → TUN → WireGuard → peer
//! TUN → peer meshd) and their answer proves the tunnel carries traffic.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::core::health::{JobCheck, PeerProbe};
use crate::core::probe::{ProbePlan, echo_reply, echo_request, http_request, http_status_passes};
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

/// How long one check may take: it must be over before the next round.
const CHECK_TIMEOUT: Duration = Duration::from_millis(900);
/// Bytes of an HTTP answer read for its status line at most.
const HTTP_HEAD_MAX: usize = 512;

/// Checks every local job of the netmap once per [`INTERVAL`] with its
/// readiness probe ([`ProbePlan`]): TCP connects, an HTTP GET, an ICMP
/// echo (all jobs of a round share one socket) or a datagram that must
/// draw no ICMP error (one connected socket per job and port, kept across
/// rounds, so an error that arrives late still counts).
pub async fn run_job_checks(
    netmap: watch::Receiver<Arc<NetState>>,
    out: watch::Sender<JobReadiness>,
    cancel: CancellationToken,
) {
    let mut checks: BTreeMap<Key, JobCheck> = BTreeMap::new();
    let mut udp: BTreeMap<SocketAddrV4, Arc<UdpSocket>> = BTreeMap::new();
    let mut icmp_failed_before = false;
    let mut tick = tokio::time::interval(INTERVAL);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let state = netmap.borrow().clone();
        let plans: Vec<(Key, Ipv4Addr, ProbePlan)> = state
            .jobs
            .iter()
            .filter_map(|(key, job)| {
                let spec = job.spec.as_ref()?;
                let ip = spec.ip.parse::<Ipv4Addr>().ok()?;
                Some((key.clone(), ip, ProbePlan::of(spec)))
            })
            .collect();
        let pings: Vec<Ipv4Addr> = plans
            .iter()
            .filter(|(_, _, p)| *p == ProbePlan::Icmp)
            .map(|(_, ip, _)| *ip)
            .collect();
        let wanted: std::collections::BTreeSet<SocketAddrV4> = plans
            .iter()
            .filter_map(|(_, ip, p)| match p {
                ProbePlan::Udp(port) => Some(SocketAddrV4::new(*ip, *port)),
                _ => None,
            })
            .collect();
        udp.retain(|a, _| wanted.contains(a));
        for addr in &wanted {
            if !udp.contains_key(addr) {
                match udp_socket(*addr).await {
                    Ok(s) => {
                        udp.insert(*addr, Arc::new(s));
                    }
                    Err(e) => tracing::warn!(%addr, error = %e, "udp probe socket failed"),
                }
            }
        }
        let probes = plans.into_iter().map(|(key, ip, plan)| {
            let sock = match &plan {
                ProbePlan::Udp(port) => udp.get(&SocketAddrV4::new(ip, *port)).cloned(),
                _ => None,
            };
            async move {
                let ok = match plan {
                    ProbePlan::Always => Some(true),
                    // Decided by the round's pings (`ping_all`).
                    ProbePlan::Icmp => None,
                    ProbePlan::Tcp(ports) => Some(check_tcp(ip, &ports).await),
                    ProbePlan::Http { port, path } => Some(check_http(ip, port, &path).await),
                    ProbePlan::Udp(_) => Some(match sock {
                        Some(s) => check_udp(&s).await,
                        None => false,
                    }),
                };
                (key, ip, ok)
            }
        });
        let (results, answered) = tokio::join!(futures::future::join_all(probes), ping_all(&pings));
        let answered = match answered {
            Ok(a) => {
                icmp_failed_before = false;
                a
            }
            Err(e) => {
                if !icmp_failed_before {
                    tracing::error!(error = %e, "icmp probes cannot run (needs CAP_NET_RAW, or this group in net.ipv4.ping_group_range): those jobs fail their checks");
                }
                icmp_failed_before = true;
                Default::default()
            }
        };
        checks.retain(|k, _| state.jobs.contains_key(k));
        let mut changed = false;
        for (key, ip, ok) in results {
            let ok = ok.unwrap_or_else(|| answered.contains(&ip));
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

/// Every port accepts a TCP connection within the check's time.
async fn check_tcp(ip: Ipv4Addr, ports: &[u16]) -> bool {
    let mut ok = true;
    for port in ports {
        let c = tokio::time::timeout(CHECK_TIMEOUT, TcpStream::connect((ip, *port))).await;
        ok &= matches!(c, Ok(Ok(_)));
    }
    ok
}

/// `GET path` answers with a 2xx or 3xx status line within the check's
/// time; at most [`HTTP_HEAD_MAX`] bytes are read.
async fn check_http(ip: Ipv4Addr, port: u16, path: &str) -> bool {
    let get = async {
        let mut s = TcpStream::connect((ip, port)).await.ok()?;
        s.write_all(http_request(ip, port, path).as_bytes())
            .await
            .ok()?;
        let mut head = [0u8; HTTP_HEAD_MAX];
        let mut n = 0;
        loop {
            let Some(room) = head.get_mut(n..).filter(|r| !r.is_empty()) else {
                return Some(false);
            };
            let got = s.read(room).await.ok()?;
            if got == 0 {
                return http_status_passes(&head[..n]).or(Some(false));
            }
            n += got;
            if let Some(verdict) = http_status_passes(&head[..n]) {
                return Some(verdict);
            }
        }
    };
    matches!(
        tokio::time::timeout(CHECK_TIMEOUT, get).await,
        Ok(Some(true))
    )
}

/// A UDP socket connected to `addr`, so the ICMP errors its datagrams
/// draw come back to it (`ECONNREFUSED` for port unreachable).
async fn udp_socket(addr: SocketAddrV4) -> std::io::Result<UdpSocket> {
    let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await?;
    s.connect(addr).await?;
    Ok(s)
}

/// One empty datagram; the check fails when the socket reports an ICMP
/// error (for this datagram or an earlier one), and passes on an answer or
/// on silence: UDP has no handshake, silence is all an open port gives.
async fn check_udp(s: &UdpSocket) -> bool {
    if s.send(&[]).await.is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    !matches!(
        tokio::time::timeout(CHECK_TIMEOUT, s.recv(&mut buf)).await,
        Ok(Err(_))
    )
}

/// The addresses of `ips` that answer an ICMP echo within the check's
/// time. One socket for the round: an unprivileged ping socket where
/// `net.ipv4.ping_group_range` allows it, else a raw socket (root or
/// CAP_NET_RAW).
async fn ping_all(ips: &[Ipv4Addr]) -> std::io::Result<std::collections::BTreeSet<Ipv4Addr>> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType, ipproto, socket_with};
    let mut answered = std::collections::BTreeSet::new();
    if ips.is_empty() {
        return Ok(answered);
    }
    let flags = SocketFlags::NONBLOCK | SocketFlags::CLOEXEC;
    let (fd, raw) = match socket_with(
        AddressFamily::INET,
        SocketType::DGRAM,
        flags,
        Some(ipproto::ICMP),
    ) {
        Ok(fd) => (fd, false),
        Err(_) => (
            socket_with(
                AddressFamily::INET,
                SocketType::RAW,
                flags,
                Some(ipproto::ICMP),
            )?,
            true,
        ),
    };
    // A datagram socket over ICMP: tokio's UdpSocket only moves datagrams.
    let sock = UdpSocket::from_std(std::net::UdpSocket::from(fd))?;
    let id: u16 = rand::random();
    let mut pending: BTreeMap<Ipv4Addr, u16> = BTreeMap::new();
    for (seq, ip) in ips.iter().enumerate() {
        let seq = u16::try_from(seq).unwrap_or(u16::MAX);
        if sock
            .send_to(&echo_request(id, seq), SocketAddr::from((*ip, 0)))
            .await
            .is_ok()
        {
            pending.insert(*ip, seq);
        }
    }
    let mut buf = [0u8; 1500];
    let collect = async {
        while !pending.is_empty() {
            let (n, src) = match sock.recv_from(&mut buf).await {
                Ok((n, SocketAddr::V4(src))) => (n, src),
                Ok(_) => continue,
                Err(_) => {
                    // A reported error (none is expected): do not spin.
                    tokio::time::sleep(PROBE_CLOCK).await;
                    continue;
                }
            };
            let Some((rid, rseq)) = echo_reply(&buf[..n], raw) else {
                continue;
            };
            // A ping socket's identifier is the kernel's; it only hands this
            // socket its own replies.
            if (raw && rid != id) || pending.get(src.ip()) != Some(&rseq) {
                continue;
            }
            pending.remove(src.ip());
            answered.insert(*src.ip());
        }
    };
    let _ = tokio::time::timeout(CHECK_TIMEOUT, collect).await;
    Ok(answered)
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
                state.retain(|name, _| nm.net.peers.contains_key(name));
                let now = Instant::now();
                for (name, peer) in &nm.net.peers {
                    let Some(ip) = peer.overlay_ip else { continue };
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
                        if let Some((name, _)) = nm.net.peers.iter().find(|(_, p)| p.overlay_ip == Some(*src.ip()))
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
