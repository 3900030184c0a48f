//! The etcd backend: the [`Store`] contract mapped onto a real etcd (v3 API)
//! through the `etcd-client` crate, so several coordinators can share one
//! replicated store.
//!
//! # Mapping
//! - Keys: store key `k` is etcd key `<prefix>k`, where `<prefix>` is the
//!   prefix given to [`EtcdStore::connect`] without its trailing `/` (so
//!   `/skymesh` holds `/registry/...` at `/skymesh/registry/...`). Store keys
//!   start with `/` (every skymesh key does); ranges and watches never reach
//!   outside the prefix.
//! - Revisions: etcd's own. A txn whose comparisons hold and that changes at
//!   least one key bumps etcd's revision exactly once; etcd does not bump it
//!   for transactions that change nothing (failed comparisons, no ops,
//!   deletes of absent keys), which is the store contract. The revision is
//!   global to the etcd cluster: writes by other etcd users (other prefixes)
//!   bump it too, so watches skip revisions with nothing under their prefix,
//!   as the contract allows.
//! - Comparisons: `Absent` is `create_revision == 0`; `ModRevision(k, r)` is
//!   `mod_revision == r` and `CreateRevision(k, r)` is `create_revision == r`
//!   (for `r == 0`, which the contract says never holds, an unsatisfiable
//!   comparison is sent).
//! - Transactions: one etcd `Txn` (`when(compares).and_then(ops)`). etcd
//!   refuses two operations on the same key in one transaction; the store
//!   keeps the last operation per key (the final state is the same; the
//!   earlier, overwritten operation produces no event). etcd also limits a
//!   transaction to `--max-txn-ops` (default 128) operations: longer lists
//!   are split into nested transactions of at most 128, which etcd applies
//!   atomically at the one revision, in order. (Comparisons cannot be
//!   nested: at most 128 per transaction, which skymesh never approaches.)
//!   A transaction must also fit etcd's `--max-request-bytes` (1.5 MiB by
//!   default).
//! - Watches: one etcd watch from `after + 1` with `prev_kv`, so deletes
//!   carry the deleted key-value; the events of one revision arrive in one
//!   etcd response and become one [`WatchBatch`]. When the stream breaks (an
//!   etcd member died, a leader was lost), the watch is re-created on the
//!   client's balanced channel from the revision after the last batch
//!   delivered: no event is lost or repeated. etcd's "required revision has
//!   been compacted" becomes [`Error::Compacted`], with `compacted` the
//!   newest revision whose history is gone (etcd's compact revision - 1).
//! - `range` is read in pages pinned to the revision of the first page, so a
//!   large listing is one consistent snapshot; it returns that revision.
//!
//! # Failures
//! The client balances over every endpoint; a member that stops accepting
//! connections is taken out of the balance within about a second (a TCP
//! probe every 500 ms) and put back when it returns. Reads
//! (`get`, `range`, `current_revision`) are retried on transient errors
//! for a few seconds. A transaction is retried only when etcd certainly did
//! not apply it (the connection could not be made, or there was no leader);
//! an ambiguous failure (a connection lost mid-request, a timeout) is
//! returned as [`Error::Backend`], since replaying a write might apply it
//! twice.
//!
//! # Layout
//! - [`EtcdStore`]: the backend.
//! - `testcluster` (feature `testcluster`): a real multi-member etcd on
//!   loopback for tests.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use etcd_client as ec;
use futures::StreamExt as _;
use futures::stream::BoxStream;

use crate::{Compare, Error, Event, EventKind, KeyValue, Op, Result, Store, TxnResult, WatchBatch};

/// The etcd client crate, for users of [`EtcdStore::client`] (leases,
/// elections), so they use the same version.
pub use etcd_client;

#[cfg(feature = "testcluster")]
pub mod testcluster;

