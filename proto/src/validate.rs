//! Validation and normalisation of the object model, shared by every binary.
//!
//! Each check returns a [`ValidationError`] naming the field and the rule it
//! broke, so skyctl can refuse bad input before sending it and the
//! coordinator can refuse it before writing anything. Names are DNS-1123
//! labels, accepted in any case and folded to lower case (SPEC §2).
//! Nothing here does I/O.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use ipnet::{IpNet, Ipv4Net};

use crate::v1::{
    Cluster, Endpoints, Job, JobPort, Namespace, Object, ObjectMeta, Probe, ProbeType, Protocol,
    Service, ServicePort, ServiceType, SessionAffinity, TrafficPolicy, object::Obj,
};

/// The namespace used when a namespaced object names none.
pub const DEFAULT_NAMESPACE: &str = "default";
/// Default ClientIP affinity timeout (SPEC §2).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
/// Longest ClientIP affinity timeout (SPEC §2).
pub const MAX_AFFINITY_TIMEOUT_S: u32 = 86_400;
/// Longest DNS label (RFC 1035 §2.3.4).
const MAX_LABEL_LEN: usize = 63;
/// Longest port name (IANA service name, RFC 6335 §5.1).
const MAX_PORT_NAME_LEN: usize = 15;
/// Most entries in one service's `upstreams` or `whitelists`. Tuning:
/// every gateway compiles every list into its policy tables; 1,000 covers
/// a team's services many times over and bounds what one object costs.
pub const MAX_POLICY_ENTRIES: usize = 1_000;
/// Longest HTTP probe path. Tuning: Kubernetes sets no limit; a path is
/// one request line meshd writes every second, so keep it short.
pub const MAX_PROBE_PATH_LEN: usize = 1024;

/// A field that broke a rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {rule}")]
pub struct ValidationError {
    /// Path of the field, e.g. `spec.ports[0].port`.
    pub field: String,
    /// What is wrong and, where possible, what would be right.
    pub rule: String,
}

/// Result of a validation.
pub type Result<T> = std::result::Result<T, ValidationError>;

fn err<T>(field: impl Into<String>, rule: impl Into<String>) -> Result<T> {
    Err(ValidationError {
        field: field.into(),
        rule: rule.into(),
    })
}

fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_LABEL_LEN
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// Folds a `namespace/service` policy pattern to lower case and checks it:
/// two parts, each a DNS-1123 label in which `*` may stand for any run of
/// characters (`shop/web`, `shop/*`, `*/db`, `team-*/api-*`).
pub fn policy_pattern(field: &str, value: &str) -> Result<String> {
    let v = value.trim().to_ascii_lowercase();
    let Some((ns, svc)) = v.split_once('/') else {
        return err(
            field,
            format!("{value:?} is not namespace/service (e.g. shop/web, shop/*)"),
        );
    };
    for (part, what) in [(ns, "namespace"), (svc, "service")] {
        let ok = !part.is_empty()
            && part.len() <= MAX_LABEL_LEN
            && part
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'*');
        if !ok {
            return err(
                field,
                format!(
                    "{value:?}: the {what} part must be 1-{MAX_LABEL_LEN} lower-case letters, digits, '-' or '*'"
                ),
            );
        }
    }
    Ok(v)
}

/// Checks and normalises a policy list: each pattern checked, sorted,
/// duplicates removed, at most [`MAX_POLICY_ENTRIES`].
fn policy_list(field: &str, list: &mut Vec<String>) -> Result<()> {
    if list.len() > MAX_POLICY_ENTRIES {
        return err(
            field,
            format!("{} entries; at most {MAX_POLICY_ENTRIES}", list.len()),
        );
    }
    for (i, p) in list.iter_mut().enumerate() {
        *p = policy_pattern(&format!("{field}[{i}]"), p)?;
    }
    list.sort();
    list.dedup();
    Ok(())
}

/// Folds `value` to lower case and checks it is a DNS-1123 label.
pub fn name(field: &str, value: &str) -> Result<String> {
    let folded = value.to_ascii_lowercase();
    if folded.is_empty() {
        return err(field, "must not be empty");
    }
    if !is_dns_label(&folded) {
        return err(
            field,
            format!(
                "{value:?} is not a DNS-1123 label (letters, digits and '-', starting and ending with a letter or digit, at most {MAX_LABEL_LEN} characters)"
            ),
        );
    }
    Ok(folded)
}

