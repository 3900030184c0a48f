//! Authentication: the admin token, single-use join tokens and per-cluster
//! credentials. Only SHA-256 hashes of tokens are stored; comparisons are
//! constant-time.
//!
//! - Admin token: written once to `<data-dir>/admin.token` (0600); required
//!   by the object API (checked by [`AdminAuth`], an interceptor).
//! - Join token: made with a cluster, expires, deleted by the join that uses
//!   it (`/auth/join/<hash>` → `cluster\nexpiry`).
//! - Cluster credential: returned by a successful join; meshd presents it
//!   for the netmap stream and status reports (`/auth/cluster/<name>`).

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use sha2::{Digest as _, Sha256};
use skymesh_store::{KeyValue, Op, Store};
use subtle::ConstantTimeEq as _;

use crate::error::{Error, Result};
use crate::ipam::random_secret;
use crate::registry::unix_now;

const ADMIN_KEY: &str = "/auth/admin";
const JOIN_PREFIX: &str = "/auth/join/";
const CLUSTER_PREFIX: &str = "/auth/cluster/";
/// Name of the admin token file inside the data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// SHA-256 of a token.
pub fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn new_token(prefix: &str) -> String {
    format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random_secret())
    )
}

/// The bearer token of a request, if any.
pub fn bearer(md: &tonic::metadata::MetadataMap) -> Option<&str> {
    md.get("authorization")?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// Makes sure an admin token exists: reuses `<data_dir>/admin.token` when
/// its hash is the stored one, else writes a new token (0600) and stores its
/// hash. Returns the hash.
pub async fn init_admin(store: &dyn Store, data_dir: &Path) -> Result<[u8; 32]> {
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    let stored = store.get(ADMIN_KEY).await?;
    if let (Some(kv), Ok(token)) = (&stored, std::fs::read_to_string(&path)) {
        let h = hash(token.trim());
        if bool::from(h.ct_eq(kv.value.as_slice())) {
            return Ok(h);
        }
        tracing::warn!(path = %path.display(), "admin token file does not match the stored hash; issuing a new admin token");
    }
    let token = new_token("skyadm_");
    let tmp = data_dir.join(".admin.token.tmp");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(format!("{token}\n").as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    };
    write().map_err(|e| Error::Internal(format!("failed to write {}: {e}", path.display())))?;
    let h = hash(&token);
    store
        .txn(
            vec![],
            vec![Op::Put {
                key: ADMIN_KEY.into(),
                value: h.to_vec(),
            }],
        )
        .await?;
    tracing::info!(path = %path.display(), "wrote a new admin token");
    Ok(h)
}

/// Interceptor requiring the admin token.
#[derive(Clone)]
pub struct AdminAuth {
    hash: [u8; 32],
}

impl AdminAuth {
    /// Checks tokens against `hash`.
    pub fn new(hash: [u8; 32]) -> Self {
        AdminAuth { hash }
    }

    /// Whether `md` carries the admin token.
    pub fn is_admin(&self, md: &tonic::metadata::MetadataMap) -> bool {
        bearer(md).is_some_and(|t| bool::from(hash(t).ct_eq(&self.hash)))
    }
}

impl tonic::service::Interceptor for AdminAuth {
    fn call(&mut self, req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if self.is_admin(req.metadata()) {
            return Ok(req);
        }
        let why = if bearer(req.metadata()).is_some() {
            "wrong token"
        } else {
            "missing token"
        };
        tracing::warn!(remote = ?req.remote_addr(), reason = why, "rejected unauthenticated request");
        Err(tonic::Status::unauthenticated(format!(
            "{why}: requests need the admin token (authorization: Bearer <token>) from the coordinator's {ADMIN_TOKEN_FILE}"
        )))
    }
}

/// Adds a new join token for `cluster` to `ops`; returns it with its expiry.
pub fn new_join_token(cluster: &str, ttl: Duration, ops: &mut Vec<Op>) -> (String, i64) {
    let token = new_token("skyjoin_");
    let expires = unix_now().saturating_add(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX));
    ops.push(Op::Put {
        key: format!("{JOIN_PREFIX}{}", hex::encode(hash(&token))),
        value: format!("{cluster}\n{expires}").into_bytes(),
    });
    (token, expires)
}

fn parse_join(kv: &KeyValue) -> Option<(String, i64)> {
    let s = std::str::from_utf8(&kv.value).ok()?;
    let (c, e) = s.split_once('\n')?;
    Some((c.to_string(), e.parse().ok()?))
}

/// Looks up a join token for `cluster`: the key-value to delete in the join
/// transaction (single use), or why it is refused.
pub async fn check_join_token(store: &dyn Store, token: &str, cluster: &str) -> Result<KeyValue> {
    let key = format!("{JOIN_PREFIX}{}", hex::encode(hash(token)));
    let refused = |why: &str| {
        tracing::warn!(%cluster, reason = why, "refused join");
        Err(Error::Unauthenticated(format!(
            "join token refused: {why} (issue a new one with: skyctl create cluster, or ask the operator)"
        )))
    };
    let Some(kv) = store.get(&key).await? else {
        return refused("unknown or already used");
    };
    match parse_join(&kv) {
        Some((c, _)) if c != cluster => refused("it was issued for another cluster"),
        Some((_, exp)) if exp < unix_now() => refused("it has expired"),
        Some(_) => Ok(kv),
        None => refused("corrupt token record"),
    }
}

/// Adds a fresh credential for `cluster` to `ops` and returns it.
pub fn new_cluster_credential(cluster: &str, ops: &mut Vec<Op>) -> String {
    let cred = new_token("skygw_");
    ops.push(Op::Put {
        key: format!("{CLUSTER_PREFIX}{cluster}"),
        value: hash(&cred).to_vec(),
    });
    cred
}

/// Checks a cluster credential.
pub async fn check_cluster(store: &dyn Store, cluster: &str, token: Option<&str>) -> Result<()> {
    let ok = match (
        token,
        store.get(&format!("{CLUSTER_PREFIX}{cluster}")).await?,
    ) {
        (Some(t), Some(kv)) => bool::from(hash(t).ct_eq(kv.value.as_slice())),
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        tracing::warn!(%cluster, "rejected gateway request with a missing or wrong credential");
        Err(Error::Unauthenticated(format!(
            "missing or wrong credential for cluster {cluster:?}"
        )))
    }
}

/// Adds the deletion of a cluster's credential and join tokens to `ops`.
pub async fn release_cluster(store: &dyn Store, cluster: &str, ops: &mut Vec<Op>) -> Result<()> {
    ops.push(Op::Delete {
        key: format!("{CLUSTER_PREFIX}{cluster}"),
    });
    let (joins, _) = store.range(JOIN_PREFIX).await?;
    for kv in joins {
        if parse_join(&kv).is_some_and(|(c, _)| c == cluster) {
            ops.push(Op::Delete { key: kv.key });
        }
    }
    Ok(())
}

/// Adds the deletion of expired join tokens to `ops`.
pub async fn expired_join_tokens(store: &dyn Store, ops: &mut Vec<Op>) -> Result<()> {
    let (joins, _) = store.range(JOIN_PREFIX).await?;
    let now = unix_now();
    for kv in joins {
        if parse_join(&kv).is_none_or(|(_, exp)| exp < now) {
            ops.push(Op::Delete { key: kv.key });
        }
    }
    Ok(())
}
