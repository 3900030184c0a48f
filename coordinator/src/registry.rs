//! The object registry: create/get/list/update/delete/watch of the five
//! kinds over the [`Store`], with validation, reference checks and IPAM.
//!
//! Every write is one store transaction whose comparisons pin what the write
//! depends on (the object's own revision, its namespace, the clusters it
//! names, the addresses it takes), so concurrent writers on one or several
//! coordinators never double-allocate or write over each other; a writer
//! whose comparison fails re-reads and retries. Objects are stored without
//! their resource version: it is the key's `mod_revision`, filled in on
//! read. This module knows nothing of gRPC.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt as _;
use futures::stream::BoxStream;
use ipnet::Ipv4Net;
use prost::Message as _;
use skymesh_proto::v1::{
    Cluster, ClusterPhase, ClusterStatus, Endpoints, EventType, JobStatus, Kind, Object, Service,
    ServiceStatus, ServiceType, WatchEvent, WatchResponse, object::Obj,
};
use skymesh_proto::validate;
use skymesh_store::{Compare, EventKind, KeyValue, Op, Store};

use crate::auth;
use crate::error::{Error, Result};
use crate::ipam;
use crate::keyspace;

pub use crate::keyspace::{kind_prefix, object_key, plural};

mod references;

/// Annotation marking Endpoints kept by the endpoints controller.
pub const MANAGED_BY: &str = "skymesh.io/managed-by";
/// Value of [`MANAGED_BY`] for controller-made Endpoints.
pub const ENDPOINTS_CONTROLLER: &str = "endpoints-controller";
/// Annotation naming the cluster whose meshd registered a job.
pub const REGISTERED_BY: &str = "skymesh.io/registered-by";
/// How often a write retries after losing a race.
const MAX_ATTEMPTS: usize = 32;

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Decodes a stored object and fills in its resource version.
/// A job's IP must lie in its cluster's workload CIDRs, whoever registers it
/// (SPEC §2): a gateway's credential covers its own cluster's addresses only.
pub(crate) fn job_ip_in_cluster(job: &skymesh_proto::v1::Job, cluster: &Object) -> Result<()> {
    let Some(Obj::Cluster(c)) = cluster.obj.as_ref() else {
        return Ok(());
    };
    let Some(ip) = job
        .spec
        .as_ref()
        .and_then(|s| s.ip.parse::<Ipv4Addr>().ok())
    else {
        return Ok(());
    };
    let cidrs: Vec<&str> = c
        .spec
        .as_ref()
        .map(|s| s.workload_cidrs.iter().map(String::as_str).collect())
        .unwrap_or_default();
    if cidrs
        .iter()
        .filter_map(|n| n.parse::<Ipv4Net>().ok())
        .any(|n| n.contains(&ip))
    {
        return Ok(());
    }
    Err(Error::Invalid(skymesh_proto::validate::ValidationError {
        field: "spec.ip".into(),
        rule: format!(
            "{ip} is outside cluster {:?}'s workload CIDRs ({}): a job's IP must lie in its cluster's workload CIDRs",
            cluster.name(),
            cidrs.join(", ")
        ),
    }))
}

pub fn decode(kv: &KeyValue) -> Result<Object> {
    let mut o = Object::decode(kv.value.as_slice()).map_err(|source| Error::Decode {
        key: kv.key.clone(),
        source,
    })?;
    if let Some(m) = o.meta_mut() {
        m.resource_version = kv.mod_revision;
    }
    Ok(o)
}

/// Encodes an object for the store (without its resource version).
pub fn encode(o: &Object) -> Vec<u8> {
    let mut o = o.clone();
    if let Some(m) = o.meta_mut() {
        m.resource_version = 0;
    }
    o.encode_to_vec()
}

fn not_found(kind: Kind, namespace: &str, name: &str) -> Error {
    Error::NotFound {
        kind: kind.singular(),
        namespace: namespace.to_string(),
        name: name.to_string(),
    }
}

pub(crate) fn new_uid() -> String {
    let b = ipam::random_secret();
    format!(
        "{}-{}-{}-{}-{}",
        hex::encode(&b[0..4]),
        hex::encode(&b[4..6]),
        hex::encode(&b[6..8]),
        hex::encode(&b[8..10]),
        hex::encode(&b[10..16])
    )
}

/// The result of creating an object.
#[derive(Debug)]
pub struct Created {
    pub object: Object,
    /// For clusters: the join token and its expiry (unix seconds).
    pub join_token: Option<(String, i64)>,
}

/// A transaction being assembled: comparisons it depends on and writes.
#[derive(Default)]
struct Txn {
    compares: Vec<Compare>,
    ops: Vec<Op>,
    /// An earlier attempt lost a race: allocate a little further on.
    retry: bool,
}

