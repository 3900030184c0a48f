//! skymesh's own documents: what `skyctl get KIND NAME -o yaml|json`
//! prints ([`crate::output::json`]) read back into an [`Object`], so that
//! output is valid `apply -f` input. `status` and the system's metadata
//! (`uid`, `creation_timestamp`) are read-only: accepted and ignored.
//!
//! Must not: validate values beyond their types (that is
//! `skymesh_proto::validate::object`, run on every parsed document).

use skymesh_proto::v1::{
    Cluster, ClusterSpec, Endpoints, EndpointsClusterSpec, EndpointsSpec, Job, JobPort, JobSpec,
    Namespace, Object, ObjectMeta, Service, ServicePort, ServiceSpec,
};
use skymesh_proto::validate;

use super::fields::{Fields, Result, invalid};

/// The kinds of skymesh documents, as `kind:` spells them.
pub(crate) const KINDS: &str = "Service, Endpoints, Cluster, Job or Namespace";

/// Reads the document `doc` (its `kind` already read as `kind`).
pub(crate) fn parse(kind: &str, mut doc: Fields<'_>) -> Result<Object> {
    let mut m = match doc.fields("metadata")? {
        Some(f) => f,
        None => return invalid("metadata.name", "must not be empty"),
    };
    let meta = metadata(&mut m)?;
    m.finish("name, namespace, labels, annotations, resource_version")?;
    doc.ignore("status");
    let obj: Object = match kind {
        "Service" => Service {
            metadata: Some(meta),
            spec: Some(service_spec(doc.fields("spec")?)?),
            status: None,
        }
        .into(),
        "Endpoints" => Endpoints {
            metadata: Some(meta),
            spec: Some(endpoints_spec(doc.fields("spec")?)?),
            status: None,
        }
        .into(),
        "Cluster" => Cluster {
            metadata: Some(meta),
            spec: Some(cluster_spec(doc.fields("spec")?)?),
            status: None,
        }
        .into(),
        "Job" => Job {
            metadata: Some(meta),
            spec: Some(job_spec(doc.fields("spec")?)?),
            status: None,
        }
        .into(),
        "Namespace" => Namespace {
            metadata: Some(meta),
        }
        .into(),
        other => {
            return invalid("kind", format!("{other:?} is not a skymesh kind ({KINDS})"));
        }
    };
    doc.finish("kind, metadata, spec, status")?;
    Ok(obj)
}

fn metadata(m: &mut Fields<'_>) -> Result<ObjectMeta> {
    let meta = ObjectMeta {
        name: m.str("name")?.unwrap_or_default().to_string(),
        namespace: m.str("namespace")?.unwrap_or_default().to_string(),
        labels: m.string_map("labels")?,
        annotations: m.string_map("annotations")?,
        resource_version: m.u64_or_string("resource_version")?.unwrap_or(0),
        ..Default::default()
    };
    m.ignore("uid");
    m.ignore("creation_timestamp");
    Ok(meta)
}

fn enum_of<T>(
    f: &mut Fields<'_>,
    key: &str,
    parse: impl Fn(&str, &str) -> validate::Result<T>,
) -> Result<Option<T>> {
    let field = f.path_of(key);
    f.str(key)?.map(|s| parse(&field, s)).transpose()
}

