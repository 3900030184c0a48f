//! The packet path's I/O: TUN and UDP in, the sans-IO
//! [`Engine`] in the middle, TUN and UDP out — on threads that hand each
//! other whole batches, never single packets.
//!
//! - `meshd-packets` waits in `epoll` on the TUN and the UDP socket, reads
//!   in batches (TUN offloads: one read is a whole TSO segment; `recvmmsg`
//!   with UDP GRO: one buffer holds many datagrams), and runs the engine:
//!   outgoing packets are balanced, routed and given their nonces in
//!   order, where the TUN read put them in a [`Datagrams`] batch (not yet
//!   sealed); incoming data messages are checked and left, still sealed,
//!   where `recvmmsg` put them: in the receive buffers of a [`Packets`]
//!   batch, where they are opened and from where the TUN write gathers
//!   them (no copy on the way). It also applies netmap and balancer-table
//!   changes between batches and sleeps on the engine's
//!   [`Engine::poll_timeout`].
//! - `meshd-open` (with more than one `--crypto-threads`, as many threads)
//!   opens those batches in parallel; the packet thread then judges them
//!   in order ([`Engine::finish_opened`]). With one crypto thread the
//!   packet thread opens them itself.
//! - `meshd-udp-tx` (`--crypto-threads` threads, `meshd-udp-tx-K` when
//!   more than one) seals each [`Datagrams`] batch where it lies, the
//!   threads in parallel even for one peer, and sends the batches in the
//!   order they were read (one GSO `sendmsg` per group; [`stage`]).
//! - `meshd-tun-tx` writes each full [`Packets`] batch to the TUN,
//!   coalesced per flow (GRO: one `writev` per coalesced packet, its
//!   rewritten headers and then the flow's payloads gathered from where
//!   they lie in the batch, [`Gro`]), and hands it back. A TUN write runs
//!   the receiving TCP stack inline, so on this thread that kernel work no
//!   longer holds up decryption.
//!
//! The TUN and the socket are read on the packet thread, not on threads of
//! their own. Both were tried, each against this layout in the same runs
//! on the 2-core VM (`skymesh-bench --quick --only tunnel
//! --baseline-meshd`, twice each), and both lost:
//! - `meshd-udp-rx` (one `recvmmsg` per batch of 8 GRO buffers, handed
//!   whole to the packet thread through a pool of 4): TCP 0.98-0.99× on
//!   one stream and 1.01-1.03× on four, UDP 0.76-0.81×, ping p50
//!   1.53-1.55× slower.
//! - `meshd-tun-rx` (several TUN reads per [`Datagrams`] batch, handed
//!   over the same way), on top of `meshd-udp-rx`: TCP 0.87-0.92× and
//!   0.94-0.98×, UDP 1.02-1.05×, ping p50 1.20-1.28× slower.
//!
//! Each took its read (about 12 % of a core for the TUN on the sender) off
//! the packet thread, but every batch then costs one more thread wakeup on
//! each gateway, and wakeups are already what the packet threads spend
//! most of their time on: perf's top entry for `meshd-packets` is the
//! kernel's `finish_task_switch`, and the two gateways switch threads
//! about 35,000 times a second at 3 Gbit/s.
//!
//! Two more were tried the same way and not landed (quick benches against
//! the same build, same runs):
//! - the receiver's TUN writes on the packet thread, once a batch is
//!   opened and judged (no `meshd-tun-tx` hand-off), in two runs: TCP
//!   1.07× and 0.99× on one stream, 0.97× and 1.01× on four, UDP 0.85×
//!   and 0.97×. Level within the noise, with UDP at risk.
//! - stage threads spinning (`try_recv`, `yield_now`) up to 100 µs before
//!   they block, so that no core halts between batches: TCP 0.91× on one
//!   stream and 0.93× on four, UDP 0.86×. On 2 cores the spinning takes
//!   what the other threads need.
//! - three batches per writer thread ([`stage::POOL`] 3, not 2), so that
//!   the packet thread waits less for a free one: TCP 1.00× on one stream
//!   and 0.96× on four, UDP 1.15×, ping p50 0.93×: nothing that UDP's
//!   run-to-run swing does not also explain.
//!
//! Each writer thread owns a small pool of batches ([`stage::POOL`]); when
//! all are in flight the packet thread waits for one (backpressure, never
//! loss). A small batch while its writers are idle (a ping, a handshake,
//! ACKs) the packet thread seals and writes itself: two thread wakeups
//! would be all the hand-off adds to it. The batches are reused: once
//! warm, nothing on the path allocates per packet.

