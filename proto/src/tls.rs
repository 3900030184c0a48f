//! TLS to the coordinator, shared by every client (skyctl, meshd, the tests
//! and benchmarks): SPEC §3 "TLS everywhere".
//!
//! The coordinator is the CA of its mesh. A client trusts exactly one thing:
//! - [`Trust::Ca`]: the CA certificate(s) it already holds (`ca.crt`
//!   beside the admin token for skyctl, in the state dir for meshd after its
//!   first join); or
//! - [`Trust::Fingerprint`]: on first contact, the SHA-256 fingerprint of the
//!   CA that the join token carries (kubeadm's `discovery-token-ca-cert-hash`).
//!   The server must present that CA in its chain, and its certificate must
//!   verify against it; the CA found is kept ([`ClientTls::pinned_ca`]) so the
//!   caller can store it and trust it by certificate from then on.
//!
//! Either way the server's certificate is checked as webpki checks it
//! (signature chain, validity, the URL's host among its names) against that
//! one CA only: no system roots. A server presenting anything else is refused
//! during the handshake, before a request (or a token) is sent, with an
//! error naming the fingerprint that was expected.
//!
//! Plaintext (`http://`) is accepted only for loopback hosts, matching the
//! coordinator's `--insecure-plaintext`, which only listens on loopback.

use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest as _, Sha256};
use tonic::transport::{ClientTlsConfig, Endpoint};

/// Name of the CA certificate file: in the coordinator's data dir (beside
/// `admin.token`) and in meshd's state dir.
pub const CA_FILE: &str = "ca.crt";

