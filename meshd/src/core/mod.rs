//! The sans-IO core: pure state machines driven by bytes (and, where they
//! need time, a clock the caller passes). No sockets, no TUN, no tasks.

pub mod batch;
pub mod engine;
pub mod gro;
pub mod health;
pub mod lb;
pub mod node;
pub mod policy;
pub mod probe;
pub mod route;
