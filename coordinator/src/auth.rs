//! Authentication: the admin token, single-use join tokens and per-cluster
//! credentials. Only SHA-256 hashes of tokens are stored; comparisons are
//! constant-time.
//!
//! - Admin token: written once to `<data-dir>/admin.token` (0600); required
//!   by the object API (checked by [`AdminAuth`], an interceptor). With a
//!   shared store (etcd) every coordinator uses the one token the first
//!   created (see [`init_admin`]).
//! - Join token: made with a cluster, expires, deleted by the join that uses
//!   it (`/auth/join/<hash>` → `cluster\nexpiry`).
//! - Cluster credential: returned by a successful join; meshd presents it
//!   for the netmap stream and status reports (`/auth/cluster/<name>`).

use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use sha2::{Digest as _, Sha256};
use skymesh_store::{Compare, KeyValue, Op, Store};
use subtle::ConstantTimeEq as _;

use crate::error::{Error, Result};
use crate::ipam::random_secret;
use crate::keyspace;
use crate::registry::unix_now;

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

/// Where [`init_admin`] takes the admin token from.
#[derive(Debug, Clone, Copy, Default)]
pub struct AdminTokenSource<'a> {
    /// A token file named by the operator (`--admin-token-file`), e.g. a
    /// secret mounted into every replica.
    pub file: Option<&'a Path>,
    /// Whether other coordinators share the store (etcd): the stored hash is
    /// then created once, by whichever replica comes first, and never
    /// replaced.
    pub shared: bool,
}

/// Makes sure an admin token exists and returns its hash; afterwards
/// `<data_dir>/admin.token` (0600) holds the token this coordinator accepts.
///
/// - Own store (embedded): a token from `src.file` becomes the admin token.
///   Otherwise `<data_dir>/admin.token` is reused when its hash is the
///   stored one, else a new token is written there and its hash stored.
/// - Shared store (etcd): every replica must accept the same token. The
///   token is `src.file`'s, else `<data_dir>/admin.token`'s, else (only
///   when the store has none yet) a new one. When the store holds no hash,
///   it is created with a create-if-absent transaction, so of replicas
///   starting together exactly one token wins. When it holds a hash, the
///   replica's token must match it: a replica is never allowed to replace
///   the token the others use, and one without the token refuses to start,
///   saying how to give it the token (copy `admin.token` from the first
///   replica, or pass the same `--admin-token-file` to all).
pub async fn init_admin(
    store: &dyn Store,
    data_dir: &Path,
    src: AdminTokenSource<'_>,
) -> Result<[u8; 32]> {
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    let given = src.file.map(read_token_file).transpose()?;
    let local = std::fs::read_to_string(&path)
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty());
    let stored = store.get(keyspace::ADMIN_TOKEN).await?;
    let holds = |token: &str| {
        stored
            .as_ref()
            .is_some_and(|kv| bool::from(hash(token).ct_eq(kv.value.as_slice())))
    };
    if src.shared {
        let candidate = given.clone().or_else(|| local.clone());
        if stored.is_some() {
            return match candidate {
                Some(token) if holds(&token) => {
                    if local.as_deref() != Some(token.as_str()) {
                        write_token_file(data_dir, &token)?;
                    }
                    tracing::info!(path = %path.display(), "admin token matches the one shared by the coordinators");
                    Ok(hash(&token))
                }
                other => Err(shared_token_refused(&path, src.file, other.is_some())),
            };
        }
        let fresh = candidate.is_none();
        let token = candidate.unwrap_or_else(|| new_token("skyadm_"));
        // The file first: a crash before the store write leaves a token
        // that the next start offers again, never a hash without its token.
        if local.as_deref() != Some(token.as_str()) {
            write_token_file(data_dir, &token)?;
        }
        let h = hash(&token);
        if put_admin_hash(store, &h, true).await? {
            tracing::info!(path = %path.display(), "created the admin token shared by the coordinators on this store");
            return Ok(h);
        }
        // Another replica created one at the same moment.
        let now = store.get(keyspace::ADMIN_TOKEN).await?;
        if now.is_some_and(|kv| bool::from(h.ct_eq(kv.value.as_slice()))) {
            return Ok(h);
        }
        if fresh {
            let _ = std::fs::remove_file(&path);
        }
        return Err(shared_token_refused(&path, src.file, !fresh));
    }
    if let Some(token) = given {
        if local.as_deref() != Some(token.as_str()) {
            write_token_file(data_dir, &token)?;
        }
        let h = hash(&token);
        if !holds(&token) {
            put_admin_hash(store, &h, false).await?;
            tracing::info!(path = %path.display(), "admin token set from --admin-token-file");
        }
        return Ok(h);
    }
    if let (Some(_), Some(token)) = (&stored, &local) {
        if holds(token) {
            return Ok(hash(token));
        }
        tracing::warn!(path = %path.display(), "admin token file does not match the stored hash; issuing a new admin token");
    }
    let token = new_token("skyadm_");
    write_token_file(data_dir, &token)?;
    let h = hash(&token);
    put_admin_hash(store, &h, false).await?;
    tracing::info!(path = %path.display(), "wrote a new admin token");
    Ok(h)
}