/// Checks a DNS name (RFC 1123 subdomain) such as an ExternalName target;
/// returns it folded to lower case without a trailing dot.
pub fn hostname(field: &str, value: &str) -> Result<String> {
    let folded = value.trim_end_matches('.').to_ascii_lowercase();
    if folded.is_empty() || folded.len() > 253 || !folded.split('.').all(is_dns_label) {
        return err(
            field,
            format!(
                "{value:?} is not a DNS name (dot-separated DNS-1123 labels, at most 253 characters)"
            ),
        );
    }
    Ok(folded)
}

fn is_label_part(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() <= MAX_LABEL_LEN
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && b.first().is_none_or(|c| c.is_ascii_alphanumeric())
        && b.last().is_none_or(|c| c.is_ascii_alphanumeric())
}

/// Checks a label key (`[prefix/]name`, as in Kubernetes).
pub fn label_key(field: &str, key: &str) -> Result<()> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix
        && hostname(field, p).is_err()
    {
        return err(
            field,
            format!("label key {key:?} has an invalid prefix {p:?}: it must be a DNS name"),
        );
    }
    if name.is_empty() || !is_label_part(name) {
        return err(
            field,
            format!(
                "label key {key:?} must be 1-{MAX_LABEL_LEN} letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
            ),
        );
    }
    Ok(())
}

/// Checks a label value (may be empty).
pub fn label_value(field: &str, value: &str) -> Result<()> {
    if !is_label_part(value) {
        return err(
            field,
            format!(
                "label value {value:?} must be at most {MAX_LABEL_LEN} letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
            ),
        );
    }
    Ok(())
}

/// Checks a whole label map.
pub fn labels(field: &str, map: &std::collections::HashMap<String, String>) -> Result<()> {
    let mut keys: Vec<_> = map.keys().collect();
    keys.sort();
    for k in keys {
        label_key(field, k)?;
        label_value(&format!("{field}[{k}]"), &map[k])?;
    }
    Ok(())
}

/// Parses one selector term `key=value`.
pub fn selector_term(field: &str, term: &str) -> Result<(String, String)> {
    let Some((k, v)) = term.split_once('=') else {
        return err(field, format!("{term:?} is not of the form key=value"));
    };
    let (k, v) = (k.trim(), v.trim());
    if k.is_empty() {
        return err(
            field,
            format!("{term:?} is not of the form key=value (the key is empty)"),
        );
    }
    if v.contains('=') {
        return err(
            field,
            format!("{term:?} is not of the form key=value (more than one '=')"),
        );
    }
    label_key(field, k)?;
    label_value(field, v)?;
    Ok((k.to_string(), v.to_string()))
}

/// Parses selector terms (`k=v`, or several separated by commas) into a map.
pub fn selector<S: AsRef<str>>(field: &str, terms: &[S]) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for t in terms {
        for term in t.as_ref().split(',') {
            let (k, v) = selector_term(field, term)?;
            if let Some(old) = out.insert(k.clone(), v.clone())
                && old != v
            {
                return err(
                    field,
                    format!("key {k:?} is given twice with different values ({old:?}, {v:?})"),
                );
            }
        }
    }
    Ok(out)
}

/// Checks a TCP/UDP port number (1-65535).
pub fn port(field: &str, value: u32) -> Result<u16> {
    match u16::try_from(value) {
        Ok(p) if p != 0 => Ok(p),
        _ => err(field, format!("{value} is not a port number (1-65535)")),
    }
}

fn parse_port_number(field: &str, s: &str) -> Result<u16> {
    match s.parse::<u32>() {
        Ok(v) => port(field, v),
        Err(_) => err(field, format!("{s:?} is not a port number (1-65535)")),
    }
}

/// Checks an IPv4 address (the mesh is IPv4).
pub fn ip(field: &str, value: &str) -> Result<Ipv4Addr> {
    match value.parse::<IpAddr>() {
        Ok(IpAddr::V4(a)) => Ok(a),
        Ok(IpAddr::V6(_)) => err(
            field,
            format!("{value:?} is IPv6; skymesh addresses are IPv4"),
        ),
        Err(_) => err(field, format!("{value:?} is not an IPv4 address")),
    }
}

