//! `skyctl`, the skymesh command line (SPEC §7): create, get (and watch),
//! apply, edit, describe and delete services, endpoints, clusters, jobs and
//! namespaces; show tunnels; print completions. Talks to the coordinator's
//! gRPC object API.
//!
//! # Layout
//! - [`cli`]: the grammar (clap): verbs, kinds and aliases, both flag spellings.
//! - [`client`]: URL, admin token, connection; [`error`]: messages and exit codes.
//! - [`create`], [`get`], [`delete`], [`watch`], [`apply`] (`apply`/`create`/`delete -f`),
//!   [`edit`], [`describe`], [`events`] (`get events`), [`join_token`], [`health`], [`completions`]:
//!   one module per subcommand.
//! - [`manifest`]: YAML/JSON documents (skymesh's and Kubernetes v1) into objects.
//! - [`output`]: tables, json/yaml documents, human units.
#![cfg_attr(test, allow(clippy::unwrap_used))]
// Flag help is written for --help (clap reads the doc comments), where
// `[NAME:]PORT` is usage syntax, not a rustdoc link.
#![allow(rustdoc::broken_intra_doc_links)]

mod apply;
mod cli;
mod client;
mod completions;
mod create;
mod delete;
mod describe;
mod edit;
mod error;
mod events;
mod get;
mod health;
mod join_token;
mod manifest;
mod output;
mod watch;

use std::process::ExitCode;

use clap::Parser;
use skymesh_proto::validate;

use crate::cli::{Cli, Command};
use crate::error::{EXIT_REFUSED, EXIT_USAGE, Exit};

/// Checks everything the user typed (exit 2 on bad input, nothing sent),
/// then connects and runs the command.
async fn run(cli: Cli) -> anyhow::Result<()> {
    let namespace = validate::name("--namespace", &cli.global.namespace).map_err(Exit::from)?;
    match &cli.command {
        Command::Completions(args) => completions::run(args),
        Command::Create {
            what: Some(what), ..
        } => {
            let obj = create::build(what, &namespace).map_err(Exit::from)?;
            create::run(&mut client::connect(&cli.global).await?, obj).await
        }
        Command::Create { what: None, files } if files.is_empty() => Err(Exit::usage(
            "create needs a kind (service, endpoints, cluster, job, namespace) and its flags, or -f FILE (see skyctl create --help)",
        )
        .into()),
        Command::Create { what: None, files } => {
            let manifests = apply::plan(&namespace, files)?;
            let ctx = &mut client::connect(&cli.global).await?;
            apply::run(ctx, apply::Verb::Create, manifests).await
        }
        Command::Apply(args) => {
            let manifests = apply::plan(&namespace, &args.files)?;
            let ctx = &mut client::connect(&cli.global).await?;
            apply::run(ctx, apply::Verb::Apply, manifests).await
        }
        Command::Delete(args) if !args.files.is_empty() => {
            if args.cascade {
                return Err(
                    Exit::usage("--cascade: not with -f (delete the cluster by name)").into(),
                );
            }
            let manifests = apply::plan(&namespace, &args.files)?;
            let ctx = &mut client::connect(&cli.global).await?;
            apply::run(ctx, apply::Verb::Delete, manifests).await
        }
        Command::Edit(args) => {
            let name = validate::name("NAME", &args.name).map_err(Exit::from)?;
            let ctx = &mut client::connect(&cli.global).await?;
            edit::run(ctx, args.kind, &namespace, &name).await
        }
        Command::Describe(args) => {
            let name = validate::name("NAME", &args.name).map_err(Exit::from)?;
            let ctx = &mut client::connect(&cli.global).await?;
            describe::run(ctx, args.kind, &namespace, &name).await
        }
        Command::Get(args) if args.target == cli::Target::Events => {
            if args.name.is_some() {
                return Err(Exit::usage(
                    "events have no names: skyctl get events [--watch] (an object's events: skyctl describe KIND NAME)",
                )
                .into());
            }
            let ctx = &mut client::connect(&cli.global).await?;
            events::run(ctx, &namespace, args.all_namespaces, args.watch).await
        }
        Command::Get(args) => {
            let (scope, view) = get::scope_of(&namespace, args)?;
            get::run(
                &mut client::connect(&cli.global).await?,
                scope,
                view,
                args.watch,
            )
            .await
        }
        Command::Delete(args) => {
            let (scope, names) = delete::plan(&namespace, args)?;
            delete::run(
                &mut client::connect(&cli.global).await?,
                scope,
                names,
                args.cascade,
            )
            .await
        }
        Command::Health(args) => health::run(&cli.global, &args.service).await,
        Command::JoinToken(args) => {
            let cluster = validate::name("CLUSTER", &args.cluster).map_err(Exit::from)?;
            join_token::run(&mut client::connect(&cli.global).await?, cluster).await
        }
    }
}

/// Prints `error: ...` on one line and picks the exit code. A closed
/// stdout (`skyctl get svc | head -1`) ends quietly.
fn report(err: &anyhow::Error) -> ExitCode {
    if let Some(e) = err.downcast_ref::<Exit>() {
        eprintln!("error: {e}");
        return ExitCode::from(e.code);
    }
    if err
        .chain()
        .filter_map(|c| c.downcast_ref::<std::io::Error>())
        .any(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    {
        return ExitCode::SUCCESS;
    }
    let msg = format!("{err:#}");
    eprintln!("error: {}", msg.lines().collect::<Vec<_>>().join("; "));
    ExitCode::from(EXIT_REFUSED)
}

/// Prints help and version as clap does; a usage error as one line.
fn usage_error(e: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if !e.use_stderr() || e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        let _ = e.print();
        return ExitCode::from(if e.use_stderr() { EXIT_USAGE } else { 0 });
    }
    eprintln!("{}", one_line_usage(&e.render().to_string()));
    ExitCode::from(EXIT_USAGE)
}

/// Folds clap's multi-line error (message, tips, usage, "for more
/// information") into `error: <message> (usage: ...)`.
fn one_line_usage(rendered: &str) -> String {
    let mut message = Vec::new();
    let mut usage = None;
    for line in rendered.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Some(u) = line.strip_prefix("Usage:") {
            usage = Some(u.trim().to_string());
        } else if usage.is_none() {
            message.push(line);
        }
    }
    let mut out = message.join(" ");
    if !out.starts_with("error:") {
        out = format!("error: {out}");
    }
    if let Some(u) = usage {
        out.push_str(&format!(" (usage: {u})"));
    }
    out
}

fn main() -> ExitCode {
    // A bug must still end with one line, not a backtrace.
    std::panic::set_hook(Box::new(|info| {
        eprintln!("error: internal error in skyctl: {info}");
    }));
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: failed to start the async runtime: {e}");
            return ExitCode::from(EXIT_REFUSED);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => report(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage_line(args: &[&str]) -> String {
        let e = Cli::try_parse_from(args).expect_err("must not parse");
        one_line_usage(&e.render().to_string())
    }

    #[test]
    fn usage_errors_are_one_line() {
        let l = usage_line(&["skyctl", "create", "cluster", "c"]);
        assert!(!l.contains('\n'), "{l}");
        assert!(
            l.starts_with(
                "error: the following required arguments were not provided: --workload-cidr"
            ),
            "{l}"
        );
        assert!(
            l.ends_with("(usage: skyctl create cluster --workload-cidr <CIDR> <NAME>)"),
            "{l}"
        );
        let l = usage_line(&["skyctl", "get", "pods"]);
        assert!(l.contains("'pods'") && l.contains("service"), "{l}");
        assert!(!l.contains('\n'), "{l}");
    }
}
