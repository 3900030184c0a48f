//! The coordinator's TLS identity (SPEC §3 "TLS everywhere").
//!
//! The coordinator is the CA of its mesh. On first start it makes a CA
//! (ECDSA P-256, rcgen) in the data dir (`ca.crt`, `ca.key` 0600); on every
//! start it issues itself a fresh server certificate from that CA for the
//! names clients reach it by (`--listen`'s address, `--tls-san`, loopback),
//! so adding a name is a restart. With a shared store (etcd) the first
//! replica's CA is put in the store (create-if-absent, like the admin token
//! hash) and every replica adopts it, so one join token's fingerprint pins
//! all replicas. (The store already holds the mesh's pre-shared keys; the
//! CA key is no more secret than they are, and etcd is reached over TLS
//! with client certificates.)
//!
//! An operator may bring a certificate instead (`--tls-cert` chain, leaf
//! first, its CA last; `--tls-key`): the last certificate of the chain is
//! then what clients pin, and it is copied to `<data-dir>/ca.crt`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use skymesh_proto::files::{PrivateFileError, read_private, write_atomic};
use skymesh_proto::tls::{CA_FILE, Fingerprint};
use skymesh_store::{Compare, Op, Store};

use crate::error::{Error, Result};
use crate::keyspace;

/// The CA's private key in the data dir.
pub const CA_KEY_FILE: &str = "ca.key";
/// How long a generated CA is valid.
const CA_VALIDITY: time::Duration = time::Duration::days(3650);
/// How long a server certificate is valid (it is reissued at every start).
const SERVER_VALIDITY: time::Duration = time::Duration::days(825);

/// The TLS flags.
#[derive(Debug, Clone, Default)]
pub struct TlsFlags {
    /// `--tls-cert`: the operator's certificate chain (PEM, leaf first).
    pub cert: Option<PathBuf>,
    /// `--tls-key`: its private key (PEM).
    pub key: Option<PathBuf>,
    /// `--tls-san`: more names (DNS names or IPs) for the generated
    /// server certificate.
    pub sans: Vec<String>,
    /// `--insecure-plaintext`: no TLS (loopback only).
    pub insecure_plaintext: bool,
}

/// What the gRPC server presents, and what clients pin.
#[derive(Clone)]
pub struct ServerIdentity {
    /// The certificate chain, PEM: the server certificate, then its CA.
    pub chain_pem: String,
    /// The server certificate's private key, PEM.
    pub key_pem: String,
    /// The fingerprint of the CA that join tokens carry.
    pub ca_fingerprint: Fingerprint,
}

impl std::fmt::Debug for ServerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerIdentity")
            .field("ca_fingerprint", &self.ca_fingerprint)
            .finish_non_exhaustive()
    }
}

/// Checks the flags before anything is written: plaintext only on loopback,
/// `--tls-cert` and `--tls-key` together, well-formed `--tls-san`s.
pub fn check_flags(flags: &TlsFlags, listen: SocketAddr) -> std::result::Result<(), String> {
    if flags.insecure_plaintext {
        if !listen.ip().is_loopback() {
            return Err(format!(
                "--insecure-plaintext is refused on the non-loopback address {listen}: \
                 tokens and keys would cross the network in the clear; drop the flag (TLS is the default)"
            ));
        }
        if flags.cert.is_some() || flags.key.is_some() || !flags.sans.is_empty() {
            return Err(
                "--insecure-plaintext cannot be combined with --tls-cert, --tls-key or --tls-san"
                    .into(),
            );
        }
    }
    if flags.cert.is_some() != flags.key.is_some() {
        return Err("--tls-cert and --tls-key go together: give both, or neither (a CA and certificate are then generated)".into());
    }
    for san in &flags.sans {
        if san.parse::<IpAddr>().is_err() && !is_dns_name(san) {
            return Err(format!(
                "--tls-san {san:?}: must be an IP address or a DNS name (letters, digits, '-', '.')"
            ));
        }
    }
    Ok(())
}

fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '*')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// Makes or loads the TLS identity; `None` with `--insecure-plaintext`.
/// The flags must have passed [`check_flags`] (the server checks them before
/// it writes anything).
/// Afterwards `<data-dir>/ca.crt` holds what clients trust.
pub async fn init(
    store: &dyn Store,
    data_dir: &Path,
    shared: bool,
    flags: &TlsFlags,
    listen: SocketAddr,
) -> Result<Option<ServerIdentity>> {
    if flags.insecure_plaintext {
        return Ok(None);
    }
    if let (Some(cert), Some(key)) = (&flags.cert, &flags.key) {
        return operator_identity(data_dir, cert, key).map(Some);
    }
    let ca = mesh_ca(store, data_dir, shared).await?;
    let id = issue_server(&ca, &server_names(listen, &flags.sans))?;
    Ok(Some(id))
}

