//! `meshd`: the skymesh gateway of one cluster (SPEC §4).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use meshd::core::lb::FlowLimits;
use meshd::io::endpoint::Endpoint;
use meshd::run::{Config, run};
use tokio_util::sync::CancellationToken;

/// jemalloc rather than glibc's malloc, for memory that goes back to the
/// kernel. Every table rebuild (DNS records, balancer) allocates a new
/// version and frees the old; glibc gives each thread an arena and keeps
/// the freed chunks resident there, so meshd's RSS holding 10,000 services
/// varied between 59 and 129 MiB from run to run of the benchmark (48-52
/// MiB with `MALLOC_ARENA_MAX=1`, for 33.8 MiB of heap at its peak).
/// jemalloc's background threads purge freed pages after a delay: 51-61
/// MiB in three runs, and lower once idle. mimalloc 0.1.52 (v3) held 75-82
/// MiB in the same runs. It is built with one arena (`narenas:1`,
/// `.cargo/config.toml`): with a crypto thread per core, jemalloc's
/// default arenas (4 per core) held 55-66 MiB, one arena 45-48 MiB; the
/// packet path never allocates per packet, so nothing contends for it.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The skymesh gateway: joins the mesh, builds WireGuard tunnels to every
/// other cluster's gateway and routes mesh traffic through them.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// The coordinator's URL, e.g. https://10.0.0.5:7400; several replicas
    /// comma-separated (http:// only on loopback).
    #[arg(long, env = "MESHD_COORDINATOR")]
    coordinator: String,
    /// This cluster's name (as created with `skyctl create cluster`).
    #[arg(long, env = "MESHD_CLUSTER")]
    cluster: String,
    /// File holding the single-use join token (needed on first start only;
    /// or set MESHD_JOIN_TOKEN). It carries the coordinator's CA
    /// fingerprint, which meshd pins.
    #[arg(long, env = "MESHD_JOIN_TOKEN_FILE", value_name = "FILE")]
    join_token_file: Option<PathBuf>,
    /// Refused: a token on the command line is visible to every user of the
    /// host (ps, /proc). Kept only to say so.
    #[arg(long, hide = true, value_name = "TOKEN")]
    join_token: Option<String>,
    /// Underlay address other gateways reach this one at, as IP:PORT or
    /// HOST:PORT (default: the address used to reach the coordinator, with
    /// --listen-port). A host name is resolved at start and again before
    /// every status report, so peers follow a dynamic DNS name.
    #[arg(long, value_name = "HOST:PORT")]
    endpoint: Option<Endpoint>,
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
    /// Zone the embedded DNS answers service names in, as
    /// `<service>.<namespace>.<zone>` (repeatable; replaces the defaults
    /// `svc` and `svc.clusterset.local`, so list them too to keep them;
    /// e.g. `svc.cluster.local` for Space Cloud's names). The first zone is
    /// the one PTR records point into.
    #[arg(long = "dns-zone", value_name = "ZONE", value_parser = parse_zone)]
    dns_zones: Vec<String>,
    /// Upstream resolver for names outside the mesh zones (repeatable;
    /// default: the nameservers of /etc/resolv.conf).
    #[arg(long = "dns-upstream", value_name = "IP:PORT")]
    dns_upstreams: Vec<SocketAddr>,
    /// Network whose clients may use the DNS server for names outside the
    /// mesh zones (forwarded upstream), besides loopback and this cluster's
    /// workload CIDRs (repeatable). Others get REFUSED.
    #[arg(long = "dns-allow", value_name = "CIDR", value_parser = parse_net)]
    dns_allow: Vec<ipnet::IpNet>,
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
    /// Threads that seal outgoing WireGuard datagrams, in parallel even for
    /// one peer, and send them in order (and, when more than one, as many
    /// that open received ones). Default: one per CPU core: on 2 cores two
    /// moved 1.12x the TCP of one on one stream (alternating runs), and
    /// the same on four streams and UDP.
    #[arg(long, env = "MESHD_CRYPTO_THREADS", value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=64))]
    crypto_threads: Option<u16>,
    /// Flows the service balancer tracks at most. When full, the oldest
    /// flow that never completed (or already closed) makes room.
    #[arg(long, env = "MESHD_MAX_FLOWS", default_value_t = FlowLimits::default().max_flows as u32,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_flows: u32,
    /// Flows one client address may hold at most.
    #[arg(long, env = "MESHD_MAX_FLOWS_PER_SOURCE",
          default_value_t = FlowLimits::default().max_flows_per_source,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_flows_per_source: u32,
}

