//! Where a call's time comes from. With a sound device the device is the clock: capture
//! hands out a frame when the device has captured one, and playout happens when the
//! device asks for audio (as WebRTC's audio device module drives NetEQ). Headless sources
//! and sinks (tone, WAV, silence, null) are paced by a timer instead. [`AudioIo`] merges
//! both into one stream of [`AudioEvent`]s for a driver to hand to the call engine.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::audio::{
    AudioError, AudioSink, AudioSource, CapturedFrame, DeviceCapture, DevicePlayback, DeviceSetup,
    NullSink, Silence, WavSink, WavSource,
};
use super::jitter::PlayoutRule;
use super::opus::SAMPLE_RATE;
use super::tone::ToneSource;

/// Where audio comes from: `tone[:HZ]`, `silence`, `wav:PATH`, `device[:NAME]`.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceSpec {
    Tone(f64),
    Silence,
    Wav(PathBuf),
    Device(Option<String>),
}

/// Where audio goes: `null`, `wav:PATH`, `device[:NAME]`.
#[derive(Debug, Clone, PartialEq)]
pub enum SinkSpec {
    Null,
    Wav(PathBuf),
    Device(Option<String>),
}

fn split(spec: &str) -> (&str, Option<&str>) {
    match spec.split_once(':') {
        Some((k, v)) => (k, Some(v)),
        None => (spec, None),
    }
}

impl std::str::FromStr for SourceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match split(s) {
            ("tone", None) => Ok(Self::Tone(440.0)),
            ("tone", Some(hz)) => match hz.parse::<f64>() {
                Ok(f) if (20.0..=20_000.0).contains(&f) => Ok(Self::Tone(f)),
                _ => Err(format!(
                    "tone frequency `{hz}` is not a number of Hz in 20..=20000"
                )),
            },
            ("silence", None) => Ok(Self::Silence),
            ("wav", Some(p)) if !p.is_empty() => Ok(Self::Wav(PathBuf::from(p))),
            ("device", name) => Ok(Self::Device(
                name.filter(|n| !n.is_empty()).map(str::to_string),
            )),
            _ => Err(format!(
                "`{s}`: expected tone[:HZ], silence, wav:PATH or device[:NAME]"
            )),
        }
    }
}

impl std::str::FromStr for SinkSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match split(s) {
            ("null", None) => Ok(Self::Null),
            ("wav", Some(p)) if !p.is_empty() => Ok(Self::Wav(PathBuf::from(p))),
            ("device", name) => Ok(Self::Device(
                name.filter(|n| !n.is_empty()).map(str::to_string),
            )),
            _ => Err(format!("`{s}`: expected null, wav:PATH or device[:NAME]")),
        }
    }
}

/// An opened audio input.
pub enum AudioIn {
    /// Read one frame per timer tick.
    Timer(Box<dyn AudioSource>),
    /// Clocked by the sound card.
    Device(DeviceCapture),
}

/// An opened audio output.
pub enum AudioOut {
    /// Written one frame per timer tick.
    Timer(Box<dyn AudioSink>),
    /// Clocked by the sound card (boxed: it is much larger than a timer sink).
    Device(Box<DevicePlayback>),
}

impl SourceSpec {
    pub fn open(&self) -> Result<AudioIn, AudioError> {
        Ok(match self {
            Self::Tone(f) => AudioIn::Timer(Box::new(ToneSource::new(*f))),
            Self::Silence => AudioIn::Timer(Box::new(Silence)),
            Self::Wav(p) => AudioIn::Timer(Box::new(WavSource::open(p)?)),
            Self::Device(name) => AudioIn::Device(DeviceCapture::open(name.as_deref())?),
        })
    }
}

impl SinkSpec {
    pub fn open(&self) -> Result<AudioOut, AudioError> {
        Ok(match self {
            Self::Null => AudioOut::Timer(Box::new(NullSink)),
            Self::Wav(p) => AudioOut::Timer(Box::new(WavSink::create(p)?)),
            Self::Device(name) => {
                AudioOut::Device(Box::new(DevicePlayback::open(name.as_deref())?))
            }
        })
    }
}

/// What the audio side has for the engine.
#[derive(Debug)]
pub enum AudioEvent {
    Captured(CapturedFrame),
    /// The sink wants one frame whose first sample plays at `play_at`.
    PlayoutDue {
        play_at: Instant,
    },
    /// The source has no more (or the capture device stopped).
    SourceEnded,
}

