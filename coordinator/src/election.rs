//! Controller leader election: the controllers run on one coordinator
//! replica at a time.
//!
//! - Embedded store ([`Election::Single`]): there is one replica by
//!   construction; the work simply runs.
//! - etcd ([`Election::Etcd`]): the leader holds the etcd key
//!   `<prefix>`[`LEADER_KEY`], created with `create_revision == 0` (so only
//!   one replica can create it) and attached to a lease of [`LEASE_TTL`]
//!   that the leader renews every [`RENEW_EVERY`]. The key's value names the
//!   leader (`<listen address> pid <pid> host <hostname>`).
//!   - Standby replicas watch the key and campaign as soon as it is deleted:
//!     when the leader resigns (clean shutdown revokes its lease: immediate
//!     hand-over) or dies (etcd expires its lease within [`LEASE_TTL`]), so
//!     a new leader runs the controllers within about 6 s.
//!   - A leader that cannot renew for `LEASE_TTL - `[`STEP_DOWN_MARGIN`]
//!     (cut off from etcd), whose lease expired, or whose key is gone or
//!     holds another lease, stops its work at once and campaigns again; it
//!     stops before etcd can expire its lease, so two replicas do not run
//!     the controllers at once in normal operation. Even if they briefly
//!     did (a paused process, clock trouble), every controller write is a
//!     compare-and-swap on the revision it read and the controllers are
//!     level-triggered, so the only cost would be a lost race and a
//!     re-read.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Store key of the controller leader (under the etcd prefix).
pub use crate::keyspace::CONTROLLER_LEADER as LEADER_KEY;
/// Time-to-live of the leader's lease: how long a dead leader holds on.
pub const LEASE_TTL: Duration = Duration::from_secs(5);
/// How often the leader renews its lease.
pub const RENEW_EVERY: Duration = Duration::from_secs(1);
/// A leader that has not renewed for `LEASE_TTL - STEP_DOWN_MARGIN` stops.
pub const STEP_DOWN_MARGIN: Duration = Duration::from_millis(1500);

/// How this replica decides whether it runs the controllers.
pub enum Election {
    /// The only replica (embedded store): always the leader.
    Single,
    /// A lease-guarded leader key in etcd.
    #[cfg(feature = "etcd")]
    Etcd(etcd::LeaseElection),
}

impl Election {
    /// An election among the coordinators sharing `store`; `identity` names
    /// this replica in the leader key.
    #[cfg(feature = "etcd")]
    pub fn etcd(store: skymesh_store::etcd::EtcdStore, identity: String) -> Self {
        Election::Etcd(etcd::LeaseElection::new(store, identity))
    }

    /// Runs `work` whenever this replica leads, until `cancel` fires. `work`
    /// gets a token that fires when leadership is lost (or on shutdown) and
    /// must return soon after; it may be started again after a later win.
    pub async fn run<F, Fut>(self, cancel: CancellationToken, mut work: F)
    where
        F: FnMut(CancellationToken) -> Fut,
        Fut: Future<Output = ()>,
    {
        match self {
            Election::Single => work(cancel).await,
            #[cfg(feature = "etcd")]
            Election::Etcd(e) => e.run(cancel, work).await,
        }
    }
}

#[cfg(feature = "etcd")]
pub mod etcd {
    //! The etcd lease election (see the parent module).

    use std::future::Future;
    use std::time::Duration;

    use skymesh_store::etcd::EtcdStore;
    use skymesh_store::etcd::etcd_client as ec;
    use tokio::time::{Instant, sleep, sleep_until, timeout};
    use tokio_util::sync::CancellationToken;

    use super::{LEADER_KEY, LEASE_TTL, RENEW_EVERY, STEP_DOWN_MARGIN};

    /// Deadline of one etcd request made by the election.
    const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
    /// After a failed renewal, the next try comes this soon.
    const RETRY_RENEW_AFTER: Duration = Duration::from_millis(200);
    /// A standby re-reads the leader key at least this often, in case its
    /// watch missed the deletion.
    const RECHECK_EVERY: Duration = Duration::from_secs(2);

