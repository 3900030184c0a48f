//! `skyctl get events [--watch]`: the state changes the coordinator
//! recorded in the last hour (`ListEvents`), as a kubectl-style table
//! `LAST SEEN TYPE REASON OBJECT MESSAGE` or documents; with `--watch`,
//! then every new one as it is recorded (`WatchEvents`), resuming after the
//! last one printed when the stream drops. Also the recent events of one
//! object for `describe`.

use std::time::Duration;

use anyhow::Result;
use serde_json::{Value, json};
use skymesh_proto::v1::{
    Kind, ListEventsRequest, ListEventsResponse, MeshEvent, WatchEventsRequest,
};
use tonic::Code;

use crate::cli::OutputFormat;
use crate::client::Ctx;
use crate::output::{self, human, table};

/// Tuning: the longest pause before re-opening a dropped watch.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

const HEADERS: [&str; 5] = ["LAST SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"];

fn object(e: &MeshEvent) -> String {
    let kind = e.kind();
    format!("{}/{}", kind.singular(), e.name)
}

fn row(e: &MeshEvent, now: i64) -> Vec<String> {
    vec![
        human::age(e.timestamp, now),
        e.r#type.clone(),
        e.reason.clone(),
        object(e),
        e.message.clone(),
    ]
}

fn doc(e: &MeshEvent) -> Value {
    let kind = e.kind();
    let mut v = json!({
        "kind": "Event",
        "resource_version": e.resource_version,
        "timestamp": human::rfc3339(e.timestamp),
        "type": e.r#type,
        "reason": e.reason,
        "object": {"kind": kind.singular(), "name": e.name},
        "message": e.message,
    });
    if !e.namespace.is_empty() {
        v["object"]["namespace"] = json!(e.namespace);
    }
    v
}

fn render_doc(format: OutputFormat, v: &Value, stream: bool) -> Result<String> {
    Ok(match format {
        OutputFormat::Yaml => {
            let y = yaml_serde::to_string(v)?;
            if stream { format!("---\n{y}") } else { y }
        }
        _ => serde_json::to_string_pretty(v)?,
    })
}

/// The recent events of one object, for `describe` (oldest first).
pub(crate) async fn of_object(
    ctx: &mut Ctx,
    kind: Kind,
    namespace: &str,
    name: &str,
) -> Result<Vec<MeshEvent>> {
    let r = ctx
        .api
        .list_events(ListEventsRequest {
            namespace: namespace.to_string(),
            all_namespaces: false,
            kind: kind as i32,
            name: name.to_string(),
        })
        .await
        .map_err(|s| ctx.status(&s))?
        .into_inner();
    Ok(r.events)
}

/// `Events:` lines for `describe`.
pub(crate) fn describe_lines(events: &[MeshEvent], now: i64) -> String {
    if events.is_empty() {
        return "Events:            <none>\n".to_string();
    }
    let rows: Vec<Vec<String>> = events
        .iter()
        .map(|e| {
            vec![
                e.r#type.clone(),
                e.reason.clone(),
                human::age(e.timestamp, now),
                e.message.clone(),
            ]
        })
        .collect();
    let (t, _) = table::render(&["TYPE", "REASON", "AGE", "MESSAGE"], &rows);
    let mut out = String::from("Events:\n");
    for l in t.lines() {
        out.push_str("  ");
        out.push_str(l);
        out.push('\n');
    }
    out
}

/// The events of `namespace` (or of every namespace).
async fn list_events(ctx: &mut Ctx, namespace: &str, all: bool) -> Result<ListEventsResponse> {
    Ok(ctx
        .api
        .list_events(ListEventsRequest {
            namespace: namespace.to_string(),
            all_namespaces: all,
            kind: 0,
            name: String::new(),
        })
        .await
        .map_err(|s| ctx.status(&s))?
        .into_inner())
}

