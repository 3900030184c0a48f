//! `skyctl describe KIND NAME`: one object in detail, kubectl-style
//! `Key: value` lines. A service shows its spec, VIP, its endpoints per
//! cluster with readiness, and the jobs its selector picks (cluster, IP,
//! health); endpoints their addresses per cluster; a cluster its status,
//! tunnels and jobs; a job its spec, readiness and the services that
//! select it. Reads only.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use anyhow::Result;
use skymesh_proto::v1::object::Obj;
use skymesh_proto::v1::{Cluster, Endpoints, Job, Kind, Object, Service};
use skymesh_proto::validate;

use crate::apply::{fetch, selector_text, selects};
use crate::client::Ctx;
use crate::error;
use crate::get::{self, Scope};
use crate::output::{self, columns, human};

fn scope(kind: Kind, namespace: &str) -> Scope {
    Scope {
        kind,
        namespace: if kind.namespaced() {
            namespace.to_string()
        } else {
            String::new()
        },
        all_namespaces: false,
        name: None,
    }
}

async fn list(ctx: &mut Ctx, kind: Kind, namespace: &str) -> Result<Vec<Object>> {
    let (objs, _) = get::list(ctx, &scope(kind, namespace))
        .await
        .map_err(|s| ctx.status(&s))?;
    Ok(objs)
}

fn map_text(m: &HashMap<String, String>) -> String {
    if m.is_empty() {
        "<none>".to_string()
    } else {
        selector_text(m)
    }
}

fn meta_lines(out: &mut String, obj: &Object, now: i64) {
    let m = obj.meta().cloned().unwrap_or_default();
    let _ = writeln!(out, "Name:              {}", m.name);
    if obj.kind().namespaced() {
        let _ = writeln!(out, "Namespace:         {}", m.namespace);
    }
    let _ = writeln!(out, "Labels:            {}", map_text(&m.labels));
    let _ = writeln!(out, "Annotations:       {}", map_text(&m.annotations));
    if m.creation_timestamp > 0 {
        let _ = writeln!(
            out,
            "Created:           {} ({} ago)",
            human::rfc3339(m.creation_timestamp),
            human::duration(now - m.creation_timestamp)
        );
    }
    let _ = writeln!(out, "Resource version:  {}", m.resource_version);
}

fn endpoint_lines(out: &mut String, ep: Option<&Endpoints>) {
    let _ = writeln!(out, "Endpoints:");
    let clusters = ep
        .and_then(|e| e.status.as_ref())
        .map(|s| s.clusters.clone())
        .unwrap_or_default();
    if clusters.is_empty() {
        let _ = writeln!(out, "  <none>");
        return;
    }
    for c in &clusters {
        let ready = c.addresses.iter().filter(|a| a.ready).count();
        let _ = writeln!(
            out,
            "  {}: {} ready of {}{}",
            c.cluster,
            ready,
            c.addresses.len(),
            if c.exposed { "" } else { " (not exposed)" }
        );
        for a in &c.addresses {
            let _ = writeln!(
                out,
                "    {:<16} {:<20} {:<10} {}",
                a.ip,
                a.job,
                if a.ready { "ready" } else { "not-ready" },
                columns::job_ports(&a.ports)
            );
        }
    }
}

fn job_lines(out: &mut String, jobs: &[&Job]) {
    let _ = writeln!(out, "Jobs:");
    if jobs.is_empty() {
        let _ = writeln!(out, "  <none>");
        return;
    }
    let _ = writeln!(
        out,
        "  {:<20} {:<12} {:<16} {:<10} PORTS",
        "NAME", "CLUSTER", "IP", "HEALTH"
    );
    for j in jobs {
        let spec = j.spec.clone().unwrap_or_default();
        let _ = writeln!(
            out,
            "  {:<20} {:<12} {:<16} {:<10} {}",
            j.metadata.as_ref().map_or("", |m| m.name.as_str()),
            spec.cluster,
            spec.ip,
            if j.status.as_ref().is_some_and(|s| s.ready) {
                "ready"
            } else {
                "not-ready"
            },
            columns::job_ports(&spec.ports)
        );
    }
}