/// Deadline of one unary etcd request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline for connecting to one endpoint.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// HTTP/2 keep-alive: a dead member is noticed within about this long even
/// when no request is in flight (a watch stream, say).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long reads and certainly-unapplied writes are retried.
const RETRY_FOR: Duration = Duration::from_secs(10);
/// How long a broken watch keeps trying to re-create itself before it
/// yields an error and ends.
const WATCH_RETRY_FOR: Duration = Duration::from_secs(60);
/// How often the endpoints are probed (see [`spawn_endpoint_health`]).
const HEALTH_EVERY: Duration = Duration::from_millis(500);
/// How long a probe waits for a TCP connection.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// Keys per page of `range`.
const RANGE_PAGE: i64 = 1000;
/// etcd's default `--max-txn-ops`: most operations one transaction (and
/// each nested one) may hold.
const MAX_TXN_OPS: usize = 128;
/// Largest gRPC message accepted from etcd (a watch catching up may group
/// many revisions in one response).
const MAX_MESSAGE_BYTES: usize = 512 << 20;

/// TLS to etcd: the CA to verify etcd with and, for etcd's
/// `--client-cert-auth`, the client certificate and key (all PEM).
#[derive(Clone)]
pub struct EtcdTls {
    /// The CA certificate(s) that signed etcd's server certificate.
    pub ca_pem: Vec<u8>,
    /// The client certificate chain and private key.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdTls")
            .field("client_certificate", &self.identity.is_some())
            .finish_non_exhaustive()
    }
}

/// The etcd [`Store`].
///
/// Cheap to clone; every clone shares the client (one balanced gRPC channel
/// over all endpoints).
#[derive(Clone)]
pub struct EtcdStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: ec::Client,
    kv: ec::KvClient,
    watch: ec::WatchClient,
    /// The etcd key prefix, without a trailing `/`.
    prefix: String,
    endpoints: Vec<String>,
}

impl fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.inner.endpoints)
            .field("prefix", &self.inner.prefix)
            .finish()
    }
}

impl EtcdStore {
    /// Connects to the etcd cluster at `endpoints` (`http://host:port`, or
    /// `host:port`) and keeps every key under `prefix` (e.g. `/skymesh`; a
    /// trailing `/` is ignored; empty = the whole keyspace). Waits until etcd
    /// answers (retrying for up to 10 s) so a wrong address fails here,
    /// clearly.
    pub async fn connect(endpoints: &[String], prefix: &str) -> Result<Self> {
        Self::connect_with(endpoints, prefix, None).await
    }

