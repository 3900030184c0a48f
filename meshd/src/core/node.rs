//! The WireGuard node: one boringtun [`Tunn`] per peer, cryptokey routing
//! both ways, the shared handshake rate limiter, drop counters.
//!
//! Sans-IO: packets go in as bytes; encrypted datagrams are sealed straight
//! into the caller's [`Datagrams`] batch and decrypted packets opened
//! straight into the caller's buffer (no copy, no allocation of ours per
//! packet); no sockets, no TUN, no tasks. The caller
//! ([`super::engine::Engine`]) owns the node exclusively, so a peer's
//! `Tunn` is never behind a mutex. boringtun reads the clock itself for its
//! timers; everything else here is driven by the caller.
//!
//! Peer lookup for incoming datagrams follows the protocol: handshake
//! initiations are matched by the initiator's static key (after the MAC and
//! rate-limit check, so a flood costs no Diffie-Hellman), every other
//! message by its receiver index, whose upper 24 bits are the peer's slot
//! (boringtun shifts the index it is given left by 8).
//!
//! The handshake rate limiter is applied here, once per handshake message
//! (initiation or response), for all peers together: over the limit, a
//! message without a valid cookie MAC is answered with a cookie reply and
//! goes no further. The peers' `Tunn`s get a limiter without a limit, so
//! inside boringtun only the MAC1 check remains and nothing is counted
//! twice.
//!
//! Roaming (whitepaper §2.1, §6.5) follows authenticated packets only: a
//! peer's endpoint moves to a datagram's source when it was a data message
//! (or keepalive) that decrypted, or a handshake initiation or response
//! that verified. Cookie replies, replays, forgeries and refused handshakes
//! never move it.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ipnet::Ipv4Net;
use skymesh_noise::noise::errors::WireGuardError;
use skymesh_noise::noise::handshake::parse_handshake_anon;
use skymesh_noise::noise::rate_limiter::RateLimiter;
use skymesh_noise::noise::session::Session;
use skymesh_noise::noise::{Packet, Tunn, TunnResult};
use skymesh_noise::x25519::{PublicKey, StaticSecret};

use super::batch::Datagrams;
use super::route::RouteTable;

/// Handshakes per second across all peers before cookies are required
/// (boringtun's device uses the same figure).
const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// Persistent keepalive for every peer, seconds (wg(8) suggests 25).
pub const PERSISTENT_KEEPALIVE_S: u16 = 25;
/// WireGuard's data message overhead: header 16 + tag 16 (whitepaper §5.4.6).
pub const DATA_OVERHEAD: usize = 32;
/// A data message's header: type, receiver index, counter.
pub const DATA_HEADER: usize = 16;

/// Where a packet routed by [`Node::prepare_seal`] goes, and how to seal
/// it.
#[derive(Debug, Clone)]
pub struct Sealing<'a> {
    pub dst: SocketAddr,
    pub session: &'a Arc<Session>,
    pub nonce: u64,
}
/// A handshake initiation, the largest message `Tunn::encapsulate` writes
/// besides data.
const HANDSHAKE_INIT_LEN: usize = 148;
/// Largest UDP payload we handle.
pub const MAX_DATAGRAM: usize = 65_535;

/// Why a packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DropReason {
    /// From the TUN: no peer's allowed IPs contain the destination.
    NoRoute,
    /// From the TUN: the peer has no known endpoint yet.
    NoEndpoint,
    /// From the TUN: not an IPv4 packet.
    NotIpv4,
    /// From a tunnel: the inner source is outside the peer's allowed IPs.
    SourceNotAllowed,
    /// From a tunnel: the inner destination is neither this gateway's
    /// overlay IP nor in its own workload CIDRs (a peer may only reach what
    /// this cluster owns, not route through it).
    DestinationNotAllowed,
    /// From the network: not a WireGuard message.
    Garbage,
    /// From the network: a message for no known peer.
    UnknownPeer,
    /// From the network: failed authentication (MAC, AEAD, replay, ...).
    AuthFailed,
    /// From the network: handshake refused under load (cookie sent).
    UnderLoad,
}

