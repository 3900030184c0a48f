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
#[derive(Debug, Clone)]
pub struct RecordSet {
    /// Served zone origins, longest first (so the innermost zone matches).
    zones: Vec<LowerName>,
    /// Owner name ([`name_key`]) → its RRsets (empty for empty
    /// non-terminals).
    nodes: HashMap<NameKey, Vec<Arc<RrSet>>>,
    serial: u32,
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
        let mut b = Builder {
            ttl: config.ttl,
            nodes: HashMap::new(),
        };

        // Apexes: SOA + NS. Reverse zones name the first forward zone's server.
        let fallback = Name::root();
        let primary = forward.first().unwrap_or(&fallback);
        for zone in forward.iter().chain(&reverse) {
            let owner = if reverse.contains(zone) {
                primary
            } else {
                zone
            };
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
            b.add(zone, RData::SOA(soa));
            b.add(zone, RData::NS(NS(mname)));
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
            for zone in &forward {
                b.service(zone, ns, &meta.name, svc, ep, view);
            }
            if let Some(cidr) = config.service_cidr {
                b.ptr(primary, ns, &meta.name, svc, cidr);
            }
        }

        for ep in &view.endpoints {
            let Some(meta) = ep.metadata.as_ref() else {
                continue;
            };
            let ns = namespace(&meta.namespace);
            if services.contains(&(ns, meta.name.as_str())) || !endpoints_exposed(ep) {
                continue;
            }
            let replicas = replicas(ep, ns, view);
            for zone in &forward {
                b.headless(zone, ns, &meta.name, &replicas, None);
            }
        }

        // Glue for the NS name, unless a service already owns that name.
        let ns_ip = config
            .nameserver_ip
            .or_else(|| Some(config.listen.ip()).filter(|ip| !ip.is_unspecified()));
        if let Some(ip) = ns_ip {
            for zone in &forward {
                let name = ns_name(zone);
                if !b
                    .nodes
                    .contains_key(name_key(&LowerName::new(&name), &mut [0; MAX_KEY]))
                {
                    b.add(&name, addr_rdata(ip));
                }
            }
        }

        let mut zones: Vec<LowerName> =
            forward.iter().chain(&reverse).map(LowerName::new).collect();
        zones.sort_by_key(|z| std::cmp::Reverse(z.num_labels()));
        b.finish(zones, serial)
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

    /// Number of owner names (including empty non-terminals).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether there are no names at all (no zones configured).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The innermost served zone containing `name`.
    pub fn zone_of(&self, name: &LowerName) -> Option<&LowerName> {
        self.zones.iter().find(|z| z.zone_of(name))
    }

    /// Answers `qtype` at `name` (case-insensitive, as every [`LowerName`]).
    ///
    /// Unknown names inside a zone are NXDOMAIN, known names without that
    /// type NODATA, both with the zone's SOA in authority. A CNAME answers
    /// every type but CNAME and is followed while its target is served here.
    /// Names outside every zone are REFUSED (the server forwards those before
    /// asking).
    pub fn lookup(&self, name: &LowerName, qtype: RecordType) -> Answer {
        let Some(zone) = self.zone_of(name) else {
            return Answer::refused();
        };
        let soa = self.rrset(zone, RecordType::SOA).into_iter().collect();
        let Some(node) = self.node(name) else {
            return Answer {
                rcode: ResponseCode::NXDomain,
                answers: Vec::new(),
                authority: soa,
            };
        };

        let mut answers: Vec<Arc<RrSet>> = Vec::new();
        if qtype == RecordType::ANY {
            answers.extend(node.iter().cloned());
        } else if let Some(set) = find(node, qtype) {
            answers.push(set.clone());
        } else if let Some(cname) = find(node, RecordType::CNAME) {
            answers.push(cname.clone());
            self.follow_cname(cname, qtype, &mut answers);
        }

        let authority = if answers.is_empty() { soa } else { Vec::new() };
        Answer {
            rcode: ResponseCode::NoError,
            answers,
            authority,
        }
    }

    /// Appends the RRsets a CNAME chain leads to inside the served zones.
    fn follow_cname(&self, first: &Arc<RrSet>, qtype: RecordType, answers: &mut Vec<Arc<RrSet>>) {
        let mut cname = first.clone();
        for _ in 0..MAX_CNAME_CHAIN {
            let Some(target) = cname_target(&cname) else {
                return;
            };
            let target = LowerName::new(target);
            if self.zone_of(&target).is_none() {
                return;
            }
            let Some(node) = self.node(&target) else {
                return;
            };
            if let Some(set) = find(node, qtype) {
                answers.push(set.clone());
                return;
            }
            let Some(next) = find(node, RecordType::CNAME) else {
                return;
            };
            if answers.iter().any(|a| Arc::ptr_eq(a, next)) {
                return; // a loop
            }
            answers.push(next.clone());
            cname = next.clone();
        }
    }

    fn rrset(&self, name: &LowerName, rtype: RecordType) -> Option<Arc<RrSet>> {
        self.node(name).and_then(|n| find(n, rtype)).cloned()
    }

    fn node(&self, name: &LowerName) -> Option<&Vec<Arc<RrSet>>> {
        self.nodes.get(name_key(name, &mut [0; MAX_KEY]))
    }
}

/// The target of a CNAME RRset, if it holds one.
pub(crate) fn cname_target(set: &RrSet) -> Option<&Name> {
    set.records_without_rrsigs().find_map(|r| match &r.data {
        RData::CNAME(CNAME(target)) => Some(target),
        _ => None,
    })
}