    /// Like [`EtcdStore::connect`], over TLS when `tls` is given: the
    /// endpoints must then be `https://` URLs, etcd's certificate must chain
    /// to `tls.ca_pem`, and the client presents `tls.identity` (for etcd's
    /// `--client-cert-auth`).
    pub async fn connect_with(
        endpoints: &[String],
        prefix: &str,
        tls: Option<EtcdTls>,
    ) -> Result<Self> {
        let endpoints: Vec<String> = endpoints
            .iter()
            .map(|e| e.trim())
            .filter(|e| !e.is_empty())
            .map(|e| {
                if e.contains("://") {
                    e.to_string()
                } else {
                    format!("http://{e}")
                }
            })
            .collect();
        if endpoints.is_empty() {
            return Err(Error::Backend(
                "no etcd endpoints given (expected http://host:port,...)".into(),
            ));
        }
        let https = endpoints
            .iter()
            .filter(|e| e.starts_with("https://"))
            .count();
        match (&tls, https) {
            (None, 0) => {}
            (Some(_), n) if n == endpoints.len() => {}
            (None, _) => {
                return Err(Error::Backend(
                    "https:// etcd endpoints need the CA that signed etcd's certificate (--etcd-ca)"
                        .into(),
                ));
            }
            (Some(_), _) => {
                return Err(Error::Backend(
                    "with TLS (--etcd-ca) every etcd endpoint must be an https:// URL".into(),
                ));
            }
        }
        let mut options = ec::ConnectOptions::new();
        if let Some(t) = tls {
            let mut o = ec::TlsOptions::new().ca_certificate(ec::Certificate::from_pem(t.ca_pem));
            if let Some((cert, key)) = t.identity {
                o = o.identity(ec::Identity::from_pem(cert, key));
            }
            options = options.with_tls(o);
        }
        let options = options
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT)
            .with_keep_alive_while_idle(true)
            // A member cut off from the others answers "no leader" instead
            // of serving stale reads or silently stalling watches.
            .with_require_leader(true);
        let client = ec::Client::connect(&endpoints, Some(options))
            .await
            .map_err(|e| {
                Error::Backend(format!(
                    "cannot use etcd endpoints {}: {e}",
                    endpoints.join(",")
                ))
            })?;
        let kv = client
            .kv_client()
            .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let watch = client
            .watch_client()
            .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let store = EtcdStore {
            inner: Arc::new(Inner {
                client,
                kv,
                watch,
                prefix: prefix.trim_end_matches('/').to_string(),
                endpoints,
            }),
        };
        spawn_endpoint_health(Arc::downgrade(&store.inner));
        // Reads retry transient failures for RETRY_FOR.
        match store.current_revision().await {
            Ok(revision) => {
                tracing::info!(endpoints = %store.inner.endpoints.join(","), prefix = %store.inner.prefix, revision, "connected to etcd");
                Ok(store)
            }
            Err(e) => Err(Error::Backend(format!(
                "etcd at {} did not answer within {} s: {e}",
                store.inner.endpoints.join(","),
                RETRY_FOR.as_secs()
            ))),
        }
    }

    /// The etcd key prefix (without a trailing `/`).
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The endpoints the client balances over.
    pub fn endpoints(&self) -> &[String] {
        &self.inner.endpoints
    }

    /// The underlying etcd client (for leases and elections, which the
    /// [`Store`] trait does not cover). Keys written through it should use
    /// [`etcd_key`](Self::etcd_key).
    pub fn client(&self) -> ec::Client {
        self.inner.client.clone()
    }

    /// The etcd key of store key `key`.
    pub fn etcd_key(&self, key: &str) -> String {
        format!("{}{key}", self.inner.prefix)
    }

    fn full(&self, key: &str) -> Vec<u8> {
        self.etcd_key(key).into_bytes()
    }

    /// Removes etcd's history of revisions before `revision` (etcd
    /// compaction; it applies to the whole etcd cluster, not only this
    /// prefix). Watches from older revisions then get [`Error::Compacted`].
    /// Compacting to a revision already compacted is not an error.
    pub async fn compact(&self, revision: u64) -> Result<()> {
        let rev = to_i64(revision)?;
        let mut kv = self.inner.kv.clone();
        match tokio::time::timeout(REQUEST_TIMEOUT, kv.compact(rev, None)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) if error_text(&e).contains("required revision has been compacted") => Ok(()),
            Ok(Err(e)) => Err(backend("compact", &e)),
            Err(_) => Err(Error::Backend("etcd compact: timed out".into())),
        }
    }

    /// Runs a read, retrying transient failures for [`RETRY_FOR`].
    async fn read<T, F, Fut>(&self, what: &'static str, mut f: F) -> Result<T>
    where
        F: FnMut(ec::KvClient) -> Fut,
        Fut: Future<Output = std::result::Result<T, ec::Error>>,
    {
        let deadline = Instant::now() + RETRY_FOR;
        let mut delay = Duration::from_millis(50);
        loop {
            let err = match tokio::time::timeout(REQUEST_TIMEOUT, f(self.inner.kv.clone())).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) if is_transient(&e) => backend(what, &e),
                Ok(Err(e)) => return Err(backend(what, &e)),
                Err(_) => Error::Backend(format!("etcd {what}: timed out")),
            };
            if Instant::now() + delay >= deadline {
                return Err(err);
            }
            tracing::debug!(error = %err, "etcd read failed; retrying");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(1));
        }
    }

    fn to_kv(&self, kv: &ec::KeyValue) -> Result<KeyValue> {
        Ok(KeyValue {
            key: self.store_key(kv.key())?,
            value: kv.value().to_vec(),
            create_revision: to_u64(kv.create_revision()),
            mod_revision: to_u64(kv.mod_revision()),
            version: to_u64(kv.version()),
        })
    }

    fn store_key(&self, key: &[u8]) -> Result<String> {
        std::str::from_utf8(key)
            .ok()
            .and_then(|k| k.strip_prefix(self.inner.prefix.as_str()))
            .map(str::to_string)
            .ok_or_else(|| {
                Error::Backend(format!(
                    "etcd returned key {:?} outside prefix {:?}",
                    String::from_utf8_lossy(key),
                    self.inner.prefix
                ))
            })
    }

    fn compares(&self, compares: Vec<Compare>) -> Vec<ec::Compare> {
        let mut out = Vec::with_capacity(compares.len());
        // Holds for no key: etcd's revisions of an absent key are 0, so
        // "== 0" must be expressed as "exists and == 0", which is never true.
        let never = |key: Vec<u8>, out: &mut Vec<ec::Compare>| {
            out.push(ec::Compare::create_revision(
                key.clone(),
                ec::CompareOp::Greater,
                0,
            ));
            out.push(ec::Compare::create_revision(key, ec::CompareOp::Equal, 0));
        };
        for c in compares {
            match c {
                Compare::Absent(k) => out.push(ec::Compare::create_revision(
                    self.full(&k),
                    ec::CompareOp::Equal,
                    0,
                )),
                Compare::ModRevision(k, r) => match i64::try_from(r) {
                    Ok(r) if r > 0 => out.push(ec::Compare::mod_revision(
                        self.full(&k),
                        ec::CompareOp::Equal,
                        r,
                    )),
                    _ => never(self.full(&k), &mut out),
                },
                Compare::CreateRevision(k, r) => match i64::try_from(r) {
                    Ok(r) if r > 0 => out.push(ec::Compare::create_revision(
                        self.full(&k),
                        ec::CompareOp::Equal,
                        r,
                    )),
                    _ => never(self.full(&k), &mut out),
                },
                // etcd compares every key of a range (and, for an empty
                // range, a key with revisions 0): all must hold.
                Compare::NoWritesUnder(prefix, r) => {
                    let full = self.full(&prefix);
                    let end = prefix_end(&full);
                    // (No revision can be later than one past i64::MAX.)
                    if let Some(r) = r.checked_add(1).and_then(|r| i64::try_from(r).ok()) {
                        out.push(
                            ec::Compare::mod_revision(full, ec::CompareOp::Less, r).with_range(end),
                        );
                    }
                }
            }
        }
        out
    }

    fn ops(&self, ops: Vec<Op>) -> Vec<ec::TxnOp> {
        fn key(op: &Op) -> &str {
            match op {
                Op::Put { key, .. } | Op::Delete { key } => key,
            }
        }
        // etcd refuses two operations on one key: keep the last.
        let last: HashMap<&str, usize> = ops.iter().enumerate().map(|(i, o)| (key(o), i)).collect();
        let keep: Vec<bool> = ops
            .iter()
            .enumerate()
            .map(|(i, o)| last.get(key(o)) == Some(&i))
            .collect();
        let ops: Vec<ec::TxnOp> = ops
            .into_iter()
            .zip(keep)
            .filter(|(_, keep)| *keep)
            .map(|(op, _)| match op {
                Op::Put { key, value } => ec::TxnOp::put(self.full(&key), value, None),
                Op::Delete { key } => ec::TxnOp::delete(self.full(&key), None),
            })
            .collect();
        nest(ops)
    }
}

