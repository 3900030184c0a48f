//! Kubernetes `apiVersion: v1` manifests, accepted as kubectl users write
//! them: `kind: Service` (type, selector, named ports with `targetPort` by
//! number or by name, `protocol`, `sessionAffinity` with
//! `sessionAffinityConfig.clientIP.timeoutSeconds`, `externalName`,
//! `clusterIP: None` for headless) and `kind: Endpoints`. skymesh-only
//! settings come from annotations ([`CLUSTERS`], [`TRAFFIC_POLICY`],
//! [`UPSTREAMS`], [`WHITELISTS`], and
//! for Endpoints [`SELECTOR`], [`PRIMARY_CLUSTER`], [`NUM_ENDPOINTS`],
//! [`EXPOSED`]); they are taken out of the stored annotations.
//!
//! A field skymesh cannot map is refused naming it (see
//! [`super::fields::Fields::finish`]), never dropped. `status` and the
//! server-written metadata (`uid`, `creationTimestamp`) are read-only.
//!
//! Must not: talk to the coordinator. A `targetPort` given by name is
//! left in [`Parsed::named_targets`] for the caller to resolve against the
//! jobs the selector picks (skymesh maps one number per service port).

use std::collections::HashMap;

use serde_json::Value;
use skymesh_proto::v1::{
    Endpoints, EndpointsClusterSpec, EndpointsSpec, Object, ObjectMeta, Protocol, Service,
    ServicePort, ServiceSpec, ServiceType,
};
use skymesh_proto::validate;

use super::fields::{Fields, Result, invalid, number};

/// Annotation: the clusters a service is exposed in, comma-separated
/// (absent = every cluster).
pub(crate) const CLUSTERS: &str = "skymesh.io/clusters";
/// Annotation: Spread, PreferLocal or Local.
pub(crate) const TRAFFIC_POLICY: &str = "skymesh.io/traffic-policy";
/// Annotation: the services this one may call, comma-separated
/// `namespace/service` patterns (README "Service policy").
pub(crate) const UPSTREAMS: &str = "skymesh.io/upstreams";
/// Annotation: the services that may call this one, as patterns.
pub(crate) const WHITELISTS: &str = "skymesh.io/whitelists";
/// Annotation (Endpoints): the label selector, `k=v,k2=v2`.
pub(crate) const SELECTOR: &str = "skymesh.io/selector";
/// Annotation (Endpoints): the cluster whose jobs back them.
pub(crate) const PRIMARY_CLUSTER: &str = "skymesh.io/primary-cluster";
/// Annotation (Endpoints): at most this many ready jobs (per cluster).
pub(crate) const NUM_ENDPOINTS: &str = "skymesh.io/num-endpoints";
/// Annotation (Endpoints): `"true"` to reach them from every cluster.
pub(crate) const EXPOSED: &str = "skymesh.io/exposed";

/// A service port whose `targetPort` is a port name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NamedTarget {
    /// Index in `spec.ports`.
    pub(crate) index: usize,
    /// `spec.ports[i].targetPort`, for messages.
    pub(crate) field: String,
    pub(crate) name: String,
    pub(crate) protocol: Protocol,
}

/// A Kubernetes manifest as a skymesh object.
#[derive(Debug, Clone)]
pub(crate) struct Parsed {
    pub(crate) object: Object,
    /// Ports whose target the caller must resolve (their `target_port` is 0).
    pub(crate) named_targets: Vec<NamedTarget>,
}

fn metadata(doc: &mut Fields<'_>) -> Result<ObjectMeta> {
    let Some(mut m) = doc.fields("metadata")? else {
        return invalid("metadata.name", "must not be empty");
    };
    let meta = ObjectMeta {
        name: m.str("name")?.unwrap_or_default().to_string(),
        namespace: m.str("namespace")?.unwrap_or_default().to_string(),
        labels: m.string_map("labels")?,
        annotations: m.string_map("annotations")?,
        resource_version: m.u64_or_string("resourceVersion")?.unwrap_or(0),
        ..Default::default()
    };
    m.ignore("uid");
    m.ignore("creationTimestamp");
    m.refuse("generateName", "skymesh objects are named by metadata.name")?;
    m.finish("name, namespace, labels, annotations, resourceVersion")?;
    Ok(meta)
}

