//! skymesh's embedded DNS (SPEC §6): `<svc>.<ns>.svc` and
//! `<svc>.<ns>.svc.clusterset.local` names for the services of the mesh, served
//! by meshd in every cluster with [`hickory_server`].
#![cfg_attr(test, allow(clippy::unwrap_used))]
//!
//! The crate is split along hickory's own seams: record synthesis is a pure
//! function of a [`MeshView`] (the netmap snapshot meshd holds) and a
//! [`DnsConfig`]; it is rebuilt once per view update into an immutable
//! [`RecordSet`] that the server reads lock-free. The server itself is a
//! hickory [`Catalog`](hickory_server::zone_handler::Catalog) holding one
//! [`ZoneHandler`](hickory_server::zone_handler::ZoneHandler) per served zone
//! plus hickory's forwarder for every other name.
//!
//! ```no_run
//! # async fn demo() -> Result<(), skymesh_dns::Error> {
//! use prometheus_client::registry::Registry;
//! use skymesh_dns::{DnsConfig, DnsServer, MeshView};
//! use tokio_util::sync::CancellationToken;
//!
//! let mut registry = Registry::default();
//! let config = DnsConfig { listen: "127.0.0.1:0".parse().unwrap(), ..DnsConfig::default() };
//! let (server, handle) = DnsServer::bind(config, &mut registry, CancellationToken::new()).await?;
//! let task = tokio::spawn(server.run());
//! handle.update(&MeshView::new("east"));
//! println!("dns on {}", handle.local_addr());
//! handle.shutdown();
//! task.await.ok();
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - [`config`]: [`DnsConfig`] (zones, service CIDR, listen address, upstreams) and
//!   `/etc/resolv.conf` parsing.
//! - [`records`]: the pure core — [`RecordSet::build`] turns a view into records,
//!   [`RecordSet::lookup`] answers one question (rcode, answers, authority).
//! - `zone` (private): `MeshZoneHandler`, hickory's `ZoneHandler` over the current
//!   [`RecordSet`].
//! - [`metrics`]: [`DnsMetrics`], prometheus-client counters and the latency histogram.
//! - [`server`]: [`DnsServer`] (UDP + TCP sockets, the catalog, forwarding) and
//!   [`DnsHandle`] (view updates, bound address, shutdown).

use std::collections::HashSet;
use std::io;
use std::net::SocketAddr;

pub mod config;
pub mod metrics;
pub mod records;
pub mod server;
mod zone;

#[cfg(test)]
mod records_tests;

pub use config::{DnsConfig, Upstreams};
pub use metrics::DnsMetrics;
pub use records::{Answer, RecordSet};
pub use server::{DnsHandle, DnsServer};

/// The part of meshd's netmap that DNS answers from: the services and
/// endpoints of every namespace, as the coordinator streams them, plus the
/// readiness meshd knows locally before the coordinator does.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MeshView {
    /// The cluster this DNS server answers for.
    pub cluster: String,
    /// Every service of the mesh (all namespaces), shared with the
    /// netmap meshd holds: building a view copies no service.
    pub services: Vec<std::sync::Arc<skymesh_proto::v1::Service>>,
    /// Every endpoints object of the mesh (all namespaces), shared as the
    /// services are.
    pub endpoints: Vec<std::sync::Arc<skymesh_proto::v1::Endpoints>>,
    /// Readiness overrides known locally before the coordinator: `(namespace,
    /// job)` of jobs failing local health checks. May be empty.
    pub local_unready: HashSet<(String, String)>,
    /// This cluster's workload CIDRs: its clients may use recursion.
    pub local_cidrs: Vec<ipnet::Ipv4Net>,
}

impl MeshView {
    /// An empty view for `cluster`.
    pub fn new(cluster: impl Into<String>) -> Self {
        Self {
            cluster: cluster.into(),
            ..Self::default()
        }
    }
}

/// Errors of the DNS server. Lookups never fail: they answer with an rcode.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configured zone is not a valid domain name (or is the root).
    #[error("invalid DNS zone {zone:?}: {reason}")]
    InvalidZone {
        /// The zone as configured.
        zone: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A listening socket could not be bound.
    #[error("failed to bind DNS {proto} socket on {addr}")]
    Bind {
        /// `udp` or `tcp`.
        proto: &'static str,
        /// The address asked for.
        addr: SocketAddr,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// hickory's forwarder refused the upstream configuration.
    #[error("failed to configure DNS forwarding to {upstreams:?}: {reason}")]
    Forwarder {
        /// The upstream resolvers.
        upstreams: Vec<SocketAddr>,
        /// hickory's message.
        reason: String,
    },
    /// A server task ended on its own (socket closed or failed).
    #[error("DNS server stopped unexpectedly")]
    Serve(#[source] hickory_server::net::NetError),
}