/// Fits up to thousands of operations into etcd's `--max-txn-ops` limit:
/// the operations are split into runs that become nested, unconditional
/// transactions, which etcd applies inside the outer one, in order, at the
/// same revision. etcd counts a nested transaction's operations against
/// what its parents left of the limit (`limit - ops of each enclosing
/// level`), so the split is sized with [`nested_capacity`].
fn nest(ops: Vec<ec::TxnOp>) -> Vec<ec::TxnOp> {
    fit(ops, MAX_TXN_OPS)
}

fn fit(ops: Vec<ec::TxnOp>, budget: usize) -> Vec<ec::TxnOp> {
    let n = ops.len();
    if n <= budget {
        return ops;
    }
    // The fewest groups whose nested capacity holds everything.
    let Some(groups) = (2..budget).find(|&k| k.saturating_mul(nested_capacity(budget - k)) >= n)
    else {
        // More than etcd can take in one transaction: etcd refuses it
        // with "too many operations in txn request".
        return ops;
    };
    let size = n.div_ceil(groups);
    let mut out = Vec::with_capacity(groups);
    let mut rest = ops.into_iter().peekable();
    while rest.peek().is_some() {
        let chunk: Vec<ec::TxnOp> = rest.by_ref().take(size).collect();
        out.push(ec::TxnOp::txn(
            ec::Txn::new().and_then(fit(chunk, budget - groups)),
        ));
    }
    out
}

