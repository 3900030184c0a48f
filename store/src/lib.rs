//! skymesh's store: a key-value store with etcd's semantics.
//!
//! Every write transaction gets the next global *revision*; every key records
//! the revision that created it and the one that last modified it; a
//! transaction applies its operations only if all its comparisons hold
//! (compare-and-swap); a watch delivers, in order and exactly once, every
//! event under a prefix after a given revision, or [`Error::Compacted`] when
//! that history is gone. The coordinator is written against [`Store`] only,
//! so the embedded backend ([`embedded::EmbeddedStore`]) and an etcd backend
//! are interchangeable.
//!
//! # Layout
//! - `embedded`: the default backend, a crash-safe `redb` file.
//! - `etcd` (feature `etcd`): the etcd backend, for several coordinators
//!   sharing one replicated store.
//! - `testsuite` (feature `testsuite`): conformance tests for any backend.

use futures::stream::BoxStream;

pub mod embedded;
#[cfg(feature = "etcd")]
pub mod etcd;
#[cfg(any(test, feature = "testsuite"))]
pub mod testsuite;

/// A key with its value and revisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the transaction that created the key.
    pub create_revision: u64,
    /// Revision of the transaction that last wrote the key.
    pub mod_revision: u64,
    /// Number of writes since creation (1 after create).
    pub version: u64,
}

/// A condition a transaction checks before it applies its operations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key does not exist.
    Absent(String),
    /// The key exists and was last modified at this revision.
    ModRevision(String, u64),
    /// The key exists and was created at this revision (pins "this very key
    /// still exists, not deleted and re-created", however often it is
    /// modified).
    CreateRevision(String, u64),
    /// No key under the prefix was created or modified after this revision
    /// (keys deleted since do not count). With the revision a
    /// [`Store::range`] was read at, it pins what the range found: that an
    /// empty range is still empty, or that none of its keys changed.
    NoWritesUnder(String, u64),
}

/// A write inside a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
    },
    /// Deleting a key that does not exist is a no-op (no event).
    Delete {
        key: String,
    },
}

/// Outcome of [`Store::txn`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnResult {
    /// False when a comparison failed; nothing was written.
    pub succeeded: bool,
    /// The revision of the write when it succeeded (and wrote something),
    /// else the store's current revision.
    pub revision: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change to one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    /// For `Put`, the new key-value. For `Delete`, the key with its value just
    /// before deletion, and `mod_revision` set to the deleting revision.
    pub kv: KeyValue,
    /// The previous key-value, if the key existed before this event.
    pub prev: Option<KeyValue>,
}

/// Every event of one revision under the watched prefix, in operation order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchBatch {
    pub revision: u64,
    pub events: Vec<Event>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The requested revision is older than the oldest one kept.
    #[error("revision {requested} is too old (history starts after {compacted}); relist")]
    Compacted { requested: u64, compacted: u64 },
    #[error("store backend error: {0}")]
    Backend(String),
    #[error("store is closed")]
    Closed,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The store contract. Implementations must be safe to share across tasks.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// The revision of the latest write (0 for an empty store).
    async fn current_revision(&self) -> Result<u64>;
    /// One key.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>>;
    /// Every key starting with `prefix`, in key order, with the revision the
    /// read was consistent at.
    async fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, u64)>;
    /// If every comparison holds, apply `ops` atomically at one new revision.
    /// When the call returns `succeeded`, the write is durable.
    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnResult>;
    /// Events under `prefix` with revision > `after_revision`, then live
    /// events as they happen, one [`WatchBatch`] per revision. Starts with
    /// `Err(Error::Compacted)` (and ends) if history after `after_revision`
    /// is no longer complete.
    fn watch(&self, prefix: &str, after_revision: u64) -> BoxStream<'static, Result<WatchBatch>>;
}