use std::collections::BTreeMap;
use std::io::{self, IoSlice, IoSliceMut};
use std::net::{SocketAddr, UdpSocket as StdUdp};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context as _, Result};
use arc_swap::ArcSwap;
use quinn_udp::{RecvMeta, UdpSocketState};
use rustix::event::{PollFd, PollFlags};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tun_rs::{AsyncDevice, IDEAL_BATCH_SIZE, SyncDevice, VIRTIO_NET_HDR_LEN};

use crate::core::batch::{Datagrams, Packets};
use crate::core::engine::{DATAGRAM_RESERVE, Engine, SLOT, TUN_SLOTS};
use crate::core::gro::{Gro, MAX_SEGMENTS, Offloads};
use crate::core::lb::{LbStats, LbTable};
use crate::core::node::{DATA_HEADER, DropReason, MAX_DATAGRAM, PeerInfo};
use crate::state::NetState;

use super::stage::{self, POOL, Steps, Turns, Writer, WriterEnd};

/// Counters published by the device loop.
#[derive(Debug, Clone, Default)]
pub struct DeviceStats {
    pub public_key: [u8; 32],
    pub listen_port: u16,
    pub peers: Vec<PeerInfo>,
    pub drops: BTreeMap<DropReason, u64>,
    pub lb: LbStats,
}

/// Binds the WireGuard UDP socket.
pub fn bind_udp(port: u16) -> Result<StdUdp> {
    let std = StdUdp::bind(("0.0.0.0", port))
        .map_err(|e| anyhow::anyhow!("failed to bind UDP port {port}: {e}"))?;
    std.set_nonblocking(true)?;
    Ok(std)
}

/// Runs the packet path on threads of its own ([`super::thread`]): the
/// packet thread with a single-threaded runtime that owns the TUN and UDP
/// sockets (the thread that waits in `epoll` is the one that encrypts),
/// and the two writers. The returned future ends with the packet loop,
/// after the writers have finished.
#[allow(clippy::too_many_arguments)]
pub fn spawn(
    engine: Engine,
    tun: SyncDevice,
    udp: StdUdp,
    offload: bool,
    senders: usize,
    netmap: watch::Receiver<Arc<NetState>>,
    lb_table: watch::Receiver<Arc<LbTable>>,
    stats: Arc<ArcSwap<DeviceStats>>,
    cancel: CancellationToken,
) -> Result<impl Future<Output = Result<()>>> {
    // How the TUN was opened decides how it is written.
    let offloads = Offloads {
        vnet_hdr: tun.tcp_gso(),
        udp: tun.udp_gso(),
    };
    super::thread::spawn("meshd-packets", move || async move {
        let tun = Arc::new(AsyncDevice::new(tun)?);
        let udp_tx = udp.try_clone().context("failed to clone the UDP socket")?;
        let udp = UdpSocket::from_std(udp)?;
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
        let senders = senders.max(1);
        let (net, net_ends) = stage::writer("meshd-udp-tx", senders, || {
            Datagrams::new(DATAGRAM_BATCH, max_segments)
        });
        // With several crypto threads, received batches pass through the
        // `meshd-open` stage first: their pool covers both stages.
        let openers = if senders > 1 { senders } else { 0 };
        let (tun_out, mut tun_ends) =
            stage::pooled("meshd-tun-tx", 1, POOL * (1 + openers), || {
                Packets::with_rx(IDEAL_BATCH_SIZE, DATA_HEADER, UDP_BATCH, UDP_BUFFER)
            });
        let udp_done = spawn_udp_writers(&udp_tx, net_ends)?;
        let tun_end = tun_ends.pop().context("one TUN writer")?;
        let tun_done = spawn_tun_writer(tun.clone(), tun_end, offloads)?;
        let (open, open_done) = match openers {
            0 => (None, Vec::new()),
            n => {
                let (back_tx, back) = tokio::sync::mpsc::channel(POOL * (1 + n) + 1);
                let (to, ends) = stage::middle("meshd-open", n, &back_tx);
                let done = stage::spawn("meshd-open", ends, |_| {
                    Ok(Steps {
                        work: |p: &mut Packets| p.open(),
                        emit: |_: &mut Packets| {},
                    })
                })?;
                let stage = OpenStage {
                    to,
                    back,
                    in_flight: 0,
                };
                (Some(stage), done)
            }
        };
        let tun_out = TunPath { tun: tun_out, open };
        let io = BatchIo::new(tun, udp, udp_state, offloads);
        let result = run(engine, io, net, tun_out, netmap, lb_table, stats, cancel).await;
        // The writers end once their channels from `run` are gone.
        for t in udp_done.into_iter().chain(open_done).chain(tun_done) {
            let _ = t.join();
        }
        result
    })
}

