//! The embedded backend: a crash-safe `redb` database file.
//!
//! # Tables
//! - `kv`: key → `codec` KV record (value, create/mod revision, version).
//! - `log`: `(revision, index)` → `codec` event record, one entry per event
//!   in operation order, so watches can replay history.
//! - `meta`: the current revision and the compacted revision.
//!
//! Every write transaction that changes something commits at the next
//! revision with [`Durability::Immediate`] (fsync) before [`Store::txn`]
//! returns, then publishes the revision on a [`tokio::sync::watch`] channel
//! that wakes the watchers. A watcher reads the log from its next revision in
//! bounded batches and waits on the channel once it has caught up, so history
//! and live events come from the same place: in order, exactly once, with no
//! race between them.
//!
//! Compaction runs inside write transactions: once the log holds more than
//! `history + interval` revisions, entries of revisions `<= current - history`
//! are removed and that revision is recorded as compacted.

mod codec;

use std::collections::VecDeque;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};

use futures::StreamExt;
use futures::stream::BoxStream;
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, Table, TableDefinition, WriteTransaction,
};
use tokio::sync::watch;

use crate::{Compare, Error, Event, EventKind, KeyValue, Op, Result, Store, TxnResult, WatchBatch};

/// How many revisions of event log are kept by default (see
/// [`EmbeddedStore::open_with_history`]).
pub const DEFAULT_HISTORY_REVISIONS: u64 = 10_000;

/// The conventional file name of the database inside a data directory.
pub const DB_FILE_NAME: &str = "store.redb";

/// Compaction runs at most once per this many revisions (fewer when the
/// history itself is shorter), so its cost is amortized.
const COMPACTION_INTERVAL: u64 = 256;

/// Upper bound on log entries one watch read loads (it may exceed it only to
/// finish the revision it is in, so a revision is never split).
const WATCH_READ_EVENTS: usize = 1024;

const KV: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("kv");
const LOG: TableDefinition<'_, (u64, u32), &[u8]> = TableDefinition::new("log");
const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");

const META_REVISION: &str = "revision";
const META_COMPACTED: &str = "compacted";

/// The embedded [`Store`]: a `redb` file with etcd semantics.
///
/// Cheap to clone (an `Arc` inside); every clone is the same store. The
/// database closes when the last clone is dropped and in-flight calls have
/// finished (a call's blocking task holds the store until it completes, even
/// if its future was dropped); watch streams do not keep it open and end at
/// that point.
///
/// Delete events carry the deleted key-value (value, `create_revision`,
/// `version`) with `mod_revision` set to the deleting revision, and the same
/// key-value unchanged in `prev`. A watch whose history was compacted gets
/// [`Error::Compacted`] with `requested` = the last revision it had seen
/// (its `after_revision` when nothing was delivered yet).
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    path: PathBuf,
    /// Revisions of event log kept by compaction.
    history: u64,
    /// The latest committed revision, published after each commit.
    notify: watch::Sender<u64>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        tracing::info!(path = %self.path.display(), "embedded store closed");
    }
}

impl fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.inner.path)
            .field("history", &self.inner.history)
            .field("revision", &*self.inner.notify.borrow())
            .finish()
    }
}

/// Maps a backend error to [`Error::Backend`] with what was being done.
fn backend<E: fmt::Display>(context: &'static str) -> impl FnOnce(E) -> Error {
    move |e| Error::Backend(format!("{context}: {e}"))
}

