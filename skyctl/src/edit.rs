//! `skyctl edit KIND NAME`: the object's YAML (as `get -o yaml` prints it)
//! in `$VISUAL`/`$EDITOR` (default `vi`), then an update carrying the
//! resource version it was read at. As kubectl does: an edit that does not
//! parse or validate, or loses to another writer (conflict), reopens the
//! editor with the error on top as a comment; nothing is written until the
//! edit is valid; an unchanged file is "Edit cancelled, no changes made.";
//! reopening after an error and saving it untouched gives up (exit 1).
//!
//! Must not: write anything but the one object being edited.

use std::path::Path;

use anyhow::{Context as _, Result};
use skymesh_proto::v1::{Kind, Object, UpdateRequest};
use tonic::Code;

use crate::apply::{fetch, user_part};
use crate::cli::OutputFormat;
use crate::client::Ctx;
use crate::error::{self, Exit};
use crate::manifest;
use crate::output::{self, Printer, View};

const HEADER: &str = "# Please edit the object below. Lines beginning with a '#' will be ignored,\n\
# and an empty file will abort the edit. If an error occurs while saving this file will be\n\
# reopened with the relevant failures.\n#\n";

/// Runs `$VISUAL`/`$EDITOR` on `path` through the shell, so an editor
/// given with arguments (`code --wait`) works.
fn run_editor(path: &Path) -> Result<()> {
    let editor = std::env::var("VISUAL")
        .ok()
        .filter(|e| !e.trim().is_empty())
        .or_else(|| {
            std::env::var("EDITOR")
                .ok()
                .filter(|e| !e.trim().is_empty())
        })
        .unwrap_or_else(|| "vi".to_string());
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{editor} \"$1\""))
        .arg("sh")
        .arg(path)
        .status()
        .with_context(|| format!("failed to start the editor {editor:?}"))?;
    if !status.success() {
        return Err(Exit::refused(format!(
            "the editor {editor:?} failed ({status}); no changes were saved"
        ))
        .into());
    }
    Ok(())
}

/// The text without comment lines, for comparing edits.
fn content(text: &str) -> String {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
        .trim()
        .to_string()
}

fn with_error(error: &str, body: &str) -> String {
    let mut out = String::from(HEADER);
    for line in error.lines() {
        out.push_str(&format!("# {line}\n"));
    }
    out.push_str("#\n");
    out.push_str(body);
    if !body.ends_with('\n') {
        out.push('\n');
    }
    out
}

/// Reads the edited text into the object to write, or the reason it is
/// refused. The edit must keep the kind, name and namespace.
fn check(edited: &str, current: &Object) -> Result<Object, String> {
    // Messages without the document's name: there is only the one.
    let bare = |e: Exit| match e.message.split_once(": ") {
        Some((origin, rest)) if origin.starts_with("edit#") => rest.to_string(),
        _ => e.message,
    };
    let docs = manifest::split("edit", edited).map_err(bare)?;
    let [doc] = docs.as_slice() else {
        return Err(format!(
            "the file must hold exactly one object, not {}",
            docs.len()
        ));
    };
    let m = manifest::parse(doc, current.namespace()).map_err(bare)?;
    if !m.named_targets.is_empty() {
        return Err("edit: give targetPort as a number".to_string());
    }
    let o = m.object;
    if o.kind() != current.kind() {
        return Err(format!(
            "kind cannot be changed in an edit (it is {})",
            current.kind().singular()
        ));
    }
    for (field, was, now) in [
        ("metadata.name", current.name(), o.name()),
        ("metadata.namespace", current.namespace(), o.namespace()),
    ] {
        if was != now {
            return Err(format!(
                "{field} cannot be changed in an edit ({was:?} → {now:?}); create a new object instead"
            ));
        }
    }
    Ok(o)
}

