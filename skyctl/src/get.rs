//! `skyctl get KIND [NAME]` and `skyctl get tunnels`: one `Get` or `List`,
//! printed as a table or a document; with `--watch`, hands over to
//! [`crate::watch`]. Also owns [`Scope`] and [`list`], which the watch
//! reuses to (re)list.

use anyhow::Result;
use skymesh_proto::v1::{GetRequest, Kind, ListRequest, Object};
use skymesh_proto::validate;
use tonic::{Code, Status};

use crate::cli::{GetArgs, OutputFormat, Target};
use crate::client::Ctx;
use crate::error::{self, Exit};
use crate::output::{self, Printer, View, columns};
use crate::watch;

/// Which objects a get (or watch) covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Scope {
    pub(crate) kind: Kind,
    /// Empty for global kinds.
    pub(crate) namespace: String,
    pub(crate) all_namespaces: bool,
    /// One object only.
    pub(crate) name: Option<String>,
}

impl Scope {
    /// Whether `obj` is inside this scope.
    pub(crate) fn contains(&self, obj: &Object) -> bool {
        if obj.kind() != self.kind {
            return false;
        }
        if self.kind.namespaced() && !self.all_namespaces && obj.namespace() != self.namespace {
            return false;
        }
        self.name.as_deref().is_none_or(|n| obj.name() == n)
    }

    /// The error for an object of this scope that does not exist.
    pub(crate) fn not_found(&self, name: &str) -> Exit {
        error::not_found(self.kind, &self.namespace, name)
    }
}

/// Maps a status of a request about `name` to an [`Exit`].
pub(crate) fn status_error(ctx: &Ctx, scope: &Scope, name: &str, s: &Status) -> Exit {
    if s.code() == Code::NotFound && !name.is_empty() {
        scope.not_found(name)
    } else {
        ctx.status(s)
    }
}

/// Lists the objects of `scope`, sorted by namespace and name, with the
/// store revision they were read at.
pub(crate) async fn list(ctx: &mut Ctx, scope: &Scope) -> Result<(Vec<Object>, u64), Status> {
    let resp = ctx
        .api
        .list(ListRequest {
            kind: scope.kind as i32,
            namespace: scope.namespace.clone(),
            all_namespaces: scope.all_namespaces,
        })
        .await?
        .into_inner();
    let mut objects: Vec<Object> = resp
        .objects
        .into_iter()
        .filter(|o| scope.contains(o))
        .collect();
    objects.sort_by(|a, b| (a.namespace(), a.name()).cmp(&(b.namespace(), b.name())));
    Ok((objects, resp.resource_version))
}

/// The scope and view of a `get`, from its arguments and the validated
/// `--namespace`.
pub(crate) fn scope_of(namespace: &str, args: &GetArgs) -> Result<(Scope, View), Exit> {
    let (kind, view) = match args.target {
        Target::Kind(k) => (k, View::Objects(k)),
        Target::Tunnels => (Kind::Cluster, View::Tunnels),
        Target::Events => {
            return Err(Exit::usage(
                "events are listed by crate::events, not as objects",
            ));
        }
    };
    let name = args
        .name
        .as_deref()
        .map(|n| validate::name("NAME", n))
        .transpose()?;
    if name.is_some() && args.all_namespaces {
        return Err(Exit::usage(
            "an object cannot be named across all namespaces: drop -A/--all-namespaces or the NAME",
        ));
    }
    let scope = Scope {
        kind,
        namespace: if kind.namespaced() {
            namespace.to_string()
        } else {
            String::new()
        },
        all_namespaces: args.all_namespaces && kind.namespaced(),
        name,
    };
    Ok((scope, view))
}

/// kubectl's message for an empty list.
fn nothing_found(scope: &Scope, view: View) -> String {
    match view {
        View::Tunnels => "No tunnels found.".to_string(),
        View::Objects(_) if scope.kind.namespaced() && !scope.all_namespaces => {
            format!("No resources found in {} namespace.", scope.namespace)
        }
        View::Objects(_) => "No resources found.".to_string(),
    }
}

/// Runs `skyctl get ...` for a scope from [`scope_of`].
pub(crate) async fn run(ctx: &mut Ctx, scope: Scope, view: View, watch: bool) -> Result<()> {
    if watch {
        return watch::run(ctx, scope, view).await;
    }
    let mut printer = Printer::new(view, ctx.output, false);
    if let Some(name) = scope.name.clone() {
        let obj = ctx
            .api
            .get(GetRequest {
                kind: scope.kind as i32,
                namespace: scope.namespace.clone(),
                name: name.clone(),
            })
            .await
            .map_err(|s| status_error(ctx, &scope, &name, &s))?
            .into_inner();
        output::emit(&printer.one(&obj)?)?;
        return Ok(());
    }
    let (objects, _) = list(ctx, &scope).await.map_err(|s| ctx.status(&s))?;
    let table = matches!(ctx.output, OutputFormat::Table | OutputFormat::Wide);
    if table
        && objects
            .iter()
            .all(|o| columns::rows(view, o, false, 0).is_empty())
    {
        eprintln!("{}", nothing_found(&scope, view));
        return Ok(());
    }
    output::emit(&printer.list(&objects)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use skymesh_proto::v1::{Namespace, ObjectMeta, Service};

    fn svc(ns: &str, name: &str) -> Object {
        Service {
            metadata: Some(ObjectMeta {
                name: name.into(),
                namespace: ns.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
        .into()
    }

    #[test]
    fn scope_filters() {
        let mut s = Scope {
            kind: Kind::Service,
            namespace: "default".into(),
            all_namespaces: false,
            name: None,
        };
        assert!(s.contains(&svc("default", "a")));
        assert!(!s.contains(&svc("other", "a")));
        assert!(!s.contains(&Namespace::default().into()));
        s.all_namespaces = true;
        assert!(s.contains(&svc("other", "a")));
        s.name = Some("b".into());
        assert!(!s.contains(&svc("other", "a")));
        assert!(s.contains(&svc("other", "b")));
    }

    #[test]
    fn empty_messages() {
        let s = Scope {
            kind: Kind::Service,
            namespace: "default".into(),
            all_namespaces: false,
            name: None,
        };
        assert_eq!(
            nothing_found(&s, View::Objects(Kind::Service)),
            "No resources found in default namespace."
        );
        assert_eq!(nothing_found(&s, View::Tunnels), "No tunnels found.");
    }
}
