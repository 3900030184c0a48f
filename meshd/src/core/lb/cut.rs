//! VIP flows a service policy change cut, kept until one of their ends
//! next speaks, so that its segment resets both ends at once. Without it,
//! a client whose SYN got through a moment before the change waits for
//! its SYN retry (1 s) to be refused, and a replica keeps a connection
//! its client no longer has. Bounded, least recently cut first out: a
//! forgotten flow's ends learn at their own next packet.

use std::num::NonZeroUsize;
use std::time::Instant;

use lru::LruCache;

use super::nat::{Flow, Inside, Outside, Path};

/// Flows remembered at most (about 100 bytes each, both indexes).
pub const MAX_CUT_FLOWS: usize = 16_384;

/// A cut flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CutFlow {
    pub inside: Inside,
    pub outside: Outside,
    pub path: Path,
    expires: Instant,
}

/// The cut flows, by outside tuple (the replica's side) and by inside
/// tuple (the client's). Forgetting one removes it from both.
#[derive(Debug)]
pub struct CutFlows {
    by_outside: LruCache<Outside, CutFlow>,
    /// May hold stale entries (their flow gone from `by_outside`, or
    /// another flow there): checked when taken.
    by_inside: LruCache<Inside, Outside>,
}

impl CutFlows {
    pub fn new(cap: usize) -> CutFlows {
        let cap = NonZeroUsize::new(cap).unwrap_or(NonZeroUsize::MIN);
        CutFlows {
            by_outside: LruCache::new(cap),
            by_inside: LruCache::new(cap),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.by_outside.is_empty()
    }

    /// Remembers `f`, cut now.
    pub fn insert(&mut self, f: &Flow) {
        let c = CutFlow {
            inside: f.inside,
            outside: f.outside,
            path: f.path,
            expires: f.expires(),
        };
        self.by_outside.put(f.outside, c);
        self.by_inside.put(f.inside, f.outside);
    }

    /// The live cut flow with this outside tuple on `path` (one expired,
    /// or on the other path, is forgotten).
    pub fn get(&mut self, o: &Outside, path: Path, now: Instant) -> Option<CutFlow> {
        let c = *self.by_outside.peek(o)?;
        if c.path != path || c.expires <= now {
            self.forget(o);
            return None;
        }
        Some(c)
    }

    /// The live cut flow with this inside tuple, removed.
    pub fn take_by_inside(&mut self, i: &Inside, now: Instant) -> Option<CutFlow> {
        let o = self.by_inside.pop(i)?;
        if self.by_outside.peek(&o).is_none_or(|c| c.inside != *i) {
            return None;
        }
        let c = self.by_outside.pop(&o)?;
        (c.expires > now).then_some(c)
    }

    /// Forgets the flow with this outside tuple (both its ends are reset,
    /// or a new flow or call took the tuple).
    pub fn forget(&mut self, o: &Outside) {
        if let Some(c) = self.by_outside.pop(o) {
            self.by_inside.pop(&c.inside);
        }
    }
}
