//! Record synthesis, the pure core of the DNS server: [`RecordSet::build`]
//! turns a [`MeshView`] and a [`DnsConfig`] into every record the server
//! serves, and [`RecordSet::lookup`] answers one question from them.
//!
//! Built once per view update (never per query) and then only read, so the
//! server can swap a whole `Arc<RecordSet>` atomically. This module must not
//! do I/O, read clocks or know about sockets; it is tested without a server
//! (`records_tests.rs`).
//!
//! Names (SPEC §6 and §2), in every zone `<z>` of the config:
//! - `<svc>.<ns>.<z>`: A/AAAA → the VIP (ClusterIP, NodePort, LoadBalancer);
//!   A per ready replica (Headless, and standalone exposed Endpoints);
//!   CNAME → `external_name` (ExternalName).
//! - `<job>.<svc>.<ns>.<z>`: A → that replica (headless names only).
//! - `_<port>._<tcp|udp>.<svc>.<ns>.<z>`: SRV per named port; see
//!   [`SRV_PRIORITY`] and [`SRV_WEIGHT`].
//! - `<d>.<c>.<b>.<a>.in-addr.arpa`: PTR → `<svc>.<ns>.<first zone>` for VIPs
//!   inside the service CIDR.
//! - SOA and NS at every zone apex; empty non-terminals (`<ns>.<z>`,
//!   `_tcp.<svc>.<ns>.<z>`, ...) exist and answer NODATA (RFC 8020).
//!
//! A service has records in cluster X only when it is exposed there
//! (`spec.clusters` empty or naming X). A replica address is visible from X
//! when its cluster entry is `exposed` or is X itself, it is `ready`, and meshd
//! has not seen it fail a local health check (`MeshView::local_unready`).

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::domain::Label;
use hickory_proto::rr::rdata::{A, AAAA, CNAME, NS, PTR, SOA, SRV};
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordSet as RrSet, RecordType};
use ipnet::Ipv4Net;
use skymesh_proto::v1::{Endpoints, JobPort, Protocol, Service, ServiceType};
use tracing::warn;

use crate::{DnsConfig, MeshView};

/// SRV priority of every synthesized SRV record: all targets are equal
/// (RFC 2782: lower is preferred; there is no preference here).
pub const SRV_PRIORITY: u16 = 0;
/// SRV weight of every synthesized SRV record. Every target of a name gets the
/// same weight, so clients spread evenly across replicas (RFC 2782), as meshd's
/// balancer does; 100 matches what Kubernetes' CoreDNS uses for one target.
pub const SRV_WEIGHT: u16 = 100;

/// SOA refresh/retry/expire (RFC 1035 §3.3.13). Nothing transfers these zones
/// (AXFR is refused), so the values only need to be plausible.
const SOA_REFRESH: i32 = 7200;
const SOA_RETRY: i32 = 1800;
const SOA_EXPIRE: i32 = 86_400;

/// How many CNAMEs inside the served zones one lookup follows.
const MAX_CNAME_CHAIN: usize = 8;

/// The namespace of namespaced objects that carry none.
const DEFAULT_NAMESPACE: &str = "default";

/// Every record served, indexed by owner name. Immutable once built.
///
/// Compact: a name holds `Rd`s (an address, a port and a target, ...),
/// not hickory records; [`RecordSet::lookup`] makes the records of the one
/// name it answers. Names below a forward zone are kept relative to it,
/// once for every forward zone (their records are the same in each). With
/// 10,000 services this takes about a tenth of what hickory RRsets per
/// name and zone took (a `Name` is 80 bytes before its heap copy, a
/// `Record` over 100).
#[derive(Debug, Clone)]
pub struct RecordSet {
    /// Served zones, longest first (so the innermost zone matches).
    zones: Vec<Zone>,
    /// The first forward zone (PTR targets are in it), else the root.
    primary: Name,
    /// Owner name ([`NameKey`]) → its data (empty for empty
    /// non-terminals).
    nodes: HashMap<NameKey, Box<[Rd]>>,
    ttl: u32,
    serial: u32,
}

