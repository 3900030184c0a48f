//! The service-VIP load balancer (SPEC §5): picks a replica for every new
//! flow to a VIP — Maglev over the flow's 5-tuple, every ready replica in
//! every cluster weighted equally — pins the flow to it in a flow table,
//! and rewrites packets both ways.
//!
//! Sans-IO: bytes and `now` go in, a [`Verdict`] comes out. [`Lb`] is
//! owned by the packet loop alone (no locks); the table it balances over
//! ([`LbTable`]) is rebuilt purely from the netmap and health and handed in
//! with [`Lb::set_table`].
//!
//! Must not: read the clock, do I/O, or log per packet.
//!
//! # Packet paths
//! - Client → VIP:port, backend in another cluster: DNAT to
//!   backend:target ([`Verdict::ToTunnel`]). The backend answers the
//!   client's address, which routes back through the tunnel to this
//!   gateway; [`Lb::inbound`] turns the source back into VIP:port.
//! - Client → VIP:port, backend in this cluster: DNAT and SNAT to
//!   VIP:allocated-port ([`Verdict::ToTun`]), or the backend would answer
//!   the client directly. The answer, to the VIP, comes back in from the
//!   TUN; [`Lb::outbound`] recognises it before anything else and restores
//!   VIP:port → client.
//! - ICMP errors quoting a translated packet are translated too, and
//!   later IPv4 fragments follow their first fragment.
//! - Ping to a VIP, and packets to a VIP port with no backend (or a port
//!   the service does not define), are answered by meshd
//!   ([`Verdict::Reply`]): never a silent black hole.
//! - A call the service policy refuses is answered the same way. One a
//!   policy change cut is reset at both ends by the next TCP segment
//!   either end sends ([`Verdict::Reset`], [`Verdict::ResetOnward`]).
//!
//! # Layout
//! - `table`: [`LbTable::build`], exposure, visibility, health, policy.
//! - `maglev`: the pure Maglev table build.
//! - `nat`: the flow table (Inside/Outside, RFC timeouts, SNAT ports,
//!   conntrack-style flood defences).
//! - `packet`: parsing, checksums, RST / ICMP builders.
//! - `hash`: keyed SipHash-1-3.

mod cut;
mod direct;
mod hash;
pub mod maglev;
pub mod nat;
pub mod packet;
mod stats;
pub mod table;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
#[cfg(test)]
pub(crate) mod testutil;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lru::LruCache;
pub use nat::FlowLimits;
use nat::{
    FiveTuple, Flow, FragKey, FragTable, InsertError, Inside, NatTable, Outside, Path, is_syn,
    opens_call,
};
pub use packet::Proto;
use packet::{IcmpError, Ipv4Hdr, L4, ParseError};
pub use stats::{LbDrop, LbReply, LbStats, ServiceStats};
pub use table::{Backend, Health, LbConfig, LbTable, VipService, routable};

/// Tuning: how often [`Lb::handle_timeout`] sweeps expired state. Lookups
/// check expiry themselves, so this only bounds how long memory and SNAT
/// ports of dead flows linger.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Tuning: bounded loads (Mirrokni, Thorup & Zadimoghaddam, "Consistent
/// Hashing with Bounded Loads", SODA 2018) with c = 1.1: a new flow passes
/// over a backend that already holds more than c × its fair share of the
/// VIP's flows and takes the next Maglev entry. Keeps small samples even:
/// over 3000 random keys, 120 flows on 6 replicas gave each replica at
/// least 12 (plain hashing: as few as 4).
const LOAD_BOUND: (u64, u64) = (11, 10);
/// Tuning: (destination, caller) pairs the policy-denied counters keep;
/// later pairs are counted under `other`. The names come from the netmap
/// (bounded by its objects), but a long-running gateway sees many.
const MAX_DENIED_LABELS: usize = 4096;
/// Tuning: TCP resets and ICMP unreachables generated per second (RFC
/// 1812 §4.3.2.8: ICMP error generation should be rate limited).
const REPLIES_PER_SECOND: u32 = 1000;

/// What to do with a packet after [`Lb::outbound`] / [`Lb::inbound`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verdict {
    /// Not for the balancer: handle the packet as if it did not exist.
    Pass,
    /// Rewritten in place; encrypt it to the peer of its (new) destination.
    ToTunnel,
    /// Rewritten in place; write it to the TUN (local backend, or a
    /// reverse-translated reply).
    ToTun,
    /// Dropped; the original is not to be forwarded. An answer is in
    /// `reply`: write that to the TUN.
    Reply,
    /// Drop the packet (counted under the reason).
    Drop(LbDrop),
    /// A TCP segment of a flow a service policy change cut (a VIP flow's
    /// replica's, or a client's to a replica in this cluster): rewritten
    /// in place into a reset for the other end (write it to the TUN);
    /// `reply`, unless empty, resets its sender (send it back the way the
    /// segment came).
    Reset,
    /// A TCP segment of a direct call or a VIP flow to a remote replica
    /// that a policy change cut: rewritten in place into a reset that goes
    /// on to its destination as [`Verdict::Pass`] would; `reply` resets
    /// its sender (send it back the way it came).
    ResetOnward,
}

