//! Controllers: level-triggered loops that make derived state match the
//! objects users wrote.
//!
//! - Endpoints: every Service with a selector owns an Endpoints object of
//!   the same name listing the jobs that match, in every cluster; user-made
//!   Endpoints get their addresses from their own selector, per-cluster
//!   limits and exposure.
//! - Service status: NodePort/LoadBalancer services list the underlay
//!   addresses of their exposing gateways as `external_ips`.
//! - Cluster phase: a joined gateway that stops reporting becomes NotReady,
//!   and the jobs of a NotReady cluster not ready (so every Endpoints drops
//!   them) until its gateway reports their health again.
//! - Expired join tokens are removed.
//!
//! Each pass recomputes everything from one consistent read of the store
//! ([`plan`] is pure) and writes only differences, each guarded by the
//! revision it was computed from; a lost race just triggers another pass.
//! Passes run after every store change and at least every few seconds, so
//! the controller heals after restarts and missed events.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use futures::StreamExt as _;
use skymesh_proto::v1::{
    Cluster, ClusterPhase, EndpointAddress, Endpoints, EndpointsClusterStatus, EndpointsSpec,
    EndpointsStatus, Job, Object, ObjectMeta, Service, ServiceType, object::Obj,
};
use tokio_util::sync::CancellationToken;

use crate::error::Result;
use crate::registry::{ENDPOINTS_CONTROLLER, MANAGED_BY, Registry, decode, is_managed, unix_now};

/// A gateway that has not reported for longer than this is NotReady.
/// Tuning: meshd reports every 5 s at the least (`REPORT_INTERVAL`) and
/// after every probe round that changed (about every second), so this
/// tolerates one lost report; with a pass due when the first cluster would
/// go stale ([`next_stale_at`]) and `last_seen` in whole seconds, a dead
/// gateway's cluster is NotReady within ~10 s of its last report.
pub const CLUSTER_STALE_AFTER_S: i64 = 8;
/// Longest time between passes without any change.
const RESYNC: Duration = Duration::from_secs(5);
/// Shortest wait before a pass that is due at once (a stale cluster whose
/// write lost a race), so a pass that keeps failing does not spin.
const MIN_WAIT: Duration = Duration::from_millis(200);
/// After a change, wait this long so a burst of writes (e.g. status
/// reports of many gateways) costs one pass, not one pass per write.
const DEBOUNCE: Duration = Duration::from_millis(50);

/// What one pass wants written.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Objects to write, with the revision they were read at (0 = create).
    pub writes: Vec<(Object, u64)>,
    /// Objects to delete, with the revision they were read at.
    pub deletes: Vec<(Object, u64)>,
}

/// Everything a pass reads, with revisions.
#[derive(Debug, Default)]
pub struct World {
    pub services: Vec<(Service, u64)>,
    pub jobs: Vec<(Job, u64)>,
    pub endpoints: Vec<(Endpoints, u64)>,
    pub clusters: Vec<(Cluster, u64)>,
    /// Since when (unix seconds) this controller has run: a gateway's
    /// silence counts only from then, so a coordinator that was down (or a
    /// replica that just took over) does not take every gateway for dead
    /// before they could report to it.
    pub reports_since: i64,
}

impl World {
    /// Sorts decoded objects by kind.
    pub fn from_objects(objs: impl IntoIterator<Item = Object>) -> Self {
        let mut w = World::default();
        for o in objs {
            let rev = o.resource_version();
            match o.obj {
                Some(Obj::Service(s)) => w.services.push((s, rev)),
                Some(Obj::Job(j)) => w.jobs.push((j, rev)),
                Some(Obj::Endpoints(e)) => w.endpoints.push((e, rev)),
                Some(Obj::Cluster(c)) => w.clusters.push((c, rev)),
                Some(Obj::Namespace(_)) | None => {}
            }
        }
        w
    }
}

fn meta(m: &Option<ObjectMeta>) -> (&str, &str) {
    m.as_ref()
        .map_or(("", ""), |m| (m.namespace.as_str(), m.name.as_str()))
}