impl EmbeddedStore {
    /// Creates or opens the database file at `path` (e.g.
    /// `<data-dir>/`[`DB_FILE_NAME`]), keeping [`DEFAULT_HISTORY_REVISIONS`]
    /// revisions of history. Missing parent directories are created.
    ///
    /// Blocks while the file is opened (and, after a crash, repaired): call
    /// it at startup or from a blocking context.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with_history(path, DEFAULT_HISTORY_REVISIONS)
    }

    /// Like [`open`](Self::open), keeping `history_revisions` revisions of
    /// event log: a watch from a revision older than that may get
    /// [`Error::Compacted`].
    pub fn open_with_history(path: &Path, history_revisions: u64) -> Result<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| {
                Error::Backend(format!(
                    "failed to create store directory {}: {e}",
                    parent.display()
                ))
            })?;
        }
        let db = Database::create(path).map_err(|e| {
            Error::Backend(format!(
                "failed to open store database {}: {e}",
                path.display()
            ))
        })?;
        // Create the tables so read transactions always find them.
        let wtx = db
            .begin_write()
            .map_err(backend("failed to begin store write transaction"))?;
        let revision = {
            wtx.open_table(KV)
                .map_err(backend("failed to open store kv table"))?;
            wtx.open_table(LOG)
                .map_err(backend("failed to open store log table"))?;
            let meta = wtx
                .open_table(META)
                .map_err(backend("failed to open store meta table"))?;
            meta_get(&meta, META_REVISION)?
        };
        wtx.commit()
            .map_err(backend("failed to commit store transaction"))?;
        tracing::debug!(path = %path.display(), revision, history_revisions, "opened embedded store");
        let (notify, _) = watch::channel(revision);
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                path: path.to_owned(),
                history: history_revisions,
                notify,
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The newest revision whose events were removed by compaction (0 when
    /// nothing was): watches must start at or after it.
    pub async fn compacted_revision(&self) -> Result<u64> {
        self.blocking(|inner| {
            let rtx = inner
                .db
                .begin_read()
                .map_err(backend("failed to begin store read transaction"))?;
            let meta = rtx
                .open_table(META)
                .map_err(backend("failed to open store meta table"))?;
            meta_get(&meta, META_COMPACTED)
        })
        .await
    }

    /// Runs `f` on the blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(backend("store task failed"))?
    }
}

/// Reads a counter from the meta table (0 when absent).
fn meta_get(meta: &impl ReadableTable<&'static str, u64>, name: &str) -> Result<u64> {
    Ok(meta
        .get(name)
        .map_err(backend("failed to read store meta table"))?
        .map_or(0, |v| v.value()))
}