/// A packet the service policy refuses.
struct Refused {
    denied: crate::core::policy::Denied,
    /// Of a call a policy change cut (not a new one).
    cut: bool,
}

#[derive(Debug, Clone, Copy)]
struct Affinity {
    backend: Ipv4Addr,
    expires: Instant,
}

#[derive(Debug, Default)]
struct Counters {
    connections: u64,
    backends: BTreeMap<Arc<str>, u64>,
}

type AffinityKey = (Ipv4Addr, Ipv4Addr);

/// The load balancer of one gateway.
#[derive(Debug)]
pub struct Lb {
    cfg: LbConfig,
    table: Arc<LbTable>,
    nat: NatTable,
    /// (VIP, client IP) → pinned backend, least recently used first out.
    affinity: LruCache<AffinityKey, Affinity>,
    frags: FragTable<Verdict>,
    counters: BTreeMap<Arc<str>, Counters>,
    drops: BTreeMap<LbDrop, u64>,
    replies: BTreeMap<LbReply, u64>,
    policy_denied: BTreeMap<(Arc<str>, Arc<str>), u64>,
    /// Calls straight to job IPs the policy let through (only while there
    /// is a policy).
    direct: direct::DirectCalls,
    /// VIP flows a policy change cut.
    cut: cut::CutFlows,
    /// Start of the current one-second reply window and replies in it.
    reply_window: Option<(Instant, u32)>,
    next_sweep: Option<Instant>,
}

fn verdict_of(path: Path) -> Verdict {
    match path {
        Path::Remote => Verdict::ToTunnel,
        Path::Local => Verdict::ToTun,
    }
}

fn frag_key(h: &Ipv4Hdr) -> FragKey {
    (h.src, h.dst, h.proto, h.id)
}

/// Whether an answer may be sent to `ip` (RFC 1122 §3.2.2).
fn answerable(ip: Ipv4Addr) -> bool {
    !(ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast())
}

impl Lb {
    /// A balancer with an empty table.
    pub fn new(cfg: LbConfig) -> Lb {
        let pins = NonZeroUsize::new(cfg.limits.max_affinities).unwrap_or(NonZeroUsize::MIN);
        Lb {
            nat: NatTable::new(cfg.limits).with_relay(cfg.gateway_ip),
            affinity: LruCache::new(pins),
            cfg,
            table: Arc::new(LbTable::default()),
            frags: FragTable::default(),
            counters: BTreeMap::new(),
            drops: BTreeMap::new(),
            replies: BTreeMap::new(),
            policy_denied: BTreeMap::new(),
            direct: direct::DirectCalls::new(direct::MAX_DIRECT_CALLS),
            cut: cut::CutFlows::new(cut::MAX_CUT_FLOWS),
            reply_window: None,
            next_sweep: None,
        }
    }

    /// The configuration (to build tables with).
    pub fn config(&self) -> &LbConfig {
        &self.cfg
    }

    /// The table in use (to pass to [`LbTable::rebuild`]).
    pub fn table(&self) -> &Arc<LbTable> {
        &self.table
    }

    /// Switches to a new table. New flows use it at once; an established
    /// flow stays on its backend while that backend is still eligible
    /// (ready, healthy, visible) for the same VIP and target port, and is
    /// removed otherwise, so its next packet is balanced afresh. A flow its
    /// backend never answered is also moved when the backend is no longer
    /// a candidate for new flows (its gateway is suspect, say): a client's
    /// retransmitted SYN then reaches a live replica instead of the one
    /// that just died.
    ///
    /// A flow the new table's service policy refuses is removed too (and
    /// counted as refused): the client's next packet then gets the refusal a new flow would (a TCP
    /// RST, ICMP administratively prohibited). The replica's next TCP
    /// segment on it is turned into a reset for the client, and answered
    /// with one ([`Verdict::Reset`]); its UDP datagrams are dropped.
    pub fn set_table(&mut self, t: Arc<LbTable>) {
        let policy = t.policy();
        // Flows were judged by this very policy (a health change, say).
        let rejudge = !policy.is_empty() && !self.table.same_policy(&t);
        let before = self.nat.len();
        let cut = &mut self.cut;
        let mut denied = Vec::new();
        self.nat.retain(|f| {
            let i = f.inside.0;
            let o = f.outside.0;
            if rejudge
                && let Err(d) = policy
                    .check(*i.src.ip(), *i.dst.ip())
                    .and_then(|()| policy.check(*i.src.ip(), *o.dst.ip()))
            {
                // A finished connection only goes.
                if !f.is_closed() {
                    cut.insert(f);
                    denied.push(d);
                }
                return false;
            }
            t.vip(*i.dst.ip()).is_some_and(|s| {
                s.target_port(i.proto, i.dst.port()) == Some(o.dst.port())
                    && s.eligible
                        .get(o.dst.ip())
                        .is_some_and(|b| b.local == (f.path == Path::Local))
                    && (f.is_answered() || s.candidate(*o.dst.ip()).is_some())
            })
        });
        let stale: Vec<AffinityKey> = self
            .affinity
            .iter()
            .filter(|((vip, _), a)| t.vip(*vip).is_none_or(|s| s.candidate(a.backend).is_none()))
            .map(|(k, _)| *k)
            .collect();
        for k in &stale {
            self.affinity.pop(k);
        }
        // A cut call is a refused one (it is reset when next seen).
        for d in denied {
            self.count_denied(d);
        }
        let removed = before - self.nat.len();
        if removed > 0 {
            tracing::debug!(removed, "flows no longer eligible removed");
        }
        if policy.is_empty() {
            self.direct.clear();
        } else if rejudge {
            let cut = self
                .direct
                .rejudge(|c| policy.check(*c.src.ip(), *c.dst.ip()).is_ok());
            if cut > 0 {
                tracing::debug!(cut, "direct calls cut by the service policy");
            }
        }
        self.table = t;
    }

