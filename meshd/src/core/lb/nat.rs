//! Connection tracking for the balancer: one entry per flow, holding the
//! flow as the client sees it ([`Inside`]: client → VIP:port) and as the
//! backend sees it ([`Outside`]: client or VIP:snat-port → backend:target),
//! with idle timeouts from the NAT behaviour RFCs, SNAT port allocation and
//! per-backend flow counts. Also the short-lived map that lets later IPv4
//! fragments follow their first fragment's translation.
//!
//! Defences against floods, after Linux conntrack: a flow is *assured*
//! once the client answers a reply (a completed TCP handshake); until then
//! it lives [`UNASSURED_IDLE`], and a full table evicts the oldest flow
//! that is not assured (or has closed) to admit a new one. One client
//! address holds at most [`FlowLimits::max_flows_per_source`] flows. SNAT
//! ports come from a per-backend bitmap in constant time. Every count the
//! metrics need is kept as flows come and go.
//!
//! Must not: choose backends, touch packets, or read the clock — `now` is
//! passed in.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::packet::{Proto, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};
use super::table::Backend;

/// RFC 5382 (NAT behaviour for TCP) REQ-5: the "established connection
/// idle-timeout" MUST NOT be less than 2 hours 4 minutes.
pub const TCP_ESTABLISHED_IDLE: Duration = Duration::from_secs(2 * 3600 + 4 * 60);
/// RFC 5382 REQ-5: the "transitory connection idle-timeout" (connections
/// not yet open in both directions, or closed by FINs both ways or a RST)
/// MUST NOT be less than 4 minutes.
pub const TCP_TRANSITORY_IDLE: Duration = Duration::from_secs(4 * 60);
/// RFC 4787 (NAT behaviour for UDP) REQ-5: a UDP mapping MUST NOT expire
/// in less than 2 minutes, and "a default value of five minutes or more"
/// is RECOMMENDED (REQ-5 c).
///
/// There is no ICMP flow timeout (RFC 5508 REQ-1 would ask ≥ 60 s for ICMP
/// query sessions): meshd answers pings to a VIP itself (SPEC §5), so no
/// echo ever crosses the NAT.
pub const UDP_IDLE: Duration = Duration::from_secs(5 * 60);
/// Source ports for SNAT (local backends): every non-privileged port. The
/// source address is the VIP itself, which only meshd uses, so only
/// uniqueness per (protocol, VIP, backend, target port) matters.
pub const SNAT_PORT_FIRST: u16 = 1024;
/// Tuning: how long a first fragment's translation waits for the rest of
/// its datagram (Linux's `ipfrag_time` default; RFC 791 suggests 15 s for
/// reassembly).
pub const FRAGMENT_IDLE: Duration = Duration::from_secs(30);
/// Idle timeout of a flow that is not *assured* (conntrack's word): no
/// packet from the client has followed a reply yet — a TCP connection
/// whose handshake has not completed, a UDP exchange with no second
/// datagram. Linux conntrack keeps such UDP entries 30 s
/// (`nf_conntrack_udp_timeout`) and half-open TCP 60–120 s; RFC 5382's
/// 4 min "transitory" floor is for connections that did open. A spoofed
/// SYN never completes, so a flood's entries go in 30 s, not 4 min. A
/// client still retrying a SYN after 30 s of silence simply starts a new
/// flow (to the same backend: the hash is of the 5-tuple).
pub const UNASSURED_IDLE: Duration = Duration::from_secs(30);
/// Tuning: fragmented datagrams tracked at most.
pub const MAX_FRAGMENTED: usize = 4096;
/// Number of SNAT source ports (`SNAT_PORT_FIRST..=65535`).
const SNAT_PORTS: usize = 65536 - SNAT_PORT_FIRST as usize;

/// Bounds on what clients can make the flow table hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowLimits {
    /// Flows tracked at most (`meshd --max-flows`). When full, the oldest
    /// flow that is not assured (or already closed) makes room for a new
    /// one — conntrack's "early drop" — so a flood of spoofed SYNs cannot
    /// lock out clients that complete their handshakes. Only when every
    /// flow is assured and open is a new flow refused. ~250 bytes each.
    pub max_flows: usize,
    /// Flows one client address may hold at most
    /// (`meshd --max-flows-per-source`), so that one client cannot fill
    /// the table with connections it completes.
    pub max_flows_per_source: u32,
    /// ClientIP-affinity pins kept at most; the least recently used goes
    /// first.
    pub max_affinities: usize,
}

impl Default for FlowLimits {
    fn default() -> Self {
        FlowLimits {
            max_flows: 1 << 18,
            max_flows_per_source: 1 << 14,
            max_affinities: 1 << 16,
        }
    }
}