/// An owner name as a key of [`RecordSet::nodes`]: whether it is fully
/// qualified, then each label after its length, as a [`LowerName`] hashes
/// and compares. 16 bytes in each slot of the table and the bytes on the
/// heap, where a `LowerName` takes 80 in each slot (and a heap copy of its
/// labels past 32 bytes): with 10,000 services the table has 131,072 slots.
type NameKey = Box<[u8]>;

/// Room for the longest key: the flag and a name's at most 255 octets.
const MAX_KEY: usize = 1 + Name::MAX_LENGTH;

/// The key of `name` (already lower case), written into `buf`.
fn name_key<'b>(name: &LowerName, buf: &'b mut [u8; MAX_KEY]) -> &'b [u8] {
    buf[0] = u8::from(name.is_fqdn());
    let mut n = 1;
    for label in name.iter() {
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

fn find(node: &[Arc<RrSet>], rtype: RecordType) -> Option<&Arc<RrSet>> {
    node.iter().find(|s| s.record_type() == rtype)
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

fn addr_rdata(ip: IpAddr) -> RData {
    match ip {
        IpAddr::V4(v4) => RData::A(A(v4)),
        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
    }
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

/// The same set as `with_ttl` + `add_rdata`, but its record list holds
/// exactly one record: `add_rdata` on an empty set reserves room for four
/// (640 bytes), and most sets here hold one.
fn new_set(name: &Name, ttl: u32, rdata: RData) -> Arc<RrSet> {
    Arc::new(RrSet::from(Record::from_rdata(name.clone(), ttl, rdata)))
}

struct Builder {
    ttl: u32,
    /// Sets are shared only once built ([`Builder::finish`]): until then
    /// each `Arc` here is the only one, and `Arc::make_mut` never copies.
    nodes: HashMap<NameKey, Vec<Arc<RrSet>>>,
}

impl Builder {
    fn add(&mut self, name: &Name, rdata: RData) {
        let mut buf = [0; MAX_KEY];
        let key = name_key(&LowerName::new(name), &mut buf);
        let rtype = rdata.record_type();
        let ttl = self.ttl;
        let Some(sets) = self.nodes.get_mut(key) else {
            self.nodes
                .insert(key.into(), vec![new_set(name, ttl, rdata)]);
            return;
        };
        if let Some(set) = sets.iter_mut().find(|s| s.record_type() == rtype) {
            Arc::make_mut(set).add_rdata(rdata);
        } else {
            sets.push(new_set(name, ttl, rdata));
        }
    }

    /// Makes `name` exist without records.
    fn touch(&mut self, name: &Name) {
        let mut buf = [0; MAX_KEY];
        let key = name_key(&LowerName::new(name), &mut buf);
        if !self.nodes.contains_key(key) {
            self.nodes.insert(key.into(), Vec::new());
        }
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
                Ok(target) => self.add(&base, RData::CNAME(CNAME(target))),
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
                self.add(&base, addr_rdata(vip));
                for port in &spec.ports {
                    let (Some(owner), Some(p)) = (
                        srv_owner(&base, &port.name, port.protocol()),
                        port16(port.port),
                    ) else {
                        continue;
                    };
                    let srv = SRV::new(SRV_PRIORITY, SRV_WEIGHT, p, base.clone());
                    self.add(&owner, RData::SRV(srv));
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
            let rdata = addr_rdata(r.ip);
            self.add(base, rdata.clone());
            let Some(host) = label(base, &r.host) else {
                continue;
            };
            self.add(&host, rdata);
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
                let srv = SRV::new(SRV_PRIORITY, SRV_WEIGHT, port, host.clone());
                self.add(&owner, RData::SRV(srv));
            }
        }
    }

    /// PTR for a VIP inside the service CIDR, pointing into `zone`.
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
        let (Some(owner), Some(target)) =
            (ptr_name(vip), label(zone, ns).and_then(|n| label(&n, name)))
        else {
            return;
        };
        self.add(&owner, RData::PTR(PTR(target)));
    }

    /// Freezes the records; every ancestor of a name up to its zone exists
    /// (empty non-terminals, RFC 8020).
    fn finish(mut self, zones: Vec<LowerName>, serial: u32) -> RecordSet {
        // Keys of the zones, innermost first (as `zones`).
        let zone_keys: Vec<NameKey> = zones
            .iter()
            .map(|z| name_key(z, &mut [0; MAX_KEY]).into())
            .collect();
        let mut missing: HashSet<NameKey> = HashSet::new();
        for key in self.nodes.keys() {
            let starts = label_starts(key);
            // The label where the innermost zone holding the name starts.
            let Some(apex) = zone_keys.iter().find_map(|z| {
                starts
                    .iter()
                    .position(|&i| key[0] == z[0] && key[i..] == z[1..])
            }) else {
                continue;
            };
            // Every ancestor below the name, down to the zone's apex.
            for &i in starts.get(1..=apex).unwrap_or_default() {
                let mut ancestor = Vec::with_capacity(1 + key.len() - i);
                ancestor.push(key[0]);
                ancestor.extend_from_slice(&key[i..]);
                if !self.nodes.contains_key(ancestor.as_slice()) {
                    missing.insert(ancestor.into());
                }
            }
        }
        for name in missing {
            self.nodes.insert(name, Vec::new());
        }
        for sets in self.nodes.values_mut() {
            sets.shrink_to_fit();
        }
        self.nodes.shrink_to_fit();
        RecordSet {
            zones,
            nodes: self.nodes,
            serial,
        }
    }
}
