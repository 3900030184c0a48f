//! The packet path's batch buffers, in memory only: what the engine writes
//! and the I/O layer sends.
//!
//! - [`Datagrams`]: encrypted datagrams back to back in one buffer,
//!   grouped per destination so that each group leaves in one UDP GSO send.
//!   The node seals straight into it ([`Datagrams::room`], then
//!   [`Datagrams::commit`]).
//! - [`Packets`]: decrypted packets for the TUN, in order: data messages
//!   opened where `recvmmsg` received them (the batch's receive buffers),
//!   anything else in a slot of its own; the TUN write coalesces them per
//!   flow (GRO) by gathering them where they lie ([`super::gro`]).
//!
//! Both are reused batch after batch: once warm, nothing on the hot path
//! allocates (`meshd/tests/alloc.rs` counts).
//!
//! A datagram committed with [`Datagrams::commit_sealing`] still holds its
//! plaintext, with its nonce already reserved: it is sealed, where it
//! lies, by whoever takes the datagrams out ([`Datagrams::sends`],
//! [`Datagrams::datagrams`]). So the thread that reads, routes and orders
//! (and reserves the nonces in that order) need not be the one that
//! encrypts, and no datagram can leave unsealed.

use std::net::SocketAddr;
use std::sync::Arc;

use skymesh_noise::noise::session::Session;

use super::node::{DATA_HEADER, DATA_OVERHEAD};

/// Largest UDP payload one GSO send may carry: the kernel caps a GSO
/// datagram at 64 KiB including headers.
pub const GSO_MAX_BYTES: usize = 65_535 - 512;

/// Datagrams for one destination sent with one `sendmsg`: all of `segment`
/// bytes but the last, which may be shorter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Group {
    dst: SocketAddr,
    start: usize,
    end: usize,
    segment: usize,
    count: usize,
    /// The last datagram was short: nothing more may join.
    closed: bool,
}

/// Where `session` is in a batch's `sessions` (added if new; a batch
/// usually names one or two).
fn session_index(sessions: &mut Vec<Arc<Session>>, session: &Arc<Session>) -> usize {
    match sessions.iter().rposition(|s| Arc::ptr_eq(s, session)) {
        Some(k) => k,
        None => {
            sessions.push(session.clone());
            sessions.len() - 1
        }
    }
}

/// Encrypted datagrams waiting to be sent, grouped for GSO.
#[derive(Debug, Clone)]
pub struct Datagrams {
    /// Always at its full length; `len` bytes are in use.
    buf: Vec<u8>,
    len: usize,
    /// Where [`Datagrams::stage`] laid out its slots, and their size.
    stage_base: usize,
    stride: usize,
    groups: Vec<Group>,
    max_segments: usize,
    /// Datagrams committed unsealed, in order.
    seals: Vec<Seal>,
    /// The sessions `seals` name (one per peer, usually).
    sessions: Vec<Arc<Session>>,
}

/// A datagram waiting to be sealed: `len` bytes of plaintext at
/// `start + 16` in the buffer, to be sealed with `sessions[session]` under
/// `nonce`.
#[derive(Debug, Clone, Copy)]
struct Seal {
    start: usize,
    len: usize,
    nonce: u64,
    session: usize,
}

/// One group of [`Datagrams`]: its destination, its bytes, and the segment
/// size when it holds more than one datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Send<'a> {
    pub dst: SocketAddr,
    pub contents: &'a [u8],
    pub segment_size: Option<usize>,
}

impl Datagrams {
    /// A batch of `bytes` capacity whose groups hold at most `max_segments`
    /// datagrams (1: no GSO).
    pub fn new(bytes: usize, max_segments: usize) -> Datagrams {
        Datagrams {
            buf: vec![0u8; bytes],
            len: 0,
            stage_base: 0,
            stride: 0,
            groups: Vec::with_capacity(64),
            max_segments: max_segments.max(1),
            seals: Vec::with_capacity(4 * 64),
            sessions: Vec::with_capacity(4),
        }
    }

    /// Lowers (or raises) how many datagrams one group may hold; applies to
    /// groups started from now on.
    pub fn set_max_segments(&mut self, n: usize) {
        self.max_segments = n.max(1);
    }