/// How the devices of a run were opened and how they behaved.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AudioIoReport {
    pub capture: Option<DeviceSetup>,
    pub playback: Option<DeviceSetup>,
    /// Captured frames dropped because the call did not take them in time.
    pub capture_dropped: u64,
    /// Device samples played as silence because no audio was queued.
    pub playback_underrun_samples: u64,
    /// Where device time goes (means, ms): capture → its callback, and a playback
    /// callback → its first sample played, as the driver reports them; and our own
    /// playback queue as each callback found it.
    pub capture_device_delay_ms: Option<f64>,
    pub playback_device_delay_ms: Option<f64>,
    pub playback_queue_ms: Option<f64>,
    /// A playback callback that found too little queued asks the call for a frame and
    /// waits for it (decode on demand): the mean wait, ms, and how many waits ran out.
    pub playback_pull_wait_ms: Option<f64>,
    pub playback_missed_pulls: u64,
    /// Audio left unplayed so that playout runs sooner (the jitter buffer had it to spare):
    /// how many times, and how much in all, ms.
    pub playback_trims: u64,
    pub playback_trimmed_ms: f64,
}

/// A source and a sink, each on its own clock, as one stream of events.
pub struct AudioIo {
    input: AudioIn,
    output: AudioOut,
    frame: Duration,
    spf: usize,
    /// A headless side's clock: made on the first [`AudioIo::next`], so that it belongs to
    /// the runtime that polls it (a timer of another runtime is woken by that runtime's
    /// driver, late whenever that runtime is busy).
    timed: bool,
    tick: Option<tokio::time::Interval>,
    pending: VecDeque<AudioEvent>,
    source_ended: bool,
    scratch: Vec<i16>,
}

impl AudioIo {
    pub fn new(input: AudioIn, output: AudioOut, frame_ms: u32) -> Self {
        let frame = Duration::from_millis(u64::from(frame_ms));
        let spf = SAMPLE_RATE as usize * frame_ms as usize / 1000;
        if let AudioIn::Device(d) = &input {
            d.set_frame_samples(spf);
        }
        if let AudioOut::Device(d) = &output {
            d.set_frame_samples(spf);
        }
        let timed = matches!(input, AudioIn::Timer(_)) || matches!(output, AudioOut::Timer(_));
        Self {
            input,
            output,
            frame,
            spf,
            timed,
            tick: None,
            pending: VecDeque::new(),
            source_ended: false,
            scratch: vec![0; spf],
        }
    }

    /// Samples per frame (48 kHz).
    pub fn frame_samples(&self) -> usize {
        self.spf
    }

    /// How the receivers' jitter buffers should keep their playout point for this sink: a
    /// device asks for each slot the moment it needs it, so they can judge by each frame's
    /// slack; a timer's ticks are coarser, so they keep whole frames.
    pub fn playout_rule(&self) -> PlayoutRule {
        match self.output {
            AudioOut::Device(_) => PlayoutRule::Slack,
            AudioOut::Timer(_) => PlayoutRule::Frames,
        }
    }