    fn is_service_addr(&self, ip: Ipv4Addr) -> bool {
        self.cfg.service_cidr.contains(&ip) || self.table.is_vip(ip)
    }

    /// A packet read from the TUN. Rewrites it in place, or writes an
    /// answer into `reply` (cleared first).
    pub fn outbound(&mut self, packet: &mut [u8], reply: &mut Vec<u8>, now: Instant) -> Verdict {
        reply.clear();
        let v = self.outbound_inner(packet, reply, now);
        self.count_drop(v);
        v
    }

    /// A packet decrypted from a tunnel: reverse translation of remote
    /// backends' replies (and ICMP errors about our flows); a call to a job
    /// here that the service policy refuses gets its refusal written into
    /// `reply` (cleared first), to go back through the tunnel; everything
    /// else passes untouched.
    pub fn inbound(&mut self, packet: &mut [u8], reply: &mut Vec<u8>, now: Instant) -> Verdict {
        reply.clear();
        let v = self.inbound_inner(packet, reply, now);
        self.count_drop(v);
        v
    }

    fn count_drop(&mut self, v: Verdict) {
        if let Verdict::Drop(why) = v {
            *self.drops.entry(why).or_default() += 1;
        }
    }

    fn outbound_inner(&mut self, packet: &mut [u8], reply: &mut Vec<u8>, now: Instant) -> Verdict {
        let Some(dst) = packet::raw_dst(packet) else {
            return Verdict::Pass;
        };
        let ours = self.is_service_addr(dst);
        let h = match packet::parse_ipv4(packet) {
            Ok(h) => h,
            Err(ParseError::Malformed) if ours => return Verdict::Drop(LbDrop::Malformed),
            Err(_) => return Verdict::Pass,
        };
        if h.is_later_fragment() {
            return match self.later_fragment(packet, &h, now) {
                Some(v) => v,
                None if ours => Verdict::Drop(LbDrop::Fragment),
                None => Verdict::Pass,
            };
        }
        if !ours {
            // Nothing to judge or to clean up (the bulk of tunnel traffic).
            if self.nat.is_empty() && self.table.policy().is_empty() {
                return Verdict::Pass;
            }
            let Some(l4) =
                Proto::from_number(h.proto).and_then(|p| packet::parse_l4(packet, &h, p))
            else {
                return Verdict::Pass;
            };
            let tuple = FiveTuple {
                proto: l4.proto,
                src: SocketAddrV4::new(h.src, l4.src_port),
                dst: SocketAddrV4::new(h.dst, l4.dst_port),
            };
            if let Err(r) = self.judge_direct(tuple, l4.flags, now) {
                return self.refuse_direct(packet, reply, &h, &l4, r, now);
            }
            let opens = opens_call(l4.proto, l4.flags);
            if opens && !self.cut.is_empty() {
                // A stale record of a VIP flow on this tuple must not
                // reset this new call's replies.
                self.cut.forget(&Outside(tuple));
            }
            // Traffic straight to a backend from a client port that an
            // earlier VIP flow to that backend used: that flow's mapping is
            // stale (the VIP flow's own packets never leave the TUN with
            // the backend as destination), and keeping it would rewrite
            // this flow's replies to come from the VIP. For TCP a new
            // connection (SYN) says so; for UDP any datagram does.
            if opens && !self.nat.is_empty() {
                self.nat.remove_outside(&Outside(tuple));
            }
            return Verdict::Pass;
        }
        let Some(proto) = Proto::from_number(h.proto) else {
            return match h.proto {
                packet::IPPROTO_ICMP => self.icmp_to_vip(packet, reply, &h, now),
                _ => Verdict::Drop(LbDrop::UnsupportedProtocol),
            };
        };
        let Some(l4) = packet::parse_l4(packet, &h, proto) else {
            return Verdict::Drop(LbDrop::Malformed);
        };
        let tuple = FiveTuple {
            proto,
            src: SocketAddrV4::new(h.src, l4.src_port),
            dst: SocketAddrV4::new(h.dst, l4.dst_port),
        };
        // A local backend answering its SNAT address comes first: its
        // packet is also "to a VIP".
        if let Some(f) = self.nat.reply(tuple, Path::Local, l4.flags, now) {
            let (src, dst) = (f.inside.0.dst, f.inside.0.src);
            packet::rewrite(packet, &h, Some(src), Some(dst));
            return self.first_fragment(&h, *src.ip(), *dst.ip(), Verdict::ToTun, now);
        }
        if let Some(v) = self.cut_reply(packet, reply, &h, &l4, tuple, Path::Local, now) {
            return v;
        }
        self.client_packet(packet, reply, &h, &l4, tuple, now)
    }

