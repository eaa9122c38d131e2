//! A sine source for headless participants and a dominant-frequency estimate for checking
//! what was heard.

use std::f64::consts::TAU;

use super::opus::SAMPLE_RATE;

/// Continuous sine at a fixed frequency, produced frame by frame without phase jumps.
#[derive(Debug, Clone)]
pub struct ToneSource {
    freq_hz: f64,
    amplitude: f64,
    phase: f64,
}

impl ToneSource {
    pub fn new(freq_hz: f64) -> Self {
        Self {
            freq_hz,
            amplitude: 0.5 * f64::from(i16::MAX),
            phase: 0.0,
        }
    }

    /// Changes the frequency from the next sample on, keeping the phase continuous.
    pub fn set_frequency(&mut self, freq_hz: f64) {
        self.freq_hz = freq_hz;
    }

    pub fn fill(&mut self, out: &mut [i16]) {
        let step = TAU * self.freq_hz / f64::from(SAMPLE_RATE);
        for s in out {
            *s = (self.amplitude * self.phase.sin()) as i16;
            self.phase = (self.phase + step) % TAU;
        }
    }
}

/// Power of `freq_hz` in `samples` by the Goertzel recurrence.
fn goertzel_power(samples: &[f32], freq_hz: f64) -> f64 {
    let coeff = 2.0 * (TAU * freq_hz / f64::from(SAMPLE_RATE)).cos();
    let (mut s1, mut s2) = (0.0f64, 0.0f64);
    for &x in samples {
        let s0 = f64::from(x) + coeff * s1 - s2;
        s2 = s1;
        s1 = s0;
    }
    s1 * s1 + s2 * s2 - coeff * s1 * s2
}

/// The strongest frequency between `lo` and `hi` Hz, to about 0.25 Hz, or `None` when the
/// signal is too short or silent.
pub fn dominant_frequency(pcm: &[i16], lo: f64, hi: f64) -> Option<f64> {
    // Half a second is plenty for a 4 Hz coarse grid; more only costs time.
    let n = pcm.len().min(SAMPLE_RATE as usize / 2);
    if n < SAMPLE_RATE as usize / 20 {
        return None;
    }
    let window: Vec<f32> = pcm[pcm.len() - n..]
        .iter()
        .enumerate()
        .map(|(i, &s)| {
            // Hann window keeps leakage from the frame edges out of the neighbouring bins.
            let w = 0.5 - 0.5 * (TAU * i as f64 / (n - 1) as f64).cos();
            (f64::from(s) * w) as f32
        })
        .collect();
    if window.iter().all(|&x| x.abs() < 1.0) {
        return None;
    }
    let best = |from: f64, to: f64, step: f64| {
        let mut f = from;
        let (mut best_f, mut best_p) = (from, f64::MIN);
        while f <= to {
            let p = goertzel_power(&window, f);
            if p > best_p {
                (best_f, best_p) = (f, p);
            }
            f += step;
        }
        best_f
    };
    let coarse = best(lo, hi, 4.0);
    Some(best(coarse - 4.0, coarse + 4.0, 0.25))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_tone_it_made() {
        for f in [300.0, 440.0, 523.25, 1000.0] {
            let mut src = ToneSource::new(f);
            let mut pcm = vec![0i16; 48_000];
            src.fill(&mut pcm);
            let got = dominant_frequency(&pcm, 100.0, 2000.0).unwrap();
            assert!((got - f).abs() < 1.0, "{f} Hz estimated as {got}");
        }
    }

    #[test]
    fn silence_has_no_frequency() {
        assert_eq!(dominant_frequency(&[0; 48_000], 100.0, 2000.0), None);
        assert_eq!(dominant_frequency(&[1000; 100], 100.0, 2000.0), None);
    }
}
