//! Backend-agnostic conformance tests for [`Store`].
//!
//! Every backend runs these unchanged. Each test writes only under its own
//! prefix (`/testsuite/<test name>/`) and reasons about revisions relative to
//! the store's revision when it starts, so the tests can share one store (see
//! [`run_all`]) as well as run each on a fresh one. A test panics on failure.
//!
//! [`watch_compacted`] needs a store whose retained history is much shorter
//! than the number of writes it is given, so it is not part of [`run_all`].

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;

use crate::{Compare, Error, Event, EventKind, KeyValue, Op, Result, Store, TxnResult, WatchBatch};

/// How long a test waits for one watch item before failing.
pub const WATCH_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs every test except [`watch_compacted`] on one store, one after the
/// other.
pub async fn run_all<S: Store + ?Sized>(store: Arc<S>) {
    revision_per_txn(&*store).await;
    create_if_absent(&*store).await;
    cas_mod_revision(&*store).await;
    cas_create_revision(&*store).await;
    cas_no_writes_under(&*store).await;
    revision_bookkeeping(&*store).await;
    delete_absent_is_noop(&*store).await;
    range_by_prefix(&*store).await;
    watch_replays_from_zero(&*store).await;
    watch_resume_exactly_once(&*store).await;
    watch_large_history(&*store).await;
    watch_live_after_history(&*store).await;
    watch_txn_in_one_batch(&*store).await;
    watch_delete_carries_prev(&*store).await;
    concurrent_cas_counter(store).await;
}

// ---------------------------------------------------------------- helpers

/// `Op::Put` from string slices.
pub fn put(key: &str, value: impl AsRef<[u8]>) -> Op {
    Op::Put {
        key: key.to_owned(),
        value: value.as_ref().to_vec(),
    }
}

/// `Op::Delete` from a string slice.
pub fn delete(key: &str) -> Op {
    Op::Delete {
        key: key.to_owned(),
    }
}

/// Runs an unconditional transaction that must succeed; returns its revision.
pub async fn must_write<S: Store + ?Sized>(store: &S, ops: Vec<Op>) -> u64 {
    let result = store.txn(vec![], ops).await.expect("txn succeeds");
    assert!(result.succeeded, "unconditional txn succeeds");
    result.revision
}

async fn current<S: Store + ?Sized>(store: &S) -> u64 {
    store.current_revision().await.expect("current_revision")
}

async fn must_get<S: Store + ?Sized>(store: &S, key: &str) -> KeyValue {
    store
        .get(key)
        .await
        .expect("get")
        .unwrap_or_else(|| panic!("{key} is present"))
}

/// The next item of a watch, failing the test after [`WATCH_TIMEOUT`].
pub async fn next_item(
    stream: &mut BoxStream<'static, Result<WatchBatch>>,
) -> Option<Result<WatchBatch>> {
    tokio::time::timeout(WATCH_TIMEOUT, stream.next())
        .await
        .expect("watch delivers within the timeout")
}

/// Collects batches until one at revision `>= until` (which is included);
/// fails on an error, on the stream's end or on timeout.
pub async fn collect_until(
    mut stream: BoxStream<'static, Result<WatchBatch>>,
    until: u64,
) -> Vec<WatchBatch> {
    let mut out = Vec::new();
    loop {
        let batch = next_item(&mut stream)
            .await
            .expect("watch stream stays open")
            .expect("watch yields batches");
        let revision = batch.revision;
        out.push(batch);
        if revision >= until {
            return out;
        }
    }
}

/// Asserts that batches are in strictly increasing revision order, non-empty,
/// and that every event's key is under `prefix` with `mod_revision` equal to
/// its batch's revision.
fn assert_well_formed(batches: &[WatchBatch], prefix: &str) {
    let mut last = None;
    for batch in batches {
        assert!(
            !batch.events.is_empty(),
            "batch {} is empty",
            batch.revision
        );
        if let Some(last) = last {
            assert!(
                batch.revision > last,
                "revision {} after {last}",
                batch.revision
            );
        }
        last = Some(batch.revision);
        for event in &batch.events {
            assert!(
                event.kv.key.starts_with(prefix),
                "{} outside {prefix}",
                event.kv.key
            );
            assert_eq!(event.kv.mod_revision, batch.revision, "event mod_revision");
        }
    }
}

