//! etcd for the end-to-end tests: a real multi-member etcd cluster on
//! loopback ([`EtcdCluster`], from `skymesh_store::etcd::testcluster`:
//! members killed on drop; a missing `etcd` binary is an error with an
//! install hint), and real coordinator binaries sharing it.

use anyhow::{Context as _, Result};
use skymesh_store::Store as _;
use skymesh_store::etcd::EtcdStore;
pub use skymesh_store::etcd::testcluster::{EtcdCluster, etcd_binary};

use crate::Coordinator;

/// The etcd key prefix the tests' coordinators use.
pub const PREFIX: &str = "/skymesh";

/// Store key of the controller leader (the coordinator's
/// `election::LEADER_KEY`); its value starts with the leader's listen
/// address.
pub const LEADER_KEY: &str = "/election/controllers";

/// Starts an `n`-member etcd cluster (blocking).
pub fn cluster(n: usize) -> Result<EtcdCluster> {
    EtcdCluster::start(n).context("cannot start a real etcd cluster")
}

/// Starts a coordinator with `--store etcd` on `cluster` (prefix
/// [`PREFIX`]). Every coordinator after the first must be given the first
/// one's admin token (`share_token_with`), as an operator would with
/// `--admin-token-file`.
pub fn coordinator(
    cluster: &EtcdCluster,
    share_token_with: Option<&Coordinator>,
    extra: &[&str],
) -> Result<Coordinator> {
    let endpoints = cluster.endpoints_arg();
    let token_file = share_token_with.map(|c| {
        c.data_dir()
            .join("admin.token")
            .to_string_lossy()
            .into_owned()
    });
    let mut args: Vec<&str> = vec![
        "--store",
        "etcd",
        "--etcd-endpoints",
        &endpoints,
        "--etcd-prefix",
        PREFIX,
    ];
    if let Some(f) = &token_file {
        args.extend(["--admin-token-file", f.as_str()]);
    }
    args.extend_from_slice(extra);
    Coordinator::start_with(&args)
}

/// The listen address (`127.0.0.1:PORT`) of the coordinator that holds the
/// controller lease, if any.
pub async fn controller_leader(cluster: &EtcdCluster) -> Result<Option<String>> {
    let store = EtcdStore::connect(&cluster.endpoints(), PREFIX).await?;
    Ok(store.get(LEADER_KEY).await?.map(|kv| {
        String::from_utf8_lossy(&kv.value)
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string()
    }))
}

/// The leader key's value: `<listen address> pid <pid> host <hostname>`.
pub async fn controller_leader_record(cluster: &EtcdCluster) -> Result<Option<String>> {
    let store = EtcdStore::connect(&cluster.endpoints(), PREFIX).await?;
    Ok(store
        .get(LEADER_KEY)
        .await?
        .map(|kv| String::from_utf8_lossy(&kv.value).into_owned()))
}

/// `127.0.0.1:PORT` of a coordinator.
pub fn addr(c: &Coordinator) -> String {
    c.url().trim_start_matches("https://").to_string()
}

/// Index of the member that is etcd's raft leader.
pub async fn raft_leader(cluster: &EtcdCluster) -> Result<usize> {
    use skymesh_store::etcd::etcd_client as ec;
    for i in 0..cluster.len() {
        let Ok(mut c) = ec::Client::connect([cluster.endpoint(i)], None).await else {
            continue;
        };
        let Ok(Ok(status)) =
            tokio::time::timeout(std::time::Duration::from_secs(2), c.status()).await
        else {
            continue;
        };
        if status.header().map(|h| h.member_id()) == Some(status.leader()) {
            return Ok(i);
        }
    }
    anyhow::bail!("no etcd member reports itself as leader")
}
