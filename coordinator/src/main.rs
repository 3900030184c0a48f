//! `coordinator`: the skymesh control plane (SPEC §3).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory as _, Parser, ValueEnum};
use coordinator::server::{Config, StoreConfig, run};
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
    /// Where the mesh's state lives: `embedded` (a file in --data-dir; one
    /// coordinator) or `etcd` (an etcd cluster shared by any number of
    /// coordinator replicas; needs --etcd-endpoints).
    #[arg(long, value_enum, default_value_t = StoreKind::Embedded)]
    store: StoreKind,
    /// etcd client URLs, comma-separated (e.g.
    /// https://10.0.0.1:2379,https://10.0.0.2:2379); with --store etcd.
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    etcd_endpoints: Vec<String>,
    /// CA certificate (PEM) that signed etcd's server certificate: TLS to
    /// etcd, with https:// --etcd-endpoints.
    #[arg(long, value_name = "PATH")]
    etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) to present to etcd (its --client-cert-auth);
    /// with --etcd-key and --etcd-ca.
    #[arg(long, value_name = "PATH")]
    etcd_cert: Option<PathBuf>,
    /// Private key (PEM) of --etcd-cert.
    #[arg(long, value_name = "PATH")]
    etcd_key: Option<PathBuf>,
    /// Key prefix of this mesh in etcd (default /skymesh); with --store etcd.
    /// Coordinators of one mesh must use the same prefix.
    #[arg(long)]
    etcd_prefix: Option<String>,
    /// File holding the admin token to use instead of generating one
    /// (copied to <data-dir>/admin.token). With --store etcd, give every
    /// replica the same file, or copy the first replica's admin.token into
    /// the others' data dirs.
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
    /// Extra name (DNS name or IP) that clients reach this coordinator by,
    /// for the generated server certificate (repeatable, or comma-separated).
    /// The --listen address and loopback are always included.
    #[arg(
        long = "tls-san",
        env = "COORDINATOR_TLS_SAN",
        value_name = "NAME",
        value_delimiter = ','
    )]
    tls_sans: Vec<String>,
    /// The server's certificate chain (PEM, leaf first, its CA last) to use
    /// instead of the generated CA; clients pin the chain's last certificate.
    #[arg(long, value_name = "PATH", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, value_name = "PATH", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Serve without TLS. Only on a loopback --listen address (tokens and
    /// keys would otherwise cross the network in the clear).
    #[arg(long)]
    insecure_plaintext: bool,
    /// Address of the Prometheus /metrics endpoint (plain HTTP; off by
    /// default): RPCs by method and code, open watch and netmap streams,
    /// store latency.
    #[arg(long, env = "COORDINATOR_METRICS_LISTEN", value_name = "IP:PORT")]
    metrics_listen: Option<SocketAddr>,
}

/// How long the runtime waits for blocking tasks (a store call in flight)
/// once the server has stopped.
const RUNTIME_SHUTDOWN: Duration = Duration::from_millis(300);
/// How long after SIGTERM/SIGINT the coordinator stops waiting for itself,
/// whatever it is doing: just past its drain deadline (which `run` keeps
/// once serving).
const STOP_BACKSTOP: Duration = Duration::from_millis(1600);

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum StoreKind {
    Embedded,
    Etcd,
}

