//! meshd: one per cluster. Joins the mesh, builds WireGuard tunnels to every
//! other gateway, routes the overlay, service and remote workload CIDRs
//! through them.
//!
//! # Layout
//! - [`core`]: sans-IO WireGuard node, routing, health state machines, and
//!   the service VIP balancer (`core::lb`: NAT, flow table, Maglev).
//! - [`state`]: the netmap as applied from the coordinator's stream.
//! - [`statedir`]: private key, credential, netmap cache (0600 files).
//! - [`io`]: TUN, UDP packet loop, coordinator client, API socket, probes,
//!   health checks, metrics.
//! - [`run`]: start-up and wiring.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod core;
pub mod io;
pub mod run;
pub mod state;
pub mod statedir;