/// Bytes of one [`Datagrams`] batch: a few whole TUN reads' slots.
const DATAGRAM_BATCH: usize = 4 * TUN_SLOTS * SLOT;

/// Starts the `meshd-udp-tx` stage, each thread on a clone of the
/// WireGuard socket: each seals the batches it is handed (the threads in
/// parallel; the packet thread reserved every nonce in order), then sends
/// them in hand-out order ([`stage`]), one GSO `sendmsg` per datagram
/// group. Plain threads that wait in `poll` only when the socket buffer is
/// full: registered with a runtime, they would also wake for every
/// datagram the packet thread receives.
fn spawn_udp_writers(
    sock: &StdUdp,
    ends: Vec<WriterEnd<Datagrams>>,
) -> Result<Vec<std::thread::JoinHandle<()>>> {
    stage::spawn("meshd-udp-tx", ends, |_| {
        let sock = sock.try_clone().context("failed to clone the UDP socket")?;
        let state = UdpSocketState::new((&sock).into())?;
        Ok(Steps {
            work: |d: &mut Datagrams| d.seal(),
            emit: move |d: &mut Datagrams| {
                send_datagrams(&sock, &state, d);
                d.clear();
            },
        })
    })
}

/// Sends every group of `d`, waiting while the socket buffer is full
/// (backpressure instead of loss).
fn send_datagrams<S: AsFd>(sock: &S, state: &UdpSocketState, d: &mut Datagrams) {
    for s in d.sends() {
        match s.segment_size {
            // quinn-udp turns GSO off when the kernel refuses it: then one
            // datagram at a time.
            Some(seg) if state.max_gso_segments() <= 1 => {
                for one in s.contents.chunks(seg) {
                    send_one(sock, state, s.dst, one, None);
                }
            }
            seg => send_one(sock, state, s.dst, s.contents, seg),
        }
    }
}

fn send_one<S: AsFd>(
    sock: &S,
    state: &UdpSocketState,
    dst: SocketAddr,
    contents: &[u8],
    segment_size: Option<usize>,
) {
    let transmit = quinn_udp::Transmit {
        destination: dst,
        ecn: None,
        contents,
        segment_size,
        src_ip: None,
    };
    loop {
        match state.try_send(sock.into(), &transmit) {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let mut fds = [PollFd::new(sock, PollFlags::OUT)];
                match rustix::event::poll(&mut fds, None) {
                    Ok(_) | Err(rustix::io::Errno::INTR) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "UDP poll failed");
                        return;
                    }
                }
            }
            Err(e) => {
                tracing::debug!(%dst, error = %e, "UDP send failed");
                return;
            }
        }
    }
}

/// Starts `meshd-tun-tx`: writes each batch to the TUN, the packets of a
/// flow gathered into one write where the kernel takes offloads. TUN
/// writes do not block, so this thread needs no runtime.
fn spawn_tun_writer(
    tun: Arc<AsyncDevice>,
    end: WriterEnd<Packets>,
    offloads: Offloads,
) -> Result<Vec<std::thread::JoinHandle<()>>> {
    stage::spawn("meshd-tun-tx", vec![end], |_| {
        let tun = tun.clone();
        let mut w = TunWrite::new(offloads);
        Ok(Steps {
            work: |_: &mut Packets| {},
            emit: move |p: &mut Packets| w.write(&tun, p),
        })
    })
}