    fn inbound_inner(&mut self, packet: &mut [u8], reply: &mut Vec<u8>, now: Instant) -> Verdict {
        let Ok(h) = packet::parse_ipv4(packet) else {
            return Verdict::Pass;
        };
        if h.is_later_fragment() {
            return self
                .later_fragment(packet, &h, now)
                .unwrap_or(Verdict::Pass);
        }
        if h.proto == packet::IPPROTO_ICMP {
            return match packet::parse_icmp_error(packet, &h) {
                Some(e) => self.icmp_error_from_backend(packet, &h, &e, Path::Remote, now),
                None => Verdict::Pass,
            };
        }
        let Some(l4) = Proto::from_number(h.proto).and_then(|p| packet::parse_l4(packet, &h, p))
        else {
            return Verdict::Pass;
        };
        let tuple = FiveTuple {
            proto: l4.proto,
            src: SocketAddrV4::new(h.src, l4.src_port),
            dst: SocketAddrV4::new(h.dst, l4.dst_port),
        };
        let Some(f) = self.nat.reply(tuple, Path::Remote, l4.flags, now) else {
            if let Some(v) = self.cut_reply(packet, reply, &h, &l4, tuple, Path::Remote, now) {
                return v;
            }
            // Not a reply of a VIP flow: the gateway that owns the job
            // judges the call again (the caller's gateway may not be
            // honest, or may not have the same policy yet). A refusal is
            // answered, as the caller's gateway would: a client whose
            // gateway let a call through a moment before this one learned
            // of a change retries at once instead of after its SYN
            // timeout.
            return match self.judge_direct(tuple, l4.flags, now) {
                Ok(()) => Verdict::Pass,
                Err(r) => self.refuse_direct(packet, reply, &h, &l4, r, now),
            };
        };
        let src = f.inside.0.dst;
        packet::rewrite(packet, &h, Some(src), None);
        self.first_fragment(&h, *src.ip(), h.dst, Verdict::ToTun, now)
    }