/// Checks an IPv4 CIDR whose host bits are zero.
pub fn cidr(field: &str, value: &str) -> Result<Ipv4Net> {
    let net = match value.parse::<IpNet>() {
        Ok(IpNet::V4(n)) => n,
        Ok(IpNet::V6(_)) => {
            return err(field, format!("{value:?} is IPv6; skymesh CIDRs are IPv4"));
        }
        Err(_) => {
            return err(
                field,
                format!("{value:?} is not a CIDR (address/prefix-length, e.g. 10.1.0.0/16)"),
            );
        }
    };
    if net.trunc() != net {
        return err(
            field,
            format!(
                "{value:?} has host bits set (did you mean {}?)",
                net.trunc()
            ),
        );
    }
    Ok(net)
}

/// Checks an underlay endpoint `ip:port`.
pub fn endpoint(field: &str, value: &str) -> Result<SocketAddr> {
    match value.parse::<SocketAddr>() {
        Ok(a) if a.port() != 0 => Ok(a),
        _ => err(
            field,
            format!("{value:?} is not an address of the form IP:PORT"),
        ),
    }
}

/// Checks a base64 WireGuard (x25519) key.
pub fn wireguard_key(field: &str, value: &str) -> Result<[u8; 32]> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(value)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok());
    match bytes {
        Some(k) => Ok(k),
        None => err(field, "must be a base64-encoded 32-byte WireGuard key"),
    }
}

/// Checks a port name (IANA service name: lower-case letters, digits, '-').
pub fn port_name(field: &str, value: &str) -> Result<String> {
    let folded = value.to_ascii_lowercase();
    if folded.len() > MAX_PORT_NAME_LEN
        || !is_dns_label(&folded)
        || !folded.bytes().any(|c| c.is_ascii_lowercase())
    {
        return err(
            field,
            format!(
                "{value:?} is not a port name (at most {MAX_PORT_NAME_LEN} letters, digits and '-', with at least one letter)"
            ),
        );
    }
    Ok(folded)
}

/// Parses `TCP` / `UDP` (any case).
pub fn parse_protocol(field: &str, s: &str) -> Result<Protocol> {
    match s.to_ascii_uppercase().as_str() {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        _ => err(field, format!("{s:?} is not a protocol (TCP or UDP)")),
    }
}

/// Display name of a protocol.
pub fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Udp => "UDP",
        Protocol::Tcp | Protocol::Unspecified => "TCP",
    }
}

/// Parses a service type (any case): ClusterIP, Headless, ExternalName,
/// NodePort, LoadBalancer.
pub fn parse_service_type(field: &str, s: &str) -> Result<ServiceType> {
    match s.to_ascii_lowercase().as_str() {
        "clusterip" => Ok(ServiceType::ClusterIp),
        "headless" => Ok(ServiceType::Headless),
        "externalname" => Ok(ServiceType::ExternalName),
        "nodeport" => Ok(ServiceType::NodePort),
        "loadbalancer" => Ok(ServiceType::LoadBalancer),
        _ => err(
            field,
            format!(
                "{s:?} is not a service type (ClusterIP, Headless, ExternalName, NodePort or LoadBalancer)"
            ),
        ),
    }
}

/// Display name of a service type.
pub fn service_type_name(t: ServiceType) -> &'static str {
    match t {
        ServiceType::Unspecified | ServiceType::ClusterIp => "ClusterIP",
        ServiceType::Headless => "Headless",
        ServiceType::ExternalName => "ExternalName",
        ServiceType::NodePort => "NodePort",
        ServiceType::LoadBalancer => "LoadBalancer",
    }
}

/// Whether services of this type get a VIP.
pub fn service_type_has_vip(t: ServiceType) -> bool {
    matches!(
        t,
        ServiceType::Unspecified
            | ServiceType::ClusterIp
            | ServiceType::NodePort
            | ServiceType::LoadBalancer
    )
}

/// Parses `None` / `ClientIP` (any case).
pub fn parse_session_affinity(field: &str, s: &str) -> Result<SessionAffinity> {
    match s.to_ascii_lowercase().as_str() {
        "none" => Ok(SessionAffinity::None),
        "clientip" => Ok(SessionAffinity::ClientIp),
        _ => err(
            field,
            format!("{s:?} is not a session affinity (None or ClientIP)"),
        ),
    }
}

