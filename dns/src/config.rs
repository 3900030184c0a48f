//! Configuration of the DNS server: what it serves, where it listens and
//! where it forwards. Plain data plus the pure `/etc/resolv.conf` parser; no
//! sockets and no hickory types, so meshd can fill it from its flags.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::Ipv4Net;

/// Zones served by default (SPEC §6).
pub const DEFAULT_ZONES: [&str; 2] = ["svc", "svc.clusterset.local"];

/// TTL of every synthesized record and the SOA minimum (negative-caching TTL,
/// RFC 2308 §4), in seconds (SPEC §6: "TTL 5 s").
pub const DEFAULT_TTL: u32 = 5;

/// The default resolver configuration file read for upstreams.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

/// Where names outside the served zones go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstreams {
    /// The `nameserver` lines of this resolv.conf file (port 53). A missing or
    /// empty file means no upstream: such names get REFUSED.
    ResolvConf(PathBuf),
    /// Exactly these resolvers; an empty list means no forwarding (REFUSED).
    Static(Vec<SocketAddr>),
}

impl Default for Upstreams {
    fn default() -> Self {
        Self::ResolvConf(PathBuf::from(RESOLV_CONF))
    }
}

/// Everything the DNS server needs besides the [`MeshView`](crate::MeshView).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    /// UDP and TCP listen address. Port 0 picks a free port (the same for UDP
    /// and TCP); [`DnsHandle::local_addr`](crate::DnsHandle::local_addr)
    /// reports it.
    pub listen: SocketAddr,
    /// Zones served, e.g. `svc`; every service name exists in each. The first
    /// one is the zone PTR records point into.
    pub zones: Vec<String>,
    /// The service (VIP) CIDR. Its reverse zone(s) under `in-addr.arpa` are
    /// served with PTR records for the VIPs; `None` serves no reverse zone.
    pub service_cidr: Option<Ipv4Net>,
    /// Where names outside the zones are forwarded.
    pub upstreams: Upstreams,
    /// TTL of synthesized records and SOA minimum, seconds.
    pub ttl: u32,
    /// Address published for the zones' NS name `ns.dns.<zone>`. `None` uses
    /// the listen address when it is a specific one.
    pub nameserver_ip: Option<IpAddr>,
    /// How long a TCP connection may stay idle before it is closed.
    pub tcp_idle_timeout: Duration,
    /// Timeout of one forwarded query to one upstream.
    pub upstream_timeout: Duration,
    /// Clients whose queries for names outside the zones are forwarded,
    /// besides loopback and the view's [`local_cidrs`](crate::MeshView::local_cidrs)
    /// (meshd's `--dns-allow`). Others get REFUSED: the server is no open
    /// resolver for whoever can reach its address.
    pub recursion_allow: Vec<ipnet::IpNet>,
    /// Forwarded queries in flight at most; a query over the limit gets
    /// SERVFAIL at once (no socket, task or upstream query for it).
    pub max_forwards: usize,
}

/// Default of [`DnsConfig::max_forwards`].
pub const DEFAULT_MAX_FORWARDS: usize = 1024;

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 53)),
            zones: DEFAULT_ZONES.iter().map(|z| (*z).to_owned()).collect(),
            service_cidr: None,
            upstreams: Upstreams::default(),
            ttl: DEFAULT_TTL,
            nameserver_ip: None,
            tcp_idle_timeout: Duration::from_secs(10),
            upstream_timeout: Duration::from_secs(2),
            recursion_allow: Vec::new(),
            max_forwards: DEFAULT_MAX_FORWARDS,
        }
    }
}

/// The resolvers named by `nameserver` lines of resolv.conf text (port 53),
/// in order. Lines that do not parse are skipped; IPv6 zone ids (`%eth0`) are
/// dropped because the forwarder cannot use them.
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let line = line.split(['#', ';']).next().unwrap_or_default();
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver")).then_some(())?;
            let ip = words.next()?;
            let ip = ip.split('%').next().unwrap_or(ip);
            ip.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53))
        })
        .collect()
}

/// Drops upstreams that are this very server (meshd may be the host's
/// resolver; forwarding to ourselves would loop).
pub(crate) fn without_self(upstreams: Vec<SocketAddr>, local: SocketAddr) -> Vec<SocketAddr> {
    upstreams
        .into_iter()
        .filter(|up| {
            let same_port = up.port() == local.port();
            let same_ip = up.ip() == local.ip()
                || (local.ip().is_unspecified()
                    && (up.ip().is_loopback() || up.ip().is_unspecified()));
            !(same_port && same_ip)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_nameservers() {
        let text = "# generated\nsearch example.com\nnameserver 10.0.0.2\nnameserver  fe80::1%eth0 \n\
                    nameserver bogus\noptions ndots:5\nnameserver 2001:db8::53 # v6\n;nameserver 9.9.9.9\n";
        assert_eq!(
            parse_resolv_conf(text),
            vec![
                "10.0.0.2:53".parse().unwrap(),
                "[fe80::1]:53".parse().unwrap(),
                "[2001:db8::53]:53".parse().unwrap(),
            ]
        );
        assert!(parse_resolv_conf("").is_empty());
    }

    #[test]
    fn never_forwards_to_itself() {
        let ups = vec![
            "127.0.0.1:53".parse().unwrap(),
            "10.0.0.2:53".parse().unwrap(),
        ];
        assert_eq!(
            without_self(ups.clone(), "127.0.0.1:53".parse().unwrap()),
            vec!["10.0.0.2:53".parse().unwrap()]
        );
        assert_eq!(
            without_self(ups.clone(), "0.0.0.0:53".parse().unwrap()),
            vec!["10.0.0.2:53".parse().unwrap()]
        );
        assert_eq!(
            without_self(ups.clone(), "127.0.0.1:5353".parse().unwrap()),
            ups
        );
    }
}
