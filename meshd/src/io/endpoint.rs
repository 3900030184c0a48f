//! `--endpoint`: the underlay address other gateways reach this one at,
//! given as `IP:PORT` or as `HOST:PORT` (SPEC §4).
//!
//! A host name is resolved when meshd starts (it must resolve then: the
//! join, and the NodePort listeners, need an address) and again before
//! every status report, so that a gateway behind a dynamic DNS name keeps
//! its peers pointed at it: the coordinator passes a changed endpoint on in
//! every netmap. A lookup that fails or times out later keeps the last
//! address, as wireguard-go's and wg-quick's peers do with their endpoint
//! names, and is logged once until it resolves again.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// How long one lookup of the host name may take before the last address
/// is reported instead (a report must not wait on a slow resolver).
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// The `--endpoint` flag, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// An IPv4 address and port, used as given.
    Addr(SocketAddr),
    /// A host name (checked against RFC 1123) and port, looked up.
    Host { host: String, port: u16 },
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Addr(a) => a.fmt(f),
            Endpoint::Host { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

impl FromStr for Endpoint {
    type Err = String;

    /// `IP:PORT` or `HOST:PORT`. The error names the rule broken (clap
    /// prefixes the flag and the value).
    fn from_str(s: &str) -> Result<Endpoint, String> {
        if let Ok(a) = s.parse::<SocketAddr>() {
            if a.port() == 0 {
                return Err("the port must be 1-65535".into());
            }
            if a.is_ipv6() {
                return Err(
                    "an IPv6 address: meshd's WireGuard socket is IPv4 only; give an IPv4 address or a host name"
                        .into(),
                );
            }
            return Ok(Endpoint::Addr(a));
        }
        let Some((host, port)) = s.rsplit_once(':') else {
            return Err("expected HOST:PORT or IP:PORT (the port is required)".into());
        };
        let port = match port.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => return Err(format!("port {port:?}: must be a number 1-65535")),
        };
        if host.parse::<IpAddr>().is_ok() || host.starts_with('[') || host.contains(':') {
            return Err(
                "an IPv6 address: meshd's WireGuard socket is IPv4 only; give an IPv4 address or a host name"
                    .into(),
            );
        }
        check_host(host)?;
        // A trailing dot (fully qualified) is kept out of the lookup's way
        // but means the same name.
        Ok(Endpoint::Host {
            host: host.trim_end_matches('.').to_ascii_lowercase(),
            port,
        })
    }
}

/// RFC 1123 host name: dot-separated labels of 1-63 letters, digits and
/// hyphens, not starting or ending with a hyphen, at most 253 characters,
/// and not all digits (that would be a malformed IPv4 address).
fn check_host(host: &str) -> Result<(), String> {
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.is_empty() {
        return Err("the host name is empty".into());
    }
    if name.len() > 253 {
        return Err(format!("host name {name:?}: longer than 253 characters"));
    }
    for label in name.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !ok {
            return Err(format!(
                "host name {name:?}: label {label:?} must be 1-63 letters, digits or '-', not starting or ending with '-'"
            ));
        }
    }
    if name.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(format!(
            "{name:?} is neither an IPv4 address nor a host name"
        ));
    }
    Ok(())
}

impl Endpoint {
    /// The address this endpoint stands for now: the address itself, or
    /// the host name's first IPv4 address (the WireGuard socket is IPv4).
    pub async fn resolve(&self) -> Result<SocketAddr> {
        let (host, port) = match self {
            Endpoint::Addr(a) => return Ok(*a),
            Endpoint::Host { host, port } => (host, *port),
        };
        let addrs = tokio::time::timeout(
            LOOKUP_TIMEOUT,
            tokio::net::lookup_host((host.as_str(), port)),
        )
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "--endpoint {self}: the host name did not resolve within {}s",
                LOOKUP_TIMEOUT.as_secs()
            )
        })?
        .with_context(|| format!("--endpoint {self}: cannot resolve the host name"))?;
        let mut any = false;
        for a in addrs {
            any = true;
            if a.is_ipv4() {
                return Ok(a);
            }
        }
        if any {
            bail!(
                "--endpoint {self}: the host name has no IPv4 address (meshd's WireGuard socket is IPv4 only)"
            );
        }
        bail!("--endpoint {self}: the host name has no address")
    }
}