/// A transport 5-tuple as it appears in a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FiveTuple {
    pub proto: Proto,
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
}

impl FiveTuple {
    /// The tuple of a packet going the other way.
    pub fn reversed(self) -> FiveTuple {
        FiveTuple {
            proto: self.proto,
            src: self.dst,
            dst: self.src,
        }
    }

    /// Bytes for hashing.
    pub fn to_bytes(self) -> [u8; 13] {
        let mut b = [0u8; 13];
        b[0] = self.proto.number();
        b[1..5].copy_from_slice(&self.src.ip().octets());
        b[5..7].copy_from_slice(&self.src.port().to_be_bytes());
        b[7..11].copy_from_slice(&self.dst.ip().octets());
        b[11..13].copy_from_slice(&self.dst.port().to_be_bytes());
        b
    }
}

/// A flow as the client sends it: client → VIP:port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Inside(pub FiveTuple);

/// The same flow as the backend receives it: client (remote backend) or
/// VIP:snat-port (local backend) → backend:target-port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Outside(pub FiveTuple);

/// Where a flow's backend is, which decides the translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Another cluster: DNAT only; replies come back through the tunnel.
    Remote,
    /// This cluster: DNAT and SNAT to the VIP; replies come from the TUN.
    Local,
}

/// One tracked flow.
#[derive(Debug, Clone)]
pub struct Flow {
    pub inside: Inside,
    pub outside: Outside,
    pub path: Path,
    pub backend: Arc<Backend>,
    /// `namespace/name` of the service.
    pub service: Arc<str>,
    /// Whether the service has ClientIP affinity (refreshed on use).
    pub affinity: bool,
    last_seen: Instant,
    /// Set by [`NatTable::insert`]: tells this flow from a later one with
    /// the same tuple in the eviction queue.
    serial: u64,
    reply_seen: bool,
    /// A client packet (not a SYN) followed a reply: the flow is real.
    assured: bool,
    fin_out: bool,
    fin_in: bool,
    rst: bool,
}

impl Flow {
    /// A new flow, seen first at `now`.
    pub fn new(
        inside: Inside,
        outside: Outside,
        path: Path,
        backend: Arc<Backend>,
        service: Arc<str>,
        affinity: bool,
        now: Instant,
    ) -> Flow {
        Flow {
            inside,
            outside,
            path,
            backend,
            service,
            affinity,
            last_seen: now,
            serial: 0,
            reply_seen: false,
            assured: false,
            fin_out: false,
            fin_in: false,
            rst: false,
        }
    }

    /// The idle timeout for the flow's current state.
    pub fn idle_timeout(&self) -> Duration {
        match self.inside.0.proto {
            Proto::Tcp if self.is_closed() => TCP_TRANSITORY_IDLE,
            _ if !self.assured => UNASSURED_IDLE,
            Proto::Udp => UDP_IDLE,
            Proto::Tcp => TCP_ESTABLISHED_IDLE,
        }
    }

    /// When the flow expires if nothing more is seen.
    pub fn expires(&self) -> Instant {
        self.last_seen + self.idle_timeout()
    }

    fn expired(&self, now: Instant) -> bool {
        now >= self.expires()
    }

    /// A TCP connection finished by FINs both ways or by a reset.
    pub fn is_closed(&self) -> bool {
        self.rst || (self.fin_in && self.fin_out)
    }

    /// Whether the backend has answered yet.
    pub fn is_answered(&self) -> bool {
        self.reply_seen
    }

    /// Whether the client has answered a reply (see [`UNASSURED_IDLE`]).
    pub fn is_assured(&self) -> bool {
        self.assured
    }

    /// Whether the flow may make room for a new one when the table is
    /// full: never assured, or finished.
    fn evictable(&self) -> bool {
        !self.assured || self.is_closed()
    }

    /// A packet from the client (`flags`: TCP flags, 0 for UDP).
    pub fn seen_outbound(&mut self, flags: u8, now: Instant) {
        self.last_seen = now;
        self.assured |= self.reply_seen && !is_syn(flags);
        self.fin_out |= flags & TCP_FIN != 0;
        self.rst |= flags & TCP_RST != 0;
    }

    /// A packet from the backend.
    pub fn seen_reply(&mut self, flags: u8, now: Instant) {
        self.last_seen = now;
        self.reply_seen = true;
        self.fin_in |= flags & TCP_FIN != 0;
        self.rst |= flags & TCP_RST != 0;
    }
}