    /// Room for the next datagram, at most `max` bytes. Write it at the
    /// start, then [`Datagrams::commit`] its length. The buffer grows if it
    /// must (never once the caller flushes at [`Datagrams::needs_flush`]).
    pub fn room(&mut self, max: usize) -> &mut [u8] {
        if self.len + max > self.buf.len() {
            self.buf.resize(self.len + max, 0);
        }
        &mut self.buf[self.len..self.len + max]
    }

    /// Takes the first `n` bytes of the last [`Datagrams::room`] as a
    /// datagram to `dst`. It joins the last group when it can (same
    /// destination, not larger than the group's segments, the group not
    /// closed by a short one, not full); otherwise it starts a group.
    pub fn commit(&mut self, dst: SocketAddr, n: usize) {
        let start = self.len;
        let n = n.min(self.buf.len() - start);
        self.len += n;
        if let Some(g) = self.groups.last_mut()
            && g.dst == dst
            && !g.closed
            && n <= g.segment
            && g.count < self.max_segments
            && self.len - g.start <= GSO_MAX_BYTES
        {
            g.count += 1;
            g.end = self.len;
            g.closed = n < g.segment;
            return;
        }
        self.groups.push(Group {
            dst,
            start,
            end: self.len,
            segment: n,
            count: 1,
            closed: false,
        });
    }

    /// Lays out `slots` slots of `stride` bytes after the datagrams so far
    /// and returns them, for a read to fill (a TUN read, each packet after
    /// a WireGuard header's room) and the node to seal in place. Take them
    /// with [`Datagrams::commit_staged`] in slot order; nothing else may be
    /// added until every slot wanted is committed.
    pub fn stage(&mut self, slots: usize, stride: usize) -> &mut [u8] {
        let need = slots * stride;
        if self.len + need > self.buf.len() {
            self.buf.resize(self.len + need, 0);
        }
        self.stage_base = self.len;
        self.stride = stride;
        &mut self.buf[self.len..self.len + need]
    }

    /// Slot `i` of the last [`Datagrams::stage`].
    pub fn staged(&mut self, i: usize) -> &mut [u8] {
        let start = self.stage_base + i * self.stride;
        &mut self.buf[start..start + self.stride]
    }

    /// Takes the first `n` bytes of slot `i` as a datagram to `dst`,
    /// moved down behind the previous datagram if a slot before it was
    /// dropped or short (full-size packets need no move).
    pub fn commit_staged(&mut self, i: usize, dst: SocketAddr, n: usize) {
        let start = self.stage_base + i * self.stride;
        let n = n.min(self.stride);
        // Slots are committed in order and none holds more than a stride,
        // so the datagrams so far end at or before this slot.
        if start > self.len {
            self.buf.copy_within(start..start + n, self.len);
        }
        self.commit(dst, n);
    }

    /// Like [`Datagrams::commit_staged`] for a packet of `len` bytes in
    /// slot `i` (after a WireGuard header's room) that is sealed later,
    /// with `session` under `nonce` (reserved by the caller, in order):
    /// the slot becomes a datagram of `len + 32` bytes to `dst` once it is
    /// sealed, before anything takes it out. `len + 32` must fit the slot.
    pub fn commit_sealing(
        &mut self,
        i: usize,
        dst: SocketAddr,
        len: usize,
        session: &Arc<Session>,
        nonce: u64,
    ) {
        let start = self.len;
        self.commit_staged(i, dst, len + DATA_OVERHEAD);
        let session = session_index(&mut self.sessions, session);
        self.seals.push(Seal {
            start,
            len,
            nonce,
            session,
        });
    }

    /// Whether datagrams wait to be sealed.
    pub fn is_sealed(&self) -> bool {
        self.seals.is_empty()
    }

    /// Seals every datagram committed with [`Datagrams::commit_sealing`].
    /// One whose seal fails (it cannot: the slot always has the room) is
    /// zeroed, so that no plaintext ever leaves.
    pub fn seal(&mut self) {
        for s in self.seals.drain(..) {
            let end = (s.start + s.len + DATA_OVERHEAD).min(self.buf.len());
            let buf = &mut self.buf[s.start..end];
            let sealed = self
                .sessions
                .get(s.session)
                .and_then(|k| k.seal_in_place(s.nonce, buf, s.len));
            if sealed.is_none() {
                buf.fill(0);
            }
        }
        self.sessions.clear();
    }