/// The names the generated server certificate carries.
fn server_names(listen: SocketAddr, extra: &[String]) -> Vec<String> {
    let mut names = vec![
        "localhost".to_string(),
        Ipv4Addr::LOCALHOST.to_string(),
        Ipv6Addr::LOCALHOST.to_string(),
    ];
    if !listen.ip().is_unspecified() {
        names.push(listen.ip().to_string());
    } else {
        tracing::warn!(
            %listen,
            "listening on every address: the server certificate names only loopback and --tls-san; \
             add the addresses or names clients use with --tls-san"
        );
    }
    for s in extra {
        names.push(s.clone());
    }
    let mut seen = std::collections::BTreeSet::new();
    names.retain(|n| seen.insert(n.to_ascii_lowercase()));
    names
}

/// The mesh CA: its certificate and key, PEM.
struct Ca {
    cert_pem: String,
    key_pem: String,
}

impl Ca {
    fn der(&self) -> Result<CertificateDer<'static>> {
        CertificateDer::from_pem_slice(self.cert_pem.as_bytes())
            .map_err(|e| Error::Internal(format!("the mesh CA certificate is corrupt: {e}")))
    }

    fn encode(&self) -> Vec<u8> {
        format!("{}{}", self.cert_pem, self.key_pem).into_bytes()
    }

    fn decode(bytes: &[u8]) -> Option<Ca> {
        let s = std::str::from_utf8(bytes).ok()?;
        let split = s.find("-----BEGIN PRIVATE KEY-----")?;
        let (cert_pem, key_pem) = s.split_at(split);
        Some(Ca {
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
        })
    }
}

/// Loads the CA of the data dir, or the shared store's, or makes one.
async fn mesh_ca(store: &dyn Store, data_dir: &Path, shared: bool) -> Result<Ca> {
    let local = read_local_ca(data_dir)?;
    if !shared {
        if let Some(ca) = local {
            return Ok(ca);
        }
        let ca = generate_ca()?;
        write_local_ca(data_dir, &ca)?;
        tracing::info!(fingerprint = %Fingerprint::of(&ca.der()?), dir = %data_dir.display(), "created the mesh CA");
        return Ok(ca);
    }
    if let Some(kv) = store.get(keyspace::MESH_CA).await? {
        let ca = Ca::decode(&kv.value).ok_or_else(|| {
            Error::Internal(format!("corrupt CA record at {}", keyspace::MESH_CA))
        })?;
        adopt(data_dir, local.as_ref(), &ca)?;
        return Ok(ca);
    }
    let candidate = match local {
        Some(ca) => ca,
        None => generate_ca()?,
    };
    let r = store
        .txn(
            vec![Compare::Absent(keyspace::MESH_CA.into())],
            vec![Op::Put {
                key: keyspace::MESH_CA.into(),
                value: candidate.encode(),
            }],
        )
        .await?;
    let ca = if r.succeeded {
        tracing::info!(fingerprint = %Fingerprint::of(&candidate.der()?), "created the mesh CA shared by the coordinators on this store");
        candidate
    } else {
        // Another replica put its CA there first.
        let kv = store
            .get(keyspace::MESH_CA)
            .await?
            .ok_or_else(|| Error::Internal(format!("{} vanished", keyspace::MESH_CA)))?;
        Ca::decode(&kv.value)
            .ok_or_else(|| Error::Internal(format!("corrupt CA record at {}", keyspace::MESH_CA)))?
    };
    write_local_ca(data_dir, &ca)?;
    Ok(ca)
}

/// Takes the shared CA into the data dir when it differs from the local one.
fn adopt(data_dir: &Path, local: Option<&Ca>, shared: &Ca) -> Result<()> {
    if local.is_some_and(|l| l.cert_pem == shared.cert_pem && l.key_pem == shared.key_pem) {
        return Ok(());
    }
    if local.is_some() {
        tracing::warn!(dir = %data_dir.display(), "the data dir's CA is not the one the coordinators on this store share; using the shared one");
    }
    write_local_ca(data_dir, shared)
}

