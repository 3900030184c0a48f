//! Everything skyctl prints on stdout: tables ([`table`], [`columns`]),
//! documents ([`json`](mod@json)) and human units ([`human`]). A [`Printer`] turns
//! objects and watch events into text for the chosen `-o` format; [`emit`]
//! writes and flushes it. Nothing here talks to the coordinator.

pub(crate) mod columns;
pub(crate) mod human;
pub(crate) mod json;
pub(crate) mod table;

use std::io::Write as _;

use anyhow::{Context as _, Result};
use serde_json::{Value, json};
use skymesh_proto::v1::{EventType, Object};

use crate::cli::OutputFormat;
pub(crate) use columns::View;
use table::Layout;

/// Writes `text` to stdout (adding a final newline if missing) and flushes,
/// so that each watch line shows at once even through a pipe.
pub(crate) fn emit(text: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    if !text.ends_with('\n') {
        out.write_all(b"\n")?;
    }
    out.flush()
}

/// The current Unix time in seconds.
pub(crate) fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The upper-case name of a watch event type.
pub(crate) fn event_name(t: EventType) -> &'static str {
    match t {
        EventType::Added => "ADDED",
        EventType::Modified => "MODIFIED",
        EventType::Deleted => "DELETED",
        EventType::Bookmark => "BOOKMARK",
        EventType::Unspecified => "UNKNOWN",
    }
}

/// Renders objects of one view in one output format. Remembers the column
/// widths of the table it printed so that watch lines line up under it.
pub(crate) struct Printer {
    view: View,
    format: OutputFormat,
    /// Documents are separated with `---` (YAML streams of watch events).
    stream: bool,
    layout: Layout,
}

impl Printer {
    /// A printer; `stream` when more documents will follow (watch).
    pub(crate) fn new(view: View, format: OutputFormat, stream: bool) -> Self {
        Printer {
            view,
            format,
            stream,
            layout: Layout::default(),
        }
    }

    fn wide(&self) -> bool {
        self.format == OutputFormat::Wide
    }

    fn doc(&self, v: &Value) -> Result<String> {
        match self.format {
            OutputFormat::Yaml => {
                let y = yaml_serde::to_string(v).context("failed to render YAML")?;
                Ok(if self.stream { format!("---\n{y}") } else { y })
            }
            _ => serde_json::to_string_pretty(v).context("failed to render JSON"),
        }
    }

    fn docs_of(&self, obj: &Object) -> Vec<Value> {
        match self.view {
            View::Objects(_) => vec![json::object(obj)],
            View::Tunnels => json::tunnels(obj),
        }
    }

    /// A list: a table (header even when empty) or `{"items": [...]}`.
    pub(crate) fn list(&mut self, objects: &[Object]) -> Result<String> {
        match self.format {
            OutputFormat::Table | OutputFormat::Wide => {
                let now = now();
                let rows: Vec<Vec<String>> = objects
                    .iter()
                    .flat_map(|o| columns::rows(self.view, o, self.wide(), now))
                    .collect();
                let (text, layout) =
                    table::render(&columns::headers(self.view, self.wide()), &rows);
                self.layout = layout;
                Ok(text)
            }
            OutputFormat::Json | OutputFormat::Yaml => {
                let items = objects.iter().flat_map(|o| self.docs_of(o)).collect();
                self.doc(&json::list(items))
            }
        }
    }

    /// One object: a one-row table or the object's document.
    pub(crate) fn one(&mut self, obj: &Object) -> Result<String> {
        match (self.format, self.view) {
            (OutputFormat::Json | OutputFormat::Yaml, View::Objects(_)) => {
                self.doc(&json::object(obj))
            }
            _ => self.list(std::slice::from_ref(obj)),
        }
    }

