//! The packet path of one gateway as one sans-IO type: the VIP balancer
//! and the WireGuard node composed the way every packet crosses them.
//!
//! - From the TUN ([`Engine::handle_tun`]): the balancer first (it answers
//!   pings and refusals for VIPs, translates replies of its own SNAT flows,
//!   rewrites new VIP flows), then the node seals what must cross a tunnel
//!   straight into the outgoing [`Datagrams`].
//! - From the network ([`Engine::handle_network`]): the node opens a data
//!   message straight into the TUN batch ([`Packets`]), then the balancer
//!   reverse-translates remote backends' replies in place.
//! - Time ([`Engine::handle_timeout`], [`Engine::poll_timeout`]):
//!   WireGuard's timers every 250 ms, the handshake limiter's window every
//!   second, the balancer's sweeps when it asks.
//!
//! The I/O layer (`io::device`) only reads, calls these, and sends the
//! batches; `engine/tests.rs` runs two engines against each other in
//! memory.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::batch::{Datagrams, Packets};
use super::lb::{Lb, LbTable, Verdict};
use super::node::{DATA_HEADER, DropReason, Node, PeerConfig, PeerDiff};
use crate::state::NetState;

/// WireGuard timer granularity (boringtun expects ~4 calls per second).
pub const TIMER_TICK: Duration = Duration::from_millis(250);

/// Ticks per handshake-limiter window (one second).
const TICKS_PER_LIMITER_WINDOW: u64 = 4;

/// Room a datagram batch needs before the engine handles one more input:
/// a staged TUN read's slots, or (from the network) a few handshake
/// answers and the packets a new session flushes.
pub const DATAGRAM_RESERVE: usize = TUN_SLOTS * SLOT + 4096;

/// One staged TUN packet's slot: room for the WireGuard header, a packet
/// of the TUN's MTU, and the tag.
pub const SLOT: usize = DATA_HEADER + 1420 + 16;

/// Slots a staged TUN read offers: more than the segments of the largest
/// TSO read (64 KiB in MTU-sized packets).
pub const TUN_SLOTS: usize = 64;

/// The balancer and the node of one gateway.
pub struct Engine {
    node: Node,
    lb: Lb,
    /// The balancer's answers (ICMP, resets) before they join the batch.
    reply: Vec<u8>,
    /// Handshake initiations started during a staged TUN read, which may
    /// not be written into the staged batch.
    aside: Datagrams,
    /// [`Engine::finish_opened`]'s verdicts (reused).
    keep: Vec<Option<usize>>,
    next_tick: Instant,
    ticks: u64,
}

impl Engine {
    /// An engine whose first timer tick is due at `now`.
    pub fn new(node: Node, lb: Lb, now: Instant) -> Engine {
        Engine {
            node,
            lb,
            reply: Vec::with_capacity(1500),
            aside: Datagrams::new(4096, 1),
            keep: Vec::with_capacity(256),
            next_tick: now,
            ticks: 0,
        }
    }

    /// The WireGuard node (peers, counters).
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// The balancer (tables, counters).
    pub fn lb(&self) -> &Lb {
        &self.lb
    }

    /// Applies a netmap: this gateway's own networks and its peers (as a
    /// diff: unchanged peers keep their sessions).
    pub fn apply_netmap(&mut self, s: &NetState) -> PeerDiff {
        self.node.set_local(s.net.local_nets());
        self.node.set_peers(peer_configs(s))
    }

    /// Switches the balancer to a new table.
    pub fn set_table(&mut self, t: Arc<LbTable>) {
        self.lb.set_table(t);
    }

    /// A packet read from the TUN (rewritten in place by the balancer).
    pub fn handle_tun(
        &mut self,
        packet: &mut [u8],
        now: Instant,
        net: &mut Datagrams,
        tun: &mut Packets,
    ) {
        match self.lb.outbound(packet, &mut self.reply, now) {
            Verdict::Pass | Verdict::ToTunnel => self.node.handle_tun(packet, net),
            // A cut direct call: the reset goes on, its sender gets one.
            Verdict::ResetOnward => {
                self.node.handle_tun(packet, net);
                if !self.reply.is_empty() {
                    tun.push(&self.reply);
                }
            }
            // A local backend, or a reply translated back: the copy is the
            // hairpin's, not the tunnel's.
            Verdict::ToTun => tun.push(packet),
            Verdict::Reply => tun.push(&self.reply),
            // A local replica's segment on a cut flow: both resets go to
            // the TUN.
            Verdict::Reset => {
                tun.push(packet);
                if !self.reply.is_empty() {
                    tun.push(&self.reply);
                }
            }
            Verdict::Drop(_) => {}
        }
    }

