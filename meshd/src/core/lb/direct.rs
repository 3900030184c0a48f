//! Calls straight to job IPs (not VIPs) that the service policy let
//! through, kept while a policy exists: so that a call's later packets and
//! its replies pass without being judged again (a UDP reply would
//! otherwise be judged as a call the other way), and so that a policy
//! change can cut the calls it forbids. Bounded, least recently used
//! first out: an evicted call's next packet is judged afresh.

use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

use lru::LruCache;

use super::nat::{FiveTuple, TCP_ESTABLISHED_IDLE, UDP_IDLE};
use super::packet::Proto;

/// Calls tracked at most (about 100 bytes each).
pub const MAX_DIRECT_CALLS: usize = 65_536;

/// A tracked call.
#[derive(Debug, Clone, Copy)]
struct Call {
    last_seen: Instant,
    /// A policy change forbade it: its packets, both ways, are refused
    /// until it goes idle.
    cut: bool,
}

impl Call {
    fn idle(proto: Proto) -> Duration {
        match proto {
            Proto::Tcp => TCP_ESTABLISHED_IDLE,
            Proto::Udp => UDP_IDLE,
        }
    }
}

/// What the table knows of a packet's flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Known {
    /// A call allowed earlier, or a reply to one: it passes.
    Allowed,
    /// A packet of this call (either way) that a policy change cut:
    /// refused.
    Cut(FiveTuple),
    /// Not tracked: judge it.
    Unknown,
}

/// The calls, by their tuple as the caller sends them.
#[derive(Debug)]
pub struct DirectCalls {
    calls: LruCache<FiveTuple, Call>,
}

impl DirectCalls {
    pub fn new(cap: usize) -> DirectCalls {
        DirectCalls {
            calls: LruCache::new(NonZeroUsize::new(cap).unwrap_or(NonZeroUsize::MIN)),
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.calls.len()
    }

    /// A packet with tuple `t` (either way), seen at `now`.
    pub fn seen(&mut self, t: FiveTuple, now: Instant) -> Known {
        for key in [t, t.reversed()] {
            let Some(c) = self.calls.get_mut(&key) else {
                continue;
            };
            if now.saturating_duration_since(c.last_seen) >= Call::idle(t.proto) {
                self.calls.pop(&key);
                return Known::Unknown;
            }
            c.last_seen = now;
            return if c.cut {
                Known::Cut(key)
            } else {
                Known::Allowed
            };
        }
        Known::Unknown
    }

    /// Records an allowed call `t` (replacing a cut one with that tuple:
    /// a new TCP connection was judged anew).
    pub fn allow(&mut self, t: FiveTuple, now: Instant) {
        self.calls.pop(&t.reversed());
        self.calls.put(
            t,
            Call {
                last_seen: now,
                cut: false,
            },
        );
    }

    /// After a policy change: each call is cut, or let through again,
    /// as `allowed(call)` says; returns how many are cut.
    pub fn rejudge(&mut self, mut allowed: impl FnMut(&FiveTuple) -> bool) -> usize {
        let mut cut = 0;
        for (t, c) in self.calls.iter_mut() {
            c.cut = !allowed(t);
            cut += usize::from(c.cut);
        }
        cut
    }

    pub fn clear(&mut self) {
        self.calls.clear();
    }
}