/// `(revision, kind, key, value)` of every event, to compare histories.
fn flatten(batches: &[WatchBatch]) -> Vec<(u64, EventKind, String, Vec<u8>)> {
    batches
        .iter()
        .flat_map(|b| {
            b.events
                .iter()
                .map(|e| (b.revision, e.kind, e.kv.key.clone(), e.kv.value.clone()))
        })
        .collect()
}

// ------------------------------------------------------------------ tests

/// One revision per successful txn, whatever the number of ops; failed,
/// empty and no-op txns do not bump it.
pub async fn revision_per_txn<S: Store + ?Sized>(store: &S) {
    let p = "/testsuite/revision_per_txn/";
    let start = current(store).await;

    let r1 = must_write(
        store,
        vec![
            put(&format!("{p}a"), "1"),
            put(&format!("{p}b"), "2"),
            put(&format!("{p}c"), "3"),
        ],
    )
    .await;
    assert_eq!(r1, start + 1, "one revision for a 3-op txn");
    assert_eq!(current(store).await, r1);
    for k in ["a", "b", "c"] {
        assert_eq!(must_get(store, &format!("{p}{k}")).await.mod_revision, r1);
    }

    let r2 = must_write(store, vec![put(&format!("{p}a"), "4")]).await;
    assert_eq!(r2, r1 + 1);

    let failed = store
        .txn(
            vec![Compare::Absent(format!("{p}a"))],
            vec![put(&format!("{p}d"), "x")],
        )
        .await
        .expect("txn");
    assert_eq!(
        failed,
        TxnResult {
            succeeded: false,
            revision: r2
        }
    );

    let empty = store.txn(vec![], vec![]).await.expect("txn");
    assert_eq!(
        empty,
        TxnResult {
            succeeded: true,
            revision: r2
        }
    );

    let noop = store
        .txn(
            vec![],
            vec![
                delete(&format!("{p}absent1")),
                delete(&format!("{p}absent2")),
            ],
        )
        .await
        .expect("txn");
    assert_eq!(
        noop,
        TxnResult {
            succeeded: true,
            revision: r2
        }
    );
    assert_eq!(current(store).await, r2);
}

/// `Compare::Absent` creates once; a second create fails and writes nothing.
pub async fn create_if_absent<S: Store + ?Sized>(store: &S) {
    let p = "/testsuite/create_if_absent/";
    let key = format!("{p}k");
    let other = format!("{p}other");

    let created = store
        .txn(vec![Compare::Absent(key.clone())], vec![put(&key, "first")])
        .await
        .expect("txn");
    assert!(created.succeeded);

    let again = store
        .txn(
            vec![Compare::Absent(key.clone())],
            vec![put(&key, "second"), put(&other, "side effect")],
        )
        .await
        .expect("txn");
    assert_eq!(
        again,
        TxnResult {
            succeeded: false,
            revision: created.revision
        }
    );
    let kv = must_get(store, &key).await;
    assert_eq!(kv.value, b"first");
    assert_eq!(kv.mod_revision, created.revision);
    assert_eq!(
        store.get(&other).await.expect("get"),
        None,
        "failed txn wrote nothing"
    );
    assert_eq!(current(store).await, created.revision);

    // All compares must hold: one absent, one present → fails.
    let mixed = store
        .txn(
            vec![
                Compare::Absent(format!("{p}nope")),
                Compare::Absent(key.clone()),
            ],
            vec![put(&other, "x")],
        )
        .await
        .expect("txn");
    assert!(!mixed.succeeded);
    assert_eq!(store.get(&other).await.expect("get"), None);
}

