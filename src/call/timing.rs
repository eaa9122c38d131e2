//! Latency figures of a call: bounded sample windows and their percentiles, and the
//! per-frame records a run in one process (`call demo`, tests) joins across participants.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::Serialize;

/// Percentiles of a latency, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LatencySummary {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    /// Samples behind the figures.
    pub count: usize,
}

impl LatencySummary {
    /// Nearest-rank percentiles of `values` (any order); `None` when empty.
    pub fn of(values: &[f64]) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        Some(Self {
            p50: percentile(&sorted, 0.50),
            p95: percentile(&sorted, 0.95),
            p99: percentile(&sorted, 0.99),
            count: sorted.len(),
        })
    }

    /// Every percentile shifted by a constant (an estimated part added to a measured one).
    pub fn plus(self, ms: f64) -> Self {
        Self {
            p50: self.p50 + ms,
            p95: self.p95 + ms,
            p99: self.p99 + ms,
            ..self
        }
    }
}

/// Nearest-rank percentile of sorted values (`q` in 0..=1); 0 for none.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `later - earlier` in ms, negative if `later` is before `earlier`.
pub fn ms_between(earlier: Instant, later: Instant) -> f64 {
    if later >= earlier {
        ms(later - earlier)
    } else {
        -ms(earlier - later)
    }
}

/// The newest `cap` samples of a latency: a long call keeps a recent window, not a history.
#[derive(Debug, Clone)]
pub struct Samples {
    cap: usize,
    values: VecDeque<f64>,
}

/// Five minutes of 20 ms frames.
pub const SAMPLE_WINDOW: usize = 15_000;

impl Default for Samples {
    fn default() -> Self {
        Self::new(SAMPLE_WINDOW)
    }
}

impl Samples {
    pub fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            values: VecDeque::new(),
        }
    }

    pub fn push(&mut self, v: f64) {
        if self.values.len() == self.cap {
            self.values.pop_front();
        }
        self.values.push_back(v);
    }

    pub fn summary(&self) -> Option<LatencySummary> {
        let v: Vec<f64> = self.values.iter().copied().collect();
        LatencySummary::of(&v)
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

/// Per-frame times kept when a run asks for them (bounded by [`MAX_RECORDS`]).
#[derive(Debug, Clone, Default)]
pub struct FrameRecords {
    /// Our frames: (sequence, first sample captured, encrypted and handed to the transport).
    pub sent: Vec<(u64, Instant, Instant)>,
    /// Per peer track: frames that arrived and authenticated (sequence, when).
    pub arrived: Vec<([u8; 8], u64, Instant)>,
    /// Per peer track: frames played from their own packet (sequence, when played).
    pub played: Vec<([u8; 8], u64, Instant)>,
}

/// One hour of 20 ms frames from a handful of peers.
pub const MAX_RECORDS: usize = 1_000_000;

impl FrameRecords {
    pub(crate) fn sent(&mut self, seq: u64, captured: Instant, sent: Instant) {
        if self.sent.len() < MAX_RECORDS {
            self.sent.push((seq, captured, sent));
        }
    }

    pub(crate) fn arrived(&mut self, track: [u8; 8], seq: u64, at: Instant) {
        if self.arrived.len() < MAX_RECORDS {
            self.arrived.push((track, seq, at));
        }
    }

    pub(crate) fn played(&mut self, track: [u8; 8], seq: u64, at: Instant) {
        if self.played.len() < MAX_RECORDS {
            self.played.push((track, seq, at));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank_and_windows_keep_the_newest() {
        let s = LatencySummary::of(&[5.0, 1.0, 3.0, 2.0, 4.0]).unwrap();
        assert_eq!((s.p50, s.p95, s.p99, s.count), (3.0, 5.0, 5.0, 5));
        assert!(LatencySummary::of(&[]).is_none());
        let mut w = Samples::new(3);
        for v in [100.0, 1.0, 2.0, 3.0] {
            w.push(v);
        }
        assert_eq!(w.summary().unwrap().p99, 3.0, "100 fell out of the window");
        assert_eq!(s.plus(10.0).p50, 13.0);
    }
}
