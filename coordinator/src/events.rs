//! Events (SPEC §7 `skyctl get events`): state changes, recorded by the
//! coordinator and kept [`EVENT_TTL_S`] (1 h, as Kubernetes).
//!
//! One recorder per mesh (it runs with the controllers, on the elected
//! replica) follows every object write through the store's watch and turns
//! the difference between an object's previous and new value into events
//! with the pure [`diff`]: created, updated (the user-written part),
//! deleted, VIP allocated, endpoints changed (how many per cluster), job
//! ready / not ready, cluster Ready / NotReady. A refused join is recorded
//! where it is refused ([`record`]). Events are stored under
//! [`keyspace::EVENTS`](crate::keyspace::EVENTS), outside the objects'
//! prefix, so recording never feeds back into the recorder or netmaps.
//!
//! Must not: record per packet or per probe — a cluster's status report
//! every second changes `last_seen` and peer counters, which make no event.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt as _;
use futures::stream::BoxStream;
use prost::Message as _;
use skymesh_proto::v1::object::Obj;
use skymesh_proto::v1::{ClusterPhase, Kind, MeshEvent, Object};
use skymesh_store::{EventKind, Op, Store};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::keyspace::{EVENTS, EVENTS_CURSOR, REGISTRY};
use crate::registry::{Registry, decode, unix_now};

/// How long an event is kept (Kubernetes' default `--event-ttl`).
pub const EVENT_TTL_S: i64 = 3600;
/// Tuning: how often expired events are deleted.
const REAP_EVERY: Duration = Duration::from_secs(60);

/// An event before it is stored (no revision yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Draft {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
    pub reason: &'static str,
    pub message: String,
    pub warning: bool,
}

impl Draft {
    fn of(obj: &Object, reason: &'static str, message: String, warning: bool) -> Draft {
        Draft {
            kind: obj.kind(),
            namespace: obj.namespace().to_string(),
            name: obj.name().to_string(),
            reason,
            message,
            warning,
        }
    }

    fn into_event(self, now: i64) -> MeshEvent {
        MeshEvent {
            resource_version: 0,
            timestamp: now,
            kind: self.kind as i32,
            namespace: self.namespace,
            name: self.name,
            reason: self.reason.to_string(),
            message: self.message,
            r#type: if self.warning { "Warning" } else { "Normal" }.to_string(),
        }
    }
}

/// The user-written part of an object (what an update changes).
fn user_part(o: &Object) -> Object {
    let mut o = o.clone();
    if let Some(m) = o.meta_mut() {
        m.resource_version = 0;
    }
    match o.obj.as_mut() {
        Some(Obj::Cluster(c)) => c.status = None,
        Some(Obj::Job(j)) => j.status = None,
        Some(Obj::Service(s)) => s.status = None,
        Some(Obj::Endpoints(e)) => e.status = None,
        Some(Obj::Namespace(_)) | None => {}
    }
    o
}

fn vip(o: &Object) -> &str {
    match o.obj.as_ref() {
        Some(Obj::Service(s)) => s.status.as_ref().map_or("", |st| st.cluster_ip.as_str()),
        _ => "",
    }
}

/// Ready addresses per cluster, e.g. `c1: 2, c2: 1` (sorted by cluster).
fn endpoint_counts(o: &Object) -> Option<BTreeMap<String, usize>> {
    let Some(Obj::Endpoints(e)) = o.obj.as_ref() else {
        return None;
    };
    Some(
        e.status
            .iter()
            .flat_map(|s| s.clusters.iter())
            .map(|c| {
                (
                    c.cluster.clone(),
                    c.addresses.iter().filter(|a| a.ready).count(),
                )
            })
            .collect(),
    )
}