/// `Compare::ModRevision` succeeds only with the key's current mod_revision.
pub async fn cas_mod_revision<S: Store + ?Sized>(store: &S) {
    let p = "/testsuite/cas_mod_revision/";
    let key = format!("{p}k");

    let absent = store
        .txn(
            vec![Compare::ModRevision(key.clone(), 0)],
            vec![put(&key, "x")],
        )
        .await
        .expect("txn");
    assert!(!absent.succeeded, "ModRevision on an absent key fails");
    assert_eq!(store.get(&key).await.expect("get"), None);

    let r1 = must_write(store, vec![put(&key, "v1")]).await;
    let r2 = must_write(store, vec![put(&key, "v2")]).await;

    let stale = store
        .txn(
            vec![Compare::ModRevision(key.clone(), r1)],
            vec![put(&key, "stale")],
        )
        .await
        .expect("txn");
    assert_eq!(
        stale,
        TxnResult {
            succeeded: false,
            revision: r2
        }
    );
    assert_eq!(must_get(store, &key).await.value, b"v2");

    let future = store
        .txn(
            vec![Compare::ModRevision(key.clone(), r2 + 100)],
            vec![put(&key, "future")],
        )
        .await
        .expect("txn");
    assert!(!future.succeeded);

    let ok = store
        .txn(
            vec![Compare::ModRevision(key.clone(), r2)],
            vec![put(&key, "v3")],
        )
        .await
        .expect("txn");
    assert_eq!(
        ok,
        TxnResult {
            succeeded: true,
            revision: r2 + 1
        }
    );
    assert_eq!(must_get(store, &key).await.value, b"v3");

    // The old revision no longer matches; a delete guarded by the new one works.
    let del = store
        .txn(
            vec![Compare::ModRevision(key.clone(), ok.revision)],
            vec![delete(&key)],
        )
        .await
        .expect("txn");
    assert!(del.succeeded);
    assert_eq!(store.get(&key).await.expect("get"), None);
}

/// `Compare::CreateRevision` holds while the key exists with that creation
/// revision, however often it is modified; not after delete and re-create.
pub async fn cas_create_revision<S: Store + ?Sized>(store: &S) {
    let p = "/testsuite/cas_create_revision/";
    let key = format!("{p}k");

    let absent = store
        .txn(
            vec![Compare::CreateRevision(key.clone(), 0)],
            vec![put(&key, "x")],
        )
        .await
        .expect("txn");
    assert!(!absent.succeeded, "CreateRevision on an absent key fails");
    assert_eq!(store.get(&key).await.expect("get"), None);

    let created = must_write(store, vec![put(&key, "v1")]).await;
    let modified = must_write(store, vec![put(&key, "v2")]).await;

    let wrong = store
        .txn(
            vec![Compare::CreateRevision(key.clone(), modified)],
            vec![put(&key, "no")],
        )
        .await
        .expect("txn");
    assert_eq!(
        wrong,
        TxnResult {
            succeeded: false,
            revision: modified
        }
    );

    let ok = store
        .txn(
            vec![Compare::CreateRevision(key.clone(), created)],
            vec![put(&key, "v3")],
        )
        .await
        .expect("txn");
    assert_eq!(
        ok,
        TxnResult {
            succeeded: true,
            revision: modified + 1
        }
    );
    assert_eq!(must_get(store, &key).await.value, b"v3");

    // Deleted and re-created: the old creation revision no longer holds.
    must_write(store, vec![delete(&key)]).await;
    let recreated = must_write(store, vec![put(&key, "new")]).await;
    let stale = store
        .txn(
            vec![Compare::CreateRevision(key.clone(), created)],
            vec![put(&key, "stale")],
        )
        .await
        .expect("txn");
    assert!(!stale.succeeded);
    let both = store
        .txn(
            vec![
                Compare::CreateRevision(key.clone(), recreated),
                Compare::ModRevision(key.clone(), recreated),
            ],
            vec![put(&key, "both")],
        )
        .await
        .expect("txn");
    assert!(both.succeeded);
}