/// A served zone and its apex records, built once.
#[derive(Debug, Clone)]
struct Zone {
    name: LowerName,
    origin: Name,
    /// A forward zone (its names are keyed relative to it), else a reverse
    /// one (keyed by the absolute name).
    forward: bool,
    soa: Arc<RrSet>,
    ns: Arc<RrSet>,
}

/// The data of one record of a name; its owner, class and TTL are the
/// name's and the set's.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Rd {
    A(std::net::Ipv4Addr),
    Aaaa(std::net::Ipv6Addr),
    /// SRV to a name in the same forward zone, as a [`NameKey`] relative to
    /// it.
    Srv {
        port: u16,
        target: NameKey,
    },
    /// PTR to a name in the first forward zone, relative to it.
    Ptr(NameKey),
    Cname(Box<Name>),
    /// The zone's SOA and NS ([`Zone`]): the name is an apex.
    Soa,
    Ns,
}

impl Rd {
    fn of_ip(ip: IpAddr) -> Rd {
        match ip {
            IpAddr::V4(v4) => Rd::A(v4),
            IpAddr::V6(v6) => Rd::Aaaa(v6),
        }
    }

    fn record_type(&self) -> RecordType {
        match self {
            Rd::A(_) => RecordType::A,
            Rd::Aaaa(_) => RecordType::AAAA,
            Rd::Srv { .. } => RecordType::SRV,
            Rd::Ptr(_) => RecordType::PTR,
            Rd::Cname(_) => RecordType::CNAME,
            Rd::Soa => RecordType::SOA,
            Rd::Ns => RecordType::NS,
        }
    }
}

/// The answer to one question, before it becomes a DNS message.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// NOERROR (with or without data), NXDOMAIN, or REFUSED for a name outside
    /// every served zone.
    pub rcode: ResponseCode,
    /// Answer-section RRsets (a CNAME chain comes first, in order).
    pub answers: Vec<Arc<RrSet>>,
    /// Authority-section RRsets: the zone's SOA for NXDOMAIN and NODATA.
    pub authority: Vec<Arc<RrSet>>,
}

impl Answer {
    fn refused() -> Self {
        Self {
            rcode: ResponseCode::Refused,
            answers: Vec::new(),
            authority: Vec::new(),
        }
    }

    /// The answer-section records.
    pub fn answer_records(&self) -> impl Iterator<Item = &Record> {
        self.answers
            .iter()
            .flat_map(|set| set.records_without_rrsigs())
    }

    /// The authority-section records.
    pub fn authority_records(&self) -> impl Iterator<Item = &Record> {
        self.authority
            .iter()
            .flat_map(|set| set.records_without_rrsigs())
    }

    /// NOERROR without records: the name exists, not with this type.
    pub fn is_nodata(&self) -> bool {
        self.rcode == ResponseCode::NoError && self.answers.is_empty()
    }
}

impl RecordSet {
    /// Builds every record of `view` for `config`, with SOA serial 1.
    pub fn build(view: &MeshView, config: &DnsConfig) -> Self {
        Self::build_with_serial(view, config, 1)
    }

