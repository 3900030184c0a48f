//! `meshd`: the skymesh gateway of one cluster (SPEC §4).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use meshd::run::{Config, run};
use tokio_util::sync::CancellationToken;

/// The skymesh gateway: joins the mesh, builds WireGuard tunnels to every
/// other cluster's gateway and routes mesh traffic through them.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// The coordinator's URL, e.g. http://10.0.0.5:7400; several replicas
    /// comma-separated.
    #[arg(long, env = "MESHD_COORDINATOR")]
    coordinator: String,
    /// This cluster's name (as created with `skyctl create cluster`).
    #[arg(long, env = "MESHD_CLUSTER")]
    cluster: String,
    /// Single-use join token, needed on first start only.
    #[arg(long, env = "MESHD_JOIN_TOKEN")]
    join_token: Option<String>,
    /// Underlay address other gateways reach this one at (default: the
    /// address used to reach the coordinator, with --listen-port).
    #[arg(long)]
    endpoint: Option<SocketAddr>,
    /// WireGuard UDP port.
    #[arg(long, default_value_t = 51820)]
    listen_port: u16,
    /// Private key, credential and netmap cache (mode 0600 files).
    #[arg(long, default_value = "/var/lib/skymesh/meshd")]
    state_dir: PathBuf,
    /// TUN interface name (unique per host: the WireGuard API socket
    /// directory is shared by all network namespaces).
    #[arg(long, default_value = "sky0")]
    interface: String,
    /// Address of the embedded DNS server.
    #[arg(long)]
    dns_listen: Option<SocketAddr>,
    /// Upstream resolver for names outside the mesh zones (repeatable;
    /// default: the nameservers of /etc/resolv.conf).
    #[arg(long = "dns-upstream", value_name = "IP:PORT")]
    dns_upstreams: Vec<SocketAddr>,
    /// Address of the Prometheus /metrics endpoint.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// TOML file of jobs to register (reloaded on change).
    #[arg(long)]
    jobs: Option<PathBuf>,
    /// Turn off segmentation offloads (TUN TSO/GRO writes and UDP GSO):
    /// one packet per read, write and send. Slower; for kernels or NICs
    /// whose offloads misbehave.
    #[arg(long, env = "MESHD_NO_OFFLOAD")]
    no_offload: bool,
}

fn main() -> ExitCode {
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // hickory-server logs three lines at info for every DNS query: a log
    // flood under load (and half of the DNS server's time at 40k QPS).
    // Quiet unless RUST_LOG asks for it by name.
    if !std::env::var("RUST_LOG").is_ok_and(|v| v.contains("hickory")) {
        filter = filter.add_directive(
            "hickory_server=warn"
                .parse()
                .expect("a constant, valid filter directive"),
        );
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let a = Args::parse();
    if a.interface.is_empty() || a.interface.len() > 15 {
        tracing::error!("invalid --interface {:?}: 1-15 characters", a.interface);
        return ExitCode::from(2);
    }
    let cfg = Config {
        coordinator: a.coordinator,
        cluster: a.cluster,
        join_token: a.join_token,
        endpoint: a.endpoint,
        listen_port: a.listen_port,
        state_dir: a.state_dir,
        interface: a.interface,
        dns_listen: a.dns_listen,
        dns_upstreams: a.dns_upstreams,
        metrics_listen: a.metrics_listen,
        jobs: a.jobs,
        offload: !a.no_offload,
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
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            return;
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
