//! The netmap as meshd holds it: the coordinator's snapshot with every delta
//! applied, keyed for lookup. Pure; also the on-disk cache format (the
//! snapshot proto) that makes meshd fail-static across restarts.

use std::collections::BTreeMap;
use std::collections::btree_map;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use base64::Engine as _;
use ipnet::Ipv4Net;

use prost::Message as _;

use crate::core::route::parse_allowed;
use skymesh_proto::v1::{
    Endpoints, Job, JobAddress, Netmap, NetmapUpdate, Peer, Service, netmap_change::Change,
    netmap_update::Update,
};

/// `(namespace, name)`.
pub type Key = (String, String);

/// The newest `Netmap.format` this meshd knows: 1, with the other
/// clusters' job addresses. A state of an older format is not resumed
/// from (see [`NetState::resume_from`]).
pub const NETMAP_FORMAT: u32 = 1;

/// A job address as kept: `None` for an IP that does not parse (the
/// coordinator validates it; such an entry would name nothing).
fn address(a: JobAddress) -> Option<(Key, Ipv4Addr)> {
    let ip = a.ip.parse().ok()?;
    Some(((a.namespace, a.name), ip))
}

fn key_of(m: &Option<skymesh_proto::v1::ObjectMeta>) -> Key {
    m.as_ref()
        .map(|m| (m.namespace.clone(), m.name.clone()))
        .unwrap_or_default()
}

/// Objects by key, each behind an `Arc`. meshd holds the netmap twice (the
/// netmap task's copy and the one it publishes, cloned on every update) and
/// hands every service to DNS on every update: with `Arc`s those copy a
/// pointer per service, not the service.
#[derive(Debug, Clone, PartialEq)]
pub struct Shared<V>(BTreeMap<Key, Arc<V>>);

impl<V> Default for Shared<V> {
    fn default() -> Self {
        Shared(BTreeMap::new())
    }
}

impl<V> Shared<V> {
    /// Inserts (or replaces) the object at `key`.
    pub fn insert(&mut self, key: Key, v: impl Into<Arc<V>>) -> Option<Arc<V>> {
        self.0.insert(key, v.into())
    }

    pub fn remove(&mut self, key: &Key) -> Option<Arc<V>> {
        self.0.remove(key)
    }

    pub fn clear(&mut self) {
        self.0.clear();
    }

    pub fn get(&self, key: &Key) -> Option<&Arc<V>> {
        self.0.get(key)
    }

    pub fn contains_key(&self, key: &Key) -> bool {
        self.0.contains_key(key)
    }

    /// In key order.
    pub fn iter(&self) -> btree_map::Iter<'_, Key, Arc<V>> {
        self.0.iter()
    }

    /// In key order.
    pub fn values(&self) -> btree_map::Values<'_, Key, Arc<V>> {
        self.0.values()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'a, V> IntoIterator for &'a Shared<V> {
    type Item = (&'a Key, &'a Arc<V>);
    type IntoIter = btree_map::Iter<'a, Key, Arc<V>>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl<V> FromIterator<(Key, V)> for Shared<V> {
    fn from_iter<I: IntoIterator<Item = (Key, V)>>(iter: I) -> Self {
        Shared(iter.into_iter().map(|(k, v)| (k, Arc::new(v))).collect())
    }
}

/// One cluster's view of the mesh.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NetState {
    /// Revision of the last update applied.
    pub revision: u64,
    pub cluster: String,
    pub overlay_ip: String,
    pub overlay_cidr: String,
    pub service_cidr: String,
    pub workload_cidrs: Vec<String>,
    pub peers: BTreeMap<String, Peer>,
    pub services: Shared<Service>,
    /// Behind `Arc`s as the services: DNS views share them too.
    pub endpoints: Shared<Endpoints>,
    /// Jobs of this cluster.
    pub jobs: BTreeMap<Key, Job>,
    /// The coordinator's netmap format (`Netmap.format`) this state was
    /// built from.
    pub format: u32,
    /// Jobs of the other clusters: their addresses only (for the service
    /// policy; about 100 bytes each).
    pub job_addresses: BTreeMap<Key, Ipv4Addr>,
    /// The network fields above, parsed: kept in step by
    /// [`NetState::apply`] (a peer is parsed when it arrives), rebuilt by
    /// [`NetState::reparse`] after the fields are set by hand.
    pub net: Net,
}