/// How many operations fit in a transaction level that may hold `budget`
/// operations, nesting as deep as needed.
fn nested_capacity(budget: usize) -> usize {
    // cap(b) = max(b, max over k of k * cap(b - k)); small b, so a table.
    let mut cap = vec![0usize; budget + 1];
    for b in 1..=budget {
        cap[b] = b;
        for k in 2..b {
            cap[b] = cap[b].max(k.saturating_mul(cap[b - k]));
        }
    }
    cap[budget]
}

/// Keeps dead members out of the client's balanced channel: tonic's
/// balancer goes on picking an endpoint whose connection was refused, so
/// every few requests would fail (and be retried) while a member is down.
/// Every [`HEALTH_EVERY`], each endpoint gets a TCP connect; one that refuses
/// (or does not answer within [`PROBE_TIMEOUT`]) is removed from the
/// channel, and added back once it accepts again. The last endpoint is
/// never removed. Ends when the store is dropped.
fn spawn_endpoint_health(inner: Weak<Inner>) {
    let Some(endpoints) = inner.upgrade().map(|i| i.endpoints.clone()) else {
        return;
    };
    if endpoints.len() < 2 {
        return;
    }
    tokio::spawn(async move {
        let mut removed = HashSet::new();
        loop {
            tokio::time::sleep(HEALTH_EVERY).await;
            let Some(client) = inner.upgrade().map(|i| i.client.clone()) else {
                return;
            };
            for ep in &endpoints {
                let alive = probe(ep).await;
                if !alive && !removed.contains(ep) && removed.len() + 1 < endpoints.len() {
                    match client.remove_endpoint(ep).await {
                        Ok(()) => {
                            tracing::warn!(endpoint = %ep, "etcd member unreachable; routing requests to the others");
                            removed.insert(ep.clone());
                        }
                        Err(e) => {
                            tracing::debug!(endpoint = %ep, error = %e, "cannot remove etcd endpoint")
                        }
                    }
                } else if alive && removed.contains(ep) {
                    match client.add_endpoint(ep).await {
                        Ok(()) => {
                            tracing::info!(endpoint = %ep, "etcd member reachable again");
                            removed.remove(ep);
                        }
                        Err(e) => {
                            tracing::debug!(endpoint = %ep, error = %e, "cannot re-add etcd endpoint")
                        }
                    }
                }
            }
        }
    });
}

/// Whether an endpoint (`scheme://host:port[/...]`) accepts TCP connections.
async fn probe(endpoint: &str) -> bool {
    let rest = endpoint.split_once("://").map_or(endpoint, |(_, r)| r);
    let hostport = rest.split('/').next().unwrap_or(rest);
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(hostport)).await,
        Ok(Ok(_))
    )
}