    /// Copies `data` in as a datagram to `dst` (handshakes, cookies: the
    /// paths that are not worth sealing in place).
    pub fn push(&mut self, dst: SocketAddr, data: &[u8]) {
        self.room(data.len()).copy_from_slice(data);
        self.commit(dst, data.len());
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Bytes waiting.
    pub fn bytes(&self) -> usize {
        self.len
    }

    /// Whether less than `reserve` bytes of room are left: send before
    /// adding more.
    pub fn needs_flush(&self, reserve: usize) -> bool {
        self.buf.len() - self.len < reserve
    }

    /// The groups, in order (sealed first).
    pub fn sends(&mut self) -> impl Iterator<Item = Send<'_>> {
        self.seal();
        self.groups.iter().map(|g| Send {
            dst: g.dst,
            contents: &self.buf[g.start..g.end],
            segment_size: (g.count > 1).then_some(g.segment),
        })
    }

    /// Every datagram, in order, with its destination (tests, and sockets
    /// without GSO); sealed first.
    pub fn datagrams(&mut self) -> impl Iterator<Item = (SocketAddr, &[u8])> {
        self.sends().flat_map(|s| {
            s.contents
                .chunks(s.segment_size.unwrap_or(s.contents.len().max(1)))
                .map(move |d| (s.dst, d))
        })
    }

    /// Appends every datagram of `other` (and empties it).
    pub fn append(&mut self, other: &mut Datagrams) {
        for (dst, d) in other.datagrams() {
            self.push(dst, d);
        }
        other.clear();
    }

    /// Empties the batch, keeping its memory (what waits to be sealed is
    /// dropped too).
    pub fn clear(&mut self) {
        self.len = 0;
        self.groups.clear();
        self.seals.clear();
        self.sessions.clear();
    }
}

/// Decrypted packets waiting for the TUN, in order.
///
/// A packet lies in one of two places:
/// - a slot of its own, after `headroom` bytes ([`Packets::room`] and
///   [`Packets::commit`], [`Packets::push`], [`Packets::push_sealed`]);
/// - or where a `recvmmsg` put it, still sealed, in one of the batch's
///   receive buffers ([`Packets::rx_free`], [`Packets::rx_commit`],
///   [`Packets::push_sealed_rx`]): the UDP GRO buffer is where it is
///   opened, and where the TUN write gathers it from. No copy.
///
/// A sealed data message is opened where it lies by [`Packets::open`] (on
/// any thread). Until the engine has judged it
/// ([`super::engine::Engine::finish_opened`]), it is not a packet the TUN
/// may see.
#[derive(Debug)]
pub struct Packets {
    /// Slot buffers; the first `slots` are taken.
    bufs: Vec<Vec<u8>>,
    slots: usize,
    /// Every packet, in order.
    entries: Vec<Entry>,
    headroom: usize,
    limit: usize,
    /// Receive buffers (none unless made [`Packets::with_rx`]); the first
    /// `rx_meta.len()` hold what a `recvmmsg` put there.
    rx: Vec<Vec<u8>>,
    rx_meta: Vec<Rx>,
    /// Data messages to open and judge, in order.
    opens: Vec<Open>,
    /// The sessions `opens` name.
    sessions: Vec<Arc<Session>>,
    /// Whether [`Packets::open`] ran since the last sealed push.
    opened: bool,
}

/// Where a packet's bytes are: `len` bytes from `start` of a slot or of a
/// receive buffer.
#[derive(Debug, Clone, Copy)]
struct Entry {
    rx: bool,
    buf: u32,
    start: u32,
    len: u32,
    /// Judged and refused: gone at [`Packets::settle`].
    dropped: bool,
}

/// What one `recvmmsg` buffer received: from `src`, `len` bytes of
/// datagrams `stride` bytes each (the last may be shorter).
#[derive(Debug, Clone, Copy)]
struct Rx {
    src: SocketAddr,
    len: usize,
    stride: usize,
}