/// The netmap's addresses, CIDRs, keys and endpoints, parsed once when they
/// arrive, by one rule for every address field ([`parse_allowed`]: a CIDR,
/// host bits cleared, or a bare address as its /32). What does not parse
/// is left out with a warning, once: the coordinator validates every
/// field, so that is a bug or a newer format, not input to act on.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Net {
    pub overlay_ip: Option<Ipv4Addr>,
    pub overlay_cidr: Option<Ipv4Net>,
    pub service_cidr: Option<Ipv4Net>,
    /// This cluster's workload CIDRs.
    pub workload_cidrs: Vec<Ipv4Net>,
    /// By cluster name, as [`NetState::peers`].
    pub peers: BTreeMap<String, PeerNet>,
}

/// One peer gateway, parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerNet {
    /// Public and pre-shared key; `None` if either is not 32 bytes of
    /// base64: such a peer gets no tunnel.
    pub keys: Option<([u8; 32], [u8; 32])>,
    /// Where to send first (the peer may roam from it).
    pub endpoint: Option<SocketAddr>,
    pub overlay_ip: Option<Ipv4Addr>,
    /// What the tunnel to it carries: its overlay IP and workload CIDRs.
    pub allowed_ips: Vec<Ipv4Net>,
}

impl PeerNet {
    pub fn parse(p: &Peer) -> PeerNet {
        let b64 = base64::engine::general_purpose::STANDARD;
        let key = |v: &str| {
            b64.decode(v)
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
        };
        let keys = key(&p.public_key).zip(key(&p.preshared_key));
        if keys.is_none() {
            tracing::warn!(peer = %p.cluster, "peer has an invalid key; it gets no tunnel");
        }
        PeerNet {
            keys,
            endpoint: p.endpoint.parse().ok(),
            overlay_ip: p.overlay_ip.parse().ok(),
            allowed_ips: parse_nets(&p.cluster, "allowed_ips", &p.allowed_ips),
        }
    }
}

/// `values` by [`parse_allowed`]; each that does not parse is left out
/// with a warning naming its cluster and field.
fn parse_nets(cluster: &str, field: &'static str, values: &[String]) -> Vec<Ipv4Net> {
    values
        .iter()
        .filter_map(|v| {
            let n = parse_allowed(v);
            if n.is_none() {
                tracing::warn!(%cluster, field, value = %v, "not an IPv4 address or CIDR; ignored");
            }
            n
        })
        .collect()
}

impl Net {
    /// The parsed form of `s`'s network fields and peers.
    fn parse(s: &NetState) -> Net {
        Net {
            overlay_ip: s.overlay_ip.parse().ok(),
            overlay_cidr: s.overlay_cidr.parse::<Ipv4Net>().ok().map(|n| n.trunc()),
            service_cidr: s.service_cidr.parse::<Ipv4Net>().ok().map(|n| n.trunc()),
            workload_cidrs: parse_nets(&s.cluster, "workload_cidrs", &s.workload_cidrs),
            peers: s
                .peers
                .iter()
                .map(|(name, p)| (name.clone(), PeerNet::parse(p)))
                .collect(),
        }
    }

    /// This gateway's own networks: its overlay IP and workload CIDRs.
    pub fn local_nets(&self) -> Vec<Ipv4Net> {
        self.overlay_ip
            .map(Ipv4Net::from)
            .into_iter()
            .chain(self.workload_cidrs.iter().copied())
            .collect()
    }
}