/// `Compare::NoWritesUnder` pins a range read: it holds while nothing under
/// the prefix is created or modified after the read's revision (deleting
/// does not count), and only under that prefix (`/p/a/` is not `/p/ab`).
pub async fn cas_no_writes_under<S: Store + ?Sized>(store: &S) {
    let p = "/testsuite/cas_no_writes_under/";
    let dir = format!("{p}a/");
    let (kvs, empty_at) = store.range(&dir).await.expect("range");
    assert!(kvs.is_empty());
    // A write beside the prefix does not break it.
    must_write(store, vec![put(&format!("{p}ab"), "beside")]).await;
    let ok = store
        .txn(
            vec![Compare::NoWritesUnder(dir.clone(), empty_at)],
            vec![put(&format!("{p}marker"), "1")],
        )
        .await
        .expect("txn");
    assert!(ok.succeeded, "an empty prefix is still empty");

    // A key created under it after the read: the empty read no longer holds.
    must_write(store, vec![put(&format!("{dir}x"), "1")]).await;
    let stale = store
        .txn(
            vec![Compare::NoWritesUnder(dir.clone(), empty_at)],
            vec![put(&format!("{p}marker"), "2")],
        )
        .await
        .expect("txn");
    assert!(!stale.succeeded, "a key created under the prefix breaks it");
    assert_eq!(must_get(store, &format!("{p}marker")).await.value, b"1");

    // Read again: holds until a key under it is modified.
    let (kvs, at) = store.range(&dir).await.expect("range");
    assert_eq!(kvs.len(), 1);
    let ok = store
        .txn(vec![Compare::NoWritesUnder(dir.clone(), at)], vec![])
        .await
        .expect("txn");
    assert!(ok.succeeded);
    must_write(store, vec![put(&format!("{dir}x"), "2")]).await;
    let stale = store
        .txn(vec![Compare::NoWritesUnder(dir.clone(), at)], vec![])
        .await
        .expect("txn");
    assert!(
        !stale.succeeded,
        "a key modified under the prefix breaks it"
    );

    // Deleting under it does not.
    let (_, at) = store.range(&dir).await.expect("range");
    must_write(store, vec![delete(&format!("{dir}x"))]).await;
    let ok = store
        .txn(vec![Compare::NoWritesUnder(dir.clone(), at)], vec![])
        .await
        .expect("txn");
    assert!(
        ok.succeeded,
        "a delete leaves nothing written after the read"
    );
}

/// create_revision, mod_revision and version through create, update,
/// delete and re-create.
pub async fn revision_bookkeeping<S: Store + ?Sized>(store: &S) {
    let p = "/testsuite/revision_bookkeeping/";
    let key = format!("{p}k");

    let r1 = must_write(store, vec![put(&key, "a")]).await;
    let kv = must_get(store, &key).await;
    assert_eq!(
        kv,
        KeyValue {
            key: key.clone(),
            value: b"a".to_vec(),
            create_revision: r1,
            mod_revision: r1,
            version: 1,
        }
    );

    let r2 = must_write(store, vec![put(&key, "b")]).await;
    let r3 = must_write(store, vec![put(&key, "c")]).await;
    let kv = must_get(store, &key).await;
    assert_eq!(
        (kv.create_revision, kv.mod_revision, kv.version),
        (r1, r3, 3)
    );
    assert!(r1 < r2 && r2 < r3);

    // An unrelated write does not touch the key.
    let r4 = must_write(store, vec![put(&format!("{p}other"), "x")]).await;
    assert_eq!(must_get(store, &key).await.mod_revision, r3);

    let r5 = must_write(store, vec![delete(&key)]).await;
    assert_eq!(r5, r4 + 1);
    assert_eq!(store.get(&key).await.expect("get"), None);

    let r6 = must_write(store, vec![put(&key, "again")]).await;
    let kv = must_get(store, &key).await;
    assert_eq!(
        (kv.create_revision, kv.mod_revision, kv.version),
        (r6, r6, 1),
        "re-created"
    );
}