    /// A lease this replica holds the leader key with.
    #[derive(Debug, Clone, Copy)]
    struct Lease {
        id: i64,
        /// Just before the grant was sent: etcd's TTL clock started later.
        granted_at: Instant,
    }

    /// Why holding leadership ended.
    enum Renewal {
        Renewed(Instant),
        Lost(&'static str),
        Failed(String),
    }

    /// Leader election among coordinators sharing one etcd.
    pub struct LeaseElection {
        store: EtcdStore,
        identity: String,
        key: String,
    }

    impl LeaseElection {
        pub(super) fn new(store: EtcdStore, identity: String) -> Self {
            let key = store.etcd_key(LEADER_KEY);
            LeaseElection {
                store,
                identity,
                key,
            }
        }

        pub(super) async fn run<F, Fut>(&self, cancel: CancellationToken, mut work: F)
        where
            F: FnMut(CancellationToken) -> Fut,
            Fut: Future<Output = ()>,
        {
            while !cancel.is_cancelled() {
                let lease = match self.campaign(&cancel).await {
                    Ok(Some(lease)) => lease,
                    Ok(None) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "controller election: etcd request failed; retrying");
                        tokio::select! {
                            () = sleep(Duration::from_millis(500)) => {}
                            () = cancel.cancelled() => return,
                        }
                        continue;
                    }
                };
                tracing::info!(identity = %self.identity, lease = format!("{:x}", lease.id), "this coordinator now leads the controllers");
                let lost = cancel.child_token();
                let held = self.hold(lease, lost.clone());
                let running = work(lost.clone());
                tokio::pin!(held, running);
                tokio::select! {
                    () = &mut held => running.await,
                    () = &mut running => {
                        lost.cancel();
                        held.await;
                    }
                }
                self.resign(lease).await;
                if !cancel.is_cancelled() {
                    tracing::warn!(
                        "this coordinator no longer leads the controllers; campaigning again"
                    );
                }
            }
        }

        /// Waits until this replica holds the leader key; `None` on
        /// shutdown.
        async fn campaign(&self, cancel: &CancellationToken) -> Result<Option<Lease>, ec::Error> {
            let mut client = self.store.client();
            let mut announced: Option<Vec<u8>> = None;
            loop {
                if cancel.is_cancelled() {
                    return Ok(None);
                }
                let resp = within(client.get(self.key.clone(), None)).await?;
                if let Some(kv) = resp.kvs().first() {
                    if announced.as_deref() != Some(kv.value()) {
                        tracing::info!(leader = %String::from_utf8_lossy(kv.value()), "another coordinator leads the controllers; standing by");
                        announced = Some(kv.value().to_vec());
                    }
                    let from = resp.header().map_or(0, |h| h.revision()) + 1;
                    tokio::select! {
                        () = self.wait_for_change(from) => {}
                        () = sleep(RECHECK_EVERY) => {}
                        () = cancel.cancelled() => return Ok(None),
                    }
                    continue;
                }
                let granted_at = Instant::now();
                let ttl = i64::try_from(LEASE_TTL.as_secs()).unwrap_or(5);
                let id = within(client.lease_grant(ttl, None)).await?.id();
                let lease = Lease { id, granted_at };
                let txn = ec::Txn::new()
                    .when([ec::Compare::create_revision(
                        self.key.clone(),
                        ec::CompareOp::Equal,
                        0,
                    )])
                    .and_then([ec::TxnOp::put(
                        self.key.clone(),
                        self.identity.clone(),
                        Some(ec::PutOptions::new().with_lease(id)),
                    )]);
                match within(client.txn(txn)).await {
                    Ok(r) if r.succeeded() => return Ok(Some(lease)),
                    Ok(_) => self.resign(lease).await,
                    Err(e) => {
                        self.resign(lease).await;
                        return Err(e);
                    }
                }
            }
        }