impl NetState {
    /// The state a snapshot describes.
    pub fn from_snapshot(revision: u64, nm: Netmap) -> Self {
        NetState {
            revision,
            cluster: nm.cluster,
            overlay_ip: nm.overlay_ip,
            overlay_cidr: nm.overlay_cidr,
            service_cidr: nm.service_cidr,
            workload_cidrs: nm.workload_cidrs,
            peers: nm
                .peers
                .into_iter()
                .map(|p| (p.cluster.clone(), p))
                .collect(),
            services: nm
                .services
                .into_iter()
                .map(|s| (key_of(&s.metadata), s))
                .collect(),
            endpoints: nm
                .endpoints
                .into_iter()
                .map(|e| (key_of(&e.metadata), e))
                .collect(),
            jobs: nm
                .jobs
                .into_iter()
                .map(|j| (key_of(&j.metadata), j))
                .collect(),
            job_addresses: nm.job_addresses.into_iter().filter_map(address).collect(),
            format: nm.format,
            net: Net::default(),
        }
        .reparsed()
    }

    /// Parses the network fields again ([`NetState::net`]), after they were
    /// set by hand.
    pub fn reparse(&mut self) {
        self.net = Net::parse(self);
    }

    /// [`NetState::reparse`], by value.
    pub fn reparsed(mut self) -> Self {
        self.reparse();
        self
    }

    /// The revision to resume the netmap stream from: the last applied,
    /// unless this state was built from an older netmap format (a cache
    /// from before an upgrade, or an older coordinator): then 0, a
    /// snapshot, as deltas would not bring what that format left out.
    pub fn resume_from(&self) -> u64 {
        if self.format >= NETMAP_FORMAT {
            self.revision
        } else {
            0
        }
    }

    /// Applies one update from the netmap stream.
    pub fn apply(&mut self, u: NetmapUpdate) {
        match u.update {
            Some(Update::Snapshot(nm)) => *self = NetState::from_snapshot(u.resource_version, nm),
            Some(Update::Delta(d)) => {
                for c in d.changes.into_iter().filter_map(|c| c.change) {
                    match c {
                        Change::PeerUpsert(p) => {
                            self.net.peers.insert(p.cluster.clone(), PeerNet::parse(&p));
                            self.peers.insert(p.cluster.clone(), p);
                        }
                        Change::PeerRemoved(name) => {
                            self.net.peers.remove(&name);
                            self.peers.remove(&name);
                        }
                        Change::ServiceUpsert(s) => {
                            self.services.insert(key_of(&s.metadata), s);
                        }
                        Change::ServiceRemoved(r) => {
                            self.services.remove(&(r.namespace, r.name));
                        }
                        Change::EndpointsUpsert(e) => {
                            self.endpoints.insert(key_of(&e.metadata), e);
                        }
                        Change::EndpointsRemoved(r) => {
                            self.endpoints.remove(&(r.namespace, r.name));
                        }
                        // A job is here or elsewhere, never both: one
                        // that moves comes as the other kind of upsert.
                        Change::JobUpsert(j) => {
                            let key = key_of(&j.metadata);
                            self.job_addresses.remove(&key);
                            self.jobs.insert(key, j);
                        }
                        Change::JobAddressUpsert(a) => {
                            let key = (a.namespace.clone(), a.name.clone());
                            self.jobs.remove(&key);
                            match address(a) {
                                Some((key, ip)) => self.job_addresses.insert(key, ip),
                                None => self.job_addresses.remove(&key),
                            };
                        }
                        Change::JobRemoved(r) => {
                            let key = (r.namespace, r.name);
                            self.jobs.remove(&key);
                            self.job_addresses.remove(&key);
                        }
                    }
                }
                self.revision = u.resource_version;
            }
            None => {}
        }
    }

