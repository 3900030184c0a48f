//! `skyctl get ... --watch`: list, print, then follow `Api.Watch` from the
//! list's revision and print one line (or document) per change, until
//! Ctrl-C.
//!
//! The watch survives a dropped stream or a restarted coordinator (a
//! coordinator that stops ends every watch with UNAVAILABLE "coordinator
//! shutting down"): it says so in one line on stderr, reconnects with
//! backoff (200 ms doubling to 5 s) and resumes after the last revision it
//! processed (BOOKMARKs advance it too), so nothing is lost and nothing
//! printed twice. When the coordinator answers OUT_OF_RANGE (history
//! compacted) it says so in one line, relists and prints the difference
//! from what it has shown as ADDED/MODIFIED/DELETED. [`State`] holds that bookkeeping as
//! plain data, tested without a server.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Result;
use skymesh_proto::v1::{EventType, Object, WatchRequest, WatchResponse};
use tonic::{Code, Status};

use crate::cli::OutputFormat;
use crate::client::Ctx;
use crate::error::Exit;
use crate::get::{self, Scope};
use crate::output::{self, Printer, View};

/// First reconnect delay.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
/// Longest reconnect delay.
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Identity of an object within a watch: (namespace, name).
type Key = (String, String);

fn key(obj: &Object) -> Key {
    (obj.namespace().to_string(), obj.name().to_string())
}

/// What the watcher has shown and the revision it has seen.
#[derive(Debug)]
pub(crate) struct State {
    scope: Scope,
    known: BTreeMap<Key, Object>,
    /// Every change up to this store revision has been printed.
    rv: u64,
}

impl State {
    /// State after printing `objects`, listed at revision `rv`.
    pub(crate) fn new(scope: Scope, objects: Vec<Object>, rv: u64) -> Self {
        let known = objects
            .into_iter()
            .filter(|o| scope.contains(o))
            .map(|o| (key(&o), o))
            .collect();
        State { scope, known, rv }
    }

    /// The revision to resume from.
    pub(crate) fn resource_version(&self) -> u64 {
        self.rv
    }

    /// Takes in one watch response; returns the changes to print. A
    /// response at or below the revision already seen is a repeat and is
    /// dropped, as is an event older than what is shown for its object.
    pub(crate) fn apply(&mut self, resp: WatchResponse) -> Vec<(EventType, Object)> {
        if resp.resource_version != 0 && resp.resource_version <= self.rv {
            return Vec::new();
        }
        let mut out = Vec::new();
        for ev in resp.events {
            let t = ev.r#type();
            let Some(obj) = ev.object else {
                continue;
            };
            if !self.scope.contains(&obj) {
                continue;
            }
            let k = key(&obj);
            match t {
                EventType::Added | EventType::Modified => {
                    if let Some(old) = self.known.get(&k)
                        && obj.resource_version() != 0
                        && old.resource_version() >= obj.resource_version()
                    {
                        continue;
                    }
                    self.known.insert(k, obj.clone());
                    out.push((t, obj));
                }
                EventType::Deleted => {
                    self.known.remove(&k);
                    out.push((t, obj));
                }
                EventType::Bookmark | EventType::Unspecified => {}
            }
        }
        self.rv = self.rv.max(resp.resource_version);
        out
    }

    /// Replaces what is known by a fresh list read at `rv`; returns the
    /// differences from what was shown.
    pub(crate) fn relist(&mut self, objects: Vec<Object>, rv: u64) -> Vec<(EventType, Object)> {
        let fresh: BTreeMap<Key, Object> = objects
            .into_iter()
            .filter(|o| self.scope.contains(o))
            .map(|o| (key(&o), o))
            .collect();
        let mut out = Vec::new();
        for (k, old) in &self.known {
            if !fresh.contains_key(k) {
                out.push((EventType::Deleted, old.clone()));
            }
        }
        for (k, new) in &fresh {
            match self.known.get(k) {
                None => out.push((EventType::Added, new.clone())),
                Some(old) if old != new => out.push((EventType::Modified, new.clone())),
                Some(_) => {}
            }
        }
        self.known = fresh;
        self.rv = rv;
        out
    }
}

/// Reconnect delays: 200 ms doubling to 5 s, back to 200 ms after progress.
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Self {
        Backoff { next: BACKOFF_MIN }
    }

    fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }

    fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        d
    }
}