async fn service(ctx: &mut Ctx, obj: &Object, s: &Service, now: i64) -> Result<String> {
    let spec = s.spec.clone().unwrap_or_default();
    let status = s.status.clone().unwrap_or_default();
    let mut out = String::new();
    meta_lines(&mut out, obj, now);
    let _ = writeln!(
        out,
        "Type:              {}",
        validate::service_type_name(spec.r#type())
    );
    let _ = writeln!(out, "Selector:          {}", map_text(&spec.selector));
    let _ = writeln!(
        out,
        "VIP:               {}",
        if status.cluster_ip.is_empty() {
            "<none>"
        } else {
            &status.cluster_ip
        }
    );
    if !status.external_ips.is_empty() {
        let _ = writeln!(out, "External IPs:      {}", status.external_ips.join(","));
    }
    if !spec.external_name.is_empty() {
        let _ = writeln!(out, "External name:     {}", spec.external_name);
    }
    for (what, l, none) in [
        ("Upstreams:         ", &spec.upstreams, "<any>"),
        ("Whitelists:        ", &spec.whitelists, "<anyone>"),
    ] {
        let _ = writeln!(
            out,
            "{what}{}",
            if l.is_empty() {
                none.to_string()
            } else {
                format!("{} (enforced on VIP and job-IP calls)", l.join(", "))
            }
        );
    }
    let _ = writeln!(
        out,
        "Clusters:          {}",
        if spec.clusters.is_empty() {
            "<every cluster>".to_string()
        } else {
            spec.clusters.join(",")
        }
    );
    let _ = writeln!(
        out,
        "Session affinity:  {}{}",
        validate::session_affinity_name(spec.session_affinity()),
        if spec.session_affinity() == skymesh_proto::v1::SessionAffinity::ClientIp {
            format!(" ({} s)", spec.affinity_timeout_s)
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        out,
        "Traffic policy:    {}",
        validate::traffic_policy_name(spec.traffic_policy())
    );
    let _ = writeln!(out, "Ports:");
    for p in &spec.ports {
        let _ = writeln!(
            out,
            "  {:<12} {}/{} -> {}",
            if p.name.is_empty() {
                "<unnamed>"
            } else {
                &p.name
            },
            p.port,
            validate::protocol_name(p.protocol()),
            p.effective_target_port()
        );
    }
    let ep = fetch(ctx, Kind::Endpoints, obj.namespace(), obj.name())
        .await
        .map_err(|s| ctx.status(&s))?;
    let ep = match ep.and_then(|o| o.obj) {
        Some(Obj::Endpoints(e)) => Some(e),
        _ => None,
    };
    endpoint_lines(&mut out, ep.as_ref());
    if !spec.selector.is_empty() {
        let jobs = list(ctx, Kind::Job, obj.namespace()).await?;
        let picked: Vec<&Job> = jobs
            .iter()
            .filter(|j| selects(&spec.selector, j))
            .filter_map(|j| match j.obj.as_ref() {
                Some(Obj::Job(j)) => Some(j),
                _ => None,
            })
            .collect();
        job_lines(&mut out, &picked);
    }
    Ok(out)
}

fn endpoints(obj: &Object, e: &Endpoints, now: i64) -> String {
    let spec = e.spec.clone().unwrap_or_default();
    let mut out = String::new();
    meta_lines(&mut out, obj, now);
    let _ = writeln!(out, "Selector:          {}", map_text(&spec.selector));
    if !spec.primary_cluster.is_empty() {
        let _ = writeln!(out, "Primary cluster:   {}", spec.primary_cluster);
    }
    for c in &spec.clusters {
        let _ = writeln!(
            out,
            "Cluster {}:       at most {} endpoints, {}",
            c.cluster,
            if c.num_endpoints == 0 {
                "any".to_string()
            } else {
                c.num_endpoints.to_string()
            },
            if c.exposed { "exposed" } else { "local only" }
        );
    }
    if let Some(c) = &spec.every_cluster {
        let _ = writeln!(
            out,
            "Every cluster:     at most {} endpoints each, {}",
            if c.num_endpoints == 0 {
                "any".to_string()
            } else {
                c.num_endpoints.to_string()
            },
            if c.exposed { "exposed" } else { "local only" }
        );
    }
    endpoint_lines(&mut out, Some(e));
    out
}

async fn cluster(ctx: &mut Ctx, obj: &Object, c: &Cluster, now: i64) -> Result<String> {
    let spec = c.spec.clone().unwrap_or_default();
    let st = c.status.clone().unwrap_or_default();
    let mut out = String::new();
    meta_lines(&mut out, obj, now);
    let _ = writeln!(
        out,
        "Status:            {}",
        columns::phase_name(st.phase())
    );
    let _ = writeln!(out, "Workload CIDRs:    {}", spec.workload_cidrs.join(","));
    let or_none = |s: &str| {
        if s.is_empty() {
            "<none>".to_string()
        } else {
            s.to_string()
        }
    };
    let _ = writeln!(out, "Overlay IP:        {}", or_none(&st.overlay_ip));
    let _ = writeln!(out, "Endpoint:          {}", or_none(&st.endpoint));
    let _ = writeln!(out, "Public key:        {}", or_none(&st.public_key));
    if st.last_seen > 0 {
        let _ = writeln!(
            out,
            "Last seen:         {} ago",
            human::duration(now - st.last_seen)
        );
    }
    let _ = writeln!(out, "Tunnels:");
    if st.peers.is_empty() {
        let _ = writeln!(out, "  <none>");
    }
    let mut peers = st.peers.clone();
    peers.sort_by(|a, b| a.peer.cmp(&b.peer));
    for p in &peers {
        let _ = writeln!(
            out,
            "  {:<12} {:<5} rtt {} µs, rx {} B, tx {} B",
            p.peer,
            columns::tunnel_status(c, p),
            p.rtt_us,
            p.rx_bytes,
            p.tx_bytes
        );
    }
    let all = Scope {
        kind: Kind::Job,
        namespace: String::new(),
        all_namespaces: true,
        name: None,
    };
    let (jobs, _) = get::list(ctx, &all).await.map_err(|s| ctx.status(&s))?;
    let name = obj.name();
    let here: Vec<&Job> = jobs
        .iter()
        .filter_map(|j| match j.obj.as_ref() {
            Some(Obj::Job(j)) if j.spec.as_ref().is_some_and(|s| s.cluster == name) => Some(j),
            _ => None,
        })
        .collect();
    job_lines(&mut out, &here);
    Ok(out)
}

async fn job(ctx: &mut Ctx, obj: &Object, j: &Job, now: i64) -> Result<String> {
    let spec = j.spec.clone().unwrap_or_default();
    let mut out = String::new();
    meta_lines(&mut out, obj, now);
    let _ = writeln!(out, "Cluster:           {}", spec.cluster);
    let _ = writeln!(out, "IP:                {}", spec.ip);
    let _ = writeln!(
        out,
        "Ports:             {}",
        columns::job_ports(&spec.ports)
    );
    let _ = writeln!(
        out,
        "Probe:             {}",
        validate::probe_text(spec.probe.as_ref())
    );
    let _ = writeln!(
        out,
        "Health:            {}",
        if j.status.as_ref().is_some_and(|s| s.ready) {
            "ready"
        } else {
            "not-ready"
        }
    );
    let services = list(ctx, Kind::Service, obj.namespace()).await?;
    let mut names: BTreeMap<String, String> = BTreeMap::new();
    for s in &services {
        if let Some(Obj::Service(svc)) = s.obj.as_ref() {
            let sel = svc
                .spec
                .as_ref()
                .map(|sp| sp.selector.clone())
                .unwrap_or_default();
            if !sel.is_empty() && selects(&sel, obj) {
                names.insert(s.name().to_string(), selector_text(&sel));
            }
        }
    }
    let _ = writeln!(out, "Services:");
    if names.is_empty() {
        let _ = writeln!(out, "  <none>");
    }
    for (n, sel) in names {
        let _ = writeln!(out, "  {n} ({sel})");
    }
    Ok(out)
}

/// Runs `skyctl describe KIND NAME`.
pub(crate) async fn run(ctx: &mut Ctx, kind: Kind, namespace: &str, name: &str) -> Result<()> {
    let ns = if kind.namespaced() { namespace } else { "" };
    let obj = fetch(ctx, kind, ns, name)
        .await
        .map_err(|s| ctx.status(&s))?
        .ok_or_else(|| error::not_found(kind, ns, name))?;
    let now = output::now();
    let text = match obj.obj.clone() {
        Some(Obj::Service(s)) => service(ctx, &obj, &s, now).await?,
        Some(Obj::Endpoints(e)) => endpoints(&obj, &e, now),
        Some(Obj::Cluster(c)) => cluster(ctx, &obj, &c, now).await?,
        Some(Obj::Job(j)) => job(ctx, &obj, &j, now).await?,
        Some(Obj::Namespace(_)) | None => {
            let mut out = String::new();
            meta_lines(&mut out, &obj, now);
            out
        }
    };
    let mut events = crate::events::of_object(ctx, kind, ns, name).await?;
    // A service's endpoints changes are its own story.
    if kind == Kind::Service {
        events.extend(crate::events::of_object(ctx, Kind::Endpoints, ns, name).await?);
        events.sort_by_key(|e| (e.timestamp, e.resource_version));
    }
    output::emit(&format!(
        "{text}{}",
        crate::events::describe_lines(&events, now)
    ))?;
    Ok(())
}