/// Deleting an absent key is a no-op: no revision, no event; mixed with a
/// put, only the put shows.
pub async fn delete_absent_is_noop<S: Store + ?Sized>(store: &S) {
    let p = "/testsuite/delete_absent_is_noop/";
    let start = current(store).await;

    let noop = store
        .txn(vec![], vec![delete(&format!("{p}ghost"))])
        .await
        .expect("txn");
    assert_eq!(
        noop,
        TxnResult {
            succeeded: true,
            revision: start
        }
    );

    let r = must_write(
        store,
        vec![delete(&format!("{p}ghost")), put(&format!("{p}real"), "v")],
    )
    .await;
    assert_eq!(r, start + 1);

    let batches = collect_until(store.watch(p, start), r).await;
    assert_eq!(batches.len(), 1);
    assert_eq!(batches[0].revision, r);
    assert_eq!(batches[0].events.len(), 1, "no event for the absent key");
    assert_eq!(batches[0].events[0].kind, EventKind::Put);
    assert_eq!(batches[0].events[0].kv.key, format!("{p}real"));
}

/// `range` is a plain string-prefix scan in key order, with the revision.
pub async fn range_by_prefix<S: Store + ?Sized>(store: &S) {
    let p = "/testsuite/range_by_prefix/";
    let keys = ["a", "a/b", "a/b/c", "a/bc", "ab", "b"];
    let r = must_write(
        store,
        keys.iter().map(|k| put(&format!("{p}{k}"), *k)).collect(),
    )
    .await;

    let names = |kvs: &[KeyValue]| -> Vec<String> {
        kvs.iter().map(|kv| kv.key[p.len()..].to_owned()).collect()
    };

    let (all, rev) = store.range(p).await.expect("range");
    assert_eq!(rev, current(store).await);
    assert!(rev >= r);
    assert_eq!(names(&all), keys);
    for kv in &all {
        assert_eq!(kv.value, &kv.key.as_bytes()[p.len()..]);
        assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (r, r, 1));
    }

    let (ab, _) = store.range(&format!("{p}a/b")).await.expect("range");
    assert_eq!(
        names(&ab),
        ["a/b", "a/b/c", "a/bc"],
        "plain prefix includes siblings"
    );
    let (dir, _) = store.range(&format!("{p}a/b/")).await.expect("range");
    assert_eq!(names(&dir), ["a/b/c"]);
    let (exact, _) = store.range(&format!("{p}ab")).await.expect("range");
    assert_eq!(names(&exact), ["ab"]);
    let (none, rev_none) = store.range(&format!("{p}zzz")).await.expect("range");
    assert!(none.is_empty());
    assert_eq!(rev_none, rev);

    let r2 = must_write(store, vec![delete(&format!("{p}a/b/c"))]).await;
    let (dir, rev) = store.range(&format!("{p}a/b/")).await.expect("range");
    assert!(dir.is_empty());
    assert!(rev >= r2);
}

/// A watch from revision 0 replays every event under the prefix, in order,
/// skipping revisions with nothing under it.
pub async fn watch_replays_from_zero<S: Store + ?Sized>(store: &S) {
    let p = "/testsuite/watch_replays_from_zero/";
    let sibling = "/testsuite/watch_replays_from_zero_sibling/";
    let mut expected = Vec::new();
    let mut last = 0;
    for i in 0..10u32 {
        let key = format!("{p}k{}", i % 3);
        last = must_write(
            store,
            vec![
                put(&key, i.to_string()),
                put(&format!("{sibling}x"), "noise"),
            ],
        )
        .await;
        expected.push((last, EventKind::Put, key, i.to_string().into_bytes()));
        // A revision with only noise must be skipped.
        must_write(store, vec![put(&format!("{sibling}y"), i.to_string())]).await;
    }
    let r = must_write(store, vec![delete(&format!("{p}k0"))]).await;
    expected.push((r, EventKind::Delete, format!("{p}k0"), b"9".to_vec()));
    last = last.max(r);

    let batches = collect_until(store.watch(p, 0), last).await;
    assert_well_formed(&batches, p);
    assert_eq!(flatten(&batches), expected);
}