fn service_spec(spec: Option<Fields<'_>>) -> Result<ServiceSpec> {
    let Some(mut f) = spec else {
        return Ok(ServiceSpec::default());
    };
    let mut ports = Vec::new();
    for (path, v) in f.list("ports")? {
        let mut p = Fields::new(&path, v)?;
        ports.push(ServicePort {
            name: p.str("name")?.unwrap_or_default().to_string(),
            port: p.u32("port")?.unwrap_or(0),
            target_port: p.u32("target_port")?.unwrap_or(0),
            protocol: enum_of(&mut p, "protocol", validate::parse_protocol)?.unwrap_or_default()
                as i32,
        });
        p.finish("name, port, target_port, protocol")?;
    }
    let spec = ServiceSpec {
        r#type: enum_of(&mut f, "type", validate::parse_service_type)?.unwrap_or_default() as i32,
        selector: f.string_map("selector")?,
        ports,
        clusters: f.strings("clusters")?,
        session_affinity: enum_of(&mut f, "session_affinity", validate::parse_session_affinity)?
            .unwrap_or_default() as i32,
        affinity_timeout_s: f.u32("affinity_timeout_s")?.unwrap_or(0),
        traffic_policy: enum_of(&mut f, "traffic_policy", validate::parse_traffic_policy)?
            .unwrap_or_default() as i32,
        external_name: f.str("external_name")?.unwrap_or_default().to_string(),
        upstreams: f.strings("upstreams")?,
        whitelists: f.strings("whitelists")?,
    };
    f.finish(
        "type, selector, ports, clusters, session_affinity, affinity_timeout_s, traffic_policy, external_name, upstreams, whitelists",
    )?;
    Ok(spec)
}

fn endpoints_settings(f: &mut Fields<'_>) -> Result<EndpointsClusterSpec> {
    Ok(EndpointsClusterSpec {
        cluster: String::new(),
        num_endpoints: f.u32("num_endpoints")?.unwrap_or(0),
        exposed: f.bool("exposed")?.unwrap_or(false),
    })
}

fn endpoints_spec(spec: Option<Fields<'_>>) -> Result<EndpointsSpec> {
    let Some(mut f) = spec else {
        return Ok(EndpointsSpec::default());
    };
    let mut clusters = Vec::new();
    for (path, v) in f.list("clusters")? {
        let mut c = Fields::new(&path, v)?;
        let cluster = c.str("cluster")?.unwrap_or_default().to_string();
        clusters.push(EndpointsClusterSpec {
            cluster,
            ..endpoints_settings(&mut c)?
        });
        c.finish("cluster, num_endpoints, exposed")?;
    }
    let every_cluster = match f.fields("every_cluster")? {
        Some(mut e) => {
            let s = endpoints_settings(&mut e)?;
            e.finish("num_endpoints, exposed")?;
            Some(s)
        }
        None => None,
    };
    let spec = EndpointsSpec {
        selector: f.string_map("selector")?,
        primary_cluster: f.str("primary_cluster")?.unwrap_or_default().to_string(),
        clusters,
        every_cluster,
    };
    f.finish("selector, primary_cluster, clusters, every_cluster")?;
    Ok(spec)
}

fn cluster_spec(spec: Option<Fields<'_>>) -> Result<ClusterSpec> {
    let Some(mut f) = spec else {
        return Ok(ClusterSpec::default());
    };
    let spec = ClusterSpec {
        workload_cidrs: f.strings("workload_cidrs")?,
    };
    f.finish("workload_cidrs")?;
    Ok(spec)
}

/// A job's ports, `{name, port, protocol}` each.
pub(crate) fn job_ports(f: &mut Fields<'_>, key: &str) -> Result<Vec<JobPort>> {
    let mut ports = Vec::new();
    for (path, v) in f.list(key)? {
        let mut p = Fields::new(&path, v)?;
        ports.push(JobPort {
            name: p.str("name")?.unwrap_or_default().to_string(),
            port: p.u32("port")?.unwrap_or(0),
            protocol: enum_of(&mut p, "protocol", validate::parse_protocol)?.unwrap_or_default()
                as i32,
        });
        p.finish("name, port, protocol")?;
    }
    Ok(ports)
}

fn job_spec(spec: Option<Fields<'_>>) -> Result<JobSpec> {
    let Some(mut f) = spec else {
        return Ok(JobSpec::default());
    };
    let spec = JobSpec {
        cluster: f.str("cluster")?.unwrap_or_default().to_string(),
        ip: f.str("ip")?.unwrap_or_default().to_string(),
        ports: job_ports(&mut f, "ports")?,
        probe: enum_of(&mut f, "probe", validate::parse_probe)?,
    };
    f.finish("cluster, ip, ports, probe")?;
    Ok(spec)
}