    /// Builds every record of `view` for `config`, with this SOA serial.
    pub fn build_with_serial(view: &MeshView, config: &DnsConfig, serial: u32) -> Self {
        let forward: Vec<Name> = valid_zones(&config.zones);
        let reverse: Vec<Name> = config.service_cidr.map(reverse_zones).unwrap_or_default();
        // A ClusterIP service has four names (its own, `_<port>`,
        // `_<proto>`, its PTR): room for them from the start rather than a
        // table that doubles (and is copied) as they come.
        let mut b = Builder {
            nodes: HashMap::with_capacity(4 * view.services.len() + view.endpoints.len() + 16),
        };
        // Names below the forward zones are built once, relative to them.
        let rel = Name::new();

        // Apexes: SOA + NS. Reverse zones name the first forward zone's server.
        let primary = forward.first().cloned().unwrap_or_else(Name::root);
        let mut zones = Vec::new();
        for (zone, fwd) in forward
            .iter()
            .map(|z| (z, true))
            .chain(reverse.iter().map(|z| (z, false)))
        {
            let owner = if fwd { zone } else { &primary };
            let mname = ns_name(owner);
            let rname = label(owner, "hostmaster").unwrap_or_else(|| owner.clone());
            let soa = SOA::new(
                mname.clone(),
                rname,
                serial,
                SOA_REFRESH,
                SOA_RETRY,
                SOA_EXPIRE,
                config.ttl,
            );
            b.add(if fwd { &rel } else { zone }, Rd::Soa);
            b.add(if fwd { &rel } else { zone }, Rd::Ns);
            zones.push(Zone {
                name: LowerName::new(zone),
                origin: zone.clone(),
                forward: fwd,
                soa: new_set(zone, config.ttl, RData::SOA(soa)),
                ns: new_set(zone, config.ttl, RData::NS(NS(mname))),
            });
        }

        let services: HashSet<(&str, &str)> = view
            .services
            .iter()
            .filter_map(|s| s.metadata.as_ref())
            .map(|m| (namespace(&m.namespace), m.name.as_str()))
            .collect();
        let endpoints: HashMap<(&str, &str), &Endpoints> = view
            .endpoints
            .iter()
            .filter_map(|e| {
                let m = e.metadata.as_ref()?;
                Some(((namespace(&m.namespace), m.name.as_str()), &**e))
            })
            .collect();

        for svc in &view.services {
            if !exposed_in(svc, &view.cluster) {
                continue;
            }
            let Some(meta) = svc.metadata.as_ref() else {
                continue;
            };
            let ns = namespace(&meta.namespace);
            let ep = endpoints.get(&(ns, meta.name.as_str())).copied();
            if !forward.is_empty() {
                b.service(&rel, ns, &meta.name, svc, ep, view);
            }
            if let Some(cidr) = config.service_cidr {
                b.ptr(&primary, ns, &meta.name, svc, cidr);
            }
        }

        for ep in &view.endpoints {
            let Some(meta) = ep.metadata.as_ref() else {
                continue;
            };
            let ns = namespace(&meta.namespace);
            if services.contains(&(ns, meta.name.as_str()))
                || !endpoints_exposed(ep)
                || forward.is_empty()
            {
                continue;
            }
            let replicas = replicas(ep, ns, view);
            b.headless(&rel, ns, &meta.name, &replicas, None);
        }

        // Glue for the NS name, unless a service already owns that name.
        let ns_ip = config
            .nameserver_ip
            .or_else(|| Some(config.listen.ip()).filter(|ip| !ip.is_unspecified()));
        if let Some(ip) = ns_ip.filter(|_| !forward.is_empty()) {
            let name = ns_name(&rel);
            if !b.nodes.contains_key(&*key_of(&name)) {
                b.add(&name, Rd::of_ip(ip));
            }
        }

        zones.sort_by_key(|z| std::cmp::Reverse(z.name.num_labels()));
        b.finish(zones, primary, config.ttl, serial)
    }

    /// The origins served for `config`: its valid zones, then the reverse
    /// zones of the service CIDR.
    pub fn origins(config: &DnsConfig) -> Vec<Name> {
        let mut out = valid_zones(&config.zones);
        if let Some(cidr) = config.service_cidr {
            out.extend(reverse_zones(cidr));
        }
        out
    }

    /// The SOA serial these records carry.
    pub fn serial(&self) -> u32 {
        self.serial
    }

    /// Number of owner names (including empty non-terminals), those below
    /// the forward zones counted once for all of them.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether there are no names at all (no zones configured).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The innermost served zone containing `name`.
    pub fn zone_of(&self, name: &LowerName) -> Option<&LowerName> {
        self.zone(name).map(|z| &z.name)
    }

    fn zone(&self, name: &LowerName) -> Option<&Zone> {
        self.zones.iter().find(|z| z.name.zone_of(name))
    }