/// The first key after every key starting with `prefix` (etcd's range end
/// for a prefix); `[0]` (= no upper bound) when there is none.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// A range start key: etcd keys are non-empty, `[0]` is the smallest.
fn start_key(key: Vec<u8>) -> Vec<u8> {
    if key.is_empty() { vec![0] } else { key }
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn to_i64(v: u64) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::Backend(format!("revision {v} is out of etcd's range")))
}

fn header_revision(h: Option<&ec::ResponseHeader>) -> Result<u64> {
    h.map(|h| to_u64(h.revision()))
        .ok_or_else(|| Error::Backend("etcd response without a header".into()))
}

/// The error with its sources, as text.
fn error_text(e: &ec::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    if let ec::Error::GRpcStatus(st) = e
        && let Some(cause) = std::error::Error::source(st)
    {
        s.push_str(": ");
        s.push_str(&cause.to_string());
    }
    s
}

fn backend(what: &str, e: &ec::Error) -> Error {
    Error::Backend(format!("etcd {what}: {}", error_text(e)))
}

/// Whether a failed request may succeed if sent again (to the same or
/// another member).
fn is_transient(e: &ec::Error) -> bool {
    match e {
        ec::Error::GRpcStatus(s) => matches!(
            s.code(),
            tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Unknown
                | tonic::Code::Aborted
                | tonic::Code::Cancelled
        ),
        ec::Error::TransportError(_) | ec::Error::IoError(_) => true,
        _ => false,
    }
}

/// Whether a failed request certainly did not reach etcd's log, so a write
/// can safely be sent again.
fn is_unapplied(e: &ec::Error) -> bool {
    let text = error_text(e).to_ascii_lowercase();
    text.contains("error trying to connect")
        || text.contains("tcp connect error")
        || text.contains("connection refused")
        || text.contains("etcdserver: no leader")
        || text.contains("etcdserver: not capable")
        || text.contains("etcdserver: too many requests")
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    async fn current_revision(&self) -> Result<u64> {
        let key = start_key(self.full(""));
        let resp = self
            .read("read revision", |mut kv| {
                let key = key.clone();
                async move {
                    kv.get(key, Some(ec::GetOptions::new().with_count_only()))
                        .await
                }
            })
            .await?;
        header_revision(resp.header())
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let full = self.full(key);
        let resp = self
            .read("get", |mut kv| {
                let full = full.clone();
                async move { kv.get(full, None).await }
            })
            .await?;
        resp.kvs().first().map(|kv| self.to_kv(kv)).transpose()
    }

    async fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, u64)> {
        let first = start_key(self.full(prefix));
        let end = prefix_end(&self.full(prefix));
        'snapshot: loop {
            let mut out = Vec::new();
            let mut revision = 0i64;
            let mut from = first.clone();
            loop {
                let opts = {
                    let o = ec::GetOptions::new()
                        .with_range(end.clone())
                        .with_limit(RANGE_PAGE);
                    if revision > 0 {
                        o.with_revision(revision)
                    } else {
                        o
                    }
                };
                let page = self
                    .read("range", |mut kv| {
                        let (from, opts) = (from.clone(), opts.clone());
                        async move { kv.get(from, Some(opts)).await }
                    })
                    .await;
                let resp = match page {
                    Ok(r) => r,
                    // The pinned revision was compacted between pages: start
                    // over at the current revision.
                    Err(Error::Backend(e))
                        if revision > 0 && e.contains("required revision has been compacted") =>
                    {
                        continue 'snapshot;
                    }
                    Err(e) => return Err(e),
                };
                if revision == 0 {
                    revision = to_i64(header_revision(resp.header())?)?;
                }
                for kv in resp.kvs() {
                    out.push(self.to_kv(kv)?);
                }
                match resp.kvs().last() {
                    Some(last) if resp.more() => {
                        from = last.key().to_vec();
                        from.push(0);
                    }
                    _ => return Ok((out, to_u64(revision))),
                }
            }
        }
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnResult> {
        let mut then = self.ops(ops);
        if then.is_empty() {
            // etcd serves a transaction without operations as a
            // serializable read, from whichever member got it, which may
            // not have applied the latest writes yet: its comparisons
            // could hold against stale keys. One linearizable read makes
            // it a linearizable one.
            then.push(ec::TxnOp::get(
                self.full(""),
                Some(ec::GetOptions::new().with_keys_only().with_limit(1)),
            ));
        }
        let txn = ec::Txn::new().when(self.compares(compares)).and_then(then);
        let deadline = Instant::now() + RETRY_FOR;
        let mut delay = Duration::from_millis(50);
        loop {
            let mut kv = self.inner.kv.clone();
            match tokio::time::timeout(REQUEST_TIMEOUT, kv.txn(txn.clone())).await {
                Ok(Ok(resp)) => {
                    return Ok(TxnResult {
                        succeeded: resp.succeeded(),
                        revision: header_revision(resp.header())?,
                    });
                }
                Ok(Err(e)) if is_unapplied(&e) && Instant::now() + delay < deadline => {
                    tracing::debug!(error = %error_text(&e), "etcd txn not applied; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
                Ok(Err(e)) => return Err(backend("txn", &e)),
                Err(_) => {
                    return Err(Error::Backend(
                        "etcd txn: timed out (it may or may not have been applied)".into(),
                    ));
                }
            }
        }
    }

    fn watch(&self, prefix: &str, after_revision: u64) -> BoxStream<'static, Result<WatchBatch>> {
        let watcher = Watcher {
            store: self.clone(),
            key: start_key(self.full(prefix)),
            end: prefix_end(&self.full(prefix)),
            next: after_revision.saturating_add(1),
            stream: None,
            pending: VecDeque::new(),
            failing_since: None,
            delay: Duration::from_millis(50),
            done: false,
        };
        futures::stream::unfold(watcher, |mut w| async move {
            let item = w.next_item().await?;
            Some((item, w))
        })
        .boxed()
    }
}