/// A batch's opened data messages ([`Packets::opened`]): the jobs, the
/// sessions they name, and their plaintexts ([`Plain::get_mut`]).
pub struct Opened<'a> {
    pub opens: &'a [Open],
    pub sessions: &'a [Arc<Session>],
    pub plain: Plain<'a>,
}

/// The plaintexts of a batch's opened messages.
pub struct Plain<'a> {
    bufs: &'a mut [Vec<u8>],
    rx: &'a mut [Vec<u8>],
    entries: &'a [Entry],
}

impl Plain<'_> {
    /// The first `len` plaintext bytes of data message `o`.
    pub fn get_mut(&mut self, o: &Open, len: usize) -> Option<&mut [u8]> {
        let e = self.entries.get(o.entry)?;
        let start = e.start as usize + DATA_HEADER;
        let store = if e.rx { &mut *self.rx } else { &mut *self.bufs };
        store.get_mut(e.buf as usize)?.get_mut(start..start + len)
    }
}

/// A data message, packet `entry` of a [`Packets`] batch: from `src`, for
/// peer `peer`, sealed with `sessions[session]`. After opening, `result`
/// holds its counter and plaintext length, or `None` if it did not
/// authenticate.
#[derive(Debug, Clone, Copy)]
pub struct Open {
    pub entry: usize,
    pub peer: u32,
    pub src: SocketAddr,
    pub session: usize,
    pub result: Option<(u64, usize)>,
}

/// Initial room of a packet slot: a full-MTU packet and its headroom.
const SLOT: usize = 1500 + 64;

impl Packets {
    /// A batch of at most `limit` packets with `headroom` bytes in front of
    /// each in a slot (at least [`DATA_HEADER`]: a sealed message's header
    /// goes there).
    pub fn new(limit: usize, headroom: usize) -> Packets {
        let headroom = headroom.max(DATA_HEADER);
        Packets {
            bufs: (0..limit)
                .map(|_| Vec::with_capacity(headroom + SLOT))
                .collect(),
            slots: 0,
            entries: Vec::with_capacity(limit),
            headroom,
            limit,
            rx: Vec::new(),
            rx_meta: Vec::new(),
            opens: Vec::with_capacity(limit),
            sessions: Vec::with_capacity(4),
            opened: true,
        }
    }

    /// [`Packets::new`], with `buffers` receive buffers of `size` bytes for
    /// `recvmmsg` to fill in place. A batch takes the datagrams of every
    /// receive into it, even beyond `limit` (its packet list grows).
    pub fn with_rx(limit: usize, headroom: usize, buffers: usize, size: usize) -> Packets {
        let mut p = Packets::new(limit, headroom);
        // Zeroed allocations each (not clones of one): pages the kernel
        // never receives into stay untouched.
        p.rx = (0..buffers).map(|_| vec![0u8; size]).collect();
        p.rx_meta = Vec::with_capacity(buffers);
        p
    }

    /// Copies in a sealed data message from `src` for peer `peer`, to be
    /// opened with `session` (the headroom must hold its 16-byte header).
    pub fn push_sealed(
        &mut self,
        datagram: &[u8],
        src: SocketAddr,
        peer: u32,
        session: &Arc<Session>,
    ) {
        let front = self.headroom - DATA_HEADER;
        let body = datagram.len().saturating_sub(DATA_HEADER);
        let slot = self.slots;
        // The slot's room is after the headroom; the header goes in front.
        let _ = self.room(body);
        self.bufs[slot][front..front + datagram.len()].copy_from_slice(datagram);
        self.slots += 1;
        self.push_open(false, slot, front, datagram.len(), src, peer, session);
    }

    /// Takes the data message at `start..start + len` of receive buffer
    /// `buf` ([`Packets::rx_datagram`]) as it lies, to be opened there.
    pub fn push_sealed_rx(
        &mut self,
        buf: usize,
        start: usize,
        len: usize,
        peer: u32,
        session: &Arc<Session>,
    ) {
        let Some(rx) = self.rx_meta.get(buf) else {
            return;
        };
        let src = rx.src;
        self.push_open(true, buf, start, len, src, peer, session);
    }

