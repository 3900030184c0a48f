//! What the balancer counts: drop reasons, generated answers, and
//! per-service / per-backend connection counters, with their metric label
//! values.
//!
//! Must not: count anything itself — [`super::Lb`] does.

use std::collections::BTreeMap;
use std::sync::Arc;

/// Why the balancer dropped a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LbDrop {
    /// IPv4 for a VIP with inconsistent lengths or a truncated header.
    Malformed,
    /// To an address of the service CIDR that is no VIP here (no such
    /// service, headless, or not exposed in this cluster).
    NotAVip,
    /// A fragment whose first fragment was not seen, or a fragmented ping.
    Fragment,
    /// Neither TCP, UDP nor ICMP.
    UnsupportedProtocol,
    /// An ICMP message to a VIP other than echo request or an error.
    UnsupportedIcmp,
    /// A TCP RST or ICMP error for a flow that is not tracked.
    NoFlow,
    /// Every backend's translated tuple was already in use.
    NatCollision,
    /// No SNAT port left towards the chosen local backend.
    SnatExhausted,
    /// The flow table is full of assured flows.
    FlowTableFull,
    /// The client already holds its share of the flow table.
    SourceLimit,
    /// An answer (RST / unreachable) was due but over the rate limit.
    RateLimited,
    /// An answer was due to a source that must not get one (broadcast,
    /// multicast, unspecified; RFC 1122 §3.2.2).
    BadSource,
    /// A replica's datagram on a UDP flow a service policy change cut.
    PolicyCut,
}

impl LbDrop {
    /// Label value for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            LbDrop::Malformed => "malformed",
            LbDrop::NotAVip => "not_a_vip",
            LbDrop::Fragment => "fragment",
            LbDrop::UnsupportedProtocol => "unsupported_protocol",
            LbDrop::UnsupportedIcmp => "unsupported_icmp",
            LbDrop::NoFlow => "no_flow",
            LbDrop::NatCollision => "nat_collision",
            LbDrop::SnatExhausted => "snat_exhausted",
            LbDrop::FlowTableFull => "flow_table_full",
            LbDrop::SourceLimit => "source_limit",
            LbDrop::RateLimited => "rate_limited",
            LbDrop::BadSource => "bad_source",
            LbDrop::PolicyCut => "policy_cut",
        }
    }
}

/// Answers the balancer generated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LbReply {
    /// ICMP echo reply to a ping of a VIP.
    EchoReply,
    /// RST / port unreachable: the service defines no such port.
    NoPort,
    /// RST / port unreachable: no ready backend for the port.
    NoBackend,
    /// RST / administratively prohibited: the service policy refuses the
    /// call (README "Service policy").
    Policy,
}

impl LbReply {
    /// Label value for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            LbReply::EchoReply => "echo_reply",
            LbReply::NoPort => "no_port",
            LbReply::NoBackend => "no_backend",
            LbReply::Policy => "policy",
        }
    }
}

/// Counters of one service.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceStats {
    /// New flows (connections) since start.
    pub connections: u64,
    /// Flows in the table now.
    pub active_flows: u64,
    /// New flows per backend `cluster/job`.
    pub backends: BTreeMap<Arc<str>, u64>,
}

/// The balancer's counters, for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LbStats {
    /// Per service `namespace/name`.
    pub services: BTreeMap<Arc<str>, ServiceStats>,
    pub active_flows: u64,
    /// Flows evicted (not assured, or closed) to make room for new ones.
    pub evicted_flows: u64,
    /// Client IPs currently pinned by ClientIP affinity.
    pub affinities: u64,
    pub drops: BTreeMap<LbDrop, u64>,
    pub replies: BTreeMap<LbReply, u64>,
    /// New flows the service policy refused, by (destination, caller) as
    /// [`crate::core::policy::Denied`] names them.
    pub policy_denied: BTreeMap<(Arc<str>, Arc<str>), u64>,
}