impl DropReason {
    /// Label value for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::NoRoute => "no_route",
            DropReason::NoEndpoint => "no_endpoint",
            DropReason::NotIpv4 => "not_ipv4",
            DropReason::SourceNotAllowed => "source_not_allowed",
            DropReason::DestinationNotAllowed => "destination_not_allowed",
            DropReason::Garbage => "garbage",
            DropReason::UnknownPeer => "unknown_peer",
            DropReason::AuthFailed => "auth_failed",
            DropReason::UnderLoad => "under_load",
        }
    }
}

/// A peer as the netmap describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// The peer's cluster name.
    pub name: String,
    pub public_key: [u8; 32],
    pub preshared_key: [u8; 32],
    /// Initial endpoint; replaced when the peer roams.
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<Ipv4Net>,
}

/// Counters and state of one peer, for status, metrics and `wg show`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PeerInfo {
    pub name: String,
    pub public_key: [u8; 32],
    pub preshared_key: [u8; 32],
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<Ipv4Net>,
    /// Wall-clock time of the latest handshake.
    pub last_handshake: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
    /// Completed handshakes seen (counted when the session changes).
    pub handshakes: u64,
}

struct Peer {
    cfg: PeerConfig,
    tunn: Tunn,
    endpoint: Option<SocketAddr>,
    rx_packets: u64,
    tx_packets: u64,
    rx_bytes: u64,
    tx_bytes: u64,
    handshakes: u64,
    last_handshake_age: Option<Duration>,
}

/// What [`Node::set_peers`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PeerDiff {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Key or pre-shared key changed: the tunnel was rebuilt.
    pub rekeyed: Vec<String>,
    /// Endpoint or allowed IPs changed; the session was kept.
    pub updated: Vec<String>,
}

impl PeerDiff {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.rekeyed.is_empty()
            && self.updated.is_empty()
    }
}

/// What a datagram proves about its source once `Tunn` accepted it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Authenticates {
    /// A handshake initiation or response: verified when answered.
    Handshake,
    /// A data message or keepalive: authenticated when it decrypted.
    Data,
    /// A cookie reply: proves nothing about where the peer is.
    Nothing,
}

/// The WireGuard node of one gateway.
pub struct Node {
    secret: StaticSecret,
    public: PublicKey,
    limiter: Arc<RateLimiter>,
    /// What every peer's `Tunn` checks handshakes with: MAC1 only (its
    /// limit is never reached); the load check is `limiter`'s.
    mac_only: Arc<RateLimiter>,
    peers: BTreeMap<u32, Peer>,
    by_key: HashMap<[u8; 32], u32>,
    by_name: BTreeMap<String, u32>,
    routes: RouteTable<u32>,
    /// Where decrypted packets may go: this gateway's overlay IP and its
    /// workload CIDRs. Empty until [`Node::set_local`]: nothing is delivered.
    local: Vec<Ipv4Net>,
    next_slot: u32,
    drops: BTreeMap<DropReason, u64>,
    /// Scratch buffer for boringtun's output.
    buf: Vec<u8>,
}

impl Node {
    /// A node with this private key and no peers.
    pub fn new(private_key: [u8; 32]) -> Self {
        let secret = StaticSecret::from(private_key);
        let public = PublicKey::from(&secret);
        Node {
            limiter: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
            mac_only: Arc::new(RateLimiter::new(&public, u64::MAX)),
            secret,
            public,
            peers: BTreeMap::new(),
            by_key: HashMap::new(),
            by_name: BTreeMap::new(),
            routes: RouteTable::default(),
            local: Vec::new(),
            next_slot: 1,
            drops: BTreeMap::new(),
            buf: vec![0u8; MAX_DATAGRAM + DATA_OVERHEAD + 148],
        }
    }

    /// This node's public key.
    pub fn public_key(&self) -> [u8; 32] {
        *self.public.as_bytes()
    }

    fn new_tunn(&mut self, cfg: &PeerConfig, slot: u32) -> Tunn {
        Tunn::new(
            self.secret.clone(),
            PublicKey::from(cfg.public_key),
            Some(cfg.preshared_key),
            Some(PERSISTENT_KEEPALIVE_S),
            slot,
            Some(self.mac_only.clone()),
        )
    }