    /// Packet `i` of a TUN read staged in `net` ([`Datagrams::stage`] with
    /// slots of [`SLOT`] bytes, the packet's `len` bytes after
    /// [`DATA_HEADER`] bytes of room): balanced, then sealed where it lies
    /// — the copy-free path. Call [`Engine::finish_staged`] after the last
    /// slot of the read. The packet is sealed when the batch's datagrams
    /// are taken out ([`Datagrams::sends`]), on whichever thread does it.
    pub fn handle_tun_staged(
        &mut self,
        i: usize,
        len: usize,
        now: Instant,
        net: &mut Datagrams,
        tun: &mut Packets,
    ) {
        let buf = net.staged(i);
        let Some(packet) = buf.get_mut(DATA_HEADER..DATA_HEADER + len) else {
            return;
        };
        match self.lb.outbound(packet, &mut self.reply, now) {
            Verdict::Pass | Verdict::ToTunnel => {
                if let Some(s) = self.node.prepare_seal(buf, len, &mut self.aside) {
                    net.commit_sealing(i, s.dst, len, s.session, s.nonce);
                }
            }
            Verdict::ResetOnward => {
                if !self.reply.is_empty() {
                    tun.push(&self.reply);
                }
                if let Some(s) = self.node.prepare_seal(buf, len, &mut self.aside) {
                    net.commit_sealing(i, s.dst, len, s.session, s.nonce);
                }
            }
            Verdict::ToTun => tun.push(packet),
            Verdict::Reply => tun.push(&self.reply),
            Verdict::Reset => {
                tun.push(packet);
                if !self.reply.is_empty() {
                    tun.push(&self.reply);
                }
            }
            Verdict::Drop(_) => {}
        }
    }

    /// Ends a staged TUN read, and is called before datagrams are sent:
    /// what could not be sealed in place (a handshake started for a peer
    /// without a session, a policy refusal answered while judging opened
    /// packets) joins `net`.
    pub fn finish_staged(&mut self, net: &mut Datagrams) {
        if !self.aside.is_empty() {
            net.append(&mut self.aside);
        }
    }

    /// One datagram from the network. A data message of a session this
    /// node keeps is only copied into `tun`, still sealed: it is opened
    /// where it lies ([`Packets::open`], on any thread) and judged by
    /// [`Engine::finish_opened`] before the batch may go to the TUN.
    /// Everything else is handled here and now (after what waits in `tun`,
    /// so that order holds).
    pub fn handle_network(
        &mut self,
        src: SocketAddr,
        datagram: &[u8],
        now: Instant,
        net: &mut Datagrams,
        tun: &mut Packets,
    ) {
        if let Some((peer, session)) = self.node.data_session(datagram) {
            tun.push_sealed(datagram, src, peer, session);
            return;
        }
        if tun.has_sealed() {
            self.finish_opened(tun, now);
        }
        let room = tun.room(datagram.len());
        if let Some(n) = self.handle_other(src, datagram, room, now, net) {
            tun.commit(n);
        }
    }

    /// The datagrams `tun`'s receive buffers got from `first` on
    /// ([`Packets::rx_commit`]), as [`Engine::handle_network`] handles
    /// each, except that a data message stays where it was received, to be
    /// opened there ([`Packets::push_sealed_rx`]): no copy.
    pub fn handle_received(
        &mut self,
        first: usize,
        now: Instant,
        net: &mut Datagrams,
        tun: &mut Packets,
    ) {
        for buf in first..tun.rx_used() {
            let Some((src, len, stride)) = tun.rx_info(buf) else {
                continue;
            };
            let mut start = 0;
            while start < len {
                let n = stride.min(len - start);
                self.handle_rx(buf, start, n, src, now, net, tun);
                start += n;
            }
        }
        tun.rx_reclaim();
    }

    #[allow(clippy::too_many_arguments)]
    fn handle_rx(
        &mut self,
        buf: usize,
        start: usize,
        len: usize,
        src: SocketAddr,
        now: Instant,
        net: &mut Datagrams,
        tun: &mut Packets,
    ) {
        if let Some((peer, session)) = self.node.data_session(tun.rx_datagram(buf, start, len)) {
            tun.push_sealed_rx(buf, start, len, peer, session);
            return;
        }
        if tun.has_sealed() {
            self.finish_opened(tun, now);
        }
        let (datagram, room) = tun.rx_and_room(buf, start, len, len);
        if let Some(n) = self.handle_other(src, datagram, room, now, net) {
            tun.commit(n);
        }
    }