    #[allow(clippy::too_many_arguments)]
    fn push_open(
        &mut self,
        rx: bool,
        buf: usize,
        start: usize,
        len: usize,
        src: SocketAddr,
        peer: u32,
        session: &Arc<Session>,
    ) {
        let entry = self.entries.len();
        self.entries.push(Entry {
            rx,
            buf: buf as u32,
            start: start as u32,
            len: len as u32,
            dropped: false,
        });
        let session = session_index(&mut self.sessions, session);
        self.opens.push(Open {
            entry,
            peer,
            src,
            session,
            result: None,
        });
        self.opened = false;
    }

    /// The receive buffers not yet filled, for one `recvmmsg`; then
    /// [`Packets::rx_commit`] each it filled, in order. Empty without
    /// receive buffers, or when all are taken.
    pub fn rx_free(&mut self) -> &mut [Vec<u8>] {
        let used = self.rx_meta.len();
        &mut self.rx[used..]
    }

    /// Once what the receive buffers hold has been handled: frees them if
    /// no packet lies in them (all were handshakes, keepalives or refused).
    pub fn rx_reclaim(&mut self) {
        if !self.entries.iter().any(|e| e.rx) {
            self.rx_meta.clear();
        }
    }

    /// The next free receive buffer got `len` bytes from `src`, datagrams
    /// of `stride` bytes each (UDP GRO; the last may be shorter). Returns
    /// its index.
    pub fn rx_commit(&mut self, src: SocketAddr, len: usize, stride: usize) -> usize {
        let i = self.rx_meta.len();
        let Some(cap) = self.rx.get(i).map(Vec::len) else {
            debug_assert!(false, "rx_commit without a free receive buffer");
            return i;
        };
        self.rx_meta.push(Rx {
            src,
            len: len.min(cap),
            stride: stride.max(1),
        });
        i
    }

    /// Receive buffers filled so far.
    pub fn rx_used(&self) -> usize {
        self.rx_meta.len()
    }

    /// Receive buffer `buf`'s sender, byte count and datagram stride.
    pub fn rx_info(&self, buf: usize) -> Option<(SocketAddr, usize, usize)> {
        self.rx_meta.get(buf).map(|r| (r.src, r.len, r.stride))
    }

    /// The datagram at `start..start + len` of receive buffer `buf`.
    pub fn rx_datagram(&self, buf: usize, start: usize, len: usize) -> &[u8] {
        self.rx
            .get(buf)
            .and_then(|b| b.get(start..start + len))
            .unwrap_or_default()
    }

    /// [`Packets::rx_datagram`] and, beside it, [`Packets::room`] for
    /// what handling it puts in the batch.
    pub fn rx_and_room(
        &mut self,
        buf: usize,
        start: usize,
        len: usize,
        max: usize,
    ) -> (&[u8], &mut [u8]) {
        let room = Self::slot_room(&mut self.bufs, self.slots, self.headroom, max);
        let datagram = self
            .rx
            .get(buf)
            .and_then(|b| b.get(start..start + len))
            .unwrap_or_default();
        (datagram, room)
    }

    /// Whether data messages wait to be opened or judged.
    pub fn has_sealed(&self) -> bool {
        !self.opens.is_empty()
    }

    /// Opens every data message taken with [`Packets::push_sealed`] or
    /// [`Packets::push_sealed_rx`] where it lies (authenticates and
    /// decrypts; the replay window is only checked, not marked: that is the
    /// engine's, in order).
    pub fn open(&mut self) {
        if self.opened {
            return;
        }
        for o in &mut self.opens {
            let Some(e) = self.entries.get(o.entry) else {
                continue;
            };
            let store = if e.rx { &mut self.rx } else { &mut self.bufs };
            let (start, len) = (e.start as usize, e.len as usize);
            o.result = store
                .get_mut(e.buf as usize)
                .and_then(|b| b.get_mut(start..start + len))
                .zip(self.sessions.get(o.session))
                .and_then(|(msg, s)| s.open_in_place(msg).ok())
                .map(|(counter, plain)| (counter, plain.len()));
        }
        self.opened = true;
    }