    /// This gateway's own networks (overlay IP, workload CIDRs): the only
    /// destinations a decrypted packet is delivered to (SPEC §4, the
    /// destination filter). The balancer's replies to remote clients go to
    /// those clients' own addresses, so they are inside too.
    pub fn set_local(&mut self, nets: Vec<Ipv4Net>) {
        self.local = nets;
    }

    /// Makes the peer set equal to `desired` without disturbing unchanged
    /// peers: their sessions, counters and roamed endpoints stay.
    pub fn set_peers(&mut self, desired: Vec<PeerConfig>) -> PeerDiff {
        let mut diff = PeerDiff::default();
        let wanted: BTreeMap<String, PeerConfig> =
            desired.into_iter().map(|p| (p.name.clone(), p)).collect();
        let gone: Vec<String> = self
            .by_name
            .keys()
            .filter(|n| !wanted.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            if let Some(slot) = self.by_name.remove(&name)
                && let Some(p) = self.peers.remove(&slot)
            {
                self.by_key.remove(&p.cfg.public_key);
            }
            diff.removed.push(name);
        }
        for (name, cfg) in wanted {
            match self.by_name.get(&name).copied() {
                Some(slot) => {
                    let Some(p) = self.peers.get(&slot) else {
                        continue;
                    };
                    if p.cfg == cfg {
                        continue;
                    }
                    if p.cfg.public_key != cfg.public_key
                        || p.cfg.preshared_key != cfg.preshared_key
                    {
                        let old_key = p.cfg.public_key;
                        self.by_key.remove(&old_key);
                        self.peers.remove(&slot);
                        let slot = self.alloc_slot();
                        self.insert(slot, cfg);
                        diff.rekeyed.push(name);
                    } else {
                        let Some(p) = self.peers.get_mut(&slot) else {
                            continue;
                        };
                        if p.cfg.endpoint != cfg.endpoint {
                            p.endpoint = cfg.endpoint;
                        }
                        p.cfg = cfg;
                        diff.updated.push(name);
                    }
                }
                None => {
                    let slot = self.alloc_slot();
                    self.insert(slot, cfg);
                    diff.added.push(name);
                }
            }
        }
        self.routes = RouteTable::new(
            self.peers
                .iter()
                .flat_map(|(slot, p)| p.cfg.allowed_ips.iter().map(move |n| (*n, *slot))),
        );
        diff
    }

    fn alloc_slot(&mut self) -> u32 {
        let s = self.next_slot;
        // Slots are 24-bit (boringtun keeps the low 8 bits for sessions).
        self.next_slot = if s >= 0x00ff_ffff { 1 } else { s + 1 };
        s
    }

    fn insert(&mut self, slot: u32, cfg: PeerConfig) {
        let tunn = self.new_tunn(&cfg, slot);
        self.by_key.insert(cfg.public_key, slot);
        self.by_name.insert(cfg.name.clone(), slot);
        self.peers.insert(
            slot,
            Peer {
                endpoint: cfg.endpoint,
                cfg,
                tunn,
                rx_packets: 0,
                tx_packets: 0,
                rx_bytes: 0,
                tx_bytes: 0,
                handshakes: 0,
                last_handshake_age: None,
            },
        );
    }

    /// The current session of the only peer (tests that seal by hand).
    #[cfg(test)]
    pub fn peer_session_for_tests(&self) -> Arc<Session> {
        self.peers
            .values()
            .next()
            .and_then(|p| p.tunn.current_session().cloned())
            .expect("tests call this once a session is up")
    }

    /// Counts a drop that the caller judged ([`super::engine::Engine`]:
    /// a data message that did not authenticate).
    pub fn count_drop(&mut self, why: DropReason) {
        self.drop_packet(why);
    }

    fn drop_packet(&mut self, why: DropReason) {
        *self.drops.entry(why).or_default() += 1;
    }

    /// Drops so far, by reason.
    pub fn drops(&self) -> &BTreeMap<DropReason, u64> {
        &self.drops
    }