    /// Answers `qtype` at `name` (case-insensitive, as every [`LowerName`]).
    ///
    /// Unknown names inside a zone are NXDOMAIN, known names without that
    /// type NODATA, both with the zone's SOA in authority. A CNAME answers
    /// every type but CNAME and is followed while its target is served here.
    /// Names outside every zone are REFUSED (the server forwards those before
    /// asking).
    pub fn lookup(&self, name: &LowerName, qtype: RecordType) -> Answer {
        let Some(zone) = self.zone(name) else {
            return Answer::refused();
        };
        let soa = vec![zone.soa.clone()];
        let Some(node) = self.node(zone, name) else {
            return Answer {
                rcode: ResponseCode::NXDomain,
                answers: Vec::new(),
                authority: soa,
            };
        };

        let mut answers: Vec<Arc<RrSet>> = Vec::new();
        if qtype == RecordType::ANY {
            let mut types: Vec<RecordType> = Vec::new();
            for rd in node {
                if !types.contains(&rd.record_type()) {
                    types.push(rd.record_type());
                }
            }
            answers.extend(
                types
                    .into_iter()
                    .filter_map(|t| self.rrset(zone, name, node, t)),
            );
        } else if let Some(set) = self.rrset(zone, name, node, qtype) {
            answers.push(set);
        } else if let Some(cname) = self.rrset(zone, name, node, RecordType::CNAME) {
            answers.push(cname.clone());
            self.follow_cname(name, &cname, qtype, &mut answers);
        }

        let authority = if answers.is_empty() { soa } else { Vec::new() };
        Answer {
            rcode: ResponseCode::NoError,
            answers,
            authority,
        }
    }

    /// Appends the RRsets a CNAME chain from `owner` leads to inside the
    /// served zones.
    fn follow_cname(
        &self,
        owner: &LowerName,
        first: &Arc<RrSet>,
        qtype: RecordType,
        answers: &mut Vec<Arc<RrSet>>,
    ) {
        let mut seen = vec![owner.clone()];
        let mut cname = first.clone();
        for _ in 0..MAX_CNAME_CHAIN {
            let Some(target) = cname_target(&cname) else {
                return;
            };
            let target = LowerName::new(target);
            let Some(zone) = self.zone(&target) else {
                return;
            };
            let Some(node) = self.node(zone, &target) else {
                return;
            };
            if let Some(set) = self.rrset(zone, &target, node, qtype) {
                answers.push(set);
                return;
            }
            if seen.contains(&target) {
                return; // a loop
            }
            let Some(next) = self.rrset(zone, &target, node, RecordType::CNAME) else {
                return;
            };
            seen.push(target);
            answers.push(next.clone());
            cname = next;
        }
    }

    /// The `rtype` records of `name` (in `zone`, holding `node`), made
    /// from its data.
    fn rrset(
        &self,
        zone: &Zone,
        name: &LowerName,
        node: &[Rd],
        rtype: RecordType,
    ) -> Option<Arc<RrSet>> {
        match rtype {
            RecordType::SOA if node.contains(&Rd::Soa) => return Some(zone.soa.clone()),
            RecordType::NS if node.contains(&Rd::Ns) => return Some(zone.ns.clone()),
            _ => {}
        }
        let mut set: Option<RrSet> = None;
        for rd in node.iter().filter(|rd| rd.record_type() == rtype) {
            let rdata = match rd {
                Rd::A(ip) => RData::A(A(*ip)),
                Rd::Aaaa(ip) => RData::AAAA(AAAA(*ip)),
                Rd::Srv { port, target } => {
                    let target = absolute(target, &zone.origin)?;
                    RData::SRV(SRV::new(SRV_PRIORITY, SRV_WEIGHT, *port, target))
                }
                Rd::Ptr(target) => RData::PTR(PTR(absolute(target, &self.primary)?)),
                Rd::Cname(target) => RData::CNAME(CNAME(Name::clone(target))),
                Rd::Soa | Rd::Ns => continue,
            };
            match &mut set {
                Some(set) => {
                    set.add_rdata(rdata);
                }
                None => {
                    set = Some(RrSet::from(Record::from_rdata(
                        Name::from(name),
                        self.ttl,
                        rdata,
                    )))
                }
            }
        }
        set.map(Arc::new)
    }

