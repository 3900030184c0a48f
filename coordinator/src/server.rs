//! Wiring: opens the store (embedded, or etcd shared with other replicas),
//! makes sure the admin token and the default namespace exist, runs the
//! controllers (on the elected replica) and serves both gRPC services, the
//! standard health service and (with `--metrics-listen`) `/metrics`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use ipnet::Ipv4Net;
use skymesh_proto::v1::{api_server::ApiServer, gateway_server::GatewayServer};
use skymesh_store::Store;
use skymesh_store::embedded::EmbeddedStore;
use tokio_util::sync::CancellationToken;

use crate::api::ApiService;
use crate::auth::{self, AdminAuth, AdminTokenSource};
use crate::election::Election;
use crate::gateway::GatewayService;
use crate::limits;
use crate::metrics::{Metrics, RpcLayer, TimedStore};
use crate::registry::Registry;
use crate::shutdown::DRAIN_DEADLINE;
use crate::tls::TlsFlags;

/// Which store backend the coordinator uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// `<data-dir>/store.redb`: one coordinator.
    Embedded,
    /// An etcd cluster, shared by any number of coordinator replicas.
    Etcd {
        /// Client URLs (`https://host:2379`, or `http://` without TLS).
        endpoints: Vec<String>,
        /// Key prefix of this mesh in etcd (e.g. `/skymesh`).
        prefix: String,
        /// TLS to etcd (`--etcd-ca`, `--etcd-cert`, `--etcd-key`).
        tls: Option<EtcdTlsFiles>,
    },
}

/// The PEM files of TLS to etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTlsFiles {
    /// `--etcd-ca`: the CA that signed etcd's certificate.
    pub ca: PathBuf,
    /// `--etcd-cert`: the client certificate (with `key`).
    pub cert: Option<PathBuf>,
    /// `--etcd-key`.
    pub key: Option<PathBuf>,
}

#[cfg(feature = "etcd")]
impl EtcdTlsFiles {
    fn load(&self) -> anyhow::Result<skymesh_store::etcd::EtcdTls> {
        let read = |flag: &str, p: &std::path::Path| {
            std::fs::read(p).with_context(|| format!("{flag} {}", p.display()))
        };
        let identity = match (&self.cert, &self.key) {
            (Some(c), Some(k)) => Some((read("--etcd-cert", c)?, read("--etcd-key", k)?)),
            _ => None,
        };
        Ok(skymesh_store::etcd::EtcdTls {
            ca_pem: read("--etcd-ca", &self.ca)?,
            identity,
        })
    }
}

/// Coordinator configuration (the binary's flags).
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub overlay_cidr: Ipv4Net,
    pub service_cidr: Ipv4Net,
    pub join_token_ttl: Duration,
    pub store: StoreConfig,
    /// The admin token to use (`--admin-token-file`), instead of the one in
    /// the data directory.
    pub admin_token_file: Option<PathBuf>,
    /// TLS: the generated CA (default), the operator's certificate, or
    /// plaintext on loopback.
    pub tls: TlsFlags,
    /// Where to serve Prometheus `/metrics` (`--metrics-listen`; off when
    /// `None`).
    pub metrics_listen: Option<SocketAddr>,
}