/// Takes the skymesh annotations `keys` out of `meta`; any other
/// `skymesh.io/` annotation is refused.
fn skymesh_annotations(
    meta: &mut ObjectMeta,
    keys: &[&str],
) -> Result<HashMap<&'static str, String>> {
    let mut out = HashMap::new();
    let mut names: Vec<String> = meta.annotations.keys().cloned().collect();
    names.sort();
    for k in names {
        if !k.starts_with("skymesh.io/") {
            continue;
        }
        let Some(known) = [
            CLUSTERS,
            TRAFFIC_POLICY,
            UPSTREAMS,
            WHITELISTS,
            SELECTOR,
            PRIMARY_CLUSTER,
            NUM_ENDPOINTS,
            EXPOSED,
        ]
        .into_iter()
        .find(|a| *a == k && keys.contains(a)) else {
            return invalid(
                format!("metadata.annotations.{k}"),
                format!(
                    "unknown skymesh annotation on this kind (known: {})",
                    keys.join(", ")
                ),
            );
        };
        if let Some(v) = meta.annotations.remove(&k) {
            out.insert(known, v);
        }
    }
    Ok(out)
}

/// Reads a `kind: Service` or `kind: Endpoints` document of `apiVersion: v1`.
pub(crate) fn parse(kind: &str, mut doc: Fields<'_>) -> Result<Parsed> {
    let parsed = match kind {
        "Service" => service(&mut doc)?,
        "Endpoints" => endpoints(&mut doc)?,
        other => {
            return invalid(
                "kind",
                format!(
                    "{other:?} of apiVersion v1 cannot be mapped: skymesh accepts Kubernetes Service and Endpoints"
                ),
            );
        }
    };
    doc.ignore("status");
    doc.finish("apiVersion, kind, metadata, spec, status")?;
    Ok(parsed)
}

/// Why a field of Kubernetes' Service has no skymesh meaning.
const REFUSED_SERVICE_FIELDS: &[(&str, &str)] = &[
    (
        "externalIPs",
        "skymesh chooses the external addresses (the gateways of the service's clusters)",
    ),
    (
        "loadBalancerIP",
        "skymesh serves LoadBalancer services on the gateways' underlay addresses",
    ),
    (
        "loadBalancerSourceRanges",
        "skymesh has no source filter on services",
    ),
    (
        "loadBalancerClass",
        "skymesh is the only load balancer implementation",
    ),
    (
        "externalTrafficPolicy",
        "use the annotation skymesh.io/traffic-policy (Spread, PreferLocal or Local)",
    ),
    (
        "internalTrafficPolicy",
        "use the annotation skymesh.io/traffic-policy (Spread, PreferLocal or Local)",
    ),
    (
        "publishNotReadyAddresses",
        "skymesh only routes to and publishes ready jobs",
    ),
    (
        "healthCheckNodePort",
        "skymesh has no node ports; NodePort services answer on the service port",
    ),
    (
        "allocateLoadBalancerNodePorts",
        "skymesh has no node ports; NodePort services answer on the service port",
    ),
    (
        "topologyKeys",
        "use the annotation skymesh.io/traffic-policy (Spread, PreferLocal or Local)",
    ),
    (
        "trafficDistribution",
        "use the annotation skymesh.io/traffic-policy (Spread, PreferLocal or Local)",
    ),
];