/// State of one [`Store::watch`] stream.
struct Watcher {
    store: EtcdStore,
    key: Vec<u8>,
    end: Vec<u8>,
    /// The revision to (re)start from: one after the last delivered batch.
    next: u64,
    stream: Option<ec::WatchStream>,
    /// Batches received but not yet delivered.
    pending: VecDeque<WatchBatch>,
    /// When the current run of failures began.
    failing_since: Option<Instant>,
    delay: Duration,
    done: bool,
}

impl Watcher {
    async fn next_item(&mut self) -> Option<Result<WatchBatch>> {
        loop {
            if self.done {
                return None;
            }
            if let Some(batch) = self.pending.pop_front() {
                self.next = batch.revision + 1;
                return Some(Ok(batch));
            }
            let failure = match self.stream.as_mut() {
                None => match self.open().await {
                    Ok(s) => {
                        self.stream = Some(s);
                        continue;
                    }
                    Err(e) => backend("watch", &e),
                },
                Some(stream) => match stream.message().await {
                    Ok(Some(resp)) => match self.handle(resp) {
                        Ok(None) => continue,
                        Ok(Some(item)) => return item,
                        Err(e) => e,
                    },
                    Ok(None) => Error::Backend("etcd watch: stream closed by the server".into()),
                    Err(e) => backend("watch", &e),
                },
            };
            // Re-create the watch from the last delivered revision.
            self.stream = None;
            let since = *self.failing_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= WATCH_RETRY_FOR {
                self.done = true;
                tracing::warn!(error = %failure, "etcd watch failed for too long; giving up");
                return Some(Err(failure));
            }
            tracing::warn!(error = %failure, from = self.next, "etcd watch broken; re-creating it");
            tokio::time::sleep(self.delay).await;
            self.delay = (self.delay * 2).min(Duration::from_secs(1));
        }
    }

