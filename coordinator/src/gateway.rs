//! The gateway API: meshd joins, streams its netmap, reports health and
//! registers its jobs.

use std::collections::{BTreeMap, BTreeSet};

use futures::StreamExt as _;
use skymesh_proto::v1::{
    ClusterPhase, JobHealth, JoinRequest, JoinResponse, Kind, NetmapDelta, NetmapRequest,
    NetmapUpdate, Object, StatusAck, StatusReport, SyncJobsRequest, SyncJobsResponse,
    gateway_server::Gateway, netmap_update::Update, object::Obj,
};
use skymesh_proto::validate;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::auth::{self, AdminAuth};
use crate::error::{Error, Result};
use crate::limits::{MAX_NETMAP_STREAMS_PER_CLUSTER, StreamLimit};
use crate::registry::{REGISTERED_BY, Registry, decode, object_key, optimistic, unix_now};
use crate::shutdown::{ResponseStream, until_shutdown};
use crate::worldcache::{Update as CacheUpdate, WorldCache};
use tokio::sync::broadcast;

/// Jobs one cluster may register (its jobs file), a bound on what a
/// gateway's credential can make the store hold.
pub const MAX_JOBS_PER_CLUSTER: usize = 10_000;

/// Implements [`Gateway`].
#[derive(Clone)]
pub struct GatewayService {
    reg: Registry,
    admin: AdminAuth,
    shutdown: CancellationToken,
    netmaps: StreamLimit,
    cache: WorldCache,
    refusals: crate::events::JoinRefusals,
}

impl GatewayService {
    /// A gateway API over `reg`; the admin token is also accepted. Netmap
    /// streams end when `shutdown` fires. Spawns the shared netmap cache
    /// (call within a tokio runtime).
    pub fn new(reg: Registry, admin: AdminAuth, shutdown: CancellationToken) -> Self {
        // One world for every netmap stream, kept current by one watch.
        let cache = WorldCache::start(reg.store().clone(), shutdown.clone());
        GatewayService {
            reg,
            admin,
            shutdown,
            netmaps: StreamLimit::new("netmap streams", MAX_NETMAP_STREAMS_PER_CLUSTER),
            cache,
            refusals: crate::events::JoinRefusals::default(),
        }
    }

    /// The open netmap streams (shared: for the metrics).
    pub fn netmaps(&self) -> StreamLimit {
        self.netmaps.clone()
    }

    async fn authorize(&self, md: &tonic::metadata::MetadataMap, cluster: &str) -> Result<()> {
        if self.admin.is_admin(md) {
            return Ok(());
        }
        auth::check_cluster(self.reg.store().as_ref(), cluster, auth::bearer(md)).await
    }

    async fn join(&self, token: Option<&str>, req: JoinRequest) -> Result<JoinResponse> {
        let cluster = validate::name("cluster", &req.cluster)?;
        validate::wireguard_key("public_key", &req.public_key)?;
        validate::endpoint("endpoint", &req.endpoint)?;
        let Some(token) = token else {
            return Err(Error::Unauthenticated(
                "join needs a join token (authorization: Bearer <token>)".into(),
            ));
        };
        let joined = match self
            .reg
            .join(&cluster, token, &req.public_key, &req.endpoint)
            .await
        {
            Ok(j) => j,
            Err(e) => {
                // Only for clusters that exist, and rate-limited: the
                // caller is not authenticated.
                if matches!(
                    e,
                    Error::Unauthenticated(_) | Error::PermissionDenied(_) | Error::Precondition(_)
                ) && self.reg.get(Kind::Cluster, "", &cluster).await.is_ok()
                    && self.refusals.allow(&cluster, unix_now())
                {
                    let why = e.to_string();
                    crate::events::record(
                        self.reg.store().as_ref(),
                        crate::events::join_refused(&cluster, &why),
                    )
                    .await;
                }
                return Err(e);
            }
        };
        Ok(JoinResponse {
            credential: joined.credential,
            overlay_ip: joined.overlay_ip,
            overlay_cidr: self.reg.overlay_cidr().to_string(),
            service_cidr: self.reg.service_cidr().to_string(),
        })
    }

