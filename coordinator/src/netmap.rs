//! What one cluster's gateway needs to know, built from the store: its
//! peers (with their pair's pre-shared key), every service and endpoints
//! object, its own jobs, and the other clusters' jobs' addresses. Pure: a
//! [`World`] of key-values in, a [`Netmap`] or a list of [`NetmapChange`]s
//! out.

use std::collections::{BTreeMap, BTreeSet};

use base64::Engine as _;
use skymesh_proto::v1::{
    Cluster, Job, JobAddress, Netmap, NetmapChange, ObjectRef, Peer, netmap_change::Change,
    object::Obj,
};
use skymesh_store::{Event, EventKind, KeyValue};

use crate::ipam;
use crate::keyspace::{CLUSTERS, ENDPOINTS, JOBS, PSKS, REGISTRY, SERVICES};
use crate::registry::decode;

/// The keys a netmap is built from (objects and PSKs), kept current by
/// applying store events.
#[derive(Debug, Default, Clone)]
pub struct World {
    kvs: BTreeMap<String, KeyValue>,
}

/// [`Netmap::format`] of the netmaps built here (1: with job addresses).
pub const NETMAP_FORMAT: u32 = 1;

/// Whether a key matters to netmaps.
pub fn relevant(key: &str) -> bool {
    key.starts_with(REGISTRY) || key.starts_with(PSKS)
}

impl World {
    /// A world from a range read.
    pub fn new(kvs: impl IntoIterator<Item = KeyValue>) -> Self {
        World {
            kvs: kvs
                .into_iter()
                .filter(|kv| relevant(&kv.key))
                .map(|kv| (kv.key.clone(), kv))
                .collect(),
        }
    }

    /// Applies one event.
    pub fn apply(&mut self, ev: &Event) {
        if !relevant(&ev.kv.key) {
            return;
        }
        match ev.kind {
            EventKind::Put => {
                self.kvs.insert(ev.kv.key.clone(), ev.kv.clone());
            }
            EventKind::Delete => {
                self.kvs.remove(&ev.kv.key);
            }
        }
    }

    fn cluster(&self, name: &str) -> Option<Cluster> {
        match decode(self.kvs.get(&format!("{CLUSTERS}{name}"))?)
            .ok()?
            .obj?
        {
            Obj::Cluster(c) => Some(c),
            _ => None,
        }
    }

    /// Whether the cluster still exists.
    pub fn has_cluster(&self, name: &str) -> bool {
        self.kvs.contains_key(&format!("{CLUSTERS}{name}"))
    }

    /// The peers of `me`: every other joined cluster with a PSK for the pair.
    pub fn peers(&self, me: &str) -> BTreeMap<String, Peer> {
        let mut out = BTreeMap::new();
        for (key, kv) in self.kvs.range(CLUSTERS.to_string()..) {
            if !key.starts_with(CLUSTERS) {
                break;
            }
            let Ok(o) = decode(kv) else { continue };
            let Some(Obj::Cluster(c)) = o.obj else {
                continue;
            };
            let name = o_name(&c);
            if name == me {
                continue;
            }
            let Some(st) = &c.status else { continue };
            if st.public_key.is_empty() || st.overlay_ip.is_empty() {
                continue;
            }
            let Some(psk) = self.kvs.get(&ipam::psk_key(me, &name)) else {
                continue;
            };
            let mut allowed = vec![format!("{}/32", st.overlay_ip)];
            allowed.extend(c.spec.iter().flat_map(|s| s.workload_cidrs.iter().cloned()));
            out.insert(
                name.clone(),
                Peer {
                    cluster: name,
                    public_key: st.public_key.clone(),
                    endpoint: st.endpoint.clone(),
                    overlay_ip: st.overlay_ip.clone(),
                    allowed_ips: allowed,
                    preshared_key: base64::engine::general_purpose::STANDARD.encode(&psk.value),
                },
            );
        }
        out
    }

    /// The full netmap of cluster `me`.
    pub fn snapshot(&self, me: &str, overlay_cidr: &str, service_cidr: &str) -> Netmap {
        let mine = self.cluster(me);
        let mut nm = Netmap {
            cluster: me.to_string(),
            overlay_ip: mine
                .as_ref()
                .and_then(|c| c.status.as_ref())
                .map(|s| s.overlay_ip.clone())
                .unwrap_or_default(),
            overlay_cidr: overlay_cidr.to_string(),
            service_cidr: service_cidr.to_string(),
            workload_cidrs: mine
                .and_then(|c| c.spec)
                .map(|s| s.workload_cidrs)
                .unwrap_or_default(),
            peers: self.peers(me).into_values().collect(),
            format: NETMAP_FORMAT,
            ..Default::default()
        };
        for kv in self.kvs.values() {
            let Ok(o) = decode(kv) else { continue };
            match o.obj {
                Some(Obj::Service(s)) => nm.services.push(s),
                Some(Obj::Endpoints(e)) => nm.endpoints.push(e),
                Some(Obj::Job(j)) if j.spec.as_ref().is_some_and(|s| s.cluster == me) => {
                    nm.jobs.push(j)
                }
                Some(Obj::Job(j)) => nm.job_addresses.extend(job_address(&j)),
                _ => {}
            }
        }
        nm
    }