/// How long after SIGTERM/SIGINT meshd exits at the latest, whatever its
/// tasks are doing (they stop on their own well before).
const STOP_DEADLINE: Duration = Duration::from_millis(1500);
/// How long the runtime waits for blocking tasks once meshd has stopped.
const RUNTIME_SHUTDOWN: Duration = Duration::from_millis(300);

fn parse_net(s: &str) -> Result<ipnet::IpNet, String> {
    s.parse::<ipnet::IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("{s:?} is not a CIDR (e.g. 10.9.0.0/16) or an IP address"))
}

/// A `--dns-zone`: a domain name other than the root, folded to lower case
/// and written without the trailing dot.
fn parse_zone(s: &str) -> Result<String, String> {
    let name = skymesh_dns::records::parse_zone(s).map_err(|e| format!("{s:?}: {e}"))?;
    let text = name.to_ascii();
    Ok(text.trim_end_matches('.').to_owned())
}

/// The join token from `--join-token-file`, else `MESHD_JOIN_TOKEN`.
fn join_token(file: Option<&std::path::Path>) -> Result<Option<String>, String> {
    let token = match file {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .map_err(|e| format!("--join-token-file {}: {e}", f.display()))?,
        ),
        None => std::env::var("MESHD_JOIN_TOKEN").ok(),
    };
    let Some(token) = token
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
    else {
        return match file {
            Some(f) => Err(format!(
                "--join-token-file {}: the file is empty",
                f.display()
            )),
            None => Ok(None),
        };
    };
    if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("the join token must be one word (as skyctl create cluster printed it)".into());
    }
    Ok(Some(token))
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
    if a.join_token.is_some() {
        tracing::error!(
            "--join-token is refused: a secret on the command line is visible to every user of the host; \
             put the token in a file (mode 0600) and pass --join-token-file FILE, or set MESHD_JOIN_TOKEN"
        );
        return ExitCode::from(2);
    }
    let join_token = match join_token(a.join_token_file.as_deref()) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(2);
        }
    };
    let cfg = Config {
        coordinator: a.coordinator,
        cluster: a.cluster,
        join_token,
        endpoint: a.endpoint,
        listen_port: a.listen_port,
        state_dir: a.state_dir,
        interface: a.interface,
        dns_listen: a.dns_listen,
        dns_zones: a.dns_zones,
        dns_upstreams: a.dns_upstreams,
        dns_allow: a.dns_allow,
        metrics_listen: a.metrics_listen,
        jobs: a.jobs,
        offload: !a.no_offload,
        crypto_threads: a.crypto_threads.map_or_else(
            || std::thread::available_parallelism().map_or(1, usize::from),
            usize::from,
        ),
        flow_limits: FlowLimits {
            max_flows: a.max_flows as usize,
            max_flows_per_source: a.max_flows_per_source,
            ..FlowLimits::default()
        },
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "failed to start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    // `stop` fires on SIGTERM/SIGINT only; `cancel` (its child) also when
    // a task fails.
    let stop = CancellationToken::new();
    let cancel = stop.child_token();
    let c = stop.clone();
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
    let result = rt.block_on(async {
        let run = std::pin::pin!(run(cfg, cancel));
        let deadline = async {
            stop.cancelled().await;
            tokio::time::sleep(STOP_DEADLINE).await;
        };
        tokio::select! {
            r = run => r,
            () = deadline => {
                tracing::warn!(deadline = ?STOP_DEADLINE, "tasks still running at the stop deadline; exiting");
                Ok(())
            }
        }
    });
    // Whatever still runs is dropped; the TUN interface (and its routes)
    // goes when the process exits and its file descriptor closes.
    rt.shutdown_timeout(RUNTIME_SHUTDOWN);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