/// Runs `skyctl edit KIND NAME`.
pub(crate) async fn run(ctx: &mut Ctx, kind: Kind, namespace: &str, name: &str) -> Result<()> {
    let ns = if kind.namespaced() { namespace } else { "" };
    let mut current = fetch(ctx, kind, ns, name)
        .await
        .map_err(|s| ctx.status(&s))?
        .ok_or_else(|| error::not_found(kind, ns, name))?;
    let mut printer = Printer::new(View::Objects(kind), OutputFormat::Yaml, false);
    let mut original = printer.one(&current)?;
    let dir = private_dir()?;
    let path = dir.join(format!("{}-{name}.yaml", kind.singular()));
    let mut shown = format!("{HEADER}{original}");
    let result = edit_loop(
        ctx,
        &path,
        &mut shown,
        &mut current,
        &mut original,
        &mut printer,
    )
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn edit_loop(
    ctx: &mut Ctx,
    path: &Path,
    shown: &mut String,
    current: &mut Object,
    original: &mut String,
    printer: &mut Printer,
) -> Result<()> {
    let what = format!("{}/{}", current.kind().singular(), current.name());
    let mut last_error: Option<String> = None;
    loop {
        std::fs::write(path, shown.as_bytes())
            .with_context(|| format!("failed to write {}", path.display()))?;
        run_editor(path)?;
        let edited = std::fs::read_to_string(path)
            .with_context(|| format!("failed to read {}", path.display()))?;
        let body = content(&edited);
        if body.is_empty() {
            return Err(
                Exit::refused("edit cancelled: the file is empty; no changes were saved").into(),
            );
        }
        if let Some(e) = &last_error
            && (body == content(shown) || body == content(original))
        {
            return Err(
                Exit::refused(format!("edit cancelled, no changes were saved: {e}")).into(),
            );
        }
        if body == content(original) {
            output::emit("Edit cancelled, no changes made.")?;
            return Ok(());
        }
        let obj = match check(&edited, current) {
            Ok(o) => o,
            Err(e) => {
                *shown = with_error(&e, &body);
                last_error = Some(e);
                continue;
            }
        };
        if user_part(&obj) == user_part(current) {
            output::emit("Edit cancelled, no changes made.")?;
            return Ok(());
        }
        match ctx.api.update(UpdateRequest { object: Some(obj) }).await {
            Ok(_) => {
                output::emit(&format!("{what} edited"))?;
                return Ok(());
            }
            // Someone else wrote it: reopen on the latest version, the
            // edit kept below it as comments to merge by hand.
            Err(s) if s.code() == Code::Aborted => {
                let e = ctx.status(&s).message;
                *current = fetch(ctx, current.kind(), current.namespace(), current.name())
                    .await
                    .map_err(|s| ctx.status(&s))?
                    .ok_or_else(|| {
                        error::not_found(current.kind(), current.namespace(), current.name())
                    })?;
                *original = printer.one(current)?;
                let mut text = format!(
                    "{original}# Your edit, not saved (the object above is the latest version):\n"
                );
                for line in body.lines() {
                    text.push_str(&format!("#   {line}\n"));
                }
                *shown = with_error(&e, &text);
                last_error = Some(e);
            }
            Err(s)
                if matches!(
                    s.code(),
                    Code::InvalidArgument | Code::FailedPrecondition | Code::ResourceExhausted
                ) =>
            {
                let e = ctx.status(&s).message;
                *shown = with_error(&e, &body);
                last_error = Some(e);
            }
            Err(s) => return Err(ctx.status(&s).into()),
        }
    }
}

/// A private directory for the file being edited.
fn private_dir() -> Result<std::path::PathBuf> {
    let base = std::env::temp_dir();
    for n in 0..100u32 {
        let dir = base.join(format!("skyctl-edit-{}-{n}", std::process::id()));
        match std::fs::create_dir(&dir) {
            Ok(()) => {
                use std::os::unix::fs::PermissionsExt as _;
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
                return Ok(dir);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).context("failed to create a directory for the edit"),
        }
    }
    Err(Exit::refused("failed to create a directory for the edit").into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::columns::tests::web_service;

    #[test]
    fn edits_are_checked_against_the_object() {
        let cur = Object::from(web_service());
        let mut p = Printer::new(View::Objects(Kind::Service), OutputFormat::Yaml, false);
        let y = p.one(&cur).unwrap();
        assert!(check(&y, &cur).is_ok());
        let e = check(&y.replace("name: myservice", "name: other"), &cur).unwrap_err();
        assert!(e.contains("metadata.name cannot be changed"), "{e}");
        let e = check(&y.replace("- port: 80\n", "- port: 0\n"), &cur).unwrap_err();
        assert!(e.contains("spec.ports[0].port"), "{e}");
        let shown = with_error("invalid x: y", &y);
        assert!(shown.starts_with(HEADER));
        assert!(shown.contains("# invalid x: y\n"));
        assert_eq!(content(&shown), content(&y));
    }
}