fn service(doc: &mut Fields<'_>) -> Result<Parsed> {
    let mut meta = metadata(doc)?;
    let ann = skymesh_annotations(
        &mut meta,
        &[CLUSTERS, TRAFFIC_POLICY, UPSTREAMS, WHITELISTS],
    )?;
    let mut spec = ServiceSpec::default();
    let mut named_targets = Vec::new();
    let list = |a: &str| -> Vec<String> {
        ann.get(a)
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    };
    spec.clusters = list(CLUSTERS);
    spec.upstreams = list(UPSTREAMS);
    spec.whitelists = list(WHITELISTS);
    for (a, l) in [(UPSTREAMS, &spec.upstreams), (WHITELISTS, &spec.whitelists)] {
        for p in l {
            validate::policy_pattern(&format!("metadata.annotations.{a}"), p)?;
        }
    }
    if let Some(p) = ann.get(TRAFFIC_POLICY) {
        spec.traffic_policy =
            validate::parse_traffic_policy(&format!("metadata.annotations.{TRAFFIC_POLICY}"), p)?
                as i32;
    }
    if let Some(mut f) = doc.fields("spec")? {
        let type_field = f.path_of("type");
        let mut ty = match f.str("type")? {
            Some(t) => validate::parse_service_type(&type_field, t)?,
            None => ServiceType::ClusterIp,
        };
        let headless = cluster_ip(&mut f, ty)?;
        if headless {
            ty = ServiceType::Headless;
        }
        spec.r#type = ty as i32;
        spec.selector = f.string_map("selector")?;
        for (i, (path, v)) in f.list("ports")?.into_iter().enumerate() {
            let (port, named) = service_port(i, &path, v)?;
            spec.ports.push(port);
            named_targets.extend(named);
        }
        if let Some(a) = f.str("sessionAffinity")? {
            spec.session_affinity =
                validate::parse_session_affinity(&f.path_of("sessionAffinity"), a)? as i32;
        }
        if let Some(mut cfg) = f.fields("sessionAffinityConfig")? {
            if let Some(mut c) = cfg.fields("clientIP")? {
                spec.affinity_timeout_s = c.u32("timeoutSeconds")?.unwrap_or(0);
                c.finish("timeoutSeconds")?;
            }
            cfg.finish("clientIP")?;
        }
        spec.external_name = f.str("externalName")?.unwrap_or_default().to_string();
        ip_families(&mut f)?;
        for (key, why) in REFUSED_SERVICE_FIELDS {
            f.refuse(key, why)?;
        }
        f.finish(
            "type, clusterIP, selector, ports, sessionAffinity, sessionAffinityConfig, externalName",
        )?;
    }
    Ok(Parsed {
        object: Service {
            metadata: Some(meta),
            spec: Some(spec),
            status: None,
        }
        .into(),
        named_targets,
    })
}

/// Reads `clusterIP`/`clusterIPs`: `None` makes the service headless;
/// empty means "allocate one"; an address is refused (the coordinator
/// allocates VIPs and keeps them across updates).
fn cluster_ip(f: &mut Fields<'_>, ty: ServiceType) -> Result<bool> {
    let mut values: Vec<(String, String)> = Vec::new();
    let field = f.path_of("clusterIP");
    if let Some(ip) = f.str("clusterIP")? {
        values.push((field, ip.to_string()));
    }
    let field = f.path_of("clusterIPs");
    for (i, ip) in f.strings("clusterIPs")?.into_iter().enumerate() {
        values.push((format!("{field}[{i}]"), ip));
    }
    let mut headless = false;
    for (field, v) in values {
        match v.as_str() {
            "" => {}
            "None" if matches!(ty, ServiceType::ClusterIp | ServiceType::Headless) => {
                headless = true;
            }
            "None" => {
                return invalid(
                    field,
                    format!(
                        "None (headless) is for ClusterIP services, not {}",
                        validate::service_type_name(ty)
                    ),
                );
            }
            ip => {
                return invalid(
                    field,
                    format!(
                        "{ip:?} cannot be chosen: the coordinator allocates the VIP and keeps it across updates (leave clusterIP out, or None for a headless service)"
                    ),
                );
            }
        }
    }
    Ok(headless)
}

/// `ipFamilies: [IPv4]` and `ipFamilyPolicy: SingleStack` say what
/// skymesh does anyway; anything else (IPv6, dual stack) is refused.
fn ip_families(f: &mut Fields<'_>) -> Result<()> {
    let field = f.path_of("ipFamilies");
    for (i, fam) in f.strings("ipFamilies")?.into_iter().enumerate() {
        if fam != "IPv4" {
            return invalid(
                format!("{field}[{i}]"),
                format!("{fam:?} is not supported: skymesh services are IPv4 only"),
            );
        }
    }
    let field = f.path_of("ipFamilyPolicy");
    match f.str("ipFamilyPolicy")? {
        None | Some("SingleStack") => Ok(()),
        Some(p) => invalid(
            field,
            format!("{p:?} is not supported: skymesh services are IPv4 single stack"),
        ),
    }
}

