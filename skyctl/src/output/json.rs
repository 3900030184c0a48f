//! `-o json|yaml` documents, built by hand into `serde_json::Value` so they
//! read well: kinds and enums as names (`ClusterIP`, `TCP`, `Ready`),
//! timestamps as RFC 3339, empty optional fields left out, maps sorted.
//! A list is `{"items": [...]}`; one object is that object.

use std::collections::HashMap;

use serde_json::{Map, Value, json};
use skymesh_proto::v1::object::Obj;
use skymesh_proto::v1::{
    Cluster, Endpoints, Job, JobPort, Object, ObjectMeta, PeerHealth, ProbeType, Service,
};
use skymesh_proto::validate;

use super::columns::phase_name;
use super::human;

/// A map of strings as a JSON object (sorted by key).
fn string_map(m: &HashMap<String, String>) -> Value {
    let sorted: Map<String, Value> = m
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    Value::Object(sorted)
}

/// Inserts `key: s` unless `s` is empty.
fn put_str(map: &mut Map<String, Value>, key: &str, s: &str) {
    if !s.is_empty() {
        map.insert(key.to_string(), Value::String(s.to_string()));
    }
}

/// A Unix time as RFC 3339, `null` when unset.
fn time(unix: i64) -> Value {
    if unix > 0 {
        Value::String(human::rfc3339(unix))
    } else {
        Value::Null
    }
}

fn metadata(m: Option<&ObjectMeta>) -> Value {
    let m = m.cloned().unwrap_or_default();
    let mut out = Map::new();
    out.insert("name".into(), Value::String(m.name));
    put_str(&mut out, "namespace", &m.namespace);
    if !m.labels.is_empty() {
        out.insert("labels".into(), string_map(&m.labels));
    }
    if !m.annotations.is_empty() {
        out.insert("annotations".into(), string_map(&m.annotations));
    }
    put_str(&mut out, "uid", &m.uid);
    out.insert("resource_version".into(), json!(m.resource_version));
    out.insert("creation_timestamp".into(), time(m.creation_timestamp));
    Value::Object(out)
}

fn job_port(p: &JobPort) -> Value {
    let mut out = Map::new();
    put_str(&mut out, "name", &p.name);
    out.insert("port".into(), json!(p.port));
    out.insert(
        "protocol".into(),
        json!(validate::protocol_name(p.protocol())),
    );
    Value::Object(out)
}