    async fn report(&self, req: StatusReport) -> Result<()> {
        let cluster = validate::name("cluster", &req.cluster)?;
        if !req.endpoint.is_empty() {
            validate::endpoint("endpoint", &req.endpoint)?;
        }
        let key = &object_key(Kind::Cluster, "", &cluster);
        let (cluster, req) = (cluster.as_str(), &req);
        optimistic(key, move |_| async move {
            let Some(cur) = self.reg.store().get(key).await? else {
                return Err(Error::Precondition(format!(
                    "cluster {cluster:?} does not exist"
                )));
            };
            let mut o = decode(&cur)?;
            let Some(Obj::Cluster(c)) = o.obj.as_mut() else {
                return Ok(Some(()));
            };
            let st = c.status.get_or_insert_with(Default::default);
            st.peers = req.peers.clone();
            st.last_seen = unix_now();
            st.phase = ClusterPhase::Ready as i32;
            let moved = !req.endpoint.is_empty() && st.endpoint != req.endpoint;
            if moved {
                st.endpoint = req.endpoint.clone();
            }
            if self
                .reg
                .write_if_unchanged(&o, cur.mod_revision)
                .await?
                .is_none()
            {
                return Ok(None);
            }
            if moved {
                tracing::info!(%cluster, endpoint = %req.endpoint, "gateway endpoint changed");
            }
            Ok(Some(()))
        })
        .await?;
        for h in &req.jobs {
            self.set_job_ready(cluster, h).await?;
        }
        Ok(())
    }

    async fn set_job_ready(&self, cluster: &str, h: &JobHealth) -> Result<()> {
        let ns = if h.namespace.is_empty() {
            validate::DEFAULT_NAMESPACE
        } else {
            &h.namespace
        };
        let key = object_key(
            Kind::Job,
            &validate::name("namespace", ns)?,
            &validate::name("name", &h.name)?,
        );
        let key = &key;
        optimistic(key, move |_| async move {
            let Some(cur) = self.reg.store().get(key).await? else {
                return Ok(Some(()));
            };
            let mut o = decode(&cur)?;
            let Some(Obj::Job(j)) = o.obj.as_mut() else {
                return Ok(Some(()));
            };
            if j.spec.as_ref().is_none_or(|s| s.cluster != cluster) {
                return Err(Error::PermissionDenied(format!(
                    "job {:?} does not run in cluster {cluster:?}",
                    h.name
                )));
            }
            let st = j.status.get_or_insert_with(Default::default);
            if st.ready == h.ready {
                return Ok(Some(()));
            }
            st.ready = h.ready;
            Ok(self
                .reg
                .write_if_unchanged(&o, cur.mod_revision)
                .await?
                .map(|_| ()))
        })
        .await
    }