    /// A client's TCP/UDP packet to a VIP.
    fn client_packet(
        &mut self,
        packet: &mut [u8],
        reply: &mut Vec<u8>,
        h: &Ipv4Hdr,
        l4: &L4,
        tuple: FiveTuple,
        now: Instant,
    ) -> Verdict {
        let inside = Inside(tuple);
        if let Some(f) = self.nat.outbound(&inside, l4.flags, now) {
            let (out, path, affinity) = (f.outside.0, f.path, f.affinity);
            if affinity {
                self.touch_affinity(*tuple.dst.ip(), *tuple.src.ip(), now);
            }
            packet::rewrite(packet, h, Some(out.src), Some(out.dst));
            return self.first_fragment(h, *out.src.ip(), *out.dst.ip(), verdict_of(path), now);
        }
        if let Some(v) = self.cut_request(packet, reply, h, l4, inside, now) {
            return v;
        }
        let table = self.table.clone();
        let Some(svc) = table.vip(h.dst) else {
            return Verdict::Drop(LbDrop::NotAVip);
        };
        let Some(target) = svc.target_port(tuple.proto, l4.dst_port) else {
            return self.reject(packet, reply, h, l4, LbReply::NoPort, now);
        };
        if l4.flags & packet::TCP_RST != 0 {
            return Verdict::Drop(LbDrop::NoFlow);
        }
        let (backend, outside) = match self.choose(svc, tuple, target, now) {
            Ok(c) => c,
            Err(None) => return self.reject(packet, reply, h, l4, LbReply::NoBackend, now),
            Err(Some(why)) => return Verdict::Drop(why),
        };
        // The service policy, once per new flow, after the replica is
        // chosen (so the gateway that owns it would judge the same job)
        // and before anything is allocated: the VIP's service and the
        // replica's job as destinations.
        let policy = table.policy();
        if !policy.is_empty() {
            let src = *tuple.src.ip();
            if let Err(d) = policy
                .check(src, svc.vip)
                .and_then(|()| policy.check(src, backend.ip))
            {
                self.count_denied(d);
                return self.reject(packet, reply, h, l4, LbReply::Policy, now);
            }
        }
        let path = if backend.local {
            Path::Local
        } else {
            Path::Remote
        };
        let mut flow = Flow::new(
            inside,
            outside,
            path,
            backend.clone(),
            svc.service.clone(),
            svc.affinity.is_some(),
            now,
        );
        flow.seen_outbound(l4.flags, now);
        if !self.cut.is_empty() {
            self.cut.forget(&outside);
        }
        match self.nat.insert(flow, now) {
            Ok(()) => {}
            Err(InsertError::Collision) => return Verdict::Drop(LbDrop::NatCollision),
            Err(InsertError::Full) => return Verdict::Drop(LbDrop::FlowTableFull),
            Err(InsertError::SourceLimit) => return Verdict::Drop(LbDrop::SourceLimit),
        }
        if let Some(timeout) = svc.affinity {
            self.affinity.put(
                (svc.vip, *tuple.src.ip()),
                Affinity {
                    backend: backend.ip,
                    expires: now + timeout,
                },
            );
        }
        let c = self.counters.entry(svc.service.clone()).or_default();
        c.connections += 1;
        *c.backends.entry(backend.label.clone()).or_default() += 1;
        self.arm(now);
        let out = outside.0;
        packet::rewrite(packet, h, Some(out.src), Some(out.dst));
        self.first_fragment(h, *out.src.ip(), *out.dst.ip(), verdict_of(path), now)
    }

    /// Picks the backend and translated tuple of a new flow: the client's
    /// affinity backend if it has a live one, else the flow's Maglev entry,
    /// walking on past backends over the load bound or whose tuple is taken.
    /// `Err(None)`: no backend at all; `Err(Some(_))`: none usable.
    fn choose(
        &self,
        svc: &VipService,
        tuple: FiveTuple,
        target: u16,
        now: Instant,
    ) -> Result<(Arc<Backend>, Outside), Option<LbDrop>> {
        let n = svc.backends.len() as u64;
        if n == 0 {
            return Err(None);
        }
        let flow_hash = hash::sip13(self.cfg.hash_key, &tuple.to_bytes());
        let mut why = LbDrop::NatCollision;
        let mut outside_for = |b: &Backend| {
            let dst = SocketAddrV4::new(b.ip, target);
            if !b.local {
                let o = Outside(FiveTuple { dst, ..tuple });
                return (!self.nat.outside_taken(&o, now)).then_some(o);
            }
            let port = self.nat.alloc_snat_port(
                tuple.proto,
                svc.vip,
                dst,
                tuple.src.port(),
                flow_hash >> 32,
            );
            if port.is_none() {
                why = LbDrop::SnatExhausted;
            }
            port.map(|p| {
                Outside(FiveTuple {
                    proto: tuple.proto,
                    src: SocketAddrV4::new(svc.vip, p),
                    dst,
                })
            })
        };
        if svc.affinity.is_some()
            && let Some(a) = self.affinity.peek(&(svc.vip, *tuple.src.ip()))
            && a.expires > now
            && let Some(b) = svc.candidate(a.backend)
            && let Some(o) = outside_for(b)
        {
            return Ok((b.clone(), o));
        }
        let total = u64::from(self.nat.vip_load(svc.vip));
        let bound = ((total + 1) * LOAD_BOUND.0).div_ceil(n * LOAD_BOUND.1);
        let table = svc.maglev();
        let start = (flow_hash % table.size() as u64) as usize;
        let mut fallback = None;
        // Each backend is judged once; the walk ends when all have been.
        let mut seen = vec![false; svc.backends.len()];
        let mut unseen = seen.len();
        for i in 0..table.size() {
            let Some(k) = table.entry(start + i) else {
                break;
            };
            let (Some(b), Some(s)) = (svc.backends.get(k), seen.get_mut(k)) else {
                break;
            };
            if std::mem::replace(s, true) {
                continue;
            }
            unseen -= 1;
            let under = u64::from(self.nat.load(svc.vip, b.ip)) < bound;
            if (under || fallback.is_none())
                && let Some(o) = outside_for(b)
            {
                if under {
                    return Ok((b.clone(), o));
                }
                fallback = Some((b.clone(), o));
            }
            if unseen == 0 {
                break;
            }
        }
        fallback.ok_or(Some(why))
    }

