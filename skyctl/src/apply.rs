//! `skyctl apply -f`, `create -f` and `delete -f`: every document of the
//! files is read and validated first ([`plan`]: one bad document and
//! nothing is sent, exit 2); then each object is written in file order
//! (deleted in reverse order, so a namespace goes after what it holds).
//!
//! `apply` creates what does not exist and updates what does, through the
//! coordinator's `Update` with optimistic concurrency: a document that
//! carries a `resource_version` must carry the current one (else a
//! conflict naming the object, nothing written); without one, apply reads,
//! compares and writes, retrying when it loses a race. An object whose
//! user-written part would not change is `unchanged` and not written.
//! The coordinator keeps status (a service's VIP) across updates.
//!
//! Kubernetes `targetPort`s given by name are resolved here against the
//! jobs the service's selector picks (all must agree on the number).

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

use anyhow::Result;
use skymesh_proto::v1::object::Obj;
use skymesh_proto::v1::{
    CreateRequest, DeleteRequest, GetRequest, Kind, Object, Service, UpdateRequest,
};
use skymesh_proto::validate;
use tonic::{Code, Status};

use crate::client::Ctx;
use crate::error::Exit;
use crate::get::{self, Scope};
use crate::manifest::{self, Manifest};
use crate::output;

/// System annotations the coordinator keeps across updates.
const SYSTEM_ANNOTATIONS: &[&str] = &["skymesh.io/managed-by", "skymesh.io/registered-by"];
/// How often apply re-reads and retries an update that lost a race.
const APPLY_ATTEMPTS: usize = 5;

/// What to do with the objects of the files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verb {
    Apply,
    Create,
    Delete,
}

/// Reads and validates every document of `files` (nothing is sent).
pub(crate) fn plan(namespace: &str, files: &[PathBuf]) -> Result<Vec<Manifest>, Exit> {
    let docs = manifest::read_sources(files)?;
    let manifests = docs
        .iter()
        .map(|d| manifest::parse(d, namespace))
        .collect::<Result<Vec<_>, _>>()?;
    let mut seen = BTreeSet::new();
    for m in &manifests {
        let key = (
            m.object.kind() as i32,
            m.object.namespace().to_string(),
            m.object.name().to_string(),
        );
        if !seen.insert(key) {
            return Err(Exit::usage(format!(
                "{}: {} is given twice in the input",
                m.origin,
                m.what()
            )));
        }
    }
    Ok(manifests)
}

/// The part of an object its user writes: no status, no system metadata.
pub(crate) fn user_part(obj: &Object) -> Object {
    let mut o = obj.clone();
    if let Some(m) = o.meta_mut() {
        m.uid.clear();
        m.creation_timestamp = 0;
        m.resource_version = 0;
        for k in SYSTEM_ANNOTATIONS {
            m.annotations.remove(*k);
        }
    }
    match o.obj.as_mut() {
        Some(Obj::Cluster(c)) => c.status = None,
        Some(Obj::Job(j)) => j.status = None,
        Some(Obj::Service(s)) => s.status = None,
        Some(Obj::Endpoints(e)) => e.status = None,
        Some(Obj::Namespace(_)) | None => {}
    }
    o
}

fn scope_of(obj: &Object) -> Scope {
    Scope {
        kind: obj.kind(),
        namespace: obj.namespace().to_string(),
        all_namespaces: false,
        name: None,
    }
}

/// Reads an object; `None` when it does not exist.
pub(crate) async fn fetch(
    ctx: &mut Ctx,
    kind: Kind,
    namespace: &str,
    name: &str,
) -> Result<Option<Object>, Status> {
    match ctx
        .api
        .get(GetRequest {
            kind: kind as i32,
            namespace: namespace.to_string(),
            name: name.to_string(),
        })
        .await
    {
        Ok(r) => Ok(Some(r.into_inner())),
        Err(s) if s.code() == Code::NotFound => Ok(None),
        Err(s) => Err(s),
    }
}

