//! `skyctl delete KIND NAME...`: checks every name first (nothing is sent
//! if one is invalid), then deletes them in order, printing
//! `kind/name deleted` for each. A name that does not exist is reported
//! (`service "x" not found in namespace "default"`) and the others are
//! still deleted; the exit code is 1 if any failed.

use anyhow::Result;
use skymesh_proto::v1::{DeleteRequest, Kind};
use skymesh_proto::validate;
use tonic::Code;

use crate::cli::DeleteArgs;
use crate::client::Ctx;
use crate::error::Exit;
use crate::get::{Scope, status_error};
use crate::output;

/// The validated names and their scope.
pub(crate) fn plan(namespace: &str, args: &DeleteArgs) -> Result<(Scope, Vec<String>), Exit> {
    let Some(kind) = args.kind else {
        return Err(Exit::usage("delete needs KIND NAME... or -f FILE"));
    };
    let names = args
        .names
        .iter()
        .map(|n| validate::name("NAME", n))
        .collect::<Result<Vec<_>, _>>()?;
    if args.cascade && kind != Kind::Cluster {
        return Err(Exit::usage(format!(
            "--cascade: only a cluster's delete cascades, not a {}'s",
            kind.singular()
        )));
    }
    let scope = Scope {
        kind,
        namespace: if kind.namespaced() {
            namespace.to_string()
        } else {
            String::new()
        },
        all_namespaces: false,
        name: None,
    };
    Ok((scope, names))
}

/// Runs `skyctl delete ...` for names from [`plan`].
pub(crate) async fn run(
    ctx: &mut Ctx,
    scope: Scope,
    names: Vec<String>,
    cascade: bool,
) -> Result<()> {
    let kind = scope.kind;
    let mut failure: Option<Exit> = None;
    for name in names {
        let result = ctx
            .api
            .delete(DeleteRequest {
                kind: kind as i32,
                namespace: scope.namespace.clone(),
                name: name.clone(),
                cascade,
            })
            .await;
        match result {
            Ok(resp) => {
                let deleted = resp.into_inner();
                let shown = if deleted.name().is_empty() {
                    name
                } else {
                    deleted.name().to_string()
                };
                output::emit(&format!("{}/{shown} deleted", kind.singular()))?;
            }
            Err(s) => {
                let e = status_error(ctx, &scope, &name, &s);
                // Without a coordinator or a token, the other names fail alike.
                if matches!(s.code(), Code::Unauthenticated | Code::Unavailable) {
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
