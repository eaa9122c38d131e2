//! Adaptive jitter buffer: orders frames by sequence, plays them out on the receiver's
//! clock with a delay sized from the observed arrival spread, and says how to fill each gap
//! (in-band FEC from the next packet, or concealment).

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::opus::has_lbrr;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct JitterConfig {
    /// Duration of one frame.
    pub frame: Duration,
    pub min_delay: Duration,
    pub max_delay: Duration,
    /// Arrivals that the spread is measured over.
    pub window: usize,
    /// Percentile of the arrival spread that the delay must cover.
    pub percentile: f64,
}

impl JitterConfig {
    pub fn for_frame_ms(frame_ms: u32) -> Self {
        let frame = Duration::from_millis(u64::from(frame_ms));
        Self {
            frame,
            min_delay: frame,
            max_delay: Duration::from_millis(400),
            window: 250,
            percentile: 0.95,
        }
    }
}

/// What the decoder should produce for the next playout slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Playout {
    /// Not started yet (still filling to the target delay): play nothing or silence.
    Idle,
    /// The frame itself.
    Frame { seq: u64, packet: Vec<u8> },
    /// The frame was lost; decode it from the next packet's in-band FEC.
    Fec { seq: u64, next_packet: Vec<u8> },
    /// The frame was lost and no FEC is available: packet loss concealment.
    Conceal { seq: u64 },
    /// An extra concealed frame to stretch time while the buffer grows toward its target.
    Stretch,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct JitterStats {
    pub target_delay_ms: f64,
    pub played: u64,
    /// Arrived after their slot was played.
    pub late: u64,
    pub duplicates: u64,
    /// Too far ahead of the playout point to buffer.
    pub too_early: u64,
    pub concealed: u64,
    pub fec_recovered: u64,
    /// Dropped unplayed to shrink the buffer to a smaller target.
    pub drained: u64,
    /// Concealed frames inserted to grow the buffer to a larger target.
    pub stretched: u64,
}

/// Reorders one remote track and paces it for the decoder.
#[derive(Debug)]
pub struct JitterBuffer {
    cfg: JitterConfig,
    slots: BTreeMap<u64, Vec<u8>>,
    /// Next sequence to play, once started.
    next: Option<u64>,
    first_arrival: Option<Instant>,
    /// Reference point for relative delays: (sequence, arrival).
    base: Option<(u64, Instant)>,
    /// Relative one-way delay of recent arrivals, in ms (arrival minus when the sequence
    /// "should" have arrived given the base).
    delays: VecDeque<f64>,
    target: Duration,
    /// Slots the playout point still has to wait because frames arrived after their slot.
    hold: u64,
    /// Slots played since the last stretch.
    since_stretch: u32,
    /// The shallowest the buffer was in the current [`SETTLE_WINDOW`], and how many slots
    /// of that window have passed.
    low_depth: u64,
    window_slots: u64,
    stats: JitterStats,
}

/// Minimum number of played slots between two stretches.
const STRETCH_SPACING: u32 = 4;
/// A buffer that stayed deeper than its target for this long holds delay that no arrival
/// needed (it started deep, or the jitter that made it deep has passed): one frame of it is
/// dropped. Both clocks of a call can run for hours, so without this the excess would stay.
const SETTLE_WINDOW: Duration = Duration::from_secs(1);

impl JitterBuffer {
    pub fn new(cfg: JitterConfig) -> Self {
        Self {
            target: cfg.min_delay,
            cfg,
            slots: BTreeMap::new(),
            next: None,
            first_arrival: None,
            base: None,
            delays: VecDeque::new(),
            hold: 0,
            since_stretch: STRETCH_SPACING,
            low_depth: u64::MAX,
            window_slots: 0,
            stats: JitterStats::default(),
        }
    }

    pub fn stats(&self) -> JitterStats {
        JitterStats {
            target_delay_ms: self.target.as_secs_f64() * 1e3,
            ..self.stats
        }
    }

    pub fn target_delay(&self) -> Duration {
        self.target
    }

    fn frames(&self, d: Duration) -> u64 {
        (d.as_nanos().div_ceil(self.cfg.frame.as_nanos())) as u64
    }

    /// How many frame slots lie between the playout point and the newest arrival.
    fn depth(&self) -> u64 {
        match (self.next, self.slots.last_key_value()) {
            (Some(next), Some((&last, _))) if last >= next => last - next + 1,
            _ => 0,
        }
    }