        /// Returns at the first change of the leader key after `from` (or
        /// when the watch fails).
        async fn wait_for_change(&self, from: i64) {
            let mut client = self.store.client();
            let opts = ec::WatchOptions::new().with_start_revision(from);
            let Ok(mut stream) = within(client.watch(self.key.clone(), Some(opts))).await else {
                return;
            };
            loop {
                match stream.message().await {
                    Ok(Some(resp)) if resp.events().is_empty() && !resp.canceled() => {}
                    _ => return,
                }
            }
        }

        /// Keeps the lease alive until `lost` fires or leadership is lost
        /// (then fires `lost` itself).
        async fn hold(&self, lease: Lease, lost: CancellationToken) {
            let mut renewed = lease.granted_at;
            let mut keeper = None;
            let mut wait = RENEW_EVERY;
            loop {
                let step_down_at = renewed + LEASE_TTL - STEP_DOWN_MARGIN;
                tokio::select! {
                    () = lost.cancelled() => return,
                    () = sleep_until(step_down_at) => {
                        tracing::warn!(since = ?renewed.elapsed(), "could not renew the controller lease in time; stepping down");
                        lost.cancel();
                        return;
                    }
                    r = self.renew(lease, &mut keeper, wait) => match r {
                        Renewal::Renewed(at) => {
                            renewed = at;
                            wait = RENEW_EVERY;
                        }
                        Renewal::Lost(why) => {
                            tracing::warn!(reason = why, "lost the controller leadership");
                            lost.cancel();
                            return;
                        }
                        Renewal::Failed(e) => {
                            tracing::warn!(error = %e, "could not renew the controller lease; retrying");
                            keeper = None;
                            wait = RETRY_RENEW_AFTER;
                        }
                    },
                }
            }
        }

        /// One renewal round after `wait`: keep-alive, then a check that
        /// the leader key is still ours.
        async fn renew(
            &self,
            lease: Lease,
            keeper: &mut Option<(ec::LeaseKeeper, ec::LeaseKeepAliveStream)>,
            wait: Duration,
        ) -> Renewal {
            sleep(wait).await;
            let mut client = self.store.client();
            let sent = Instant::now();
            let ttl = match keeper {
                None => match within(client.lease_keep_alive(lease.id)).await {
                    // Opening the stream renews once.
                    Ok(k) => {
                        *keeper = Some(k);
                        1
                    }
                    Err(ec::Error::LeaseKeepAliveError(e)) if e.contains("not found") => 0,
                    Err(e) => return Renewal::Failed(e.to_string()),
                },
                Some((k, stream)) => {
                    let round = async {
                        k.keep_alive().await?;
                        stream.message().await
                    };
                    match within(round).await {
                        Ok(Some(resp)) => resp.ttl(),
                        Ok(None) => return Renewal::Failed("keep-alive stream closed".into()),
                        Err(e) => return Renewal::Failed(e.to_string()),
                    }
                }
            };
            if ttl <= 0 {
                return Renewal::Lost("the lease expired");
            }
            match within(client.get(self.key.clone(), None)).await {
                Ok(resp) => match resp.kvs().first() {
                    Some(kv) if kv.lease() == lease.id => Renewal::Renewed(sent),
                    Some(_) => Renewal::Lost("another coordinator holds the leader key"),
                    None => Renewal::Lost("the leader key was deleted"),
                },
                Err(e) => Renewal::Failed(e.to_string()),
            }
        }

        /// Revokes the lease (deleting the leader key, so a standby takes
        /// over at once); best effort: otherwise it expires.
        async fn resign(&self, lease: Lease) {
            let mut client = self.store.client();
            if let Err(e) = within(client.lease_revoke(lease.id)).await {
                tracing::debug!(error = %e, "could not revoke the controller lease; it will expire");
            }
        }
    }

    /// Runs an etcd request with [`REQUEST_TIMEOUT`].
    async fn within<T>(f: impl Future<Output = Result<T, ec::Error>>) -> Result<T, ec::Error> {
        match timeout(REQUEST_TIMEOUT, f).await {
            Ok(r) => r,
            Err(_) => Err(ec::Error::Internal("etcd request timed out".into())),
        }
    }
}