/// Runs the packet loop until `cancel` fires.
#[allow(clippy::too_many_arguments)]
async fn run(
    mut engine: Engine,
    mut io: BatchIo,
    mut net: Writer<Datagrams>,
    mut tun: TunPath,
    mut netmap: watch::Receiver<Arc<NetState>>,
    mut lb_table: watch::Receiver<Arc<LbTable>>,
    stats: Arc<ArcSwap<DeviceStats>>,
    cancel: CancellationToken,
) -> Result<()> {
    let listen_port = io.udp.local_addr()?.port();
    apply_netmap(&mut engine, &netmap.borrow_and_update());
    engine.set_table(lb_table.borrow_and_update().clone());
    publish(&engine, listen_port, &stats);
    loop {
        let wake = tokio::time::Instant::from_std(engine.poll_timeout());
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            changed = netmap.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let s = netmap.borrow_and_update().clone();
                apply_netmap(&mut engine, &s);
                publish(&engine, listen_port, &stats);
            }
            changed = lb_table.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                engine.set_table(lb_table.borrow_and_update().clone());
            }
            r = io.tun.readable() => {
                if let Err(e) = r {
                    tracing::warn!(error = %e, "TUN poll failed");
                    continue;
                }
                for _ in 0..READS_PER_WAKEUP {
                    let n = match io.recv_tun(&mut net.current) {
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            tracing::warn!(error = %e, "TUN read failed");
                            break;
                        }
                    };
                    let now = Instant::now();
                    for i in 0..n {
                        let len = io.tun_sizes[i];
                        engine.handle_tun_staged(i, len, now, &mut net.current, &mut tun.tun.current);
                        if tun.tun.current.is_full() {
                            tun.hand_over(&mut engine, now).await?;
                        }
                    }
                    engine.finish_staged(&mut net.current);
                    if net.current.needs_flush(DATAGRAM_RESERVE) {
                        net.swap().await?;
                    }
                }
                flush(&mut io, &mut engine, &mut net, &mut tun).await?;
            }
            r = io.udp.readable() => {
                if let Err(e) = r {
                    tracing::warn!(error = %e, "UDP poll failed");
                    continue;
                }
                for _ in 0..READS_PER_WAKEUP {
                    // Datagrams are received into the TUN batch itself
                    // and opened there: a batch whose receive buffers are
                    // all taken moves on first.
                    if tun.tun.current.rx_free().is_empty() {
                        tun.hand_over(&mut engine, Instant::now()).await?;
                    }
                    let first = tun.tun.current.rx_used();
                    match io.recv_udp(&mut tun.tun.current) {
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        // ICMP errors from peers surface here (e.g. port unreachable).
                        Err(e) => {
                            tracing::trace!(error = %e, "UDP receive failed");
                            continue;
                        }
                    }
                    let now = Instant::now();
                    engine.handle_received(first, now, &mut net.current, &mut tun.tun.current);
                    if tun.tun.current.is_full() {
                        tun.hand_over(&mut engine, now).await?;
                    }
                    if net.current.needs_flush(DATAGRAM_RESERVE) {
                        net.swap().await?;
                    }
                }
                flush(&mut io, &mut engine, &mut net, &mut tun).await?;
            }
            Some(batch) = next_opened(&mut tun.open) => {
                tun.opened(batch, &mut engine).await?;
            }
            () = tokio::time::sleep_until(wake) => {
                if engine.handle_timeout(Instant::now(), &mut net.current) {
                    publish(&engine, listen_port, &stats);
                }
                flush(&mut io, &mut engine, &mut net, &mut tun).await?;
            }
        }
    }
}

/// Batches this small are written by the packet thread itself when their
/// writer is idle (a ping, a handshake, an ACK): a hand-off would add two
/// thread wakeups to their latency and save nothing. Order is kept, since
/// an idle writer has nothing older in flight.
const INLINE_DATAGRAM_BYTES: usize = 8 * 1500;
const INLINE_PACKETS: usize = 8;

/// Sends or hands over whatever is pending, datagrams first.
async fn flush(
    io: &mut BatchIo,
    engine: &mut Engine,
    net: &mut Writer<Datagrams>,
    tun: &mut TunPath,
) -> Result<()> {
    engine.finish_staged(&mut net.current);
    if !net.current.is_empty() {
        if net.idle() && net.current.bytes() <= INLINE_DATAGRAM_BYTES {
            // Blocks only if the socket buffer is full, where waiting is
            // the backpressure anyway.
            send_datagrams(&io.udp, &io.udp_state, &mut net.current);
            net.current.clear();
        } else {
            net.swap().await?;
        }
    }
    if !tun.tun.current.is_empty() {
        // Idle: no batch in either stage, so nothing older is in flight.
        if tun.tun.idle() && tun.tun.current.len() <= INLINE_PACKETS {
            engine.finish_opened(&mut tun.tun.current, Instant::now());
            io.tun_write.write(&io.tun, &mut tun.tun.current);
        } else {
            tun.hand_over(engine, Instant::now()).await?;
        }
    }
    Ok(())
}