/// Runs the coordinator until `cancel` fires, then stops within
/// [`DRAIN_DEADLINE`]: streams end with UNAVAILABLE, connections that are
/// still open at the deadline are dropped.
pub async fn run(cfg: Config, cancel: CancellationToken) -> anyhow::Result<()> {
    if cfg.overlay_cidr.contains(&cfg.service_cidr.network())
        || cfg.service_cidr.contains(&cfg.overlay_cidr.network())
    {
        anyhow::bail!(
            "invalid --service-cidr: {} overlaps the overlay CIDR {}",
            cfg.service_cidr,
            cfg.overlay_cidr
        );
    }
    crate::tls::check_flags(&cfg.tls, cfg.listen).map_err(|e| anyhow::anyhow!(e))?;
    create_private_dir(&cfg.data_dir)?;
    let metrics_listener = match cfg.metrics_listen {
        Some(addr) => {
            let l = crate::metrics::bind(addr).await?;
            // Where it ended up (useful with port 0), as listen.addr.
            std::fs::write(
                cfg.data_dir.join("metrics.addr"),
                format!("{}\n", l.local_addr()?),
            )
            .context("failed to write metrics.addr")?;
            Some(l)
        }
        None => None,
    };
    // A stop while connecting to etcd (or repairing the database file)
    // needs no waiting.
    let (store, shared) = tokio::select! {
        r = open_store(&cfg) => r?,
        () = cancel.cancelled() => return Ok(()),
    };
    let admin = auth::init_admin(
        store.as_dyn(),
        &cfg.data_dir,
        AdminTokenSource {
            file: cfg.admin_token_file.as_deref(),
            shared,
        },
    )
    .await?;
    let identity =
        crate::tls::init(store.as_dyn(), &cfg.data_dir, shared, &cfg.tls, cfg.listen).await?;
    let (metrics, metrics_registry) = Metrics::new();
    let timed: Arc<dyn skymesh_store::Store> =
        Arc::new(TimedStore::new(store.as_arc(), metrics.clone()));
    let reg = Registry::new(
        timed.clone(),
        cfg.overlay_cidr,
        cfg.service_cidr,
        cfg.join_token_ttl,
    )
    .with_ca_fingerprint(identity.as_ref().map(|i| i.ca_fingerprint));
    reg.ensure_default_namespace().await?;
    // Events are recorded from here on, whenever the recorder starts.
    crate::events::init_cursor(reg.store().as_ref()).await?;

    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("failed to listen on {}", cfg.listen))?;
    let local = listener.local_addr()?;
    // Tell scripts and tests where we listen (useful with port 0).
    std::fs::write(cfg.data_dir.join("listen.addr"), format!("{local}\n"))
        .context("failed to write listen.addr")?;
    let tls = match &identity {
        Some(i) => i.ca_fingerprint.to_string(),
        None => "off (--insecure-plaintext)".to_string(),
    };
    tracing::info!(addr = %local, %tls, data_dir = %cfg.data_dir.display(), overlay = %cfg.overlay_cidr, services = %cfg.service_cidr, store = store.describe(), "coordinator listening");

    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let election = store.election(format!(
        "{local} pid {} host {}",
        std::process::id(),
        host.trim()
    ));
    let controllers = {
        let (reg, store) = (reg.clone(), store.clone());
        tokio::spawn(election.run(cancel.clone(), move |lost| {
            let (reg, store) = (reg.clone(), store.clone());
            async move {
                tokio::join!(
                    crate::controller::run(reg.clone(), lost.clone()),
                    crate::events::run(reg, lost.clone()),
                    store.leader_duties(lost)
                );
            }
        }))
    };
    let admin_auth = AdminAuth::new(admin);
    let api_service = ApiService::new(reg.clone(), cancel.clone());
    let gw_service = GatewayService::new(reg, admin_auth.clone(), cancel.clone());
    metrics.watch_streams_of(api_service.watches(), gw_service.netmaps());
    let rpc_metrics = metrics.clone();
    let api = tonic::service::interceptor::InterceptedService::new(
        ApiServer::new(api_service)
            .max_decoding_message_size(limits::MAX_REQUEST_BYTES)
            .max_encoding_message_size(limits::MAX_MESSAGE_BYTES),
        admin_auth,
    );
    let gw = GatewayServer::new(gw_service)
        .max_decoding_message_size(limits::MAX_REQUEST_BYTES)
        .max_encoding_message_size(limits::MAX_MESSAGE_BYTES);
    // grpc.health.v1, without a token (probes carry none).
    let (health_reporter, health) = tonic_health::server::health_reporter();
    let health_task = tokio::spawn(crate::health::run(health_reporter, timed, cancel.clone()));
    if let Some(l) = metrics_listener {
        let c = cancel.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(l, metrics, metrics_registry, c).await {
                tracing::error!("{e:#}");
            }
        });
    }
    let shutdown = cancel.clone();
    let mut server = tonic::transport::Server::builder();
    if let Some(id) = &identity {
        server = server
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(
                tonic::transport::Identity::from_pem(&id.chain_pem, &id.key_pem),
            ))
            .context("TLS configuration failed")?;
    }
    let serve = server
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .max_concurrent_streams(Some(limits::MAX_STREAMS_PER_CONNECTION))
        .layer(RpcLayer(rpc_metrics))
        .add_service(health)
        .add_service(api)
        .add_service(gw)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            async move { shutdown.cancelled().await },
        );
    let mut serve = std::pin::pin!(serve);
    let stopped = tokio::select! {
        r = &mut serve => Some(r),
        () = cancel.cancelled() => None,
    };
    // Stopping: every stream ends with UNAVAILABLE (crate::shutdown), so the
    // connections close by themselves; past the deadline, whatever is still
    // open is dropped.
    let deadline = tokio::time::Instant::now() + DRAIN_DEADLINE;
    match stopped {
        Some(r) => r.context("gRPC server failed")?,
        None => match tokio::time::timeout_at(deadline, &mut serve).await {
            Ok(r) => r.context("gRPC server failed")?,
            Err(_) => tracing::warn!(
                deadline = ?DRAIN_DEADLINE,
                "connections still open at the drain deadline; dropping them"
            ),
        },
    }
    cancel.cancel();
    let _ = tokio::time::timeout_at(deadline, health_task).await;
    if tokio::time::timeout_at(deadline, controllers)
        .await
        .is_err()
    {
        tracing::warn!("the controllers did not stop by the drain deadline");
    }
    // The store closes when the last task holding it is dropped: the
    // binary shuts the runtime down right after this returns.
    Ok(())
}