    /// The state as a snapshot (for the disk cache).
    pub fn to_snapshot(&self) -> Netmap {
        Netmap {
            cluster: self.cluster.clone(),
            overlay_ip: self.overlay_ip.clone(),
            overlay_cidr: self.overlay_cidr.clone(),
            service_cidr: self.service_cidr.clone(),
            workload_cidrs: self.workload_cidrs.clone(),
            peers: self.peers.values().cloned().collect(),
            services: self.services.values().map(|s| Service::clone(s)).collect(),
            endpoints: self
                .endpoints
                .values()
                .map(|e| Endpoints::clone(e))
                .collect(),
            jobs: self.jobs.values().cloned().collect(),
            job_addresses: self.job_address_list(),
            format: self.format,
        }
    }

    /// Cache encoding: a `NetmapUpdate` holding the snapshot.
    ///
    /// Written straight from the shared services and endpoints: the
    /// snapshot message would hold a copy of each (4 MiB for 10,000
    /// services, made every [`crate::io::control::CACHE_INTERVAL`] while
    /// the netmap changes). The bytes decode as [`NetState::to_snapshot`]'s
    /// would; its repeated fields come after the rest.
    pub fn encode(&self) -> Vec<u8> {
        /// Field keys (number << 3 | wire type 2) of `Netmap.services`,
        /// `Netmap.endpoints` and `NetmapUpdate.snapshot`.
        const SERVICES: u8 = 7 << 3 | 2;
        const ENDPOINTS: u8 = 8 << 3 | 2;
        const SNAPSHOT: u8 = 2 << 3 | 2;
        fn delimited_len(len: usize) -> usize {
            1 + prost::length_delimiter_len(len) + len
        }
        let head = Netmap {
            cluster: self.cluster.clone(),
            overlay_ip: self.overlay_ip.clone(),
            overlay_cidr: self.overlay_cidr.clone(),
            service_cidr: self.service_cidr.clone(),
            workload_cidrs: self.workload_cidrs.clone(),
            peers: self.peers.values().cloned().collect(),
            services: Vec::new(),
            endpoints: Vec::new(),
            jobs: self.jobs.values().cloned().collect(),
            job_addresses: self.job_address_list(),
            format: self.format,
        };
        let services = self.services.values().map(|s| &**s);
        let endpoints = self.endpoints.values().map(|e| &**e);
        let len = head.encoded_len()
            + services
                .clone()
                .map(|s| delimited_len(s.encoded_len()))
                .sum::<usize>()
            + endpoints
                .clone()
                .map(|e| delimited_len(e.encoded_len()))
                .sum::<usize>();
        let version = NetmapUpdate {
            resource_version: self.revision,
            update: None,
        };
        let mut out = Vec::with_capacity(version.encoded_len() + delimited_len(len));
        // Encoding into a Vec cannot fail: it grows.
        let grows = "a Vec grows to take any message";
        version.encode(&mut out).expect(grows);
        out.push(SNAPSHOT);
        prost::encode_length_delimiter(len, &mut out).expect(grows);
        head.encode(&mut out).expect(grows);
        for s in services {
            out.push(SERVICES);
            s.encode_length_delimited(&mut out).expect(grows);
        }
        for e in endpoints {
            out.push(ENDPOINTS);
            e.encode_length_delimited(&mut out).expect(grows);
        }
        out
    }

    fn job_address_list(&self) -> Vec<JobAddress> {
        self.job_addresses
            .iter()
            .map(|((namespace, name), ip)| JobAddress {
                namespace: namespace.clone(),
                name: name.clone(),
                ip: ip.to_string(),
            })
            .collect()
    }