/// Where received packets go: through the `meshd-open` stage, when there
/// is one, to be opened in parallel; back to the packet thread to be
/// judged in order ([`Engine::finish_opened`]); then to `meshd-tun-tx`.
struct TunPath {
    tun: Writer<Packets>,
    open: Option<OpenStage>,
}

/// The packet thread's end of the `meshd-open` stage.
struct OpenStage {
    to: Turns<Packets>,
    /// Opened batches, in hand-out order.
    back: mpsc::Receiver<Packets>,
    in_flight: usize,
}

/// The next opened batch, if any is in flight (else never).
async fn next_opened(open: &mut Option<OpenStage>) -> Option<Packets> {
    match open {
        Some(o) if o.in_flight > 0 => o.back.recv().await,
        _ => std::future::pending().await,
    }
}

impl TunPath {
    /// Hands the current batch on: to the open stage if it holds data
    /// messages (or an earlier batch still is there: order), else judged
    /// here and to the TUN writer.
    async fn hand_over(&mut self, engine: &mut Engine, now: Instant) -> Result<()> {
        let via_open = self
            .open
            .as_ref()
            .is_some_and(|o| o.in_flight > 0 || self.tun.current.has_sealed());
        if !via_open {
            engine.finish_opened(&mut self.tun.current, now);
        }
        let fresh = self.take_empty(engine).await?;
        let full = std::mem::replace(&mut self.tun.current, fresh);
        match &mut self.open {
            Some(o) if via_open => {
                o.to.send(full).await?;
                o.in_flight += 1;
                Ok(())
            }
            _ => self.tun.hand_over(full).await,
        }
    }

    /// An empty batch from the pool; while none is there, opened batches
    /// coming back are judged and passed on (they are what frees one).
    async fn take_empty(&mut self, engine: &mut Engine) -> Result<Packets> {
        loop {
            let back = match &mut self.open {
                Some(o) if o.in_flight > 0 => {
                    tokio::select! {
                        biased;
                        fresh = self.tun.take_empty() => return fresh,
                        b = o.back.recv() => b.context("the meshd-open threads ended")?,
                    }
                }
                _ => return self.tun.take_empty().await,
            };
            self.opened(back, engine).await?;
        }
    }

    /// A batch back from the open stage (in hand-out order): judged, then
    /// to the TUN writer.
    async fn opened(&mut self, mut batch: Packets, engine: &mut Engine) -> Result<()> {
        if let Some(o) = &mut self.open {
            o.in_flight = o.in_flight.saturating_sub(1);
        }
        engine.finish_opened(&mut batch, Instant::now());
        self.tun.hand_over(batch).await
    }
}

/// What a TUN write needs besides the device: the plan of coalesced
/// writes ([`Gro`]) and room for one write's gather list.
struct TunWrite {
    gro: Gro,
}

impl TunWrite {
    fn new(offloads: Offloads) -> TunWrite {
        TunWrite {
            gro: Gro::new(offloads),
        }
    }

    /// Writes a batch to the TUN, coalesced per flow, one `writev` per
    /// coalesced packet (TUN writes do not block), and empties it.
    fn write(&mut self, tun: &tun_rs::DeviceImpl, p: &mut Packets) {
        self.gro.plan(p);
        for w in 0..self.gro.writes() {
            let mut iov = [IoSlice::new(&[]); 1 + MAX_SEGMENTS];
            let mut n = 0;
            for (slot, part) in iov.iter_mut().zip(self.gro.write_parts(w, p)) {
                *slot = IoSlice::new(part);
                n += 1;
            }
            if let Err(e) = rustix::io::writev(tun, &iov[..n]) {
                tracing::debug!(error = %e, "TUN write failed");
            }
        }
        p.clear();
    }
}