fn read_local_ca(data_dir: &Path) -> Result<Option<Ca>> {
    let (c, k) = (data_dir.join(CA_FILE), data_dir.join(CA_KEY_FILE));
    match (std::fs::read_to_string(&c), read_private(&k)) {
        (_, Err(e @ PrivateFileError::TooOpen { .. })) => Err(Error::Precondition(e.to_string())),
        (Ok(cert_pem), Ok(key_pem)) => Ok(Some(Ca { cert_pem, key_pem })),
        (Err(_), Err(_)) => Ok(None),
        (Ok(_), Err(e)) => Err(Error::Internal(format!(
            "{} exists but {} cannot be read ({e}): restore the CA key, or remove both to make a new CA (every gateway must then join again)",
            c.display(),
            k.display()
        ))),
        (Err(e), Ok(_)) => Err(Error::Internal(format!(
            "{} exists but {} cannot be read ({e})",
            k.display(),
            c.display()
        ))),
    }
}

fn write_local_ca(data_dir: &Path, ca: &Ca) -> Result<()> {
    let io = |name: &str, e: std::io::Error| {
        Error::Internal(format!(
            "failed to write {}: {e}",
            data_dir.join(name).display()
        ))
    };
    write_atomic(&data_dir.join(CA_KEY_FILE), ca.key_pem.as_bytes(), 0o600)
        .map_err(|e| io(CA_KEY_FILE, e))?;
    write_atomic(&data_dir.join(CA_FILE), ca.cert_pem.as_bytes(), 0o644).map_err(|e| io(CA_FILE, e))
}

fn rcgen_err(what: &str) -> impl Fn(rcgen::Error) -> Error + '_ {
    move |e| Error::Internal(format!("{what}: {e}"))
}