/// Whether `labels` satisfy every term of a non-empty `selector`.
pub fn selects(selector: &HashMap<String, String>, labels: &HashMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn address(j: &Job) -> EndpointAddress {
    let spec = j.spec.clone().unwrap_or_default();
    EndpointAddress {
        ip: spec.ip,
        ports: spec.ports,
        job: meta(&j.metadata).1.to_string(),
        ready: j.status.as_ref().is_some_and(|s| s.ready),
    }
}

/// The addresses an Endpoints spec selects in namespace `ns`: with no
/// per-cluster entries, every matching job in every cluster (exposed);
/// otherwise, per listed cluster, ready jobs first, at most
/// `num_endpoints` of them (0 = all).
pub fn endpoints_status(ns: &str, spec: &EndpointsSpec, jobs: &[Job]) -> EndpointsStatus {
    let mut by_cluster: BTreeMap<&str, Vec<&Job>> = BTreeMap::new();
    for j in jobs {
        let (jns, _) = meta(&j.metadata);
        let labels = j.metadata.as_ref().map(|m| &m.labels);
        if jns == ns
            && labels.is_some_and(|l| selects(&spec.selector, l))
            && let Some(js) = &j.spec
        {
            by_cluster.entry(js.cluster.as_str()).or_default().push(j);
        }
    }
    for list in by_cluster.values_mut() {
        list.sort_by(|a, b| meta(&a.metadata).1.cmp(meta(&b.metadata).1));
    }
    // Ready first, keeping name order within each group; at most `n`.
    let limit = |mut addrs: Vec<EndpointAddress>, n: u32| {
        addrs.sort_by_key(|a| !a.ready);
        if n > 0 {
            addrs.truncate(usize::try_from(n).unwrap_or(usize::MAX));
        }
        addrs
    };
    let clusters = if spec.clusters.is_empty() {
        // Each cluster on its own (without settings: all, exposed).
        let (n, exposed) = spec
            .every_cluster
            .as_ref()
            .map_or((0, true), |e| (e.num_endpoints, e.exposed));
        by_cluster
            .iter()
            .map(|(c, js)| EndpointsClusterStatus {
                cluster: c.to_string(),
                exposed,
                addresses: limit(js.iter().map(|j| address(j)).collect(), n),
            })
            .collect()
    } else {
        spec.clusters
            .iter()
            .map(|cs| {
                let addrs: Vec<EndpointAddress> = by_cluster
                    .get(cs.cluster.as_str())
                    .map(|js| js.iter().map(|j| address(j)).collect())
                    .unwrap_or_default();
                let addrs = limit(addrs, cs.num_endpoints);
                EndpointsClusterStatus {
                    cluster: cs.cluster.clone(),
                    exposed: cs.exposed,
                    addresses: addrs,
                }
            })
            .collect()
    };
    EndpointsStatus { clusters }
}

fn external_ips(svc: &Service, clusters: &[(Cluster, u64)]) -> Vec<String> {
    let Some(spec) = &svc.spec else {
        return Vec::new();
    };
    if !matches!(
        spec.r#type(),
        ServiceType::NodePort | ServiceType::LoadBalancer
    ) {
        return Vec::new();
    }
    let mut ips: Vec<String> = clusters
        .iter()
        .filter(|(c, _)| {
            spec.clusters.is_empty() || spec.clusters.iter().any(|n| n == meta(&c.metadata).1)
        })
        .filter_map(|(c, _)| {
            let ep = &c.status.as_ref()?.endpoint;
            ep.parse::<std::net::SocketAddr>()
                .ok()
                .map(|a| a.ip().to_string())
        })
        .collect();
    ips.sort();
    ips.dedup();
    ips
}

/// Whether a cluster's gateway has stopped reporting: Ready with a
/// `last_seen` (or the controller's start, if later) over
/// [`CLUSTER_STALE_AFTER_S`] ago, or already NotReady.
fn cluster_down(c: &Cluster, now: i64, since: i64) -> bool {
    c.status.as_ref().is_some_and(|st| match st.phase() {
        ClusterPhase::Ready => now - st.last_seen.max(since) > CLUSTER_STALE_AFTER_S,
        ClusterPhase::NotReady => true,
        ClusterPhase::Pending | ClusterPhase::Unspecified => false,
    })
}

/// When the first Ready cluster of `world` goes stale if its gateway does
/// not report again (unix seconds), so a pass can be due then.
pub fn next_stale_at(world: &World) -> Option<i64> {
    world
        .clusters
        .iter()
        .filter_map(|(c, _)| c.status.as_ref())
        .filter(|st| st.phase() == ClusterPhase::Ready)
        .map(|st| st.last_seen.max(world.reports_since) + CLUSTER_STALE_AFTER_S + 1)
        .min()
}

/// Computes one pass's writes from a consistent view of the store.
pub fn plan(world: &World, now: i64) -> Plan {
    let mut out = Plan::default();
    // Clusters whose gateway stopped reporting: NotReady, and their jobs
    // not ready, before the endpoints are computed from the jobs (the
    // gateway's next report sets both again).
    let down: std::collections::BTreeSet<&str> = world
        .clusters
        .iter()
        .filter(|(c, _)| cluster_down(c, now, world.reports_since))
        .map(|(c, _)| meta(&c.metadata).1)
        .collect();
    for (c, rev) in &world.clusters {
        if down.contains(meta(&c.metadata).1)
            && c.status
                .as_ref()
                .is_some_and(|st| st.phase() == ClusterPhase::Ready)
        {
            let mut c = c.clone();
            if let Some(s) = c.status.as_mut() {
                s.phase = ClusterPhase::NotReady as i32;
            }
            out.writes.push((c.into(), *rev));
        }
    }
    let jobs: Vec<Job> = world
        .jobs
        .iter()
        .map(|(j, rev)| {
            let in_down = j
                .spec
                .as_ref()
                .is_some_and(|s| down.contains(s.cluster.as_str()));
            if in_down && j.status.as_ref().is_some_and(|s| s.ready) {
                let mut j = j.clone();
                j.status.get_or_insert_with(Default::default).ready = false;
                out.writes.push((j.clone().into(), *rev));
                j
            } else {
                j.clone()
            }
        })
        .collect();
    let existing: BTreeMap<(&str, &str), &(Endpoints, u64)> = world
        .endpoints
        .iter()
        .map(|e| (meta(&e.0.metadata), e))
        .collect();
    let mut owned = std::collections::BTreeSet::new();
    for (svc, rev) in &world.services {
        let key = meta(&svc.metadata);
        let spec = svc.spec.clone().unwrap_or_default();
        // External IPs.
        let ips = external_ips(svc, &world.clusters);
        if svc.status.as_ref().map(|s| &s.external_ips) != Some(&ips) {
            let mut s = svc.clone();
            s.status.get_or_insert_with(Default::default).external_ips = ips;
            out.writes.push((s.into(), *rev));
        }
        if spec.selector.is_empty() || spec.r#type() == ServiceType::ExternalName {
            continue;
        }
        owned.insert(key);
        let ep_spec = EndpointsSpec {
            selector: spec.selector.clone(),
            ..Default::default()
        };
        let status = endpoints_status(key.0, &ep_spec, &jobs);
        match existing.get(&key) {
            Some((ep, ep_rev)) => {
                if ep.spec.as_ref() != Some(&ep_spec)
                    || ep.status.as_ref() != Some(&status)
                    || !is_managed(ep)
                {
                    let mut e = ep.clone();
                    e.spec = Some(ep_spec);
                    e.status = Some(status);
                    if let Some(m) = e.metadata.as_mut() {
                        m.annotations
                            .insert(MANAGED_BY.into(), ENDPOINTS_CONTROLLER.into());
                    }
                    out.writes.push((e.into(), *ep_rev));
                }
            }
            None => {
                let mut annotations = HashMap::new();
                annotations.insert(MANAGED_BY.to_string(), ENDPOINTS_CONTROLLER.to_string());
                let e = Endpoints {
                    metadata: Some(ObjectMeta {
                        name: key.1.to_string(),
                        namespace: key.0.to_string(),
                        annotations,
                        uid: crate::registry::new_uid(),
                        creation_timestamp: now,
                        ..Default::default()
                    }),
                    spec: Some(ep_spec),
                    status: Some(status),
                };
                out.writes.push((e.into(), 0));
            }
        }
    }
    for (ep, rev) in &world.endpoints {
        let key = meta(&ep.metadata);
        if owned.contains(&key) {
            continue;
        }
        if is_managed(ep) {
            out.deletes.push((ep.clone().into(), *rev));
            continue;
        }
        let status = endpoints_status(key.0, &ep.spec.clone().unwrap_or_default(), &jobs);
        if ep.status.as_ref() != Some(&status) {
            let mut e = ep.clone();
            e.status = Some(status);
            out.writes.push((e.into(), *rev));
        }
    }
    out
}