/// Whether TCP `flags` open a new connection (SYN without ACK).
pub fn is_syn(flags: u8) -> bool {
    flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// Whether a packet opens a call: any UDP datagram, a TCP SYN.
pub fn opens_call(proto: Proto, flags: u8) -> bool {
    proto == Proto::Udp || is_syn(flags)
}

/// Why a flow could not be added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsertError {
    /// Another live flow already has this outside tuple.
    Collision,
    /// [`FlowLimits::max_flows`] reached and every flow is assured.
    Full,
    /// The client holds [`FlowLimits::max_flows_per_source`] flows.
    SourceLimit,
}

/// SNAT ports in use towards one (protocol, VIP, backend address): a
/// bitmap of 1008 words with a 16-word summary of the full ones, so that
/// finding a free port costs at most 17 word scans however many are
/// taken (~8 KiB, only while a flow uses the key).
#[derive(Debug)]
struct PortSet {
    used: u32,
    words: Box<[u64]>,
    /// Bit `w` set: `words[w]` is full. Bits past the last word are set.
    full: [u64; SUMMARY_WORDS],
}

const PORT_WORDS: usize = SNAT_PORTS / 64;
const SUMMARY_WORDS: usize = PORT_WORDS.div_ceil(64);
const _: () = assert!(
    SNAT_PORTS.is_multiple_of(64),
    "the port bitmap has whole words"
);

impl PortSet {
    fn new() -> PortSet {
        let mut full = [0u64; SUMMARY_WORDS];
        for w in PORT_WORDS..SUMMARY_WORDS * 64 {
            full[w / 64] |= 1 << (w % 64);
        }
        PortSet {
            used: 0,
            words: vec![0u64; PORT_WORDS].into_boxed_slice(),
            full,
        }
    }

    fn index(port: u16) -> Option<(usize, u32)> {
        let i = usize::from(port.checked_sub(SNAT_PORT_FIRST)?);
        Some((i / 64, (i % 64) as u32))
    }

    fn contains(&self, port: u16) -> bool {
        Self::index(port).is_some_and(|(w, b)| self.words[w] & (1 << b) != 0)
    }

    fn insert(&mut self, port: u16) {
        let Some((w, b)) = Self::index(port) else {
            return;
        };
        if self.words[w] & (1 << b) == 0 {
            self.words[w] |= 1 << b;
            self.used += 1;
            if self.words[w] == u64::MAX {
                self.full[w / 64] |= 1 << (w % 64);
            }
        }
    }

    fn remove(&mut self, port: u16) {
        let Some((w, b)) = Self::index(port) else {
            return;
        };
        if self.words[w] & (1 << b) != 0 {
            self.words[w] &= !(1 << b);
            self.used -= 1;
            self.full[w / 64] &= !(1 << (w % 64));
        }
    }

    /// The first free port at or after the port with index `start`,
    /// wrapping around.
    fn first_free(&self, start: usize) -> Option<u16> {
        let start = start % SNAT_PORTS;
        let (w0, b0) = (start / 64, start % 64);
        let port = |w: usize, bits: u64| {
            let i = w * 64 + bits.trailing_zeros() as usize;
            SNAT_PORT_FIRST + u16::try_from(i).expect("a port index is below 64512")
        };
        let here = !self.words[w0] & (u64::MAX << b0);
        if here != 0 {
            return Some(port(w0, here));
        }
        // The next word that is not full after w0, then from the first
        // word round to w0 itself (whose low bits were not looked at).
        let next_open = |from: usize, to: usize| {
            let mut w = from;
            while w < to {
                let s = w / 64;
                let open = !self.full[s] & (u64::MAX << (w % 64));
                if open == 0 {
                    w = (s + 1) * 64;
                    continue;
                }
                let found = s * 64 + open.trailing_zeros() as usize;
                return (found < to).then_some(found);
            }
            None
        };
        let w = next_open(w0 + 1, PORT_WORDS).or_else(|| next_open(0, w0 + 1))?;
        Some(port(w, !self.words[w]))
    }
}

type SnatKey = (Proto, Ipv4Addr, SocketAddrV4);

fn snat_key(f: &Flow) -> Option<(SnatKey, u16)> {
    (f.path == Path::Local).then(|| {
        let o = f.outside.0;
        ((o.proto, *o.src.ip(), o.dst), o.src.port())
    })
}

fn decrement<K: std::hash::Hash + Eq>(map: &mut HashMap<K, u32>, key: K) {
    if let Entry::Occupied(mut e) = map.entry(key) {
        *e.get_mut() -= 1;
        if *e.get() == 0 {
            e.remove();
        }
    }
}

