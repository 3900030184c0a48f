//! skymesh's API: the generated gRPC types and the object model's validation.
#![cfg_attr(test, allow(clippy::unwrap_used))]
//!
//! # Layout
//! - [`v1`]: types and services generated from `proto/skymesh/v1/skymesh.proto`.
//! - [`validate`]: names, CIDRs, IPs, ports, selectors, enums; normalisation.
//! - helpers on [`v1::Object`] and [`v1::Kind`] used by every binary.

#[allow(missing_docs, clippy::all, unreachable_pub)]
pub mod v1 {
    tonic::include_proto!("skymesh.v1");
}

/// One gRPC method of the API, as the `.proto` declares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrpcMethod {
    /// The fully qualified service, e.g. `skymesh.v1.Api`.
    pub service: &'static str,
    /// The method, e.g. `Create`.
    pub method: &'static str,
    /// The server sends a stream.
    pub server_streaming: bool,
    /// The client sends a stream.
    pub client_streaming: bool,
}

/// Every gRPC method of the API's services (generated from the `.proto`),
/// e.g. for metrics that must name only methods that exist.
pub const GRPC_METHODS: &[GrpcMethod] = include!(concat!(env!("OUT_DIR"), "/grpc_methods.rs"));

pub mod files;
pub mod tls;
pub mod validate;

#[cfg(test)]
mod validate_tests;

use v1::{Kind, Object, ObjectMeta, object::Obj};

impl Kind {
    /// Parses a kind as skyctl spells it, with its aliases (SPEC §7).
    pub fn from_alias(s: &str) -> Option<Kind> {
        Some(match s.to_ascii_lowercase().as_str() {
            "service" | "services" | "svc" => Kind::Service,
            "endpoints" | "endpoint" | "ep" => Kind::Endpoints,
            "cluster" | "clusters" => Kind::Cluster,
            "job" | "jobs" => Kind::Job,
            "namespace" | "namespaces" | "ns" => Kind::Namespace,
            _ => return None,
        })
    }

    /// The kind's name as users write it, e.g. `service`.
    pub fn singular(self) -> &'static str {
        match self {
            Kind::Unspecified => "object",
            Kind::Namespace => "namespace",
            Kind::Cluster => "cluster",
            Kind::Job => "job",
            Kind::Service => "service",
            Kind::Endpoints => "endpoints",
        }
    }

    /// Whether objects of this kind live in a namespace.
    pub fn namespaced(self) -> bool {
        matches!(self, Kind::Job | Kind::Service | Kind::Endpoints)
    }
}

impl Object {
    /// The kind of the object held, `Unspecified` when empty.
    pub fn kind(&self) -> Kind {
        match &self.obj {
            None => Kind::Unspecified,
            Some(Obj::Namespace(_)) => Kind::Namespace,
            Some(Obj::Cluster(_)) => Kind::Cluster,
            Some(Obj::Job(_)) => Kind::Job,
            Some(Obj::Service(_)) => Kind::Service,
            Some(Obj::Endpoints(_)) => Kind::Endpoints,
        }
    }

    /// The object's metadata, if it has any.
    pub fn meta(&self) -> Option<&ObjectMeta> {
        match self.obj.as_ref()? {
            Obj::Namespace(o) => o.metadata.as_ref(),
            Obj::Cluster(o) => o.metadata.as_ref(),
            Obj::Job(o) => o.metadata.as_ref(),
            Obj::Service(o) => o.metadata.as_ref(),
            Obj::Endpoints(o) => o.metadata.as_ref(),
        }
    }

    /// The object's metadata, created empty if missing. `None` only when the
    /// object holds nothing.
    pub fn meta_mut(&mut self) -> Option<&mut ObjectMeta> {
        let m = match self.obj.as_mut()? {
            Obj::Namespace(o) => &mut o.metadata,
            Obj::Cluster(o) => &mut o.metadata,
            Obj::Job(o) => &mut o.metadata,
            Obj::Service(o) => &mut o.metadata,
            Obj::Endpoints(o) => &mut o.metadata,
        };
        Some(m.get_or_insert_with(ObjectMeta::default))
    }

    /// The object's name ("" if none).
    pub fn name(&self) -> &str {
        self.meta().map_or("", |m| m.name.as_str())
    }

    /// The object's namespace ("" for global kinds).
    pub fn namespace(&self) -> &str {
        self.meta().map_or("", |m| m.namespace.as_str())
    }

    /// The object's resource version (0 if none).
    pub fn resource_version(&self) -> u64 {
        self.meta().map_or(0, |m| m.resource_version)
    }
}

impl v1::ServicePort {
    /// The port on the replicas: `target_port`, or `port` when it is 0
    /// (validation fills it in, but objects from elsewhere may not have it).
    pub fn effective_target_port(&self) -> u32 {
        if self.target_port == 0 {
            self.port
        } else {
            self.target_port
        }
    }
}

macro_rules! into_object {
    ($($t:ident),*) => {$(
        impl From<v1::$t> for Object {
            fn from(o: v1::$t) -> Self {
                Object { obj: Some(Obj::$t(o)) }
            }
        }
    )*};
}
into_object!(Namespace, Cluster, Job, Service, Endpoints);

/// The message of the UNAVAILABLE status a stopping coordinator ends every
/// Watch and Netmap stream with: clients reconnect and resume from their
/// last revision.
pub const COORDINATOR_SHUTTING_DOWN: &str = "coordinator shutting down";

/// Largest gRPC message the coordinator sends and meshd and skyctl accept
/// (tonic's default is 4 MiB): a netmap snapshot or a list of a mesh of
/// 100 clusters and 10,000 services is ~45 MB.
pub const MAX_MESSAGE_BYTES: usize = 128 << 20;

/// A tonic interceptor adding `authorization: Bearer <token>` to every
/// request (or nothing, for `None`).
#[derive(Clone, Debug, Default)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Bearer {
    /// An interceptor for `token`; fails if the token is not printable
    /// ASCII.
    pub fn new(token: Option<&str>) -> Result<Self, tonic::metadata::errors::InvalidMetadataValue> {
        Ok(Bearer(
            token.map(|t| format!("Bearer {t}").parse()).transpose()?,
        ))
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}