    fn node(&self, zone: &Zone, name: &LowerName) -> Option<&[Rd]> {
        let mut buf = [0; MAX_KEY];
        let key = if zone.forward {
            let below = usize::from(name.num_labels().saturating_sub(zone.name.num_labels()));
            labels_key(RELATIVE, name.iter().take(below), &mut buf)
        } else {
            labels_key(ABSOLUTE, name.iter(), &mut buf)
        };
        self.nodes.get(key).map(|n| &**n)
    }
}

/// The target of a CNAME RRset, if it holds one.
pub(crate) fn cname_target(set: &RrSet) -> Option<&Name> {
    set.records_without_rrsigs().find_map(|r| match &r.data {
        RData::CNAME(CNAME(target)) => Some(target),
        _ => None,
    })
}

/// An owner name as a key of [`RecordSet::nodes`]: [`RELATIVE`] (below a
/// forward zone, relative to it) or [`ABSOLUTE`], then each label after its
/// length (lower case). 16 bytes in each slot of the table and the bytes on
/// the heap.
type NameKey = Box<[u8]>;

/// The first byte of the key of a name relative to the forward zones.
const RELATIVE: u8 = 2;
/// The first byte of the key of an absolute name (in a reverse zone).
const ABSOLUTE: u8 = 1;

/// Room for the longest key: the flag and a name's at most 255 octets.
const MAX_KEY: usize = 1 + Name::MAX_LENGTH;

/// The key of a name: `space` then `labels` (already lower case), written
/// into `buf`.
fn labels_key<'a, 'b>(
    space: u8,
    labels: impl Iterator<Item = &'a [u8]>,
    buf: &'b mut [u8; MAX_KEY],
) -> &'b [u8] {
    buf[0] = space;
    let mut n = 1;
    for label in labels {
        let end = n + 1 + label.len();
        // A valid name fits (at most 255 octets); never cut one silently
        // into another name's key.
        let (Some(dst), Ok(len)) = (buf.get_mut(n..end), u8::try_from(label.len())) else {
            buf[0] = u8::MAX;
            return &buf[..1];
        };
        dst[0] = len;
        dst[1..].copy_from_slice(label);
        n = end;
    }
    &buf[..n]
}

/// The key of a name the builder made: relative ones (not fully
/// qualified) are below the forward zones. Its labels are lower case
/// already ([`label`], [`parse_zone`]), so it needs no [`LowerName`] copy.
fn key_of(name: &Name) -> NameKey {
    debug_assert!(name.iter().flatten().all(|c| !c.is_ascii_uppercase()));
    let space = if name.is_fqdn() { ABSOLUTE } else { RELATIVE };
    labels_key(space, name.iter(), &mut [0; MAX_KEY]).into()
}

/// The labels of a key (after its space byte).
fn key_labels(key: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = key.get(1..).unwrap_or_default();
    std::iter::from_fn(move || {
        let (&len, tail) = rest.split_first()?;
        let (label, tail) = tail.split_at_checked(usize::from(len))?;
        rest = tail;
        Some(label)
    })
}

/// The name a relative key stands for below `zone`.
fn absolute(key: &[u8], zone: &Name) -> Option<Name> {
    let mut name = Name::new();
    for label in key_labels(key) {
        name = name.append_label(label).ok()?;
    }
    name.append_name(zone).ok()
}

/// Where each label of a key starts (after the flag byte), first label
/// first.
fn label_starts(key: &[u8]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut i = 1;
    while let Some(len) = key.get(i) {
        out.push(i);
        i += 1 + usize::from(*len);
    }
    out
}

/// Parses one configured zone: a lower-case FQDN other than the root.
pub fn parse_zone(zone: &str) -> Result<Name, String> {
    let trimmed = zone.trim().trim_end_matches('.');
    if trimmed.is_empty() {
        return Err("the root zone cannot be served".to_owned());
    }
    let mut name = Name::from_ascii(trimmed).map_err(|e| e.to_string())?;
    name.set_fqdn(true);
    Ok(name.to_lowercase())
}

