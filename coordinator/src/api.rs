//! The object API (skyctl's): thin gRPC glue over [`Registry`]. The admin
//! token is checked by the [`crate::auth::AdminAuth`] interceptor before any
//! of this runs.

use futures::StreamExt as _;
use skymesh_proto::v1::{
    CreateRequest, CreateResponse, DeleteRequest, GetRequest, IssueJoinTokenRequest,
    IssueJoinTokenResponse, Kind, ListEventsRequest, ListEventsResponse, ListRequest, ListResponse,
    MeshEvent, Object, UpdateRequest, WatchEventsRequest, WatchRequest, WatchResponse,
    api_server::Api,
};
use skymesh_proto::validate;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::limits::{MAX_WATCHES, StreamLimit};
use crate::registry::Registry;
use crate::shutdown::{ResponseStream, until_shutdown};

/// Implements [`Api`].
#[derive(Clone)]
pub struct ApiService {
    reg: Registry,
    shutdown: CancellationToken,
    watches: StreamLimit,
}

impl ApiService {
    /// The object API over `reg`; watches end when `shutdown` fires.
    pub fn new(reg: Registry, shutdown: CancellationToken) -> Self {
        ApiService {
            reg,
            shutdown,
            watches: StreamLimit::new("watches", MAX_WATCHES),
        }
    }

    /// The open watches (shared: for the metrics).
    pub fn watches(&self) -> StreamLimit {
        self.watches.clone()
    }
}

fn kind(k: i32) -> Result<Kind, Status> {
    match Kind::try_from(k) {
        Ok(Kind::Unspecified) | Err(_) => Err(Error::from(validate::ValidationError {
            field: "kind".into(),
            rule: format!("{k} is not a kind (namespace, cluster, job, service, endpoints)"),
        })
        .into()),
        Ok(k) => Ok(k),
    }
}

fn object(o: Option<Object>) -> Result<Object, Status> {
    o.ok_or_else(|| Status::invalid_argument("invalid object: no object given"))
}

#[tonic::async_trait]
impl Api for ApiService {
    async fn create(
        &self,
        req: Request<CreateRequest>,
    ) -> Result<Response<CreateResponse>, Status> {
        let created = self.reg.create(object(req.into_inner().object)?).await?;
        let (join_token, join_token_expires) = created.join_token.unwrap_or_default();
        Ok(Response::new(CreateResponse {
            object: Some(created.object),
            join_token,
            join_token_expires,
        }))
    }

    async fn get(&self, req: Request<GetRequest>) -> Result<Response<Object>, Status> {
        let r = req.into_inner();
        Ok(Response::new(
            self.reg.get(kind(r.kind)?, &r.namespace, &r.name).await?,
        ))
    }

    async fn list(&self, req: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        let r = req.into_inner();
        let ns = namespace(&r.namespace, r.all_namespaces);
        let (objects, resource_version) = self.reg.list(kind(r.kind)?, ns).await?;
        Ok(Response::new(ListResponse {
            objects,
            resource_version,
        }))
    }

    async fn update(&self, req: Request<UpdateRequest>) -> Result<Response<Object>, Status> {
        Ok(Response::new(
            self.reg.update(object(req.into_inner().object)?).await?,
        ))
    }

    async fn delete(&self, req: Request<DeleteRequest>) -> Result<Response<Object>, Status> {
        let r = req.into_inner();
        let k = kind(r.kind)?;
        if r.cascade && k != Kind::Cluster {
            return Err(Error::from(validate::ValidationError {
                field: "cascade".into(),
                rule: format!("only a cluster's delete cascades, not a {}'s", k.singular()),
            })
            .into());
        }
        Ok(Response::new(
            self.reg
                .delete_with(k, &r.namespace, &r.name, r.cascade)
                .await?,
        ))
    }

    type WatchStream = ResponseStream<WatchResponse>;

    async fn watch(
        &self,
        req: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let r = req.into_inner();
        let ns = namespace(&r.namespace, r.all_namespaces);
        let name = (!r.name.is_empty()).then_some(r.name.as_str());
        let permit = self.watches.acquire("admin")?;
        let s = self
            .reg
            .watch(kind(r.kind)?, ns, name, r.resource_version)
            .await?;
        Ok(Response::new(until_shutdown(
            s.map(move |r| {
                // The place is held as long as the stream lives.
                let _held = &permit;
                r.map_err(Status::from)
            }),
            self.shutdown.clone(),
        )))
    }

    async fn list_events(
        &self,
        req: Request<ListEventsRequest>,
    ) -> Result<Response<ListEventsResponse>, Status> {
        let r = req.into_inner();
        let filter = event_filter(&r.namespace, r.all_namespaces, r.kind, &r.name)?;
        let (events, resource_version) =
            crate::events::list(self.reg.store().as_ref(), &filter).await?;
        Ok(Response::new(ListEventsResponse {
            events,
            resource_version,
        }))
    }

    type WatchEventsStream = ResponseStream<MeshEvent>;

    async fn watch_events(
        &self,
        req: Request<WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let r = req.into_inner();
        let filter = event_filter(&r.namespace, r.all_namespaces, 0, "")?;
        let permit = self.watches.acquire("admin")?;
        let s = crate::events::watch(self.reg.store().as_ref(), filter, r.resource_version);
        Ok(Response::new(until_shutdown(
            s.map(move |r| {
                let _held = &permit;
                r.map_err(Status::from)
            }),
            self.shutdown.clone(),
        )))
    }

    async fn issue_join_token(
        &self,
        req: Request<IssueJoinTokenRequest>,
    ) -> Result<Response<IssueJoinTokenResponse>, Status> {
        let (join_token, expires) = self.reg.issue_join_token(&req.into_inner().cluster).await?;
        Ok(Response::new(IssueJoinTokenResponse {
            join_token,
            expires,
        }))
    }
}

/// The events a request covers.
fn event_filter(
    ns: &str,
    all: bool,
    kind: i32,
    name: &str,
) -> Result<crate::events::Filter, Status> {
    let namespace = match namespace(ns, all) {
        Some(n) => Some(validate::name("namespace", n).map_err(Error::from)?),
        None => None,
    };
    let object = if name.is_empty() {
        None
    } else {
        Some((
            self::kind(kind)?,
            validate::name("name", name).map_err(Error::from)?,
        ))
    };
    Ok(crate::events::Filter { namespace, object })
}

/// `None` (all namespaces) or the namespace asked for (default `default`).
fn namespace(ns: &str, all: bool) -> Option<&str> {
    if all {
        None
    } else if ns.is_empty() {
        Some(validate::DEFAULT_NAMESPACE)
    } else {
        Some(ns)
    }
}