/// Display name of a session affinity.
pub fn session_affinity_name(a: SessionAffinity) -> &'static str {
    match a {
        SessionAffinity::Unspecified | SessionAffinity::None => "None",
        SessionAffinity::ClientIp => "ClientIP",
    }
}

/// Parses `Spread` / `PreferLocal` / `Local` (any case).
pub fn parse_traffic_policy(field: &str, s: &str) -> Result<TrafficPolicy> {
    match s.to_ascii_lowercase().as_str() {
        "spread" => Ok(TrafficPolicy::Spread),
        "preferlocal" => Ok(TrafficPolicy::PreferLocal),
        "local" => Ok(TrafficPolicy::Local),
        _ => err(
            field,
            format!("{s:?} is not a traffic policy (Spread, PreferLocal or Local)"),
        ),
    }
}

/// Display name of a traffic policy.
pub fn traffic_policy_name(p: TrafficPolicy) -> &'static str {
    match p {
        TrafficPolicy::Unspecified | TrafficPolicy::Spread => "Spread",
        TrafficPolicy::PreferLocal => "PreferLocal",
        TrafficPolicy::Local => "Local",
    }
}

fn split_proto<'a>(field: &str, s: &'a str) -> Result<(&'a str, Protocol)> {
    match s.rsplit_once('/') {
        Some((rest, p)) => Ok((rest, parse_protocol(field, p)?)),
        None => Ok((s, Protocol::Tcp)),
    }
}

/// Parses a service port: `PORT`, `PORT:TARGET` or `NAME:PORT:TARGET`, each
/// optionally followed by `/TCP` or `/UDP`.
pub fn parse_service_port(field: &str, s: &str) -> Result<ServicePort> {
    let (rest, protocol) = split_proto(field, s)?;
    let parts: Vec<&str> = rest.split(':').collect();
    let (name, port_s, target_s) = match parts.as_slice() {
        [p] => (None, *p, *p),
        [p, t] => (None, *p, *t),
        [n, p, t] => (Some(*n), *p, *t),
        _ => {
            return err(
                field,
                format!("{s:?} is not of the form [NAME:]PORT:TARGET[/TCP|UDP]"),
            );
        }
    };
    let name = match name {
        Some(n) => port_name(field, n)?,
        None => String::new(),
    };
    Ok(ServicePort {
        name,
        port: u32::from(parse_port_number(field, port_s)?),
        target_port: u32::from(parse_port_number(field, target_s)?),
        protocol: protocol as i32,
    })
}

/// Parses a job port: `PORT` or `NAME:PORT`, optionally followed by `/TCP`
/// or `/UDP`.
pub fn parse_job_port(field: &str, s: &str) -> Result<JobPort> {
    let (rest, protocol) = split_proto(field, s)?;
    let (name, port_s) = match rest.split_once(':') {
        Some((n, p)) => (port_name(field, n)?, p),
        None => (String::new(), rest),
    };
    Ok(JobPort {
        name,
        port: u32::from(parse_port_number(field, port_s)?),
        protocol: protocol as i32,
    })
}

/// The syntax of a probe, for messages.
pub const PROBE_SYNTAX: &str =
    "tcp[:PORT], http[:PORT][/PATH], icmp, udp[:PORT] or none (e.g. http:8080/healthz)";

/// Parses a readiness probe: `tcp`, `tcp:PORT`, `http`, `http:/PATH`,
/// `http:PORT`, `http:PORT/PATH`, `icmp`, `udp`, `udp:PORT` or `none`
/// (case-insensitive type). The result still goes through [`object`]'s
/// checks against the job's ports.
pub fn parse_probe(field: &str, s: &str) -> Result<Probe> {
    let (ty, rest) = match s.split_once(':') {
        Some((t, r)) => (t, Some(r)),
        None => (s, None),
    };
    let ty = match ty.to_ascii_lowercase().as_str() {
        "tcp" => ProbeType::Tcp,
        "http" => ProbeType::Http,
        "icmp" => ProbeType::Icmp,
        "udp" => ProbeType::Udp,
        "none" => ProbeType::None,
        _ => return err(field, format!("{s:?} is not a probe: {PROBE_SYNTAX}")),
    };
    let mut probe = Probe {
        r#type: ty as i32,
        ..Default::default()
    };
    let Some(rest) = rest else {
        return Ok(probe);
    };
    match ty {
        ProbeType::Icmp | ProbeType::None | ProbeType::Unspecified => err(
            field,
            format!("{s:?}: {} takes no port or path", a_probe(ty)),
        ),
        ProbeType::Tcp | ProbeType::Udp => {
            probe.port = u32::from(parse_port_number(field, rest)?);
            Ok(probe)
        }
        ProbeType::Http => {
            let (port_s, path) = match rest.find('/') {
                Some(i) => rest.split_at(i),
                None => (rest, ""),
            };
            if !port_s.is_empty() {
                probe.port = u32::from(parse_port_number(field, port_s)?);
            } else if path.is_empty() {
                return err(field, format!("{s:?}: give a port or a path after http:"));
            }
            probe.path = path.to_owned();
            Ok(probe)
        }
    }
}