/// The flow table.
#[derive(Debug)]
pub struct NatTable {
    limits: FlowLimits,
    /// A client address without the per-source cap: the gateway's own,
    /// whose NodePort relay opens a flow for every outside client.
    relay: Option<Ipv4Addr>,
    flows: HashMap<Inside, Flow>,
    by_outside: HashMap<Outside, Inside>,
    /// Live flows per (VIP, backend IP), for bounded-load balancing.
    load: HashMap<(Ipv4Addr, Ipv4Addr), u32>,
    /// Live flows per VIP.
    vip_load: HashMap<Ipv4Addr, u32>,
    /// Flows per client address.
    sources: HashMap<Ipv4Addr, u32>,
    /// Flows per service, for metrics.
    services: HashMap<Arc<str>, u32>,
    /// SNAT ports in use, for flows to local backends.
    snat: HashMap<SnatKey, PortSet>,
    /// Flows that may be evicted, oldest first: every flow when inserted
    /// (not yet assured) and again when it closes. Entries whose flow has
    /// gone or became assured are skipped when met and dropped by
    /// [`NatTable::compact`].
    evictable: VecDeque<(Inside, u64)>,
    next_serial: u64,
    evicted: u64,
}

impl Default for NatTable {
    fn default() -> Self {
        NatTable::new(FlowLimits::default())
    }
}

impl NatTable {
    /// An empty table with these bounds.
    pub fn new(limits: FlowLimits) -> NatTable {
        NatTable {
            limits,
            relay: None,
            flows: HashMap::new(),
            by_outside: HashMap::new(),
            load: HashMap::new(),
            vip_load: HashMap::new(),
            sources: HashMap::new(),
            services: HashMap::new(),
            snat: HashMap::new(),
            evictable: VecDeque::new(),
            next_serial: 0,
            evicted: 0,
        }
    }

    /// Exempts `ip` (the gateway's own address) from the per-source cap.
    pub fn with_relay(mut self, ip: Option<Ipv4Addr>) -> NatTable {
        self.relay = ip;
        self
    }

    /// Number of flows (some may have expired but not been swept yet).
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// Whether no flow is tracked.
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// Flows evicted to make room for new ones since start.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Flows in the table per service.
    pub fn service_flows(&self) -> &HashMap<Arc<str>, u32> {
        &self.services
    }

    /// The live flow a client packet belongs to; an expired one is removed.
    pub fn get(&mut self, inside: &Inside, now: Instant) -> Option<&Flow> {
        if self.flows.get(inside)?.expired(now) {
            self.remove(inside);
            return None;
        }
        self.flows.get(inside)
    }

    /// A client packet of a live flow: updates its state and returns it.
    /// A SYN on a finished TCP connection opens a new one: the old flow is
    /// removed and `None` returned.
    pub fn outbound(&mut self, inside: &Inside, flags: u8, now: Instant) -> Option<&Flow> {
        let f = self.get(inside, now)?;
        if f.inside.0.proto == Proto::Tcp && f.is_closed() && is_syn(flags) {
            self.remove(inside);
            return None;
        }
        self.seen(inside, |f| f.seen_outbound(flags, now))
    }

    /// A backend's packet (`reply`, as on the wire) answering a live flow
    /// on `path`: updates the flow's state and returns it.
    pub fn reply(
        &mut self,
        reply: FiveTuple,
        path: Path,
        flags: u8,
        now: Instant,
    ) -> Option<&Flow> {
        let inside = self.by_outside(&Outside(reply.reversed()), now)?.inside;
        if self.flows.get(&inside)?.path != path {
            return None;
        }
        self.seen(&inside, |f| f.seen_reply(flags, now))
    }

    /// Applies a packet to a flow; a flow that closes with it joins the
    /// eviction queue.
    fn seen(&mut self, inside: &Inside, update: impl FnOnce(&mut Flow)) -> Option<&Flow> {
        let f = self.flows.get_mut(inside)?;
        let was = f.evictable();
        update(f);
        if !was && f.evictable() {
            self.evictable.push_back((f.inside, f.serial));
            self.compact();
        }
        self.flows.get(inside)
    }

    /// The live flow with this outside tuple.
    pub fn by_outside(&mut self, outside: &Outside, now: Instant) -> Option<&Flow> {
        let inside = *self.by_outside.get(outside)?;
        self.get(&inside, now)
    }

    /// Removes the flow (live or lingering) whose outside tuple this is.
    pub fn remove_outside(&mut self, outside: &Outside) -> Option<Flow> {
        let inside = *self.by_outside.get(outside)?;
        self.remove(&inside)
    }

    /// Whether a live flow holds this outside tuple.
    pub fn outside_taken(&self, outside: &Outside, now: Instant) -> bool {
        self.by_outside
            .get(outside)
            .and_then(|i| self.flows.get(i))
            .is_some_and(|f| !f.expired(now))
    }