/// Why the stream stopped.
#[derive(Debug)]
enum Interruption {
    /// OUT_OF_RANGE: the revision is compacted away; relist.
    TooOld,
    /// Worth retrying (coordinator away, stream dropped).
    Retry(String),
    /// Retrying cannot help (bad token, bad request).
    Fatal(Exit),
}

fn classify(ctx: &Ctx, s: &Status) -> Interruption {
    match s.code() {
        Code::OutOfRange => Interruption::TooOld,
        Code::Unauthenticated
        | Code::PermissionDenied
        | Code::InvalidArgument
        | Code::NotFound
        | Code::FailedPrecondition
        | Code::Unimplemented => Interruption::Fatal(ctx.status(s)),
        _ if s.message().is_empty() => Interruption::Retry(s.code().description().to_string()),
        _ => Interruption::Retry(s.message().to_string()),
    }
}

fn print(printer: &mut Printer, events: Vec<(EventType, Object)>) -> Result<()> {
    for (t, obj) in events {
        let text = printer.event(t, &obj)?;
        if !text.is_empty() {
            output::emit(&text)?;
        }
    }
    Ok(())
}

/// Follows one watch stream until it stops.
async fn stream_once(
    ctx: &mut Ctx,
    state: &mut State,
    printer: &mut Printer,
    backoff: &mut Backoff,
    outage: &mut bool,
) -> Result<Interruption> {
    let req = WatchRequest {
        kind: state.scope.kind as i32,
        namespace: state.scope.namespace.clone(),
        all_namespaces: state.scope.all_namespaces,
        name: state.scope.name.clone().unwrap_or_default(),
        resource_version: state.resource_version(),
    };
    let mut stream = match ctx.api.watch(req).await {
        Ok(r) => r.into_inner(),
        Err(s) => return Ok(classify(ctx, &s)),
    };
    if std::mem::take(outage) {
        eprintln!("watch resumed");
    }
    loop {
        match stream.message().await {
            Ok(Some(resp)) => {
                backoff.reset();
                let events = state.apply(resp);
                print(printer, events)?;
            }
            Ok(None) => {
                return Ok(Interruption::Retry(
                    "the coordinator closed the stream".into(),
                ));
            }
            Err(s) => return Ok(classify(ctx, &s)),
        }
    }
}