fn service_port(i: usize, path: &str, v: &Value) -> Result<(ServicePort, Option<NamedTarget>)> {
    let mut p = Fields::new(path, v)?;
    let protocol = match p.str("protocol")? {
        Some(s) => validate::parse_protocol(&p.path_of("protocol"), s)?,
        None => Protocol::Tcp,
    };
    let mut port = ServicePort {
        name: p.str("name")?.unwrap_or_default().to_string(),
        port: p.u32("port")?.unwrap_or(0),
        target_port: 0,
        protocol: protocol as i32,
    };
    let target_field = p.path_of("targetPort");
    let mut named = None;
    match p.take("targetPort") {
        None => {}
        Some(Value::String(name)) => {
            let name = validate::port_name(&target_field, name)?;
            named = Some(NamedTarget {
                index: i,
                field: target_field,
                name,
                protocol,
            });
        }
        Some(v) => port.target_port = number(&target_field, v)?,
    }
    p.refuse(
        "nodePort",
        "skymesh has no node ports; NodePort services answer on the service port at the gateways' underlay addresses",
    )?;
    p.refuse(
        "appProtocol",
        "skymesh balances TCP and UDP and does not read application protocols",
    )?;
    p.finish("name, port, targetPort, protocol")?;
    Ok((port, named))
}

fn endpoints(doc: &mut Fields<'_>) -> Result<Parsed> {
    let mut meta = metadata(doc)?;
    let ann = skymesh_annotations(
        &mut meta,
        &[SELECTOR, PRIMARY_CLUSTER, NUM_ENDPOINTS, EXPOSED],
    )?;
    let field = |k: &str| format!("metadata.annotations.{k}");
    let selector = match ann.get(SELECTOR) {
        Some(s) => validate::selector(&field(SELECTOR), &[s])?
            .into_iter()
            .collect(),
        None => HashMap::new(),
    };
    let num_endpoints = match ann.get(NUM_ENDPOINTS) {
        Some(n) => match n.trim().parse::<u32>() {
            Ok(n) => n,
            Err(_) => {
                return invalid(
                    field(NUM_ENDPOINTS),
                    format!("{n:?} is not a number of endpoints"),
                );
            }
        },
        None => 0,
    };
    let exposed = match ann.get(EXPOSED).map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return invalid(
                field(EXPOSED),
                format!("{other:?} must be \"true\" or \"false\""),
            );
        }
    };
    let settings = EndpointsClusterSpec {
        cluster: String::new(),
        num_endpoints,
        exposed,
    };
    let primary = ann.get(PRIMARY_CLUSTER).cloned().unwrap_or_default();
    let (clusters, every_cluster) = if primary.is_empty() {
        (Vec::new(), Some(settings))
    } else {
        (
            vec![EndpointsClusterSpec {
                cluster: primary.clone(),
                ..settings
            }],
            None,
        )
    };
    // skymesh Endpoints pick jobs by selector; listed addresses have no
    // place in them.
    for (path, v) in doc.list("subsets")? {
        let mut s = Fields::new(&path, v)?;
        for key in ["addresses", "notReadyAddresses"] {
            if !s.list(key)?.is_empty() {
                return invalid(
                    s.path_of(key),
                    format!(
                        "not supported: skymesh Endpoints pick jobs by label selector (annotation {SELECTOR}); register the addresses as jobs (skyctl create job) instead of listing them"
                    ),
                );
            }
        }
        s.ignore("ports");
        s.finish("addresses, notReadyAddresses, ports")?;
    }
    Ok(Parsed {
        object: Endpoints {
            metadata: Some(meta),
            spec: Some(EndpointsSpec {
                selector,
                primary_cluster: primary,
                clusters,
                every_cluster,
            }),
            status: None,
        }
        .into(),
        named_targets: Vec::new(),
    })
}
