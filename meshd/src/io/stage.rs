//! A writer stage of the packet path: one or more threads that take whole
//! batches from the packet thread, work on them in parallel, and emit them
//! in the order they were handed out.
//!
//! - The packet thread fills [`Writer::current`] and hands it over with
//!   [`Writer::swap`]: full batches go to the stage's threads in turn,
//!   emptied batches come back through one shared pool. When every batch
//!   is in flight, `swap` waits (backpressure, never loss).
//! - Each thread runs `work` on its batch (the parallel part: sealing), then
//!   waits for the turn token, runs `emit` (the ordered part: the send), and
//!   passes the token on to the next thread in the same turn. So batch `k`
//!   is emitted before batch `k + 1` whatever the threads' speeds, and with
//!   one thread the stage is a plain writer thread.
//!
//! The hand-off is per batch, never per packet (wireguard-go's lesson in
//! "distribute crypto work as slice of elements"). The packet thread may
//! also do a batch's work and emit itself while the stage is
//! [`Writer::idle`]: nothing older is in flight then, so order holds.

use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;

use anyhow::{Context as _, Result};
use tokio::sync::mpsc;

/// Batches per stage thread, beyond the one being filled.
pub const POOL: usize = 2;

/// A stage's threads as the packet thread hands them batches: each in
/// turn.
pub struct Turns<T> {
    to: Vec<mpsc::Sender<T>>,
    /// The thread the next batch goes to.
    next: usize,
    name: &'static str,
}

impl<T> Turns<T> {
    /// Hands `batch` to the next thread in turn.
    pub async fn send(&mut self, batch: T) -> Result<()> {
        let to = &self.to[self.next];
        self.next = (self.next + 1) % self.to.len();
        to.send(batch)
            .await
            .map_err(|_| anyhow::anyhow!("the {} thread ended", self.name))
    }
}

/// The packet thread's end of a stage.
pub struct Writer<T> {
    /// The batch being filled.
    pub current: T,
    full: Turns<T>,
    empty: mpsc::Receiver<T>,
    /// Batches besides `current`.
    spare: usize,
    name: &'static str,
}

/// One stage thread's end.
pub struct WriterEnd<T> {
    full: mpsc::Receiver<T>,
    empty: mpsc::Sender<T>,
}

/// A stage of `threads` threads with [`POOL`] batches each (and the one
/// being filled), made by `make`.
pub fn writer<T>(
    name: &'static str,
    threads: usize,
    make: impl Fn() -> T,
) -> (Writer<T>, Vec<WriterEnd<T>>) {
    let threads = threads.max(1);
    pooled(name, threads, POOL * threads, make)
}

/// [`writer`] with `spare` batches besides the one being filled (more when
/// the batches also pass through another stage first).
pub fn pooled<T>(
    name: &'static str,
    threads: usize,
    spare: usize,
    make: impl Fn() -> T,
) -> (Writer<T>, Vec<WriterEnd<T>>) {
    let threads = threads.max(1);
    let (empty_tx, empty_rx) = mpsc::channel(spare);
    for _ in 0..spare {
        // Capacity `spare`: never full here.
        let _ = empty_tx.try_send(make());
    }
    let (full, ends): (Vec<_>, Vec<_>) = (0..threads)
        .map(|_| {
            let (full_tx, full_rx) = mpsc::channel(spare);
            (
                full_tx,
                WriterEnd {
                    full: full_rx,
                    empty: empty_tx.clone(),
                },
            )
        })
        .unzip();
    (
        Writer {
            current: make(),
            full: Turns {
                to: full,
                next: 0,
                name,
            },
            empty: empty_rx,
            spare,
            name,
        },
        ends,
    )
}

/// The ends of a stage of `threads` threads that give each batch, once
/// done, to `back` (in hand-out order) instead of a pool: a stage in the
/// middle of a path. Returns where to hand batches to.
pub fn middle<T>(
    name: &'static str,
    threads: usize,
    back: &mpsc::Sender<T>,
) -> (Turns<T>, Vec<WriterEnd<T>>) {
    let (to, ends) = (0..threads.max(1))
        .map(|_| {
            let (tx, rx) = mpsc::channel(POOL * threads.max(1) + 1);
            (
                tx,
                WriterEnd {
                    full: rx,
                    empty: back.clone(),
                },
            )
        })
        .unzip();
    (Turns { to, next: 0, name }, ends)
}

impl<T> Writer<T> {
    /// Takes an empty batch from the pool, waiting while every batch is in
    /// flight.
    pub async fn take_empty(&mut self) -> Result<T> {
        let fresh = self.empty.recv().await;
        fresh.with_context(|| format!("the {} thread ended", self.name))
    }

    /// Hands `batch` (filled elsewhere) to the next thread in turn.
    pub async fn hand_over(&mut self, batch: T) -> Result<()> {
        self.full.send(batch).await
    }

    /// Whether the stage's threads hold no batch: everything handed over
    /// has been emitted.
    pub fn idle(&self) -> bool {
        self.empty.len() == self.spare
    }

    /// Hands the current batch to the next thread in turn and takes an
    /// empty one, waiting while every batch is in flight.
    pub async fn swap(&mut self) -> Result<()> {
        let fresh = self.take_empty().await?;
        let full = std::mem::replace(&mut self.current, fresh);
        self.hand_over(full).await
    }
}

/// What one stage thread does with a batch: `work` (in parallel with the
/// other threads), then `emit` (in hand-out order). `emit` leaves the batch
/// empty for reuse.
pub struct Steps<W, E> {
    pub work: W,
    pub emit: E,
}

/// Starts one plain thread per end, named `name` (or `name-k` when there
/// are several), each running the [`Steps`] that `steps(k)` makes. The
/// threads end once the [`Writer`] is dropped and what it handed over is
/// emitted.
pub fn spawn<T, W, E>(
    name: &str,
    ends: Vec<WriterEnd<T>>,
    mut steps: impl FnMut(usize) -> Result<Steps<W, E>>,
) -> Result<Vec<JoinHandle<()>>>
where
    T: Send + 'static,
    W: FnMut(&mut T) + Send + 'static,
    E: FnMut(&mut T) + Send + 'static,
{
    let n = ends.len();
    let (turn_tx, turn_rx): (Vec<_>, Vec<_>) = (0..n).map(|_| std_mpsc::channel::<()>()).unzip();
    // The first batch is the first thread's.
    if let Some(t) = turn_tx.first() {
        let _ = t.send(());
    }
    let mut threads = Vec::with_capacity(n);
    for (k, (mut end, turn)) in ends.into_iter().zip(turn_rx).enumerate() {
        let Steps { mut work, mut emit } = steps(k)?;
        let pass = turn_tx[(k + 1) % n].clone();
        let label = if n == 1 {
            name.to_string()
        } else {
            format!("{name}-{k}")
        };
        let t = std::thread::Builder::new()
            .name(label.clone())
            .spawn(move || {
                while let Some(mut batch) = end.full.blocking_recv() {
                    work(&mut batch);
                    if turn.recv().is_err() {
                        return;
                    }
                    emit(&mut batch);
                    // Back before the turn passes: where the batch goes
                    // back to is in order too. Once the packet thread is
                    // gone nothing takes it; what is still queued is
                    // emitted all the same.
                    let _ = end.empty.blocking_send(batch);
                    let _ = pass.send(());
                }
            })
            .with_context(|| format!("failed to start the {label} thread"))?;
        threads.push(t);
    }
    Ok(threads)
}

#[cfg(test)]
mod tests;