/// Follows changes forever (until an error retrying cannot fix).
async fn follow(ctx: &mut Ctx, state: &mut State, printer: &mut Printer) -> Result<()> {
    let mut backoff = Backoff::new();
    let mut outage = false;
    let mut relist = false;
    loop {
        let stop = if relist {
            match get::list(ctx, &state.scope).await {
                Ok((objects, rv)) => {
                    relist = false;
                    let events = state.relist(objects, rv);
                    print(printer, events)?;
                    continue;
                }
                Err(s) => classify(ctx, &s),
            }
        } else {
            stream_once(ctx, state, printer, &mut backoff, &mut outage).await?
        };
        match stop {
            Interruption::TooOld => {
                eprintln!(
                    "warning: watch history after revision {} was compacted; listing again",
                    state.resource_version()
                );
                relist = true;
            }
            Interruption::Fatal(e) => return Err(e.into()),
            Interruption::Retry(reason) => {
                if !outage {
                    eprintln!(
                        "warning: watch interrupted ({}); reconnecting to {}",
                        reason.lines().next().unwrap_or(""),
                        ctx.url
                    );
                    outage = true;
                }
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

/// Runs `skyctl get ... --watch`.
pub(crate) async fn run(ctx: &mut Ctx, scope: Scope, view: View) -> Result<()> {
    let (objects, rv) = get::list(ctx, &scope).await.map_err(|s| ctx.status(&s))?;
    if let Some(name) = &scope.name
        && objects.is_empty()
    {
        return Err(scope.not_found(name).into());
    }
    let mut printer = Printer::new(view, ctx.output, true);
    let first = match (ctx.output, &objects[..]) {
        (OutputFormat::Json | OutputFormat::Yaml, [one]) if scope.name.is_some() => {
            printer.one(one)?
        }
        _ => printer.list(&objects)?,
    };
    output::emit(&first)?;
    let mut state = State::new(scope, objects, rv);
    let interrupted = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        r = follow(ctx, &mut state, &mut printer) => r,
        () = interrupted => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skymesh_proto::v1::{Kind, ObjectMeta, Service, WatchEvent};

    fn svc(name: &str, rv: u64) -> Object {
        Service {
            metadata: Some(ObjectMeta {
                name: name.into(),
                namespace: "default".into(),
                resource_version: rv,
                ..Default::default()
            }),
            ..Default::default()
        }
        .into()
    }

    fn scope(name: Option<&str>) -> Scope {
        Scope {
            kind: Kind::Service,
            namespace: "default".into(),
            all_namespaces: false,
            name: name.map(str::to_string),
        }
    }

    fn resp(rv: u64, events: Vec<(EventType, Option<Object>)>) -> WatchResponse {
        WatchResponse {
            resource_version: rv,
            events: events
                .into_iter()
                .map(|(t, object)| WatchEvent {
                    r#type: t as i32,
                    object,
                })
                .collect(),
        }
    }

    fn names(events: &[(EventType, Object)]) -> Vec<(EventType, String)> {
        events
            .iter()
            .map(|(t, o)| (*t, o.name().to_string()))
            .collect()
    }

    #[test]
    fn events_advance_the_revision_once() {
        let mut st = State::new(scope(None), vec![svc("a", 5)], 10);
        let ev = st.apply(resp(11, vec![(EventType::Added, Some(svc("b", 11)))]));
        assert_eq!(names(&ev), [(EventType::Added, "b".to_string())]);
        assert_eq!(st.resource_version(), 11);
        // The same revision again (a resumed stream repeating itself) prints nothing.
        assert!(
            st.apply(resp(11, vec![(EventType::Added, Some(svc("b", 11)))]))
                .is_empty()
        );
        let ev = st.apply(resp(
            12,
            vec![
                (EventType::Modified, Some(svc("a", 12))),
                (EventType::Deleted, Some(svc("b", 12))),
            ],
        ));
        assert_eq!(
            names(&ev),
            [
                (EventType::Modified, "a".to_string()),
                (EventType::Deleted, "b".to_string())
            ]
        );
        // A bookmark moves the revision without printing.
        assert!(
            st.apply(resp(20, vec![(EventType::Bookmark, None)]))
                .is_empty()
        );
        assert_eq!(st.resource_version(), 20);
    }

    #[test]
    fn stale_object_versions_are_not_repeated() {
        let mut st = State::new(scope(None), vec![svc("a", 5)], 0);
        // rv 0 from the server means "current state as ADDED": already shown.
        assert!(
            st.apply(resp(0, vec![(EventType::Added, Some(svc("a", 5)))]))
                .is_empty()
        );
        assert_eq!(
            st.apply(resp(0, vec![(EventType::Modified, Some(svc("a", 6)))]))
                .len(),
            1
        );
    }

    #[test]
    fn named_watch_ignores_others() {
        let mut st = State::new(scope(Some("a")), vec![svc("a", 5)], 10);
        let ev = st.apply(resp(
            11,
            vec![
                (EventType::Added, Some(svc("b", 11))),
                (EventType::Modified, Some(svc("a", 11))),
            ],
        ));
        assert_eq!(names(&ev), [(EventType::Modified, "a".to_string())]);
    }

    #[test]
    fn relist_prints_the_difference() {
        let mut st = State::new(scope(None), vec![svc("a", 5), svc("b", 6), svc("c", 7)], 10);
        let ev = st.relist(vec![svc("a", 5), svc("c", 30), svc("d", 31)], 40);
        assert_eq!(
            names(&ev),
            [
                (EventType::Deleted, "b".to_string()),
                (EventType::Modified, "c".to_string()),
                (EventType::Added, "d".to_string()),
            ]
        );
        assert_eq!(st.resource_version(), 40);
        assert!(
            st.relist(vec![svc("a", 5), svc("c", 30), svc("d", 31)], 41)
                .is_empty()
        );
    }

    #[test]
    fn backoff_doubles_to_five_seconds() {
        let mut b = Backoff::new();
        let delays: Vec<u128> = (0..7).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(delays, [200, 400, 800, 1600, 3200, 5000, 5000]);
        b.reset();
        assert_eq!(b.next_delay(), BACKOFF_MIN);
    }
}