/// Watching from revision R delivers exactly the events after R: read part
/// of the history, drop the stream, resume from the last delivered revision;
/// the union is the full history without duplicates.
pub async fn watch_resume_exactly_once<S: Store + ?Sized>(store: &S) {
    let p = "/testsuite/watch_resume_exactly_once/";
    let start = current(store).await;
    let mut last = start;
    for i in 0..30u32 {
        last = must_write(store, vec![put(&format!("{p}k{}", i % 4), i.to_string())]).await;
    }
    let full = collect_until(store.watch(p, start), last).await;
    assert_eq!(full.len(), 30);
    assert_well_formed(&full, p);

    let mut stream = store.watch(p, start);
    let mut first = Vec::new();
    for _ in 0..10 {
        first.push(next_item(&mut stream).await.expect("open").expect("batch"));
    }
    drop(stream);
    let resume_from = first.last().expect("read 10 batches").revision;
    let rest = collect_until(store.watch(p, resume_from), last).await;
    assert!(
        rest.iter().all(|b| b.revision > resume_from),
        "nothing at or before R"
    );

    let mut union = first.clone();
    union.extend(rest);
    assert_eq!(union, full, "resumed history equals the full history");

    // Watching from the middle of the history starts right after it.
    let mid = full[14].revision;
    let tail = collect_until(store.watch(p, mid), last).await;
    assert_eq!(tail, full[15..]);
}

/// Many and large revisions: every batch holds its whole revision, in order.
pub async fn watch_large_history<S: Store + ?Sized>(store: &S) {
    let p = "/testsuite/watch_large_history/";
    let start = current(store).await;
    let mut last = start;
    for round in 0..5u32 {
        let ops = (0..300u32)
            .map(|i| put(&format!("{p}{i:04}"), format!("{round}")))
            .collect();
        last = must_write(store, ops).await;
    }
    for i in 0..200u32 {
        last = must_write(store, vec![put(&format!("{p}small"), i.to_string())]).await;
    }
    let batches = collect_until(store.watch(p, start), last).await;
    assert_well_formed(&batches, p);
    assert_eq!(batches.len(), 205);
    for (round, batch) in batches[..5].iter().enumerate() {
        assert_eq!(batch.events.len(), 300, "revision {} whole", batch.revision);
        for (i, event) in batch.events.iter().enumerate() {
            assert_eq!(event.kv.key, format!("{p}{i:04}"), "operation order");
            assert_eq!(event.kv.value, round.to_string().into_bytes());
        }
    }
    for (i, batch) in batches[5..].iter().enumerate() {
        assert_eq!(batch.events.len(), 1);
        assert_eq!(batch.events[0].kv.value, i.to_string().into_bytes());
    }
}

/// History first, then live events on the same stream; a watch from the
/// current revision sees only later writes.
pub async fn watch_live_after_history<S: Store + ?Sized>(store: &S) {
    let p = "/testsuite/watch_live_after_history/";
    let start = current(store).await;
    let mut history = Vec::new();
    for i in 0..3u32 {
        history.push(must_write(store, vec![put(&format!("{p}h{i}"), "old")]).await);
    }
    let mut stream = store.watch(p, start);
    let now = current(store).await;
    let mut from_now = store.watch(p, now);
    for r in &history {
        let batch = next_item(&mut stream).await.expect("open").expect("batch");
        assert_eq!(batch.revision, *r);
    }

    let writer = async {
        let mut live = Vec::new();
        for i in 0..3u32 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            live.push(must_write(store, vec![put(&format!("{p}l{i}"), "new")]).await);
        }
        live
    };
    let reader = async {
        let mut seen = Vec::new();
        for _ in 0..3 {
            let batch = next_item(&mut stream).await.expect("open").expect("batch");
            assert_eq!(batch.events[0].kv.value, b"new");
            seen.push(batch.revision);
        }
        seen
    };
    let (live, seen) = futures::join!(writer, reader);
    assert_eq!(seen, live, "live events in commit order");

    for r in &live {
        let batch = next_item(&mut from_now)
            .await
            .expect("open")
            .expect("batch");
        assert_eq!(
            batch.revision, *r,
            "a watch from now sees only later writes"
        );
    }
}