/// The name of a probe type, as [`parse_probe`] reads it.
pub fn probe_type_name(t: ProbeType) -> &'static str {
    match t {
        ProbeType::Unspecified => "default",
        ProbeType::Tcp => "tcp",
        ProbeType::Http => "http",
        ProbeType::Icmp => "icmp",
        ProbeType::Udp => "udp",
        ProbeType::None => "none",
    }
}

/// "a tcp probe", "an http probe", ... for messages.
fn a_probe(t: ProbeType) -> String {
    let name = probe_type_name(t);
    let article = if matches!(t, ProbeType::Http | ProbeType::Icmp) {
        "an"
    } else {
        "a"
    };
    format!("{article} {name} probe")
}

/// A probe as [`parse_probe`] reads it (`tcp` for the default one).
pub fn probe_text(p: Option<&Probe>) -> String {
    let Some(p) = p else {
        return "tcp".to_owned();
    };
    let ty = p.r#type();
    let name = match ty {
        ProbeType::Unspecified => "tcp",
        t => probe_type_name(t),
    };
    match (ty, p.port) {
        (ProbeType::Http, 0) => format!("{name}:{}", p.path),
        (ProbeType::Http, port) => format!("{name}:{port}{}", p.path),
        (_, 0) => name.to_owned(),
        (_, port) => format!("{name}:{port}"),
    }
}

