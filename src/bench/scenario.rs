//! Network scenarios of `call bench`: one end-to-end impairment, split over a relay's two
//! legs so that every transport sees the same total.

use std::time::Duration;

use serde::Serialize;

use crate::transport::{Impairment, LossPattern};

/// One network condition, end to end (sender → receiver), one way.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Scenario {
    pub name: String,
    /// Share of packets lost end to end, 0.0..=1.0 (each direction).
    pub loss: f64,
    /// Mean length, in datagrams, of a run of losses; `None`: each datagram is lost on its
    /// own. See [`LossPattern::Bursts`].
    pub loss_burst: Option<f64>,
    /// One-way delay end to end.
    #[serde(serialize_with = "as_ms")]
    pub delay: Duration,
    /// Extra one-way delay, uniform in 0..jitter, end to end.
    #[serde(serialize_with = "as_ms")]
    pub jitter: Duration,
}

fn as_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1e3)
}

/// The names `--scenario` knows, in the order `all` runs them.
pub const NAMES: &[&str] = &[
    "clean",
    "loss-1",
    "loss-5",
    "loss-10",
    "loss-5-rtt-40",
    "burst-5",
    "delay-20",
    "delay-50",
    "delay-100",
    "jitter-10",
    "jitter-30",
    "far-relay",
];

/// What runs without `--scenario`: a representative set that takes under a minute.
pub const DEFAULT: &[&str] = &["clean", "loss-5-rtt-40", "jitter-30", "far-relay"];

/// Mean run length of `burst-5`: 4 datagrams, 80 ms of 20 ms frames, longer than in-band
/// FEC (one frame back) can bridge.
const BURST_LEN: f64 = 4.0;

impl Scenario {
    fn new(name: &str, loss: f64, delay_ms: u64, jitter_ms: u64) -> Self {
        Self {
            name: name.to_string(),
            loss,
            loss_burst: None,
            delay: Duration::from_millis(delay_ms),
            jitter: Duration::from_millis(jitter_ms),
        }
    }

    /// A scenario by name; `None` for an unknown one.
    pub fn named(name: &str) -> Option<Self> {
        Some(match name {
            "clean" => Self::new(name, 0.0, 0, 0),
            "loss-1" => Self::new(name, 0.01, 0, 0),
            "loss-5" => Self::new(name, 0.05, 0, 0),
            "loss-10" => Self::new(name, 0.10, 0, 0),
            // Loss where retransmission costs a round trip: 20 ms each way, 40 ms RTT.
            "loss-5-rtt-40" => Self::new(name, 0.05, 20, 0),
            "burst-5" => Self {
                loss_burst: Some(BURST_LEN),
                ..Self::new(name, 0.05, 0, 0)
            },
            "delay-20" => Self::new(name, 0.0, 20, 0),
            "delay-50" => Self::new(name, 0.0, 50, 0),
            "delay-100" => Self::new(name, 0.0, 100, 0),
            "jitter-10" => Self::new(name, 0.0, 0, 10),
            "jitter-30" => Self::new(name, 0.0, 0, 30),
            // A relay far from both ends: 80 ms on each leg, 160 ms end to end.
            "far-relay" => Self::new(name, 0.0, 160, 0),
            _ => return None,
        })
    }

    /// Expands `all`, checks every name, and keeps the first of repeated ones.
    pub fn parse_list(names: &[String]) -> Result<Vec<Self>, String> {
        let mut out: Vec<Self> = Vec::new();
        for n in names {
            let n = n.trim();
            let found: Vec<Self> = if n == "all" {
                NAMES.iter().filter_map(|n| Self::named(n)).collect()
            } else {
                vec![Self::named(n).ok_or_else(|| {
                    format!("unknown scenario `{n}` (known: all, {})", NAMES.join(", "))
                })?]
            };
            for s in found {
                if !out.iter().any(|o| o.name == s.name) {
                    out.push(s);
                }
            }
        }
        if out.is_empty() {
            return Err("no scenario given".into());
        }
        Ok(out)
    }

    /// The condition in words, e.g. "5 % loss in runs of 4, 0 ms, jitter 0 ms".
    pub fn describe(&self) -> String {
        let pct = (self.loss * 1000.0).round() / 10.0;
        let loss = match self.loss_burst {
            _ if self.loss <= 0.0 => "no loss".to_string(),
            Some(len) => format!("{pct} % loss in runs of {len}"),
            None => format!("{pct} % random loss"),
        };
        format!(
            "{loss}, {} ms delay, {} ms jitter (one way, end to end)",
            self.delay.as_millis(),
            self.jitter.as_millis()
        )
    }

    fn pattern(&self) -> LossPattern {
        match self.loss_burst {
            Some(mean_len) => LossPattern::Bursts { mean_len },
            None => LossPattern::Random,
        }
    }

    /// The whole impairment on one path (peer to peer).
    pub fn direct(&self, seed: u64) -> Impairment {
        Impairment {
            loss: self.loss,
            pattern: self.pattern(),
            delay: self.delay,
            jitter: self.jitter,
            seed,
        }
    }

    /// One of a relay's two legs: half the delay and jitter, and a loss rate that, applied
    /// on both legs, loses `loss` end to end (1 − (1 − l)² = loss). Runs of losses keep
    /// their mean length on each leg: at these rates the two legs' runs rarely overlap, so
    /// end to end the runs are as long as on a direct path and the share lost is the same.
    pub fn leg(&self, seed: u64) -> Impairment {
        Impairment {
            loss: 1.0 - (1.0 - self.loss.clamp(0.0, 1.0)).sqrt(),
            pattern: self.pattern(),
            delay: self.delay / 2,
            jitter: self.jitter / 2,
            seed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legs_add_up_to_the_end_to_end_path() {
        let s = Scenario::named("loss-10").unwrap();
        let leg = s.leg(1);
        let end_to_end = 1.0 - (1.0 - leg.loss) * (1.0 - leg.loss);
        assert!((end_to_end - 0.10).abs() < 1e-12);
        let far = Scenario::named("far-relay").unwrap();
        assert_eq!(far.leg(1).delay * 2, far.direct(1).delay);
        assert_eq!(far.leg(1).delay, Duration::from_millis(80));
        assert!(Scenario::parse_list(&["nope".into()]).is_err());
        assert_eq!(
            Scenario::parse_list(&["all".into()]).unwrap().len(),
            NAMES.len()
        );
    }

    #[test]
    fn every_name_is_known_and_lists_parse() {
        for n in NAMES.iter().chain(DEFAULT) {
            let s = Scenario::named(n).unwrap_or_else(|| panic!("{n} has no definition"));
            assert_eq!(s.name, *n);
        }
        let picked =
            Scenario::parse_list(&["burst-5".into(), "all".into(), "clean".into()]).unwrap();
        assert_eq!(picked.len(), NAMES.len(), "repeats are kept once");
        assert_eq!(picked[0].name, "burst-5", "the order given is kept");
        assert!(Scenario::parse_list(&[]).is_err());
    }

    #[test]
    fn bursts_reach_both_paths_with_their_run_length() {
        let s = Scenario::named("burst-5").unwrap();
        let bursts = LossPattern::Bursts {
            mean_len: BURST_LEN,
        };
        assert_eq!(s.direct(1).pattern, bursts);
        assert_eq!(s.leg(1).pattern, bursts);
        assert!((s.direct(1).loss - 0.05).abs() < 1e-12);
        assert_eq!(
            Scenario::named("loss-5").unwrap().direct(1).pattern,
            LossPattern::Random
        );
        assert!(s.describe().contains("runs of 4"), "{}", s.describe());
    }
}
