//! The packet loop: TUN ⇄ [`Node`] ⇄ UDP.
//!
//! One thread owns the node and the balancer, so no peer state is shared
//! or locked. It reads from the TUN interface and the UDP socket in
//! batches, hands packets to the balancer and the node, and writes their
//! transmits out in batches; a 250 ms tick drives WireGuard's timers.
//! Netmap changes arrive on a watch channel and are applied between
//! batches as a peer diff. Every tick it publishes counters for status,
//! metrics and `wg show`.
//!
//! Why one thread and not crypto on every core (as DESIGN.md planned):
//! boringtun's `Tunn` takes `&mut self` for both directions, so one
//! peer's encryption and decryption serialise whatever the threading, and
//! on the benchmark's 2-core machine the cores are busy with the kernel's
//! TCP stacks and iperf3 anyway. What made the tunnel fast was batching
//! (TUN offloads, UDP GSO/GRO, `recvmmsg`); boringtun-cli, which is
//! boringtun's device module (4 threads, a mutex per peer, one packet per
//! syscall), measures far below this loop in the same run
//! (`BENCHMARKS.md`).

use std::collections::BTreeMap;
use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, UdpSocket as StdUdp};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use arc_swap::ArcSwap;
use base64::Engine as _;
use ipnet::Ipv4Net;
use quinn_udp::{RecvMeta, UdpSocketState};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tun_rs::{AsyncDevice, GROTable, IDEAL_BATCH_SIZE, SyncDevice, VIRTIO_NET_HDR_LEN};

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
pub fn bind_udp(port: u16) -> Result<StdUdp> {
    let std = StdUdp::bind(("0.0.0.0", port))
        .map_err(|e| anyhow::anyhow!("failed to bind UDP port {port}: {e}"))?;
    std.set_nonblocking(true)?;
    Ok(std)
}