/// Checks a job's probe against its (already checked) ports, and
/// normalises an http probe's empty path to `/`. `field` names the probe
/// (`spec.probe`, `--probe`); errors name its part (`.port`, `.path`)
/// after it.
pub fn probe(field: &str, p: &mut Probe, ports: &[JobPort]) -> Result<()> {
    let ty: ProbeType = enum_value(&format!("{field}.type"), p.r#type)?;
    let has = |proto: Protocol| ports.iter().any(|j| j.protocol() == proto);
    if p.port != 0 {
        if matches!(
            ty,
            ProbeType::Icmp | ProbeType::None | ProbeType::Unspecified
        ) {
            return err(
                format!("{field}.port"),
                format!("{} takes no port", a_probe(ty)),
            );
        }
        port(&format!("{field}.port"), p.port)?;
    }
    if ty != ProbeType::Http && !p.path.is_empty() {
        return err(
            format!("{field}.path"),
            format!(
                "only an http probe has a path (this one is {})",
                probe_type_name(ty)
            ),
        );
    }
    match ty {
        ProbeType::Tcp | ProbeType::Http if p.port == 0 && !has(Protocol::Tcp) => err(
            format!("{field}.port"),
            format!(
                "{} needs a port: give one ({}:8080) or a TCP port to the job",
                a_probe(ty),
                probe_type_name(ty)
            ),
        ),
        ProbeType::Udp if p.port == 0 && !has(Protocol::Udp) => err(
            format!("{field}.port"),
            "a udp probe needs a port: give one (udp:53) or a UDP port to the job",
        ),
        ProbeType::Http => {
            if p.path.is_empty() {
                p.path = "/".to_owned();
            }
            if !p.path.starts_with('/') {
                return err(
                    format!("{field}.path"),
                    format!("{:?} must start with /", p.path),
                );
            }
            if p.path.len() > MAX_PROBE_PATH_LEN {
                return err(
                    format!("{field}.path"),
                    format!("at most {MAX_PROBE_PATH_LEN} characters"),
                );
            }
            if !p.path.bytes().all(|b| b.is_ascii_graphic()) {
                return err(
                    format!("{field}.path"),
                    format!(
                        "{:?} must be printable ASCII without spaces (percent-encode the rest)",
                        p.path
                    ),
                );
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn enum_value<E: TryFrom<i32>>(field: &str, v: i32) -> Result<E> {
    E::try_from(v).or_else(|_| err(field, format!("{v} is not a known value")))
}

/// Normalises and validates `meta`: folds the name, sets the namespace
/// (`default` for namespaced kinds, empty for global ones), checks labels.
fn meta(meta: &mut Option<ObjectMeta>, namespaced: bool) -> Result<()> {
    let m = meta.get_or_insert_with(ObjectMeta::default);
    m.name = name("metadata.name", &m.name)?;
    if namespaced {
        if m.namespace.is_empty() {
            m.namespace = DEFAULT_NAMESPACE.to_string();
        }
        m.namespace = name("metadata.namespace", &m.namespace)?;
    } else if !m.namespace.is_empty() {
        return err(
            "metadata.namespace",
            "must be empty: this kind is not namespaced",
        );
    }
    labels("metadata.labels", &m.labels)?;
    Ok(())
}

fn cluster(c: &mut Cluster) -> Result<()> {
    meta(&mut c.metadata, false)?;
    let spec = c.spec.get_or_insert_with(Default::default);
    if spec.workload_cidrs.is_empty() {
        return err(
            "spec.workload_cidrs",
            "at least one workload CIDR is required (--workload-cidr)",
        );
    }
    let mut nets: Vec<(String, Ipv4Net)> = Vec::new();
    for (i, s) in spec.workload_cidrs.iter_mut().enumerate() {
        let field = format!("spec.workload_cidrs[{i}]");
        let net = cidr(&field, s)?;
        if let Some((other, _)) = nets
            .iter()
            .find(|(_, o)| o.contains(&net) || net.contains(o))
        {
            return err(field, format!("{net} overlaps {other} of the same cluster"));
        }
        *s = net.to_string();
        nets.push((s.clone(), net));
    }
    Ok(())
}

fn job_ports(field: &str, ports: &mut [JobPort]) -> Result<()> {
    let mut seen = HashSet::new();
    for (i, p) in ports.iter_mut().enumerate() {
        let f = format!("{field}[{i}]");
        port(&format!("{f}.port"), p.port)?;
        let proto: Protocol = enum_value(&format!("{f}.protocol"), p.protocol)?;
        if proto == Protocol::Unspecified {
            p.protocol = Protocol::Tcp as i32;
        }
        if !p.name.is_empty() {
            p.name = port_name(&format!("{f}.name"), &p.name)?;
            if !seen.insert(p.name.clone()) {
                return err(
                    format!("{f}.name"),
                    format!("port name {:?} is used twice", p.name),
                );
            }
        }
    }
    Ok(())
}

fn job(j: &mut Job) -> Result<()> {
    meta(&mut j.metadata, true)?;
    let spec = j.spec.get_or_insert_with(Default::default);
    if spec.cluster.is_empty() {
        return err("spec.cluster", "a job must name its cluster (--cluster)");
    }
    spec.cluster = name("spec.cluster", &spec.cluster)?;
    spec.ip = ip("spec.ip", &spec.ip)?.to_string();
    job_ports("spec.ports", &mut spec.ports)?;
    match spec.probe.as_mut() {
        Some(p) => probe("spec.probe", p, &spec.ports),
        None => Ok(()),
    }
}

fn service(s: &mut Service) -> Result<()> {
    meta(&mut s.metadata, true)?;
    let spec = s.spec.get_or_insert_with(Default::default);
    let mut ty: ServiceType = enum_value("spec.type", spec.r#type)?;
    if ty == ServiceType::Unspecified {
        ty = ServiceType::ClusterIp;
        spec.r#type = ty as i32;
    }
    let sel: std::collections::HashMap<String, String> = std::mem::take(&mut spec.selector);
    labels("spec.selector", &sel)?;
    spec.selector = sel;
    let mut seen = HashSet::new();
    let mut seen_names = HashSet::new();
    for (i, p) in spec.ports.iter_mut().enumerate() {
        let f = format!("spec.ports[{i}]");
        port(&format!("{f}.port"), p.port)?;
        if p.target_port == 0 {
            p.target_port = p.port;
        }
        port(&format!("{f}.target_port"), p.target_port)?;
        let mut proto: Protocol = enum_value(&format!("{f}.protocol"), p.protocol)?;
        if proto == Protocol::Unspecified {
            proto = Protocol::Tcp;
            p.protocol = proto as i32;
        }
        if !seen.insert((p.port, p.protocol)) {
            return err(
                format!("{f}.port"),
                format!("port {}/{} is given twice", p.port, protocol_name(proto)),
            );
        }
        if !p.name.is_empty() {
            p.name = port_name(&format!("{f}.name"), &p.name)?;
            if !seen_names.insert(p.name.clone()) {
                return err(
                    format!("{f}.name"),
                    format!("port name {:?} is used twice", p.name),
                );
            }
        }
    }
    if service_type_has_vip(ty) && spec.ports.is_empty() {
        return err(
            "spec.ports",
            format!(
                "a {} service needs at least one port (-p PORT:TARGET)",
                service_type_name(ty)
            ),
        );
    }
    for (i, c) in spec.clusters.iter_mut().enumerate() {
        *c = name(&format!("spec.clusters[{i}]"), c)?;
    }
    let mut clusters = spec.clusters.clone();
    clusters.sort();
    clusters.dedup();
    spec.clusters = clusters;
    let aff: SessionAffinity = enum_value("spec.session_affinity", spec.session_affinity)?;
    if aff == SessionAffinity::Unspecified {
        spec.session_affinity = SessionAffinity::None as i32;
    }
    if spec.affinity_timeout_s == 0 {
        spec.affinity_timeout_s = DEFAULT_AFFINITY_TIMEOUT_S;
    }
    if spec.affinity_timeout_s > MAX_AFFINITY_TIMEOUT_S {
        return err(
            "spec.affinity_timeout_s",
            format!(
                "{} exceeds the maximum of {MAX_AFFINITY_TIMEOUT_S} seconds",
                spec.affinity_timeout_s
            ),
        );
    }
    policy_list("spec.upstreams", &mut spec.upstreams)?;
    policy_list("spec.whitelists", &mut spec.whitelists)?;
    let tp: TrafficPolicy = enum_value("spec.traffic_policy", spec.traffic_policy)?;
    if tp == TrafficPolicy::Unspecified {
        spec.traffic_policy = TrafficPolicy::Spread as i32;
    }
    if ty == ServiceType::ExternalName {
        if spec.external_name.is_empty() {
            return err(
                "spec.external_name",
                "an ExternalName service needs --external-name HOST",
            );
        }
        spec.external_name = hostname("spec.external_name", &spec.external_name)?;
    } else if !spec.external_name.is_empty() {
        return err(
            "spec.external_name",
            format!(
                "only ExternalName services take an external name (type is {})",
                service_type_name(ty)
            ),
        );
    }
    Ok(())
}

fn endpoints(e: &mut Endpoints) -> Result<()> {
    meta(&mut e.metadata, true)?;
    let spec = e.spec.get_or_insert_with(Default::default);
    labels("spec.selector", &spec.selector)?;
    if !spec.primary_cluster.is_empty() {
        spec.primary_cluster = name("spec.primary_cluster", &spec.primary_cluster)?;
    }
    if let Some(every) = &spec.every_cluster {
        if !every.cluster.is_empty() {
            return err(
                "spec.every_cluster.cluster",
                "must be empty: these settings apply to every cluster",
            );
        }
        if !spec.clusters.is_empty() {
            return err(
                "spec.every_cluster",
                "only without spec.clusters (each listed cluster has its own settings)",
            );
        }
    }
    let mut seen = HashSet::new();
    for (i, c) in spec.clusters.iter_mut().enumerate() {
        let f = format!("spec.clusters[{i}].cluster");
        c.cluster = name(&f, &c.cluster)?;
        if !seen.insert(c.cluster.clone()) {
            return err(f, format!("cluster {:?} is listed twice", c.cluster));
        }
    }
    Ok(())
}

/// Normalises (folds names, fills defaults, canonicalises CIDRs and IPs)
/// and validates the user-written part of an object. Status is not checked:
/// the coordinator owns it.
pub fn object(obj: &mut Object) -> Result<()> {
    match obj.obj.as_mut() {
        None => err("object", "no object given"),
        Some(Obj::Namespace(Namespace { metadata })) => meta(metadata, false),
        Some(Obj::Cluster(c)) => cluster(c),
        Some(Obj::Job(j)) => job(j),
        Some(Obj::Service(s)) => service(s),
        Some(Obj::Endpoints(e)) => endpoints(e),
    }
}
