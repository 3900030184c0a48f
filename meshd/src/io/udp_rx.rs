//! `meshd-udp-rx`: the WireGuard socket's receive side on a thread of its
//! own, so that `recvmmsg` (the kernel's copy of each GRO buffer out of the
//! socket) runs while the packet thread handles the batch before.
//!
//! - The thread owns nothing but the batches it is lent: [`RX_BATCHES`] of
//!   them, each `UDP_BATCH` buffers of 64 KiB (one `recvmmsg`, every
//!   buffer a whole GRO train of datagrams from one sender).
//! - It fills one batch per `recvmmsg` and hands it to the packet thread
//!   whole; the packet thread gives it back once handled ([`UdpRx::give_back`]).
//!   While every batch is out, the thread stops reading: the socket buffer
//!   is the backpressure, as it was when the packet thread read itself.
//! - It is a plain thread that waits in `poll` on a non-blocking clone of
//!   the socket. The socket must not also be registered with the packet
//!   thread's runtime: its `epoll` would wake for every datagram that this
//!   thread reads.

use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, UdpSocket as StdUdp};
use std::thread::JoinHandle;

use anyhow::{Context as _, Result};
use quinn_udp::{RecvMeta, UdpSocketState};
use rustix::event::{PollFd, PollFlags, Timespec};
use tokio::sync::mpsc;

/// Batches lent to the receive thread: one being filled, one being
/// handled, and room for a burst in between.
pub const RX_BATCHES: usize = 4;

/// Receive buffers per `recvmmsg`.
const UDP_BATCH: usize = 8;

/// Size of one UDP receive buffer: room for a whole GRO batch (the kernel
/// coalesces at most 64 KiB).
const UDP_BUFFER: usize = 65_536;

/// How long the thread waits in `poll` before it looks whether the packet
/// thread is gone (only while nothing arrives).
const IDLE_POLL: Timespec = Timespec {
    tv_sec: 0,
    tv_nsec: 200_000_000,
};

/// The buffers of one `recvmmsg`.
pub struct RxBatch {
    bufs: Vec<Vec<u8>>,
    meta: Vec<RecvMeta>,
    /// Buffers the last `recvmmsg` filled.
    filled: usize,
}

impl RxBatch {
    fn new() -> RxBatch {
        RxBatch {
            bufs: vec![vec![0u8; UDP_BUFFER]; UDP_BATCH],
            meta: vec![RecvMeta::default(); UDP_BATCH],
            filled: 0,
        }
    }

    /// Each filled buffer: its sender, its bytes, and the size of the
    /// datagrams in it (the last may be shorter).
    pub fn buffers(&self) -> impl Iterator<Item = (SocketAddr, &[u8], usize)> {
        self.meta[..self.filled]
            .iter()
            .zip(&self.bufs)
            .map(|(m, b)| (m.addr, &b[..m.len], m.stride.max(1)))
    }

    /// One non-blocking `recvmmsg` into the buffers.
    fn recv(&mut self, sock: &StdUdp, state: &UdpSocketState) -> io::Result<()> {
        let RxBatch { bufs, meta, filled } = self;
        let mut slices: [IoSliceMut<'_>; UDP_BATCH] = {
            let mut it = bufs.iter_mut();
            std::array::from_fn(|_| IoSliceMut::new(it.next().map_or(&mut [][..], |b| &mut b[..])))
        };
        *filled = 0;
        *filled = state.recv(sock.into(), &mut slices, meta)?;
        Ok(())
    }
}

/// The packet thread's end: filled batches in, handled ones back.
pub struct UdpRx {
    full: mpsc::Receiver<RxBatch>,
    empty: mpsc::Sender<RxBatch>,
}

impl UdpRx {
    /// The next filled batch; an error once the receive thread has ended.
    pub async fn recv(&mut self) -> Result<RxBatch> {
        self.full
            .recv()
            .await
            .context("the meshd-udp-rx thread ended")
    }

    /// A filled batch if one is waiting.
    pub fn try_recv(&mut self) -> Option<RxBatch> {
        self.full.try_recv().ok()
    }

    /// Gives a handled batch back to the receive thread.
    pub fn give_back(&self, batch: RxBatch) {
        // The channel holds every batch there is, so it is never full;
        // when the thread has ended the batch is simply dropped.
        let _ = self.empty.try_send(batch);
    }
}