/// TUN or UDP reads handled per readiness event before the loop looks at
/// its other inputs again (fairness between directions and timers).
const READS_PER_WAKEUP: usize = 8;

/// Receive buffers of each TUN batch ([`Packets::with_rx`]): a
/// `recvmmsg` fills those still free, so a batch takes one or more
/// receives.
const UDP_BATCH: usize = 8;

/// Size of one UDP receive buffer: room for a whole GRO batch (the kernel
/// coalesces at most 64 KiB).
const UDP_BUFFER: usize = 65_536;

// A staged slot holds a whole TUN packet with WireGuard's header and tag.
const _: () = assert!(SLOT >= DATA_HEADER + super::tun::MTU as usize + 16);

/// The packet thread's reads: the TUN and UDP socket into reused buffers.
struct BatchIo {
    tun: Arc<AsyncDevice>,
    udp: UdpSocket,
    udp_state: UdpSocketState,
    /// A raw TUN read: virtio header and up to 64 KiB of segment.
    tun_raw: Vec<u8>,
    /// Sizes of the packets of the last TUN read.
    tun_sizes: [usize; TUN_SLOTS],
    udp_meta: Vec<RecvMeta>,
    /// For the small batches this thread writes itself.
    tun_write: TunWrite,
}

impl BatchIo {
    fn new(
        tun: Arc<AsyncDevice>,
        udp: UdpSocket,
        udp_state: UdpSocketState,
        offloads: Offloads,
    ) -> Self {
        BatchIo {
            tun,
            udp,
            udp_state,
            tun_raw: vec![0u8; VIRTIO_NET_HDR_LEN + MAX_DATAGRAM],
            tun_sizes: [0; TUN_SLOTS],
            udp_meta: vec![RecvMeta::default(); UDP_BATCH],
            tun_write: TunWrite::new(offloads),
        }
    }

    /// One TUN read (non-blocking), split into packets straight into
    /// slots staged in `net` (each after room for WireGuard's header), where
    /// the engine seals them; returns how many.
    fn recv_tun(&mut self, net: &mut Datagrams) -> io::Result<usize> {
        let area = net.stage(TUN_SLOTS, SLOT);
        let mut chunks = area.chunks_mut(SLOT);
        let mut slots: [&mut [u8]; TUN_SLOTS] =
            std::array::from_fn(|_| chunks.next().unwrap_or_default());
        self.tun.try_recv_multiple(
            &mut self.tun_raw,
            &mut slots,
            &mut self.tun_sizes,
            DATA_HEADER,
        )
    }

    /// One `recvmmsg` (non-blocking) into the free receive buffers of
    /// `tun` ([`Packets::rx_free`], each then [`Packets::rx_commit`]ed);
    /// returns how many it filled.
    fn recv_udp(&mut self, tun: &mut Packets) -> io::Result<usize> {
        let BatchIo {
            udp,
            udp_state,
            udp_meta,
            ..
        } = self;
        let n = {
            let free = tun.rx_free();
            let k = free.len().min(UDP_BATCH);
            let mut slices: [IoSliceMut<'_>; UDP_BATCH] = {
                let mut it = free.iter_mut();
                std::array::from_fn(|_| {
                    IoSliceMut::new(it.next().map_or(&mut [][..], |b| &mut b[..]))
                })
            };
            udp.try_io(Interest::READABLE, || {
                udp_state.recv((&*udp).into(), &mut slices[..k], &mut udp_meta[..k])
            })?
        };
        for m in &udp_meta[..n] {
            tun.rx_commit(m.addr, m.len, m.stride);
        }
        Ok(n)
    }
}

/// Publishes the engine's counters (every timer tick and after peer
/// changes, so `wg show` is never more than 250 ms behind).
fn publish(engine: &Engine, listen_port: u16, stats: &ArcSwap<DeviceStats>) {
    let node = engine.node();
    stats.store(Arc::new(DeviceStats {
        public_key: node.public_key(),
        listen_port,
        peers: node.peers(),
        drops: node.drops().clone(),
        lb: engine.lb().stats(),
    }));
}

fn apply_netmap(engine: &mut Engine, s: &NetState) {
    let diff = engine.apply_netmap(s);
    if !diff.is_empty() {
        tracing::info!(added = ?diff.added, removed = ?diff.removed, rekeyed = ?diff.rekeyed, updated = ?diff.updated, "peers changed");
    }
}
