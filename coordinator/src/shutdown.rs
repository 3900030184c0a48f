//! Graceful stop: on SIGTERM/SIGINT every server-streaming RPC (object
//! watches and netmap streams) ends at once with UNAVAILABLE
//! [`SHUTTING_DOWN`], so that clients reconnect and resume from the last
//! revision they received; whatever is still open after [`DRAIN_DEADLINE`]
//! is dropped and the process exits.

use std::pin::Pin;
use std::time::Duration;

use futures::{Stream, StreamExt as _};
use tokio_util::sync::CancellationToken;
use tonic::Status;

/// The message of the UNAVAILABLE status that ends every stream on shutdown.
pub use skymesh_proto::COORDINATOR_SHUTTING_DOWN as SHUTTING_DOWN;

/// How long, from the shutdown signal, open connections may take to close
/// before they are dropped (the process exits within 2 s whatever is open).
pub const DRAIN_DEADLINE: Duration = Duration::from_millis(1500);

/// A boxed response stream of a server-streaming RPC.
pub type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// `stream`, ended with UNAVAILABLE [`SHUTTING_DOWN`] as soon as `shutdown`
/// fires. Nothing is lost by ending early: a client resumes from the last
/// revision it received, and the coordinator replays what follows it.
pub fn until_shutdown<T: Send + 'static>(
    stream: impl Stream<Item = Result<T, Status>> + Send + 'static,
    shutdown: CancellationToken,
) -> ResponseStream<T> {
    Box::pin(async_stream::stream! {
        let mut stream = std::pin::pin!(stream);
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => {
                    yield Err(Status::unavailable(SHUTTING_DOWN));
                    break;
                }
                item = stream.next() => match item {
                    Some(item) => yield item,
                    None => break,
                },
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stream_ends_with_unavailable_on_shutdown() {
        let token = CancellationToken::new();
        let items = futures::stream::iter([Ok::<u32, Status>(1)]).chain(futures::stream::pending());
        let mut s = until_shutdown(items, token.clone());
        assert_eq!(s.next().await.unwrap().unwrap(), 1);
        token.cancel();
        let end = s.next().await.unwrap().unwrap_err();
        assert_eq!(end.code(), tonic::Code::Unavailable);
        assert_eq!(end.message(), SHUTTING_DOWN);
        assert!(s.next().await.is_none());
    }

    #[tokio::test]
    async fn a_finished_stream_just_ends() {
        let token = CancellationToken::new();
        let mut s = until_shutdown(futures::stream::iter([Ok::<u32, Status>(7)]), token);
        assert_eq!(s.next().await.unwrap().unwrap(), 7);
        assert!(s.next().await.is_none());
    }
}
