//! meshd's state directory: the private key, the cluster credential, the
//! pinned coordinator CA and the netmap cache. Every file is written
//! atomically and durably with mode 0600 ([`skymesh_proto::files`]: the key
//! never leaves this host; the cache holds pre-shared keys), and a private
//! key that group or others may read is refused at start.

use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use base64::Engine as _;

use crate::state::NetState;

const PRIVATE_KEY: &str = "private.key";
const CREDENTIAL: &str = "credential";
const NETMAP_CACHE: &str = "netmap.cache";
const CA: &str = skymesh_proto::tls::CA_FILE;

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    path: PathBuf,
}

impl StateDir {
    /// Opens (creating with mode 0700) the directory.
    pub fn open(path: &Path) -> Result<Self> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .with_context(|| format!("failed to create state dir {}", path.display()))?;
        Ok(StateDir {
            path: path.to_path_buf(),
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write_private(&self, name: &str, data: &[u8]) -> Result<()> {
        let path = self.path.join(name);
        skymesh_proto::files::write_atomic(&path, data, 0o600)
            .with_context(|| format!("failed to write {}", path.display()))
    }

    /// The x25519 private key, generated on first use (base64, as `wg genkey`).
    /// Returns the key and whether it was just generated. A key file whose
    /// mode lets group or others read or write it is refused.
    pub fn private_key(&self) -> Result<([u8; 32], bool)> {
        let path = self.path.join(PRIVATE_KEY);
        match skymesh_proto::files::read_private(&path) {
            Ok(s) => {
                let key = base64::engine::general_purpose::STANDARD
                    .decode(s.trim())
                    .ok()
                    .and_then(|b| <[u8; 32]>::try_from(b).ok())
                    .with_context(|| {
                        format!("{} does not hold a base64 32-byte key", path.display())
                    })?;
                Ok((key, false))
            }
            Err(e) if e.is_not_found() => {
                let secret = x25519_dalek::StaticSecret::from(rand::random::<[u8; 32]>());
                let key = secret.to_bytes();
                let text = base64::engine::general_purpose::STANDARD.encode(key);
                self.write_private(PRIVATE_KEY, format!("{text}\n").as_bytes())?;
                tracing::info!(path = %path.display(), "generated a new private key");
                Ok((key, true))
            }
            Err(e) => Err(anyhow::anyhow!("{e}")),
        }
    }

    /// The credential from a previous join, if any.
    pub fn credential(&self) -> Option<String> {
        std::fs::read_to_string(self.path.join(CREDENTIAL))
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    }

    /// Stores the credential a join returned.
    pub fn save_credential(&self, cred: &str) -> Result<()> {
        self.write_private(CREDENTIAL, format!("{cred}\n").as_bytes())
    }

    /// The cached netmap, if any.
    pub fn netmap(&self) -> Option<NetState> {
        NetState::decode(&std::fs::read(self.path.join(NETMAP_CACHE)).ok()?)
    }

    /// The coordinator's CA, pinned at the first join: what every later
    /// connection verifies the coordinator with. `None` before the join.
    pub fn ca(&self) -> Result<Option<skymesh_proto::tls::Trust>> {
        let path = self.path.join(CA);
        if !path.exists() {
            return Ok(None);
        }
        skymesh_proto::tls::Trust::from_ca_file(&path)
            .map(Some)
            .map_err(|e| anyhow::anyhow!("the pinned coordinator CA is unreadable: {e}"))
    }

    /// Keeps the coordinator's CA (PEM) that the first join verified.
    pub fn save_ca(&self, pem: &str) -> Result<()> {
        self.write_private(CA, pem.as_bytes())
    }

    /// Caches the netmap (fail-static across restarts).
    pub fn save_netmap(&self, s: &NetState) -> Result<()> {
        self.write_private(NETMAP_CACHE, &s.encode())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn key_is_generated_once_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let sd = StateDir::open(&dir.path().join("s")).unwrap();
        let (k1, new1) = sd.private_key().unwrap();
        let (k2, new2) = sd.private_key().unwrap();
        assert!(new1 && !new2);
        assert_eq!(k1, k2);
        let mode = std::fs::metadata(sd.path().join(PRIVATE_KEY))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        sd.save_credential("c").unwrap();
        assert_eq!(sd.credential().as_deref(), Some("c"));
        let mode = std::fs::metadata(sd.path().join(CREDENTIAL))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let st = NetState {
            revision: 9,
            cluster: "a".into(),
            ..Default::default()
        };
        sd.save_netmap(&st).unwrap();
        assert_eq!(sd.netmap(), Some(st));
    }

    #[test]
    fn a_key_open_to_others_is_refused_naming_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let sd = StateDir::open(&dir.path().join("s")).unwrap();
        sd.private_key().unwrap();
        let path = sd.path().join(PRIVATE_KEY);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = format!("{:#}", sd.private_key().unwrap_err());
        assert_eq!(
            e,
            format!(
                "{} has mode 0644: a private key must not be readable or writable by group or others (fix: chmod 600 {})",
                path.display(),
                path.display()
            )
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(!sd.private_key().unwrap().1, "the same key once fixed");
    }
}