/// Runs `skyctl get events [--watch]`.
pub(crate) async fn run(ctx: &mut Ctx, namespace: &str, all: bool, watch: bool) -> Result<()> {
    let list = list_events(ctx, namespace, all).await?;
    let now = output::now();
    let format = ctx.output;
    let tabular = matches!(format, OutputFormat::Table | OutputFormat::Wide);
    let mut layout = table::Layout::fit(&HEADERS, &[]);
    if tabular {
        if list.events.is_empty() && !watch {
            eprintln!("No events found.");
            return Ok(());
        }
        let rows: Vec<Vec<String>> = list.events.iter().map(|e| row(e, now)).collect();
        let (text, l) = table::render(&HEADERS, &rows);
        layout = l;
        output::emit(&text)?;
    } else if watch {
        for e in &list.events {
            output::emit(&render_doc(format, &doc(e), true)?)?;
        }
    } else {
        let items: Vec<Value> = list.events.iter().map(doc).collect();
        output::emit(&render_doc(format, &json!({ "items": items }), false)?)?;
    }
    if !watch {
        return Ok(());
    }
    let mut last = list
        .events
        .iter()
        .map(|e| e.resource_version)
        .max()
        .unwrap_or(0)
        .max(list.resource_version);
    let mut backoff = Duration::from_millis(100);
    loop {
        let stream = ctx
            .api
            .watch_events(WatchEventsRequest {
                namespace: namespace.to_string(),
                all_namespaces: all,
                resource_version: last,
            })
            .await;
        match stream {
            Ok(s) => {
                let mut s = s.into_inner();
                loop {
                    match s.message().await {
                        Ok(Some(e)) => {
                            backoff = Duration::from_millis(100);
                            last = last.max(e.resource_version);
                            if tabular {
                                let r = row(&e, output::now());
                                layout.widen(&r);
                                output::emit(&layout.line(&r))?;
                            } else {
                                output::emit(&render_doc(format, &doc(&e), true)?)?;
                            }
                        }
                        Ok(None) => break,
                        Err(st) if st.code() == Code::Unauthenticated => {
                            return Err(ctx.status(&st).into());
                        }
                        Err(st) if st.code() == Code::OutOfRange => {
                            // History after `last` is gone: relist and
                            // print what is newer.
                            eprintln!("watch: {}; listing again", st.message());
                            last = relist(ctx, namespace, all, last, tabular, format, &mut layout)
                                .await?;
                            break;
                        }
                        Err(_) => break,
                    }
                }
            }
            Err(st) if matches!(st.code(), Code::Unauthenticated | Code::Unimplemented) => {
                return Err(ctx.status(&st).into());
            }
            Err(_) => {}
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Lists again after a compacted watch, prints the events newer than
/// `last` and returns the revision to watch from.
async fn relist(
    ctx: &mut Ctx,
    namespace: &str,
    all: bool,
    last: u64,
    tabular: bool,
    format: OutputFormat,
    layout: &mut table::Layout,
) -> Result<u64> {
    let list = list_events(ctx, namespace, all).await?;
    for e in list.events.iter().filter(|e| e.resource_version > last) {
        if tabular {
            let r = row(e, output::now());
            layout.widen(&r);
            output::emit(&layout.line(&r))?;
        } else {
            output::emit(&render_doc(format, &doc(e), true)?)?;
        }
    }
    Ok(list.resource_version.max(last))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_and_documents() {
        let e = MeshEvent {
            resource_version: 7,
            timestamp: 1000,
            kind: Kind::Job as i32,
            namespace: "default".into(),
            name: "web-1".into(),
            reason: "NotReady".into(),
            message: "job not ready".into(),
            r#type: "Warning".into(),
        };
        let r = row(&e, 1005);
        assert_eq!(
            r[1..],
            ["Warning", "NotReady", "job/web-1", "job not ready"]
        );
        let d = doc(&e);
        assert_eq!(d["object"]["namespace"], "default");
        assert_eq!(d["reason"], "NotReady");
        let lines = describe_lines(&[e], 1005);
        assert!(lines.starts_with("Events:\n  TYPE"), "{lines}");
        assert_eq!(describe_lines(&[], 0), "Events:            <none>\n");
    }
}