/// The SHA-256 fingerprint of a certificate's DER encoding, written
/// `sha256:<64 hex digits>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER-encoded certificate.
    pub fn of(der: &[u8]) -> Self {
        Fingerprint(Sha256::digest(der).into())
    }

    /// Parses `sha256:<hex>` (the `sha256:` prefix is optional).
    pub fn parse(s: &str) -> Result<Self, String> {
        let hex = s.trim().strip_prefix("sha256:").unwrap_or(s.trim());
        let mut out = [0u8; 32];
        hex::decode_to_slice(hex, &mut out)
            .map_err(|_| format!("{s:?} is not a CA fingerprint (sha256: and 64 hex digits)"))?;
        Ok(Fingerprint(out))
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The separator between a join token's secret and the CA fingerprint it
/// carries: `skyjoin_<secret>.sha256:<hex>`.
const TOKEN_FINGERPRINT: &str = ".sha256:";

/// A join token carrying `fingerprint` (the whole string is the token the
/// coordinator checks).
pub fn join_token_with_fingerprint(secret: &str, fingerprint: &Fingerprint) -> String {
    format!("{secret}{TOKEN_FINGERPRINT}{}", hex::encode(fingerprint.0))
}

/// The CA fingerprint a join token carries, if any (tokens of a plaintext
/// coordinator carry none).
pub fn join_token_fingerprint(token: &str) -> Result<Option<Fingerprint>, String> {
    match token.trim().rsplit_once(TOKEN_FINGERPRINT) {
        None => Ok(None),
        Some((_, hex)) => Fingerprint::parse(hex).map(Some).map_err(|_| {
            "the join token's CA fingerprint is malformed (copy the whole token)".into()
        }),
    }
}

/// What a client trusts the coordinator by.
#[derive(Debug, Clone)]
pub enum Trust {
    /// These CA certificates (a `ca.crt` file).
    Ca(Vec<CertificateDer<'static>>),
    /// The CA with this fingerprint, which the server presents in its chain
    /// (first contact with a join token).
    Fingerprint(Fingerprint),
}

impl Trust {
    /// Trust the CA certificates of a PEM file.
    pub fn from_ca_file(path: &Path) -> Result<Trust, String> {
        let pem =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Trust::from_ca_pem(&pem).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Trust the CA certificates of PEM text.
    pub fn from_ca_pem(pem: &[u8]) -> Result<Trust, String> {
        let certs = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("not a PEM certificate file: {e}"))?;
        if certs.is_empty() {
            return Err("holds no PEM certificate".into());
        }
        Ok(Trust::Ca(certs))
    }

    /// The fingerprint(s) this trust accepts, for messages.
    fn describe(&self) -> String {
        match self {
            Trust::Fingerprint(f) => f.to_string(),
            Trust::Ca(certs) => certs
                .iter()
                .map(|c| Fingerprint::of(c).to_string())
                .collect::<Vec<_>>()
                .join(" or "),
        }
    }
}

/// PEM text of one certificate.
pub fn to_pem(der: &CertificateDer<'_>) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// Whether a URL host is a loopback address (or `localhost`).
fn is_loopback_host(host: &str) -> bool {
    let h = host.trim_matches(['[', ']']);
    h.eq_ignore_ascii_case("localhost") || h.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Adds `https://` to a URL written without a scheme (`10.0.0.5:7400`).
pub fn normalize_url(url: &str) -> String {
    let url = url.trim();
    if url.contains("://") {
        url.to_string()
    } else {
        format!("https://{url}")
    }
}

/// Builds TLS (or, for loopback `http://` URLs, plaintext) endpoints that
/// verify the coordinator against one [`Trust`].
#[derive(Clone)]
pub struct ClientTls {
    verifier: Option<Arc<Pinned>>,
}

impl ClientTls {
    /// Verifies servers against `trust`; `None` allows only plaintext
    /// loopback URLs.
    pub fn new(trust: Option<Trust>) -> Self {
        ClientTls {
            verifier: trust.map(|t| Arc::new(Pinned::new(t))),
        }
    }

    /// An endpoint for `url` (`https://host:port`, or `http://` on a
    /// loopback host). The error says what is wrong with the URL, without
    /// naming a flag.
    pub fn endpoint(&self, url: &str) -> Result<Endpoint, String> {
        let url = normalize_url(url);
        let e =
            Endpoint::from_shared(url.clone()).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
        let host = e.uri().host().unwrap_or_default().to_string();
        match e.uri().scheme_str() {
            Some("http") => {
                if is_loopback_host(&host) {
                    Ok(e)
                } else {
                    Err(format!(
                        "{url}: plaintext (http://) is refused for a non-loopback coordinator; use https://"
                    ))
                }
            }
            Some("https") => {
                let Some(v) = &self.verifier else {
                    return Err(format!(
                        "{url}: no CA to verify the coordinator with (its ca.crt, or a join token carrying its fingerprint)"
                    ));
                };
                e.tls_config_with_verifier(ClientTlsConfig::new(), v.clone())
                    .map_err(|e| format!("{url}: TLS setup failed: {e}"))
            }
            _ => Err(format!(
                "{url}: the scheme must be https:// (or http:// on loopback)"
            )),
        }
    }

    /// Why the last TLS handshake was refused (the certificate did not
    /// verify against the pinned CA), if it was: one line naming the
    /// fingerprint expected. Callers show it instead of the transport error.
    pub fn refusal(&self) -> Option<String> {
        let v = self.verifier.as_ref()?;
        v.refused.lock().ok()?.clone()
    }

    /// The CA certificate that a server's chain carried, once a handshake
    /// verified against a [`Trust::Fingerprint`]; `None` for a [`Trust::Ca`].
    pub fn pinned_ca(&self) -> Option<CertificateDer<'static>> {
        let v = self.verifier.as_ref()?;
        v.matched.lock().ok()?.clone()
    }
}

/// The verifier: webpki's, rooted at the one pinned CA.
struct Pinned {
    trust: Trust,
    provider: Arc<CryptoProvider>,
    /// The CA that verified the last accepted handshake.
    matched: Mutex<Option<CertificateDer<'static>>>,
    /// Why the last refused handshake was refused, for the caller's error
    /// message (rustls' own error types carry no text of ours).
    refused: Mutex<Option<String>>,
}

impl fmt::Debug for Pinned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pinned")
            .field("trust", &self.trust.describe())
            .finish()
    }
}

impl Pinned {
    fn new(trust: Trust) -> Self {
        Pinned {
            trust,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            matched: Mutex::new(None),
            refused: Mutex::new(None),
        }
    }

    /// Records why a handshake is refused; returns the error for rustls.
    fn refuse(&self, why: impl fmt::Display, err: rustls::Error) -> rustls::Error {
        let msg = format!(
            "the coordinator's certificate is not trusted ({why}): expected one issued by the CA {}",
            self.trust.describe()
        );
        if let Ok(mut r) = self.refused.lock() {
            *r = Some(msg);
        }
        err
    }
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cas: Vec<CertificateDer<'static>> = match &self.trust {
            Trust::Ca(certs) => certs.clone(),
            Trust::Fingerprint(fp) => {
                let found = std::iter::once(end_entity)
                    .chain(intermediates)
                    .find(|c| Fingerprint::of(c) == *fp);
                match found {
                    Some(c) => vec![c.clone().into_owned()],
                    None => {
                        let sent: Vec<String> = std::iter::once(end_entity)
                            .chain(intermediates)
                            .map(|c| Fingerprint::of(c).to_string())
                            .collect();
                        return Err(self.refuse(
                            format_args!("it presented {}", sent.join(", ")),
                            CertificateError::UnknownIssuer.into(),
                        ));
                    }
                }
            }
        };
        let mut roots = RootCertStore::empty();
        for ca in &cas {
            roots.add(ca.clone()).map_err(|e| {
                self.refuse(format_args!("the pinned CA is unusable: {e}"), e.clone())
            })?;
        }
        let webpki =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| {
                    self.refuse(
                        format_args!("the pinned CA is unusable: {e}"),
                        CertificateError::BadEncoding.into(),
                    )
                })?;
        match webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Ok(ok) => {
                if let Ok(mut r) = self.refused.lock() {
                    *r = None;
                }
                // Only a fingerprint pin has a CA to hand back: the one the
                // chain carried (a Trust::Ca caller holds its CA already).
                if matches!(self.trust, Trust::Fingerprint(_))
                    && let Ok(mut m) = self.matched.lock()
                {
                    *m = cas.first().cloned();
                }
                Ok(ok)
            }
            Err(e) => Err(self.refuse(&e, e.clone())),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_round_trips_and_rejects_garbage() {
        let f = Fingerprint::of(b"cert");
        let s = f.to_string();
        assert!(s.starts_with("sha256:") && s.len() == 7 + 64, "{s}");
        assert_eq!(Fingerprint::parse(&s).unwrap(), f);
        assert_eq!(Fingerprint::parse(&s[7..]).unwrap(), f);
        assert!(Fingerprint::parse("sha256:abcd").is_err());
        assert!(Fingerprint::parse(&format!("sha256:{}", "zz".repeat(32))).is_err());
    }

    #[test]
    fn join_tokens_carry_the_fingerprint() {
        let f = Fingerprint::of(b"ca");
        let t = join_token_with_fingerprint("skyjoin_a-b_c", &f);
        assert_eq!(join_token_fingerprint(&t).unwrap(), Some(f));
        assert_eq!(join_token_fingerprint("skyjoin_plain").unwrap(), None);
        assert!(join_token_fingerprint("skyjoin_x.sha256:12").is_err());
    }

    #[test]
    fn plaintext_only_on_loopback() {
        let tls = ClientTls::new(None);
        assert!(tls.endpoint("http://127.0.0.1:7400").is_ok());
        assert!(tls.endpoint("http://[::1]:7400").is_ok());
        assert!(tls.endpoint("http://localhost:7400").is_ok());
        let e = tls.endpoint("http://198.51.100.1:7400").unwrap_err();
        assert!(e.contains("plaintext"), "{e}");
        let e = tls.endpoint("198.51.100.1:7400").unwrap_err();
        assert!(e.contains("no CA"), "{e}");
        let e = tls.endpoint("ftp://h:1").unwrap_err();
        assert!(e.contains("scheme"), "{e}");
    }

    #[test]
    fn pem_round_trips() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["x".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let pem = to_pem(cert.der());
        match Trust::from_ca_pem(pem.as_bytes()).unwrap() {
            Trust::Ca(c) => assert_eq!(c, vec![cert.der().clone()]),
            Trust::Fingerprint(_) => unreachable!(),
        }
        assert!(Trust::from_ca_pem(b"nothing").is_err());
    }
}