impl Txn {
    fn pin(&mut self, kv: &KeyValue) {
        self.compares
            .push(Compare::ModRevision(kv.key.clone(), kv.mod_revision));
    }
    fn put(&mut self, key: String, value: Vec<u8>) {
        self.ops.push(Op::Put { key, value });
    }
    fn delete(&mut self, key: String) {
        self.ops.push(Op::Delete { key });
    }
}

/// What a successful [`Registry::join`] hands the gateway.
#[derive(Debug)]
pub struct Joined {
    /// The cluster credential (only its hash is stored).
    pub credential: String,
    /// The gateway's overlay address.
    pub overlay_ip: String,
}

/// The object registry.
#[derive(Clone)]
pub struct Registry {
    store: Arc<dyn Store>,
    overlay: Ipv4Net,
    services: Ipv4Net,
    join_ttl: Duration,
    /// The fingerprint of the CA that join tokens carry (none when the
    /// coordinator serves plaintext).
    ca_fingerprint: Option<skymesh_proto::tls::Fingerprint>,
}

impl Registry {
    /// A registry over `store` allocating from the given pools.
    pub fn new(
        store: Arc<dyn Store>,
        overlay: Ipv4Net,
        services: Ipv4Net,
        join_ttl: Duration,
    ) -> Self {
        Registry {
            store,
            overlay,
            services,
            join_ttl,
            ca_fingerprint: None,
        }
    }

    /// Join tokens issued from now on carry `fp`, the CA fingerprint that
    /// gateways pin on first contact.
    pub fn with_ca_fingerprint(mut self, fp: Option<skymesh_proto::tls::Fingerprint>) -> Self {
        self.ca_fingerprint = fp;
        self
    }

    /// The underlying store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The overlay CIDR.
    pub fn overlay_cidr(&self) -> Ipv4Net {
        self.overlay
    }

    /// The service CIDR.
    pub fn service_cidr(&self) -> Ipv4Net {
        self.services
    }

