//! Wiring: opens the store, makes sure the admin token and the default
//! namespace exist, starts the controllers and serves both gRPC services.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use ipnet::Ipv4Net;
use skymesh_proto::v1::{api_server::ApiServer, gateway_server::GatewayServer};
use skymesh_store::embedded::EmbeddedStore;
use tokio_util::sync::CancellationToken;

use crate::api::ApiService;
use crate::auth::{self, AdminAuth};
use crate::gateway::GatewayService;
use crate::registry::Registry;

/// Coordinator configuration (the binary's flags).
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub overlay_cidr: Ipv4Net,
    pub service_cidr: Ipv4Net,
    pub join_token_ttl: Duration,
}

/// Runs the coordinator until `cancel` fires.
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
    create_private_dir(&cfg.data_dir)?;
    let path = cfg.data_dir.join(skymesh_store::embedded::DB_FILE_NAME);
    let store = tokio::task::spawn_blocking(move || EmbeddedStore::open(&path))
        .await
        .context("store open task failed")?
        .context("failed to open the store")?;
    let store: Arc<dyn skymesh_store::Store> = Arc::new(store);
    let admin = auth::init_admin(store.as_ref(), &cfg.data_dir).await?;
    let reg = Registry::new(
        store,
        cfg.overlay_cidr,
        cfg.service_cidr,
        cfg.join_token_ttl,
    );
    reg.ensure_default_namespace().await?;

    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("failed to listen on {}", cfg.listen))?;
    let local = listener.local_addr()?;
    // Tell scripts and tests where we listen (useful with port 0).
    std::fs::write(cfg.data_dir.join("listen.addr"), format!("{local}\n"))
        .context("failed to write listen.addr")?;
    tracing::info!(addr = %local, data_dir = %cfg.data_dir.display(), overlay = %cfg.overlay_cidr, services = %cfg.service_cidr, "coordinator listening");

    let controllers = tokio::spawn(crate::controller::run(reg.clone(), cancel.clone()));
    let admin_auth = AdminAuth::new(admin);
    let api = ApiServer::with_interceptor(ApiService::new(reg.clone()), admin_auth.clone());
    let gw = GatewayServer::new(GatewayService::new(reg, admin_auth));
    let shutdown = cancel.clone();
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(api)
        .add_service(gw)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            async move { shutdown.cancelled().await },
        )
        .await
        .context("gRPC server failed")?;
    cancel.cancel();
    let _ = controllers.await;
    Ok(())
}

fn create_private_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("failed to create data dir {}", dir.display()))
}