    async fn sync_jobs(&self, req: SyncJobsRequest) -> Result<SyncJobsResponse> {
        let cluster = validate::name("cluster", &req.cluster)?;
        if req.jobs.len() > MAX_JOBS_PER_CLUSTER {
            return Err(Error::Exhausted(format!(
                "jobs: at most {MAX_JOBS_PER_CLUSTER} per cluster (the jobs file has {})",
                req.jobs.len()
            )));
        }
        let (existing, _) = self.reg.list(Kind::Job, None).await?;
        let mut mine: BTreeMap<(String, String), Object> = BTreeMap::new();
        let mut others = BTreeSet::new();
        for o in existing {
            let by = o
                .meta()
                .and_then(|m| m.annotations.get(REGISTERED_BY))
                .cloned();
            let k = (o.namespace().to_string(), o.name().to_string());
            if by.as_deref() == Some(cluster.as_str()) {
                mine.insert(k, o);
            } else {
                others.insert(k);
            }
        }
        // Every job is checked before any is written: a bad entry in the
        // jobs file changes nothing.
        let own = self.reg.get(Kind::Cluster, "", &cluster).await?;
        let mut checked = Vec::with_capacity(req.jobs.len());
        for mut j in req.jobs {
            j.spec.get_or_insert_with(Default::default).cluster = cluster.clone();
            j.metadata
                .get_or_insert_with(Default::default)
                .annotations
                .insert(REGISTERED_BY.into(), cluster.clone());
            let mut o: Object = j.into();
            validate::object(&mut o)?;
            if let Some(Obj::Job(j)) = o.obj.as_ref() {
                crate::registry::job_ip_in_cluster(j, &own)?;
            }
            checked.push(o);
        }
        let mut out = Vec::new();
        let mut wanted = BTreeSet::new();
        for mut o in checked {
            let k = (o.namespace().to_string(), o.name().to_string());
            if others.contains(&k) {
                return Err(Error::Precondition(format!(
                    "job {:?} in namespace {:?} already exists and was not registered by cluster {cluster:?}",
                    k.1, k.0
                )));
            }
            wanted.insert(k.clone());
            let written = match mine.get(&k) {
                Some(cur) if same_user_fields(cur, &o) => cur.clone(),
                Some(cur) => {
                    if let Some(m) = o.meta_mut() {
                        m.resource_version = cur.resource_version();
                    }
                    self.reg.update(o).await?
                }
                None => self.reg.create(o).await?.object,
            };
            if let Some(Obj::Job(j)) = written.obj {
                out.push(j);
            }
        }
        for (k, _) in mine.iter().filter(|(k, _)| !wanted.contains(*k)) {
            match self.reg.delete(Kind::Job, &k.0, &k.1).await {
                Ok(_) | Err(Error::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(SyncJobsResponse { jobs: out })
    }
}

fn same_user_fields(a: &Object, b: &Object) -> bool {
    match (&a.obj, &b.obj) {
        (Some(Obj::Job(x)), Some(Obj::Job(y))) => {
            x.spec == y.spec
                && x.metadata.as_ref().map(|m| &m.labels) == y.metadata.as_ref().map(|m| &m.labels)
        }
        _ => false,
    }
}

type NetmapStream = ResponseStream<NetmapUpdate>;

/// Streams a cluster's netmap from the shared world: a snapshot (or, when
/// resuming, the changes since `from`), then one delta per store revision
/// that changes it; a snapshot again when its identity changes or the
/// stream fell behind the cache's backlog.
fn netmap_stream(reg: Registry, cache: WorldCache, cluster: String, from: u64) -> NetmapStream {
    let overlay = reg.overlay_cidr().to_string();
    let services = reg.service_cidr().to_string();
    let s = async_stream::try_stream! {
        cache.ready().await?;
        // Subscribed before reading: every revision after `rev` arrives.
        let mut updates = cache.subscribe();
        let (rev, exists) = {
            let v = cache.view();
            (v.revision(), v.world().has_cluster(&cluster))
        };
        if !exists {
            Err(Error::Precondition(format!("cluster {cluster:?} does not exist")))?;
        }
        let resumed = if from > 0 && from <= rev {
            // Collect what changed in (from, rev]; compacted history means
            // a snapshot instead. Reads only the history, never the store.
            let mut touched = BTreeSet::new();
            let mut ok = from == rev;
            let mut catch_up = reg.store().watch("/", from);
            while !ok {
                match catch_up.next().await {
                    Some(Ok(b)) => {
                        touched.extend(b.events.iter().map(|e| e.kv.key.clone()));
                        ok = b.revision >= rev;
                    }
                    Some(Err(_)) | None => break,
                }
            }
            ok.then_some(touched)
        } else {
            None
        };
        let mut sent_peers: Option<BTreeMap<String, _>> = None;
        let (first, mut identity) = {
            let v = cache.view();
            let w = v.world();
            let first = match &resumed {
                Some(touched) => {
                    let changes = w.changes(&cluster, touched, &mut sent_peers);
                    tracing::info!(%cluster, from, to = rev, changes = changes.len(), "netmap stream resumed");
                    Update::Delta(NetmapDelta { changes })
                }
                None => {
                    sent_peers = Some(w.peers(&cluster));
                    tracing::info!(%cluster, revision = rev, "netmap snapshot sent");
                    Update::Snapshot(w.snapshot(&cluster, &overlay, &services))
                }
            };
            (first, w.identity(&cluster))
        };
        yield NetmapUpdate { resource_version: rev, update: Some(first) };
        let mut last = rev;
        loop {
            let (revision, keys) = match updates.recv().await {
                Ok(CacheUpdate::Touched { revision, keys }) => (revision, Some(keys)),
                Ok(CacheUpdate::Reloaded { revision }) => (revision, None),
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::info!(%cluster, missed, "netmap stream fell behind; sending a snapshot");
                    (0, None)
                }
                Err(broadcast::error::RecvError::Closed) => {
                    Err(Error::Internal("the netmap cache stopped".into()))?;
                    break;
                }
            };
            if keys.is_some() && revision <= last {
                continue;
            }
            let next = {
                let v = cache.view();
                let w = v.world();
                if !w.has_cluster(&cluster) {
                    None
                } else {
                    let now = w.identity(&cluster);
                    let update = match &keys {
                        Some(keys) if now == identity => {
                            let changes = w.changes(&cluster, keys, &mut sent_peers);
                            (!changes.is_empty()).then_some(Update::Delta(NetmapDelta { changes }))
                        }
                        _ => {
                            identity = now;
                            sent_peers = Some(w.peers(&cluster));
                            Some(Update::Snapshot(w.snapshot(&cluster, &overlay, &services)))
                        }
                    };
                    // A snapshot is of the world as it is now.
                    let at = if keys.is_some() { revision } else { v.revision() };
                    Some((at, update))
                }
            };
            let Some((revision, update)) = next else {
                Err(Error::NotFound { kind: "cluster", namespace: String::new(), name: cluster.clone() })?;
                break;
            };
            last = revision;
            if let Some(update) = update {
                yield NetmapUpdate { resource_version: revision, update: Some(update) };
            }
        }
    };
    Box::pin(s.map(|r: Result<NetmapUpdate>| r.map_err(Status::from)))
}

#[tonic::async_trait]
impl Gateway for GatewayService {
    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let token = auth::bearer(req.metadata()).map(str::to_string);
        Ok(Response::new(
            self.join(token.as_deref(), req.into_inner()).await?,
        ))
    }

    type NetmapStream = NetmapStream;

    async fn netmap(
        &self,
        req: Request<NetmapRequest>,
    ) -> Result<Response<Self::NetmapStream>, Status> {
        let cluster = validate::name("cluster", &req.get_ref().cluster).map_err(Error::from)?;
        self.authorize(req.metadata(), &cluster).await?;
        let from = req.get_ref().resource_version;
        let permit = self.netmaps.acquire(&cluster)?;
        let stream =
            netmap_stream(self.reg.clone(), self.cache.clone(), cluster, from).map(move |u| {
                // The place is held as long as the stream lives.
                let _held = &permit;
                u
            });
        Ok(Response::new(until_shutdown(stream, self.shutdown.clone())))
    }

    async fn report_status(
        &self,
        req: Request<StatusReport>,
    ) -> Result<Response<StatusAck>, Status> {
        let cluster = validate::name("cluster", &req.get_ref().cluster).map_err(Error::from)?;
        self.authorize(req.metadata(), &cluster).await?;
        self.report(req.into_inner()).await?;
        Ok(Response::new(StatusAck {}))
    }

    async fn sync_jobs(
        &self,
        req: Request<SyncJobsRequest>,
    ) -> Result<Response<SyncJobsResponse>, Status> {
        let cluster = validate::name("cluster", &req.get_ref().cluster).map_err(Error::from)?;
        self.authorize(req.metadata(), &cluster).await?;
        Ok(Response::new(self.sync_jobs(req.into_inner()).await?))
    }
}