/// Stores the admin token's hash (only if none is stored, when
/// `only_if_absent`); returns whether it was written.
async fn put_admin_hash(store: &dyn Store, h: &[u8; 32], only_if_absent: bool) -> Result<bool> {
    let compares = if only_if_absent {
        vec![Compare::Absent(keyspace::ADMIN_TOKEN.into())]
    } else {
        Vec::new()
    };
    let ops = vec![Op::Put {
        key: keyspace::ADMIN_TOKEN.into(),
        value: h.to_vec(),
    }];
    Ok(store.txn(compares, ops).await?.succeeded)
}

/// Reads a token file named by the operator.
fn read_token_file(file: &Path) -> Result<String> {
    let token = std::fs::read_to_string(file)
        .map_err(|e| {
            Error::Internal(format!(
                "cannot read --admin-token-file {}: {e}",
                file.display()
            ))
        })?
        .trim()
        .to_string();
    if token.is_empty() || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(Error::Internal(format!(
            "--admin-token-file {} must hold one token (non-empty, no spaces)",
            file.display()
        )));
    }
    Ok(token)
}

/// Writes `<data_dir>/admin.token` (0600) atomically.
fn write_token_file(data_dir: &Path, token: &str) -> Result<()> {
    skymesh_proto::files::write_atomic(
        &data_dir.join(ADMIN_TOKEN_FILE),
        format!("{token}\n").as_bytes(),
        0o600,
    )
    .map_err(|e| {
        Error::Internal(format!(
            "failed to write {}: {e}",
            data_dir.join(ADMIN_TOKEN_FILE).display()
        ))
    })
}

fn shared_token_refused(path: &Path, file: Option<&Path>, had_token: bool) -> Error {
    let what = match (file, had_token) {
        (Some(f), _) => format!("the token in --admin-token-file {} is not it", f.display()),
        (None, true) => format!("{} holds a different token", path.display()),
        (None, false) => format!("{} does not exist", path.display()),
    };
    Error::Precondition(format!(
        "the shared store already has an admin token (created by the first coordinator on it) and {what}: \
         every coordinator on one store must use the same token: copy admin.token from a running \
         coordinator's --data-dir to {} (mode 0600), or start every coordinator with the same \
         --admin-token-file",
        path.display()
    ))
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
/// It carries `ca`, the fingerprint of the coordinator's CA, so a gateway
/// can pin the coordinator on first contact; the whole string is the token
/// (its hash is what is stored).
pub fn new_join_token(
    cluster: &str,
    ttl: Duration,
    ca: Option<&skymesh_proto::tls::Fingerprint>,
    ops: &mut Vec<Op>,
) -> (String, i64) {
    let secret = new_token("skyjoin_");
    let token = match ca {
        Some(fp) => skymesh_proto::tls::join_token_with_fingerprint(&secret, fp),
        None => secret,
    };
    let expires = unix_now().saturating_add(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX));
    ops.push(Op::Put {
        key: format!("{}{}", keyspace::JOIN_TOKENS, hex::encode(hash(&token))),
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
    let key = format!("{}{}", keyspace::JOIN_TOKENS, hex::encode(hash(token)));
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
        key: format!("{}{cluster}", keyspace::CREDENTIALS),
        value: hash(&cred).to_vec(),
    });
    cred
}

/// Checks a cluster credential.
pub async fn check_cluster(store: &dyn Store, cluster: &str, token: Option<&str>) -> Result<()> {
    let ok = match (
        token,
        store
            .get(&format!("{}{cluster}", keyspace::CREDENTIALS))
            .await?,
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
        key: format!("{}{cluster}", keyspace::CREDENTIALS),
    });
    let (joins, _) = store.range(keyspace::JOIN_TOKENS).await?;
    for kv in joins {
        if parse_join(&kv).is_some_and(|(c, _)| c == cluster) {
            ops.push(Op::Delete { key: kv.key });
        }
    }
    Ok(())
}