    /// Accepts an arrived frame.
    pub fn push(&mut self, seq: u64, packet: Vec<u8>, now: Instant) {
        if let Some(next) = self.next.filter(|n| seq < *n) {
            self.stats.late += 1;
            // Playout ran ahead of this stream (its delay stepped up, or the receiver
            // stalled and caught up): count the delay, and hold the playout point back by
            // the frame's lateness so the frames after it arrive in time. Without this every
            // later frame would be late too, and the stream would stay concealed for good.
            self.observe(seq, now);
            let lateness = (next - seq).min(self.frames(self.cfg.max_delay));
            self.hold = self.hold.max(lateness);
            return;
        }
        let horizon = self.frames(self.cfg.max_delay) * 4 + 16;
        let anchor = self.next.or(self.slots.first_key_value().map(|(k, _)| *k));
        if anchor.is_some_and(|a| seq > a + horizon) {
            self.stats.too_early += 1;
            return;
        }
        if self.slots.contains_key(&seq) {
            self.stats.duplicates += 1;
            return;
        }
        self.first_arrival.get_or_insert(now);
        self.observe(seq, now);
        self.slots.insert(seq, packet);
    }

    fn observe(&mut self, seq: u64, now: Instant) {
        let (base_seq, base_at) = *self.base.get_or_insert((seq, now));
        let expected_ms = (seq as f64 - base_seq as f64) * self.cfg.frame.as_secs_f64() * 1e3;
        let actual_ms = if now >= base_at {
            now.duration_since(base_at).as_secs_f64() * 1e3
        } else {
            -(base_at.duration_since(now).as_secs_f64() * 1e3)
        };
        self.delays.push_back(actual_ms - expected_ms);
        if self.delays.len() > self.cfg.window {
            self.delays.pop_front();
        }
        let mut sorted: Vec<f64> = self.delays.iter().copied().collect();
        sorted.sort_by(f64::total_cmp);
        let lowest = sorted[0];
        let rank =
            ((self.cfg.percentile * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
        let spread = (sorted[rank - 1] - lowest).max(0.0);
        let target = Duration::from_secs_f64(spread / 1e3) + self.cfg.frame;
        self.target = target.clamp(self.cfg.min_delay, self.cfg.max_delay);
    }

    /// The next playout slot; call once per frame duration on the receiver's clock.
    pub fn pop(&mut self, now: Instant) -> Playout {
        let Some(next) = self.next else {
            let ready = self
                .first_arrival
                .is_some_and(|t| now.duration_since(t) >= self.target);
            if !ready {
                return Playout::Idle;
            }
            // Start no deeper than the target: when playout starts late (a device that took
            // its time to open), the frames that queued meanwhile are stale, and draining
            // them one per slot would keep the delay high for as many slots.
            let (Some((&first, _)), Some((&last, _))) =
                (self.slots.first_key_value(), self.slots.last_key_value())
            else {
                return Playout::Idle;
            };
            // The target and one frame to spare; anything deeper would only be shed later,
            // a frame per settling window (see below).
            let keep = self.frames(self.target).max(1) + 1;
            let start = first.max((last + 1).saturating_sub(keep));
            let stale: Vec<u64> = self.slots.range(..start).map(|(k, _)| *k).collect();
            for seq in stale {
                self.slots.remove(&seq);
                self.stats.drained += 1;
            }
            self.next = Some(start);
            return self.pop(now);
        };
        if self.hold > 0 {
            self.hold -= 1;
            self.since_stretch = 0;
            self.stats.stretched += 1;
            return Playout::Stretch;
        }
        let target_frames = self.frames(self.target).max(1);
        let depth = self.depth();
        self.low_depth = self.low_depth.min(depth);
        self.window_slots += 1;
        let settled = self.window_slots >= self.frames(SETTLE_WINDOW);
        // Deeper for a whole window than the target asks: one frame more than needed.
        let excess = settled && self.low_depth > target_frames;
        if settled {
            self.low_depth = u64::MAX;
            self.window_slots = 0;
        }
        // Too deep for the target: skip the oldest frame (one per slot, so it stays gentle).
        if (depth > target_frames + 2 || excess) && self.slots.contains_key(&next) {
            self.slots.remove(&next);
            self.next = Some(next + 1);
            self.stats.drained += 1;
        } else if depth + 1 < target_frames && depth > 0 && self.since_stretch >= STRETCH_SPACING {
            // Too shallow: hold the playout point for one slot, at most once every few
            // slots so a sender that went quiet cannot stall playout.
            self.since_stretch = 0;
            self.stats.stretched += 1;
            return Playout::Stretch;
        }
        self.since_stretch = self.since_stretch.saturating_add(1);
        let seq = self.next.expect("started");
        self.next = Some(seq + 1);
        self.stats.played += 1;
        if let Some(packet) = self.slots.remove(&seq) {
            return Playout::Frame { seq, packet };
        }
        if let Some(next_packet) = self.slots.get(&(seq + 1)).filter(|p| has_lbrr(p)) {
            self.stats.fec_recovered += 1;
            return Playout::Fec {
                seq,
                next_packet: next_packet.clone(),
            };
        }
        self.stats.concealed += 1;
        Playout::Conceal { seq }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn a_buffer_deeper_than_its_target_settles_down_to_it() {
        let t0 = Instant::now();
        let mut jb = JitterBuffer::new(JitterConfig::for_frame_ms(20));
        let mut depth = Vec::new();
        for i in 0..250 {
            let now = t0 + ms(20 * i);
            jb.push(i, vec![0xF8, i as u8], now);
            // Playout stalls for 60 ms (a busy receiver) and then keeps its pace: three
            // frames more wait from then on, until settling sheds them, one a second.
            if (20..23).contains(&i) {
                continue;
            }
            assert!(!matches!(jb.pop(now), Playout::Idle) || i == 0);
            // What waits after this slot's frame was taken.
            depth.push(jb.depth());
        }
        assert!(depth[20] >= 3, "the stall left it deep: {depth:?}");
        assert!(*depth.last().unwrap() <= 1, "{depth:?}");
        let s = jb.stats();
        assert_eq!((s.concealed, s.late), (0, 0), "{s:?}");
        assert!(s.drained >= 3, "{s:?}");
    }

    #[test]
    fn settling_never_drains_what_jitter_needs() {
        let t0 = Instant::now();
        let mut jb = JitterBuffer::new(JitterConfig::for_frame_ms(20));
        // Arrivals 0..15 ms late (seeded), playout every 20 ms at a fixed phase.
        let mut x: u64 = 7;
        let mut arrivals: Vec<(Duration, u64)> = (0..1000u64)
            .map(|i| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (ms(20 * i + (x >> 33) % 16), i)
            })
            .collect();
        arrivals.sort();
        let mut next = arrivals.into_iter().peekable();
        for k in 0..1000u64 {
            let pop_at = ms(20 * k + 5);
            while let Some((at, i)) = next.next_if(|(at, _)| *at <= pop_at) {
                jb.push(i, vec![0xF8, i as u8], t0 + at);
            }
            jb.pop(t0 + pop_at);
        }
        let s = jb.stats();
        assert_eq!((s.concealed, s.late), (0, 0), "{s:?}");
        assert!(s.played > 950, "{s:?}");
    }

    #[test]
    fn reorders_and_reports_gaps() {
        let t0 = Instant::now();
        let mut jb = JitterBuffer::new(JitterConfig::for_frame_ms(20));
        jb.push(1, vec![1], t0);
        jb.push(0, vec![0], t0);
        jb.push(3, vec![3], t0 + ms(1));
        assert_eq!(jb.pop(t0), Playout::Idle);
        // The reordering itself widened the spread: the target covers it.
        assert!(jb.target_delay() > ms(20));
        let t = t0 + jb.target_delay();
        // With nothing else arriving the buffer is shallower than its target, so it may
        // stretch between frames; the order of real slots is what matters here.
        let mut next = || loop {
            match jb.pop(t) {
                Playout::Stretch => continue,
                p => break p,
            }
        };
        assert_eq!(
            next(),
            Playout::Frame {
                seq: 0,
                packet: vec![0]
            }
        );
        assert_eq!(
            next(),
            Playout::Frame {
                seq: 1,
                packet: vec![1]
            }
        );
        // Seq 2 is missing and seq 3's fake packet has no FEC.
        assert_eq!(next(), Playout::Conceal { seq: 2 });
        assert_eq!(
            next(),
            Playout::Frame {
                seq: 3,
                packet: vec![3]
            }
        );
        jb.push(2, vec![2], t);
        let s = jb.stats();
        assert_eq!((s.late, s.concealed, s.played), (1, 1, 4));
    }

    #[test]
    fn playout_that_starts_late_skips_what_went_stale() {
        let cfg = JitterConfig::for_frame_ms(20);
        let t0 = Instant::now();
        let mut jb = JitterBuffer::new(cfg);
        // A second of audio queues before the device first asks for any.
        for seq in 0..50 {
            jb.push(seq, vec![seq as u8], t0 + ms(20 * seq));
        }
        let now = t0 + ms(1000);
        let keep = jb.frames(jb.target_delay()) + 1;
        assert_eq!(
            jb.pop(now),
            Playout::Frame {
                seq: 50 - keep,
                packet: vec![(50 - keep) as u8]
            }
        );
        assert_eq!(jb.stats().drained, 50 - keep);
    }

    #[test]
    fn target_follows_the_arrival_spread_within_bounds() {
        let cfg = JitterConfig::for_frame_ms(20);
        let t0 = Instant::now();
        let mut steady = JitterBuffer::new(cfg);
        for seq in 0..200 {
            steady.push(seq, vec![], t0 + ms(20 * seq));
        }
        assert_eq!(steady.target_delay(), cfg.min_delay.max(ms(20)));

        // Every 5th frame is 60 ms late: the 95th percentile covers it.
        let mut jittery = JitterBuffer::new(cfg);
        for seq in 0..200 {
            let extra = if seq % 5 == 0 { 60 } else { 0 };
            jittery.push(seq, vec![], t0 + ms(20 * seq + extra));
        }
        assert_eq!(jittery.target_delay(), ms(80));

        let mut wild = JitterBuffer::new(cfg);
        for seq in 0..200 {
            let extra = if seq % 2 == 0 { 2000 } else { 0 };
            wild.push(seq, vec![], t0 + ms(20 * seq + extra));
        }
        assert_eq!(wild.target_delay(), cfg.max_delay);
    }

    #[test]
    fn a_step_in_delay_costs_a_few_frames_not_the_rest_of_the_stream() {
        let frame = ms(20);
        let t0 = Instant::now();
        let mut jb = JitterBuffer::new(JitterConfig::for_frame_ms(20));
        let (mut played, mut lost_after_step) = (0, 0);
        // 10 s of frames; from frame 100 on every frame takes 150 ms longer to arrive.
        let arrival = |seq: u64| t0 + frame * seq as u32 + if seq >= 100 { ms(150) } else { ms(0) };
        let mut next_arrival = 0;
        for tick in 0..560u64 {
            let now = t0 + frame * tick as u32;
            while next_arrival < 500 && arrival(next_arrival) <= now {
                jb.push(next_arrival, vec![1], arrival(next_arrival));
                next_arrival += 1;
            }
            match jb.pop(now) {
                Playout::Frame { .. } => played += 1,
                Playout::Conceal { seq } if (100..500).contains(&seq) => lost_after_step += 1,
                _ => {}
            }
        }
        // The step loses at most its own length in frames (150 ms = 8), then everything
        // plays again (a few more are drained as the buffer shrinks back to its target);
        // before the hold every frame after the step was late.
        assert!(
            lost_after_step <= 8,
            "{lost_after_step} concealed, {:?}",
            jb.stats()
        );
        assert!(played >= 480, "{played} played, {:?}", jb.stats());
        assert!(jb.stats().late <= 8, "{:?}", jb.stats());
    }

    #[test]
    fn drains_when_more_is_buffered_than_the_target() {
        let t0 = Instant::now();
        let mut jb = JitterBuffer::new(JitterConfig::for_frame_ms(20));
        // A burst of 20 frames arriving at once after a stall, with a steady history.
        for seq in 0..50 {
            jb.push(seq, vec![], t0 + ms(20 * seq));
        }
        let mut now = t0 + ms(20 * 50);
        let mut frames = 0;
        for _ in 0..60 {
            if matches!(jb.pop(now), Playout::Frame { .. }) {
                frames += 1;
            }
            now += ms(20);
        }
        let s = jb.stats();
        assert!(s.drained > 0, "{s:?}");
        assert_eq!(frames + s.drained, 50);
    }

    #[test]
    fn far_future_and_duplicate_frames_are_refused() {
        let t0 = Instant::now();
        let mut jb = JitterBuffer::new(JitterConfig::for_frame_ms(20));
        jb.push(10, vec![], t0);
        jb.push(10, vec![], t0);
        jb.push(10 + 1_000_000, vec![], t0);
        let s = jb.stats();
        assert_eq!((s.duplicates, s.too_early), (1, 1));
    }
}
