//! The store conformance suite (`skymesh_store::testsuite`), unchanged, on
//! [`EtcdStore`] over a real 3-member etcd cluster on loopback (one fresh
//! cluster per test, so the suite's revision arithmetic holds), plus what
//! only the etcd backend has: watches that resume across the loss of an
//! etcd member, prefixes that isolate tenants of one etcd, and duplicate
//! keys in one transaction.
//!
//! Needs the `etcd` binary (Debian: `apt-get install etcd-server`); without
//! it every test fails with that hint.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use skymesh_store::etcd::EtcdStore;
use skymesh_store::etcd::testcluster::EtcdCluster;
use skymesh_store::testsuite::{self, put};
use skymesh_store::{Compare, EventKind, Op, Store};

/// A fresh 3-member cluster and a store on it under `/skymesh-test`.
async fn cluster() -> (EtcdCluster, EtcdStore) {
    let cluster = tokio::task::spawn_blocking(|| EtcdCluster::start(3))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("cannot start a 3-member etcd cluster: {e}"));
    let store = EtcdStore::connect(&cluster.endpoints(), "/skymesh-test")
        .await
        .unwrap();
    (cluster, store)
}

// One test per conformance test of the shared suite, each on a fresh cluster.
skymesh_store::conformance_tests!(cluster());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cas_counter() {
    let (_cluster, store) = cluster().await;
    testsuite::concurrent_cas_counter(Arc::new(store)).await;
}

/// etcd keeps all history until it is compacted: a background task compacts
/// to 10 revisions behind the head while the suite writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_compacted() {
    let (_cluster, store) = cluster().await;
    let compactor = {
        let store = store.clone();
        tokio::spawn(async move {
            loop {
                let rev = store.current_revision().await.unwrap();
                if rev > 20 {
                    store.compact(rev - 10).await.unwrap();
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    testsuite::watch_compacted(&store, 100).await;
    compactor.abort();
}

/// The whole suite on one shared store, as several coordinators share one
/// etcd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_all_on_one_store() {
    let (_cluster, store) = cluster().await;
    testsuite::run_all(Arc::new(store)).await;
}

/// Writes `key` once, even if a first attempt failed ambiguously (the
/// `Absent` comparison makes a replay a no-op); returns its mod revision.
async fn put_once(store: &EtcdStore, key: &str, value: &str) -> u64 {
    for _ in 0..100 {
        match store
            .txn(vec![Compare::Absent(key.into())], vec![put(key, value)])
            .await
        {
            Ok(r) if r.succeeded => return r.revision,
            Ok(_) => return store.get(key).await.unwrap().unwrap().mod_revision,
            Err(e) => {
                eprintln!("write of {key} failed, retrying: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    panic!("could not write {key}");
}

/// Kill each of the three members in turn (so whichever one carries the
/// watch dies once), writing before and after each kill: the watch delivers
/// every write exactly once, in order, and reads keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_survives_member_loss() {
    let (cluster, store) = cluster().await;
    let cluster = Arc::new(std::sync::Mutex::new(cluster));
    let p = "/loss/";
    let start = store.current_revision().await.unwrap();
    let mut stream = store.watch(p, start);
    let mut expected = Vec::new();
    let mut seen = Vec::new();
    for member in 0..3 {
        for i in 0..10 {
            let key = format!("{p}m{member}-before-{i}");
            expected.push((put_once(&store, &key, "v").await, key));
        }
        let c = Arc::clone(&cluster);
        tokio::task::spawn_blocking(move || c.lock().unwrap().kill(member))
            .await
            .unwrap();
        for i in 0..10 {
            let key = format!("{p}m{member}-after-{i}");
            expected.push((put_once(&store, &key, "v").await, key));
        }
        let (kvs, _) = store.range(p).await.unwrap();
        assert_eq!(kvs.len(), expected.len(), "reads work with a member down");
        while seen.len() < expected.len() {
            let batch = testsuite::next_item(&mut stream)
                .await
                .expect("the watch stays open")
                .expect("the watch yields batches");
            assert_eq!(batch.events.len(), 1);
            assert_eq!(batch.events[0].kind, EventKind::Put);
            seen.push((batch.revision, batch.events[0].kv.key.clone()));
        }
        assert_eq!(seen, expected, "every write once, in order");
        let c = Arc::clone(&cluster);
        tokio::task::spawn_blocking(move || c.lock().unwrap().restart(member))
            .await
            .unwrap()
            .unwrap();
    }
    // Nothing extra arrives.
    let extra = tokio::time::timeout(Duration::from_millis(500), stream.next()).await;
    assert!(extra.is_err(), "no repeated events: {extra:?}");
}

/// Two stores with different prefixes on one etcd do not see each other's
/// keys, ranges or events; keys live under the prefix in etcd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefixes_are_isolated() {
    let (cluster, _) = cluster().await;
    let a = EtcdStore::connect(&cluster.endpoints(), "/tenant-a/")
        .await
        .unwrap();
    let b = EtcdStore::connect(&cluster.endpoints(), "/tenant-ab")
        .await
        .unwrap();
    assert_eq!(a.prefix(), "/tenant-a");
    let start = a.current_revision().await.unwrap();
    let ra = testsuite::must_write(&a, vec![put("/k", "a")]).await;
    let rb = testsuite::must_write(&b, vec![put("/k", "b"), put("/only-b", "b")]).await;
    assert_eq!(a.get("/k").await.unwrap().unwrap().value, b"a");
    assert_eq!(b.get("/k").await.unwrap().unwrap().value, b"b");
    assert_eq!(a.get("/only-b").await.unwrap(), None);
    let (all_a, rev) = a.range("/").await.unwrap();
    assert_eq!(rev, rb, "the revision is etcd's, shared by both");
    let keys: Vec<&str> = all_a.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["/k"]);
    let batches = testsuite::collect_until(a.watch("/", start), ra).await;
    assert_eq!(batches.len(), 1);
    let more = tokio::time::timeout(Duration::from_millis(300), a.watch("/", ra).next()).await;
    assert!(more.is_err(), "a does not see b's write: {more:?}");

    // The etcd key carries the prefix.
    let mut client = a.client();
    let raw = client.get(a.etcd_key("/k"), None).await.unwrap();
    assert_eq!(raw.kvs()[0].key(), b"/tenant-a/k");
}

/// etcd refuses two operations on one key in a transaction; the store keeps
/// the last one: same final state, one revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_keys_in_one_txn() {
    let (_cluster, store) = cluster().await;
    let start = store.current_revision().await.unwrap();
    let r = testsuite::must_write(
        &store,
        vec![put("/d/k", "1"), put("/d/j", "x"), put("/d/k", "2")],
    )
    .await;
    assert_eq!(r, start + 1);
    assert_eq!(store.get("/d/k").await.unwrap().unwrap().value, b"2");
    let r2 = testsuite::must_write(
        &store,
        vec![put("/d/j", "y"), Op::Delete { key: "/d/j".into() }],
    )
    .await;
    assert_eq!(r2, r + 1);
    assert_eq!(store.get("/d/j").await.unwrap(), None);
}

/// A wrong endpoint fails `connect` with a message naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_to_nothing_fails_clearly() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let err = EtcdStore::connect(std::slice::from_ref(&url), "/x")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains(&url), "{err}");
}