/// One pass: read, plan, write. Returns the revision it read at and when
/// the next cluster goes stale without a report ([`next_stale_at`]).
pub async fn reconcile(reg: &Registry, reports_since: i64) -> Result<(u64, Option<i64>)> {
    let (kvs, rev) = reg.store().range(crate::keyspace::REGISTRY).await?;
    let objs = kvs.iter().map(decode).collect::<Result<Vec<_>>>()?;
    let mut world = World::from_objects(objs);
    world.reports_since = reports_since;
    let p = plan(&world, unix_now());
    let stale_at = next_stale_at(&world);
    for (o, r) in &p.writes {
        if reg.write_if_unchanged(o, *r).await?.is_none() {
            tracing::debug!(
                name = o.name(),
                "object changed during reconcile; next pass redoes it"
            );
        } else {
            tracing::debug!(
                kind = o.kind().singular(),
                namespace = o.namespace(),
                name = o.name(),
                "reconciled"
            );
        }
    }
    for (o, r) in &p.deletes {
        reg.delete_if_unchanged(o, *r).await?;
        tracing::info!(
            namespace = o.namespace(),
            name = o.name(),
            "deleted endpoints of a removed service"
        );
    }
    let mut ops = Vec::new();
    crate::auth::expired_join_tokens(reg.store().as_ref(), &mut ops).await?;
    if !ops.is_empty() {
        reg.store().txn(vec![], ops).await?;
    }
    Ok((rev, stale_at))
}