fn valid_zones(zones: &[String]) -> Vec<Name> {
    let mut out: Vec<Name> = Vec::new();
    for zone in zones {
        match parse_zone(zone) {
            Ok(name) if !out.contains(&name) => out.push(name),
            Ok(_) => {}
            Err(reason) => warn!(%zone, %reason, "skipping invalid DNS zone"),
        }
    }
    out
}

/// The `in-addr.arpa` zones covering `cidr`, on octet boundaries: a /16 is one
/// zone (`65.100.in-addr.arpa`), a /12 sixteen /16 zones, a /20 sixteen /24s.
pub fn reverse_zones(cidr: Ipv4Net) -> Vec<Name> {
    let octets = cidr.prefix_len().div_ceil(8);
    let Ok(subnets) = cidr.subnets(octets * 8) else {
        return Vec::new();
    };
    subnets
        .filter_map(|net| {
            let addr = net.network().octets();
            let mut labels: Vec<String> = addr[..usize::from(octets)]
                .iter()
                .rev()
                .map(u8::to_string)
                .collect();
            labels.push("in-addr.arpa.".to_owned());
            Name::from_ascii(labels.join(".")).ok()
        })
        .collect()
}

/// The `in-addr.arpa` owner name of an IPv4 address.
pub fn ptr_name(ip: std::net::Ipv4Addr) -> Option<Name> {
    let [a, b, c, d] = ip.octets();
    Name::from_ascii(format!("{d}.{c}.{b}.{a}.in-addr.arpa.")).ok()
}

fn ns_name(zone: &Name) -> Name {
    label(zone, "dns")
        .and_then(|n| label(&n, "ns"))
        .unwrap_or_else(|| zone.clone())
}

fn namespace(ns: &str) -> &str {
    if ns.is_empty() { DEFAULT_NAMESPACE } else { ns }
}

/// `label.parent`, if `label` is a DNS label we are willing to serve:
/// 1–63 of `[a-z0-9-_]` (names are folded to lower case).
fn label(parent: &Name, label: &str) -> Option<Name> {
    let label = label.to_ascii_lowercase();
    let ok = !label.is_empty()
        && label.len() <= 63
        && label
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_');
    if !ok {
        return None;
    }
    parent.prepend_label(Label::from_ascii(&label).ok()?).ok()
}

fn exposed_in(svc: &Service, cluster: &str) -> bool {
    let clusters = svc.spec.as_ref().map_or(&[][..], |s| &s.clusters[..]);
    clusters.is_empty() || clusters.iter().any(|c| c.eq_ignore_ascii_case(cluster))
}

/// A standalone Endpoints resolves when any of its cluster entries is exposed
/// (no entries in the spec means "every cluster, exposed").
fn endpoints_exposed(ep: &Endpoints) -> bool {
    let status = ep
        .status
        .as_ref()
        .is_some_and(|s| s.clusters.iter().any(|c| c.exposed));
    let spec = ep.spec.as_ref().is_none_or(|s| {
        if s.clusters.is_empty() {
            s.every_cluster.as_ref().is_none_or(|e| e.exposed)
        } else {
            s.clusters.iter().any(|c| c.exposed)
        }
    });
    status || spec
}

/// One ready replica visible from the view's cluster.
struct Replica<'a> {
    /// Its host label: the job name, else the address with `-` separators.
    host: String,
    ip: IpAddr,
    ports: &'a [JobPort],
}

fn replicas<'a>(ep: &'a Endpoints, ns: &str, view: &MeshView) -> Vec<Replica<'a>> {
    let mut seen: HashSet<IpAddr> = HashSet::new();
    let mut out = Vec::new();
    let Some(status) = ep.status.as_ref() else {
        return out;
    };
    for entry in &status.clusters {
        if !(entry.exposed || entry.cluster.eq_ignore_ascii_case(&view.cluster)) {
            continue;
        }
        for addr in &entry.addresses {
            if !addr.ready
                || view
                    .local_unready
                    .contains(&(ns.to_owned(), addr.job.clone()))
            {
                continue;
            }
            let Ok(ip) = addr.ip.parse::<IpAddr>() else {
                continue;
            };
            if !seen.insert(ip) {
                continue;
            }
            let host = if addr.job.is_empty() {
                ip.to_string().replace(['.', ':'], "-")
            } else {
                addr.job.to_ascii_lowercase()
            };
            out.push(Replica {
                host,
                ip,
                ports: &addr.ports,
            });
        }
    }
    out
}