    /// The peer whose allowed IPs contain `ip`.
    pub fn route(&self, ip: Ipv4Addr) -> Option<&str> {
        let slot = self.routes.lookup(ip)?;
        self.peers.get(slot).map(|p| p.cfg.name.as_str())
    }

    /// A packet read from the TUN interface: encrypt it for the peer whose
    /// allowed IPs hold its destination, into `out`.
    pub fn handle_tun(&mut self, packet: &[u8], out: &mut Datagrams) {
        if let Some(slot) = self.route_packet(packet) {
            self.encapsulate(slot, packet, out);
        }
    }

    /// The slot of the peer whose allowed IPs hold `packet`'s destination;
    /// counts the drop when there is none.
    fn route_packet(&mut self, packet: &[u8]) -> Option<u32> {
        let Some(dst) = ipv4_dst(packet) else {
            self.drop_packet(DropReason::NotIpv4);
            return None;
        };
        let slot = self.routes.lookup(dst).copied();
        if slot.is_none() {
            self.drop_packet(DropReason::NoRoute);
        }
        slot
    }

    /// A packet read from the TUN into `buf[DATA_HEADER..DATA_HEADER + len]`
    /// (room for the WireGuard header in front, for the tag behind): routes
    /// it to the peer whose allowed IPs hold its destination and reserves
    /// its nonce, in order, so that it can be sealed where it lies, on any
    /// thread ([`Datagrams::commit_sealing`]). Returns where to send it and
    /// the session and nonce to seal with. A peer without a session (or
    /// whose session's nonces ran out), or a packet too large for `buf`'s
    /// room, takes boringtun's path instead: the
    /// packet is queued, a handshake initiation goes to `aside`, and `None`
    /// is returned.
    pub fn prepare_seal(
        &mut self,
        buf: &[u8],
        len: usize,
        aside: &mut Datagrams,
    ) -> Option<Sealing<'_>> {
        let packet = buf.get(DATA_HEADER..DATA_HEADER + len)?;
        let slot = self.route_packet(packet)?;
        let p = self.peers.get_mut(&slot)?;
        let Some(ep) = p.endpoint else {
            self.drop_packet(DropReason::NoEndpoint);
            return None;
        };
        let nonce = (buf.len() >= len + DATA_OVERHEAD)
            .then(|| p.tunn.current_session()?.reserve_nonces(1))
            .flatten();
        if let Some(nonce) = nonce {
            p.tunn.note_sent(len);
            p.tx_packets += 1;
            p.tx_bytes += len as u64;
            // Looked up again, not kept from above: a borrow returned on
            // this path only would still hold `self` on the fallback path
            // below (the borrow checker's conditional-return limit). The
            // same session: `note_sent` only counts.
            let session = self.peers.get(&slot)?.tunn.current_session()?;
            return Some(Sealing {
                dst: ep,
                session,
                nonce,
            });
        }
        self.encapsulate(slot, packet, aside);
        None
    }

    /// Encrypts `packet` for the peer in `slot`, sealing it in `out`'s
    /// buffer (or writing a handshake initiation there if the peer has no
    /// session yet; boringtun queues the packet meanwhile).
    fn encapsulate(&mut self, slot: u32, packet: &[u8], out: &mut Datagrams) {
        let Some(p) = self.peers.get_mut(&slot) else {
            return;
        };
        let Some(ep) = p.endpoint else {
            *self.drops.entry(DropReason::NoEndpoint).or_default() += 1;
            return;
        };
        let room = out.room((packet.len() + DATA_OVERHEAD).max(HANDSHAKE_INIT_LEN));
        let written = match p.tunn.encapsulate(packet, room) {
            // boringtun writes at the start of the buffer it is given.
            TunnResult::WriteToNetwork(b) => b.len(),
            TunnResult::Err(e) => {
                tracing::debug!(peer = %p.cfg.name, error = ?e, "encapsulate failed");
                return;
            }
            TunnResult::Done
            | TunnResult::WriteToTunnelV4(..)
            | TunnResult::WriteToTunnelV6(..) => return,
        };
        p.tx_packets += 1;
        p.tx_bytes += packet.len() as u64;
        out.commit(ep, written);
    }

    /// The peer slot and session of a data message whose session this
    /// node still keeps: such a message can be opened in place on any
    /// thread ([`super::batch::Packets::push_sealed`]) and then judged, in order, by
    /// [`Node::accept_opened`]. Anything else (handshakes, cookies, data
    /// for a session we no longer have) takes [`Node::handle_network`].
    pub fn data_session(&self, datagram: &[u8]) -> Option<(u32, &Arc<Session>)> {
        if datagram.len() < DATA_OVERHEAD || datagram[..4] != [4, 0, 0, 0] {
            return None;
        }
        let idx = u32::from_le_bytes([datagram[4], datagram[5], datagram[6], datagram[7]]);
        let slot = idx >> 8;
        let session = self.peers.get(&slot)?.tunn.session_by_index(idx)?;
        Some((slot, session))
    }

    /// Judges a data message opened in place (in order, batch after
    /// batch): its counter must still be new in `session`'s replay window
    /// (marked now), and its packet must come from the peer's allowed IPs
    /// and go to this gateway's networks (cryptokey routing both ways).
    /// Authenticated, it also moves the peer's endpoint to `src`
    /// (roaming) and counts toward its timers. Returns the length of the
    /// packet to deliver (it starts at `packet[0]`; a keepalive delivers
    /// nothing), or `None` if it is dropped (and counted).
    pub fn accept_opened(
        &mut self,
        slot: u32,
        session: &Session,
        src: SocketAddr,
        counter: u64,
        packet: &[u8],
    ) -> Option<usize> {
        let Some(p) = self.peers.get_mut(&slot) else {
            self.drop_packet(DropReason::UnknownPeer);
            return None;
        };
        if session.mark_received(counter).is_err() {
            // A replay: authentic, but seen before.
            self.drop_packet(DropReason::AuthFailed);
            return None;
        }
        if p.endpoint != Some(src) {
            tracing::debug!(peer = %p.cfg.name, from = ?p.endpoint, to = %src, "peer roamed");
            p.endpoint = Some(src);
        }
        let verdict = inner_verdict(packet, &p.cfg.allowed_ips, &self.local);
        let delivered = match verdict {
            Ok(n) => n,
            Err(why) => {
                p.tunn.note_received(session.receiving_index(), 0);
                self.drop_packet(why);
                return None;
            }
        };
        p.tunn.note_received(session.receiving_index(), delivered);
        if delivered > 0 {
            p.rx_packets += 1;
            p.rx_bytes += delivered as u64;
        }
        Self::track_handshake(p);
        Some(delivered)
    }

    /// A UDP datagram from the network. A data message that decrypts and
    /// passes cryptokey routing is opened into `tun` (which must hold
    /// `datagram.len()` bytes) and its length returned; handshake answers
    /// and packets queued for a new session go to `out`.
    pub fn handle_network(
        &mut self,
        src: SocketAddr,
        datagram: &[u8],
        out: &mut Datagrams,
        tun: &mut [u8],
    ) -> Option<usize> {
        let packet = match Tunn::parse_incoming_packet(datagram) {
            Ok(p) => p,
            Err(_) => {
                self.drop_packet(DropReason::Garbage);
                return None;
            }
        };
        // What a successful first decapsulate result proves; see the
        // module doc on roaming.
        let kind = match &packet {
            Packet::HandshakeInit(_) | Packet::HandshakeResponse(_) => Authenticates::Handshake,
            Packet::PacketData(_) => Authenticates::Data,
            Packet::PacketCookieReply(_) => Authenticates::Nothing,
        };
        if kind == Authenticates::Handshake {
            // MAC1 and the load check, once per handshake message, before
            // any Diffie-Hellman.
            let mut cookie = [0u8; 64];
            match self
                .limiter
                .verify_packet(Some(src.ip()), datagram, &mut cookie)
            {
                Ok(_) => {}
                Err(TunnResult::WriteToNetwork(c)) => {
                    out.push(src, c);
                    self.drop_packet(DropReason::UnderLoad);
                    return None;
                }
                Err(_) => {
                    self.drop_packet(DropReason::AuthFailed);
                    return None;
                }
            }
        }
        let slot = match packet {
            Packet::HandshakeInit(init) => {
                match parse_handshake_anon(&self.secret, &self.public, &init) {
                    Ok(half) => match self.by_key.get(&half.peer_static_public) {
                        Some(s) => *s,
                        None => {
                            self.drop_packet(DropReason::UnknownPeer);
                            return None;
                        }
                    },
                    Err(_) => {
                        self.drop_packet(DropReason::AuthFailed);
                        return None;
                    }
                }
            }
            Packet::HandshakeResponse(r) => r.receiver_idx >> 8,
            Packet::PacketCookieReply(c) => c.receiver_idx >> 8,
            Packet::PacketData(d) => d.receiver_idx >> 8,
        };
        let Some(p) = self.peers.get_mut(&slot) else {
            self.drop_packet(DropReason::UnknownPeer);
            return None;
        };
        let mut authenticated = false;
        let mut drop = None;
        let mut delivered = None;
        let mut first = true;
        loop {
            let input: &[u8] = if first { datagram } else { &[] };
            let was_first = std::mem::replace(&mut first, false);
            // The datagram opens straight into `tun`; what follows it (the
            // queue flushed after a handshake) is sealed in scratch space.
            let dst: &mut [u8] = if was_first { tun } else { &mut self.buf };
            match p.tunn.decapsulate(Some(src.ip()), input, dst) {
                TunnResult::Done => {
                    // First call: a keepalive that decrypted, or a cookie
                    // reply taken. Later calls: the queue is empty.
                    authenticated |= was_first && kind == Authenticates::Data;
                    break;
                }
                TunnResult::Err(WireGuardError::UnderLoad) => {
                    drop = Some(DropReason::UnderLoad);
                    break;
                }
                TunnResult::Err(e) => {
                    tracing::trace!(peer = %p.cfg.name, error = ?e, "decapsulate failed");
                    drop = Some(DropReason::AuthFailed);
                    break;
                }
                TunnResult::WriteToNetwork(b) => {
                    // First call: the answer to a verified handshake
                    // message (the Tunn's limiter never sends cookies).
                    // Later calls: packets queued while the handshake was
                    // pending, flushed.
                    authenticated |= was_first && kind == Authenticates::Handshake;
                    out.push(src, b);
                }
                TunnResult::WriteToTunnelV4(b, inner_src) => {
                    authenticated |= was_first && kind == Authenticates::Data;
                    if !p.cfg.allowed_ips.iter().any(|n| n.contains(&inner_src)) {
                        drop = Some(DropReason::SourceNotAllowed);
                    } else if !ipv4_dst(b)
                        .is_some_and(|d| self.local.iter().any(|n| n.contains(&d)))
                    {
                        drop = Some(DropReason::DestinationNotAllowed);
                    } else {
                        p.rx_packets += 1;
                        p.rx_bytes += b.len() as u64;
                        // boringtun opens at the start of the buffer given.
                        delivered = Some(b.len());
                    }
                    break;
                }
                TunnResult::WriteToTunnelV6(..) => {
                    authenticated |= was_first && kind == Authenticates::Data;
                    drop = Some(DropReason::NotIpv4);
                    break;
                }
            }
        }
        if authenticated && p.endpoint != Some(src) {
            // Roaming: follow the peer's latest authenticated address.
            tracing::debug!(peer = %p.cfg.name, from = ?p.endpoint, to = %src, "peer roamed");
            p.endpoint = Some(src);
        }
        Self::track_handshake(p);
        if let Some(why) = drop {
            self.drop_packet(why);
        }
        delivered
    }

    fn track_handshake(p: &mut Peer) {
        let age = p.tunn.time_since_last_handshake();
        if let (Some(new), old) = (age, p.last_handshake_age)
            && old.is_none_or(|o| new < o)
        {
            p.handshakes += 1;
        }
        p.last_handshake_age = age;
    }

    /// Drives WireGuard's timers (handshake retries, rekeys, keepalives).
    /// Call every 250 ms or so; also resets the rate limiter's window.
    pub fn handle_timers(&mut self, out: &mut Datagrams) {
        for p in self.peers.values_mut() {
            match p.tunn.update_timers(&mut self.buf) {
                TunnResult::WriteToNetwork(b) => {
                    if let Some(ep) = p.endpoint {
                        out.push(ep, b);
                    }
                }
                TunnResult::Err(WireGuardError::ConnectionExpired) => {}
                TunnResult::Err(e) => {
                    tracing::trace!(peer = %p.cfg.name, error = ?e, "timer error")
                }
                TunnResult::Done
                | TunnResult::WriteToTunnelV4(..)
                | TunnResult::WriteToTunnelV6(..) => {}
            }
            Self::track_handshake(p);
        }
    }

    /// Resets the handshake rate limiter's counting window (call each second).
    pub fn reset_rate_limiter(&self) {
        self.limiter.reset_count();
    }

    /// Every peer's state, in name order.
    pub fn peers(&self) -> Vec<PeerInfo> {
        let now = SystemTime::now();
        self.by_name
            .values()
            .filter_map(|slot| self.peers.get(slot))
            .map(|p| PeerInfo {
                name: p.cfg.name.clone(),
                public_key: p.cfg.public_key,
                preshared_key: p.cfg.preshared_key,
                endpoint: p.endpoint,
                allowed_ips: p.cfg.allowed_ips.clone(),
                last_handshake: p
                    .tunn
                    .time_since_last_handshake()
                    .and_then(|d| now.checked_sub(d)),
                rx_bytes: p.rx_bytes,
                tx_bytes: p.tx_bytes,
                rx_packets: p.rx_packets,
                tx_packets: p.tx_packets,
                handshakes: p.handshakes,
            })
            .collect()
    }
}

