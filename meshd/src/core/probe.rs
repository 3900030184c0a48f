//! Readiness probes of local jobs (SPEC §4), the pure part: what a job's
//! probe asks for ([`ProbePlan::of`]), how an HTTP answer's status line
//! reads ([`http_status_passes`]) and the ICMP echo messages
//! ([`echo_request`], [`echo_reply`]). The sockets are in
//! [`crate::io::health`]; the ready/not-ready rule is
//! [`crate::core::health::JobCheck`].
//!
//! Must not: open sockets, read clocks or allocate per answer beyond the
//! plan itself.

use skymesh_proto::v1::{JobSpec, ProbeType, Protocol};

/// What checking one job means this round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbePlan {
    /// Ready while registered: probe `none`, or the default probe of a job
    /// without TCP ports.
    Always,
    /// A TCP connect to each of these ports must succeed.
    Tcp(Vec<u16>),
    /// `GET path` on this port must answer 2xx or 3xx.
    Http { port: u16, path: String },
    /// An ICMP echo to the job's IP must be answered.
    Icmp,
    /// A datagram to this port must draw no ICMP error.
    Udp(u16),
}

impl ProbePlan {
    /// The plan of a job's probe. The coordinator validated the spec
    /// (`skymesh_proto::validate::probe`); a probe that still lacks a port
    /// falls back to the default TCP check rather than to "ready".
    pub fn of(spec: &JobSpec) -> ProbePlan {
        let ports = |proto: Protocol| {
            spec.ports
                .iter()
                .filter(move |p| p.protocol() == proto)
                .filter_map(|p| u16::try_from(p.port).ok().filter(|p| *p != 0))
        };
        let default = || {
            let tcp: Vec<u16> = ports(Protocol::Tcp).collect();
            if tcp.is_empty() {
                ProbePlan::Always
            } else {
                ProbePlan::Tcp(tcp)
            }
        };
        let Some(probe) = spec.probe.as_ref() else {
            return default();
        };
        let port = u16::try_from(probe.port).ok().filter(|p| *p != 0);
        match probe.r#type() {
            ProbeType::Unspecified => default(),
            ProbeType::None => ProbePlan::Always,
            ProbeType::Icmp => ProbePlan::Icmp,
            ProbeType::Tcp => match port {
                Some(p) => ProbePlan::Tcp(vec![p]),
                None => default(),
            },
            ProbeType::Udp => match port.or_else(|| ports(Protocol::Udp).next()) {
                Some(p) => ProbePlan::Udp(p),
                None => default(),
            },
            ProbeType::Http => match port.or_else(|| ports(Protocol::Tcp).next()) {
                Some(p) => ProbePlan::Http {
                    port: p,
                    path: if probe.path.is_empty() {
                        "/".to_owned()
                    } else {
                        probe.path.clone()
                    },
                },
                None => default(),
            },
        }
    }
}

/// The request an HTTP probe writes (HTTP/1.1, RFC 9112 §3; `Connection:
/// close` so the job need not keep it open).
pub fn http_request(host: std::net::Ipv4Addr, port: u16, path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: skymesh-meshd\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    )
}

/// Whether the start of an HTTP answer passes: `Some(true)` for a status
/// of 200-399 (as Kubernetes' httpGet probe), `Some(false)` for any other
/// status or an answer that is not HTTP, `None` while the status line is
/// still incomplete.
pub fn http_status_passes(head: &[u8]) -> Option<bool> {
    // "HTTP/1.1 200 OK": the version, one space, three digits (RFC 9112 §4).
    const PREFIX: &[u8] = b"HTTP/";
    let n = head.len().min(PREFIX.len());
    if head[..n] != PREFIX[..n] {
        return Some(false);
    }
    let line_end = head.iter().position(|b| *b == b'\n');
    let line = match line_end {
        Some(i) => &head[..i],
        None if head.len() < 12 => return None,
        None => head,
    };
    let mut words = line.split(|b| *b == b' ');
    let _version = words.next();
    let status = words.next().unwrap_or_default();
    let code = std::str::from_utf8(status)
        .ok()
        .filter(|s| s.len() == 3)
        .and_then(|s| s.parse::<u16>().ok());
    Some(code.is_some_and(|c| (200..400).contains(&c)))
}

/// ICMP echo request type and echo reply type (RFC 792).
const ECHO_REQUEST: u8 = 8;
const ECHO_REPLY: u8 = 0;
/// The payload every probe's echo carries.
const PAYLOAD: &[u8; 8] = b"skymesh!";

/// An ICMP echo request (RFC 792) with this identifier and sequence
/// number, checksummed (RFC 1071). On a Linux ping socket the kernel sets
/// the identifier and checksum again itself.
pub fn echo_request(id: u16, seq: u16) -> [u8; 16] {
    let mut m = [0u8; 16];
    m[0] = ECHO_REQUEST;
    m[4..6].copy_from_slice(&id.to_be_bytes());
    m[6..8].copy_from_slice(&seq.to_be_bytes());
    m[8..].copy_from_slice(PAYLOAD);
    let sum = checksum(&m);
    m[2..4].copy_from_slice(&sum.to_be_bytes());
    m
}