/// The store configuration, or why the flags do not make one.
fn store_config(args: &Args) -> Result<StoreConfig, String> {
    match args.store {
        StoreKind::Embedded => {
            if !args.etcd_endpoints.is_empty() {
                return Err(
                    "--etcd-endpoints needs --store etcd (the default store is embedded)".into(),
                );
            }
            if args.etcd_prefix.is_some() {
                return Err(
                    "--etcd-prefix needs --store etcd (the default store is embedded)".into(),
                );
            }
            if args.etcd_ca.is_some() || args.etcd_cert.is_some() || args.etcd_key.is_some() {
                return Err(
                    "--etcd-ca, --etcd-cert and --etcd-key need --store etcd (the default store is embedded)"
                        .into(),
                );
            }
            Ok(StoreConfig::Embedded)
        }
        StoreKind::Etcd => {
            let endpoints: Vec<String> = args
                .etcd_endpoints
                .iter()
                .map(|e| e.trim().to_string())
                .filter(|e| !e.is_empty())
                .collect();
            if endpoints.is_empty() {
                return Err(
                    "--store etcd needs --etcd-endpoints URL[,URL...] (e.g. http://127.0.0.1:2379)"
                        .into(),
                );
            }
            if args.etcd_cert.is_some() != args.etcd_key.is_some() {
                return Err("--etcd-cert and --etcd-key go together".into());
            }
            if args.etcd_cert.is_some() && args.etcd_ca.is_none() {
                return Err(
                    "--etcd-cert needs --etcd-ca (the CA that signed etcd's certificate)".into(),
                );
            }
            for e in &endpoints {
                let hostport = e
                    .strip_prefix("http://")
                    .or_else(|| e.strip_prefix("https://"))
                    .unwrap_or(e);
                match (e.starts_with("https://"), args.etcd_ca.is_some()) {
                    (true, false) => {
                        return Err(format!(
                            "--etcd-endpoints: {e} is https://: give --etcd-ca (and --etcd-cert/--etcd-key for client-cert auth)"
                        ));
                    }
                    (false, true) => {
                        return Err(format!(
                            "--etcd-endpoints: {e}: with --etcd-ca every endpoint must be https://"
                        ));
                    }
                    _ => {}
                }
                if hostport.is_empty() || hostport.contains('/') || !hostport.contains(':') {
                    return Err(format!(
                        "--etcd-endpoints: {e:?} is not a URL like http://host:2379"
                    ));
                }
            }
            let prefix = args
                .etcd_prefix
                .clone()
                .unwrap_or_else(|| "/skymesh".into());
            if !prefix.is_empty() && !prefix.starts_with('/') {
                return Err(format!(
                    "--etcd-prefix {prefix:?} must start with '/' (e.g. /skymesh)"
                ));
            }
            let tls = args
                .etcd_ca
                .clone()
                .map(|ca| coordinator::server::EtcdTlsFiles {
                    ca,
                    cert: args.etcd_cert.clone(),
                    key: args.etcd_key.clone(),
                });
            Ok(StoreConfig::Etcd {
                endpoints,
                prefix,
                tls,
            })
        }
    }
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
    let store = match store_config(&args) {
        Ok(s) => s,
        Err(e) => {
            Args::command()
                .error(clap::error::ErrorKind::ArgumentConflict, e)
                .exit();
        }
    };
    let cfg = Config {
        listen: args.listen,
        data_dir: args.data_dir,
        overlay_cidr: args.overlay_cidr,
        service_cidr: args.service_cidr,
        join_token_ttl: Duration::from_secs(args.join_token_ttl),
        store,
        admin_token_file: args.admin_token_file,
        tls: coordinator::tls::TlsFlags {
            cert: args.tls_cert,
            key: args.tls_key,
            sans: args.tls_sans,
            insecure_plaintext: args.insecure_plaintext,
        },
        metrics_listen: args.metrics_listen,
    };
    if let Err(e) = coordinator::tls::check_flags(&cfg.tls, cfg.listen) {
        Args::command()
            .error(clap::error::ErrorKind::ArgumentConflict, e)
            .exit();
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "failed to start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    // `stop` fires on SIGTERM/SIGINT only; `cancel` (its child) also when
    // the server fails.
    let stop = CancellationToken::new();
    let cancel = stop.child_token();
    let c = stop.clone();
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
    let result = rt.block_on(async {
        let run = std::pin::pin!(run(cfg, cancel));
        // Running, `run` stops by its own drain deadline; this one also
        // covers a signal during start-up (an etcd that does not answer).
        let backstop = async {
            stop.cancelled().await;
            tokio::time::sleep(STOP_BACKSTOP).await;
        };
        tokio::select! {
            r = run => r,
            () = backstop => {
                tracing::warn!(deadline = ?STOP_BACKSTOP, "still starting or stopping at the stop deadline; exiting");
                Ok(())
            }
        }
    });
    // Drops every task still running (connections cut at the drain
    // deadline) and with them the last handles on the store, so that the
    // database is closed before the process exits and a new coordinator
    // opens it at once.
    rt.shutdown_timeout(RUNTIME_SHUTDOWN);
    match result {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
