//! One [`World`] for every netmap stream of this coordinator: filled by one
//! range read and kept current by one store watch, instead of a copy of
//! the store and a watch per stream (100 gateways on a store of 10,000
//! services were 100 copies). Streams read it under a lock and follow it
//! through a broadcast of the keys each revision touched.
//!
//! A stream that reads the world after a broadcast was sent may see a
//! newer state than that revision: every change it sends is the current
//! state of a touched key (an upsert or a removal), so what a gateway holds
//! converges, and a gateway that resumes from a revision is sent the keys
//! touched after it again.

use std::collections::BTreeSet;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard};
use std::time::Duration;

use futures::StreamExt as _;
use skymesh_store::Store;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use crate::netmap::{World, relevant};

/// Revisions a slow stream may fall behind before it is sent a fresh
/// snapshot instead of the changes it missed.
const BACKLOG: usize = 1024;

/// What one store revision changed, for the streams.
#[derive(Debug, Clone)]
pub enum Update {
    /// The keys written at `revision` that matter to netmaps.
    Touched {
        revision: u64,
        keys: Arc<BTreeSet<String>>,
    },
    /// The world was read again (the watch broke off): send snapshots.
    Reloaded { revision: u64 },
}

#[derive(Debug, Default)]
struct Cached {
    world: World,
    revision: u64,
}

/// The shared world and its updates.
#[derive(Debug, Clone)]
pub struct WorldCache {
    state: Arc<RwLock<Cached>>,
    updates: broadcast::Sender<Update>,
    loaded: watch::Receiver<bool>,
}

/// The world at a revision, read-locked: hold it only to compute what to
/// send, never across an await.
pub struct View<'a> {
    guard: RwLockReadGuard<'a, Cached>,
}

impl View<'_> {
    /// The world.
    pub fn world(&self) -> &World {
        &self.guard.world
    }

    /// The revision it is current at.
    pub fn revision(&self) -> u64 {
        self.guard.revision
    }
}

impl WorldCache {
    /// Starts following `store` (until `cancel`); streams wait for the
    /// first read.
    pub fn start(store: Arc<dyn Store>, cancel: CancellationToken) -> WorldCache {
        let (updates, _) = broadcast::channel(BACKLOG);
        let (loaded_tx, loaded) = watch::channel(false);
        let cache = WorldCache {
            state: Arc::default(),
            updates,
            loaded,
        };
        let c = cache.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = c.follow(store, loaded_tx) => {}
                () = cancel.cancelled() => {}
            }
        });
        cache
    }

    /// Updates from now on. Subscribe before reading the world: every
    /// update after the revision read then arrives.
    pub fn subscribe(&self) -> broadcast::Receiver<Update> {
        self.updates.subscribe()
    }

    /// Waits until the world has been read once.
    pub async fn ready(&self) -> crate::error::Result<()> {
        let mut loaded = self.loaded.clone();
        loaded
            .wait_for(|l| *l)
            .await
            .map(|_| ())
            .map_err(|_| crate::error::Error::Internal("the netmap cache stopped".into()))
    }

    /// The world now.
    pub fn view(&self) -> View<'_> {
        View {
            guard: self.state.read().unwrap_or_else(PoisonError::into_inner),
        }
    }

    async fn follow(&self, store: Arc<dyn Store>, loaded: watch::Sender<bool>) {
        let mut first = true;
        loop {
            let (kvs, revision) = match store.range("/").await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "netmap cache: reading the store failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            {
                let mut s = self.state.write().unwrap_or_else(PoisonError::into_inner);
                *s = Cached {
                    world: World::new(kvs),
                    revision,
                };
            }
            if first {
                first = false;
                let _ = loaded.send(true);
            } else {
                let _ = self.updates.send(Update::Reloaded { revision });
            }
            let mut w = store.watch("/", revision);
            while let Some(batch) = w.next().await {
                let batch = match batch {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::warn!(error = %e, "netmap cache: the store watch broke off; reading again");
                        break;
                    }
                };
                let keys: BTreeSet<String> = batch
                    .events
                    .iter()
                    .map(|e| e.kv.key.clone())
                    .filter(|k| relevant(k))
                    .collect();
                {
                    let mut s = self.state.write().unwrap_or_else(PoisonError::into_inner);
                    for ev in &batch.events {
                        s.world.apply(ev);
                    }
                    s.revision = batch.revision;
                }
                if !keys.is_empty() {
                    // No receiver (no stream open) is fine.
                    let _ = self.updates.send(Update::Touched {
                        revision: batch.revision,
                        keys: Arc::new(keys),
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skymesh_store::Op;
    use skymesh_store::embedded::EmbeddedStore;

    async fn put(store: &dyn Store, key: &str) -> u64 {
        store
            .txn(
                vec![],
                vec![Op::Put {
                    key: key.into(),
                    value: b"x".to_vec(),
                }],
            )
            .await
            .unwrap();
        store.current_revision().await.unwrap()
    }

    #[tokio::test]
    async fn one_read_then_every_relevant_revision_once() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&dir.path().join("store.redb")).unwrap());
        let first = put(store.as_ref(), "/registry/services/default/a").await;
        let cancel = CancellationToken::new();
        let cache = WorldCache::start(store.clone(), cancel.clone());
        cache.ready().await.unwrap();
        let mut updates = cache.subscribe();
        assert!(cache.view().revision() >= first);
        // A key no netmap reads: no update.
        put(store.as_ref(), "/join-tokens/x").await;
        let b = put(store.as_ref(), "/registry/services/default/b").await;
        let u = tokio::time::timeout(Duration::from_secs(5), updates.recv())
            .await
            .unwrap()
            .unwrap();
        match u {
            Update::Touched { revision, keys } => {
                assert_eq!(revision, b);
                assert_eq!(
                    keys.iter().collect::<Vec<_>>(),
                    ["/registry/services/default/b"]
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(cache.view().revision(), b);
        assert!(updates.try_recv().is_err(), "nothing else was sent");
        cancel.cancel();
    }
}
