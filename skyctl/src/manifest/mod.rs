//! Object documents for `apply -f`, `create -f`, `delete -f` and `edit`:
//! reads files, directories (their `*.yaml`, `*.yml`, `*.json`, sorted) or
//! stdin (`-`), splits YAML streams at `---` (JSON is YAML), unwraps
//! `items:` lists (what `get -o yaml` prints for a list), and turns each
//! document into a validated [`Object`]: skymesh's own documents
//! ([`native`]) or Kubernetes v1 Service and Endpoints ([`k8s`]).
//!
//! Every error names the document (`web.yaml#2`), the field and the rule,
//! on one line. Nothing here talks to the coordinator.
//!
//! # Layout
//! - [`fields`]: the strict field reader (unknown fields are refused).
//! - [`native`]: skymesh documents, as `get -o yaml` prints them.
//! - [`k8s`]: Kubernetes `apiVersion: v1` Service and Endpoints.

pub(crate) mod fields;
pub(crate) mod k8s;
pub(crate) mod native;

use std::io::Read as _;
use std::path::{Path, PathBuf};

use serde::Deserialize as _;
use serde_json::Value;
use skymesh_proto::v1::Object;
use skymesh_proto::validate;

use crate::error::Exit;
use fields::Fields;
pub(crate) use k8s::NamedTarget;

/// One document of the input and where it came from.
#[derive(Debug, Clone)]
pub(crate) struct Doc {
    /// `FILE#N` (N counts from 1), `-#N` for stdin.
    pub(crate) origin: String,
    pub(crate) value: Value,
}

/// A document read into an object.
#[derive(Debug, Clone)]
pub(crate) struct Manifest {
    pub(crate) origin: String,
    /// Validated and normalised (names folded, defaults filled), except
    /// that the ports in `named_targets` still have `target_port` 0.
    pub(crate) object: Object,
    /// Kubernetes `targetPort`s given by name, to resolve against the jobs.
    pub(crate) named_targets: Vec<NamedTarget>,
}

impl Manifest {
    /// `service/web`.
    pub(crate) fn what(&self) -> String {
        format!("{}/{}", self.object.kind().singular(), self.object.name())
    }
}

/// Reads every document of the `-f` arguments, in order.
pub(crate) fn read_sources(paths: &[PathBuf]) -> Result<Vec<Doc>, Exit> {
    let mut docs = Vec::new();
    for p in paths {
        if p.as_os_str() == "-" {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| Exit::usage(format!("-f -: failed to read stdin: {e}")))?;
            docs.extend(split("-", &text)?);
        } else if p.is_dir() {
            for f in dir_files(p)? {
                docs.extend(split(&f.display().to_string(), &read_file(&f)?)?);
            }
        } else {
            docs.extend(split(&p.display().to_string(), &read_file(p)?)?);
        }
    }
    if docs.is_empty() {
        return Err(Exit::usage(
            "-f: no objects found in the given files (expected YAML or JSON documents)",
        ));
    }
    Ok(docs)
}

fn read_file(p: &Path) -> Result<String, Exit> {
    std::fs::read_to_string(p).map_err(|e| Exit::usage(format!("-f {}: {e}", p.display())))
}

/// The manifest files of a directory (not recursive), sorted by name.
fn dir_files(dir: &Path) -> Result<Vec<PathBuf>, Exit> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| Exit::usage(format!("-f {}: {e}", dir.display())))?;
    let mut files = Vec::new();
    for e in entries {
        let path = e
            .map_err(|e| Exit::usage(format!("-f {}: {e}", dir.display())))?
            .path();
        let ext = path.extension().and_then(|x| x.to_str()).unwrap_or("");
        if path.is_file() && matches!(ext, "yaml" | "yml" | "json") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Splits a YAML (or JSON) stream into its documents; empty documents are
/// skipped, `items:` lists unwrapped.
pub(crate) fn split(name: &str, text: &str) -> Result<Vec<Doc>, Exit> {
    let mut docs = Vec::new();
    for (i, de) in yaml_serde::Deserializer::from_str(text).enumerate() {
        let origin = format!("{name}#{}", i + 1);
        let value = Value::deserialize(de)
            .map_err(|e| Exit::usage(format!("{origin}: not valid YAML or JSON: {e}")))?;
        match value {
            Value::Null => {}
            Value::Object(ref m)
                if m.contains_key("items")
                    && m.get("kind").is_none_or(|k| k.as_str() == Some("List")) =>
            {
                let Some(Value::Array(items)) = m.get("items") else {
                    return Err(Exit::usage(format!("{origin}: items must be a list")));
                };
                for (j, item) in items.iter().enumerate() {
                    docs.push(Doc {
                        origin: format!("{origin}.items[{j}]"),
                        value: item.clone(),
                    });
                }
            }
            value => docs.push(Doc { origin, value }),
        }
    }
    Ok(docs)
}

/// Reads one document: its kind picks the parser (`apiVersion: v1` is
/// Kubernetes; none or `skymesh.io/v1` is skymesh's own), then the object
/// is validated. `namespace` applies when the document names none.
pub(crate) fn parse(doc: &Doc, namespace: &str) -> Result<Manifest, Exit> {
    let (mut object, named_targets) =
        parse_value(&doc.value).map_err(|e| Exit::usage(format!("{}: {e}", doc.origin)))?;
    if object.kind().namespaced()
        && let Some(m) = object.meta_mut()
        && m.namespace.is_empty()
    {
        m.namespace = namespace.to_string();
    }
    let what = |o: &Object| format!("{}/{}", o.kind().singular(), o.name().to_ascii_lowercase());
    let origin = format!("{} ({})", doc.origin, what(&object));
    // Named targets are resolved later; validation needs a number there.
    let named: Vec<usize> = named_targets.iter().map(|t| t.index).collect();
    set_targets(&mut object, &named, 1);
    validate::object(&mut object).map_err(|e| Exit::usage(format!("{origin}: {e}")))?;
    set_targets(&mut object, &named, 0);
    Ok(Manifest {
        origin,
        object,
        named_targets,
    })
}

/// Sets the target port of the service ports at `indices`.
pub(crate) fn set_targets(obj: &mut Object, indices: &[usize], target: u32) {
    if let Some(skymesh_proto::v1::object::Obj::Service(s)) = obj.obj.as_mut()
        && let Some(spec) = s.spec.as_mut()
    {
        for i in indices {
            if let Some(p) = spec.ports.get_mut(*i) {
                p.target_port = target;
            }
        }
    }
}

fn parse_value(v: &Value) -> fields::Result<(Object, Vec<NamedTarget>)> {
    let mut doc = Fields::new("", v)?;
    let kind = match doc.str("kind")? {
        Some(k) => k.to_string(),
        None => {
            return fields::invalid(
                "kind",
                format!("every document needs a kind ({})", native::KINDS),
            );
        }
    };
    match doc.str("apiVersion")? {
        Some("v1") => {
            let p = k8s::parse(&kind, doc)?;
            Ok((p.object, p.named_targets))
        }
        None | Some("skymesh.io/v1") => Ok((native::parse(&kind, doc)?, Vec::new())),
        Some(other) => fields::invalid(
            "apiVersion",
            format!(
                "{other:?} cannot be mapped: skymesh reads its own documents (no apiVersion, or skymesh.io/v1) and Kubernetes v1 Service and Endpoints"
            ),
        ),
    }
}

#[cfg(test)]
mod tests;
