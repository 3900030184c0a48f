//! skymesh's coordinator: the one place that holds the mesh's state and
//! hands out addresses and keys.
//!
//! # Layout
//! - [`registry`]: create/get/list/update/delete/watch of objects over the store.
//! - [`keyspace`]: every store key and prefix.
//! - [`ipam`]: overlay IPs, service VIPs, pair keys (pure choice; store txns make it stick).
//! - [`auth`]: admin token, join tokens, cluster credentials (hashed).
//! - [`tls`]: the mesh CA and the server certificate.
//! - [`controller`]: endpoints, service status and cluster phase reconciliation.
//! - [`events`]: state changes recorded from the object writes, kept 1 h.
//! - [`election`]: which replica runs the controllers (an etcd lease when
//!   several coordinators share one etcd).
//! - [`netmap`]: what one gateway needs, as snapshot or changes.
//! - [`worldcache`]: one world for every netmap stream, kept current by one watch.
//! - [`api`], [`gateway`]: the gRPC services.
//! - [`server`]: wiring for the binary.
//! - [`shutdown`]: graceful stop (streams end with UNAVAILABLE, a drain deadline).
//! - [`limits`]: streams per connection and credential, message sizes.
//! - [`health`]: the standard gRPC health service's statuses.
//! - [`metrics`]: `/metrics` (calls by method and code, streams, store latency).
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod api;
pub mod auth;
pub mod controller;
pub mod election;
pub mod error;
pub mod events;
pub mod gateway;
pub mod health;
pub mod ipam;
pub mod keyspace;
pub mod limits;
pub mod metrics;
pub mod netmap;
pub mod registry;
pub mod server;
pub mod shutdown;
pub mod tls;
pub mod worldcache;
