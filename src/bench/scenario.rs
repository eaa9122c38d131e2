//! Network scenarios of `call bench`: one end-to-end impairment, split over a relay's two
//! legs so that every transport sees the same total.

use std::time::Duration;

use serde::Serialize;

use crate::transport::Impairment;

/// One network condition, end to end (sender → receiver), one way.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Scenario {
    pub name: String,
    /// Share of packets lost end to end, 0.0..=1.0 (each direction).
    pub loss: f64,
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
    "delay-50",
    "jitter-30",
    "far-relay",
];

/// What runs without `--scenario`: a representative set that takes under a minute.
pub const DEFAULT: &[&str] = &["clean", "loss-5", "jitter-30", "far-relay"];

impl Scenario {
    fn new(name: &str, loss: f64, delay_ms: u64, jitter_ms: u64) -> Self {
        Self {
            name: name.to_string(),
            loss,
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
            "delay-50" => Self::new(name, 0.0, 50, 0),
            "jitter-30" => Self::new(name, 0.0, 0, 30),
            // A relay far from both ends: 80 ms on each leg, 160 ms end to end.
            "far-relay" => Self::new(name, 0.0, 160, 0),
            _ => return None,
        })
    }

    /// Expands `all` and checks every name.
    pub fn parse_list(names: &[String]) -> Result<Vec<Self>, String> {
        let mut out = Vec::new();
        for n in names {
            if n == "all" {
                out.extend(NAMES.iter().filter_map(|n| Self::named(n)));
                continue;
            }
            out.push(Self::named(n).ok_or_else(|| {
                format!("unknown scenario `{n}` (known: all, {})", NAMES.join(", "))
            })?);
        }
        Ok(out)
    }

    /// The whole impairment on one path (peer to peer).
    pub fn direct(&self, seed: u64) -> Impairment {
        Impairment {
            loss: self.loss,
            delay: self.delay,
            jitter: self.jitter,
            seed,
        }
    }

    /// One of a relay's two legs: half the delay and jitter, and a loss rate that, applied
    /// on both legs, loses `loss` end to end (1 − (1 − l)² = loss).
    pub fn leg(&self, seed: u64) -> Impairment {
        Impairment {
            loss: 1.0 - (1.0 - self.loss.clamp(0.0, 1.0)).sqrt(),
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
}