fn counts_text(m: &BTreeMap<String, usize>) -> String {
    if m.is_empty() {
        return "no ready endpoints".to_string();
    }
    m.iter()
        .map(|(c, n)| format!("{c}: {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn job_ready(o: &Object) -> Option<bool> {
    match o.obj.as_ref() {
        Some(Obj::Job(j)) => Some(j.status.as_ref().is_some_and(|s| s.ready)),
        _ => None,
    }
}

fn cluster_phase(o: &Object) -> Option<ClusterPhase> {
    match o.obj.as_ref() {
        Some(Obj::Cluster(c)) => Some(
            c.status
                .as_ref()
                .map_or(ClusterPhase::Pending, |s| s.phase()),
        ),
        _ => None,
    }
}

/// The events of one object's change from `old` to `new` (`None`: it did
/// not exist / was deleted). Pure.
pub fn diff(old: Option<&Object>, new: Option<&Object>) -> Vec<Draft> {
    let mut out = Vec::new();
    let (o, n) = match (old, new) {
        (None, None) => return out,
        (None, Some(n)) => {
            out.push(Draft::of(
                n,
                "Created",
                format!("{} created", n.kind().singular()),
                false,
            ));
            if !vip(n).is_empty() {
                out.push(Draft::of(
                    n,
                    "VipAllocated",
                    format!("VIP {} allocated", vip(n)),
                    false,
                ));
            }
            if let Some(c) = endpoint_counts(n).filter(|c| !c.is_empty()) {
                out.push(Draft::of(n, "EndpointsChanged", counts_text(&c), false));
            }
            return out;
        }
        (Some(o), None) => {
            let mut msg = format!("{} deleted", o.kind().singular());
            if !vip(o).is_empty() {
                msg.push_str(&format!(", VIP {} freed", vip(o)));
            }
            out.push(Draft::of(o, "Deleted", msg, false));
            return out;
        }
        (Some(o), Some(n)) => (o, n),
    };
    if user_part(o) != user_part(n) {
        out.push(Draft::of(
            n,
            "Updated",
            format!("{} updated", n.kind().singular()),
            false,
        ));
    }
    if vip(o) != vip(n) && !vip(n).is_empty() {
        out.push(Draft::of(
            n,
            "VipAllocated",
            format!("VIP {} allocated", vip(n)),
            false,
        ));
    }
    if let (Some(a), Some(b)) = (endpoint_counts(o), endpoint_counts(n))
        && a != b
    {
        out.push(Draft::of(n, "EndpointsChanged", counts_text(&b), false));
    }
    if let (Some(a), Some(b)) = (job_ready(o), job_ready(n))
        && a != b
    {
        let (reason, msg) = if b {
            ("Ready", "job ready: its readiness probe passes")
        } else {
            (
                "NotReady",
                "job not ready: its readiness probe fails or its gateway is down",
            )
        };
        out.push(Draft::of(n, reason, msg.to_string(), !b));
    }
    if let (Some(a), Some(b)) = (cluster_phase(o), cluster_phase(n))
        && a != b
    {
        match b {
            ClusterPhase::Ready => out.push(Draft::of(
                n,
                "Ready",
                "cluster Ready: its gateway reports".to_string(),
                false,
            )),
            ClusterPhase::NotReady => out.push(Draft::of(
                n,
                "NotReady",
                "cluster NotReady: its gateway stopped reporting".to_string(),
                true,
            )),
            ClusterPhase::Pending | ClusterPhase::Unspecified => {}
        }
    }
    out
}

/// Store key of an event: the revision of the object write it comes from
/// first, so keys list oldest first and recording a revision twice (after
/// a restart or a failover) writes the same keys.
fn key(revision: u64, n: usize) -> String {
    format!("{EVENTS}{revision:020}-{n:04}")
}

/// Stores the events of the object writes at `revision` and moves the
/// recorder's cursor there (one write).
async fn store_events(store: &dyn Store, revision: u64, drafts: Vec<Draft>) -> Result<()> {
    if drafts.is_empty() {
        return Ok(());
    }
    let now = unix_now();
    let mut ops: Vec<Op> = drafts
        .into_iter()
        .enumerate()
        .map(|(i, d)| Op::Put {
            key: key(revision, i),
            value: d.into_event(now).encode_to_vec(),
        })
        .collect();
    ops.push(Op::Put {
        key: EVENTS_CURSOR.to_string(),
        value: revision.to_string().into_bytes(),
    });
    store.txn(Vec::new(), ops).await?;
    Ok(())
}

/// Makes sure the recorder has a cursor (the current revision on a fresh
/// store), so writes made before it starts are recorded. Call at startup.
pub async fn init_cursor(store: &dyn Store) -> Result<()> {
    if store.get(EVENTS_CURSOR).await?.is_none() {
        let rev = store.current_revision().await?;
        store
            .txn(
                vec![skymesh_store::Compare::Absent(EVENTS_CURSOR.to_string())],
                vec![Op::Put {
                    key: EVENTS_CURSOR.to_string(),
                    value: rev.to_string().into_bytes(),
                }],
            )
            .await?;
    }
    Ok(())
}

/// Where the recorder resumes: after its cursor, else now.
async fn cursor(store: &dyn Store) -> Result<u64> {
    match store.get(EVENTS_CURSOR).await? {
        Some(kv) => Ok(String::from_utf8_lossy(&kv.value)
            .trim()
            .parse()
            .unwrap_or(0)),
        None => Ok(store.current_revision().await?),
    }
}

/// Records an event that is no object write (a refused join), keyed after
/// the current revision. Failing to record it is logged, never the
/// caller's failure.
pub async fn record(store: &dyn Store, draft: Draft) {
    let result = async {
        let rev = store.current_revision().await?;
        let k = format!("{}-join-{:08x}", key(rev, 0), rand::random::<u32>());
        store
            .txn(
                Vec::new(),
                vec![Op::Put {
                    key: k,
                    value: draft.into_event(unix_now()).encode_to_vec(),
                }],
            )
            .await?;
        Ok::<(), Error>(())
    }
    .await;
    if let Err(e) = result {
        tracing::warn!(error = %e, "failed to record an event");
    }
}

/// Tuning: events one object may make in a burst (Kubernetes' event spam
/// filter: 25).
const SPAM_BURST: f64 = 25.0;
/// Tuning: and then one per this many seconds (Kubernetes: 5 minutes).
const SPAM_REFILL_S: f64 = 300.0;
/// Tuning: objects the spam filter tracks before it forgets the ones whose
/// bucket is full again.
const SPAM_TRACKED: usize = 65_536;

/// Bounds the events one object can make, as Kubernetes' client-side
/// `EventSourceObjectSpamFilter` does: a gateway whose job flaps (its
/// readiness probe passing and failing every other second) would
/// otherwise turn each flip into a stored event kept an hour. Per object a
/// token bucket of 25 (`SPAM_BURST`), refilled one per 5 minutes
/// (`SPAM_REFILL_S`); at most `SPAM_TRACKED` objects, so the filter is bounded too.
#[derive(Debug, Default)]
pub struct SpamFilter {
    /// `(kind, namespace, name)` → (tokens, at).
    buckets: std::collections::HashMap<(i32, String, String), (f64, i64)>,
}

impl SpamFilter {
    fn refill(tokens: f64, at: i64, now: i64) -> f64 {
        (tokens + (now - at).max(0) as f64 / SPAM_REFILL_S).min(SPAM_BURST)
    }

    /// Whether `d`, made at `now` (Unix seconds), may be stored.
    pub fn allow(&mut self, d: &Draft, now: i64) -> bool {
        if self.buckets.len() >= SPAM_TRACKED {
            self.buckets
                .retain(|_, (t, at)| Self::refill(*t, *at, now) < SPAM_BURST);
            if self.buckets.len() >= SPAM_TRACKED {
                self.buckets.clear();
            }
        }
        let (tokens, at) = self
            .buckets
            .entry((d.kind as i32, d.namespace.clone(), d.name.clone()))
            .or_insert((SPAM_BURST, now));
        *tokens = Self::refill(*tokens, *at, now);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Tuning: at most one JoinRefused event per cluster this often, so that
/// unauthenticated callers cannot turn failed joins into store writes.
const JOIN_REFUSED_EVERY_S: i64 = 10;
/// Tuning: clusters remembered by `JoinRefusals` before it forgets all.
const JOIN_REFUSALS_TRACKED: usize = 1024;

/// Which refused joins are worth an event: one per cluster per 10 s.
#[derive(Debug, Clone, Default)]
pub struct JoinRefusals {
    last: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, i64>>>,
}

impl JoinRefusals {
    /// Whether a refusal of `cluster` at `now` gets an event.
    pub fn allow(&self, cluster: &str, now: i64) -> bool {
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.len() >= JOIN_REFUSALS_TRACKED {
            last.clear();
        }
        match last.get(cluster) {
            Some(t) if now - t < JOIN_REFUSED_EVERY_S => false,
            _ => {
                last.insert(cluster.to_string(), now);
                true
            }
        }
    }
}

/// A refused join of `cluster`, for [`record`].
pub fn join_refused(cluster: &str, why: &str) -> Draft {
    Draft {
        kind: Kind::Cluster,
        namespace: String::new(),
        name: cluster.to_string(),
        reason: "JoinRefused",
        message: format!("join refused: {why}"),
        warning: true,
    }
}

fn decode_event(kv: &skymesh_store::KeyValue) -> Result<MeshEvent> {
    let mut e = MeshEvent::decode(kv.value.as_slice()).map_err(|source| Error::Decode {
        key: kv.key.clone(),
        source,
    })?;
    e.resource_version = kv.mod_revision;
    Ok(e)
}

/// Which events a list or watch covers.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// `None`: every namespace. Else this namespace's objects and global ones.
    pub namespace: Option<String>,
    /// One object only: its kind and name.
    pub object: Option<(Kind, String)>,
}

impl Filter {
    fn covers(&self, e: &MeshEvent, now: i64) -> bool {
        if e.timestamp + EVENT_TTL_S < now {
            return false;
        }
        if let Some(ns) = &self.namespace
            && !e.namespace.is_empty()
            && &e.namespace != ns
        {
            return false;
        }
        self.object
            .as_ref()
            .is_none_or(|(k, n)| e.kind == *k as i32 && &e.name == n)
    }
}

/// The unexpired events `filter` covers, oldest first, with the revision
/// they were read at.
pub async fn list(store: &dyn Store, filter: &Filter) -> Result<(Vec<MeshEvent>, u64)> {
    let (kvs, rev) = store.range(EVENTS).await?;
    let now = unix_now();
    let mut out = Vec::new();
    for kv in &kvs {
        let e = decode_event(kv)?;
        if filter.covers(&e, now) {
            out.push(e);
        }
    }
    Ok((out, rev))
}

/// Events recorded after `after`, as they are.
pub fn watch(
    store: &dyn Store,
    filter: Filter,
    after: u64,
) -> BoxStream<'static, Result<MeshEvent>> {
    store
        .watch(EVENTS, after)
        .flat_map(move |batch| {
            let items: Vec<Result<MeshEvent>> = match batch {
                Err(e) => vec![Err(Error::from(e))],
                Ok(b) => b
                    .events
                    .iter()
                    .filter(|ev| ev.kind == EventKind::Put)
                    .filter_map(|ev| match decode_event(&ev.kv) {
                        Ok(e) if filter.covers(&e, unix_now()) => Some(Ok(e)),
                        Ok(_) => None,
                        Err(e) => Some(Err(e)),
                    })
                    .collect(),
            };
            futures::stream::iter(items)
        })
        .boxed()
}

/// Deletes events older than [`EVENT_TTL_S`].
async fn reap(store: &dyn Store) -> Result<usize> {
    let (kvs, _) = store.range(EVENTS).await?;
    let cutoff = unix_now() - EVENT_TTL_S;
    let ops: Vec<Op> = kvs
        .iter()
        .filter(|kv| decode_event(kv).map_or(true, |e| e.timestamp < cutoff))
        .map(|kv| Op::Delete {
            key: kv.key.clone(),
        })
        .collect();
    let n = ops.len();
    if n > 0 {
        store.txn(Vec::new(), ops).await?;
    }
    Ok(n)
}

/// Records events of every object write, and deletes expired ones, until
/// `cancel` fires (runs with the controllers).
pub async fn run(reg: Registry, cancel: CancellationToken) {
    let store = reg.store().clone();
    let mut backoff = Duration::from_millis(100);
    let mut spam = SpamFilter::default();
    loop {
        let from = match cursor(store.as_ref()).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "event recorder: no revision; retrying");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = cancel.cancelled() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let mut changes = store.watch(REGISTRY, from);
        let mut reap_at = tokio::time::interval(REAP_EVERY);
        loop {
            tokio::select! {
                batch = changes.next() => {
                    let batch = match batch {
                        Some(Ok(b)) => b,
                        Some(Err(skymesh_store::Error::Compacted { .. })) => {
                            // The history after the cursor is gone: the
                            // events of those writes are lost; go on from now.
                            tracing::warn!(after = from, "event recorder fell behind the store's history; events skipped");
                            if let Ok(rev) = store.current_revision().await {
                                let _ = store.txn(Vec::new(), vec![Op::Put {
                                    key: EVENTS_CURSOR.to_string(),
                                    value: rev.to_string().into_bytes(),
                                }]).await;
                            }
                            break;
                        }
                        // The watch ended (store closed): start again.
                        Some(Err(_)) | None => break,
                    };
                    backoff = Duration::from_millis(100);
                    let mut drafts = Vec::new();
                    for ev in &batch.events {
                        let old = ev.prev.as_ref().and_then(|kv| decode(kv).ok());
                        let new = match ev.kind {
                            EventKind::Put => decode(&ev.kv).ok(),
                            EventKind::Delete => None,
                        };
                        drafts.extend(diff(old.as_ref(), new.as_ref()));
                    }
                    let now = unix_now();
                    let before = drafts.len();
                    drafts.retain(|d| spam.allow(d, now));
                    if drafts.len() < before {
                        tracing::debug!(dropped = before - drafts.len(), "events of too busy objects dropped");
                    }
                    if let Err(e) = store_events(store.as_ref(), batch.revision, drafts).await {
                        tracing::warn!(error = %e, revision = batch.revision, "failed to record events");
                    }
                }
                _ = reap_at.tick() => {
                    match reap(store.as_ref()).await {
                        Ok(0) => {}
                        Ok(n) => tracing::debug!(expired = n, "events expired"),
                        Err(e) => tracing::warn!(error = %e, "failed to delete expired events"),
                    }
                }
                () = cancel.cancelled() => return,
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = cancel.cancelled() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skymesh_proto::v1::{
        Cluster, ClusterStatus, EndpointAddress, Endpoints, EndpointsClusterStatus,
        EndpointsStatus, Job, JobStatus, ObjectMeta, Service, ServiceSpec, ServiceStatus,
    };

    fn meta(name: &str) -> Option<ObjectMeta> {
        Some(ObjectMeta {
            name: name.into(),
            namespace: "default".into(),
            ..Default::default()
        })
    }

    fn reasons(d: &[Draft]) -> Vec<&str> {
        d.iter().map(|d| d.reason).collect()
    }

    #[test]
    fn object_lifecycle_and_vip() {
        let mut s = Service {
            metadata: meta("web"),
            spec: Some(ServiceSpec::default()),
            status: Some(ServiceStatus {
                cluster_ip: "100.65.0.1".into(),
                external_ips: vec![],
            }),
        };
        let a: Object = s.clone().into();
        let d = diff(None, Some(&a));
        assert_eq!(reasons(&d), ["Created", "VipAllocated"]);
        assert_eq!(d[1].message, "VIP 100.65.0.1 allocated");
        assert!(
            diff(Some(&a), Some(&a)).is_empty(),
            "a status rewrite: nothing"
        );
        s.spec.as_mut().unwrap().external_name = "x".into();
        let b: Object = s.into();
        assert_eq!(reasons(&diff(Some(&a), Some(&b))), ["Updated"]);
        let d = diff(Some(&b), None);
        assert_eq!(d[0].message, "service deleted, VIP 100.65.0.1 freed");
    }

    #[test]
    fn readiness_phase_and_endpoint_counts() {
        let job = |ready| -> Object {
            Job {
                metadata: meta("j"),
                spec: None,
                status: Some(JobStatus { ready }),
            }
            .into()
        };
        let d = diff(Some(&job(true)), Some(&job(false)));
        assert_eq!(reasons(&d), ["NotReady"]);
        assert!(d[0].warning);
        assert_eq!(
            reasons(&diff(Some(&job(false)), Some(&job(true)))),
            ["Ready"]
        );

        let cluster = |phase: ClusterPhase, last_seen| -> Object {
            Cluster {
                metadata: Some(ObjectMeta {
                    name: "c1".into(),
                    ..Default::default()
                }),
                spec: None,
                status: Some(ClusterStatus {
                    phase: phase as i32,
                    last_seen,
                    ..Default::default()
                }),
            }
            .into()
        };
        let ready = cluster(ClusterPhase::Ready, 1);
        assert!(
            diff(Some(&ready), Some(&cluster(ClusterPhase::Ready, 2))).is_empty(),
            "reports make no events"
        );
        assert_eq!(
            reasons(&diff(
                Some(&ready),
                Some(&cluster(ClusterPhase::NotReady, 2))
            )),
            ["NotReady"]
        );

        let ep = |n: usize| -> Object {
            Endpoints {
                metadata: meta("web"),
                spec: None,
                status: Some(EndpointsStatus {
                    clusters: vec![EndpointsClusterStatus {
                        cluster: "c1".into(),
                        exposed: true,
                        addresses: (0..n)
                            .map(|_| EndpointAddress {
                                ready: true,
                                ..Default::default()
                            })
                            .collect(),
                    }],
                }),
            }
            .into()
        };
        let d = diff(Some(&ep(1)), Some(&ep(2)));
        assert_eq!(reasons(&d), ["EndpointsChanged"]);
        assert_eq!(d[0].message, "c1: 2");
        assert!(diff(Some(&ep(2)), Some(&ep(2))).is_empty());
    }

    #[test]
    fn filters_and_keys() {
        let e = MeshEvent {
            timestamp: 100,
            kind: Kind::Service as i32,
            namespace: "shop".into(),
            name: "web".into(),
            ..Default::default()
        };
        let all = Filter::default();
        assert!(all.covers(&e, 100));
        assert!(!all.covers(&e, 100 + EVENT_TTL_S + 1), "expired");
        let other = Filter {
            namespace: Some("default".into()),
            object: None,
        };
        assert!(!other.covers(&e, 100));
        let global = MeshEvent {
            namespace: String::new(),
            ..e.clone()
        };
        assert!(
            other.covers(&global, 100),
            "global objects' events show everywhere"
        );
        let one = Filter {
            namespace: None,
            object: Some((Kind::Service, "web".into())),
        };
        assert!(one.covers(&e, 100));
        assert!(key(1, 2) < key(10, 1), "keys sort by revision");
    }

    fn web(name: &str) -> Object {
        Service {
            metadata: meta(name),
            spec: Some(ServiceSpec {
                ports: vec![skymesh_proto::v1::ServicePort {
                    port: 80,
                    ..Default::default()
                }],
                ..Default::default()
            }),
            status: None,
        }
        .into()
    }

    async fn reasons_of(store: &dyn Store, name: &str) -> Vec<String> {
        let f = Filter {
            namespace: None,
            object: Some((Kind::Service, name.into())),
        };
        let (events, _) = list(store, &f).await.unwrap();
        events.into_iter().map(|e| e.reason).collect()
    }

    /// The recorder against a real store: it records from its cursor, so
    /// writes made while it is stopped are recorded once when it starts
    /// again; expired events are deleted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_from_its_cursor_and_expires() {
        let dir = tempfile::tempdir().unwrap();
        let store: std::sync::Arc<dyn Store> = std::sync::Arc::new(
            skymesh_store::embedded::EmbeddedStore::open(&dir.path().join("s.redb")).unwrap(),
        );
        let reg = Registry::new(
            store.clone(),
            "100.64.0.0/16".parse().unwrap(),
            "100.65.0.0/16".parse().unwrap(),
            Duration::from_secs(3600),
        );
        reg.ensure_default_namespace().await.unwrap();
        init_cursor(store.as_ref()).await.unwrap();
        // Written before the recorder runs.
        reg.create(web("early")).await.unwrap();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(run(reg.clone(), cancel.clone()));
        let wait_for = |name: &'static str, n: usize| {
            let store = store.clone();
            async move {
                for _ in 0..100 {
                    if reasons_of(store.as_ref(), name).await.len() >= n {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                panic!("no events for {name}");
            }
        };
        wait_for("early", 2).await;
        cancel.cancel();
        task.await.unwrap();
        // Written while it is stopped.
        reg.create(web("late")).await.unwrap();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(run(reg.clone(), cancel.clone()));
        wait_for("late", 2).await;
        assert_eq!(
            reasons_of(store.as_ref(), "early").await,
            ["Created", "VipAllocated"]
        );
        assert_eq!(
            reasons_of(store.as_ref(), "late").await,
            ["Created", "VipAllocated"]
        );
        cancel.cancel();
        task.await.unwrap();

        // An hour-old event is no longer listed, and reaped.
        let old = Draft::of(&web("old"), "Created", "x".into(), false)
            .into_event(unix_now() - EVENT_TTL_S - 1);
        store
            .txn(
                Vec::new(),
                vec![Op::Put {
                    key: key(1, 0),
                    value: old.encode_to_vec(),
                }],
            )
            .await
            .unwrap();
        assert!(reasons_of(store.as_ref(), "old").await.is_empty());
        assert_eq!(reap(store.as_ref()).await.unwrap(), 1);
        assert!(store.get(&key(1, 0)).await.unwrap().is_none());
    }

    #[test]
    fn busy_objects_make_a_bounded_number_of_events() {
        let mut f = SpamFilter::default();
        let flap = |name: &str| Draft {
            kind: Kind::Job,
            namespace: "default".into(),
            name: name.into(),
            reason: "NotReady",
            message: String::new(),
            warning: true,
        };
        // A job flipping every second for an hour: 25 at once, then one
        // per 5 minutes.
        let stored = (0..3600).filter(|t| f.allow(&flap("web-1"), *t)).count();
        assert_eq!(stored, 25 + 3600 / 300 - 1, "{stored}");
        // Another object is not held back by it.
        assert!(f.allow(&flap("web-2"), 3600));
        // After a quiet while the burst is back.
        let later = 3600 + 25 * 300;
        assert_eq!(
            (0..30).filter(|_| f.allow(&flap("web-1"), later)).count(),
            25
        );
        // The filter itself stays bounded.
        for i in 0..SPAM_TRACKED + 10 {
            f.allow(&flap(&format!("j{i}")), later);
        }
        assert!(f.buckets.len() <= SPAM_TRACKED);
    }

    #[test]
    fn join_refusals_are_rate_limited_per_cluster() {
        let r = JoinRefusals::default();
        assert!(r.allow("c1", 100));
        assert!(!r.allow("c1", 105));
        assert!(r.allow("c2", 105));
        assert!(r.allow("c1", 100 + JOIN_REFUSED_EVERY_S));
    }
}