/// The identifier and sequence number of an ICMP echo reply, from a
/// datagram that starts with the IPv4 header (`with_ip_header`: a raw
/// socket) or with the ICMP message (a ping socket). `None` for anything
/// else.
pub fn echo_reply(datagram: &[u8], with_ip_header: bool) -> Option<(u16, u16)> {
    let icmp = if with_ip_header {
        let ihl = usize::from(datagram.first()? & 0x0f) * 4;
        datagram.get(ihl..)?
    } else {
        datagram
    };
    if icmp.len() < 8 || icmp[0] != ECHO_REPLY || icmp[1] != 0 {
        return None;
    }
    Some((
        u16::from_be_bytes([icmp[4], icmp[5]]),
        u16::from_be_bytes([icmp[6], icmp[7]]),
    ))
}

/// The Internet checksum (RFC 1071) of `data`.
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // The fold above leaves at most 16 bits.
    !(u16::try_from(sum).unwrap_or(u16::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use skymesh_proto::v1::{JobPort, Probe};

    fn spec(ports: &[(u32, Protocol)], probe: Option<(ProbeType, u32, &str)>) -> JobSpec {
        JobSpec {
            cluster: "east".into(),
            ip: "10.1.0.3".into(),
            ports: ports
                .iter()
                .map(|(p, proto)| JobPort {
                    name: String::new(),
                    port: *p,
                    protocol: *proto as i32,
                })
                .collect(),
            probe: probe.map(|(t, port, path)| Probe {
                r#type: t as i32,
                port,
                path: path.into(),
            }),
        }
    }

    #[test]
    fn plans() {
        use Protocol::{Tcp, Udp};
        let both = [(53, Udp), (8080, Tcp), (9090, Tcp)];
        assert_eq!(
            ProbePlan::of(&spec(&both, None)),
            ProbePlan::Tcp(vec![8080, 9090])
        );
        assert_eq!(
            ProbePlan::of(&spec(&[(53, Udp)], None)),
            ProbePlan::Always,
            "UDP-only, no probe: nothing to connect to"
        );
        assert_eq!(
            ProbePlan::of(&spec(&both, Some((ProbeType::Udp, 0, "")))),
            ProbePlan::Udp(53)
        );
        assert_eq!(
            ProbePlan::of(&spec(&both, Some((ProbeType::Http, 0, "/healthz")))),
            ProbePlan::Http {
                port: 8080,
                path: "/healthz".into()
            }
        );
        assert_eq!(
            ProbePlan::of(&spec(&[], Some((ProbeType::Http, 81, "")))),
            ProbePlan::Http {
                port: 81,
                path: "/".into()
            }
        );
        assert_eq!(
            ProbePlan::of(&spec(&[], Some((ProbeType::Icmp, 0, "")))),
            ProbePlan::Icmp
        );
        assert_eq!(
            ProbePlan::of(&spec(&both, Some((ProbeType::None, 0, "")))),
            ProbePlan::Always
        );
        assert_eq!(
            ProbePlan::of(&spec(&both, Some((ProbeType::Tcp, 9090, "")))),
            ProbePlan::Tcp(vec![9090])
        );
        assert_eq!(
            ProbePlan::of(&spec(&[(8080, Tcp)], Some((ProbeType::Udp, 0, "")))),
            ProbePlan::Tcp(vec![8080]),
            "an unvalidated udp probe without a port falls back to the default"
        );
    }

    #[test]
    fn http_status_lines() {
        assert_eq!(http_status_passes(b"HTTP/1.1 200 OK\r\n"), Some(true));
        assert_eq!(http_status_passes(b"HTTP/1.0 302 Found\r\n"), Some(true));
        assert_eq!(
            http_status_passes(b"HTTP/1.1 500 Internal Server Error\r\n"),
            Some(false)
        );
        assert_eq!(
            http_status_passes(b"HTTP/1.1 404 Not Found\r\n"),
            Some(false)
        );
        assert_eq!(http_status_passes(b"HTTP/1.1 199 x\r\n"), Some(false));
        assert_eq!(http_status_passes(b"HTTP/1.1 20"), None, "incomplete");
        assert_eq!(http_status_passes(b"HTT"), None);
        assert_eq!(http_status_passes(b"SSH-2.0-OpenSSH\r\n"), Some(false));
        assert_eq!(http_status_passes(b"HTTP/1.1 2000 OK\r\n"), Some(false));
        assert_eq!(http_status_passes(b"HTTP/1.1 abc OK\r\n"), Some(false));
    }

    #[test]
    fn echo_messages() {
        let m = echo_request(0x1234, 7);
        assert_eq!(m[0], 8);
        assert_eq!(checksum(&m), 0, "a checksummed message sums to zero");
        // The reply a host sends back: type 0, same id, seq and payload.
        let mut reply = m;
        reply[0] = 0;
        assert_eq!(echo_reply(&reply, false), Some((0x1234, 7)));
        let mut with_ip = vec![0x45u8];
        with_ip.extend_from_slice(&[0; 19]);
        with_ip.extend_from_slice(&reply);
        assert_eq!(echo_reply(&with_ip, true), Some((0x1234, 7)));
        assert_eq!(echo_reply(&m, false), None, "a request is no reply");
        assert_eq!(echo_reply(&reply[..7], false), None);
        assert_eq!(
            echo_reply(&[0x4f], true),
            None,
            "header longer than the datagram"
        );
    }
}