    /// Live flows to `backend` of `vip`.
    pub fn load(&self, vip: Ipv4Addr, backend: Ipv4Addr) -> u32 {
        self.load.get(&(vip, backend)).copied().unwrap_or(0)
    }

    /// Live flows to `vip`.
    pub fn vip_load(&self, vip: Ipv4Addr) -> u32 {
        self.vip_load.get(&vip).copied().unwrap_or(0)
    }

    /// A free SNAT source port for a flow from `vip` to `backend`: the
    /// client's own port when free (like Linux NAT, easier to debug), else
    /// the first free one from `start` on, in constant time. `None` when
    /// all are taken. A port stays taken until its flow is swept, at most
    /// a sweep interval after it expired.
    pub fn alloc_snat_port(
        &self,
        proto: Proto,
        vip: Ipv4Addr,
        backend: SocketAddrV4,
        preferred: u16,
        start: u64,
    ) -> Option<u16> {
        let Some(set) = self.snat.get(&(proto, vip, backend)) else {
            return Some(if preferred >= SNAT_PORT_FIRST {
                preferred
            } else {
                SNAT_PORT_FIRST + (start % SNAT_PORTS as u64) as u16
            });
        };
        if preferred >= SNAT_PORT_FIRST && !set.contains(preferred) {
            return Some(preferred);
        }
        set.first_free((start % SNAT_PORTS as u64) as usize)
    }

    /// Adds a flow. An expired flow holding the same inside or outside
    /// tuple is removed first; when the table is full, the oldest
    /// evictable flow makes room (see [`FlowLimits::max_flows`]).
    pub fn insert(&mut self, mut flow: Flow, now: Instant) -> Result<(), InsertError> {
        if self.outside_taken(&flow.outside, now) {
            return Err(InsertError::Collision);
        }
        if let Some(old) = self.by_outside.get(&flow.outside).copied() {
            self.remove(&old);
        }
        self.remove(&flow.inside);
        let src = *flow.inside.0.src.ip();
        if self.relay != Some(src)
            && self.sources.get(&src).copied().unwrap_or(0) >= self.limits.max_flows_per_source
        {
            return Err(InsertError::SourceLimit);
        }
        if self.flows.len() >= self.limits.max_flows && !self.evict_one(now) {
            return Err(InsertError::Full);
        }
        self.next_serial += 1;
        flow.serial = self.next_serial;
        let (vip, backend) = (*flow.inside.0.dst.ip(), *flow.outside.0.dst.ip());
        *self.load.entry((vip, backend)).or_default() += 1;
        *self.vip_load.entry(vip).or_default() += 1;
        *self.sources.entry(src).or_default() += 1;
        *self.services.entry(flow.service.clone()).or_default() += 1;
        if let Some((key, port)) = snat_key(&flow) {
            self.snat
                .entry(key)
                .or_insert_with(PortSet::new)
                .insert(port);
        }
        if flow.evictable() {
            self.evictable.push_back((flow.inside, flow.serial));
        }
        self.by_outside.insert(flow.outside, flow.inside);
        self.flows.insert(flow.inside, flow);
        self.compact();
        Ok(())
    }

    /// Removes the oldest evictable (or expired) flow; `false` if there is
    /// none. Amortised constant time: each queue entry is met once.
    fn evict_one(&mut self, now: Instant) -> bool {
        while let Some((inside, serial)) = self.evictable.pop_front() {
            let Some(f) = self.flows.get(&inside) else {
                continue;
            };
            if f.serial == serial && (f.evictable() || f.expired(now)) {
                self.remove(&inside);
                self.evicted += 1;
                return true;
            }
        }
        false
    }

    /// Drops queue entries of flows that went or became assured, once
    /// they outnumber the flows (amortised constant time per insert).
    fn compact(&mut self) {
        if self.evictable.len() <= 2 * self.flows.len() + 1024 {
            return;
        }
        let flows = &self.flows;
        self.evictable.retain(|(inside, serial)| {
            flows
                .get(inside)
                .is_some_and(|f| f.serial == *serial && f.evictable())
        });
    }

    /// Removes a flow (freeing its SNAT port).
    pub fn remove(&mut self, inside: &Inside) -> Option<Flow> {
        let flow = self.flows.remove(inside)?;
        self.by_outside.remove(&flow.outside);
        let (vip, backend) = (*flow.inside.0.dst.ip(), *flow.outside.0.dst.ip());
        decrement(&mut self.load, (vip, backend));
        decrement(&mut self.vip_load, vip);
        decrement(&mut self.sources, *flow.inside.0.src.ip());
        decrement(&mut self.services, flow.service.clone());
        if let Some((key, port)) = snat_key(&flow)
            && let Entry::Occupied(mut e) = self.snat.entry(key)
        {
            e.get_mut().remove(port);
            if e.get().used == 0 {
                e.remove();
            }
        }
        Some(flow)
    }