    /// The opened data messages, for the engine to judge in order; then
    /// [`Packets::settle`].
    pub fn opened(&mut self) -> Opened<'_> {
        self.open();
        Opened {
            opens: &self.opens,
            sessions: &self.sessions,
            plain: Plain {
                bufs: &mut self.bufs,
                rx: &mut self.rx,
                entries: &self.entries,
            },
        }
    }

    /// Ends judging: each opened message keeps `keep[k]` bytes of
    /// plaintext (`None`: it is dropped); afterwards only packets remain,
    /// in order.
    pub fn settle(&mut self, keep: &[Option<usize>]) {
        for (o, k) in self.opens.iter().zip(keep) {
            let Some(e) = self.entries.get_mut(o.entry) else {
                continue;
            };
            match k {
                Some(n) => {
                    e.start += DATA_HEADER as u32;
                    e.len = *n as u32;
                }
                None => e.dropped = true,
            }
        }
        // Messages without a verdict (none, unless `keep` is short) go too.
        for o in self.opens.iter().skip(keep.len()) {
            if let Some(e) = self.entries.get_mut(o.entry) {
                e.dropped = true;
            }
        }
        self.entries.retain(|e| !e.dropped);
        self.opens.clear();
        self.sessions.clear();
        self.opened = true;
    }

    fn slot_room(bufs: &mut Vec<Vec<u8>>, slot: usize, headroom: usize, max: usize) -> &mut [u8] {
        if slot == bufs.len() {
            bufs.push(Vec::with_capacity(headroom + SLOT));
        }
        let b = &mut bufs[slot];
        // A previous, longer packet leaves its bytes: only the gap to a
        // longer one is zeroed.
        b.resize(headroom + max, 0);
        &mut b[headroom..]
    }

    /// Room for the next packet, at most `max` bytes; write it at the start
    /// and [`Packets::commit`] its length, or just do not commit.
    pub fn room(&mut self, max: usize) -> &mut [u8] {
        Self::slot_room(&mut self.bufs, self.slots, self.headroom, max)
    }

    /// Takes the first `n` bytes of the last [`Packets::room`] as a packet.
    pub fn commit(&mut self, n: usize) {
        let slot = self.slots;
        let Some(b) = self.bufs.get(slot) else {
            return;
        };
        let n = n.min(b.len().saturating_sub(self.headroom));
        self.entries.push(Entry {
            rx: false,
            buf: slot as u32,
            start: self.headroom as u32,
            len: n as u32,
            dropped: false,
        });
        self.slots += 1;
    }

    /// Copies `packet` in.
    pub fn push(&mut self, packet: &[u8]) {
        self.room(packet.len()).copy_from_slice(packet);
        self.commit(packet.len());
    }

    /// Whether the batch holds its packet limit: write before adding more.
    pub fn is_full(&self) -> bool {
        self.entries.len() >= self.limit
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Packets waiting (data messages included).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Waiting packet `i`.
    pub fn get(&self, i: usize) -> Option<&[u8]> {
        debug_assert!(!self.has_sealed(), "a batch with unjudged messages");
        let e = self.entries.get(i)?;
        let store = if e.rx { &self.rx } else { &self.bufs };
        let (start, len) = (e.start as usize, e.len as usize);
        store.get(e.buf as usize)?.get(start..start + len)
    }

    /// The waiting packets.
    pub fn packets(&self) -> impl Iterator<Item = &[u8]> {
        (0..self.entries.len()).filter_map(|i| self.get(i))
    }

    /// Empties the batch, keeping its memory.
    pub fn clear(&mut self) {
        self.slots = 0;
        self.entries.clear();
        self.rx_meta.clear();
        self.opens.clear();
        self.sessions.clear();
        self.opened = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(port: u16) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 1], port))
    }

    fn put(d: &mut Datagrams, dst: SocketAddr, byte: u8, n: usize) {
        let room = d.room(n + 100);
        room[..n].fill(byte);
        d.commit(dst, n);
    }

    #[test]
    fn datagrams_group_per_destination_and_segment_size() {
        let mut d = Datagrams::new(1 << 16, 64);
        put(&mut d, a(1), 1, 100);
        put(&mut d, a(1), 2, 100);
        put(&mut d, a(1), 3, 60); // short: closes the group
        put(&mut d, a(1), 4, 100);
        put(&mut d, a(2), 5, 100);
        put(&mut d, a(2), 6, 120); // larger than the segment: new group
        let sends: Vec<(SocketAddr, usize, Option<usize>)> = d
            .sends()
            .map(|s| (s.dst, s.contents.len(), s.segment_size))
            .collect();
        assert_eq!(
            sends,
            [
                (a(1), 260, Some(100)),
                (a(1), 100, None),
                (a(2), 100, None),
                (a(2), 120, None)
            ]
        );
        let got: Vec<(SocketAddr, u8, usize)> =
            d.datagrams().map(|(dst, b)| (dst, b[0], b.len())).collect();
        assert_eq!(
            got,
            [
                (a(1), 1, 100),
                (a(1), 2, 100),
                (a(1), 3, 60),
                (a(1), 4, 100),
                (a(2), 5, 100),
                (a(2), 6, 120)
            ]
        );
        d.clear();
        assert!(d.is_empty() && d.bytes() == 0);
    }

    #[test]
    fn datagram_groups_respect_the_segment_and_byte_limits() {
        let mut d = Datagrams::new(1 << 20, 3);
        for i in 0..7 {
            put(&mut d, a(1), i, 1000);
        }
        let counts: Vec<usize> = d.sends().map(|s| s.contents.len() / 1000).collect();
        assert_eq!(counts, [3, 3, 1]);
        let mut d = Datagrams::new(1 << 20, 1000);
        for i in 0..100 {
            put(&mut d, a(1), i, 1400);
        }
        assert!(d.sends().all(|s| s.contents.len() <= GSO_MAX_BYTES));
        assert_eq!(d.datagrams().count(), 100);
    }

    #[test]
    fn staged_slots_commit_in_place_and_close_gaps() {
        let mut d = Datagrams::new(1 << 16, 64);
        put(&mut d, a(1), 9, 50);
        let area = d.stage(4, 100);
        assert_eq!(area.len(), 400);
        for (i, slot) in area.chunks_mut(100).enumerate() {
            slot.fill(i as u8 + 1);
        }
        d.commit_staged(0, a(1), 50); // right behind: no gap
        // Slot 1 dropped; slot 2 moves down behind slot 0.
        d.commit_staged(2, a(1), 50);
        d.commit_staged(3, a(1), 30);
        let got: Vec<(u8, usize)> = d.datagrams().map(|(_, b)| (b[0], b.len())).collect();
        assert_eq!(got, [(9, 50), (1, 50), (3, 50), (4, 30)]);
        assert!(d.datagrams().all(|(_, b)| b.iter().all(|x| *x == b[0])));
        assert_eq!(d.sends().count(), 1, "one GSO group");
        let mut other = Datagrams::new(1 << 10, 64);
        put(&mut other, a(2), 7, 20);
        d.append(&mut other);
        assert!(other.is_empty());
        assert_eq!(
            d.datagrams().last().map(|(dst, b)| (dst, b.len())),
            Some((a(2), 20))
        );
    }

    #[test]
    fn datagrams_grow_rather_than_lose_when_not_flushed() {
        let mut d = Datagrams::new(1000, 64);
        assert!(!d.needs_flush(500));
        for i in 0..10 {
            put(&mut d, a(1), i, 300);
        }
        assert!(d.needs_flush(500));
        assert_eq!(d.datagrams().count(), 10);
    }

    #[test]
    fn packets_keep_headroom_and_reuse_slots() {
        let mut p = Packets::new(4, 10);
        p.push(b"hello");
        let room = p.room(100);
        room[..3].copy_from_slice(b"abc");
        p.commit(3);
        let _ = p.room(50); // not committed: not a packet
        assert_eq!(p.len(), 2);
        let got: Vec<&[u8]> = p.packets().collect();
        assert_eq!(got, [&b"hello"[..], &b"abc"[..]]);
        p.clear();
        p.push(b"x");
        assert_eq!(p.packets().collect::<Vec<_>>(), [&b"x"[..]]);
        for _ in 0..3 {
            p.push(b"y");
        }
        assert!(p.is_full());
    }
}