/// Runs the packet loop on a thread of its own ([`super::thread`]), with
/// a single-threaded runtime that owns the TUN and UDP sockets: the thread
/// that waits in `epoll` is the one that encrypts. The returned future
/// ends with the loop.
#[allow(clippy::too_many_arguments)]
pub fn spawn(
    engine: Engine,
    tun: SyncDevice,
    udp: StdUdp,
    offload: bool,
    netmap: watch::Receiver<Arc<NetState>>,
    lb_table: watch::Receiver<Arc<LbTable>>,
    stats: Arc<ArcSwap<DeviceStats>>,
    cancel: CancellationToken,
) -> Result<impl Future<Output = Result<()>>> {
    super::thread::spawn("meshd-packets", move || async move {
        let tun = Arc::new(AsyncDevice::new(tun)?);
        let udp = UdpSocket::from_std(udp)?;
        let io = BatchIo::new(tun, udp, offload)?;
        run(engine, io, netmap, lb_table, stats, cancel).await
    })
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
///
/// I/O is batched both ways, which is where a userspace tunnel spends its
/// time: one TUN read returns a whole TSO segment (split here into
/// MTU-sized packets), whose datagrams leave in one UDP GSO send; one
/// `recvmmsg` returns up to `UDP_BATCH` buffers, each possibly holding
/// many GRO-coalesced datagrams, and the decrypted packets are coalesced
/// per flow into few TUN writes.
async fn run(
    engine: Engine,
    mut io: BatchIo,
    mut netmap: watch::Receiver<Arc<NetState>>,
    mut lb_table: watch::Receiver<Arc<LbTable>>,
    stats: Arc<ArcSwap<DeviceStats>>,
    cancel: CancellationToken,
) -> Result<()> {
    let Engine { mut node, mut lb } = engine;
    let listen_port = io.udp.local_addr()?.port();
    let mut out: Vec<Transmit> = Vec::with_capacity(IDEAL_BATCH_SIZE);
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
            r = io.tun.readable() => {
                if let Err(e) = r {
                    tracing::warn!(error = %e, "TUN poll failed");
                    continue;
                }
                for _ in 0..READS_PER_WAKEUP {
                    let n = match io.recv_tun() {
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            tracing::warn!(error = %e, "TUN read failed");
                            break;
                        }
                    };
                    let now = std::time::Instant::now();
                    for i in 0..n {
                        let packet = io.tun_packet(i);
                        match lb.outbound(packet, &mut reply, now) {
                            Verdict::Pass | Verdict::ToTunnel => node.handle_tun(packet, &mut out),
                            Verdict::ToTun => out.push(Transmit::Tunnel(packet.to_vec())),
                            Verdict::Reply => out.push(Transmit::Tunnel(reply.clone())),
                            Verdict::Drop(_) => {}
                        }
                        io.queue(&mut out);
                    }
                    io.flush_if_full().await;
                }
                io.flush().await;
            }
            r = io.udp.readable() => {
                if let Err(e) = r {
                    tracing::warn!(error = %e, "UDP poll failed");
                    continue;
                }
                for _ in 0..READS_PER_WAKEUP {
                    let n = match io.recv_udp() {
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        // ICMP errors from peers surface here (e.g. port unreachable).
                        Err(e) => {
                            tracing::trace!(error = %e, "UDP receive failed");
                            continue;
                        }
                    };
                    let now = std::time::Instant::now();
                    for i in 0..n {
                        let (src, data, stride) = io.udp_buffer(i);
                        for datagram in data.chunks(stride) {
                            node.handle_network(src, datagram, &mut out);
                        }
                        out.retain_mut(|t| match t {
                            Transmit::Tunnel(p) => matches!(lb.inbound(p, now), Verdict::Pass | Verdict::ToTun),
                            Transmit::Network(..) => true,
                        });
                        io.queue(&mut out);
                    }
                    io.flush_if_full().await;
                }
                io.flush().await;
            }
            _ = timers.tick() => {
                node.handle_timers(&mut out);
                lb.handle_timeout(std::time::Instant::now());
                ticks += 1;
                if ticks.is_multiple_of(4) {
                    node.reset_rate_limiter();
                }
                publish(&node, &lb, listen_port, &stats);
                io.queue(&mut out);
                io.flush().await;
            }
        }
    }
}

/// TUN or UDP reads handled per readiness event before the loop looks at
/// its other inputs again (fairness between directions and timers).
const READS_PER_WAKEUP: usize = 8;

/// Receive buffers per `recvmmsg`.
const UDP_BATCH: usize = 8;

/// Size of one UDP receive buffer: room for a whole GRO batch (the kernel
/// coalesces at most 64 KiB).
const UDP_BUFFER: usize = 65_536;

/// Room for one packet of a TUN read: segments are at most the interface
/// MTU (1420, see [`super::tun::MTU`]); this leaves room for jumbo frames
/// should an operator raise it.
const TUN_PACKET: usize = 9216 + 256;

/// Bytes kept free in front of every packet written to the TUN, for the
/// virtio-net header that offloading TUN writes carry.
const TUN_OFFSET: usize = VIRTIO_NET_HDR_LEN;

/// The loop's batched I/O: reads from the TUN and UDP socket into reused
/// buffers, and collects outgoing datagrams into GSO batches and decrypted
/// packets into one coalescing TUN write.
struct BatchIo {
    tun: Arc<AsyncDevice>,
    udp: UdpSocket,
    udp_state: UdpSocketState,
    /// Datagrams per GSO send (1: offloads off or unsupported).
    max_segments: usize,
    /// A raw TUN read: virtio header and up to 64 KiB of segment.
    tun_raw: Vec<u8>,
    /// The TUN read split into packets (each at offset 0).
    tun_bufs: Vec<Vec<u8>>,
    tun_sizes: Vec<usize>,
    udp_bufs: Vec<Vec<u8>>,
    udp_meta: Vec<RecvMeta>,
    /// Packets for the TUN, each after [`TUN_OFFSET`] bytes of room.
    tun_out: Vec<Vec<u8>>,
    tun_out_len: usize,
    gro: GROTable,
    /// Pending datagrams, back to back, in [`GsoBatch`]es.
    gso: Vec<u8>,
    batches: Vec<GsoBatch>,
}

