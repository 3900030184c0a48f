//! Everything that touches the outside world: the TUN interface, the UDP
//! socket, the coordinator, the WireGuard API socket, probes, health checks,
//! metrics. Each task here is thin glue around the pure [`crate::core`].

pub mod control;
pub mod device;
pub mod endpoint;
pub mod health;
pub mod jobs;
pub mod metrics;
pub mod nodeport;
pub mod stage;
pub mod thread;
pub mod tun;
pub mod uapi;
