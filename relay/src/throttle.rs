//! Log lines for events that can come in floods (refused sessions, accept errors): one line
//! per interval at most, saying how many were not logged, so a flood costs counters, not
//! gigabytes of log.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub(crate) struct LogThrottle {
    every: Duration,
    state: Mutex<ThrottleState>,
}

#[derive(Debug, Default)]
struct ThrottleState {
    last: Option<Instant>,
    suppressed: u64,
}

impl LogThrottle {
    pub(crate) fn new(every: Duration) -> Self {
        Self {
            every,
            state: Mutex::default(),
        }
    }

    /// `Some(n)` when a line may be logged now; `n` occurrences were suppressed since the
    /// last line. `None`: suppressed (and counted).
    pub(crate) fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    fn allow_at(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().expect("throttle lock");
        match state.last {
            Some(last) if now.saturating_duration_since(last) < self.every => {
                state.suppressed += 1;
                None
            }
            _ => {
                state.last = Some(now);
                Some(std::mem::take(&mut state.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_count_of_the_rest() {
        let t = LogThrottle::new(Duration::from_secs(1));
        let start = Instant::now();
        assert_eq!(t.allow_at(start), Some(0));
        for i in 1..1000 {
            assert_eq!(t.allow_at(start + Duration::from_micros(i)), None);
        }
        assert_eq!(t.allow_at(start + Duration::from_millis(999)), None);
        assert_eq!(t.allow_at(start + Duration::from_secs(1)), Some(1000));
        assert_eq!(t.allow_at(start + Duration::from_millis(1500)), None);
        assert_eq!(t.allow_at(start + Duration::from_secs(2)), Some(1));
    }
}