/// Starts `meshd-udp-rx` on `sock` (non-blocking, a clone of the
/// WireGuard socket). The thread ends within `IDLE_POLL` (200 ms) of the
/// [`UdpRx`] being dropped.
pub fn spawn(sock: StdUdp) -> Result<(UdpRx, JoinHandle<()>)> {
    let state = UdpSocketState::new((&sock).into())?;
    let (full_tx, full) = mpsc::channel(RX_BATCHES);
    let (empty, mut empty_rx) = mpsc::channel(RX_BATCHES);
    for _ in 0..RX_BATCHES {
        // Capacity RX_BATCHES: never full here.
        let _ = empty.try_send(RxBatch::new());
    }
    let thread = std::thread::Builder::new()
        .name("meshd-udp-rx".into())
        .spawn(move || {
            while let Some(mut batch) = empty_rx.blocking_recv() {
                if !fill(&sock, &state, &mut batch, &full_tx) {
                    return;
                }
                if full_tx.blocking_send(batch).is_err() {
                    return;
                }
            }
        })
        .context("failed to start the meshd-udp-rx thread")?;
    Ok((UdpRx { full, empty }, thread))
}

/// Waits for datagrams and reads them into `batch`; false once the packet
/// thread is gone.
fn fill(
    sock: &StdUdp,
    state: &UdpSocketState,
    batch: &mut RxBatch,
    full: &mpsc::Sender<RxBatch>,
) -> bool {
    loop {
        if full.is_closed() {
            return false;
        }
        match batch.recv(sock, state) {
            Ok(()) => return true,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let mut fds = [PollFd::new(sock, PollFlags::IN)];
                match rustix::event::poll(&mut fds, Some(&IDLE_POLL)) {
                    Ok(_) | Err(rustix::io::Errno::INTR) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "UDP poll failed");
                        return false;
                    }
                }
            }
            // ICMP errors from peers surface here (e.g. port unreachable).
            Err(e) => tracing::trace!(error = %e, "UDP receive failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    /// Datagrams sent to the socket come out of the thread's batches whole
    /// and in order (coalesced by GRO or not), the batches go round the
    /// pool, and the thread ends soon after its receiver is dropped.
    #[test]
    fn batches_carry_every_datagram_and_the_thread_ends() {
        let sock = StdUdp::bind("127.0.0.1:0").expect("bind on loopback");
        sock.set_nonblocking(true).expect("non-blocking");
        let to = sock.local_addr().expect("bound");
        let (mut rx, thread) = spawn(sock).expect("the thread starts");
        let from = StdUdp::bind("127.0.0.1:0").expect("bind on loopback");
        let datagram = |i: u32| {
            let mut d = vec![i as u8; 1200];
            d[..4].copy_from_slice(&i.to_be_bytes());
            d
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        rt.block_on(async {
            // One at a time, more rounds than there are batches: each
            // round needs a batch given back.
            for i in 0..3 * RX_BATCHES as u32 {
                from.send_to(&datagram(i), to).expect("send on loopback");
                let mut got = Vec::new();
                let b = next(&mut rx).await;
                collect(&b, &mut got);
                rx.give_back(b);
                assert_eq!(got, vec![datagram(i)]);
            }
            // A burst, more than one batch holds unless coalesced.
            let sent: Vec<Vec<u8>> = (0..40).map(datagram).collect();
            for d in &sent {
                from.send_to(d, to).expect("send on loopback");
            }
            let mut got = Vec::new();
            while got.len() < sent.len() {
                let b = next(&mut rx).await;
                collect(&b, &mut got);
                rx.give_back(b);
            }
            assert_eq!(got, sent);
        });
        let t = Instant::now();
        drop(rx);
        thread.join().expect("the thread does not panic");
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }

    async fn next(rx: &mut UdpRx) -> RxBatch {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("the datagrams arrive")
            .expect("the thread runs")
    }

    fn collect(b: &RxBatch, got: &mut Vec<Vec<u8>>) {
        for (_, data, stride) in b.buffers() {
            got.extend(data.chunks(stride).map(<[u8]>::to_vec));
        }
    }
}