    /// Judges a packet straight to an address that is no VIP (its
    /// `tuple` and TCP `flags`), when there is a policy: `Err` if the
    /// service policy refuses it.
    ///
    /// A packet of a call allowed earlier, or a reply to one, passes
    /// ([`direct::DirectCalls`]); one of a call a policy change cut is
    /// refused. Anything else is judged as a call from its source to its
    /// destination (and tracked if allowed), except a TCP segment that
    /// opens nothing of a connection not tracked (it began before there
    /// was a policy, or was evicted): its direction is unknown, so it
    /// passes if either direction is allowed. A RST always passes.
    fn judge_direct(&mut self, t: FiveTuple, flags: u8, now: Instant) -> Result<(), Refused> {
        let policy = self.table.policy();
        if policy.is_empty() || (t.proto == Proto::Tcp && flags & packet::TCP_RST != 0) {
            return Ok(());
        }
        let opens = opens_call(t.proto, flags);
        let (src, dst) = (*t.src.ip(), *t.dst.ip());
        match self.direct.seen(t, now) {
            direct::Known::Allowed => return Ok(()),
            // A new connection on a tuple whose call was cut is judged
            // anew; anything else of it is refused, either way.
            direct::Known::Cut(call) if !(opens && t.proto == Proto::Tcp) => {
                return policy
                    .check(*call.src.ip(), *call.dst.ip())
                    .map_err(|denied| Refused { denied, cut: true });
            }
            _ => {}
        }
        let verdict = policy.check(src, dst);
        if verdict.is_ok() {
            self.direct.allow(t, now);
            return Ok(());
        }
        if !opens && policy.check(dst, src).is_ok() {
            self.direct.allow(t.reversed(), now);
            return Ok(());
        }
        verdict.map_err(|denied| Refused { denied, cut: false })
    }

    /// Answers a packet straight to a job (or from one) that the policy
    /// refuses: a new call as [`Lb::reject`] does; a TCP segment of a call
    /// a change cut is turned into a reset that goes on, and its sender
    /// gets one too ([`Verdict::ResetOnward`]), so both ends learn at
    /// once.
    fn refuse_direct(
        &mut self,
        packet: &mut [u8],
        reply: &mut Vec<u8>,
        h: &Ipv4Hdr,
        l4: &L4,
        r: Refused,
        now: Instant,
    ) -> Verdict {
        self.count_denied(r.denied);
        if !(r.cut && l4.proto == Proto::Tcp) {
            return self.reject(packet, reply, h, l4, LbReply::Policy, now);
        }
        self.reset_both(packet, reply, h, l4, None, Verdict::ResetOnward, now)
    }

    /// Turns TCP segment `packet` of a cut call into a reset that goes on
    /// (first translated to `to`, source and destination, as its flow
    /// was) and writes one for its sender into `reply` (none for a RST);
    /// counted as a policy answer. `reset` ([`Verdict::Reset`] or
    /// [`Verdict::ResetOnward`]) says where the reset goes; over the
    /// answer budget nothing is done and the segment is dropped.
    #[allow(clippy::too_many_arguments)]
    fn reset_both(
        &mut self,
        packet: &mut [u8],
        reply: &mut Vec<u8>,
        h: &Ipv4Hdr,
        l4: &L4,
        to: Option<(SocketAddrV4, SocketAddrV4)>,
        reset: Verdict,
        now: Instant,
    ) -> Verdict {
        if !self.may_answer(now) {
            return Verdict::Drop(LbDrop::RateLimited);
        }
        packet::build_tcp_rst(packet, h, l4, reply);
        if let Some((src, dst)) = to {
            packet::rewrite(packet, h, Some(src), Some(dst));
        }
        packet::make_rst(packet, h);
        *self.replies.entry(LbReply::Policy).or_default() += 1;
        reset
    }

    /// Whether one more generated answer fits this second's budget
    /// ([`REPLIES_PER_SECOND`]); counts it if so.
    fn may_answer(&mut self, now: Instant) -> bool {
        let window = match self.reply_window {
            Some((start, n)) if now.saturating_duration_since(start) < Duration::from_secs(1) => {
                (start, n)
            }
            _ => (now, 0),
        };
        if window.1 >= REPLIES_PER_SECOND {
            return false;
        }
        self.reply_window = Some((window.0, window.1 + 1));
        true
    }

    /// A packet `tuple` from a replica (on `path`) that answers no flow:
    /// if it answers one a policy change cut, the verdict for it (see
    /// [`Verdict::Reset`]); `None` otherwise.
    #[allow(clippy::too_many_arguments)]
    fn cut_reply(
        &mut self,
        packet: &mut [u8],
        reply: &mut Vec<u8>,
        h: &Ipv4Hdr,
        l4: &L4,
        tuple: FiveTuple,
        path: Path,
        now: Instant,
    ) -> Option<Verdict> {
        if self.cut.is_empty() {
            return None;
        }
        let c = self.cut.get(&Outside(tuple.reversed()), path, now)?;
        if l4.proto == Proto::Udp {
            return Some(Verdict::Drop(LbDrop::PolicyCut));
        }
        // Both ends are reset now: the record has done its work.
        self.cut.forget(&c.outside);
        let to = (c.inside.0.dst, c.inside.0.src);
        Some(self.reset_both(packet, reply, h, l4, Some(to), Verdict::Reset, now))
    }