/// Datagrams for one destination sent with one `sendmsg`: all of
/// `segment` bytes but the last, which may be shorter.
struct GsoBatch {
    dst: SocketAddr,
    /// Offset of the first datagram in [`BatchIo::gso`].
    start: usize,
    segment: usize,
    count: usize,
    /// The last datagram was short: nothing more may join.
    closed: bool,
}

impl BatchIo {
    fn new(tun: Arc<AsyncDevice>, udp: UdpSocket, offload: bool) -> Result<Self> {
        let udp_state = UdpSocketState::new((&udp).into())?;
        let max_segments = if offload {
            udp_state.max_gso_segments()
        } else {
            1
        };
        // Room for bursts while the loop is busy encrypting.
        for size in [4 << 20, 2 << 20] {
            if udp_state.set_recv_buffer_size((&udp).into(), size).is_ok() {
                break;
            }
        }
        let _ = udp_state.set_send_buffer_size((&udp).into(), 4 << 20);
        tracing::info!(
            gso_segments = max_segments,
            gro_segments = udp_state.gro_segments(),
            "UDP offloads"
        );
        Ok(BatchIo {
            tun,
            udp,
            udp_state,
            max_segments,
            tun_raw: vec![0u8; VIRTIO_NET_HDR_LEN + MAX_DATAGRAM],
            tun_bufs: vec![vec![0u8; TUN_PACKET]; IDEAL_BATCH_SIZE],
            tun_sizes: vec![0; IDEAL_BATCH_SIZE],
            udp_bufs: vec![vec![0u8; UDP_BUFFER]; UDP_BATCH],
            udp_meta: vec![RecvMeta::default(); UDP_BATCH],
            tun_out: Vec::new(),
            tun_out_len: 0,
            gro: GROTable::new(),
            gso: Vec::with_capacity(4 * UDP_BUFFER),
            batches: Vec::with_capacity(16),
        })
    }

    /// One TUN read (non-blocking), split into packets; returns how many.
    fn recv_tun(&mut self) -> io::Result<usize> {
        self.tun.try_recv_multiple(
            &mut self.tun_raw,
            &mut self.tun_bufs,
            &mut self.tun_sizes,
            0,
        )
    }

    /// Packet `i` of the last TUN read.
    fn tun_packet(&mut self, i: usize) -> &mut [u8] {
        &mut self.tun_bufs[i][..self.tun_sizes[i]]
    }

    /// One `recvmmsg` (non-blocking); returns how many buffers it filled.
    fn recv_udp(&mut self) -> io::Result<usize> {
        let BatchIo {
            udp,
            udp_state,
            udp_bufs,
            udp_meta,
            ..
        } = self;
        let mut slices: Vec<IoSliceMut<'_>> =
            udp_bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
        udp.try_io(Interest::READABLE, || {
            udp_state.recv((&*udp).into(), &mut slices, udp_meta)
        })
    }

    /// Buffer `i` of the last `recvmmsg`: sender, bytes, datagram size.
    fn udp_buffer(&self, i: usize) -> (SocketAddr, &[u8], usize) {
        let m = &self.udp_meta[i];
        (m.addr, &self.udp_bufs[i][..m.len], m.stride.max(1))
    }

    /// Moves the node's transmits into the pending batches.
    fn queue(&mut self, out: &mut Vec<Transmit>) {
        for t in out.drain(..) {
            match t {
                Transmit::Network(dst, data) => self.queue_datagram(dst, &data),
                Transmit::Tunnel(packet) => {
                    if self.tun_out_len == self.tun_out.len() {
                        self.tun_out.push(Vec::with_capacity(TUN_OFFSET + 1500));
                    }
                    let buf = &mut self.tun_out[self.tun_out_len];
                    buf.clear();
                    buf.resize(TUN_OFFSET, 0);
                    buf.extend_from_slice(&packet);
                    self.tun_out_len += 1;
                }
            }
        }
    }