    /// The next thing to hand to the engine. Cancel-safe: an event is taken from its
    /// source only when it is returned.
    pub async fn next(&mut self) -> Result<AudioEvent, AudioError> {
        if self.timed && self.tick.is_none() {
            let mut t = tokio::time::interval(self.frame);
            // A headless source keeps the stream's pace after a stall (frames are sent in
            // a burst); the sink side skips the slots whose time has passed (below).
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            self.tick = Some(t);
        }
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Ok(e);
            }
            if let AudioOut::Device(p) = &self.output {
                if let Some(play_at) = p.wants() {
                    return Ok(AudioEvent::PlayoutDue { play_at });
                }
            }
            let source_ended = self.source_ended;
            tokio::select! {
                scheduled = async {
                    match &mut self.tick {
                        Some(t) => t.tick().await,
                        None => std::future::pending().await,
                    }
                } => self.on_tick(scheduled.into_std())?,
                frame = async {
                    match &mut self.input {
                        AudioIn::Device(d) if !source_ended => d.next_frame().await,
                        _ => std::future::pending().await,
                    }
                } => match frame {
                    // Captured before `new` set the frame size (the device starts as soon
                    // as it is opened): too short a stretch to matter, and the wrong size
                    // for the encoder.
                    Some(f) if f.pcm.len() != self.spf => {
                        tracing::debug!("capture: skipped a {}-sample frame", f.pcm.len());
                    }
                    Some(f) => return Ok(AudioEvent::Captured(f)),
                    None => {
                        self.source_ended = true;
                        return Ok(AudioEvent::SourceEnded);
                    }
                },
                () = async {
                    match &self.output {
                        AudioOut::Device(p) => p.demand().await,
                        AudioOut::Timer(_) => std::future::pending().await,
                    }
                } => {}
            }
        }
    }

    fn on_tick(&mut self, scheduled: Instant) -> Result<(), AudioError> {
        let now = Instant::now();
        if let AudioIn::Timer(source) = &mut self.input {
            if !self.source_ended {
                let more = source.read_frame(&mut self.scratch)?;
                self.pending.push_back(AudioEvent::Captured(CapturedFrame {
                    pcm: self.scratch.clone(),
                    captured_at: scheduled,
                }));
                if !more {
                    self.source_ended = true;
                    self.pending.push_back(AudioEvent::SourceEnded);
                }
            }
        }
        // After a stall the timer catches up in a burst: play nothing for slots whose time
        // has passed, or playout would run ahead of the peers and every later frame would
        // arrive "late".
        let behind = now.saturating_duration_since(scheduled) > self.frame;
        if matches!(self.output, AudioOut::Timer(_)) && !behind {
            self.pending
                .push_back(AudioEvent::PlayoutDue { play_at: now });
        }
        Ok(())
    }

    /// Plays one frame (the answer to [`AudioEvent::PlayoutDue`]).
    pub fn play(&mut self, pcm: &[i16]) -> Result<(), AudioError> {
        match &mut self.output {
            AudioOut::Timer(sink) => sink.write_frame(pcm),
            AudioOut::Device(p) => p.write(pcm),
        }
    }

    /// Plays `by` less of what the sink holds, so what follows plays that much sooner (the
    /// answer to a jitter buffer's spare, see [`super::jitter::JitterBuffer::take_spare`]).
    /// A timer's sink has nothing queued: it ignores it.
    pub fn trim(&mut self, by: Duration) {
        if let AudioOut::Device(p) = &mut self.output {
            p.trim(by);
        }
    }

    /// Flushes the sink (a WAV header) and tells how the devices did.
    pub fn finish(&mut self) -> Result<AudioIoReport, AudioError> {
        let mut report = AudioIoReport::default();
        if let AudioIn::Device(d) = &self.input {
            report.capture = Some(d.setup().clone());
            report.capture_dropped = d.dropped();
            report.capture_device_delay_ms = d.device_delay_ms();
        }
        match &mut self.output {
            AudioOut::Timer(sink) => sink.finish()?,
            AudioOut::Device(p) => {
                report.playback = Some(p.setup().clone());
                report.playback_underrun_samples = p.underrun_samples();
                report.playback_device_delay_ms = p.device_delay_ms();
                report.playback_queue_ms = p.queued_ms();
                report.playback_pull_wait_ms = p.pull_wait_ms();
                report.playback_missed_pulls = p.missed_pulls();
                (report.playback_trims, report.playback_trimmed_ms) = p.trimmed();
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_bad_ones_say_why() {
        assert_eq!("tone".parse(), Ok(SourceSpec::Tone(440.0)));
        assert_eq!("tone:300".parse(), Ok(SourceSpec::Tone(300.0)));
        assert_eq!("device".parse(), Ok(SourceSpec::Device(None)));
        assert_eq!(
            "device:alsa:default".parse(),
            Ok(SourceSpec::Device(Some("alsa:default".into())))
        );
        assert_eq!("wav:a.wav".parse(), Ok(SinkSpec::Wav("a.wav".into())));
        assert!("tone:loud"
            .parse::<SourceSpec>()
            .unwrap_err()
            .contains("loud"));
        assert!("wav:".parse::<SourceSpec>().is_err());
        assert!("speaker"
            .parse::<SinkSpec>()
            .unwrap_err()
            .contains("null, wav:PATH"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_timer_gives_one_capture_and_one_playout_per_frame_and_ends_with_the_source() {
        struct Three(u32);
        impl AudioSource for Three {
            fn read_frame(&mut self, out: &mut [i16]) -> Result<bool, AudioError> {
                out.fill(1);
                self.0 -= 1;
                Ok(self.0 > 0)
            }
        }
        let mut io = AudioIo::new(
            AudioIn::Timer(Box::new(Three(3))),
            AudioOut::Timer(Box::new(NullSink)),
            20,
        );
        let mut kinds = Vec::new();
        for _ in 0..8 {
            match io.next().await.unwrap() {
                AudioEvent::Captured(f) => {
                    assert_eq!(f.pcm.len(), 960);
                    kinds.push('c');
                }
                AudioEvent::PlayoutDue { .. } => kinds.push('p'),
                AudioEvent::SourceEnded => kinds.push('e'),
            }
        }
        assert_eq!(kinds.iter().collect::<String>(), "cpcpcepp");
    }
}