    /// A client's TCP segment (no SYN, no RST) of a VIP flow a policy
    /// change cut: translated as the flow was, turned into a reset for the
    /// replica, and the client gets one too. `None` if it is of no such
    /// flow.
    fn cut_request(
        &mut self,
        packet: &mut [u8],
        reply: &mut Vec<u8>,
        h: &Ipv4Hdr,
        l4: &L4,
        inside: Inside,
        now: Instant,
    ) -> Option<Verdict> {
        if self.cut.is_empty()
            || l4.proto != Proto::Tcp
            || is_syn(l4.flags)
            || l4.flags & packet::TCP_RST != 0
        {
            return None;
        }
        let c = self.cut.take_by_inside(&inside, now)?;
        let to = (c.outside.0.src, c.outside.0.dst);
        let reset = match c.path {
            Path::Remote => Verdict::ResetOnward,
            Path::Local => Verdict::Reset,
        };
        Some(self.reset_both(packet, reply, h, l4, Some(to), reset, now))
    }

    fn count_denied(&mut self, d: crate::core::policy::Denied) {
        let mut key = (d.service, d.from);
        if !self.policy_denied.contains_key(&key) && self.policy_denied.len() >= MAX_DENIED_LABELS {
            key = (Arc::from("other"), Arc::from("other"));
        }
        *self.policy_denied.entry(key).or_default() += 1;
    }

    fn touch_affinity(&mut self, vip: Ipv4Addr, client: Ipv4Addr, now: Instant) {
        if let Some(a) = self.affinity.get_mut(&(vip, client))
            && let Some(t) = self.table.vip(vip).and_then(|s| s.affinity)
        {
            a.expires = a.expires.max(now + t);
        }
    }

    /// Answers a packet to a VIP port that cannot be served: TCP RST or
    /// ICMP port unreachable (administratively prohibited for a call the
    /// policy refuses), from the VIP.
    fn reject(
        &mut self,
        packet: &[u8],
        reply: &mut Vec<u8>,
        h: &Ipv4Hdr,
        l4: &L4,
        why: LbReply,
        now: Instant,
    ) -> Verdict {
        if !answerable(h.src) {
            return Verdict::Drop(LbDrop::BadSource);
        }
        if l4.proto == Proto::Tcp && l4.flags & packet::TCP_RST != 0 {
            return Verdict::Drop(LbDrop::NoFlow);
        }
        if !self.may_answer(now) {
            return Verdict::Drop(LbDrop::RateLimited);
        }
        match l4.proto {
            Proto::Tcp => {
                packet::build_tcp_rst(packet, h, l4, reply);
            }
            Proto::Udp => packet::build_icmp_unreachable(
                packet,
                h,
                h.dst,
                if why == LbReply::Policy {
                    packet::ICMP_CODE_ADMIN_PROHIBITED
                } else {
                    packet::ICMP_CODE_PORT_UNREACHABLE
                },
                reply,
            ),
        }
        *self.replies.entry(why).or_default() += 1;
        Verdict::Reply
    }

    /// ICMP to a VIP (or to a VIP's SNAT address): echo requests are
    /// answered, errors about tracked flows translated.
    fn icmp_to_vip(
        &mut self,
        packet: &mut [u8],
        reply: &mut Vec<u8>,
        h: &Ipv4Hdr,
        now: Instant,
    ) -> Verdict {
        match packet::icmp_type(packet, h) {
            None => Verdict::Drop(LbDrop::Malformed),
            Some(packet::ICMP_ECHO_REQUEST) => {
                if !self.table.is_vip(h.dst) {
                    Verdict::Drop(LbDrop::NotAVip)
                } else if h.more_fragments {
                    Verdict::Drop(LbDrop::Fragment)
                } else if !answerable(h.src) {
                    Verdict::Drop(LbDrop::BadSource)
                } else if packet::build_echo_reply(packet, h, reply) {
                    *self.replies.entry(LbReply::EchoReply).or_default() += 1;
                    Verdict::Reply
                } else {
                    Verdict::Drop(LbDrop::Malformed)
                }
            }
            Some(_) => {
                let Some(e) = packet::parse_icmp_error(packet, h) else {
                    return Verdict::Drop(LbDrop::UnsupportedIcmp);
                };
                match self.icmp_error_from_backend(packet, h, &e, Path::Local, now) {
                    Verdict::Pass => self.icmp_error_from_client(packet, h, &e, now),
                    v => v,
                }
            }
        }
    }

