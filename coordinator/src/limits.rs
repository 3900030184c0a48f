//! Bounds on what one client can make the coordinator hold: HTTP/2 streams
//! per connection, message sizes, and open streams per credential.
//!
//! Message sizes are sized for a mesh of 100 clusters and 10,000 services:
//! a netmap snapshot then holds 10,000 services (~250 bytes each) and their
//! endpoints, up to one address per cluster (~40 bytes each): ~45 MB.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tonic::Status;

pub use skymesh_proto::MAX_MESSAGE_BYTES;

/// Concurrent HTTP/2 streams one connection may open (tonic's default has
/// no bound). A meshd uses three at most; skyctl one.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 64;
/// Largest request the coordinator decodes: a `SyncJobs` of
/// [`crate::gateway::MAX_JOBS_PER_CLUSTER`] jobs (~300 bytes each) fits
/// five times over.
pub const MAX_REQUEST_BYTES: usize = 16 << 20;
/// Netmap streams one cluster's credential may hold open at once (one,
/// and one more while a reconnect overlaps the old stream's end).
pub const MAX_NETMAP_STREAMS_PER_CLUSTER: usize = 2;
/// Object watches open at once through the admin token.
pub const MAX_WATCHES: usize = 256;

/// Open streams per key (a cluster, or the admin), refusing one past the
/// bound with RESOURCE_EXHAUSTED.
#[derive(Debug, Clone)]
pub struct StreamLimit {
    what: &'static str,
    max: usize,
    open: Arc<Mutex<HashMap<String, usize>>>,
}

/// One open stream; dropping it (with the stream) frees its place.
#[derive(Debug)]
pub struct StreamPermit {
    limit: StreamLimit,
    key: String,
}

impl StreamLimit {
    /// At most `max` open `what` streams per key.
    pub fn new(what: &'static str, max: usize) -> StreamLimit {
        StreamLimit {
            what,
            max,
            open: Arc::default(),
        }
    }

    /// A place for one more stream of `key`, or RESOURCE_EXHAUSTED.
    #[allow(clippy::result_large_err)]
    pub fn acquire(&self, key: &str) -> Result<StreamPermit, Status> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let n = open.entry(key.to_string()).or_default();
        if *n >= self.max {
            return Err(Status::resource_exhausted(format!(
                "{}: at most {} open at once for {key:?}",
                self.what, self.max
            )));
        }
        *n += 1;
        Ok(StreamPermit {
            limit: self.clone(),
            key: key.to_string(),
        })
    }

    /// Streams open for every key together.
    pub fn total(&self) -> usize {
        let open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        open.values().sum()
    }

    /// Streams open for `key`.
    pub fn open(&self, key: &str) -> usize {
        let open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        open.get(key).copied().unwrap_or(0)
    }
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let mut open = self
            .limit
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_gets_its_bound_and_places_come_back() {
        let l = StreamLimit::new("netmap streams", 2);
        let a = l.acquire("c1").unwrap();
        let _b = l.acquire("c1").unwrap();
        let e = l.acquire("c1").unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            e.message(),
            "netmap streams: at most 2 open at once for \"c1\""
        );
        let _other = l.acquire("c2").unwrap();
        drop(a);
        assert_eq!(l.open("c1"), 1);
        let _c = l.acquire("c1").unwrap();
    }
}