    async fn open(&mut self) -> std::result::Result<ec::WatchStream, ec::Error> {
        let start = i64::try_from(self.next).unwrap_or(i64::MAX);
        let opts = ec::WatchOptions::new()
            .with_range(self.end.clone())
            .with_start_revision(start)
            .with_prev_key();
        let mut client = self.store.inner.watch.clone();
        match tokio::time::timeout(REQUEST_TIMEOUT, client.watch(self.key.clone(), Some(opts)))
            .await
        {
            Ok(r) => r,
            Err(_) => Err(ec::Error::WatchError("timed out creating the watch".into())),
        }
    }

    /// `Error::Compacted` (once), then the end of the stream.
    fn compacted(&mut self, compact_revision: i64) -> Option<Result<WatchBatch>> {
        self.done = true;
        self.stream = None;
        Some(Err(Error::Compacted {
            requested: self.next - 1,
            compacted: to_u64(compact_revision).saturating_sub(1),
        }))
    }

    /// Takes one etcd response: `Ok(None)` when it only queued batches (or
    /// carried nothing), `Ok(Some(item))` to return at once, `Err` when
    /// the watch must be re-created.
    fn handle(&mut self, resp: ec::WatchResponse) -> Result<Option<Option<Result<WatchBatch>>>> {
        if resp.compact_revision() > 0 {
            return Ok(Some(self.compacted(resp.compact_revision())));
        }
        if resp.canceled() {
            return Err(Error::Backend(format!(
                "etcd watch canceled by the server: {}",
                resp.cancel_reason()
            )));
        }
        // The watch works: a later failure starts a new retry window.
        self.failing_since = None;
        self.delay = Duration::from_millis(50);
        for ev in resp.events() {
            let event = self.event(ev)?;
            let revision = event.kv.mod_revision;
            if revision < self.next {
                // Never expected (etcd starts at `next`); never deliver twice.
                continue;
            }
            match self.pending.back_mut() {
                Some(batch) if batch.revision == revision => batch.events.push(event),
                _ => self.pending.push_back(WatchBatch {
                    revision,
                    events: vec![event],
                }),
            }
        }
        Ok(None)
    }

    fn event(&self, ev: &ec::Event) -> Result<Event> {
        let kv = ev
            .kv()
            .ok_or_else(|| Error::Backend("etcd watch event without a key-value".into()))?;
        let prev = ev.prev_kv().map(|p| self.store.to_kv(p)).transpose()?;
        match ev.event_type() {
            ec::EventType::Put => Ok(Event {
                kind: EventKind::Put,
                kv: self.store.to_kv(kv)?,
                prev,
            }),
            ec::EventType::Delete => {
                let mod_revision = to_u64(kv.mod_revision());
                let deleted = match &prev {
                    Some(p) => KeyValue {
                        mod_revision,
                        ..p.clone()
                    },
                    None => KeyValue {
                        key: self.store.store_key(kv.key())?,
                        value: Vec::new(),
                        create_revision: 0,
                        mod_revision,
                        version: 0,
                    },
                };
                Ok(Event {
                    kind: EventKind::Delete,
                    kv: deleted,
                    prev,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_the_last_byte() {
        assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
        assert_eq!(prefix_end(b""), vec![0]);
    }

    #[test]
    fn nesting_fits_the_limit() {
        assert_eq!(nested_capacity(3), 3);
        assert!(nested_capacity(MAX_TXN_OPS) > 100_000);
        let ops = |n: usize| -> Vec<ec::TxnOp> {
            (0..n)
                .map(|i| ec::TxnOp::put(format!("k{i}"), "v", None))
                .collect()
        };
        assert_eq!(nest(ops(128)).len(), 128, "flat up to the limit");
        let nested = nest(ops(300));
        assert!(nested.len() <= 3, "300 ops in {} groups", nested.len());
        assert!(nest(ops(10_000)).len() < MAX_TXN_OPS);
    }

    #[test]
    fn start_key_is_never_empty() {
        assert_eq!(start_key(Vec::new()), vec![0]);
        assert_eq!(start_key(b"/x".to_vec()), b"/x".to_vec());
    }
}