    /// An ICMP error from a backend (or a router on its way) about a packet
    /// of a flow on `path`: it quotes the flow's outside tuple. Translated
    /// to be about the client's own packet, from the VIP if the backend
    /// sent it. `Pass` if it is about no such flow.
    fn icmp_error_from_backend(
        &mut self,
        packet: &mut [u8],
        h: &Ipv4Hdr,
        e: &IcmpError,
        path: Path,
        now: Instant,
    ) -> Verdict {
        let quoted = Outside(FiveTuple {
            proto: e.proto,
            src: e.src,
            dst: e.dst,
        });
        let Some(f) = self.nat.by_outside(&quoted, now).filter(|f| f.path == path) else {
            return Verdict::Pass;
        };
        let (i, o) = (f.inside.0, f.outside.0);
        let outer_src = if h.src == *o.dst.ip() {
            *i.dst.ip()
        } else {
            h.src
        };
        packet::rewrite_icmp_error(packet, h, e, outer_src, *i.src.ip(), i.src, i.dst);
        Verdict::ToTun
    }

    /// An ICMP error from a client about a reply it got from a VIP (e.g.
    /// UDP port unreachable): forwarded to the backend, quoting what the
    /// backend sent.
    fn icmp_error_from_client(
        &mut self,
        packet: &mut [u8],
        h: &Ipv4Hdr,
        e: &IcmpError,
        now: Instant,
    ) -> Verdict {
        let inside = Inside(FiveTuple {
            proto: e.proto,
            src: e.dst,
            dst: e.src,
        });
        let Some(f) = self.nat.get(&inside, now) else {
            return Verdict::Drop(LbDrop::NoFlow);
        };
        let (o, path) = (f.outside.0, f.path);
        packet::rewrite_icmp_error(packet, h, e, *o.src.ip(), *o.dst.ip(), o.dst, o.src);
        verdict_of(path)
    }

    /// Records a first fragment's translation for the rest of its datagram.
    fn first_fragment(
        &mut self,
        h: &Ipv4Hdr,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        v: Verdict,
        now: Instant,
    ) -> Verdict {
        if h.is_first_fragment() {
            self.frags.insert(frag_key(h), src, dst, v, now);
            self.arm(now);
        }
        v
    }

    /// Translates a later fragment like its first one, if that was seen.
    fn later_fragment(&mut self, packet: &mut [u8], h: &Ipv4Hdr, now: Instant) -> Option<Verdict> {
        let t = self.frags.get(&frag_key(h), now)?;
        packet::rewrite_addrs(packet, t.src, t.dst);
        Some(t.verdict)
    }

    fn arm(&mut self, now: Instant) {
        self.next_sweep.get_or_insert(now + SWEEP_INTERVAL);
    }

    /// Expires idle flows (freeing their SNAT ports), affinities and
    /// fragment translations. Does nothing before [`Lb::poll_timeout`]'s
    /// deadline, so calling it often is cheap.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.next_sweep.is_none_or(|t| now < t) {
            return;
        }
        self.nat.expire(now);
        // Oldest use first: pins past their timeout go from the cold end
        // (one whose service has a longer timeout stops the walk; lookups
        // check expiry themselves, and the LRU bound caps the rest).
        while self
            .affinity
            .peek_lru()
            .is_some_and(|(_, a)| a.expires <= now)
        {
            self.affinity.pop_lru();
        }
        self.frags.expire(now);
        let idle = self.nat.is_empty() && self.affinity.is_empty() && self.frags.is_empty();
        self.next_sweep = (!idle).then_some(now + SWEEP_INTERVAL);
    }

    /// When [`Lb::handle_timeout`] wants to run next, and why; `None` while
    /// nothing is tracked.
    pub fn poll_timeout(&self) -> Option<(Instant, &'static str)> {
        self.next_sweep.map(|t| (t, "lb: expire idle flows"))
    }

    /// Counters for metrics. Kept as they happen: this copies one entry
    /// per service, never walks the flows.
    pub fn stats(&self) -> LbStats {
        let active = self.nat.service_flows();
        let mut services: BTreeMap<Arc<str>, ServiceStats> = self
            .counters
            .iter()
            .map(|(s, c)| {
                let stats = ServiceStats {
                    connections: c.connections,
                    active_flows: active.get(s).copied().map_or(0, u64::from),
                    backends: c.backends.clone(),
                };
                (s.clone(), stats)
            })
            .collect();
        for (s, n) in active {
            services.entry(s.clone()).or_default().active_flows = u64::from(*n);
        }
        LbStats {
            services,
            active_flows: self.nat.len() as u64,
            evicted_flows: self.nat.evicted(),
            affinities: self.affinity.len() as u64,
            drops: self.drops.clone(),
            replies: self.replies.clone(),
            policy_denied: self.policy_denied.clone(),
        }
    }
}