    /// Appends a datagram to the last GSO batch, or starts a new batch
    /// when it cannot join (other destination, larger than the batch's
    /// segments, after a short last segment, or the batch is full).
    fn queue_datagram(&mut self, dst: SocketAddr, data: &[u8]) {
        // quinn-udp lowers its limit to 1 if the kernel refuses GSO.
        let max_segments = self.max_segments.min(self.udp_state.max_gso_segments());
        let start = self.gso.len();
        self.gso.extend_from_slice(data);
        if let Some(b) = self.batches.last_mut()
            && b.dst == dst
            && !b.closed
            && data.len() <= b.segment
            && b.count < max_segments
            && self.gso.len() - b.start <= UDP_BUFFER - 512
        {
            b.count += 1;
            b.closed = data.len() < b.segment;
            return;
        }
        self.batches.push(GsoBatch {
            dst,
            start,
            segment: data.len(),
            count: 1,
            closed: false,
        });
    }

    /// Sends the pending GSO batches, waiting while the socket buffer is
    /// full (backpressure instead of loss).
    async fn send_batches(&mut self) {
        for (i, b) in self.batches.iter().enumerate() {
            let end = self.batches.get(i + 1).map_or(self.gso.len(), |n| n.start);
            let transmit = quinn_udp::Transmit {
                destination: b.dst,
                ecn: None,
                contents: &self.gso[b.start..end],
                segment_size: (b.count > 1).then_some(b.segment),
                src_ip: None,
            };
            let (udp, state) = (&self.udp, &self.udp_state);
            loop {
                match udp.try_io(Interest::WRITABLE, || state.try_send(udp.into(), &transmit)) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if let Err(e) = udp.writable().await {
                            tracing::debug!(error = %e, "UDP poll failed");
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::debug!(dst = %b.dst, error = %e, "UDP send failed");
                        break;
                    }
                }
            }
        }
        self.batches.clear();
        self.gso.clear();
    }

    /// Sends what is pending once a batch is big enough that waiting for
    /// more reads gains nothing.
    async fn flush_if_full(&mut self) {
        if self.tun_out_len >= IDEAL_BATCH_SIZE || self.gso.len() >= 2 * UDP_BUFFER {
            self.flush().await;
        }
    }

    /// Sends everything pending: the GSO batch, then the TUN packets
    /// (coalesced per flow where the kernel takes offloads).
    async fn flush(&mut self) {
        self.send_batches().await;
        if self.tun_out_len > 0 {
            let bufs = &mut self.tun_out[..self.tun_out_len];
            if let Err(e) = self
                .tun
                .send_multiple(&mut self.gro, bufs, TUN_OFFSET)
                .await
            {
                tracing::debug!(error = %e, "TUN write failed");
            }
            self.tun_out_len = 0;
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

/// This gateway's own networks: its overlay IP and its workload CIDRs.
pub fn local_nets(s: &NetState) -> Vec<Ipv4Net> {
    s.overlay_ip
        .parse::<std::net::Ipv4Addr>()
        .ok()
        .map(Ipv4Net::from)
        .into_iter()
        .chain(s.workload_cidrs.iter().filter_map(|c| c.parse().ok()))
        .collect()
}

fn apply_netmap(node: &mut Node, s: &NetState) {
    node.set_local(local_nets(s));
    let diff = node.set_peers(peer_configs(s));
    if !diff.is_empty() {
        tracing::info!(added = ?diff.added, removed = ?diff.removed, rekeyed = ?diff.rekeyed, updated = ?diff.updated, "peers changed");
    }
}
