//! Tasks that get a thread and a single-threaded runtime of their own.
//!
//! The packet loop and the DNS server each wait in `epoll` on their own
//! thread: on the shared multi-threaded runtime every readiness event could
//! wake the other worker (a cross-core wakeup per packet or query), and the
//! control plane's tasks queued in front of them.

use std::future::Future;

use anyhow::{Context as _, Result};

/// Runs the future that `make` builds on a new thread called `name`, in a
/// current-thread runtime (so sockets it creates register there). The
/// returned future ends with it: its result, or an error if the runtime
/// could not start or the thread panicked.
pub fn spawn<F, Fut>(
    name: &str,
    make: F,
) -> Result<impl Future<Output = Result<()>> + Send + use<F, Fut>>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<()>>,
{
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let label = name.to_string();
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let result = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .with_context(|| format!("failed to start the {label} runtime"))
                .and_then(|rt| rt.block_on(make()));
            let _ = done_tx.send(result);
        })
        .with_context(|| format!("failed to start the {name} thread"))?;
    let name = name.to_string();
    Ok(async move {
        done_rx
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the {name} thread panicked")))
    })
}