/// What an opened data message carries: `Ok(0)` for a keepalive, else
/// the length of its IPv4 packet once it passes cryptokey routing (inner
/// source in the peer's `allowed`, destination in this gateway's `local`
/// networks), or why it is dropped.
fn inner_verdict(
    packet: &[u8],
    allowed: &[Ipv4Net],
    local: &[Ipv4Net],
) -> Result<usize, DropReason> {
    if packet.is_empty() {
        return Ok(0);
    }
    if packet[0] >> 4 != 4 {
        return Err(if packet[0] >> 4 == 6 {
            DropReason::NotIpv4
        } else {
            DropReason::AuthFailed
        });
    }
    let total = match packet.get(2..4) {
        Some(b) if packet.len() >= 20 => usize::from(u16::from_be_bytes([b[0], b[1]])),
        _ => return Err(DropReason::AuthFailed),
    };
    if total > packet.len() || total < 20 {
        return Err(DropReason::AuthFailed);
    }
    let (Some(src), Some(dst)) = (ipv4_src(packet), ipv4_dst(packet)) else {
        return Err(DropReason::AuthFailed);
    };
    if !allowed.iter().any(|n| n.contains(&src)) {
        return Err(DropReason::SourceNotAllowed);
    }
    if !local.iter().any(|n| n.contains(&dst)) {
        return Err(DropReason::DestinationNotAllowed);
    }
    Ok(total)
}

/// The destination of an IPv4 packet.
pub fn ipv4_dst(packet: &[u8]) -> Option<Ipv4Addr> {
    if packet.len() < 20 || packet[0] >> 4 != 4 {
        return None;
    }
    Some(Ipv4Addr::new(
        packet[16], packet[17], packet[18], packet[19],
    ))
}

/// The source of an IPv4 packet.
pub fn ipv4_src(packet: &[u8]) -> Option<Ipv4Addr> {
    if packet.len() < 20 || packet[0] >> 4 != 4 {
        return None;
    }
    Some(Ipv4Addr::new(
        packet[12], packet[13], packet[14], packet[15],
    ))
}

/// Convenience for tests and callers holding an `IpAddr`.
pub fn as_v4(ip: IpAddr) -> Option<Ipv4Addr> {
    match ip {
        IpAddr::V4(v) => Some(v),
        IpAddr::V6(_) => None,
    }
}

#[cfg(test)]
pub(crate) mod tests;