    /// A datagram that is not a data message of a kept session (a
    /// handshake, a cookie, a session's first message): handled by the
    /// node now, what it decrypts written to `room` and passed through the
    /// balancer. Returns the bytes of `room` to take as a packet.
    fn handle_other(
        &mut self,
        src: SocketAddr,
        datagram: &[u8],
        room: &mut [u8],
        now: Instant,
        net: &mut Datagrams,
    ) -> Option<usize> {
        let n = self.node.handle_network(src, datagram, net, room)?;
        match self.lb.inbound(&mut room[..n], &mut self.reply, now) {
            Verdict::Pass | Verdict::ToTun => Some(n),
            // A refusal, back through the tunnel it came from.
            Verdict::Reply => {
                self.node.handle_tun(&self.reply, net);
                None
            }
            // A segment on a cut flow or call: the client's reset to the
            // TUN, its sender's back through the tunnel.
            Verdict::Reset | Verdict::ResetOnward => {
                if !self.reply.is_empty() {
                    self.node.handle_tun(&self.reply, net);
                }
                Some(n)
            }
            _ => None,
        }
    }

    /// Judges, in order, the data messages of `tun` (opened here first if
    /// no other thread did): replay window, cryptokey routing, roaming and
    /// timers ([`Node::accept_opened`]), then the balancer's reverse
    /// translation. What fails is dropped; afterwards `tun` holds only
    /// packets for the TUN.
    pub fn finish_opened(&mut self, tun: &mut Packets, now: Instant) {
        if !tun.has_sealed() {
            return;
        }
        let super::batch::Opened {
            opens,
            sessions,
            mut plain,
        } = tun.opened();
        self.keep.clear();
        for o in opens {
            let verdict = o.result.and_then(|(counter, len)| {
                let session = sessions.get(o.session)?;
                let packet = plain.get_mut(o, len)?;
                let n = self
                    .node
                    .accept_opened(o.peer, session, o.src, counter, packet)?;
                if n == 0 {
                    return None;
                }
                match self.lb.inbound(&mut packet[..n], &mut self.reply, now) {
                    Verdict::Pass | Verdict::ToTun => Some(n),
                    // A refusal goes back with the next datagrams sent
                    // (`aside`: there is no datagram batch here).
                    Verdict::Reply => {
                        self.node.handle_tun(&self.reply, &mut self.aside);
                        None
                    }
                    Verdict::Reset | Verdict::ResetOnward => {
                        if !self.reply.is_empty() {
                            self.node.handle_tun(&self.reply, &mut self.aside);
                        }
                        Some(n)
                    }
                    _ => None,
                }
            });
            if o.result.is_none() {
                self.node.count_drop(DropReason::AuthFailed);
            }
            self.keep.push(verdict);
        }
        tun.settle(&self.keep);
    }

    /// Runs what is due at `now`; returns whether WireGuard's timers ticked
    /// (the caller publishes counters then).
    pub fn handle_timeout(&mut self, now: Instant, net: &mut Datagrams) -> bool {
        self.lb.handle_timeout(now);
        if now < self.next_tick {
            return false;
        }
        self.node.handle_timers(net);
        self.ticks += 1;
        if self.ticks.is_multiple_of(TICKS_PER_LIMITER_WINDOW) {
            self.node.reset_rate_limiter();
        }
        // Skip missed ticks rather than run them back to back.
        while self.next_tick <= now {
            self.next_tick += TIMER_TICK;
        }
        true
    }

    /// When [`Engine::handle_timeout`] next has work.
    pub fn poll_timeout(&self) -> Instant {
        match self.lb.poll_timeout() {
            Some((t, _)) => t.min(self.next_tick),
            None => self.next_tick,
        }
    }
}

/// Peer configurations from the netmap's parsed peers; a peer whose keys
/// did not parse is left out (the parse warned of it).
pub fn peer_configs(s: &NetState) -> Vec<PeerConfig> {
    s.net
        .peers
        .iter()
        .filter_map(|(name, p)| {
            let (public_key, preshared_key) = p.keys?;
            Some(PeerConfig {
                name: name.clone(),
                public_key,
                preshared_key,
                endpoint: p.endpoint,
                allowed_ips: p.allowed_ips.clone(),
            })
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests;