/// Runs the controllers until `cancel` fires.
pub async fn run(reg: Registry, cancel: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    let started = unix_now();
    loop {
        let (rev, stale_at) = match reconcile(&reg, started).await {
            Ok(r) => {
                backoff = Duration::from_millis(100);
                r
            }
            Err(e) => {
                tracing::warn!(error = %e, "controller pass failed; retrying");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = cancel.cancelled() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let mut changes = reg.store().watch(crate::keyspace::REGISTRY, rev);
        // Due again at the next resync, or when a cluster goes stale.
        let wait = stale_at
            .map(|t| Duration::from_secs(u64::try_from(t - unix_now()).unwrap_or(0)))
            .map_or(RESYNC, |d| d.clamp(MIN_WAIT, RESYNC));
        tokio::select! {
            _ = changes.next() => {
                tokio::select! {
                    () = tokio::time::sleep(DEBOUNCE) => {}
                    () = cancel.cancelled() => return,
                }
            }
            () = tokio::time::sleep(wait) => {}
            () = cancel.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skymesh_proto::v1::{EndpointsClusterSpec, JobSpec, JobStatus, ServiceSpec};

    fn job(name: &str, cluster: &str, ip: &str, app: &str, ready: bool) -> Job {
        Job {
            metadata: Some(ObjectMeta {
                name: name.into(),
                namespace: "default".into(),
                labels: [("app".to_string(), app.to_string())].into(),
                ..Default::default()
            }),
            spec: Some(JobSpec {
                cluster: cluster.into(),
                ip: ip.into(),
                ports: vec![],
                probe: None,
            }),
            status: Some(JobStatus { ready }),
        }
    }

    fn svc(name: &str, app: &str) -> Service {
        Service {
            metadata: Some(ObjectMeta {
                name: name.into(),
                namespace: "default".into(),
                ..Default::default()
            }),
            spec: Some(ServiceSpec {
                selector: [("app".to_string(), app.to_string())].into(),
                ..Default::default()
            }),
            status: Some(Default::default()),
        }
    }

    #[test]
    fn service_endpoints_group_every_cluster() {
        let jobs = vec![
            job("w2", "b", "10.2.0.2", "web", true),
            job("w1", "a", "10.1.0.2", "web", true),
            job("w3", "a", "10.1.0.3", "web", false),
            job("db", "a", "10.1.0.9", "db", true),
        ];
        let world = World {
            services: vec![(svc("web", "web"), 5)],
            jobs: jobs.into_iter().map(|j| (j, 1)).collect(),
            ..Default::default()
        };
        let p = plan(&world, 100);
        assert_eq!(p.writes.len(), 1);
        let (o, rev) = &p.writes[0];
        assert_eq!(*rev, 0, "created");
        let Some(Obj::Endpoints(e)) = &o.obj else {
            panic!()
        };
        assert!(is_managed(e));
        let st = e.status.as_ref().unwrap();
        assert_eq!(st.clusters.len(), 2);
        assert_eq!(st.clusters[0].cluster, "a");
        let a: Vec<_> = st.clusters[0]
            .addresses
            .iter()
            .map(|a| (a.job.as_str(), a.ready))
            .collect();
        assert_eq!(a, [("w1", true), ("w3", false)]);
        assert!(st.clusters.iter().all(|c| c.exposed));
    }

    #[test]
    fn steady_state_writes_nothing_and_orphans_are_deleted() {
        let world = World {
            services: vec![(svc("web", "web"), 5)],
            jobs: vec![(job("w1", "a", "10.1.0.2", "web", true), 1)],
            ..Default::default()
        };
        let (o, _) = plan(&world, 1).writes.remove(0);
        let Some(Obj::Endpoints(e)) = o.obj else {
            panic!()
        };
        let mut world = World {
            endpoints: vec![(e.clone(), 7)],
            ..world
        };
        assert_eq!(
            plan(&world, 1),
            Plan::default(),
            "level-triggered pass is idempotent"
        );
        world.services.clear();
        let p = plan(&world, 1);
        assert_eq!(p.deletes.len(), 1);
        assert_eq!(p.deletes[0].1, 7);
    }

    #[test]
    fn user_endpoints_honour_limit_and_readiness() {
        let spec = EndpointsSpec {
            selector: [("app".to_string(), "web".to_string())].into(),
            primary_cluster: "a".into(),
            every_cluster: None,
            clusters: vec![EndpointsClusterSpec {
                cluster: "a".into(),
                num_endpoints: 2,
                exposed: false,
            }],
        };
        let jobs = vec![
            job("w1", "a", "10.1.0.1", "web", false),
            job("w2", "a", "10.1.0.2", "web", true),
            job("w3", "a", "10.1.0.3", "web", true),
            job("w4", "b", "10.2.0.4", "web", true),
        ];
        let st = endpoints_status("default", &spec, &jobs);
        assert_eq!(st.clusters.len(), 1);
        let c = &st.clusters[0];
        assert!(!c.exposed);
        let names: Vec<_> = c.addresses.iter().map(|a| a.job.as_str()).collect();
        assert_eq!(
            names,
            ["w2", "w3"],
            "ready jobs first, at most num_endpoints"
        );
        assert!(
            endpoints_status("other", &spec, &jobs).clusters[0]
                .addresses
                .is_empty()
        );
    }

    #[test]
    fn without_a_primary_cluster_limit_and_exposure_apply_per_cluster() {
        let spec = EndpointsSpec {
            selector: [("app".to_string(), "web".to_string())].into(),
            every_cluster: Some(EndpointsClusterSpec {
                cluster: String::new(),
                num_endpoints: 1,
                exposed: false,
            }),
            ..Default::default()
        };
        let jobs = vec![
            job("w1", "a", "10.1.0.1", "web", false),
            job("w2", "a", "10.1.0.2", "web", true),
            job("w3", "b", "10.2.0.3", "web", true),
            job("w4", "b", "10.2.0.4", "web", true),
        ];
        let st = endpoints_status("default", &spec, &jobs);
        let got: Vec<(&str, bool, Vec<&str>)> = st
            .clusters
            .iter()
            .map(|c| {
                let jobs = c.addresses.iter().map(|a| a.job.as_str()).collect();
                (c.cluster.as_str(), c.exposed, jobs)
            })
            .collect();
        assert_eq!(
            got,
            [("a", false, vec!["w2"]), ("b", false, vec!["w3"])],
            "one ready job per cluster, each for its own clients"
        );
        let mut exposed = spec.clone();
        exposed.every_cluster = Some(EndpointsClusterSpec {
            exposed: true,
            ..Default::default()
        });
        let st = endpoints_status("default", &exposed, &jobs);
        assert!(
            st.clusters
                .iter()
                .all(|c| c.exposed && c.addresses.len() == 2)
        );
    }

    #[test]
    fn stale_clusters_become_not_ready() {
        let c = Cluster {
            metadata: Some(ObjectMeta {
                name: "a".into(),
                ..Default::default()
            }),
            spec: None,
            status: Some(skymesh_proto::v1::ClusterStatus {
                phase: ClusterPhase::Ready as i32,
                last_seen: 100,
                ..Default::default()
            }),
        };
        let mut world = World {
            services: vec![(svc("web", "web"), 5)],
            clusters: vec![(c, 3)],
            jobs: vec![
                (job("w1", "a", "10.1.0.2", "web", true), 8),
                (job("w2", "b", "10.2.0.2", "web", true), 9),
            ],
            ..Default::default()
        };
        let fresh = plan(&world, 100 + CLUSTER_STALE_AFTER_S);
        let (o, _) = &fresh.writes[0];
        let Some(Obj::Endpoints(e)) = &o.obj else {
            panic!("only the endpoints are written: {fresh:?}")
        };
        assert_eq!(fresh.writes.len(), 1);
        world.endpoints = vec![(e.clone(), 10)];
        assert_eq!(
            next_stale_at(&world),
            Some(100 + CLUSTER_STALE_AFTER_S + 1),
            "a pass is due when a goes stale"
        );

        let stale = plan(&world, 100 + CLUSTER_STALE_AFTER_S + 1);
        let mut kinds: Vec<(&str, &str, u64)> = stale
            .writes
            .iter()
            .map(|(o, rev)| (o.kind().singular(), o.name(), *rev))
            .collect();
        kinds.sort();
        assert_eq!(
            kinds,
            [
                ("cluster", "a", 3),
                ("endpoints", "web", 10),
                ("job", "w1", 8)
            ],
            "a NotReady, its job not ready, the endpoints without it; b's job untouched"
        );
        let ready = |o: &Object| match &o.obj {
            Some(Obj::Job(j)) => j.status.as_ref().map(|s| s.ready),
            Some(Obj::Endpoints(e)) => {
                Some(e.status.as_ref().unwrap().clusters[0].addresses[0].ready)
            }
            _ => None,
        };
        for (o, _) in &stale.writes {
            assert!(!ready(o).unwrap_or(false), "{o:?}");
        }
        // Once NotReady (and its jobs written), nothing more until it reports.
        for (o, _) in stale.writes {
            match o.obj {
                Some(Obj::Cluster(c)) => world.clusters = vec![(c, 11)],
                Some(Obj::Job(j)) => world.jobs[0] = (j, 12),
                Some(Obj::Endpoints(e)) => world.endpoints = vec![(e, 13)],
                _ => {}
            }
        }
        assert_eq!(plan(&world, 200), Plan::default());
        assert_eq!(next_stale_at(&world), None, "no Ready cluster left");

        // A controller that has just started (a coordinator back from an
        // outage) gives every gateway the whole time to report to it.
        let (c, _) = world.clusters.remove(0);
        let mut ready = c;
        ready.status.as_mut().unwrap().phase = ClusterPhase::Ready as i32;
        world.clusters = vec![(ready, 14)];
        world.reports_since = 500;
        let p = plan(&world, 500 + CLUSTER_STALE_AFTER_S);
        assert!(
            p.writes
                .iter()
                .all(|(o, _)| o.kind() != skymesh_proto::v1::Kind::Cluster),
            "not stale yet: {p:?}"
        );
        assert_eq!(next_stale_at(&world), Some(500 + CLUSTER_STALE_AFTER_S + 1));
        assert!(
            !plan(&world, 500 + CLUSTER_STALE_AFTER_S + 1)
                .writes
                .is_empty()
        );
    }
}