/// The opened store, with what only some backends have.
#[derive(Clone)]
enum OpenStore {
    Embedded(Arc<EmbeddedStore>),
    #[cfg(feature = "etcd")]
    Etcd(skymesh_store::etcd::EtcdStore),
}

impl OpenStore {
    fn as_arc(&self) -> Arc<dyn Store> {
        match self {
            OpenStore::Embedded(s) => s.clone(),
            #[cfg(feature = "etcd")]
            OpenStore::Etcd(s) => Arc::new(s.clone()),
        }
    }

    fn as_dyn(&self) -> &dyn Store {
        match self {
            OpenStore::Embedded(s) => s.as_ref(),
            #[cfg(feature = "etcd")]
            OpenStore::Etcd(s) => s,
        }
    }

    fn describe(&self) -> String {
        match self {
            OpenStore::Embedded(s) => format!("embedded {}", s.path().display()),
            #[cfg(feature = "etcd")]
            OpenStore::Etcd(s) => format!("etcd {} prefix {}", s.endpoints().join(","), s.prefix()),
        }
    }

    /// How this replica decides whether it runs the controllers.
    fn election(&self, identity: String) -> Election {
        match self {
            OpenStore::Embedded(_) => {
                let _ = identity;
                Election::Single
            }
            #[cfg(feature = "etcd")]
            OpenStore::Etcd(s) => Election::etcd(s.clone(), identity),
        }
    }

    /// What the elected replica does besides the controllers: on etcd,
    /// compacting old history (the embedded store compacts itself).
    async fn leader_duties(self, cancel: CancellationToken) {
        match self {
            OpenStore::Embedded(_) => {}
            #[cfg(feature = "etcd")]
            OpenStore::Etcd(s) => compact_etcd(s, cancel).await,
        }
        let _ = cancel;
    }
}

/// Opens the configured store; `true` when other coordinators may share it.
async fn open_store(cfg: &Config) -> anyhow::Result<(OpenStore, bool)> {
    match &cfg.store {
        StoreConfig::Embedded => {
            let path = cfg.data_dir.join(skymesh_store::embedded::DB_FILE_NAME);
            let store = tokio::task::spawn_blocking(move || EmbeddedStore::open(&path))
                .await
                .context("store open task failed")?
                .context("failed to open the store")?;
            Ok((OpenStore::Embedded(Arc::new(store)), false))
        }
        #[cfg(feature = "etcd")]
        StoreConfig::Etcd {
            endpoints,
            prefix,
            tls,
        } => {
            let tls = tls.as_ref().map(EtcdTlsFiles::load).transpose()?;
            let store = skymesh_store::etcd::EtcdStore::connect_with(endpoints, prefix, tls)
                .await
                .context("failed to connect to etcd (--etcd-endpoints)")?;
            Ok((OpenStore::Etcd(store), true))
        }
        #[cfg(not(feature = "etcd"))]
        StoreConfig::Etcd { .. } => anyhow::bail!(
            "--store etcd: this coordinator was built without etcd support (cargo feature `etcd`)"
        ),
    }
}

/// How often the leader considers compacting etcd.
#[cfg(feature = "etcd")]
const COMPACT_EVERY: Duration = Duration::from_secs(300);

/// Compacts etcd's history as the embedded store does its own: every
/// [`COMPACT_EVERY`], up to the revision seen one period earlier, always
/// keeping the last [`skymesh_store::embedded::DEFAULT_HISTORY_REVISIONS`]
/// revisions, so a watcher has at least that long and that many revisions
/// to resume. (etcd compaction applies to the whole etcd cluster, as
/// Kubernetes' does.)
#[cfg(feature = "etcd")]
async fn compact_etcd(store: skymesh_store::etcd::EtcdStore, cancel: CancellationToken) {
    let mut previous: Option<u64> = None;
    let mut compacted = 0;
    loop {
        tokio::select! {
            () = tokio::time::sleep(COMPACT_EVERY) => {}
            () = cancel.cancelled() => return,
        }
        let now = match store.current_revision().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "etcd compaction: cannot read the revision");
                continue;
            }
        };
        if let Some(p) = previous {
            let target =
                p.min(now.saturating_sub(skymesh_store::embedded::DEFAULT_HISTORY_REVISIONS));
            if target > compacted {
                match store.compact(target).await {
                    Ok(()) => {
                        compacted = target;
                        tracing::info!(revision = target, "compacted etcd history");
                    }
                    Err(e) => tracing::warn!(error = %e, "etcd compaction failed"),
                }
            }
        }
        previous = Some(now);
    }
}

fn create_private_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("failed to create data dir {}", dir.display()))
}