fn generate_ca() -> Result<Ca> {
    let key = KeyPair::generate().map_err(rcgen_err("generating the CA key"))?;
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(rcgen_err("CA parameters"))?;
    p.distinguished_name
        .push(DnType::OrganizationName, "skymesh");
    p.distinguished_name.push(
        DnType::CommonName,
        format!("skymesh mesh CA {:08x}", rand::random::<u32>()),
    );
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + CA_VALIDITY;
    let cert = p.self_signed(&key).map_err(rcgen_err("signing the CA"))?;
    Ok(Ca {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// A fresh server certificate for `names`, issued by `ca`.
fn issue_server(ca: &Ca, names: &[String]) -> Result<ServerIdentity> {
    let ca_key = KeyPair::from_pem(&ca.key_pem).map_err(rcgen_err("the CA key"))?;
    let issuer =
        Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key).map_err(rcgen_err("the CA certificate"))?;
    let key = KeyPair::generate().map_err(rcgen_err("generating the server key"))?;
    let mut p =
        CertificateParams::new(names.to_vec()).map_err(rcgen_err("server certificate names"))?;
    p.distinguished_name
        .push(DnType::CommonName, "skymesh coordinator");
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.use_authority_key_identifier_extension = true;
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + SERVER_VALIDITY;
    let cert = p
        .signed_by(&key, &issuer)
        .map_err(rcgen_err("issuing the server certificate"))?;
    tracing::info!(names = %names.join(","), "issued the server certificate");
    Ok(ServerIdentity {
        chain_pem: format!("{}{}", cert.pem(), ca.cert_pem),
        key_pem: key.serialize_pem(),
        ca_fingerprint: Fingerprint::of(&ca.der()?),
    })
}

/// The operator's certificate and key; the chain's last certificate is the
/// trust anchor clients pin.
fn operator_identity(data_dir: &Path, cert: &Path, key: &Path) -> Result<ServerIdentity> {
    let bad = |flag: &str, p: &Path, why: String| {
        Error::Precondition(format!("{flag} {}: {why}", p.display()))
    };
    let chain_pem =
        std::fs::read_to_string(cert).map_err(|e| bad("--tls-cert", cert, e.to_string()))?;
    let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| bad("--tls-cert", cert, format!("not PEM certificates: {e}")))?;
    let Some(anchor) = chain.last() else {
        return Err(bad("--tls-cert", cert, "holds no PEM certificate".into()));
    };
    let key_pem = read_private(key).map_err(|e| match e {
        PrivateFileError::TooOpen { .. } => Error::Precondition(format!("--tls-key {e}")),
        PrivateFileError::Io { source, .. } => bad("--tls-key", key, source.to_string()),
    })?;
    PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| bad("--tls-key", key, format!("not a PEM private key: {e}")))?;
    let anchor_pem = skymesh_proto::tls::to_pem(anchor);
    write_atomic(&data_dir.join(CA_FILE), anchor_pem.as_bytes(), 0o644).map_err(|e| {
        Error::Internal(format!(
            "failed to write {}: {e}",
            data_dir.join(CA_FILE).display()
        ))
    })?;
    Ok(ServerIdentity {
        chain_pem,
        key_pem,
        ca_fingerprint: Fingerprint::of(anchor),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use skymesh_store::embedded::EmbeddedStore;

    fn listen() -> SocketAddr {
        "127.0.0.1:7400".parse().unwrap()
    }

    #[test]
    fn flags_are_checked() {
        let mut f = TlsFlags {
            insecure_plaintext: true,
            ..Default::default()
        };
        assert!(check_flags(&f, listen()).is_ok());
        let e = check_flags(&f, "0.0.0.0:7400".parse().unwrap()).unwrap_err();
        assert!(
            e.contains("--insecure-plaintext") && e.contains("non-loopback"),
            "{e}"
        );
        f.insecure_plaintext = false;
        f.cert = Some("c".into());
        assert!(check_flags(&f, listen()).unwrap_err().contains("--tls-key"));
        f.cert = None;
        f.sans = vec!["bad name!".into()];
        assert!(check_flags(&f, listen()).unwrap_err().contains("--tls-san"));
        f.sans = vec!["coord.example.com".into(), "10.0.0.5".into()];
        assert!(check_flags(&f, listen()).is_ok());
    }

    #[tokio::test]
    async fn the_ca_persists_and_shared_replicas_adopt_one() {
        let db = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(&db.path().join("store.redb")).unwrap();
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let f = TlsFlags::default();
        let one = init(&s, a.path(), false, &f, listen())
            .await
            .unwrap()
            .unwrap();
        let again = init(&s, a.path(), false, &f, listen())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            one.ca_fingerprint, again.ca_fingerprint,
            "the CA survives a restart"
        );
        assert_ne!(one.key_pem, again.key_pem, "the server key is fresh");
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(a.path().join(CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        let first = init(&s, a.path(), true, &f, listen())
            .await
            .unwrap()
            .unwrap();
        let second = init(&s, b.path(), true, &f, listen())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            first.ca_fingerprint, one.ca_fingerprint,
            "the first replica shares its CA"
        );
        assert_eq!(
            second.ca_fingerprint, first.ca_fingerprint,
            "replicas adopt the shared CA"
        );
        assert_eq!(
            std::fs::read(a.path().join(CA_FILE)).unwrap(),
            std::fs::read(b.path().join(CA_FILE)).unwrap()
        );
    }

    #[tokio::test]
    async fn private_keys_open_to_others_are_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let db = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(&db.path().join("store.redb")).unwrap();
        let a = tempfile::tempdir().unwrap();
        let f = TlsFlags::default();
        init(&s, a.path(), false, &f, listen()).await.unwrap();
        let key = a.path().join(CA_KEY_FILE);
        let before = std::fs::read(&key).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = init(&s, a.path(), false, &f, listen()).await.unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("{} has mode 0644", key.display())),
            "{msg}"
        );
        assert!(
            msg.contains(&format!("chmod 600 {}", key.display())),
            "{msg}"
        );
        assert_eq!(std::fs::read(&key).unwrap(), before, "no new CA was made");
        // Shared stores read the local CA too.
        assert!(init(&s, a.path(), true, &f, listen()).await.is_err());

        // The operator's --tls-key.
        let ca = generate_ca().unwrap();
        let id = issue_server(&ca, &["localhost".into()]).unwrap();
        let (cert, k) = (a.path().join("op.crt"), a.path().join("op.key"));
        std::fs::write(&cert, &id.chain_pem).unwrap();
        std::fs::write(&k, &id.key_pem).unwrap();
        std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o640)).unwrap();
        let flags = TlsFlags {
            cert: Some(cert.clone()),
            key: Some(k.clone()),
            ..Default::default()
        };
        let e = init(&s, a.path(), false, &flags, listen())
            .await
            .unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("--tls-key "), "{msg}");
        assert!(
            msg.contains("mode 0640") && msg.contains(&format!("chmod 600 {}", k.display())),
            "{msg}"
        );
        std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(init(&s, a.path(), false, &flags, listen()).await.is_ok());
    }

    #[test]
    fn names_include_the_listen_address_and_sans() {
        let n = server_names(
            "198.51.100.1:7400".parse().unwrap(),
            &["coord.example".into()],
        );
        assert!(n.contains(&"198.51.100.1".to_string()));
        assert!(n.contains(&"coord.example".to_string()));
        assert!(n.contains(&"127.0.0.1".to_string()));
        let n = server_names("0.0.0.0:7400".parse().unwrap(), &[]);
        assert!(!n.contains(&"0.0.0.0".to_string()));
    }
}
