//! `skyctl join-token CLUSTER`: asks the coordinator for a new single-use
//! join token for a cluster whose gateway has not joined yet (the one from
//! `create cluster` was lost or expired) and prints how to start meshd.

use anyhow::Result;
use skymesh_proto::v1::{IssueJoinTokenRequest, Kind};
use tonic::Code;

use crate::client::Ctx;
use crate::create::join_instructions;
use crate::error;
use crate::output;

/// Runs `skyctl join-token ...`.
pub(crate) async fn run(ctx: &mut Ctx, cluster: String) -> Result<()> {
    let resp = ctx
        .api
        .issue_join_token(IssueJoinTokenRequest {
            cluster: cluster.clone(),
        })
        .await
        .map_err(|s| {
            if s.code() == Code::NotFound {
                error::not_found(Kind::Cluster, "", &cluster)
            } else {
                ctx.status(&s)
            }
        })?
        .into_inner();
    output::emit(&join_instructions(
        &ctx.url,
        &cluster,
        &resp.join_token,
        resp.expires,
    ))?;
    Ok(())
}