/// Runs the verb over manifests from [`plan`].
pub(crate) async fn run(ctx: &mut Ctx, verb: Verb, mut manifests: Vec<Manifest>) -> Result<()> {
    if verb != Verb::Delete {
        resolve_named_targets(ctx, &mut manifests).await?;
    } else {
        manifests.reverse();
    }
    let mut failure: Option<Exit> = None;
    for m in manifests {
        let result = match verb {
            Verb::Apply => apply_one(ctx, &m).await,
            Verb::Create => create_one(ctx, &m).await,
            Verb::Delete => delete_one(ctx, &m).await,
        };
        match result {
            Ok(line) => output::emit(&line)?,
            Err((e, fatal)) => {
                if fatal {
                    return Err(e.into());
                }
                if let Some(prev) = failure.replace(e) {
                    eprintln!("error: {prev}");
                }
            }
        }
    }
    match failure {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

/// An error for one object, and whether the others would fail alike (no
/// coordinator, no token).
type OneResult = Result<String, (Exit, bool)>;

fn fail(ctx: &Ctx, m: &Manifest, s: &Status) -> (Exit, bool) {
    let fatal = matches!(s.code(), Code::Unauthenticated | Code::Unavailable);
    let e = get::status_error(ctx, &scope_of(&m.object), m.object.name(), s);
    if fatal {
        (e, true)
    } else {
        (Exit::refused(format!("{}: {e}", m.origin)), false)
    }
}

async fn create_one(ctx: &mut Ctx, m: &Manifest) -> OneResult {
    let resp = ctx
        .api
        .create(CreateRequest {
            object: Some(m.object.clone()),
        })
        .await
        .map_err(|s| fail(ctx, m, &s))?
        .into_inner();
    let mut line = format!("{} created", m.what());
    // A new cluster's join token is shown once, as `create cluster` does.
    if !resp.join_token.is_empty() {
        line.push('\n');
        line.push_str(&crate::create::join_instructions(
            &ctx.url,
            m.object.name(),
            &resp.join_token,
            resp.join_token_expires,
        ));
    }
    Ok(line)
}

async fn delete_one(ctx: &mut Ctx, m: &Manifest) -> OneResult {
    let o = &m.object;
    ctx.api
        .delete(DeleteRequest {
            kind: o.kind() as i32,
            namespace: o.namespace().to_string(),
            name: o.name().to_string(),
            cascade: false,
        })
        .await
        .map_err(|s| fail(ctx, m, &s))?;
    Ok(format!("{} deleted", m.what()))
}

async fn apply_one(ctx: &mut Ctx, m: &Manifest) -> OneResult {
    let o = &m.object;
    let given = o.resource_version();
    for _ in 0..APPLY_ATTEMPTS {
        let cur = fetch(ctx, o.kind(), o.namespace(), o.name())
            .await
            .map_err(|s| fail(ctx, m, &s))?;
        let Some(cur) = cur else {
            return create_one(ctx, m).await;
        };
        if given != 0 && given != cur.resource_version() {
            return Err((
                Exit::refused(format!(
                    "{}: conflict: {} was modified (resource version {}, the document has {given}); get it again, or drop resource_version to apply over the current state",
                    m.origin,
                    m.what(),
                    cur.resource_version()
                )),
                false,
            ));
        }
        if user_part(&cur) == user_part(o) {
            return Ok(format!("{} unchanged", m.what()));
        }
        let mut next = o.clone();
        if let Some(meta) = next.meta_mut() {
            meta.resource_version = cur.resource_version();
        }
        match ctx.api.update(UpdateRequest { object: Some(next) }).await {
            Ok(_) => return Ok(format!("{} configured", m.what())),
            // Someone wrote in between: read again (only when the document
            // did not pin a version).
            Err(s) if s.code() == Code::Aborted && given == 0 => continue,
            Err(s) => return Err(fail(ctx, m, &s)),
        }
    }
    Err((
        Exit::refused(format!(
            "{}: {} kept changing while it was applied ({APPLY_ATTEMPTS} attempts); try again",
            m.origin,
            m.what()
        )),
        false,
    ))
}

/// Resolves every Kubernetes `targetPort` given by name: the jobs that the
/// service's selector picks (in its namespace, every cluster) must all
/// have a port of that name and protocol, with one number.
async fn resolve_named_targets(ctx: &mut Ctx, manifests: &mut [Manifest]) -> Result<(), Exit> {
    let mut jobs_by_ns: HashMap<String, Vec<Object>> = HashMap::new();
    for m in manifests.iter_mut() {
        if m.named_targets.is_empty() {
            continue;
        }
        let ns = m.object.namespace().to_string();
        if !jobs_by_ns.contains_key(&ns) {
            let scope = Scope {
                kind: Kind::Job,
                namespace: ns.clone(),
                all_namespaces: false,
                name: None,
            };
            let (jobs, _) = get::list(ctx, &scope).await.map_err(|s| ctx.status(&s))?;
            jobs_by_ns.insert(ns.clone(), jobs);
        }
        let jobs = jobs_by_ns.get(&ns).map(Vec::as_slice).unwrap_or_default();
        let Some(Obj::Service(s)) = m.object.obj.as_mut() else {
            continue;
        };
        for t in m.named_targets.clone() {
            let port = resolve(s, &t, jobs).map_err(|rule| {
                Exit::usage(format!("{}: invalid {}: {rule}", m.origin, t.field))
            })?;
            if let Some(p) = s.spec.as_mut().and_then(|sp| sp.ports.get_mut(t.index)) {
                p.target_port = port;
            }
        }
    }
    Ok(())
}

/// Whether a job's labels satisfy a selector.
pub(crate) fn selects(selector: &HashMap<String, String>, job: &Object) -> bool {
    let labels = job.meta().map(|m| &m.labels);
    selector
        .iter()
        .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
}

/// A selector as `k=v,k2=v2`, sorted.
pub(crate) fn selector_text(selector: &HashMap<String, String>) -> String {
    let mut terms: Vec<String> = selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
    terms.sort();
    terms.join(",")
}

fn resolve(s: &Service, t: &manifest::NamedTarget, jobs: &[Object]) -> Result<u32, String> {
    let selector = s
        .spec
        .as_ref()
        .map(|sp| sp.selector.clone())
        .unwrap_or_default();
    let proto = validate::protocol_name(t.protocol);
    if selector.is_empty() {
        return Err(format!(
            "targetPort {:?} names a job port, which needs a selector to find the jobs; give the number",
            t.name
        ));
    }
    let mut found: Vec<(u32, String)> = Vec::new();
    for j in jobs.iter().filter(|j| selects(&selector, j)) {
        let Some(Obj::Job(job)) = j.obj.as_ref() else {
            continue;
        };
        if let Some(p) = job
            .spec
            .iter()
            .flat_map(|sp| sp.ports.iter())
            .find(|p| p.name == t.name && p.protocol() == t.protocol)
        {
            found.push((p.port, j.name().to_string()));
        }
    }
    let numbers: BTreeSet<u32> = found.iter().map(|(p, _)| *p).collect();
    let sel = selector_text(&selector);
    match numbers.len() {
        0 => Err(format!(
            "no job matching the selector {sel} has a {proto} port named {:?} (register the jobs first, or give targetPort as a number)",
            t.name
        )),
        1 => Ok(numbers.into_iter().next().unwrap_or(0)),
        _ => {
            let list: Vec<String> = found.iter().map(|(p, j)| format!("{j}={p}")).collect();
            Err(format!(
                "the jobs' {proto} ports named {:?} differ ({}); skymesh maps a service port to one target number: give it",
                t.name,
                list.join(", ")
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skymesh_proto::v1::{
        Job, JobPort, JobSpec, ObjectMeta, Protocol, ServicePort, ServiceSpec,
    };

    fn job(name: &str, app: &str, port: u32) -> Object {
        Job {
            metadata: Some(ObjectMeta {
                name: name.into(),
                namespace: "default".into(),
                labels: [("app".to_string(), app.to_string())].into(),
                ..Default::default()
            }),
            spec: Some(JobSpec {
                cluster: "c1".into(),
                ip: "10.1.0.1".into(),
                ports: vec![JobPort {
                    name: "http".into(),
                    port,
                    protocol: Protocol::Tcp as i32,
                }],
                probe: None,
            }),
            status: None,
        }
        .into()
    }

    fn svc() -> Service {
        Service {
            metadata: None,
            spec: Some(ServiceSpec {
                selector: [("app".to_string(), "web".to_string())].into(),
                ports: vec![ServicePort {
                    port: 80,
                    ..Default::default()
                }],
                ..Default::default()
            }),
            status: None,
        }
    }

    fn target() -> manifest::NamedTarget {
        manifest::NamedTarget {
            index: 0,
            field: "spec.ports[0].targetPort".into(),
            name: "http".into(),
            protocol: Protocol::Tcp,
        }
    }

    #[test]
    fn named_target_ports_resolve_against_the_selected_jobs() {
        let jobs = [
            job("a", "web", 8080),
            job("b", "web", 8080),
            job("c", "db", 5432),
        ];
        assert_eq!(resolve(&svc(), &target(), &jobs), Ok(8080));
        let e = resolve(&svc(), &target(), &jobs[2..]).unwrap_err();
        assert!(e.contains("no job matching the selector app=web"), "{e}");
        let jobs = [job("a", "web", 8080), job("b", "web", 9090)];
        let e = resolve(&svc(), &target(), &jobs).unwrap_err();
        assert!(e.contains("a=8080, b=9090"), "{e}");
    }

    #[test]
    fn user_part_drops_status_and_system_fields() {
        let mut a = job("a", "web", 1);
        let mut b = a.clone();
        if let Some(Obj::Job(j)) = b.obj.as_mut() {
            j.status = Some(Default::default());
            let m = j.metadata.as_mut().unwrap();
            m.resource_version = 9;
            m.uid = "u".into();
            m.annotations
                .insert("skymesh.io/registered-by".into(), "c1".into());
        }
        assert_eq!(user_part(&a), user_part(&b));
        if let Some(Obj::Job(j)) = a.obj.as_mut() {
            j.metadata.as_mut().unwrap().labels.clear();
        }
        assert_ne!(user_part(&a), user_part(&b));
    }
}
