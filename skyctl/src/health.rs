//! `skyctl health [--service NAME]`: the coordinator's standard gRPC health
//! check (`grpc.health.v1.Health/Check`) over the same verified TLS as
//! every other command, without a token. It prints `SERVING` and succeeds,
//! or fails with one line naming the status. Kubernetes' own `grpc:` probe
//! dials plaintext only, so the manifests use this as an exec probe.

use std::time::Duration;

use anyhow::Result;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::cli::GlobalArgs;
use crate::client;
use crate::error::{self, Exit};
use crate::output;

/// How long the check may take once connected.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// Runs `skyctl health ...`.
pub(crate) async fn run(global: &GlobalArgs, service: &str) -> Result<()> {
    let (channel, url) = client::channel(global).await?;
    let mut req = tonic::Request::new(HealthCheckRequest {
        service: service.to_string(),
    });
    req.set_timeout(CHECK_TIMEOUT);
    let status = HealthClient::new(channel)
        .check(req)
        .await
        .map_err(|s| error::from_status(&url, &s))?
        .into_inner()
        .status();
    let what = if service.is_empty() {
        "the coordinator".to_string()
    } else {
        format!("service {service}")
    };
    match status {
        ServingStatus::Serving => {
            output::emit("SERVING")?;
            Ok(())
        }
        other => Err(Exit::refused(format!("{what} at {url} is {}", other.as_str_name())).into()),
    }
}