    /// Keeps only the flows for which `keep` holds; returns how many went.
    pub fn retain(&mut self, mut keep: impl FnMut(&Flow) -> bool) -> usize {
        // Collect first: removal also updates the side maps. The order of
        // `gone` does not matter (each removal is independent).
        let gone: Vec<Inside> = self
            .flows
            .values()
            .filter(|f| !keep(f))
            .map(|f| f.inside)
            .collect();
        for i in &gone {
            self.remove(i);
        }
        self.compact();
        gone.len()
    }

    /// Removes every flow that expired by `now`; returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        self.retain(|f| !f.expired(now))
    }
}

/// How the later fragments of a datagram are translated: the first
/// fragment's new addresses and where it went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FragTranslation<V> {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub verdict: V,
    last_seen: Instant,
}

/// Identifies a datagram's fragments (RFC 791: source, destination,
/// protocol, identification), as they arrived.
pub type FragKey = (Ipv4Addr, Ipv4Addr, u8, u16);

/// Translations of fragmented datagrams whose first fragment was seen.
#[derive(Debug)]
pub struct FragTable<V> {
    map: HashMap<FragKey, FragTranslation<V>>,
}

impl<V> Default for FragTable<V> {
    fn default() -> Self {
        FragTable {
            map: HashMap::new(),
        }
    }
}

impl<V: Copy> FragTable<V> {
    /// Records the translation of a first fragment.
    pub fn insert(&mut self, key: FragKey, src: Ipv4Addr, dst: Ipv4Addr, verdict: V, now: Instant) {
        if self.map.len() >= MAX_FRAGMENTED && !self.map.contains_key(&key) {
            return;
        }
        self.map.insert(
            key,
            FragTranslation {
                src,
                dst,
                verdict,
                last_seen: now,
            },
        );
    }

    /// The translation for a later fragment, if its first one was seen.
    pub fn get(&mut self, key: &FragKey, now: Instant) -> Option<FragTranslation<V>> {
        let t = self.map.get_mut(key)?;
        if now >= t.last_seen + FRAGMENT_IDLE {
            self.map.remove(key);
            return None;
        }
        t.last_seen = now;
        Some(*t)
    }

    /// Forgets translations idle for [`FRAGMENT_IDLE`].
    pub fn expire(&mut self, now: Instant) {
        self.map.retain(|_, t| now < t.last_seen + FRAGMENT_IDLE);
    }