/// `_<name>._<proto>.<base>` for a named port.
fn srv_owner(base: &Name, port_name: &str, protocol: Protocol) -> Option<Name> {
    if port_name.is_empty() {
        return None;
    }
    let proto = match protocol {
        Protocol::Udp => "_udp",
        Protocol::Tcp | Protocol::Unspecified => "_tcp",
    };
    let with_proto = label(base, proto)?;
    label(&with_proto, &format!("_{port_name}"))
}

fn port16(port: u32) -> Option<u16> {
    u16::try_from(port).ok().filter(|p| *p != 0)
}

/// A set holding exactly one record: `add_rdata` on an empty set reserves
/// room for four (640 bytes), and most sets hold one.
fn new_set(name: &Name, ttl: u32, rdata: RData) -> Arc<RrSet> {
    Arc::new(RrSet::from(Record::from_rdata(name.clone(), ttl, rdata)))
}

struct Builder {
    /// The table the records end up in: each name's data is an exact-size
    /// slice from the start (most names have one), so that finishing
    /// copies nothing.
    nodes: HashMap<NameKey, Box<[Rd]>>,
}

impl Builder {
    /// Adds `rd` at `name` (relative: below the forward zones), once.
    fn add(&mut self, name: &Name, rd: Rd) {
        let key = key_of(name);
        let rds = self.nodes.entry(key).or_default();
        if !rds.contains(&rd) {
            let mut v = std::mem::take(rds).into_vec();
            v.push(rd);
            *rds = v.into_boxed_slice();
        }
    }

    /// Makes `name` exist without records.
    fn touch(&mut self, name: &Name) {
        self.nodes.entry(key_of(name)).or_default();
    }