    /// A change: table lines led by the event type, or a document
    /// `{"type": ..., "object": ...}`. Empty when the change shows nothing
    /// (a cluster without peers in the tunnels view).
    pub(crate) fn event(&mut self, t: EventType, obj: &Object) -> Result<String> {
        let name = event_name(t);
        match self.format {
            OutputFormat::Table | OutputFormat::Wide => {
                let mut out = String::new();
                for row in columns::rows(self.view, obj, self.wide(), now()) {
                    self.layout.widen(&row);
                    out.push_str(&self.layout.event_line(name, &row));
                    out.push('\n');
                }
                Ok(out)
            }
            OutputFormat::Json | OutputFormat::Yaml => {
                let v = match self.view {
                    View::Objects(_) => json!({"type": name, "object": json::object(obj)}),
                    View::Tunnels => {
                        json!({"type": name, "cluster": obj.name(), "tunnels": json::tunnels(obj)})
                    }
                };
                self.doc(&v)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::columns::tests::{east_cluster, web_service};
    use skymesh_proto::v1::Kind;

    #[test]
    fn table_then_aligned_events() {
        let mut p = Printer::new(View::Objects(Kind::Service), OutputFormat::Table, true);
        let obj = Object::from(web_service());
        let text = p.list(std::slice::from_ref(&obj)).unwrap();
        let mut lines = text.lines();
        let header = lines.next().unwrap();
        assert!(
            header.starts_with("NAME        TYPE        CLUSTER-IP   EXTERNAL-IP"),
            "{header}"
        );
        assert!(
            lines
                .next()
                .unwrap()
                .starts_with("myservice   ClusterIP   100.65.0.1   <none>")
        );
        let ev = p.event(EventType::Modified, &obj).unwrap();
        assert!(
            ev.starts_with("MODIFIED   myservice   ClusterIP   100.65.0.1"),
            "{ev}"
        );
        assert!(ev.ends_with('\n') && ev.lines().count() == 1);
    }

    #[test]
    fn documents() {
        let obj = Object::from(web_service());
        let mut p = Printer::new(View::Objects(Kind::Service), OutputFormat::Json, false);
        let v: Value = serde_json::from_str(&p.one(&obj).unwrap()).unwrap();
        assert_eq!(v["metadata"]["name"], "myservice");
        let v: Value = serde_json::from_str(&p.list(&[obj.clone(), obj.clone()]).unwrap()).unwrap();
        assert_eq!(v["items"].as_array().map(Vec::len), Some(2));
        let v: Value = serde_json::from_str(&p.event(EventType::Deleted, &obj).unwrap()).unwrap();
        assert_eq!(v["type"], "DELETED");

        let mut p = Printer::new(View::Objects(Kind::Service), OutputFormat::Yaml, true);
        let y = p.event(EventType::Added, &obj).unwrap();
        assert!(y.starts_with("---\n"), "{y}");
        let v: Value = yaml_serde::from_str(&y).unwrap();
        assert_eq!(v["object"]["spec"]["type"], "ClusterIP");
    }

    /// The exact YAML `get -o yaml` prints for a service and a cluster's
    /// tunnels (kept byte for byte across YAML libraries).
    #[test]
    fn yaml_is_stable() {
        let mut p = Printer::new(View::Objects(Kind::Service), OutputFormat::Yaml, false);
        let y = p.one(&Object::from(web_service())).unwrap();
        assert_eq!(y, GOLDEN_SERVICE_YAML, "got:\n{y}");
        let mut p = Printer::new(View::Tunnels, OutputFormat::Yaml, true);
        let y = p.list(&[east_cluster().into()]).unwrap();
        assert_eq!(y, GOLDEN_TUNNELS_YAML, "got:\n{y}");
    }

    const GOLDEN_SERVICE_YAML: &str = r#"kind: Service
metadata:
  creation_timestamp: 2024-05-01T11:59:15Z
  name: myservice
  namespace: default
  resource_version: 7
  uid: u-1
spec:
  affinity_timeout_s: 10800
  clusters:
  - mycluster
  ports:
  - port: 80
    protocol: TCP
    target_port: 8080
  - name: dns
    port: 53
    protocol: UDP
    target_port: 53
  selector:
    app: myApp
  session_affinity: None
  traffic_policy: Spread
  type: ClusterIP
status:
  cluster_ip: 100.65.0.1
  external_ips: []
"#;
    const GOLDEN_TUNNELS_YAML: &str = r#"---
items:
- cluster: east
  last_handshake: null
  peer: south
  rtt_us: 0
  rx_bytes: 0
  status: down
  tx_bytes: 3145728
  up: false
- cluster: east
  last_handshake: 2024-05-01T11:59:48Z
  peer: west
  rtt_us: 1234
  rx_bytes: 1536
  status: up
  tx_bytes: 100
  up: true
"#;

    #[test]
    fn tunnels_view() {
        let mut p = Printer::new(View::Tunnels, OutputFormat::Table, false);
        let text = p
            .list(&[east_cluster().into(), web_service().into()])
            .unwrap();
        assert_eq!(text.lines().count(), 3, "{text}");
        assert!(
            text.starts_with("CLUSTER   PEER    STATUS   HANDSHAKE   RTT"),
            "{text}"
        );
    }
}