    /// Whether no datagram is tracked.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    fn backend(ip: &str) -> Arc<Backend> {
        Arc::new(Backend::new(
            ip.parse().unwrap(),
            "c1",
            "default",
            "web",
            true,
        ))
    }

    fn flow(client: &str, vip: &str, out_src: &str, out_dst: &str, now: Instant) -> Flow {
        let inside = Inside(FiveTuple {
            proto: Proto::Tcp,
            src: sa(client),
            dst: sa(vip),
        });
        let outside = Outside(FiveTuple {
            proto: Proto::Tcp,
            src: sa(out_src),
            dst: sa(out_dst),
        });
        let b = backend(&out_dst[..out_dst.find(':').unwrap()]);
        Flow::new(
            inside,
            outside,
            Path::Local,
            b,
            "default/web".into(),
            false,
            now,
        )
    }

    #[test]
    fn tcp_timeouts_follow_state() {
        let t0 = Instant::now();
        let mut f = flow(
            "10.1.0.5:4000",
            "100.65.0.10:80",
            "100.65.0.10:4000",
            "10.1.0.9:8080",
            t0,
        );
        assert_eq!(f.expires(), t0 + UNASSURED_IDLE, "opening");
        f.seen_outbound(TCP_SYN, t0);
        f.seen_reply(TCP_SYN | TCP_ACK, t0);
        assert_eq!(f.expires(), t0 + UNASSURED_IDLE, "answered, not assured");
        f.seen_outbound(TCP_SYN, t0);
        assert!(!f.is_assured(), "a retransmitted SYN does not assure");
        f.seen_outbound(TCP_ACK, t0);
        assert!(f.is_assured());
        assert_eq!(f.expires(), t0 + TCP_ESTABLISHED_IDLE, "established");
        f.seen_outbound(TCP_FIN | TCP_ACK, t0);
        assert_eq!(f.expires(), t0 + TCP_ESTABLISHED_IDLE, "half closed");
        f.seen_reply(TCP_FIN | TCP_ACK, t0);
        assert!(f.is_closed());
        assert_eq!(f.expires(), t0 + TCP_TRANSITORY_IDLE, "closed");
    }

    #[test]
    fn snat_ports_are_unique_per_backend_and_freed_on_removal() {
        let t0 = Instant::now();
        let mut t = NatTable::default();
        let f1 = flow(
            "10.1.0.5:4000",
            "100.65.0.10:80",
            "100.65.0.10:4000",
            "10.1.0.9:8080",
            t0,
        );
        t.insert(f1.clone(), t0).unwrap();
        let vip = Ipv4Addr::new(100, 65, 0, 10);
        // Another client with the same port to the same backend: not 4000.
        let p = t
            .alloc_snat_port(Proto::Tcp, vip, sa("10.1.0.9:8080"), 4000, 7)
            .unwrap();
        assert_ne!(p, 4000);
        // To another backend, 4000 is free.
        assert_eq!(
            t.alloc_snat_port(Proto::Tcp, vip, sa("10.1.0.8:8080"), 4000, 7),
            Some(4000)
        );
        // Same outside tuple again collides.
        let f2 = flow(
            "10.1.0.6:4000",
            "100.65.0.10:80",
            "100.65.0.10:4000",
            "10.1.0.9:8080",
            t0,
        );
        assert_eq!(t.insert(f2.clone(), t0), Err(InsertError::Collision));
        assert_eq!(t.load(vip, "10.1.0.9".parse().unwrap()), 1);
        t.remove(&f1.inside);
        assert_eq!(t.load(vip, "10.1.0.9".parse().unwrap()), 0);
        assert_eq!(
            t.alloc_snat_port(Proto::Tcp, vip, sa("10.1.0.9:8080"), 4000, 7),
            Some(4000)
        );
        // An expired flow holds its port until the sweep.
        t.insert(f2, t0).unwrap();
        let later = t0 + UNASSURED_IDLE;
        assert_ne!(
            t.alloc_snat_port(Proto::Tcp, vip, sa("10.1.0.9:8080"), 4000, 7),
            Some(4000)
        );
        assert_eq!(t.expire(later), 1);
        assert!(t.is_empty());
        assert_eq!(t.vip_load(vip), 0);
        assert_eq!(
            t.alloc_snat_port(Proto::Tcp, vip, sa("10.1.0.9:8080"), 4000, 7),
            Some(4000)
        );
        assert!(t.snat.is_empty(), "a port set lives only while used");
    }

    #[test]
    fn every_snat_port_is_found_and_exhaustion_is_reported() {
        let mut set = PortSet::new();
        // Fill every port, always asking from a different start.
        for i in 0..SNAT_PORTS {
            let p = set.first_free(i * 7919).expect("a port is free");
            assert!(!set.contains(p));
            set.insert(p);
        }
        assert_eq!(set.used as usize, SNAT_PORTS);
        assert_eq!(set.first_free(0), None);
        assert_eq!(set.first_free(12_345), None);
        // One freed port is found from any start, wrapping round.
        for freed in [SNAT_PORT_FIRST, 40_000, u16::MAX] {
            set.remove(freed);
            for start in [0, 1, 30_000, SNAT_PORTS - 1] {
                assert_eq!(set.first_free(start), Some(freed), "start {start}");
            }
            set.insert(freed);
        }
        // Below the SNAT range nothing is tracked.
        set.insert(80);
        assert!(!set.contains(80));
    }

    fn client_flow(client: &str, now: Instant) -> Flow {
        let mut f = flow(client, "100.65.0.10:80", client, "10.2.0.9:8080", now);
        f.path = Path::Remote;
        f
    }

    fn assure(t: &mut NatTable, f: &Flow, now: Instant) {
        let reply = f.outside.0.reversed();
        assert!(
            t.reply(reply, Path::Remote, TCP_SYN | TCP_ACK, now)
                .is_some()
        );
        let f = t.outbound(&f.inside, TCP_ACK, now).unwrap();
        assert!(f.is_assured());
    }

    #[test]
    fn a_full_table_evicts_the_oldest_unassured_flow_never_an_assured_one() {
        let t0 = Instant::now();
        let limits = FlowLimits {
            max_flows: 4,
            ..FlowLimits::default()
        };
        let mut t = NatTable::new(limits);
        let flows: Vec<Flow> = (0..6)
            .map(|i| client_flow(&format!("10.1.0.{}:4000", i + 1), t0))
            .collect();
        for f in &flows[..4] {
            t.insert(f.clone(), t0).unwrap();
        }
        // Flows 0 and 2 complete their handshakes.
        assure(&mut t, &flows[0], t0);
        assure(&mut t, &flows[2], t0);
        // Two newcomers push out the unassured 1 and 3, oldest first.
        t.insert(flows[4].clone(), t0).unwrap();
        assert!(t.get(&flows[1].inside, t0).is_none());
        assert!(t.get(&flows[3].inside, t0).is_some());
        t.insert(flows[5].clone(), t0).unwrap();
        assert!(t.get(&flows[3].inside, t0).is_none());
        assert_eq!(t.evicted(), 2);
        assert_eq!(t.len(), 4);
        // 4 and 5 assured too: now the table is full for real.
        assure(&mut t, &flows[4], t0);
        assure(&mut t, &flows[5], t0);
        let extra = client_flow("10.1.0.99:4000", t0);
        assert_eq!(t.insert(extra.clone(), t0), Err(InsertError::Full));
        // A connection that closes makes room again.
        t.outbound(&flows[0].inside, TCP_RST, t0).unwrap();
        t.insert(extra, t0).unwrap();
        assert!(t.get(&flows[0].inside, t0).is_none());
        assert_eq!(t.evicted(), 3);
        for i in [2, 4, 5] {
            assert!(t.get(&flows[i].inside, t0).is_some(), "assured flow {i}");
        }
    }

    #[test]
    fn unassured_flows_go_in_seconds_and_the_queue_stays_bounded() {
        let t0 = Instant::now();
        let mut t = NatTable::default();
        // A flood of one-packet flows, then one real connection.
        for i in 0..5000u32 {
            let ip = Ipv4Addr::from(0x0a01_0000 + i);
            let f = client_flow(&format!("{ip}:1234"), t0);
            t.insert(f, t0).unwrap();
        }
        let real = client_flow("10.9.0.1:5555", t0);
        t.insert(real.clone(), t0).unwrap();
        assure(&mut t, &real, t0);
        assert_eq!(t.expire(t0 + UNASSURED_IDLE), 5000);
        assert_eq!(t.len(), 1);
        // Churn never lets the eviction queue outgrow the table.
        for round in 0..20u32 {
            let now = t0 + UNASSURED_IDLE * (round + 2);
            for i in 0..1000u32 {
                let ip = Ipv4Addr::from(0x0b00_0000 + round * 1000 + i);
                t.insert(client_flow(&format!("{ip}:1"), now), now).unwrap();
            }
            t.expire(now + UNASSURED_IDLE);
            assert!(t.evictable.len() <= 2 * t.len() + 1024 + 1);
        }
        assert!(t.get(&real.inside, t0 + UNASSURED_IDLE).is_some());
    }

    #[test]
    fn one_source_gets_only_its_share() {
        let t0 = Instant::now();
        let limits = FlowLimits {
            max_flows_per_source: 3,
            ..FlowLimits::default()
        };
        let mut t = NatTable::new(limits);
        for port in 1..=3 {
            t.insert(client_flow(&format!("10.1.0.5:{port}"), t0), t0)
                .unwrap();
        }
        let fourth = client_flow("10.1.0.5:4", t0);
        assert_eq!(t.insert(fourth.clone(), t0), Err(InsertError::SourceLimit));
        t.insert(client_flow("10.1.0.6:4", t0), t0).unwrap();
        t.expire(t0 + UNASSURED_IDLE);
        t.insert(fourth, t0 + UNASSURED_IDLE).unwrap();
        assert_eq!(t.service_flows()["default/web"], 1);
        // The gateway's own address (the NodePort relay) has no cap.
        let mut t = NatTable::new(limits).with_relay(Some(Ipv4Addr::new(10, 1, 0, 5)));
        for port in 1..=10 {
            t.insert(client_flow(&format!("10.1.0.5:{port}"), t0), t0)
                .unwrap();
        }
    }

    #[test]
    fn fragments_expire() {
        let t0 = Instant::now();
        let mut f: FragTable<u8> = FragTable::default();
        let k = (Ipv4Addr::new(1, 1, 1, 1), Ipv4Addr::new(2, 2, 2, 2), 17, 9);
        f.insert(
            k,
            Ipv4Addr::new(3, 3, 3, 3),
            Ipv4Addr::new(4, 4, 4, 4),
            1,
            t0,
        );
        assert_eq!(
            f.get(&k, t0 + Duration::from_secs(1)).map(|t| t.verdict),
            Some(1)
        );
        f.expire(t0 + Duration::from_secs(1) + FRAGMENT_IDLE);
        assert!(f.is_empty());
    }
}
