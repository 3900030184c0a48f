//! Connection tracking for the balancer: one entry per flow, holding the
//! flow as the client sees it ([`Inside`]: client → VIP:port) and as the
//! backend sees it ([`Outside`]: client or VIP:snat-port → backend:target),
//! with idle timeouts from the NAT behaviour RFCs, SNAT port allocation and
//! per-backend flow counts. Also the short-lived map that lets later IPv4
//! fragments follow their first fragment's translation.
//!
//! Must not: choose backends, touch packets, or read the clock — `now` is
//! passed in.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
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
/// Tuning: flows tracked at most (a flood of new flows beyond this is
/// dropped rather than growing without bound; ~200 bytes each).
pub const MAX_FLOWS: usize = 1 << 18;
/// Tuning: fragmented datagrams tracked at most.
pub const MAX_FRAGMENTED: usize = 4096;

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
    reply_seen: bool,
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
            reply_seen: false,
            fin_out: false,
            fin_in: false,
            rst: false,
        }
    }

    /// The idle timeout for the flow's current state.
    pub fn idle_timeout(&self) -> Duration {
        match self.inside.0.proto {
            Proto::Udp => UDP_IDLE,
            Proto::Tcp if self.reply_seen && !self.is_closed() => TCP_ESTABLISHED_IDLE,
            Proto::Tcp => TCP_TRANSITORY_IDLE,
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

    /// A packet from the client (`flags`: TCP flags, 0 for UDP).
    pub fn seen_outbound(&mut self, flags: u8, now: Instant) {
        self.last_seen = now;
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

/// Why a flow could not be added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsertError {
    /// Another live flow already has this outside tuple.
    Collision,
    /// [`MAX_FLOWS`] reached.
    Full,
}

/// The flow table.
#[derive(Debug, Default)]
pub struct NatTable {
    flows: HashMap<Inside, Flow>,
    by_outside: HashMap<Outside, Inside>,
    /// Live flows per (VIP, backend IP), for bounded-load balancing.
    load: HashMap<(Ipv4Addr, Ipv4Addr), u32>,
    /// Live flows per VIP.
    vip_load: HashMap<Ipv4Addr, u32>,
}

impl NatTable {
    /// Number of flows (some may have expired but not been swept yet).
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// Whether no flow is tracked.
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// The live flow a client packet belongs to; an expired one is removed.
    pub fn get_mut(&mut self, inside: &Inside, now: Instant) -> Option<&mut Flow> {
        if self.flows.get(inside)?.expired(now) {
            self.remove(inside);
            return None;
        }
        self.flows.get_mut(inside)
    }

    /// The live flow a backend's packet (`reply`, as on the wire) answers.
    pub fn by_reply(&mut self, reply: FiveTuple, now: Instant) -> Option<&mut Flow> {
        self.by_outside_mut(&Outside(reply.reversed()), now)
    }

    /// The live flow with this outside tuple.
    pub fn by_outside_mut(&mut self, outside: &Outside, now: Instant) -> Option<&mut Flow> {
        let inside = *self.by_outside.get(outside)?;
        self.get_mut(&inside, now)
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
    /// the next free one after `start`. `None` when all are taken.
    pub fn alloc_snat_port(
        &self,
        proto: Proto,
        vip: Ipv4Addr,
        backend: SocketAddrV4,
        preferred: u16,
        start: u64,
        now: Instant,
    ) -> Option<u16> {
        let span = u32::from(u16::MAX - SNAT_PORT_FIRST) + 1;
        let free = |port: u16| {
            let o = Outside(FiveTuple {
                proto,
                src: SocketAddrV4::new(vip, port),
                dst: backend,
            });
            !self.outside_taken(&o, now)
        };
        if preferred >= SNAT_PORT_FIRST && free(preferred) {
            return Some(preferred);
        }
        let first = (start % u64::from(span)) as u32;
        (0..span)
            .map(|i| SNAT_PORT_FIRST + ((first + i) % span) as u16)
            .find(|p| free(*p))
    }

    /// Adds a flow. An expired flow holding the same inside or outside
    /// tuple is removed first.
    pub fn insert(&mut self, flow: Flow, now: Instant) -> Result<(), InsertError> {
        if self.outside_taken(&flow.outside, now) {
            return Err(InsertError::Collision);
        }
        if let Some(old) = self.by_outside.get(&flow.outside).copied() {
            self.remove(&old);
        }
        self.remove(&flow.inside);
        if self.flows.len() >= MAX_FLOWS {
            return Err(InsertError::Full);
        }
        let (vip, backend) = (*flow.inside.0.dst.ip(), *flow.outside.0.dst.ip());
        *self.load.entry((vip, backend)).or_default() += 1;
        *self.vip_load.entry(vip).or_default() += 1;
        self.by_outside.insert(flow.outside, flow.inside);
        self.flows.insert(flow.inside, flow);
        Ok(())
    }

    /// Removes a flow (freeing its SNAT port).
    pub fn remove(&mut self, inside: &Inside) -> Option<Flow> {
        let flow = self.flows.remove(inside)?;
        self.by_outside.remove(&flow.outside);
        let (vip, backend) = (*flow.inside.0.dst.ip(), *flow.outside.0.dst.ip());
        if let Entry::Occupied(mut e) = self.load.entry((vip, backend)) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
        if let Entry::Occupied(mut e) = self.vip_load.entry(vip) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
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
        gone.len()
    }

    /// Removes every flow that expired by `now`; returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        self.retain(|f| !f.expired(now))
    }

    /// Every flow, in no particular order (callers only aggregate).
    pub fn flows(&self) -> impl Iterator<Item = &Flow> {
        self.flows.values()
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
        assert_eq!(f.expires(), t0 + TCP_TRANSITORY_IDLE, "opening");
        f.seen_reply(TCP_SYN | TCP_ACK, t0);
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
            .alloc_snat_port(Proto::Tcp, vip, sa("10.1.0.9:8080"), 4000, 7, t0)
            .unwrap();
        assert_ne!(p, 4000);
        // To another backend, 4000 is free.
        assert_eq!(
            t.alloc_snat_port(Proto::Tcp, vip, sa("10.1.0.8:8080"), 4000, 7, t0),
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
            t.alloc_snat_port(Proto::Tcp, vip, sa("10.1.0.9:8080"), 4000, 7, t0),
            Some(4000)
        );
        // An expired flow does not hold its port.
        t.insert(f2, t0).unwrap();
        let later = t0 + TCP_TRANSITORY_IDLE;
        assert_eq!(
            t.alloc_snat_port(Proto::Tcp, vip, sa("10.1.0.9:8080"), 4000, 7, later),
            Some(4000)
        );
        assert_eq!(t.expire(later), 1);
        assert!(t.is_empty());
        assert_eq!(t.vip_load(vip), 0);
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