/// All events of one txn under the prefix come in one batch, in operation
/// order; events of the txn outside the prefix are left out.
pub async fn watch_txn_in_one_batch<S: Store + ?Sized>(store: &S) {
    let p = "/testsuite/watch_txn_in_one_batch/";
    let start = current(store).await;
    must_write(store, vec![put(&format!("{p}c"), "old-c")]).await;
    let r = must_write(
        store,
        vec![
            put(&format!("{p}b"), "1"),
            put("/testsuite/elsewhere/x", "outside"),
            put(&format!("{p}a"), "2"),
            delete(&format!("{p}c")),
        ],
    )
    .await;
    let batches = collect_until(store.watch(p, start), r).await;
    assert_eq!(batches.len(), 2);
    let batch = &batches[1];
    assert_eq!(batch.revision, r);
    let got: Vec<(EventKind, String)> = batch
        .events
        .iter()
        .map(|e| (e.kind, e.kv.key.clone()))
        .collect();
    assert_eq!(
        got,
        [
            (EventKind::Put, format!("{p}b")),
            (EventKind::Put, format!("{p}a")),
            (EventKind::Delete, format!("{p}c")),
        ]
    );
}

/// Put events carry the previous key-value when there was one; delete events
/// carry the deleted value (in `kv` and `prev`) at the deleting revision.
pub async fn watch_delete_carries_prev<S: Store + ?Sized>(store: &S) {
    let p = "/testsuite/watch_delete_carries_prev/";
    let key = format!("{p}k");
    let start = current(store).await;
    let r1 = must_write(store, vec![put(&key, "v1")]).await;
    let r2 = must_write(store, vec![put(&key, "v2")]).await;
    let r3 = must_write(store, vec![delete(&key)]).await;

    let batches = collect_until(store.watch(p, start), r3).await;
    let events: Vec<&Event> = batches.iter().flat_map(|b| &b.events).collect();
    assert_eq!(events.len(), 3);

    let v1 = KeyValue {
        key: key.clone(),
        value: b"v1".to_vec(),
        create_revision: r1,
        mod_revision: r1,
        version: 1,
    };
    let v2 = KeyValue {
        key: key.clone(),
        value: b"v2".to_vec(),
        create_revision: r1,
        mod_revision: r2,
        version: 2,
    };
    assert_eq!(events[0].kind, EventKind::Put);
    assert_eq!(events[0].kv, v1);
    assert_eq!(events[0].prev, None);

    assert_eq!(events[1].kind, EventKind::Put);
    assert_eq!(events[1].kv, v2);
    assert_eq!(events[1].prev.as_ref(), Some(&v1));

    assert_eq!(events[2].kind, EventKind::Delete);
    assert_eq!(events[2].kv.key, key);
    assert_eq!(
        events[2].kv.value, b"v2",
        "delete carries the deleted value"
    );
    assert_eq!(events[2].kv.mod_revision, r3);
    assert_eq!(events[2].prev.as_ref(), Some(&v2));
}

/// After `writes` writes to a store keeping far fewer revisions of history,
/// a watch from revision 0 yields `Error::Compacted` and ends; a watch from
/// the latest revisions still works.
pub async fn watch_compacted<S: Store + ?Sized>(store: &S, writes: u64) {
    let p = "/testsuite/watch_compacted/";
    let mut last = 0;
    for i in 0..writes {
        last = must_write(store, vec![put(&format!("{p}k"), i.to_string())]).await;
    }
    let mut stream = store.watch(p, 0);
    match next_item(&mut stream).await {
        Some(Err(Error::Compacted {
            requested,
            compacted,
        })) => {
            assert_eq!(requested, 0);
            assert!(
                compacted > 0 && compacted < last,
                "compacted {compacted} of {last}"
            );
        }
        other => panic!("expected Error::Compacted, got {other:?}"),
    }
    assert!(
        next_item(&mut stream).await.is_none(),
        "the stream ends after Compacted"
    );

    let recent = collect_until(store.watch(p, last - 1), last).await;
    assert_eq!(recent.len(), 1);
    assert_eq!(
        recent[0].events[0].kv.value,
        (writes - 1).to_string().into_bytes()
    );
}

