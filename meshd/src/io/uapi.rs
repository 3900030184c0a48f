//! The WireGuard cross-platform userspace API socket
//! (<https://www.wireguard.com/xplatform/>), so `wg show <interface>` works
//! against meshd. `get=1` answers from the device loop's published
//! counters; `set=1` is refused with EPERM because the coordinator owns the
//! configuration.
//!
//! The socket lives in `/var/run/wireguard/<interface>.sock` (mode 0600),
//! a directory shared by every network namespace of the host, hence one
//! interface name per gateway.

use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use anyhow::{Context as _, Result};
use arc_swap::ArcSwap;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use super::device::DeviceStats;
use crate::core::node::PERSISTENT_KEEPALIVE_S;

/// Directory of WireGuard API sockets.
pub const SOCKET_DIR: &str = "/var/run/wireguard";
/// EPERM: the configuration is not ours to change.
const EPERM: i32 = 1;
/// EINVAL: unknown operation.
const EINVAL: i32 = 22;

/// Path of the API socket of `iface`.
pub fn socket_path(iface: &str) -> PathBuf {
    PathBuf::from(SOCKET_DIR).join(format!("{iface}.sock"))
}

/// Renders the answer to `get=1`.
pub fn render_get(stats: &DeviceStats, private_key: &[u8; 32]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "private_key={}", hex::encode(private_key));
    let _ = writeln!(s, "listen_port={}", stats.listen_port);
    for p in &stats.peers {
        let _ = writeln!(s, "public_key={}", hex::encode(p.public_key));
        let _ = writeln!(s, "preshared_key={}", hex::encode(p.preshared_key));
        let _ = writeln!(s, "protocol_version=1");
        if let Some(ep) = p.endpoint {
            let _ = writeln!(s, "endpoint={ep}");
        }
        let (sec, nsec) = p
            .last_handshake
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or((0, 0), |d| (d.as_secs(), d.subsec_nanos()));
        let _ = writeln!(s, "last_handshake_time_sec={sec}");
        let _ = writeln!(s, "last_handshake_time_nsec={nsec}");
        let _ = writeln!(s, "tx_bytes={}", p.tx_bytes);
        let _ = writeln!(s, "rx_bytes={}", p.rx_bytes);
        let _ = writeln!(s, "persistent_keepalive_interval={PERSISTENT_KEEPALIVE_S}");
        for a in &p.allowed_ips {
            let _ = writeln!(s, "allowed_ip={a}");
        }
    }
    s
}

/// Serves the API socket of `iface` until `cancel` fires, then removes it.
pub async fn serve(
    iface: String,
    stats: Arc<ArcSwap<DeviceStats>>,
    private_key: [u8; 32],
    cancel: CancellationToken,
) -> Result<()> {
    std::fs::create_dir_all(SOCKET_DIR)
        .with_context(|| format!("failed to create {SOCKET_DIR}"))?;
    let path = socket_path(&iface);
    // A socket left by a previous meshd of this interface.
    let _ = std::fs::remove_file(&path);
    let listener =
        UnixListener::bind(&path).with_context(|| format!("failed to bind {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    tracing::info!(path = %path.display(), "WireGuard API socket listening");
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            r = listener.accept() => match r {
                Ok((conn, _)) => {
                    let stats = stats.clone();
                    tokio::spawn(async move {
                        if let Err(e) = handle(conn, &stats, &private_key).await {
                            tracing::debug!(error = %e, "API socket client failed");
                        }
                    });
                }
                Err(e) => tracing::warn!(error = %e, "API socket accept failed"),
            }
        }
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

async fn handle(conn: UnixStream, stats: &ArcSwap<DeviceStats>, key: &[u8; 32]) -> Result<()> {
    let (r, mut w) = conn.into_split();
    let mut lines = BufReader::new(r).lines();
    while let Some(op) = lines.next_line().await? {
        if op.is_empty() {
            continue;
        }
        // Consume the rest of the request (up to the blank line).
        while let Some(l) = lines.next_line().await? {
            if l.is_empty() {
                break;
            }
        }
        let reply = match op.as_str() {
            "get=1" => format!("{}errno=0\n\n", render_get(&stats.load(), key)),
            "set=1" => {
                tracing::warn!(
                    "refused a WireGuard API set: the coordinator owns this configuration"
                );
                format!("errno={EPERM}\n\n")
            }
            _ => format!("errno={EINVAL}\n\n"),
        };
        w.write_all(reply.as_bytes()).await?;
    }
    Ok(())
}
