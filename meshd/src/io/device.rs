//! The packet loop: TUN ⇄ [`Node`] ⇄ UDP.
//!
//! One task owns the node, so no peer state is shared or locked. It reads
//! from the TUN interface and the UDP socket, hands bytes to the node, and
//! writes the node's transmits out; a 250 ms tick drives WireGuard's
//! timers. Netmap changes arrive on a watch channel and are applied between
//! packets as a peer diff. Once a second it publishes counters for status,
//! metrics and `wg show`.

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket as StdUdp};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use arc_swap::ArcSwap;
use base64::Engine as _;
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tun_rs::AsyncDevice;

use crate::core::lb::{Lb, LbStats, LbTable, Verdict};
use crate::core::node::{DropReason, MAX_DATAGRAM, Node, PeerConfig, PeerInfo, Transmit};
use crate::state::NetState;

/// WireGuard timer granularity (boringtun expects ~4 calls per second).
const TIMER_TICK: Duration = Duration::from_millis(250);

/// Counters published by the device loop.
#[derive(Debug, Clone, Default)]
pub struct DeviceStats {
    pub public_key: [u8; 32],
    pub listen_port: u16,
    pub peers: Vec<PeerInfo>,
    pub drops: BTreeMap<DropReason, u64>,
    pub lb: LbStats,
}

/// Peer configurations from the netmap; peers with unusable fields are
/// skipped with a warning.
pub fn peer_configs(s: &NetState) -> Vec<PeerConfig> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let key = |v: &str| {
        b64.decode(v)
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
    };
    s.peers
        .values()
        .filter_map(|p| {
            let (Some(public_key), Some(preshared_key)) =
                (key(&p.public_key), key(&p.preshared_key))
            else {
                tracing::warn!(peer = %p.cluster, "peer has an invalid key; skipped");
                return None;
            };
            Some(PeerConfig {
                name: p.cluster.clone(),
                public_key,
                preshared_key,
                endpoint: p.endpoint.parse::<SocketAddr>().ok(),
                allowed_ips: p
                    .allowed_ips
                    .iter()
                    .filter_map(|a| a.parse().ok())
                    .collect(),
            })
        })
        .collect()
}

/// Binds the WireGuard UDP socket.
pub fn bind_udp(port: u16) -> Result<UdpSocket> {
    let std = StdUdp::bind(("0.0.0.0", port))
        .map_err(|e| anyhow::anyhow!("failed to bind UDP port {port}: {e}"))?;
    std.set_nonblocking(true)?;
    Ok(UdpSocket::from_std(std)?)
}

/// The packet loop's state: the WireGuard node and the VIP balancer, owned
/// by the loop alone.
pub struct Engine {
    pub node: Node,
    pub lb: Lb,
}

/// Runs the packet loop until `cancel` fires.
///
/// Every packet from the TUN goes through the balancer first (it
/// recognises replies of its own SNAT flows, answers pings and refusals for
/// VIPs, and rewrites new VIP flows), then to the node for encryption when
/// it must cross a tunnel. Every packet a tunnel delivers goes through the
/// balancer's reverse translation before it is written to the TUN.
pub async fn run(
    engine: Engine,
    tun: Arc<AsyncDevice>,
    udp: UdpSocket,
    mut netmap: watch::Receiver<Arc<NetState>>,
    mut lb_table: watch::Receiver<Arc<LbTable>>,
    stats: Arc<ArcSwap<DeviceStats>>,
    cancel: CancellationToken,
) -> Result<()> {
    let Engine { mut node, mut lb } = engine;
    let listen_port = udp.local_addr()?.port();
    let mut tun_buf = vec![0u8; MAX_DATAGRAM];
    let mut udp_buf = vec![0u8; MAX_DATAGRAM];
    let mut out: Vec<Transmit> = Vec::with_capacity(16);
    let mut reply: Vec<u8> = Vec::with_capacity(1500);
    let mut timers = tokio::time::interval(TIMER_TICK);
    timers.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut ticks: u64 = 0;
    apply_netmap(&mut node, &netmap.borrow_and_update());
    lb.set_table(lb_table.borrow_and_update().clone());
    publish(&node, &lb, listen_port, &stats);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            changed = netmap.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let s = netmap.borrow_and_update().clone();
                apply_netmap(&mut node, &s);
                publish(&node, &lb, listen_port, &stats);
            }
            changed = lb_table.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                lb.set_table(lb_table.borrow_and_update().clone());
            }
            r = tun.recv(&mut tun_buf) => match r {
                Ok(n) => {
                    let packet = &mut tun_buf[..n];
                    match lb.outbound(packet, &mut reply, std::time::Instant::now()) {
                        Verdict::Pass | Verdict::ToTunnel => node.handle_tun(packet, &mut out),
                        Verdict::ToTun => out.push(Transmit::Tunnel(packet.to_vec())),
                        Verdict::Reply => out.push(Transmit::Tunnel(reply.clone())),
                        Verdict::Drop(_) => {}
                    }
                }
                Err(e) => tracing::warn!(error = %e, "TUN read failed"),
            },
            r = udp.recv_from(&mut udp_buf) => match r {
                Ok((n, src)) => {
                    node.handle_network(src, &udp_buf[..n], &mut out);
                    let now = std::time::Instant::now();
                    out.retain_mut(|t| match t {
                        Transmit::Tunnel(p) => matches!(lb.inbound(p, now), Verdict::Pass | Verdict::ToTun),
                        Transmit::Network(..) => true,
                    });
                }
                // ICMP errors from peers surface here (e.g. port unreachable).
                Err(e) => tracing::trace!(error = %e, "UDP receive failed"),
            },
            _ = timers.tick() => {
                node.handle_timers(&mut out);
                lb.handle_timeout(std::time::Instant::now());
                ticks += 1;
                if ticks.is_multiple_of(4) {
                    node.reset_rate_limiter();
                }
                publish(&node, &lb, listen_port, &stats);
            }
        }
        for t in out.drain(..) {
            match t {
                Transmit::Network(dst, data) => {
                    if let Err(e) = udp.send_to(&data, dst).await {
                        tracing::debug!(%dst, error = %e, "UDP send failed");
                    }
                }
                Transmit::Tunnel(packet) => {
                    if let Err(e) = tun.send(&packet).await {
                        tracing::debug!(error = %e, "TUN write failed");
                    }
                }
            }
        }
    }
}

/// Publishes the node's counters (every timer tick and after peer changes,
/// so `wg show` is never more than 250 ms behind).
fn publish(node: &Node, lb: &Lb, listen_port: u16, stats: &ArcSwap<DeviceStats>) {
    stats.store(Arc::new(DeviceStats {
        public_key: node.public_key(),
        listen_port,
        peers: node.peers(),
        drops: node.drops().clone(),
        lb: lb.stats(),
    }));
}

fn apply_netmap(node: &mut Node, s: &NetState) {
    let diff = node.set_peers(peer_configs(s));
    if !diff.is_empty() {
        tracing::info!(added = ?diff.added, removed = ?diff.removed, rekeyed = ?diff.rekeyed, updated = ?diff.updated, "peers changed");
    }
}
