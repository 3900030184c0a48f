//! The `--jobs` file: the jobs this gateway registers for its cluster.
//!
//! ```toml
//! [[job]]
//! name = "web-1"
//! namespace = "default"        # optional
//! ip = "10.1.0.11"
//! labels = { app = "web" }
//! ports = ["http:8080/TCP"]    # [NAME:]PORT[/TCP|UDP]
//! probe = "http:8080/healthz"  # optional: tcp[:PORT] (default), http[:PORT][/PATH],
//!                              # icmp, udp[:PORT] or none
//! ```

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{Context as _, Result, anyhow};
use serde::Deserialize;
use skymesh_proto::v1::{Job, JobSpec, Object, ObjectMeta, object::Obj};
use skymesh_proto::validate;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default, rename = "job")]
    jobs: Vec<Entry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    ip: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    ports: Vec<String>,
    #[serde(default)]
    probe: Option<String>,
}

/// Parses and validates a jobs file (the cluster is filled in by the
/// coordinator from the gateway's identity).
pub fn load(path: &Path) -> Result<Vec<Job>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("failed to read jobs file {}", path.display()))?;
    parse(&text).with_context(|| format!("jobs file {}", path.display()))
}

/// Parses and validates the text of a jobs file.
pub fn parse(text: &str) -> Result<Vec<Job>> {
    let f: File = toml::from_str(text).map_err(|e| anyhow!("{}", e.message()))?;
    let mut out = Vec::new();
    for (i, e) in f.jobs.into_iter().enumerate() {
        let ports = e
            .ports
            .iter()
            .map(|p| validate::parse_job_port("ports", p))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| anyhow!("job[{i}] ({}): {err}", e.name))?;
        let probe = e
            .probe
            .as_deref()
            .map(|text| {
                let mut p = validate::parse_probe("probe", text)?;
                validate::probe("probe", &mut p, &ports)?;
                Ok(p)
            })
            .transpose()
            .map_err(|err: validate::ValidationError| anyhow!("job[{i}] ({}): {err}", e.name))?;
        let mut o: Object = Job {
            metadata: Some(ObjectMeta {
                name: e.name.clone(),
                namespace: e.namespace.unwrap_or_default(),
                labels: e.labels.into_iter().collect::<HashMap<_, _>>(),
                ..Default::default()
            }),
            spec: Some(JobSpec {
                // Placeholder so validation passes; the coordinator sets it.
                cluster: "self".into(),
                ip: e.ip,
                ports,
                probe,
            }),
            status: None,
        }
        .into();
        validate::object(&mut o).map_err(|err| anyhow!("job[{i}] ({}): {err}", e.name))?;
        if let Some(Obj::Job(mut j)) = o.obj {
            if let Some(s) = j.spec.as_mut() {
                s.cluster.clear();
            }
            out.push(j);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_names_bad_fields() {
        let jobs = parse(
            r#"
            [[job]]
            name = "Web-1"
            ip = "10.1.0.11"
            labels = { app = "web" }
            ports = ["http:8080", "53/udp"]
            "#,
        )
        .unwrap();
        assert_eq!(jobs.len(), 1);
        let m = jobs[0].metadata.as_ref().unwrap();
        assert_eq!(
            (m.name.as_str(), m.namespace.as_str()),
            ("web-1", "default")
        );
        assert_eq!(jobs[0].spec.as_ref().unwrap().ports.len(), 2);
        let e = parse("[[job]]\nname = \"a\"\nip = \"10.1.0.300\"\n").unwrap_err();
        assert!(format!("{e:#}").contains("spec.ip"), "{e:#}");
        let e = parse("[[job]]\nname = \"a\"\nip = \"10.1.0.3\"\nports = [\"0\"]\n").unwrap_err();
        assert!(format!("{e:#}").contains("port"), "{e:#}");
        assert!(parse("[[job]]\nname = \"a\"\nip = \"10.1.0.3\"\ncolour = 1\n").is_err());
        let ok = parse("[[job]]\nname = \"a\"\nip = \"10.1.0.3\"\nprobe = \"icmp\"\n").unwrap();
        let p = ok[0].spec.as_ref().unwrap().probe.as_ref().unwrap();
        assert_eq!(p.r#type(), skymesh_proto::v1::ProbeType::Icmp);
        for (probe, field) in [
            ("ping", "probe"),
            ("udp", "probe.port"),
            ("http:80/a b", "probe.path"),
        ] {
            let text = format!("[[job]]\nname = \"a\"\nip = \"10.1.0.3\"\nprobe = \"{probe}\"\n");
            let e = format!("{:#}", parse(&text).unwrap_err());
            assert!(e.contains(&format!("invalid {field}:")), "{probe}: {e}");
            assert!(!e.contains('\n'), "one line: {e}");
        }
    }
}