/// 50 tasks each do 20 CAS increments of one counter (retrying on conflict):
/// the counter ends at exactly 1000, every success has its own revision,
/// each task sees its revisions strictly increase, and the watch history is
/// 1..=1000 in revision order.
pub async fn concurrent_cas_counter<S: Store + ?Sized>(store: Arc<S>) {
    const TASKS: usize = 50;
    const INCREMENTS: u64 = 20;
    let key = "/testsuite/concurrent_cas_counter/n".to_owned();
    let start = current(&*store).await;

    let mut handles = Vec::new();
    for _ in 0..TASKS {
        let store = Arc::clone(&store);
        let key = key.clone();
        handles.push(tokio::spawn(async move {
            let mut revisions = Vec::new();
            while (revisions.len() as u64) < INCREMENTS {
                let current = store.get(&key).await.expect("get");
                let (compare, n) = match &current {
                    None => (Compare::Absent(key.clone()), 0u64),
                    Some(kv) => {
                        let text = std::str::from_utf8(&kv.value).expect("counter is UTF-8");
                        (
                            Compare::ModRevision(key.clone(), kv.mod_revision),
                            text.parse().expect("counter is a number"),
                        )
                    }
                };
                let result = store
                    .txn(vec![compare], vec![put(&key, (n + 1).to_string())])
                    .await
                    .expect("txn");
                if result.succeeded {
                    revisions.push(result.revision);
                }
            }
            revisions
        }));
    }
    let mut all = BTreeSet::new();
    for handle in handles {
        let revisions = handle.await.expect("task does not panic");
        assert!(
            revisions.windows(2).all(|w| w[0] < w[1]),
            "per-task revisions increase"
        );
        for r in revisions {
            assert!(r > start);
            assert!(all.insert(r), "revision {r} given to two txns");
        }
    }
    let total = (TASKS as u64) * INCREMENTS;
    assert_eq!(all.len() as u64, total);

    let kv = must_get(&*store, &key).await;
    assert_eq!(kv.value, total.to_string().into_bytes());
    assert_eq!(kv.version, total);
    let last = *all.last().expect("there were increments");
    assert_eq!(kv.mod_revision, last);

    let batches = collect_until(store.watch(&key, start), last).await;
    let revisions: BTreeSet<u64> = batches.iter().map(|b| b.revision).collect();
    assert_eq!(revisions, all, "the watch sees exactly the successful txns");
    let values: Vec<Vec<u8>> = batches
        .iter()
        .map(|b| {
            assert_eq!(b.events.len(), 1);
            b.events[0].kv.value.clone()
        })
        .collect();
    let expected: Vec<Vec<u8>> = (1..=total).map(|n| n.to_string().into_bytes()).collect();
    assert_eq!(values, expected, "increments in revision order");
}

/// One `#[tokio::test]` per single-store conformance test, each on a fresh
/// store. `$fresh` is a future yielding `(guard, store)`; the guard (a temp
/// dir, a test cluster) lives as long as the test. Every backend invokes
/// this once, so the list of tests lives here and a test added to the suite
/// runs against every backend.
#[macro_export]
macro_rules! conformance_tests {
    ($fresh:expr) => {
        $crate::conformance_tests!(@each $fresh;
            revision_per_txn,
            create_if_absent,
            cas_mod_revision,
            cas_create_revision,
            cas_no_writes_under,
            revision_bookkeeping,
            delete_absent_is_noop,
            range_by_prefix,
            watch_replays_from_zero,
            watch_resume_exactly_once,
            watch_large_history,
            watch_live_after_history,
            watch_txn_in_one_batch,
            watch_delete_carries_prev,
        );
    };
    (@each $fresh:expr; $($name:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let (_guard, store) = $fresh.await;
            $crate::testsuite::$name(&store).await;
        }
    )*};
}