    /// The changes for `me` caused by writes to `touched` keys, given the
    /// world after them. Peers are diffed against `sent` (and `sent` is
    /// updated); when `sent` is unknown (a resumed stream) every current
    /// peer is sent.
    pub fn changes(
        &self,
        me: &str,
        touched: &BTreeSet<String>,
        sent: &mut Option<BTreeMap<String, Peer>>,
    ) -> Vec<NetmapChange> {
        let mut out = Vec::new();
        let mut peers_touched = sent.is_none();
        let mut touched_clusters = BTreeSet::new();
        for key in touched {
            if let Some(c) = key.strip_prefix(CLUSTERS) {
                touched_clusters.insert(c);
            }
            if key.starts_with(CLUSTERS) || key.starts_with(PSKS) {
                peers_touched = true;
                continue;
            }
            let Some((ns, name)) = namespaced(key) else {
                continue;
            };
            let r = || ObjectRef {
                namespace: ns.to_string(),
                name: name.to_string(),
            };
            let obj = self
                .kvs
                .get(key)
                .and_then(|kv| decode(kv).ok())
                .and_then(|o| o.obj);
            let change = if key.starts_with(SERVICES) {
                match obj {
                    Some(Obj::Service(s)) => Change::ServiceUpsert(s),
                    _ => Change::ServiceRemoved(r()),
                }
            } else if key.starts_with(ENDPOINTS) {
                match obj {
                    Some(Obj::Endpoints(e)) => Change::EndpointsUpsert(e),
                    _ => Change::EndpointsRemoved(r()),
                }
            } else if key.starts_with(JOBS) {
                match obj {
                    Some(Obj::Job(j)) if j.spec.as_ref().is_some_and(|s| s.cluster == me) => {
                        Change::JobUpsert(j)
                    }
                    // A job of another cluster: its address, after its
                    // removal (a gateway from before job addresses drops
                    // the upsert, and must not keep probing a job that
                    // left its cluster).
                    Some(Obj::Job(j)) => match job_address(&j) {
                        Some(a) => {
                            out.push(NetmapChange {
                                change: Some(Change::JobRemoved(r())),
                            });
                            Change::JobAddressUpsert(a)
                        }
                        None => Change::JobRemoved(r()),
                    },
                    _ => Change::JobRemoved(r()),
                }
            } else {
                continue;
            };
            out.push(NetmapChange {
                change: Some(change),
            });
        }
        if peers_touched {
            let now = self.peers(me);
            // Unknown previous peers (a resumed stream): every touched
            // cluster that is no longer a peer may have been one.
            let before = sent.take().unwrap_or_else(|| {
                touched_clusters
                    .iter()
                    .filter(|c| **c != me)
                    .map(|c| (c.to_string(), Peer::default()))
                    .collect()
            });
            for (name, p) in &now {
                if before.get(name) != Some(p) {
                    out.push(NetmapChange {
                        change: Some(Change::PeerUpsert(p.clone())),
                    });
                }
            }
            for name in before.keys().filter(|n| !now.contains_key(*n)) {
                out.push(NetmapChange {
                    change: Some(Change::PeerRemoved(name.clone())),
                });
            }
            *sent = Some(now);
        }
        out
    }

    /// The (overlay IP, workload CIDRs) of `me`: a change means a new
    /// snapshot rather than deltas.
    pub fn identity(&self, me: &str) -> (String, Vec<String>) {
        let c = self.cluster(me);
        (
            c.as_ref()
                .and_then(|c| c.status.as_ref())
                .map(|s| s.overlay_ip.clone())
                .unwrap_or_default(),
            c.and_then(|c| c.spec)
                .map(|s| s.workload_cidrs)
                .unwrap_or_default(),
        )
    }
}

/// What a gateway of another cluster learns of job `j`: its namespace,
/// name and IP (none without an IP).
fn job_address(j: &Job) -> Option<JobAddress> {
    let m = j.metadata.as_ref()?;
    let ip = &j.spec.as_ref()?.ip;
    (!ip.is_empty()).then(|| JobAddress {
        namespace: m.namespace.clone(),
        name: m.name.clone(),
        ip: ip.clone(),
    })
}

fn o_name(c: &Cluster) -> String {
    c.metadata
        .as_ref()
        .map(|m| m.name.clone())
        .unwrap_or_default()
}

/// `(namespace, name)` of a namespaced object key.
fn namespaced(key: &str) -> Option<(&str, &str)> {
    let rest = key.strip_prefix(REGISTRY)?;
    let mut parts = rest.splitn(3, '/');
    let _kind = parts.next()?;
    Some((parts.next()?, parts.next()?))
}