    /// Decodes [`NetState::encode`]'s output.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let u = NetmapUpdate::decode(bytes).ok()?;
        match u.update {
            Some(Update::Snapshot(nm)) => Some(NetState::from_snapshot(u.resource_version, nm)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skymesh_proto::v1::{NetmapChange, NetmapDelta, ObjectRef};

    #[test]
    fn deltas_apply_and_cache_round_trips() {
        let mut s = NetState::default();
        s.apply(NetmapUpdate {
            resource_version: 5,
            update: Some(Update::Snapshot(Netmap {
                cluster: "a".into(),
                peers: vec![Peer {
                    cluster: "b".into(),
                    ..Default::default()
                }],
                ..Default::default()
            })),
        });
        assert_eq!(s.peers.len(), 1);
        s.apply(NetmapUpdate {
            resource_version: 7,
            update: Some(Update::Delta(NetmapDelta {
                changes: vec![
                    NetmapChange {
                        change: Some(Change::PeerRemoved("b".into())),
                    },
                    NetmapChange {
                        change: Some(Change::PeerUpsert(Peer {
                            cluster: "c".into(),
                            ..Default::default()
                        })),
                    },
                    NetmapChange {
                        change: Some(Change::ServiceRemoved(ObjectRef::default())),
                    },
                ],
            })),
        });
        assert_eq!(s.revision, 7);
        assert_eq!(s.peers.keys().collect::<Vec<_>>(), ["c"]);
        // A snapshot of an older format (no job addresses) is not resumed
        // from, one of this format is, also from the cache.
        assert_eq!(s.resume_from(), 0);
        s.format = NETMAP_FORMAT;
        assert_eq!(NetState::decode(&s.encode()).unwrap().resume_from(), 7);
        // A job is here or elsewhere, never both.
        let key = ("shop".to_string(), "w".to_string());
        let address = JobAddress {
            namespace: "shop".into(),
            name: "w".into(),
            ip: "10.2.0.9".into(),
        };
        let job = Job {
            metadata: Some(skymesh_proto::v1::ObjectMeta {
                namespace: "shop".into(),
                name: "w".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let change = |c| NetmapUpdate {
            resource_version: 8,
            update: Some(Update::Delta(NetmapDelta {
                changes: vec![NetmapChange { change: Some(c) }],
            })),
        };
        s.apply(change(Change::JobAddressUpsert(address.clone())));
        assert_eq!(s.job_addresses.get(&key), Some(&Ipv4Addr::new(10, 2, 0, 9)));
        s.apply(change(Change::JobUpsert(job)));
        assert!(s.jobs.contains_key(&key) && s.job_addresses.is_empty());
        s.apply(change(Change::JobAddressUpsert(address)));
        assert!(s.jobs.is_empty() && s.job_addresses.contains_key(&key));
        assert_eq!(NetState::decode(&s.encode()).as_ref(), Some(&s));
        s.apply(change(Change::JobRemoved(ObjectRef {
            namespace: "shop".into(),
            name: "w".into(),
        })));
        assert!(s.jobs.is_empty() && s.job_addresses.is_empty());
        assert_eq!(NetState::decode(&s.encode()), Some(s));
    }

    /// The network fields are parsed once, by one rule, and peer deltas
    /// keep the parsed view equal to a fresh parse of the whole state.
    #[test]
    fn the_parsed_view_follows_snapshots_and_deltas() {
        let key = base64::engine::general_purpose::STANDARD.encode([9u8; 32]);
        let peer = |name: &str, allowed: &[&str], psk: &str| Peer {
            cluster: name.into(),
            public_key: key.clone(),
            preshared_key: psk.into(),
            endpoint: "192.0.2.2:51820".into(),
            overlay_ip: "100.64.0.2".into(),
            allowed_ips: allowed.iter().map(|a| a.to_string()).collect(),
        };
        let mut s = NetState::default();
        s.apply(NetmapUpdate {
            resource_version: 1,
            update: Some(Update::Snapshot(Netmap {
                cluster: "a".into(),
                overlay_ip: "100.64.0.1".into(),
                overlay_cidr: "100.64.0.0/10".into(),
                service_cidr: "100.65.1.2/16".into(),
                workload_cidrs: vec!["10.1.2.3/16".into(), "bad".into()],
                peers: vec![peer("b", &["100.64.0.2", "10.2.0.0/16", "x/99"], &key)],
                ..Default::default()
            })),
        });
        let n = |v: &str| v.parse::<Ipv4Net>().unwrap();
        assert_eq!(s.net.overlay_ip, Some(Ipv4Addr::new(100, 64, 0, 1)));
        // Host bits cleared, what does not parse left out.
        assert_eq!(s.net.service_cidr, Some(n("100.65.0.0/16")));
        assert_eq!(s.net.workload_cidrs, [n("10.1.0.0/16")]);
        assert_eq!(s.net.local_nets(), [n("100.64.0.1/32"), n("10.1.0.0/16")]);
        let b = &s.net.peers["b"];
        assert_eq!(b.keys, Some(([9; 32], [9; 32])));
        assert_eq!(b.endpoint, Some("192.0.2.2:51820".parse().unwrap()));
        assert_eq!(b.allowed_ips, [n("100.64.0.2/32"), n("10.2.0.0/16")]);
        // A peer whose key does not parse is kept without keys (no tunnel).
        s.apply(NetmapUpdate {
            resource_version: 2,
            update: Some(Update::Delta(NetmapDelta {
                changes: vec![
                    NetmapChange {
                        change: Some(Change::PeerUpsert(peer("c", &["10.3.0.0/16"], "short"))),
                    },
                    NetmapChange {
                        change: Some(Change::PeerRemoved("b".into())),
                    },
                ],
            })),
        });
        assert_eq!(s.net.peers.keys().collect::<Vec<_>>(), ["c"]);
        assert_eq!(s.net.peers["c"].keys, None);
        assert_eq!(s.net, s.clone().reparsed().net);
    }

    /// Issue #18: every gateway learns every other cluster's jobs, so their
    /// share of a netmap stays small: 10,000 (names like a replica's) take
    /// under 40 bytes each on the wire.
    #[test]
    fn ten_thousand_job_addresses_stay_small() {
        let mut s = NetState::default();
        for i in 0..10_000u32 {
            let ip = Ipv4Addr::from(0x0a02_0000 + i);
            s.job_addresses
                .insert(("default".into(), format!("web-{i:05}")), ip);
        }
        let bytes = s.encode().len();
        eprintln!("10,000 job addresses: {bytes} bytes encoded");
        assert!(bytes < 400_000, "{bytes}");
        assert_eq!(NetState::decode(&s.encode()), Some(s));
    }

    #[test]
    fn cache_encoding_decodes_as_the_snapshot() {
        use skymesh_proto::v1::ObjectMeta;
        let meta = |name: &str| {
            Some(ObjectMeta {
                name: name.into(),
                namespace: "default".into(),
                ..Default::default()
            })
        };
        let mut s = NetState {
            revision: 300,
            cluster: "a".into(),
            overlay_ip: "100.64.0.1".into(),
            workload_cidrs: vec!["10.1.0.0/16".into()],
            ..Default::default()
        };
        s.peers.insert(
            "b".into(),
            Peer {
                cluster: "b".into(),
                ..Default::default()
            },
        );
        for i in 0..200 {
            let name = format!("svc-{i}");
            let key = ("default".to_string(), name.clone());
            s.services.insert(
                key.clone(),
                Service {
                    metadata: meta(&name),
                    ..Default::default()
                },
            );
            if i % 2 == 0 {
                s.endpoints.insert(
                    key,
                    Endpoints {
                        metadata: meta(&name),
                        ..Default::default()
                    },
                );
            }
        }
        s.jobs.insert(
            ("default".into(), "j".into()),
            Job {
                metadata: meta("j"),
                ..Default::default()
            },
        );
        s.job_addresses
            .insert(("shop".into(), "k".into()), Ipv4Addr::new(10, 2, 0, 7));
        s.reparse();
        let bytes = s.encode();
        let snapshot = NetmapUpdate {
            resource_version: s.revision,
            update: Some(Update::Snapshot(s.to_snapshot())),
        };
        assert_eq!(bytes.len(), snapshot.encoded_len());
        assert_eq!(NetmapUpdate::decode(bytes.as_slice()).unwrap(), snapshot);
        assert_eq!(NetState::decode(&bytes), Some(s));
    }
}
