//! The standard gRPC health service (`grpc.health.v1`, tonic-health): the
//! server (`""`), `skymesh.v1.Api` and `skymesh.v1.Gateway` are SERVING
//! while the store answers, NOT_SERVING when it does not (an etcd that is
//! unreachable), and NOT_SERVING from the moment the coordinator starts to
//! stop, so a readiness probe takes it out of rotation before its streams
//! end.
//!
//! Must not: need a token (probes carry none) or say more than serving or
//! not.

use std::sync::Arc;
use std::time::Duration;

use skymesh_store::Store;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// The services whose status is reported, besides the server's own (`""`).
const SERVICES: &[&str] = &["skymesh.v1.Api", "skymesh.v1.Gateway"];
/// How often the store is asked whether it answers.
const CHECK_EVERY: Duration = Duration::from_secs(5);
/// How long the store may take to answer before the coordinator is
/// NOT_SERVING.
const STORE_TIMEOUT: Duration = Duration::from_secs(2);

async fn set_all(reporter: &HealthReporter, status: ServingStatus) {
    reporter.set_service_status("", status).await;
    for s in SERVICES {
        reporter.set_service_status(*s, status).await;
    }
}

/// Keeps the health statuses current until `cancel` fires, then reports
/// NOT_SERVING.
pub async fn run(reporter: HealthReporter, store: Arc<dyn Store>, cancel: CancellationToken) {
    let mut last = None;
    loop {
        let ok = matches!(
            tokio::time::timeout(STORE_TIMEOUT, store.current_revision()).await,
            Ok(Ok(_))
        );
        let status = if ok {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        if last != Some(status) {
            if last.is_some() || !ok {
                tracing::warn!(
                    ?status,
                    "health: the store {}",
                    if ok {
                        "answers again"
                    } else {
                        "does not answer"
                    }
                );
            }
            set_all(&reporter, status).await;
            last = Some(status);
        }
        tokio::select! {
            () = cancel.cancelled() => break,
            () = tokio::time::sleep(CHECK_EVERY) => {}
        }
    }
    set_all(&reporter, ServingStatus::NotServing).await;
}