fn service(s: &Service) -> Value {
    let spec = s.spec.clone().unwrap_or_default();
    let status = s.status.clone().unwrap_or_default();
    let ports: Vec<Value> = spec
        .ports
        .iter()
        .map(|p| {
            let mut out = Map::new();
            put_str(&mut out, "name", &p.name);
            out.insert("port".into(), json!(p.port));
            let target = p.effective_target_port();
            out.insert("target_port".into(), json!(target));
            out.insert(
                "protocol".into(),
                json!(validate::protocol_name(p.protocol())),
            );
            Value::Object(out)
        })
        .collect();
    let mut sp = Map::new();
    sp.insert(
        "type".into(),
        json!(validate::service_type_name(spec.r#type())),
    );
    sp.insert("selector".into(), string_map(&spec.selector));
    sp.insert("ports".into(), Value::Array(ports));
    sp.insert("clusters".into(), json!(spec.clusters));
    sp.insert(
        "session_affinity".into(),
        json!(validate::session_affinity_name(spec.session_affinity())),
    );
    let timeout = if spec.affinity_timeout_s == 0 {
        validate::DEFAULT_AFFINITY_TIMEOUT_S
    } else {
        spec.affinity_timeout_s
    };
    sp.insert("affinity_timeout_s".into(), json!(timeout));
    sp.insert(
        "traffic_policy".into(),
        json!(validate::traffic_policy_name(spec.traffic_policy())),
    );
    put_str(&mut sp, "external_name", &spec.external_name);
    if !spec.upstreams.is_empty() {
        sp.insert("upstreams".into(), json!(spec.upstreams));
    }
    if !spec.whitelists.is_empty() {
        sp.insert("whitelists".into(), json!(spec.whitelists));
    }
    let mut st = Map::new();
    put_str(&mut st, "cluster_ip", &status.cluster_ip);
    st.insert("external_ips".into(), json!(status.external_ips));
    json!({
        "kind": "Service",
        "metadata": metadata(s.metadata.as_ref()),
        "spec": sp,
        "status": st,
    })
}

fn endpoints(e: &Endpoints) -> Value {
    let spec = e.spec.clone().unwrap_or_default();
    let status = e.status.clone().unwrap_or_default();
    let mut sp = Map::new();
    sp.insert("selector".into(), string_map(&spec.selector));
    put_str(&mut sp, "primary_cluster", &spec.primary_cluster);
    sp.insert(
        "clusters".into(),
        spec.clusters
            .iter()
            .map(|c| json!({"cluster": c.cluster, "num_endpoints": c.num_endpoints, "exposed": c.exposed}))
            .collect(),
    );
    if let Some(e) = &spec.every_cluster {
        sp.insert(
            "every_cluster".into(),
            json!({"num_endpoints": e.num_endpoints, "exposed": e.exposed}),
        );
    }
    let clusters: Vec<Value> = status
        .clusters
        .iter()
        .map(|c| {
            let addresses: Vec<Value> = c
                .addresses
                .iter()
                .map(|a| {
                    json!({
                        "ip": a.ip,
                        "ports": a.ports.iter().map(job_port).collect::<Vec<_>>(),
                        "job": a.job,
                        "ready": a.ready,
                    })
                })
                .collect();
            json!({"cluster": c.cluster, "exposed": c.exposed, "addresses": addresses})
        })
        .collect();
    json!({
        "kind": "Endpoints",
        "metadata": metadata(e.metadata.as_ref()),
        "spec": sp,
        "status": {"clusters": clusters},
    })
}

fn peer(p: &PeerHealth) -> Value {
    json!({
        "peer": p.peer,
        "up": p.up,
        "last_handshake": time(p.last_handshake),
        "rtt_us": p.rtt_us,
        "rx_bytes": p.rx_bytes,
        "tx_bytes": p.tx_bytes,
    })
}

fn cluster(c: &Cluster) -> Value {
    let spec = c.spec.clone().unwrap_or_default();
    let status = c.status.clone().unwrap_or_default();
    let mut st = Map::new();
    st.insert("phase".into(), json!(phase_name(status.phase())));
    put_str(&mut st, "overlay_ip", &status.overlay_ip);
    put_str(&mut st, "endpoint", &status.endpoint);
    put_str(&mut st, "public_key", &status.public_key);
    st.insert("last_seen".into(), time(status.last_seen));
    st.insert("peers".into(), status.peers.iter().map(peer).collect());
    json!({
        "kind": "Cluster",
        "metadata": metadata(c.metadata.as_ref()),
        "spec": {"workload_cidrs": spec.workload_cidrs},
        "status": st,
    })
}

fn job(j: &Job) -> Value {
    let spec = j.spec.clone().unwrap_or_default();
    let mut sp = Map::new();
    sp.insert("cluster".into(), json!(spec.cluster));
    sp.insert("ip".into(), json!(spec.ip));
    sp.insert(
        "ports".into(),
        spec.ports.iter().map(job_port).collect::<Vec<_>>().into(),
    );
    // As `--probe` reads it, so the document is `apply -f` input.
    if let Some(p) = spec
        .probe
        .as_ref()
        .filter(|p| p.r#type() != ProbeType::Unspecified)
    {
        sp.insert("probe".into(), json!(validate::probe_text(Some(p))));
    }
    json!({
        "kind": "Job",
        "metadata": metadata(j.metadata.as_ref()),
        "spec": sp,
        "status": {"ready": j.status.as_ref().is_some_and(|s| s.ready)},
    })
}

/// One object as a document.
pub(crate) fn object(obj: &Object) -> Value {
    match obj.obj.as_ref() {
        None => Value::Null,
        Some(Obj::Namespace(n)) => {
            json!({"kind": "Namespace", "metadata": metadata(n.metadata.as_ref())})
        }
        Some(Obj::Cluster(c)) => cluster(c),
        Some(Obj::Job(j)) => job(j),
        Some(Obj::Service(s)) => service(s),
        Some(Obj::Endpoints(e)) => endpoints(e),
    }
}

/// A cluster's tunnels as documents (one per peer, sorted by peer).
pub(crate) fn tunnels(obj: &Object) -> Vec<Value> {
    let Some(Obj::Cluster(c)) = obj.obj.as_ref() else {
        return Vec::new();
    };
    let mut peers: Vec<&PeerHealth> = c.status.iter().flat_map(|s| s.peers.iter()).collect();
    peers.sort_by(|a, b| a.peer.cmp(&b.peer));
    peers
        .into_iter()
        .map(|p| {
            let mut v = peer(p);
            if let Value::Object(m) = &mut v {
                m.insert("cluster".into(), json!(obj.name()));
                m.insert(
                    "status".into(),
                    json!(crate::output::columns::tunnel_status(c, p)),
                );
            }
            v
        })
        .collect()
}

/// A list document.
pub(crate) fn list(items: Vec<Value>) -> Value {
    json!({ "items": items })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::columns::tests::{NOW, east_cluster, endpoints_obj, web_service};

    #[test]
    fn service_document() {
        let v = object(&web_service().into());
        assert_eq!(v["kind"], "Service");
        assert_eq!(v["metadata"]["name"], "myservice");
        assert_eq!(v["metadata"]["namespace"], "default");
        assert_eq!(v["metadata"]["resource_version"], 7);
        assert_eq!(
            v["metadata"]["creation_timestamp"],
            human::rfc3339(NOW - 45)
        );
        assert_eq!(v["spec"]["type"], "ClusterIP");
        assert_eq!(v["spec"]["selector"]["app"], "myApp");
        assert_eq!(
            v["spec"]["ports"][0],
            json!({"port": 80, "target_port": 8080, "protocol": "TCP"})
        );
        assert_eq!(
            v["spec"]["ports"][1],
            json!({"name": "dns", "port": 53, "target_port": 53, "protocol": "UDP"})
        );
        assert_eq!(v["spec"]["clusters"], json!(["mycluster"]));
        assert_eq!(v["spec"]["session_affinity"], "None");
        assert_eq!(v["spec"]["affinity_timeout_s"], 10_800);
        assert_eq!(v["spec"]["traffic_policy"], "Spread");
        assert!(v["spec"].get("external_name").is_none());
        assert_eq!(v["status"]["cluster_ip"], "100.65.0.1");
    }

    #[test]
    fn cluster_and_endpoints_documents() {
        let v = object(&east_cluster().into());
        assert_eq!(v["kind"], "Cluster");
        assert!(v["metadata"].get("namespace").is_none());
        assert_eq!(v["status"]["phase"], "Ready");
        assert_eq!(v["status"]["peers"][1]["last_handshake"], Value::Null);
        assert_eq!(v["spec"]["workload_cidrs"][1], "10.11.0.0/16");

        let v = object(&endpoints_obj().into());
        assert_eq!(v["kind"], "Endpoints");
        assert_eq!(v["spec"]["primary_cluster"], "east");
        assert_eq!(v["status"]["clusters"][0]["addresses"][2]["ready"], false);
        assert_eq!(
            v["status"]["clusters"][0]["addresses"][0]["ports"][0]["protocol"],
            "TCP"
        );
    }

    #[test]
    fn lists_and_tunnels() {
        let items = tunnels(&east_cluster().into());
        assert_eq!(items.len(), 2);
        assert_eq!(items[0]["cluster"], "east");
        assert_eq!(items[0]["peer"], "south");
        let l = list(items);
        assert_eq!(l["items"].as_array().map(Vec::len), Some(2));
        let y = yaml_serde::to_string(&l).unwrap();
        assert!(y.starts_with("items:\n"), "{y}");
    }
}
