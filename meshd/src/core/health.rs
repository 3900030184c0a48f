//! Health state machines (SPEC §4), pure and driven by the caller's clock.
//!
//! - [`JobCheck`]: a local job is ready after 1 successful check and not
//!   ready after 2 consecutive failures.
//! - [`PeerProbe`]: a peer gateway is down after 3 consecutive unanswered
//!   probes and up again on the first answer; keeps the latest RTT.

use std::time::{Duration, Instant};

/// Consecutive failed checks before a job is not ready.
pub const JOB_FAILURES_TO_UNREADY: u32 = 2;
/// Consecutive unanswered probes before a peer is down.
pub const PROBES_MISSED_TO_DOWN: u32 = 3;

/// Readiness of one local job.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobCheck {
    pub ready: bool,
    failures: u32,
}

impl JobCheck {
    /// Records one check; returns true when readiness changed.
    pub fn observe(&mut self, ok: bool) -> bool {
        let before = self.ready;
        if ok {
            self.failures = 0;
            self.ready = true;
        } else {
            self.failures = self.failures.saturating_add(1);
            if self.failures >= JOB_FAILURES_TO_UNREADY {
                self.ready = false;
            }
        }
        before != self.ready
    }
}

/// Probe state of one peer gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerProbe {
    pub up: bool,
    pub rtt: Option<Duration>,
    /// Sequence number and send time of the probe in flight.
    outstanding: Option<(u64, Instant)>,
    missed: u32,
    next_seq: u64,
}

impl Default for PeerProbe {
    fn default() -> Self {
        PeerProbe {
            // A peer counts as up until probes say otherwise, so a gateway
            // that just started does not steer traffic away from everyone.
            up: true,
            rtt: None,
            outstanding: None,
            missed: 0,
            next_seq: 1,
        }
    }
}

impl PeerProbe {
    /// Starts a probe at `now`; an unanswered previous probe counts as
    /// missed. Returns the sequence number to send and whether `up` changed.
    pub fn send(&mut self, now: Instant) -> (u64, bool) {
        let before = self.up;
        if self.outstanding.take().is_some() {
            self.missed = self.missed.saturating_add(1);
            if self.missed >= PROBES_MISSED_TO_DOWN {
                self.up = false;
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.outstanding = Some((seq, now));
        (seq, before != self.up)
    }

    /// An answer to probe `seq` arrived at `now`; returns whether `up`
    /// changed. Late or unknown answers are ignored.
    pub fn answer(&mut self, seq: u64, now: Instant) -> bool {
        match self.outstanding {
            Some((s, at)) if s == seq => {
                let before = self.up;
                self.outstanding = None;
                self.rtt = Some(now.saturating_duration_since(at));
                self.missed = 0;
                self.up = true;
                before != self.up
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ready_after_one_success_unready_after_two_failures() {
        let mut j = JobCheck::default();
        assert!(!j.ready);
        assert!(j.observe(true));
        assert!(!j.observe(false), "one failure is tolerated");
        assert!(j.ready);
        assert!(j.observe(false));
        assert!(!j.ready);
        assert!(!j.observe(false));
        assert!(j.observe(true));
    }

    #[test]
    fn peer_down_after_three_missed_probes() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut p = PeerProbe::default();
        let (seq, _) = p.send(t0);
        assert!(!p.answer(seq, t0 + Duration::from_millis(3)));
        assert_eq!(p.rtt, Some(Duration::from_millis(3)));
        p.send(t0 + s);
        p.send(t0 + 2 * s);
        p.send(t0 + 3 * s);
        assert!(p.up, "two misses so far");
        let (_, changed) = p.send(t0 + 4 * s);
        assert!(changed && !p.up, "third miss: down");
        // A late answer to an old probe does not count.
        assert!(!p.answer(seq, t0 + 4 * s));
        let (seq, _) = p.send(t0 + 5 * s);
        assert!(p.answer(seq, t0 + 5 * s + Duration::from_millis(1)));
        assert!(p.up);
    }
}
