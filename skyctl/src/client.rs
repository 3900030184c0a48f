//! Connecting to the coordinator: the URL, the admin token (flag, env or
//! token file) sent as `authorization: Bearer <token>` on every call, and the
//! [`Ctx`] every subcommand runs with. No output here.

use std::path::Path;
use std::time::Duration;

use skymesh_proto::Bearer;
use skymesh_proto::tls::{ClientTls, Trust};
use skymesh_proto::v1::api_client::ApiClient;
use tonic::Status;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::cli::{GlobalArgs, OutputFormat};
use crate::error::{self, Exit};

/// How long to wait for the TCP/HTTP2 connection to the coordinator.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 PING interval, so that a watch notices a coordinator host that
/// vanished without closing the connection.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);
/// How long a PING may go unanswered before the connection is dropped.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// An authenticated object-API client.
pub(crate) type Api = ApiClient<InterceptedService<Channel, Bearer>>;

/// What every subcommand that talks to the coordinator gets.
pub(crate) struct Ctx {
    pub(crate) api: Api,
    /// The coordinator URL, for messages.
    pub(crate) url: String,
    pub(crate) output: OutputFormat,
}

impl Ctx {
    /// Turns a status into an [`Exit`] naming this coordinator.
    pub(crate) fn status(&self, s: &Status) -> Exit {
        error::from_status(&self.url, s)
    }
}

/// Adds `https://` when the URL has no scheme (`127.0.0.1:7400`).
pub(crate) fn normalize_url(url: &str) -> String {
    skymesh_proto::tls::normalize_url(url)
}

/// What the coordinator is verified with: `--ca-file`/`SKYCTL_CA`, else the
/// `ca.crt` beside the token file (the local coordinator's data dir), else
/// nothing (only a loopback `http://` URL then works).
pub(crate) fn resolve_trust(
    ca_file: Option<&Path>,
    token_file: &Path,
) -> Result<Option<Trust>, Exit> {
    if let Some(f) = ca_file {
        return Trust::from_ca_file(f)
            .map(Some)
            .map_err(|e| Exit::usage(format!("--ca-file: {e}")));
    }
    let beside = token_file.with_file_name(skymesh_proto::tls::CA_FILE);
    if beside.exists() {
        return Trust::from_ca_file(&beside)
            .map(Some)
            .map_err(|e| Exit::usage(format!("{e} (or pass --ca-file PATH)")));
    }
    Ok(None)
}

/// The token from `--token`/`SKYCTL_TOKEN`, else from the token file.
pub(crate) fn resolve_token(token: Option<&str>, token_file: &Path) -> Result<String, Exit> {
    if let Some(t) = token.map(str::trim).filter(|t| !t.is_empty()) {
        return Ok(t.to_string());
    }
    match std::fs::read_to_string(token_file) {
        Ok(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
        Ok(_) => Err(Exit::usage(format!(
            "no admin token: {} is empty; pass --token TOKEN (or set SKYCTL_TOKEN)",
            token_file.display()
        ))),
        Err(e) => Err(Exit::usage(format!(
            "no admin token: pass --token TOKEN (or set SKYCTL_TOKEN), or --token-file PATH (or SKYCTL_TOKEN_FILE) \
             naming the coordinator's <data-dir>/admin.token; could not read {}: {e}",
            token_file.display()
        ))),
    }
}

/// The innermost cause of an error, e.g. `Connection refused (os error 111)`.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// Checks the connection flags, reads the token and connects to the
/// coordinator. `--coordinator` may list several replicas (comma-separated):
/// the first one that answers serves this invocation.
pub(crate) async fn connect(global: &GlobalArgs) -> Result<Ctx, Exit> {
    let token = resolve_token(global.token.as_deref(), &global.token_file)?;
    let auth = Bearer::new(Some(&token)).map_err(|_| {
        Exit::usage(
            "the admin token holds characters that cannot be sent in a header; check --token",
        )
    })?;
    let (channel, url) = channel(global).await?;
    Ok(Ctx {
        // A large mesh's lists are well over tonic's 4 MiB default.
        api: ApiClient::with_interceptor(channel, auth)
            .max_decoding_message_size(skymesh_proto::MAX_MESSAGE_BYTES),
        url,
        output: global.output,
    })
}

/// A verified TLS connection to the first coordinator of `--coordinator`
/// that answers, with the URL list (for messages); no token involved.
pub(crate) async fn channel(global: &GlobalArgs) -> Result<(Channel, String), Exit> {
    let urls: Vec<String> = global
        .coordinator
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(normalize_url)
        .collect();
    let url = urls.join(",");
    if urls.is_empty() {
        return Err(Exit::usage("--coordinator needs at least one URL"));
    }
    let trust = resolve_trust(global.ca_file.as_deref(), &global.token_file)?;
    let no_ca = trust.is_none();
    let tls = ClientTls::new(trust);
    let endpoints = urls
        .iter()
        .map(|u| {
            Ok(tls
                .endpoint(u)
                .map_err(|e| {
                    let hint = if no_ca {
                        "; pass --ca-file PATH (or SKYCTL_CA) naming the coordinator's ca.crt"
                    } else {
                        ""
                    };
                    Exit::usage(format!("--coordinator {e}{hint}"))
                })?
                .connect_timeout(CONNECT_TIMEOUT)
                .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
                .keep_alive_timeout(KEEPALIVE_TIMEOUT)
                .keep_alive_while_idle(true)
                .tcp_nodelay(true))
        })
        .collect::<Result<Vec<_>, Exit>>()?;
    // The first replica that answers serves this invocation.
    let mut last = String::new();
    for e in &endpoints {
        match e.connect().await {
            Ok(c) => return Ok((c, url)),
            Err(err) => last = root_cause(&err),
        }
    }
    if let Some(why) = tls.refusal() {
        return Err(Exit::refused(format!(
            "refused to talk to the coordinator at {url}: {why}; check --coordinator and --ca-file (or SKYCTL_CA)"
        )));
    }
    Err(error::unreachable(&url, &last))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_gets_a_scheme() {
        assert_eq!(normalize_url("127.0.0.1:7400"), "https://127.0.0.1:7400");
        assert_eq!(normalize_url(" http://h:1 "), "http://h:1");
        assert_eq!(normalize_url("https://h:1"), "https://h:1");
    }

    #[test]
    fn token_from_flag_then_file() {
        let dir = std::env::temp_dir().join(format!("skyctl-token-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("admin.token");
        std::fs::write(&file, "  secret\n").unwrap();
        assert_eq!(resolve_token(Some("flag"), &file).unwrap(), "flag");
        assert_eq!(resolve_token(Some(" "), &file).unwrap(), "secret");
        assert_eq!(resolve_token(None, &file).unwrap(), "secret");
        let missing = dir.join("missing");
        let e = resolve_token(None, &missing).unwrap_err();
        assert_eq!(e.code, crate::error::EXIT_USAGE);
        assert!(e.message.contains("--token"), "{}", e.message);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
