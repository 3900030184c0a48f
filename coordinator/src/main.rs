//! `coordinator`: the skymesh control plane (SPEC §3).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use coordinator::server::{Config, run};
use ipnet::Ipv4Net;
use tokio_util::sync::CancellationToken;

/// The skymesh coordinator: stores the mesh's objects, allocates overlay IPs,
/// service VIPs and pair keys, and streams each gateway its netmap.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Address of the gRPC API (port 0 picks a free port; the chosen address
    /// is written to <data-dir>/listen.addr).
    #[arg(long, default_value = "127.0.0.1:7400")]
    listen: SocketAddr,
    /// Where the store and the admin token live.
    #[arg(long, default_value = "/var/lib/skymesh/coordinator")]
    data_dir: PathBuf,
    /// Pool of gateway overlay addresses.
    #[arg(long, default_value = "100.64.0.0/16", value_parser = parse_cidr)]
    overlay_cidr: Ipv4Net,
    /// Pool of service VIPs.
    #[arg(long, default_value = "100.65.0.0/16", value_parser = parse_cidr)]
    service_cidr: Ipv4Net,
    /// Lifetime of join tokens, in seconds.
    #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..))]
    join_token_ttl: u64,
}

fn parse_cidr(s: &str) -> Result<Ipv4Net, String> {
    skymesh_proto::validate::cidr("cidr", s).map_err(|e| e.rule)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let cfg = Config {
        listen: args.listen,
        data_dir: args.data_dir,
        overlay_cidr: args.overlay_cidr,
        service_cidr: args.service_cidr,
        join_token_ttl: Duration::from_secs(args.join_token_ttl),
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "failed to start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    rt.spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        c.cancel();
    });
    match rt.block_on(run(cfg, cancel)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