    fn service(
        &mut self,
        zone: &Name,
        ns: &str,
        name: &str,
        svc: &Service,
        ep: Option<&Endpoints>,
        view: &MeshView,
    ) {
        let Some(base) = label(zone, ns).and_then(|n| label(&n, name)) else {
            warn!(%ns, %name, "service name is not a DNS name; no records");
            return;
        };
        self.touch(&base);
        let Some(spec) = svc.spec.as_ref() else {
            return;
        };
        match spec.r#type() {
            ServiceType::Headless => {
                let replicas = ep.map(|ep| replicas(ep, ns, view)).unwrap_or_default();
                self.headless_at(&base, &replicas, Some(svc));
            }
            ServiceType::ExternalName => match parse_zone(&spec.external_name) {
                Ok(target) => self.add(&base, Rd::Cname(Box::new(target))),
                Err(reason) => {
                    warn!(%ns, %name, external_name = %spec.external_name, %reason, "bad external name; no CNAME");
                }
            },
            ServiceType::Unspecified
            | ServiceType::ClusterIp
            | ServiceType::NodePort
            | ServiceType::LoadBalancer => {
                let vip = svc.status.as_ref().map(|s| s.cluster_ip.as_str());
                let Some(vip) = vip.and_then(|v| v.parse::<IpAddr>().ok()) else {
                    return; // no VIP yet: the name exists, without data
                };
                self.add(&base, Rd::of_ip(vip));
                for port in &spec.ports {
                    let (Some(owner), Some(port)) = (
                        srv_owner(&base, &port.name, port.protocol()),
                        port16(port.port),
                    ) else {
                        continue;
                    };
                    let target = key_of(&base);
                    self.add(&owner, Rd::Srv { port, target });
                }
            }
        }
    }

    /// A headless name: standalone Endpoints (`svc` = None) take SRV ports
    /// from each address's own named ports.
    fn headless(
        &mut self,
        zone: &Name,
        ns: &str,
        name: &str,
        replicas: &[Replica<'_>],
        svc: Option<&Service>,
    ) {
        let Some(base) = label(zone, ns).and_then(|n| label(&n, name)) else {
            warn!(%ns, %name, "endpoints name is not a DNS name; no records");
            return;
        };
        self.touch(&base);
        self.headless_at(&base, replicas, svc);
    }

    fn headless_at(&mut self, base: &Name, replicas: &[Replica<'_>], svc: Option<&Service>) {
        for r in replicas {
            self.add(base, Rd::of_ip(r.ip));
            let Some(host) = label(base, &r.host) else {
                continue;
            };
            self.add(&host, Rd::of_ip(r.ip));
            // (port name, protocol, port) of this replica's SRV records.
            let ports: Vec<(&str, Protocol, u32)> = match svc.and_then(|s| s.spec.as_ref()) {
                Some(spec) => spec
                    .ports
                    .iter()
                    .map(|p| {
                        let target = p.effective_target_port();
                        (p.name.as_str(), p.protocol(), target)
                    })
                    .collect(),
                None => r
                    .ports
                    .iter()
                    .map(|p| (p.name.as_str(), p.protocol(), p.port))
                    .collect(),
            };
            for (name, protocol, port) in ports {
                let (Some(owner), Some(port)) = (srv_owner(base, name, protocol), port16(port))
                else {
                    continue;
                };
                let target = key_of(&host);
                self.add(&owner, Rd::Srv { port, target });
            }
        }
    }

    /// PTR for a VIP inside the service CIDR, pointing into `zone` (the
    /// first forward zone).
    fn ptr(&mut self, zone: &Name, ns: &str, name: &str, svc: &Service, cidr: Ipv4Net) {
        let has_vip = svc
            .spec
            .as_ref()
            .is_none_or(|s| skymesh_proto::validate::service_type_has_vip(s.r#type()));
        if !has_vip || zone.is_root() {
            return;
        }
        let Some(Ok(IpAddr::V4(vip))) = svc.status.as_ref().map(|s| s.cluster_ip.parse::<IpAddr>())
        else {
            return;
        };
        if !cidr.contains(&vip) {
            return;
        }
        let (Some(owner), Some(target)) = (
            ptr_name(vip),
            label(&Name::new(), ns).and_then(|n| label(&n, name)),
        ) else {
            return;
        };
        self.add(&owner, Rd::Ptr(key_of(&target)));
    }

    /// Freezes the records; every ancestor of a name up to its zone exists
    /// (empty non-terminals, RFC 8020).
    fn finish(mut self, zones: Vec<Zone>, primary: Name, ttl: u32, serial: u32) -> RecordSet {
        // Keys of the reverse zones, innermost first (as `zones`).
        let zone_keys: Vec<NameKey> = zones
            .iter()
            .filter(|z| !z.forward)
            .map(|z| labels_key(ABSOLUTE, z.name.iter(), &mut [0; MAX_KEY]).into())
            .collect();
        let mut missing: HashSet<NameKey> = HashSet::new();
        for key in self.nodes.keys() {
            let starts = label_starts(key);
            // The label where the name's zone starts: the relative names'
            // apex is after their last label.
            // (an apex exists: it has SOA and NS).
            let apex = if key[0] == RELATIVE {
                Some(starts.len())
            } else {
                zone_keys.iter().find_map(|z| {
                    starts
                        .iter()
                        .position(|&i| key[0] == z[0] && key[i..] == z[1..])
                })
            };
            let Some(apex) = apex else {
                continue;
            };
            // Every ancestor below the name, down to the zone's apex.
            for &i in starts.get(1..apex).unwrap_or_default() {
                let mut ancestor = Vec::with_capacity(1 + key.len() - i);
                ancestor.push(key[0]);
                ancestor.extend_from_slice(&key[i..]);
                if !self.nodes.contains_key(ancestor.as_slice()) {
                    missing.insert(ancestor.into());
                }
            }
        }
        self.nodes.reserve(missing.len());
        for name in missing {
            self.nodes.insert(name, Box::default());
        }
        RecordSet {
            zones,
            primary,
            nodes: self.nodes,
            ttl,
            serial,
        }
    }
}