/// The endpoint reported to the coordinator: looked up again for every
/// report, the last good address kept while a lookup fails.
#[derive(Debug)]
pub struct Reported {
    endpoint: Endpoint,
    last: SocketAddr,
    failing: bool,
}

impl Reported {
    /// Starts from the address `endpoint` resolved to at start.
    pub fn new(endpoint: Endpoint, at_start: SocketAddr) -> Reported {
        Reported {
            endpoint,
            last: at_start,
            failing: false,
        }
    }

    /// The address to report now.
    pub async fn current(&mut self) -> SocketAddr {
        match self.endpoint.resolve().await {
            Ok(a) => {
                if a != self.last {
                    tracing::info!(endpoint = %self.endpoint, from = %self.last, to = %a, "the --endpoint host name resolves to a new address");
                    self.last = a;
                }
                if self.failing {
                    tracing::info!(endpoint = %self.endpoint, address = %a, "the --endpoint host name resolves again");
                    self.failing = false;
                }
            }
            Err(e) => {
                if !self.failing {
                    tracing::warn!(error = %e, keeping = %self.last, "cannot resolve the --endpoint host name; reporting the last address");
                    self.failing = true;
                }
            }
        }
        self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(h: &str, port: u16) -> Endpoint {
        Endpoint::Host {
            host: h.into(),
            port,
        }
    }

    #[test]
    fn parses_addresses_and_host_names() {
        assert_eq!(
            "192.0.2.1:51820".parse(),
            Ok(Endpoint::Addr("192.0.2.1:51820".parse().unwrap()))
        );
        assert_eq!(
            "gw1.example.com:51820".parse(),
            Ok(host("gw1.example.com", 51820))
        );
        assert_eq!(
            "GW-1.Example.COM.:1".parse(),
            Ok(host("gw-1.example.com", 1))
        );
        assert_eq!("localhost:7".parse(), Ok(host("localhost", 7)));
        assert_eq!(
            "gw1.example.com:51820"
                .parse::<Endpoint>()
                .unwrap()
                .to_string(),
            "gw1.example.com:51820"
        );
    }

    #[test]
    fn refuses_what_is_no_endpoint() {
        for (bad, why) in [
            ("gw1.example.com", "port is required"),
            ("192.0.2.1", "port is required"),
            ("gw1:0", "1-65535"),
            ("gw1:65536", "1-65535"),
            ("gw1:http", "1-65535"),
            ("192.0.2.1:0", "1-65535"),
            (":51820", "empty"),
            ("gw_1.example:51820", "label \"gw_1\""),
            ("-gw.example:51820", "label \"-gw\""),
            ("gw..example:51820", "label \"\""),
            ("999.1.2.3:51820", "neither an IPv4 address"),
            ("[::1]:51820", "IPv4 only"),
            ("::1:51820", "IPv4 only"),
            ("gw1 example:51820", "label"),
        ] {
            let e = bad.parse::<Endpoint>().unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
            assert!(!e.contains('\n'), "{bad}: {e}");
        }
        let long = format!("{}:1", vec!["a".repeat(63); 4].join("."));
        assert!(long.parse::<Endpoint>().unwrap_err().contains("253"));
    }

    #[tokio::test]
    async fn resolves_to_an_ipv4_address() {
        let a = host("localhost", 51820).resolve().await.unwrap();
        assert!(
            a.is_ipv4() && a.ip().is_loopback() && a.port() == 51820,
            "{a}"
        );
        let lit = Endpoint::Addr("192.0.2.7:9".parse().unwrap());
        assert_eq!(lit.resolve().await.unwrap(), "192.0.2.7:9".parse().unwrap());
    }

    // A lookup that fails is driven end to end (tests/tests/endpoint.rs),
    // inside a namespace whose resolver is its own: a unit test here would
    // send the query to the machine's resolver.
}