/// Adds the deletion of expired join tokens to `ops`.
pub async fn expired_join_tokens(store: &dyn Store, ops: &mut Vec<Op>) -> Result<()> {
    let (joins, _) = store.range(keyspace::JOIN_TOKENS).await?;
    let now = unix_now();
    for kv in joins {
        if parse_join(&kv).is_none_or(|(_, exp)| exp < now) {
            ops.push(Op::Delete { key: kv.key });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use skymesh_store::embedded::EmbeddedStore;
    use std::sync::Arc;

    fn store(dir: &tempfile::TempDir) -> Arc<EmbeddedStore> {
        Arc::new(EmbeddedStore::open(&dir.path().join("store.redb")).unwrap())
    }

    fn token_in(dir: &Path) -> Option<String> {
        std::fs::read_to_string(dir.join(ADMIN_TOKEN_FILE))
            .ok()
            .map(|t| t.trim().to_string())
    }

    async fn stored(s: &EmbeddedStore) -> Vec<u8> {
        s.get(keyspace::ADMIN_TOKEN).await.unwrap().unwrap().value
    }

    const OWN: AdminTokenSource<'static> = AdminTokenSource {
        file: None,
        shared: false,
    };
    const SHARED: AdminTokenSource<'static> = AdminTokenSource {
        file: None,
        shared: true,
    };

    #[tokio::test]
    async fn own_store_reuses_the_token_and_reissues_a_lost_one() {
        let (db, data) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let s = store(&db);
        let h1 = init_admin(s.as_ref(), data.path(), OWN).await.unwrap();
        let t1 = token_in(data.path()).unwrap();
        assert_eq!(hash(&t1), h1);
        assert_eq!(init_admin(s.as_ref(), data.path(), OWN).await.unwrap(), h1);
        std::fs::remove_file(data.path().join(ADMIN_TOKEN_FILE)).unwrap();
        let h2 = init_admin(s.as_ref(), data.path(), OWN).await.unwrap();
        assert_ne!(h2, h1, "a lost token file means a new token");
        assert_eq!(stored(&s).await, h2.to_vec());
    }

    #[tokio::test]
    async fn own_store_takes_the_token_file_given() {
        let (db, data, other) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        let s = store(&db);
        init_admin(s.as_ref(), data.path(), OWN).await.unwrap();
        let file = other.path().join("secret");
        std::fs::write(&file, "skyadm_given\n").unwrap();
        let src = AdminTokenSource {
            file: Some(&file),
            shared: false,
        };
        let h = init_admin(s.as_ref(), data.path(), src).await.unwrap();
        assert_eq!(h, hash("skyadm_given"));
        assert_eq!(token_in(data.path()).as_deref(), Some("skyadm_given"));
        assert_eq!(stored(&s).await, h.to_vec());
        std::fs::write(&file, "two words").unwrap();
        let err = init_admin(s.as_ref(), data.path(), src).await.unwrap_err();
        assert!(err.to_string().contains("one token"), "{err}");
    }

    #[tokio::test]
    async fn shared_store_keeps_the_first_token_and_refuses_others() {
        let db = tempfile::tempdir().unwrap();
        let s = store(&db);
        let (first, second, third) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        let h = init_admin(s.as_ref(), first.path(), SHARED).await.unwrap();

        // Without the token: refused, nothing changed, no file left.
        let err = init_admin(s.as_ref(), second.path(), SHARED)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("already has an admin token"), "{err}");
        assert!(err.contains("does not exist"), "{err}");
        assert_eq!(token_in(second.path()), None);
        assert_eq!(stored(&s).await, h.to_vec());

        // With the first one's token file: accepted and copied.
        let file = first.path().join(ADMIN_TOKEN_FILE);
        let with = AdminTokenSource {
            file: Some(&file),
            shared: true,
        };
        assert_eq!(
            init_admin(s.as_ref(), second.path(), with).await.unwrap(),
            h
        );
        assert_eq!(token_in(second.path()), token_in(first.path()));
        // ... and later starts need no flag.
        assert_eq!(
            init_admin(s.as_ref(), second.path(), SHARED).await.unwrap(),
            h
        );

        // Another token, in the data dir or given: refused, never replaces.
        std::fs::write(third.path().join(ADMIN_TOKEN_FILE), "skyadm_mine\n").unwrap();
        let err = init_admin(s.as_ref(), third.path(), SHARED)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("holds a different token"), "{err}");
        let wrong = third.path().join(ADMIN_TOKEN_FILE);
        let err = init_admin(
            s.as_ref(),
            second.path(),
            AdminTokenSource {
                file: Some(&wrong),
                shared: true,
            },
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(err.contains("is not it"), "{err}");
        assert_eq!(stored(&s).await, h.to_vec());
        assert_eq!(token_in(second.path()), token_in(first.path()));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shared_store_replicas_starting_together_agree_on_one_token() {
        let db = tempfile::tempdir().unwrap();
        let s = store(&db);
        let dirs: Vec<tempfile::TempDir> = (0..8).map(|_| tempfile::tempdir().unwrap()).collect();
        let results = futures::future::join_all(
            dirs.iter()
                .map(|d| init_admin(s.as_ref(), d.path(), SHARED)),
        )
        .await;
        let winners: Vec<usize> = (0..8).filter(|&i| results[i].is_ok()).collect();
        assert_eq!(winners.len(), 1, "exactly one fresh token wins");
        let w = winners[0];
        let token = token_in(dirs[w].path()).unwrap();
        assert_eq!(stored(&s).await, hash(&token).to_vec());
        for (i, d) in dirs.iter().enumerate() {
            if i != w {
                assert_eq!(token_in(d.path()), None, "a losing replica leaves no token");
            }
        }
    }
}
