//! Integration tests of the DNS server: a real server on 127.0.0.1:0 queried
//! with `dig` (bind9-dnsutils) and with hickory's client. One binary with
//! submodules; `support` holds the fixtures.
#![allow(clippy::unwrap_used)]

mod client;
mod dig;
mod forward;
mod robustness;
mod support;