/// Reads and decodes one key.
fn kv_get(
    kv: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<KeyValue>> {
    match kv
        .get(key)
        .map_err(backend("failed to read store kv table"))?
    {
        Some(bytes) => Ok(Some(codec::decode_kv(key, bytes.value())?)),
        None => Ok(None),
    }
}

/// Whether no key under `prefix` was written after `revision`.
fn no_writes_under(
    kv: &impl ReadableTable<&'static str, &'static [u8]>,
    prefix: &str,
    revision: u64,
) -> Result<bool> {
    for entry in kv
        .range(prefix..)
        .map_err(backend("failed to read store kv table"))?
    {
        let (key, value) = entry.map_err(backend("failed to read store kv table"))?;
        let key = key.value();
        if !key.starts_with(prefix) {
            break;
        }
        if codec::decode_kv(key, value.value())?.mod_revision > revision {
            return Ok(false);
        }
    }
    Ok(true)
}

/// What a write transaction did, before commit.
enum Applied {
    /// A comparison failed; nothing written. Carries the current revision.
    CompareFailed(u64),
    /// Every operation was a no-op; nothing written. Carries the current
    /// revision.
    Unchanged(u64),
    /// Wrote at this new revision.
    Wrote(u64),
}

/// What one watch read found.
enum LogRead {
    /// History from the requested revision is gone; carries the compacted
    /// revision.
    Compacted(u64),
    /// Matching batches, and the revision to read next.
    Batches(Vec<WatchBatch>, u64),
}

impl Inner {
    fn read_kv<T>(
        &self,
        f: impl FnOnce(&redb::ReadOnlyTable<&'static str, &'static [u8]>, u64) -> Result<T>,
    ) -> Result<T> {
        let rtx = self
            .db
            .begin_read()
            .map_err(backend("failed to begin store read transaction"))?;
        let meta = rtx
            .open_table(META)
            .map_err(backend("failed to open store meta table"))?;
        let revision = meta_get(&meta, META_REVISION)?;
        let kv = rtx
            .open_table(KV)
            .map_err(backend("failed to open store kv table"))?;
        f(&kv, revision)
    }

    fn txn(&self, compares: &[Compare], ops: Vec<Op>) -> Result<TxnResult> {
        let mut wtx = self
            .db
            .begin_write()
            .map_err(backend("failed to begin store write transaction"))?;
        wtx.set_durability(Durability::Immediate)
            .map_err(backend("failed to set store transaction durability"))?;
        match self.apply(&wtx, compares, ops)? {
            Applied::CompareFailed(revision) => {
                wtx.abort()
                    .map_err(backend("failed to abort store transaction"))?;
                Ok(TxnResult {
                    succeeded: false,
                    revision,
                })
            }
            Applied::Unchanged(revision) => {
                wtx.abort()
                    .map_err(backend("failed to abort store transaction"))?;
                Ok(TxnResult {
                    succeeded: true,
                    revision,
                })
            }
            Applied::Wrote(revision) => {
                wtx.commit()
                    .map_err(backend("failed to commit store transaction"))?;
                // Monotonic even if another commit's notification overtakes
                // this one.
                self.notify.send_if_modified(|current| {
                    let newer = revision > *current;
                    if newer {
                        *current = revision;
                    }
                    newer
                });
                Ok(TxnResult {
                    succeeded: true,
                    revision,
                })
            }
        }
    }

    /// Checks `compares` and applies `ops` inside `wtx` (not committed).
    fn apply(&self, wtx: &WriteTransaction, compares: &[Compare], ops: Vec<Op>) -> Result<Applied> {
        let mut meta = wtx
            .open_table(META)
            .map_err(backend("failed to open store meta table"))?;
        let mut kv = wtx
            .open_table(KV)
            .map_err(backend("failed to open store kv table"))?;
        let current = meta_get(&meta, META_REVISION)?;

        for compare in compares {
            let holds = match compare {
                Compare::Absent(key) => kv_get(&kv, key)?.is_none(),
                Compare::ModRevision(key, revision) => {
                    kv_get(&kv, key)?.is_some_and(|old| old.mod_revision == *revision)
                }
                Compare::CreateRevision(key, revision) => {
                    kv_get(&kv, key)?.is_some_and(|old| old.create_revision == *revision)
                }
                Compare::NoWritesUnder(prefix, revision) => {
                    no_writes_under(&kv, prefix, *revision)?
                }
            };
            if !holds {
                return Ok(Applied::CompareFailed(current));
            }
        }

        let revision = current
            .checked_add(1)
            .ok_or_else(|| Error::Backend("store revision overflow".to_owned()))?;
        let mut events = Vec::with_capacity(ops.len());
        for op in ops {
            match op {
                Op::Put { key, value } => {
                    let prev = kv_get(&kv, &key)?;
                    let new = KeyValue {
                        create_revision: prev.as_ref().map_or(revision, |p| p.create_revision),
                        version: prev.as_ref().map_or(1, |p| p.version.saturating_add(1)),
                        mod_revision: revision,
                        key,
                        value,
                    };
                    kv.insert(new.key.as_str(), codec::encode_kv(&new).as_slice())
                        .map_err(backend("failed to write store kv table"))?;
                    events.push(Event {
                        kind: EventKind::Put,
                        kv: new,
                        prev,
                    });
                }
                Op::Delete { key } => {
                    let Some(prev) = kv_get(&kv, &key)? else {
                        continue;
                    };
                    kv.remove(key.as_str())
                        .map_err(backend("failed to write store kv table"))?;
                    events.push(Event {
                        kind: EventKind::Delete,
                        kv: KeyValue {
                            mod_revision: revision,
                            ..prev.clone()
                        },
                        prev: Some(prev),
                    });
                }
            }
        }
        if events.is_empty() {
            return Ok(Applied::Unchanged(current));
        }

        let mut log = wtx
            .open_table(LOG)
            .map_err(backend("failed to open store log table"))?;
        for (index, event) in events.iter().enumerate() {
            let index = u32::try_from(index)
                .map_err(|_| Error::Backend("too many operations in one transaction".to_owned()))?;
            log.insert((revision, index), codec::encode_event(event).as_slice())
                .map_err(backend("failed to write store log table"))?;
        }
        meta.insert(META_REVISION, revision)
            .map_err(backend("failed to write store meta table"))?;
        self.maybe_compact(&mut meta, &mut log, revision)?;
        Ok(Applied::Wrote(revision))
    }

    /// Drops log entries older than `history` revisions once enough have
    /// accumulated (at most every [`COMPACTION_INTERVAL`] revisions).
    fn maybe_compact(
        &self,
        meta: &mut Table<'_, &'static str, u64>,
        log: &mut Table<'_, (u64, u32), &'static [u8]>,
        revision: u64,
    ) -> Result<()> {
        let compacted = meta_get(meta, META_COMPACTED)?;
        let interval = self.history.clamp(1, COMPACTION_INTERVAL);
        let due = compacted
            .saturating_add(self.history)
            .saturating_add(interval);
        if revision < due {
            return Ok(());
        }
        let new_compacted = revision - self.history;
        log.retain_in(..=(new_compacted, u32::MAX), |_, _| false)
            .map_err(backend("failed to compact store log"))?;
        meta.insert(META_COMPACTED, new_compacted)
            .map_err(backend("failed to write store meta table"))?;
        tracing::debug!(revision, compacted = new_compacted, "compacted store log");
        Ok(())
    }

    /// Reads log entries of revisions `>= next` (a bounded batch), keeping
    /// those under `prefix`, grouped per revision.
    fn read_log(&self, prefix: &str, next: u64) -> Result<LogRead> {
        let rtx = self
            .db
            .begin_read()
            .map_err(backend("failed to begin store read transaction"))?;
        let meta = rtx
            .open_table(META)
            .map_err(backend("failed to open store meta table"))?;
        let current = meta_get(&meta, META_REVISION)?;
        let compacted = meta_get(&meta, META_COMPACTED)?;
        if next <= compacted {
            return Ok(LogRead::Compacted(compacted));
        }
        let log = rtx
            .open_table(LOG)
            .map_err(backend("failed to open store log table"))?;
        let mut batches: Vec<WatchBatch> = Vec::new();
        let mut last_revision = None;
        let mut resume = current.saturating_add(1);
        let entries = log
            .range((next, 0u32)..)
            .map_err(backend("failed to read store log"))?;
        for (read, entry) in entries.enumerate() {
            let (key, value) = entry.map_err(backend("failed to read store log"))?;
            let (revision, _) = key.value();
            if read >= WATCH_READ_EVENTS && last_revision != Some(revision) {
                resume = revision;
                break;
            }
            last_revision = Some(revision);
            let bytes = value.value();
            if !codec::event_key(bytes)?.starts_with(prefix) {
                continue;
            }
            let event = codec::decode_event(bytes)?;
            match batches.last_mut() {
                Some(batch) if batch.revision == revision => batch.events.push(event),
                _ => batches.push(WatchBatch {
                    revision,
                    events: vec![event],
                }),
            }
        }
        Ok(LogRead::Batches(batches, resume))
    }
}

/// State of one watch stream.
struct Watcher {
    /// Weak so watches don't keep the database open.
    inner: Weak<Inner>,
    revisions: watch::Receiver<u64>,
    prefix: Arc<str>,
    /// First revision not yet delivered (or skipped).
    next: u64,
    pending: VecDeque<WatchBatch>,
    done: bool,
}

impl Watcher {
    /// The next item of the stream; `None` ends it.
    async fn next_item(&mut self) -> Option<Result<WatchBatch>> {
        loop {
            if let Some(batch) = self.pending.pop_front() {
                return Some(Ok(batch));
            }
            if self.done {
                return None;
            }
            let current = *self.revisions.borrow_and_update();
            if self.next > current {
                // Caught up: wait for a commit (or the store's drop).
                if self.revisions.changed().await.is_err() {
                    return None;
                }
                continue;
            }
            let inner = self.inner.upgrade()?;
            let prefix = Arc::clone(&self.prefix);
            let next = self.next;
            let read = tokio::task::spawn_blocking(move || inner.read_log(&prefix, next))
                .await
                .map_err(backend("store task failed"))
                .and_then(|r| r);
            match read {
                Ok(LogRead::Batches(batches, resume)) => {
                    self.pending.extend(batches);
                    self.next = resume;
                }
                Ok(LogRead::Compacted(compacted)) => {
                    self.done = true;
                    return Some(Err(Error::Compacted {
                        requested: next - 1,
                        compacted,
                    }));
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
    }
}

#[async_trait::async_trait]
impl Store for EmbeddedStore {
    async fn current_revision(&self) -> Result<u64> {
        self.blocking(|inner| inner.read_kv(|_, revision| Ok(revision)))
            .await
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let key = key.to_owned();
        self.blocking(move |inner| inner.read_kv(|kv, _| kv_get(kv, &key)))
            .await
    }

    async fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, u64)> {
        let prefix = prefix.to_owned();
        self.blocking(move |inner| {
            inner.read_kv(|kv, revision| {
                let mut out = Vec::new();
                for entry in kv
                    .range(prefix.as_str()..)
                    .map_err(backend("failed to read store kv table"))?
                {
                    let (key, value) = entry.map_err(backend("failed to read store kv table"))?;
                    let key = key.value();
                    if !key.starts_with(prefix.as_str()) {
                        break;
                    }
                    out.push(codec::decode_kv(key, value.value())?);
                }
                Ok((out, revision))
            })
        })
        .await
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnResult> {
        // The blocking task runs to completion even if this future is
        // dropped, so a commit is always followed by its notification.
        self.blocking(move |inner| inner.txn(&compares, ops)).await
    }

    fn watch(&self, prefix: &str, after_revision: u64) -> BoxStream<'static, Result<WatchBatch>> {
        let watcher = Watcher {
            inner: Arc::downgrade(&self.inner),
            revisions: self.inner.notify.subscribe(),
            prefix: Arc::from(prefix),
            next: after_revision.saturating_add(1),
            pending: VecDeque::new(),
            done: false,
        };
        futures::stream::unfold(watcher, |mut watcher| async move {
            let item = watcher.next_item().await?;
            Some((item, watcher))
        })
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testsuite;
    use std::time::Duration;

    fn temp_store(history: u64) -> (tempfile::TempDir, EmbeddedStore) {
        let dir = tempfile::tempdir().expect("tempdir is creatable");
        let store = EmbeddedStore::open_with_history(&dir.path().join(DB_FILE_NAME), history)
            .expect("store opens in a fresh tempdir");
        (dir, store)
    }

    // One test per conformance test of the shared suite, each on a fresh store.
    crate::conformance_tests!(async { temp_store(DEFAULT_HISTORY_REVISIONS) });

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_cas_counter() {
        let (_dir, store) = temp_store(DEFAULT_HISTORY_REVISIONS);
        testsuite::concurrent_cas_counter(Arc::new(store)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watch_compacted() {
        let (_dir, store) = temp_store(10);
        testsuite::watch_compacted(&store, 100).await;
        assert!(store.compacted_revision().await.expect("reads") > 0);
    }

    /// The whole suite on one shared store: the tests must not depend on a
    /// fresh store (as with a shared etcd).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn run_all_on_one_store() {
        let (_dir, store) = temp_store(DEFAULT_HISTORY_REVISIONS);
        testsuite::run_all(Arc::new(store)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reopen_keeps_data_revisions_and_history() {
        let dir = tempfile::tempdir().expect("tempdir is creatable");
        let path = dir.path().join("nested").join(DB_FILE_NAME);
        let put = |key: &str, value: &str| Op::Put {
            key: key.to_owned(),
            value: value.as_bytes().to_vec(),
        };

        let (history, before) = {
            let store = EmbeddedStore::open(&path).expect("store opens");
            let mut last = 0;
            for i in 0..5 {
                last = store
                    .txn(
                        vec![],
                        vec![
                            put(&format!("/r/k{i}"), "v"),
                            put("/r/same", &i.to_string()),
                        ],
                    )
                    .await
                    .expect("txn")
                    .revision;
            }
            store
                .txn(
                    vec![],
                    vec![Op::Delete {
                        key: "/r/k0".to_owned(),
                    }],
                )
                .await
                .expect("txn");
            assert_eq!(last, 5);
            let history = testsuite::collect_until(store.watch("/r/", 0), 6).await;
            let before = store.range("/r/").await.expect("range");
            (history, before)
        };

        let store = EmbeddedStore::open(&path).expect("store reopens after drop");
        assert_eq!(store.current_revision().await.expect("reads"), 6);
        assert_eq!(store.range("/r/").await.expect("range"), before);
        let same = store.get("/r/same").await.expect("get").expect("present");
        assert_eq!(
            (same.create_revision, same.mod_revision, same.version),
            (1, 5, 5)
        );
        assert_eq!(same.value, b"4");
        assert_eq!(
            testsuite::collect_until(store.watch("/r/", 0), 6).await,
            history
        );

        let next = store
            .txn(
                vec![Compare::ModRevision("/r/same".to_owned(), 5)],
                vec![put("/r/same", "x")],
            )
            .await
            .expect("txn");
        assert_eq!(
            next,
            TxnResult {
                succeeded: true,
                revision: 7
            }
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn compaction_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir is creatable");
        let path = dir.path().join(DB_FILE_NAME);
        {
            let store = EmbeddedStore::open_with_history(&path, 4).expect("store opens");
            for i in 0..20u32 {
                store
                    .txn(
                        vec![],
                        vec![Op::Put {
                            key: "/c".to_owned(),
                            value: i.to_be_bytes().to_vec(),
                        }],
                    )
                    .await
                    .expect("txn");
            }
        }
        let store = EmbeddedStore::open_with_history(&path, 4).expect("store reopens");
        let compacted = store.compacted_revision().await.expect("reads");
        assert!(compacted > 0 && compacted <= 16, "compacted {compacted}");
        let mut stream = store.watch("/", 0);
        match stream.next().await {
            Some(Err(Error::Compacted {
                requested: 0,
                compacted: c,
            })) => assert_eq!(c, compacted),
            other => panic!("expected Compacted, got {other:?}"),
        }
        assert!(stream.next().await.is_none(), "stream ends after Compacted");
        // History after the compacted revision is complete.
        let batches = testsuite::collect_until(store.watch("/", compacted), 20).await;
        let revisions: Vec<u64> = batches.iter().map(|b| b.revision).collect();
        assert_eq!(revisions, ((compacted + 1)..=20).collect::<Vec<_>>());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failed_and_noop_txns_leave_no_trace() {
        let (_dir, store) = temp_store(DEFAULT_HISTORY_REVISIONS);
        let r = store
            .txn(
                vec![Compare::Absent("/x".to_owned())],
                vec![Op::Delete {
                    key: "/x".to_owned(),
                }],
            )
            .await
            .expect("txn");
        assert_eq!(
            r,
            TxnResult {
                succeeded: true,
                revision: 0
            }
        );
        use redb::ReadableTableMetadata;
        let rtx = store.inner.db.begin_read().expect("read");
        let log = rtx.open_table(LOG).expect("log table");
        assert!(log.is_empty().expect("len"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watch_ends_when_store_dropped() {
        let (_dir, store) = temp_store(DEFAULT_HISTORY_REVISIONS);
        store
            .txn(
                vec![],
                vec![Op::Put {
                    key: "/w".to_owned(),
                    value: vec![1],
                }],
            )
            .await
            .expect("txn");
        let mut stream = store.watch("/", 0);
        let first = stream.next().await.expect("an item").expect("a batch");
        assert_eq!(first.revision, 1);
        drop(store);
        let end = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("stream ends instead of hanging");
        assert!(end.is_none());
    }

    /// Set (to a database path) only in the child process of
    /// [`kill9_loses_no_acknowledged_write`].
    const CRASH_CHILD_ENV: &str = "SKYMESH_STORE_CRASH_CHILD_DB";

    /// The child of [`kill9_loses_no_acknowledged_write`]: writes until
    /// killed, printing `ack <revision> <n>` once each write is acknowledged.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "child process of kill9_loses_no_acknowledged_write"]
    async fn crash_child_writer() {
        use std::io::Write;
        let Some(path) = std::env::var_os(CRASH_CHILD_ENV) else {
            return;
        };
        let store = EmbeddedStore::open(Path::new(&path)).expect("child opens the store");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        for n in 0..100_000u32 {
            if std::time::Instant::now() > deadline {
                break;
            }
            let revision = testsuite::must_write(
                &store,
                vec![
                    testsuite::put(&format!("/crash/{n:06}"), n.to_string()),
                    testsuite::put("/crash/last", n.to_string()),
                ],
            )
            .await;
            let mut out = std::io::stdout().lock();
            writeln!(out, "ack {revision} {n}").expect("stdout is writable");
            out.flush().expect("stdout flushes");
        }
    }

    /// Every write acknowledged before a SIGKILL is there after reopening.
    #[test]
    fn kill9_loses_no_acknowledged_write() {
        use std::io::BufRead;
        use std::process::{Command, Stdio};

        let dir = tempfile::tempdir().expect("tempdir is creatable");
        let path = dir.path().join(DB_FILE_NAME);
        let mut child = Command::new(std::env::current_exe().expect("test binary path"))
            .args([
                "--exact",
                "embedded::tests::crash_child_writer",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CRASH_CHILD_ENV, &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("child test process starts");
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut acked = Vec::new();
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.expect("child output is readable");
            let Some(rest) = line.strip_prefix("ack ") else {
                continue;
            };
            let (revision, n) = rest.split_once(' ').expect("ack line has two fields");
            acked.push((
                revision.parse::<u64>().expect("revision"),
                n.parse::<u32>().expect("n"),
            ));
            if acked.len() >= 200 {
                break;
            }
        }
        child.kill().expect("child is killed");
        child.wait().expect("child is reaped");
        assert_eq!(acked.len(), 200, "the child acknowledged writes");
        let &(last_revision, last_n) = acked.last().expect("non-empty");

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime builds");
        runtime.block_on(async {
            let store = EmbeddedStore::open(&path).expect("store reopens after SIGKILL");
            let current = store.current_revision().await.expect("reads");
            assert!(
                current >= last_revision,
                "{current} < acked {last_revision}"
            );
            let (kvs, _) = store.range("/crash/").await.expect("range");
            for (revision, n) in &acked {
                let key = format!("/crash/{n:06}");
                let kv = kvs
                    .iter()
                    .find(|kv| kv.key == key)
                    .unwrap_or_else(|| panic!("acknowledged {key} survived"));
                assert_eq!(kv.mod_revision, *revision);
            }
            let last = store
                .get("/crash/last")
                .await
                .expect("get")
                .expect("present");
            let survived_n: u32 = std::str::from_utf8(&last.value)
                .expect("utf8")
                .parse()
                .expect("number");
            assert!(survived_n >= last_n);
            // The history of every surviving revision is intact too.
            let batches = testsuite::collect_until(store.watch("/crash/", 0), current).await;
            assert_eq!(batches.len() as u64, current);
        });
    }

    #[tokio::test]
    async fn open_fails_cleanly_on_garbage_file() {
        let dir = tempfile::tempdir().expect("tempdir is creatable");
        let path = dir.path().join(DB_FILE_NAME);
        std::fs::write(
            &path,
            b"definitely not a redb file, but long enough to look at",
        )
        .expect("write");
        match EmbeddedStore::open(&path) {
            Err(Error::Backend(msg)) => {
                assert!(msg.contains("failed to open store database"), "{msg}")
            }
            other => panic!("expected a backend error, got {other:?}"),
        }
    }
}