    /// Creates the `default` namespace if it does not exist.
    pub async fn ensure_default_namespace(&self) -> Result<()> {
        let ns: Object = skymesh_proto::v1::Namespace {
            metadata: Some(skymesh_proto::v1::ObjectMeta {
                name: validate::DEFAULT_NAMESPACE.into(),
                ..Default::default()
            }),
        }
        .into();
        match self.create(ns).await {
            Ok(_) | Err(Error::AlreadyExists { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Reads one object.
    pub async fn get(&self, kind: Kind, namespace: &str, name: &str) -> Result<Object> {
        let (ns, name) = normalise_ref(kind, namespace, name)?;
        let key = object_key(kind, &ns, &name);
        match self.store.get(&key).await? {
            Some(kv) => decode(&kv),
            None => Err(not_found(kind, &ns, &name)),
        }
    }

    /// Lists a kind (in one namespace, or all when `namespace` is `None`),
    /// with the revision the list was read at.
    pub async fn list(&self, kind: Kind, namespace: Option<&str>) -> Result<(Vec<Object>, u64)> {
        let ns = match namespace {
            Some(n) if kind.namespaced() => Some(validate::name("namespace", n)?),
            _ => None,
        };
        let (kvs, rev) = self.store.range(&kind_prefix(kind, ns.as_deref())).await?;
        let objs = kvs.iter().map(decode).collect::<Result<Vec<_>>>()?;
        Ok((objs, rev))
    }

    /// Creates an object: validates it, checks what it refers to, allocates
    /// what it needs (VIP, join token) and writes it, atomically.
    pub async fn create(&self, mut obj: Object) -> Result<Created> {
        validate::object(&mut obj)?;
        let kind = obj.kind();
        {
            let m = obj.meta_mut().expect("validated objects have metadata");
            m.uid = new_uid();
            m.creation_timestamp = unix_now();
            m.resource_version = 0;
        }
        reset_status(&mut obj);
        let key = &object_key(kind, obj.namespace(), obj.name());
        let obj = &obj;
        optimistic(key, move |attempt| async move {
            let mut txn = Txn {
                retry: attempt > 0,
                ..Default::default()
            };
            txn.compares.push(Compare::Absent(key.clone()));
            let mut obj = obj.clone();
            self.check_references(&obj, &mut txn).await?;
            let mut join_token = None;
            match obj.obj.as_mut() {
                Some(Obj::Service(s)) => self.assign_vip(s, None, &mut txn).await?,
                Some(Obj::Cluster(c)) => {
                    self.check_cluster_cidrs(c, &mut txn).await?;
                    let (token, expires) = auth::new_join_token(
                        c_name(c),
                        self.join_ttl,
                        self.ca_fingerprint.as_ref(),
                        &mut txn.ops,
                    );
                    join_token = Some((token, expires));
                }
                _ => {}
            }
            txn.ops.insert(
                0,
                Op::Put {
                    key: key.clone(),
                    value: encode(&obj),
                },
            );
            let r = self.store.txn(txn.compares, txn.ops).await?;
            if r.succeeded {
                if let Some(m) = obj.meta_mut() {
                    m.resource_version = r.revision;
                }
                tracing::info!(
                    kind = kind.singular(),
                    namespace = obj.namespace(),
                    name = obj.name(),
                    "created"
                );
                return Ok(Some(Created {
                    object: obj,
                    join_token,
                }));
            }
            if self.store.get(key).await?.is_some() {
                return Err(Error::AlreadyExists {
                    kind: kind.singular(),
                    namespace: obj.namespace().to_string(),
                    name: obj.name().to_string(),
                });
            }
            Ok(None)
        })
        .await
    }

    /// Replaces the user-written part of an object if `resource_version`
    /// still matches; status and system metadata are kept.
    pub async fn update(&self, mut obj: Object) -> Result<Object> {
        validate::object(&mut obj)?;
        let kind = obj.kind();
        let given = obj.resource_version();
        if given == 0 {
            return Err(validate::ValidationError {
                field: "metadata.resource_version".into(),
                rule: "an update must carry the resource version it read (get the object first)"
                    .into(),
            }
            .into());
        }
        let key = &object_key(kind, obj.namespace(), obj.name());
        let obj = &obj;
        optimistic(key, move |attempt| async move {
            let Some(cur) = self.store.get(key).await? else {
                return Err(not_found(kind, obj.namespace(), obj.name()));
            };
            if cur.mod_revision != given {
                return Err(Error::Conflict {
                    kind: kind.singular(),
                    name: obj.name().to_string(),
                    given,
                    current: cur.mod_revision,
                });
            }
            let old = decode(&cur)?;
            let mut new = obj.clone();
            carry_system_fields(&old, &mut new);
            let mut txn = Txn {
                retry: attempt > 0,
                ..Default::default()
            };
            txn.pin(&cur);
            self.check_references(&new, &mut txn).await?;
            match (new.obj.as_mut(), old.obj.as_ref()) {
                (Some(Obj::Service(s)), Some(Obj::Service(o))) => {
                    self.assign_vip(s, o.status.as_ref(), &mut txn).await?;
                }
                (Some(Obj::Cluster(c)), Some(Obj::Cluster(o))) if c.spec != o.spec => {
                    self.check_cluster_cidrs(c, &mut txn).await?;
                }
                _ => {}
            }
            txn.ops.insert(
                0,
                Op::Put {
                    key: key.clone(),
                    value: encode(&new),
                },
            );
            let r = self.store.txn(txn.compares, txn.ops).await?;
            if !r.succeeded {
                return Ok(None);
            }
            if let Some(m) = new.meta_mut() {
                m.resource_version = r.revision;
            }
            Ok(Some(new))
        })
        .await
    }

    /// Writes a system-owned change (status, annotations) to an object read
    /// at `expected_revision`. Returns `Ok(None)` when the object changed in
    /// between (the caller re-reads and recomputes).
    pub async fn write_if_unchanged(
        &self,
        obj: &Object,
        expected_revision: u64,
    ) -> Result<Option<u64>> {
        let key = object_key(obj.kind(), obj.namespace(), obj.name());
        let compare = if expected_revision == 0 {
            Compare::Absent(key.clone())
        } else {
            Compare::ModRevision(key.clone(), expected_revision)
        };
        let r = self
            .store
            .txn(
                vec![compare],
                vec![Op::Put {
                    key,
                    value: encode(obj),
                }],
            )
            .await?;
        Ok(r.succeeded.then_some(r.revision))
    }

    /// Deletes an object read at `expected_revision`; `Ok(false)` when it
    /// changed in between.
    pub async fn delete_if_unchanged(&self, obj: &Object, expected_revision: u64) -> Result<bool> {
        let key = object_key(obj.kind(), obj.namespace(), obj.name());
        let r = self
            .store
            .txn(
                vec![Compare::ModRevision(key.clone(), expected_revision)],
                vec![Op::Delete { key }],
            )
            .await?;
        Ok(r.succeeded)
    }

    /// Deletes an object and everything that exists only for it (a
    /// service's VIP and managed Endpoints; a cluster's overlay IP, keys,
    /// credentials and jobs). Returns the deleted object. A namespace must
    /// be empty, and a cluster named by no service or Endpoints (see
    /// [`Registry::delete_with`]).
    pub async fn delete(&self, kind: Kind, namespace: &str, name: &str) -> Result<Object> {
        self.delete_with(kind, namespace, name, false).await
    }

    /// [`Registry::delete`]; with `cascade`, deleting a cluster also takes
    /// it out of the services and Endpoints that name it (deleting those
    /// that exist only for it) instead of refusing.
    pub async fn delete_with(
        &self,
        kind: Kind,
        namespace: &str,
        name: &str,
        cascade: bool,
    ) -> Result<Object> {
        let (ns, name) = normalise_ref(kind, namespace, name)?;
        let key = &object_key(kind, &ns, &name);
        let (ns, name) = (ns.as_str(), name.as_str());
        optimistic(key, move |_| async move {
            let Some(cur) = self.store.get(key).await? else {
                return Err(not_found(kind, ns, name));
            };
            let obj = decode(&cur)?;
            let mut txn = Txn::default();
            txn.pin(&cur);
            txn.delete(key.clone());
            let mut cleaned = Vec::new();
            match obj.obj.as_ref() {
                Some(Obj::Namespace(_)) => self.check_namespace_empty(name, &mut txn).await?,
                Some(Obj::Service(s)) => self.release_service(s, &mut txn).await?,
                Some(Obj::Cluster(_)) => {
                    cleaned = self.cluster_references(name, cascade, &mut txn).await?;
                    self.release_cluster(name, &mut txn).await?;
                }
                _ => {}
            }
            if !self.store.txn(txn.compares, txn.ops).await?.succeeded {
                return Ok(None);
            }
            tracing::info!(kind = kind.singular(), namespace = %ns, name = %name, ?cleaned, "deleted");
            Ok(Some(obj))
        })
        .await
    }

    /// Watches a kind: every change after `resource_version` (or, from 0,
    /// the current objects as ADDED first), one response per revision.
    pub async fn watch(
        &self,
        kind: Kind,
        namespace: Option<&str>,
        name: Option<&str>,
        resource_version: u64,
    ) -> Result<BoxStream<'static, Result<WatchResponse>>> {
        if kind == Kind::Unspecified {
            return Err(invalid("kind", "a kind is required"));
        }
        let ns = match namespace {
            Some(n) if kind.namespaced() => Some(validate::name("namespace", n)?),
            _ => None,
        };
        let name = name.map(|n| validate::name("name", n)).transpose()?;
        let prefix = match (&ns, &name) {
            (_, Some(n)) if !kind.namespaced() => object_key(kind, "", n),
            (Some(ns), Some(n)) => object_key(kind, ns, n),
            _ => kind_prefix(kind, ns.as_deref()),
        };
        // An exact key must not match longer names sharing its prefix.
        let exact = name.is_some().then(|| prefix.clone());
        let (initial, from) = if resource_version == 0 {
            let (kvs, rev) = self.store.range(&prefix).await?;
            let events = kvs
                .iter()
                .filter(|kv| exact.as_ref().is_none_or(|k| &kv.key == k))
                .map(|kv| {
                    Ok(WatchEvent {
                        r#type: EventType::Added as i32,
                        object: Some(decode(kv)?),
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            (
                Some(WatchResponse {
                    resource_version: rev,
                    events,
                }),
                rev,
            )
        } else {
            (None, resource_version)
        };
        let live = self.store.watch(&prefix, from).filter_map(move |batch| {
            let exact = exact.clone();
            async move {
                let batch = match batch {
                    Ok(b) => b,
                    Err(e) => return Some(Err(Error::from(e))),
                };
                let mut events = Vec::new();
                for ev in &batch.events {
                    if exact.as_ref().is_some_and(|k| &ev.kv.key != k) {
                        continue;
                    }
                    let (ty, kv) = match ev.kind {
                        EventKind::Put if ev.prev.is_none() => (EventType::Added, &ev.kv),
                        EventKind::Put => (EventType::Modified, &ev.kv),
                        EventKind::Delete => (EventType::Deleted, &ev.kv),
                    };
                    match decode(kv) {
                        Ok(o) => events.push(WatchEvent {
                            r#type: ty as i32,
                            object: Some(o),
                        }),
                        Err(e) => return Some(Err(e)),
                    }
                }
                (!events.is_empty()).then_some(Ok(WatchResponse {
                    resource_version: batch.revision,
                    events,
                }))
            }
        });
        Ok(futures::stream::iter(initial.map(Ok)).chain(live).boxed())
    }

    /// A new join token for an existing cluster (the old ones stay valid
    /// until used or expired).
    pub async fn issue_join_token(&self, cluster: &str) -> Result<(String, i64)> {
        let name = validate::name("cluster", cluster)?;
        let key = object_key(Kind::Cluster, "", &name);
        let Some(kv) = self.store.get(&key).await? else {
            return Err(not_found(Kind::Cluster, "", &name));
        };
        let mut ops = Vec::new();
        let token =
            auth::new_join_token(&name, self.join_ttl, self.ca_fingerprint.as_ref(), &mut ops);
        let r = self
            .store
            .txn(vec![Compare::CreateRevision(key, kv.create_revision)], ops)
            .await?;
        if r.succeeded {
            Ok(token)
        } else {
            Err(not_found(Kind::Cluster, "", &name))
        }
    }

    // ------------------------------------------------------------ helpers

    /// Checks that the namespace and the clusters an object names exist and
    /// pins them in the transaction.
    async fn check_references(&self, obj: &Object, txn: &mut Txn) -> Result<()> {
        let kind = obj.kind();
        if kind.namespaced() {
            let ns = obj.namespace();
            match self.store.get(&object_key(Kind::Namespace, "", ns)).await? {
                Some(kv) => txn.pin(&kv),
                None => {
                    return Err(Error::Precondition(format!(
                        "namespace {ns:?} does not exist (create it with: skyctl create namespace {ns})"
                    )));
                }
            }
        }
        let mut clusters: Vec<(&str, &str)> = Vec::new();
        match obj.obj.as_ref() {
            Some(Obj::Job(j)) => {
                if let Some(s) = &j.spec {
                    clusters.push(("spec.cluster", &s.cluster));
                }
            }
            Some(Obj::Service(s)) => {
                if let Some(s) = &s.spec {
                    clusters.extend(s.clusters.iter().map(|c| ("spec.clusters", c.as_str())));
                }
            }
            Some(Obj::Endpoints(e)) => {
                if let Some(s) = &e.spec {
                    if !s.primary_cluster.is_empty() {
                        clusters.push(("spec.primary_cluster", &s.primary_cluster));
                    }
                    clusters.extend(
                        s.clusters
                            .iter()
                            .map(|c| ("spec.clusters", c.cluster.as_str())),
                    );
                }
            }
            _ => {}
        }
        let mut seen = BTreeSet::new();
        for (field, c) in clusters {
            if !seen.insert(c) {
                continue;
            }
            match self.store.get(&object_key(Kind::Cluster, "", c)).await? {
                // Pin existence only: a cluster's status changes often and
                // must not make this write retry.
                Some(kv) => {
                    if let Some(Obj::Job(j)) = obj.obj.as_ref() {
                        job_ip_in_cluster(j, &decode(&kv)?)?;
                    }
                    txn.compares
                        .push(Compare::CreateRevision(kv.key.clone(), kv.create_revision))
                }
                None => {
                    return Err(Error::Precondition(format!(
                        "{field}: cluster {c:?} does not exist (see: skyctl get clusters)"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Gives a service a VIP if its type needs one (keeping the one it had),
    /// or releases the VIP it no longer needs.
    async fn assign_vip(
        &self,
        s: &mut Service,
        old: Option<&ServiceStatus>,
        txn: &mut Txn,
    ) -> Result<()> {
        let ty = s
            .spec
            .as_ref()
            .map_or(ServiceType::ClusterIp, |sp| sp.r#type());
        let old_vip: Option<Ipv4Addr> = old.and_then(|st| st.cluster_ip.parse().ok());
        let status = s.status.get_or_insert_with(Default::default);
        if !validate::service_type_has_vip(ty) {
            status.cluster_ip.clear();
            if let Some(ip) = old_vip {
                txn.delete(ipam::alloc_key(keyspace::VIPS, ip));
            }
            return Ok(());
        }
        if let Some(ip) = old_vip {
            status.cluster_ip = ip.to_string();
            return Ok(());
        }
        let owner = format!(
            "{}/{}",
            s.metadata.as_ref().map_or("", |m| m.namespace.as_str()),
            s.metadata.as_ref().map_or("", |m| m.name.as_str())
        );
        let ip = self
            .allocate(
                (keyspace::VIPS, keyspace::VIP_CURSOR),
                self.services,
                "service",
                &owner,
                txn,
            )
            .await?;
        status.cluster_ip = ip.to_string();
        Ok(())
    }

    /// Joins a cluster's gateway with a join token: checks the token
    /// (single use: deleted in the same transaction), pins the gateway's
    /// public key to the cluster (a second join with another key is
    /// refused), allocates its overlay IP and a pre-shared key for every
    /// pair with a joined cluster, and issues its credential.
    pub async fn join(
        &self,
        cluster: &str,
        token: &str,
        public_key: &str,
        endpoint: &str,
    ) -> Result<Joined> {
        let key = &object_key(Kind::Cluster, "", cluster);
        optimistic(key, move |attempt| async move {
            let join_kv = auth::check_join_token(self.store.as_ref(), token, cluster).await?;
            let Some(cur) = self.store.get(key).await? else {
                return Err(Error::Precondition(format!(
                    "cluster {cluster:?} does not exist"
                )));
            };
            let Some(Obj::Cluster(mut c)) = decode(&cur)?.obj else {
                return Err(Error::Internal(format!("{key} does not hold a cluster")));
            };
            let mut st = c.status.take().unwrap_or_default();
            if !st.public_key.is_empty() && st.public_key != public_key {
                tracing::warn!(%cluster, "refused join with a different key");
                return Err(Error::PermissionDenied(format!(
                    "cluster {cluster:?} already joined with another public key; delete and re-create the cluster to change its key"
                )));
            }
            let mut txn = Txn {
                retry: attempt > 0,
                ..Default::default()
            };
            txn.pin(&join_kv);
            txn.pin(&cur);
            txn.delete(join_kv.key.clone());
            if st.overlay_ip.is_empty() {
                st.overlay_ip = self
                    .allocate(
                        (keyspace::OVERLAY_IPS, keyspace::OVERLAY_CURSOR),
                        self.overlay,
                        "overlay",
                        cluster,
                        &mut txn,
                    )
                    .await?
                    .to_string();
            }
            // A pre-shared key for every pair with a joined cluster.
            let (others, _) = self.store.range(keyspace::CLUSTERS).await?;
            for kv in &others {
                let Some(Obj::Cluster(o)) = decode(kv)?.obj else {
                    continue;
                };
                let joined = o.status.as_ref().is_some_and(|s| !s.public_key.is_empty());
                if c_name(&o) == cluster {
                    continue;
                }
                if !joined {
                    // If it joins meanwhile, its join did not see this one
                    // either: one of the two must retry, or the pair would
                    // get no key (and no tunnel).
                    txn.pin(kv);
                    continue;
                }
                let pk = ipam::psk_key(cluster, c_name(&o));
                if self.store.get(&pk).await?.is_none() {
                    txn.compares.push(Compare::Absent(pk.clone()));
                    txn.put(pk, ipam::random_secret().to_vec());
                }
            }
            st.public_key = public_key.to_string();
            st.endpoint = endpoint.to_string();
            st.phase = ClusterPhase::Ready as i32;
            st.last_seen = unix_now();
            let overlay_ip = st.overlay_ip.clone();
            c.status = Some(st);
            let credential = auth::new_cluster_credential(cluster, &mut txn.ops);
            txn.put(key.clone(), encode(&Object::from(c)));
            if !self.store.txn(txn.compares, txn.ops).await?.succeeded {
                return Ok(None);
            }
            tracing::info!(%cluster, %overlay_ip, %endpoint, "cluster joined");
            Ok(Some(Joined {
                credential,
                overlay_ip,
            }))
        })
        .await
    }

    /// Takes the next free address of `pool` after its cursor (see
    /// [`ipam`]): `keys` are the pool's allocation prefix and cursor key.
    /// The address's absence is pinned, so two allocators never take one
    /// address; the cursor is not (every allocation of the pool would
    /// contend on it): it is advanced to the address taken. After a lost
    /// race the search starts a random few addresses further on, so
    /// allocators that collided spread out.
    async fn allocate(
        &self,
        (prefix, cursor_key): (&str, &str),
        pool: Ipv4Net,
        what: &str,
        owner: &str,
        txn: &mut Txn,
    ) -> Result<Ipv4Addr> {
        let cursor = self.store.get(cursor_key).await?;
        let (kvs, _) = self.store.range(prefix).await?;
        let used: BTreeSet<Ipv4Addr> = kvs
            .iter()
            .filter_map(|kv| ipam::parse_alloc_key(prefix, &kv.key))
            .collect();
        let after = cursor.as_ref().and_then(|kv| ipam::parse_cursor(&kv.value));
        let skip = if txn.retry {
            rand::random::<u64>() % ipam::RETRY_SPREAD
        } else {
            0
        };
        let Some(ip) = ipam::next_free(pool, &used, after, skip) else {
            return Err(Error::Exhausted(format!(
                "{what} CIDR {pool} is exhausted: all {} addresses are in use (delete unused objects or start the coordinator with a larger --{what}-cidr)",
                ipam::capacity(pool)
            )));
        };
        let key = ipam::alloc_key(prefix, ip);
        txn.compares.push(Compare::Absent(key.clone()));
        txn.put(key, owner.as_bytes().to_vec());
        txn.put(cursor_key.into(), ip.to_string().into_bytes());
        Ok(ip)
    }

    /// Refuses workload CIDRs that overlap another cluster's or the overlay
    /// or service CIDR; serialises with other cluster writes.
    async fn check_cluster_cidrs(&self, c: &Cluster, txn: &mut Txn) -> Result<()> {
        let generation = self.store.get(keyspace::CLUSTERS_GENERATION).await?;
        match &generation {
            Some(kv) => txn.pin(kv),
            None => txn
                .compares
                .push(Compare::Absent(keyspace::CLUSTERS_GENERATION.into())),
        }
        txn.put(keyspace::CLUSTERS_GENERATION.into(), Vec::new());
        let me = c_name(c);
        let mine = cluster_cidrs(c);
        for (i, net) in mine.iter().enumerate() {
            for (label, pool) in [
                ("overlay CIDR", self.overlay),
                ("service CIDR", self.services),
            ] {
                if overlaps(*net, pool) {
                    return Err(overlap_error(i, *net, &format!("the {label} {pool}")));
                }
            }
        }
        let (others, _) = self.store.range(&kind_prefix(Kind::Cluster, None)).await?;
        for kv in &others {
            let Some(Obj::Cluster(other)) = decode(kv)?.obj else {
                continue;
            };
            if c_name(&other) == me {
                continue;
            }
            for (i, net) in mine.iter().enumerate() {
                if let Some(o) = cluster_cidrs(&other)
                    .into_iter()
                    .find(|o| overlaps(*net, *o))
                {
                    return Err(overlap_error(
                        i,
                        *net,
                        &format!("{o} of cluster {:?}", c_name(&other)),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Refuses to delete a namespace that holds objects; pins its emptiness
    /// in `txn` (nothing created in it between this read and the delete),
    /// so a concurrent create either lands first and is seen on the retry,
    /// or fails its own pin on the namespace.
    async fn check_namespace_empty(&self, ns: &str, txn: &mut Txn) -> Result<()> {
        if ns == validate::DEFAULT_NAMESPACE {
            return Err(Error::Precondition(
                "namespace \"default\" cannot be deleted".into(),
            ));
        }
        let mut held = Vec::new();
        for kind in [Kind::Service, Kind::Endpoints, Kind::Job] {
            let prefix = kind_prefix(kind, Some(ns));
            let (kvs, at) = self.store.range(&prefix).await?;
            if !kvs.is_empty() {
                held.push(format!("{} {}", kvs.len(), plural(kind)));
            }
            txn.compares.push(Compare::NoWritesUnder(prefix, at));
        }
        if held.is_empty() {
            Ok(())
        } else {
            Err(Error::Precondition(format!(
                "namespace {ns:?} is not empty: it holds {} (delete them first)",
                held.join(", ")
            )))
        }
    }

    async fn release_service(&self, s: &Service, txn: &mut Txn) -> Result<()> {
        if let Some(ip) = s
            .status
            .as_ref()
            .and_then(|st| st.cluster_ip.parse::<Ipv4Addr>().ok())
        {
            txn.delete(ipam::alloc_key(keyspace::VIPS, ip));
        }
        let m = s.metadata.clone().unwrap_or_default();
        let ep_key = object_key(Kind::Endpoints, &m.namespace, &m.name);
        if let Some(kv) = self.store.get(&ep_key).await?
            && let Some(Obj::Endpoints(ep)) = decode(&kv)?.obj
            && is_managed(&ep)
        {
            txn.pin(&kv);
            txn.delete(ep_key);
        }
        Ok(())
    }

    async fn release_cluster(&self, name: &str, txn: &mut Txn) -> Result<()> {
        let (allocs, _) = self.store.range(keyspace::OVERLAY_IPS).await?;
        for kv in allocs.iter().filter(|kv| kv.value == name.as_bytes()) {
            txn.delete(kv.key.clone());
        }
        let (psks, _) = self.store.range(keyspace::PSKS).await?;
        for kv in psks
            .iter()
            .filter(|kv| ipam::psk_peer(&kv.key, name).is_some())
        {
            txn.delete(kv.key.clone());
        }
        auth::release_cluster(self.store.as_ref(), name, &mut txn.ops).await?;
        let (jobs, _) = self.store.range(&kind_prefix(Kind::Job, None)).await?;
        for kv in &jobs {
            if let Some(Obj::Job(j)) = decode(kv)?.obj
                && j.spec.as_ref().is_some_and(|s| s.cluster == name)
            {
                txn.pin(kv);
                txn.delete(kv.key.clone());
            }
        }
        let generation = self.store.get(keyspace::CLUSTERS_GENERATION).await?;
        if let Some(kv) = &generation {
            txn.pin(kv);
        }
        txn.put(keyspace::CLUSTERS_GENERATION.into(), Vec::new());
        Ok(())
    }
}

/// Whether Endpoints are kept by the endpoints controller.
pub fn is_managed(ep: &Endpoints) -> bool {
    ep.metadata
        .as_ref()
        .and_then(|m| m.annotations.get(MANAGED_BY))
        .is_some_and(|v| v == ENDPOINTS_CONTROLLER)
}

fn c_name(c: &Cluster) -> &str {
    c.metadata.as_ref().map_or("", |m| m.name.as_str())
}

/// A cluster's workload CIDRs (already validated).
pub fn cluster_cidrs(c: &Cluster) -> Vec<Ipv4Net> {
    c.spec
        .as_ref()
        .map(|s| {
            s.workload_cidrs
                .iter()
                .filter_map(|w| w.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn overlaps(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

fn overlap_error(i: usize, net: Ipv4Net, other: &str) -> Error {
    Error::Precondition(format!("spec.workload_cidrs[{i}]: {net} overlaps {other}"))
}

fn invalid(field: &str, rule: &str) -> Error {
    validate::ValidationError {
        field: field.into(),
        rule: rule.into(),
    }
    .into()
}

/// Runs one optimistic transaction until it commits. `attempt(n)` (`n` = 0
/// on the first try) reads what it needs, builds its compares and writes,
/// and returns `Ok(Some(v))` once the store took them, `Ok(None)` when it
/// lost a race (it is called again after a short random pause), or an
/// error that ends the write. After [`MAX_ATTEMPTS`] lost races: a
/// contention error naming `key`.
pub(crate) async fn optimistic<T, F>(key: &str, mut attempt: impl FnMut(usize) -> F) -> Result<T>
where
    F: Future<Output = Result<Option<T>>>,
{
    for n in 0..MAX_ATTEMPTS {
        backoff(n).await;
        if let Some(v) = attempt(n).await? {
            return Ok(v);
        }
    }
    Err(contention(key))
}

/// Before retry `attempt` (0 = first try, no wait): a short random pause
/// so writers that collided do not collide again in lockstep.
async fn backoff(attempt: usize) {
    if attempt > 0 {
        let cap_ms = 1u64 << attempt.min(6);
        tokio::time::sleep(Duration::from_millis(rand::random::<u64>() % cap_ms + 1)).await;
    }
}

fn contention(key: &str) -> Error {
    Error::Internal(format!(
        "gave up writing {key} after {MAX_ATTEMPTS} attempts: too many concurrent writers"
    ))
}

fn normalise_ref(kind: Kind, namespace: &str, name: &str) -> Result<(String, String)> {
    if kind == Kind::Unspecified {
        return Err(invalid("kind", "a kind is required"));
    }
    let name = validate::name("name", name)?;
    let ns = if kind.namespaced() {
        if namespace.is_empty() {
            validate::DEFAULT_NAMESPACE.to_string()
        } else {
            validate::name("namespace", namespace)?
        }
    } else {
        String::new()
    };
    Ok((ns, name))
}

/// Status is the system's: a created object starts with a fresh one.
fn reset_status(obj: &mut Object) {
    match obj.obj.as_mut() {
        Some(Obj::Cluster(c)) => {
            c.status = Some(ClusterStatus {
                phase: ClusterPhase::Pending as i32,
                ..Default::default()
            });
        }
        Some(Obj::Job(j)) => j.status = Some(JobStatus { ready: false }),
        Some(Obj::Service(s)) => s.status = Some(ServiceStatus::default()),
        Some(Obj::Endpoints(e)) => e.status = Some(Default::default()),
        Some(Obj::Namespace(_)) | None => {}
    }
}

/// Keeps uid, creation time, system annotations and status across a user
/// update.
fn carry_system_fields(old: &Object, new: &mut Object) {
    if let (Some(o), Some(n)) = (old.meta(), new.meta_mut()) {
        n.uid = o.uid.clone();
        n.creation_timestamp = o.creation_timestamp;
        for k in [MANAGED_BY, REGISTERED_BY] {
            match o.annotations.get(k) {
                Some(v) => n.annotations.insert(k.to_string(), v.clone()),
                None => n.annotations.remove(k),
            };
        }
    }
    match (old.obj.as_ref(), new.obj.as_mut()) {
        (Some(Obj::Cluster(o)), Some(Obj::Cluster(n))) => n.status = o.status.clone(),
        (Some(Obj::Job(o)), Some(Obj::Job(n))) => n.status = o.status,
        (Some(Obj::Service(o)), Some(Obj::Service(n))) => n.status = o.status.clone(),
        (Some(Obj::Endpoints(o)), Some(Obj::Endpoints(n))) => n.status = o.status.clone(),
        _ => {}
    }
}
