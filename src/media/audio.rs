//! Audio in and out at the codec's 48 kHz mono: sound devices through cpal (resampled with
//! rubato where the device does not run at 48 kHz), and headless sources and sinks (tone,
//! WAV, silence) for bots and tests. Devices bring their own clock: capture hands out frames
//! when the device has captured them and playback asks for audio when it needs it (see
//! [`super::io`]). Headless ones are paced by the caller's timer, one frame per call.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cpal::traits::{DeviceTrait, HostTrait, StreamTrait};
use rubato::audioadapter_buffers::direct::InterleavedSlice;
use rubato::{Async, FixedAsync, Resampler, SincInterpolationParameters, WindowFunction};
use serde::Serialize;

use super::opus::SAMPLE_RATE;
use super::tone::ToneSource;

#[derive(Debug, thiserror::Error)]
pub enum AudioError {
    #[error("wav {path}: {err}")]
    Wav { path: String, err: hound::Error },
    #[error("wav {path}: {why}")]
    WavFormat { path: String, why: String },
    #[error("resampler: {0}")]
    Resample(String),
    #[error("audio device: {0}")]
    Device(String),
    #[error("no {kind} device matches `{name}`; available: {available}")]
    NoSuchDevice {
        kind: &'static str,
        name: String,
        available: String,
    },
    #[error("`{name}` matches several {kind} devices: {candidates}")]
    Ambiguous {
        kind: &'static str,
        name: String,
        candidates: String,
    },
}

/// Where a call's outgoing audio comes from, one frame at a time.
pub trait AudioSource: Send {
    /// Fills `out` (one frame of 48 kHz mono) and returns `false` once the source has ended
    /// (the frame is then silence-padded).
    fn read_frame(&mut self, out: &mut [i16]) -> Result<bool, AudioError>;
}

/// Where a call's incoming audio goes, one frame at a time.
pub trait AudioSink: Send {
    fn write_frame(&mut self, pcm: &[i16]) -> Result<(), AudioError>;
    /// Flushes anything buffered (a WAV header, for one).
    fn finish(&mut self) -> Result<(), AudioError> {
        Ok(())
    }
}

impl AudioSource for ToneSource {
    fn read_frame(&mut self, out: &mut [i16]) -> Result<bool, AudioError> {
        self.fill(out);
        Ok(true)
    }
}

/// Digital silence forever.
#[derive(Debug, Default, Clone, Copy)]
pub struct Silence;

impl AudioSource for Silence {
    fn read_frame(&mut self, out: &mut [i16]) -> Result<bool, AudioError> {
        out.fill(0);
        Ok(true)
    }
}

/// Discards what it is given.
#[derive(Debug, Default, Clone, Copy)]
pub struct NullSink;

impl AudioSink for NullSink {
    fn write_frame(&mut self, _pcm: &[i16]) -> Result<(), AudioError> {
        Ok(())
    }
}

/// Mono at a fixed rate in, 48 kHz mono out, in whatever amounts arrive.
pub struct StreamResampler {
    inner: Option<Async<f32>>,
    input: Vec<f32>,
    output: VecDeque<f32>,
    scratch: Vec<f32>,
}

impl StreamResampler {
    pub fn new(from_hz: u32, to_hz: u32) -> Result<Self, AudioError> {
        let inner = if from_hz == to_hz {
            None
        } else {
            let params = SincInterpolationParameters::new(128, WindowFunction::BlackmanHarris2);
            Some(
                Async::<f32>::new_sinc(
                    f64::from(to_hz) / f64::from(from_hz),
                    1.0,
                    &params,
                    480,
                    1,
                    FixedAsync::Input,
                )
                .map_err(|e| AudioError::Resample(e.to_string()))?,
            )
        };
        Ok(Self {
            inner,
            input: Vec::new(),
            output: VecDeque::new(),
            scratch: Vec::new(),
        })
    }

    pub fn push(&mut self, samples: &[f32]) -> Result<(), AudioError> {
        let Some(r) = &mut self.inner else {
            self.output.extend(samples);
            return Ok(());
        };
        self.input.extend_from_slice(samples);
        loop {
            let need = r.input_frames_next();
            if self.input.len() < need {
                return Ok(());
            }
            self.scratch.resize(r.output_frames_max(), 0.0);
            let inp = InterleavedSlice::new(&self.input[..need], 1, need)
                .map_err(|e| AudioError::Resample(e.to_string()))?;
            let frames = self.scratch.len();
            let mut out = InterleavedSlice::new_mut(&mut self.scratch[..], 1, frames)
                .map_err(|e| AudioError::Resample(e.to_string()))?;
            let (used, produced) = r
                .process_into_buffer(&inp, &mut out, None)
                .map_err(|e| AudioError::Resample(e.to_string()))?;
            self.output.extend(&self.scratch[..produced]);
            self.input.drain(..used);
        }
    }

    pub fn available(&self) -> usize {
        self.output.len()
    }

    /// The resampler's own delay, in output samples (0 when the rates are equal).
    pub fn delay_samples(&self) -> usize {
        self.inner.as_ref().map_or(0, |r| r.output_delay())
    }

    /// Takes up to `out.len()` samples; returns how many were written.
    pub fn pull(&mut self, out: &mut [i16]) -> usize {
        let n = out.len().min(self.output.len());
        for (o, s) in out.iter_mut().zip(self.output.drain(..n)) {
            *o = (s.clamp(-1.0, 1.0) * f32::from(i16::MAX)) as i16;
        }
        n
    }
}

fn downmix_to_f32(samples: &[f32], channels: usize, out: &mut Vec<f32>) {
    out.clear();
    for frame in samples.chunks(channels.max(1)) {
        out.push(frame.iter().sum::<f32>() / frame.len() as f32);
    }
}

/// A WAV file (any rate, any channel count, 16-bit int or 32-bit float), downmixed and
/// resampled to 48 kHz mono.
pub struct WavSource {
    samples: std::vec::IntoIter<f32>,
    resampler: StreamResampler,
    ended: bool,
}

impl WavSource {
    pub fn open(path: &Path) -> Result<Self, AudioError> {
        let p = path.display().to_string();
        let wav_err = |err| AudioError::Wav {
            path: p.clone(),
            err,
        };
        let mut reader = hound::WavReader::open(path).map_err(wav_err)?;
        let spec = reader.spec();
        let interleaved: Vec<f32> = match (spec.sample_format, spec.bits_per_sample) {
            (hound::SampleFormat::Int, 16) => reader
                .samples::<i16>()
                .map(|s| s.map(|v| f32::from(v) / f32::from(i16::MAX)))
                .collect::<Result<_, _>>()
                .map_err(wav_err)?,
            (hound::SampleFormat::Float, 32) => reader
                .samples::<f32>()
                .collect::<Result<_, _>>()
                .map_err(wav_err)?,
            (fmt, bits) => {
                return Err(AudioError::WavFormat {
                    path: p,
                    why: format!(
                        "{bits}-bit {fmt:?} samples are not supported (16-bit int or 32-bit float)"
                    ),
                })
            }
        };
        let mut mono = Vec::new();
        downmix_to_f32(&interleaved, usize::from(spec.channels), &mut mono);
        Ok(Self {
            samples: mono.into_iter(),
            resampler: StreamResampler::new(spec.sample_rate, SAMPLE_RATE)?,
            ended: false,
        })
    }
}

impl AudioSource for WavSource {
    fn read_frame(&mut self, out: &mut [i16]) -> Result<bool, AudioError> {
        while self.resampler.available() < out.len() && !self.ended {
            let chunk: Vec<f32> = self.samples.by_ref().take(4800).collect();
            if chunk.is_empty() {
                // Push the resampler's tail out with silence.
                self.resampler.push(&[0.0; 960])?;
                self.ended = true;
            } else {
                self.resampler.push(&chunk)?;
            }
        }
        let n = self.resampler.pull(out);
        out[n..].fill(0);
        Ok(n == out.len() || !self.ended)
    }
}

/// Writes 48 kHz mono 16-bit WAV.
pub struct WavSink {
    writer: Option<hound::WavWriter<std::io::BufWriter<std::fs::File>>>,
    path: String,
}

impl WavSink {
    pub fn create(path: &Path) -> Result<Self, AudioError> {
        let spec = hound::WavSpec {
            channels: 1,
            sample_rate: SAMPLE_RATE,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let p = path.display().to_string();
        let writer = hound::WavWriter::create(path, spec).map_err(|err| AudioError::Wav {
            path: p.clone(),
            err,
        })?;
        Ok(Self {
            writer: Some(writer),
            path: p,
        })
    }
}

impl AudioSink for WavSink {
    fn write_frame(&mut self, pcm: &[i16]) -> Result<(), AudioError> {
        let Some(w) = &mut self.writer else {
            return Ok(());
        };
        for &s in pcm {
            w.write_sample(s).map_err(|err| AudioError::Wav {
                path: self.path.clone(),
                err,
            })?;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), AudioError> {
        if let Some(w) = self.writer.take() {
            w.finalize().map_err(|err| AudioError::Wav {
                path: self.path.clone(),
                err,
            })?;
        }
        Ok(())
    }
}

impl Drop for WavSink {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// One sound device as `call devices` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceInfo {
    /// Stable identifier, e.g. `alsa:default`.
    pub id: String,
    /// Human-readable description.
    pub name: String,
    pub input: bool,
    pub output: bool,
    pub default_input: bool,
    pub default_output: bool,
    /// Default configuration, when the device can report one.
    pub sample_rate: Option<u32>,
    pub channels: Option<u16>,
    /// Why the device could not report a configuration.
    pub error: Option<String>,
}

fn device_name(d: &cpal::Device) -> String {
    d.description()
        .map(|desc| desc.name().to_string())
        .unwrap_or_default()
}

fn device_id(d: &cpal::Device) -> String {
    d.id().map(|i| i.to_string()).unwrap_or_default()
}

/// What a user may type to pick a device: its id (with or without the host prefix) or name.
fn device_labels(d: &cpal::Device) -> Vec<String> {
    let id = device_id(d);
    let short = id
        .split_once(':')
        .map(|(_, s)| s.to_string())
        .unwrap_or_default();
    vec![id, short, device_name(d)]
}

/// Every device of the default host.
pub fn list_devices() -> Result<Vec<DeviceInfo>, AudioError> {
    let host = cpal::default_host();
    let default_in = host.default_input_device().map(|d| device_id(&d));
    let default_out = host.default_output_device().map(|d| device_id(&d));
    let devices = host
        .devices()
        .map_err(|e| AudioError::Device(e.to_string()))?;
    let mut out = Vec::new();
    for d in devices {
        let name = device_name(&d);
        let (input, output) = (d.supports_input(), d.supports_output());
        let config = if input {
            d.default_input_config()
        } else {
            d.default_output_config()
        };
        let (sample_rate, channels, error) = match config {
            Ok(c) => (Some(c.sample_rate()), Some(c.channels()), None),
            Err(e) => (None, None, Some(e.to_string())),
        };
        out.push(DeviceInfo {
            id: device_id(&d),
            default_input: default_in.as_deref() == Some(device_id(&d).as_str()),
            default_output: default_out.as_deref() == Some(device_id(&d).as_str()),
            name,
            input,
            output,
            sample_rate,
            channels,
            error,
        });
    }
    Ok(out)
}

/// The device to open and its configuration. Probing opens PCMs, and alsa-lib reports each
/// one that fails on stderr by itself: those reports go to the log (see `hush`).
fn open_device(
    input: bool,
    name: Option<&str>,
) -> Result<(cpal::Device, cpal::SupportedStreamConfig), AudioError> {
    super::hush::alsa_to_log(|| {
        let device = find_device(input, name)?;
        let config = pick_config(&device, input)?;
        Ok((device, config))
    })
}

/// Picks a device by exact id or name, else by a unique case-insensitive substring of either.
fn find_device(input: bool, name: Option<&str>) -> Result<cpal::Device, AudioError> {
    let kind = if input { "input" } else { "output" };
    let host = cpal::default_host();
    let Some(name) = name else {
        let d = if input {
            host.default_input_device()
        } else {
            host.default_output_device()
        };
        return d.ok_or_else(|| AudioError::Device(format!("no default {kind} device")));
    };
    let devices: Vec<cpal::Device> = host
        .devices()
        .map_err(|e| AudioError::Device(e.to_string()))?
        .filter(|d| {
            if input {
                d.supports_input()
            } else {
                d.supports_output()
            }
        })
        .collect();
    if let Some(d) = devices
        .iter()
        .find(|d| device_labels(d).iter().any(|l| l == name))
    {
        return Ok(d.clone());
    }
    let needle = name.to_lowercase();
    let matches: Vec<&cpal::Device> = devices
        .iter()
        .filter(|d| {
            device_labels(d)
                .iter()
                .any(|l| l.to_lowercase().contains(&needle))
        })
        .collect();
    match matches.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(AudioError::NoSuchDevice {
            kind,
            name: name.to_string(),
            available: devices.iter().map(device_id).collect::<Vec<_>>().join(", "),
        }),
        many => Err(AudioError::Ambiguous {
            kind,
            name: name.to_string(),
            candidates: many
                .iter()
                .map(|d| device_id(d))
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// One frame of captured audio and when its first sample was captured.
#[derive(Debug, Clone)]
pub struct CapturedFrame {
    pub pcm: Vec<i16>,
    pub captured_at: Instant,
}

/// How a device was opened, for reports.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceSetup {
    pub device: String,
    pub sample_rate: u32,
    pub channels: u16,
    /// Frames per device period when a small fixed buffer was granted; `None` when the
    /// device only runs with its default buffer.
    pub buffer_frames: Option<u32>,
}

/// A running mean of a delay, in microseconds, written from a device callback.
#[derive(Default)]
struct DelayMeter {
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl DelayMeter {
    fn add(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// The mean in milliseconds, `None` before the first callback.
    fn mean_ms(&self) -> Option<f64> {
        let n = self.count.load(Ordering::Relaxed);
        (n > 0).then(|| self.sum_us.load(Ordering::Relaxed) as f64 / n as f64 / 1e3)
    }
}

/// Frames the capture queue holds before the oldest is dropped (the call's side fell
/// behind the device clock).
const CAPTURE_QUEUE_FRAMES: usize = 2;
/// Device periods of about this long are asked for (cpal `BufferSize::Fixed`).
const DEVICE_PERIOD: Duration = Duration::from_millis(10);

fn duration_of(samples: usize, rate: u32) -> Duration {
    Duration::from_secs_f64(samples as f64 / f64::from(rate.max(1)))
}

/// The device period asked for: [`DEVICE_PERIOD`], or `CALL_DEVICE_PERIOD_MS` (1..=100;
/// 0 keeps the device's default buffer).
fn device_period() -> Option<Duration> {
    match std::env::var("CALL_DEVICE_PERIOD_MS")
        .ok()
        .map(|v| v.parse::<u64>())
    {
        Some(Ok(0)) => None,
        Some(Ok(ms)) if ms <= 100 => Some(Duration::from_millis(ms)),
        _ => Some(DEVICE_PERIOD),
    }
}

/// Fixed buffers to try, smallest first: the asked-for period, then two and four times it
/// (a loaded machine or PulseAudio's ALSA plugin may not keep up with the smallest), each
/// clamped to what the device allows. Empty when the default buffer was asked for.
fn buffer_ladder(range: &cpal::SupportedBufferSize, rate: u32) -> Vec<u32> {
    let Some(period) = device_period() else {
        return Vec::new();
    };
    let want = (f64::from(rate) * period.as_secs_f64()) as u32;
    let mut sizes: Vec<u32> = [1, 2, 4]
        .into_iter()
        .map(|k| match range {
            cpal::SupportedBufferSize::Range { min, max } => {
                (want * k).clamp(*min, (*max).max(*min))
            }
            cpal::SupportedBufferSize::Unknown => want * k,
        })
        .collect();
    sizes.dedup();
    sizes
}

/// The device's configuration at 48 kHz when it supports that rate in f32 (no resampling),
/// else its default.
fn pick_config(
    device: &cpal::Device,
    input: bool,
) -> Result<cpal::SupportedStreamConfig, AudioError> {
    let label = device_name(device);
    let default = if input {
        device.default_input_config()
    } else {
        device.default_output_config()
    }
    .map_err(|e| AudioError::Device(format!("{label}: {e}")))?;
    let ranges: Vec<cpal::SupportedStreamConfigRange> = if input {
        device
            .supported_input_configs()
            .map(|r| r.collect())
            .unwrap_or_default()
    } else {
        device
            .supported_output_configs()
            .map(|r| r.collect())
            .unwrap_or_default()
    };
    let native = ranges
        .into_iter()
        .filter(|r| r.sample_format() == cpal::SampleFormat::F32)
        .filter(|r| r.channels() == default.channels() || r.channels() == 1)
        .find_map(|r| r.try_with_sample_rate(SAMPLE_RATE));
    Ok(native.unwrap_or(default))
}

/// How long a stream with a small fixed buffer must run without an error to be kept. A
/// buffer the device cannot keep up with fails within a few periods.
const BUFFER_PROBE: Duration = Duration::from_millis(200);

/// A stream's error count, and whether it is still on trial (see [`build_with_fallback`]).
#[derive(Default)]
struct StreamErrors {
    count: AtomicU64,
    on_trial: std::sync::atomic::AtomicBool,
}

impl StreamErrors {
    fn on_trial() -> Arc<Self> {
        let e = Self::default();
        e.on_trial.store(true, Ordering::Relaxed);
        Arc::new(e)
    }
}

/// Counts a stream's errors and logs the first of them (a broken stream can report one
/// per period, which must not flood the terminal). A buffer size on trial failing is
/// expected and handled, so it is only a debug line.
fn error_counter(what: &'static str, errors: Arc<StreamErrors>) -> impl FnMut(cpal::Error) + Send {
    move |e| {
        let n = errors.count.fetch_add(1, Ordering::Relaxed);
        if n == 0 || n.is_power_of_two() {
            if errors.on_trial.load(Ordering::Relaxed) {
                tracing::debug!("{what} device on trial: {e} ({} so far)", n + 1);
            } else {
                tracing::warn!("{what} device: {e} ({} so far)", n + 1);
            }
        }
    }
}

/// Starts a stream with the smallest fixed buffer of [`buffer_ladder`] that the device
/// accepts and then runs without errors for [`BUFFER_PROBE`] (PulseAudio's ALSA plugin can
/// accept a small buffer and then fail every period), or with the device's default buffer
/// when none does. The default is the last resort because it is often 100 ms or more.
fn build_with_fallback(
    config: &cpal::SupportedStreamConfig,
    build: impl Fn(cpal::StreamConfig, Arc<StreamErrors>) -> Result<cpal::Stream, cpal::Error>,
) -> Result<(cpal::Stream, Option<u32>), AudioError> {
    let mut stream_config = config.config();
    for n in buffer_ladder(config.buffer_size(), config.sample_rate()) {
        stream_config.buffer_size = cpal::BufferSize::Fixed(n);
        let errors = StreamErrors::on_trial();
        match build(stream_config, errors.clone()) {
            Ok(s) => {
                s.play().map_err(|e| AudioError::Device(e.to_string()))?;
                std::thread::sleep(BUFFER_PROBE);
                let failed = errors.count.load(Ordering::Relaxed);
                if failed == 0 {
                    errors.on_trial.store(false, Ordering::Relaxed);
                    return Ok((s, Some(n)));
                }
                tracing::info!(
                    "a {n}-frame device buffer failed {failed} times in {BUFFER_PROBE:?}; \
                     trying a larger one"
                );
            }
            Err(e) => tracing::info!("a {n}-frame device buffer was refused ({e})"),
        }
    }
    tracing::info!("using the device's default buffer");
    stream_config.buffer_size = cpal::BufferSize::Default;
    build(stream_config, Arc::default())
        .map(|s| (s, None))
        .map_err(|e| AudioError::Device(e.to_string()))
}

/// Microphone capture, clocked by the device: frames come out when the device has
/// captured them, each with the time its first sample was captured (cpal's capture
/// timestamp). The cpal stream lives on its own thread (cpal streams are not `Send` on
/// every platform).
pub struct DeviceCapture {
    frames: tokio::sync::mpsc::Receiver<CapturedFrame>,
    frame_samples: Arc<AtomicUsize>,
    dropped: Arc<AtomicU64>,
    age: Arc<DelayMeter>,
    setup: DeviceSetup,
    _stream: StreamThread,
}

/// What the capture callback keeps between calls.
struct CaptureState {
    channels: usize,
    rate: u32,
    mono: Vec<f32>,
    resampler: StreamResampler,
    pending: Vec<i16>,
    scratch: Vec<i16>,
    frame_samples: Arc<AtomicUsize>,
    frames: tokio::sync::mpsc::Sender<CapturedFrame>,
    dropped: Arc<AtomicU64>,
    /// How old each buffer was when its callback ran (the device's and driver's part).
    age: Arc<DelayMeter>,
}

impl CaptureState {
    fn on_data(&mut self, data: &[f32], info: &cpal::InputCallbackInfo) {
        let now = Instant::now();
        let ts = info.timestamp();
        // How long ago the buffer's first sample was captured.
        let age = ts
            .callback
            .checked_duration_since(ts.capture)
            .unwrap_or_default();
        self.age.add(age);
        downmix_to_f32(data, self.channels, &mut self.mono);
        let buffer_end = now
            .checked_sub(age)
            .unwrap_or(now)
            .checked_add(duration_of(self.mono.len(), self.rate))
            .unwrap_or(now);
        if self.resampler.push(&self.mono).is_err() {
            return;
        }
        self.scratch.resize(self.resampler.available(), 0);
        let n = self.resampler.pull(&mut self.scratch);
        self.pending.extend_from_slice(&self.scratch[..n]);
        let spf = self.frame_samples.load(Ordering::Relaxed).max(1);
        let delay = self.resampler.delay_samples();
        while self.pending.len() >= spf {
            // The frame's first sample lies this far before the end of what we hold.
            let behind = self.pending.len() + delay;
            let captured_at = buffer_end
                .checked_sub(duration_of(behind, SAMPLE_RATE))
                .unwrap_or(buffer_end);
            let pcm: Vec<i16> = self.pending.drain(..spf).collect();
            if self
                .frames
                .try_send(CapturedFrame { pcm, captured_at })
                .is_err()
            {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl DeviceCapture {
    /// Opens the input device (`None`: the default one). Frames are 20 ms until
    /// [`Self::set_frame_samples`] says otherwise.
    pub fn open(name: Option<&str>) -> Result<Self, AudioError> {
        let (device, config) = open_device(true, name)?;
        let rate = config.sample_rate();
        let channels = config.channels();
        let (tx, frames) = tokio::sync::mpsc::channel(CAPTURE_QUEUE_FRAMES);
        let frame_samples = Arc::new(AtomicUsize::new(SAMPLE_RATE as usize / 50));
        let dropped = Arc::new(AtomicU64::new(0));
        let age = Arc::new(DelayMeter::default());
        // Only the callback locks it: the lock is never contended.
        let state = Arc::new(Mutex::new(CaptureState {
            channels: usize::from(channels),
            rate,
            mono: Vec::new(),
            resampler: StreamResampler::new(rate, SAMPLE_RATE)?,
            pending: Vec::new(),
            scratch: Vec::new(),
            frame_samples: frame_samples.clone(),
            frames: tx,
            dropped: dropped.clone(),
            age: age.clone(),
        }));
        let label = device_id(&device);
        let (stream, buffer_frames) = spawn_stream(move || {
            build_with_fallback(&config, |c, errors| {
                let state = state.clone();
                device.build_input_stream::<f32, _, _>(
                    c,
                    move |data: &[f32], info: &cpal::InputCallbackInfo| {
                        if let Ok(mut s) = state.lock() {
                            s.on_data(data, info);
                        }
                    },
                    error_counter("capture", errors),
                    None,
                )
            })
        })?;
        Ok(Self {
            frames,
            frame_samples,
            dropped,
            age,
            setup: DeviceSetup {
                device: label,
                sample_rate: rate,
                channels,
                buffer_frames,
            },
            _stream: stream,
        })
    }

    /// Samples (at 48 kHz) per frame handed out.
    pub fn set_frame_samples(&self, n: usize) {
        self.frame_samples.store(n.max(1), Ordering::Relaxed);
    }

    /// The next captured frame; `None` if the device stream died.
    pub async fn next_frame(&mut self) -> Option<CapturedFrame> {
        self.frames.recv().await
    }

    /// Frames dropped because the call did not take them in time.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Mean time from a buffer's capture to its callback (device, driver and sound
    /// server), in milliseconds.
    pub fn device_delay_ms(&self) -> Option<f64> {
        self.age.mean_ms()
    }

    pub fn setup(&self) -> &DeviceSetup {
        &self.setup
    }
}

/// Between the playback callback and the call.
struct PlaybackShared {
    state: Mutex<PlaybackState>,
    /// Signalled when the call has queued audio (a callback may be waiting for it).
    filled: std::sync::Condvar,
    /// From a callback to when its first sample is played (device, driver, sound server).
    lead: DelayMeter,
    /// Our own queue, in device samples' time, as each callback found it.
    queued: DelayMeter,
    /// How long callbacks that had to ask for audio waited for it.
    pull_wait: DelayMeter,
    /// Woken when a callback needs audio.
    want: tokio::sync::Notify,
}

struct PlaybackState {
    queue: VecDeque<f32>,
    /// When the sample at the head of the queue will be played: during a callback, that
    /// callback's first sample; after it, the sample after its last.
    head_play_at: Option<Instant>,
    /// A callback is waiting for this many device samples to be queued.
    waiting: Option<usize>,
    /// The call has written at least once (until then a callback does not wait for it).
    fed: bool,
    /// The most device samples one callback took.
    callback_frames: usize,
    /// Until then the call is asked one device period ahead rather than on demand, since
    /// a callback waited for it in vain (a busy machine); see [`PULL_AHEAD_FOR`].
    ahead_until: Option<Instant>,
    ahead_for: Duration,
    /// More than this many queued device samples and the oldest are dropped.
    cap: usize,
    underrun_samples: u64,
    dropped_samples: u64,
    /// Callbacks whose wait for the call ran out (they played silence for the rest).
    missed_pulls: u64,
    /// Device samples still to be left unplayed from what the call writes next (a trim
    /// asked for more than was queued).
    trim_debt: usize,
    trims: u64,
    trimmed_samples: u64,
}

/// How long a callback waits at most for the call to decode what it needs, as a share of
/// the device period (the device still holds about one period then, so waiting half of it
/// cannot starve the device), and never more than [`MAX_PULL_WAIT`].
const PULL_WAIT_SHARE: f64 = 0.5;
const MAX_PULL_WAIT: Duration = Duration::from_millis(5);
/// After a callback waited in vain, the call is asked a period ahead for this long, twice
/// as long after each further miss (up to [`MAX_PULL_AHEAD_FOR`]): a machine too busy to
/// answer within the wait gets the old margin back instead of a gap every few periods.
const PULL_AHEAD_FOR: Duration = Duration::from_secs(10);
const MAX_PULL_AHEAD_FOR: Duration = Duration::from_secs(300);

impl PlaybackShared {
    fn new(cap: usize) -> Self {
        Self {
            state: Mutex::new(PlaybackState {
                queue: VecDeque::new(),
                head_play_at: None,
                waiting: None,
                fed: false,
                callback_frames: 0,
                ahead_until: None,
                ahead_for: PULL_AHEAD_FOR,
                cap,
                underrun_samples: 0,
                dropped_samples: 0,
                missed_pulls: 0,
                trim_debt: 0,
                trims: 0,
                trimmed_samples: 0,
            }),
            filled: std::sync::Condvar::new(),
            want: tokio::sync::Notify::new(),
            lead: DelayMeter::default(),
            queued: DelayMeter::default(),
            pull_wait: DelayMeter::default(),
        }
    }
}

impl PlaybackState {
    /// Leaves the oldest queued samples unplayed, up to the trim still owed.
    fn pay_trim_debt(&mut self) {
        let n = self.trim_debt.min(self.queue.len());
        self.queue.drain(..n);
        self.trim_debt -= n;
        self.trimmed_samples += n as u64;
    }

    /// Device samples that must be queued before the call is left alone.
    fn need(&self, now: Instant, rate: u32) -> usize {
        if let Some(n) = self.waiting {
            return n;
        }
        let ahead = self.ahead_until.is_some_and(|t| now < t);
        if !self.fed || ahead {
            // What the next callback takes, and a millisecond.
            return self.callback_frames + rate as usize / 1000;
        }
        0
    }
}

/// Speaker playback, clocked by the device and fed on demand: when a callback finds less
/// queued than it must play, it asks the call for audio (through [`Self::wants`] /
/// [`Self::demand`]) and waits a little for it, so a slot is taken from the jitter buffer
/// and decoded the moment the sound card needs it, not a period ahead; what waits between
/// the call and the sound card is the rest of the last decoded frame (half a frame on
/// average). The device's clock, not a timer, paces playout.
pub struct DevicePlayback {
    shared: Arc<PlaybackShared>,
    resampler: StreamResampler,
    rate: u32,
    period: usize,
    scratch: Vec<f32>,
    converted: Vec<i16>,
    setup: DeviceSetup,
    _stream: StreamThread,
}

/// The playback callback's work: takes what the call queued, asking for more (and waiting
/// up to `max_wait`) when it is short.
fn play_callback(
    shared: &PlaybackShared,
    data: &mut [f32],
    ch: usize,
    rate: u32,
    lead: Duration,
    max_wait: Duration,
) {
    let now = Instant::now();
    let Ok(mut st) = shared.state.lock() else {
        data.fill(0.0);
        return;
    };
    let frames = data.len() / ch;
    shared.lead.add(lead);
    shared.queued.add(duration_of(st.queue.len(), rate));
    st.head_play_at = Some(now + lead);
    st.callback_frames = st.callback_frames.max(frames);
    // A device that runs with a larger buffer than asked for must still be able to queue
    // what one callback takes and a frame more.
    st.cap = st.cap.max(2 * frames + rate as usize / 50);
    if st.queue.len() < frames {
        shared.want.notify_one();
        if st.fed {
            st.waiting = Some(frames);
            let deadline = now + max_wait;
            while st.queue.len() < frames {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                st = match shared.filled.wait_timeout(st, left) {
                    Ok((g, _)) => g,
                    Err(_) => {
                        data.fill(0.0);
                        return;
                    }
                };
            }
            st.waiting = None;
            shared.pull_wait.add(now.elapsed());
            if st.queue.len() < frames {
                st.missed_pulls += 1;
                st.ahead_until = Some(now + st.ahead_for);
                st.ahead_for = (st.ahead_for * 2).min(MAX_PULL_AHEAD_FOR);
            }
        }
    }
    for frame in data.chunks_mut(ch) {
        let v = match st.queue.pop_front() {
            Some(v) => v,
            None => {
                st.underrun_samples += 1;
                0.0
            }
        };
        frame.fill(v);
    }
    st.head_play_at = Some(now + lead + duration_of(frames, rate));
    let low = st.queue.len() < st.need(now, rate);
    drop(st);
    if low {
        shared.want.notify_one();
    }
}

impl DevicePlayback {
    pub fn open(name: Option<&str>) -> Result<Self, AudioError> {
        let (device, config) = open_device(false, name)?;
        let rate = config.sample_rate();
        let channels = config.channels();
        let per_frame = rate as usize / 50;
        let shared = Arc::new(PlaybackShared::new(per_frame * 4));
        let label = device_id(&device);
        let cb_shared = shared.clone();
        let ch = usize::from(channels).max(1);
        let (stream, buffer_frames) = spawn_stream(move || {
            build_with_fallback(&config, |c, errors| {
                let shared = cb_shared.clone();
                let period = match c.buffer_size {
                    cpal::BufferSize::Fixed(n) => duration_of(n as usize, rate),
                    cpal::BufferSize::Default => Duration::from_millis(20),
                };
                let max_wait = period.mul_f64(PULL_WAIT_SHARE).min(MAX_PULL_WAIT);
                device.build_output_stream::<f32, _, _>(
                    c,
                    move |data: &mut [f32], info: &cpal::OutputCallbackInfo| {
                        let ts = info.timestamp();
                        let lead = ts
                            .playback
                            .checked_duration_since(ts.callback)
                            .unwrap_or_default();
                        play_callback(&shared, data, ch, rate, lead, max_wait);
                    },
                    error_counter("playback", errors),
                    None,
                )
            })
        })?;
        let period = buffer_frames.map_or(per_frame, |n| n as usize);
        let this = Self {
            shared,
            resampler: StreamResampler::new(SAMPLE_RATE, rate)?,
            rate,
            period,
            scratch: Vec::new(),
            converted: Vec::new(),
            setup: DeviceSetup {
                device: label,
                sample_rate: rate,
                channels,
                buffer_frames,
            },
            _stream: stream,
        };
        this.set_frame_samples(SAMPLE_RATE as usize / 50);
        Ok(this)
    }

    /// Samples (at 48 kHz) per frame the call writes; bounds the queue to about two
    /// frames and periods.
    pub fn set_frame_samples(&self, n: usize) {
        let per_frame = n * self.rate as usize / SAMPLE_RATE as usize;
        let margin = self.rate as usize / 1000;
        if let Ok(mut st) = self.shared.state.lock() {
            st.cap = 2 * (per_frame + self.period + margin);
        }
    }

    /// When the device wants another frame: the time that frame's first sample will be
    /// played, or `None` while it has what it needs.
    pub fn wants(&self) -> Option<Instant> {
        let now = Instant::now();
        let st = self.shared.state.lock().ok()?;
        if st.queue.len() >= st.need(now, self.rate) {
            return None;
        }
        let head = st.head_play_at.unwrap_or(now);
        Some(head + duration_of(st.queue.len(), self.rate))
    }

    /// Waits until the device's callback has asked for audio.
    pub async fn demand(&self) {
        self.shared.want.notified().await;
    }

    /// Queues one frame of 48 kHz mono PCM.
    pub fn write(&mut self, pcm: &[i16]) -> Result<(), AudioError> {
        self.scratch.clear();
        self.scratch
            .extend(pcm.iter().map(|&s| f32::from(s) / f32::from(i16::MAX)));
        self.resampler.push(&self.scratch)?;
        self.converted.resize(self.resampler.available(), 0);
        let n = self.resampler.pull(&mut self.converted);
        let mut st = self
            .shared
            .state
            .lock()
            .map_err(|_| AudioError::Device("playback queue poisoned".into()))?;
        st.fed = true;
        st.queue.extend(
            self.converted[..n]
                .iter()
                .map(|&s| f32::from(s) / f32::from(i16::MAX)),
        );
        st.pay_trim_debt();
        // Bounded: if the call ever writes faster than the device plays, drop the oldest.
        let excess = st.queue.len().saturating_sub(st.cap);
        if excess > 0 {
            st.queue.drain(..excess);
            st.dropped_samples += excess as u64;
        }
        drop(st);
        self.shared.filled.notify_all();
        Ok(())
    }

    /// Plays `by` less of what is queued (the oldest; what the call writes next if less
    /// is queued), so that everything after plays that much sooner.
    pub fn trim(&mut self, by: Duration) {
        let n = (by.as_secs_f64() * f64::from(self.rate)).round() as usize;
        if let Ok(mut st) = self.shared.state.lock() {
            st.trims += 1;
            st.trim_debt += n;
            st.pay_trim_debt();
        }
    }

    /// How many trims there were, and the audio they left unplayed, ms.
    pub fn trimmed(&self) -> (u64, f64) {
        self.shared.state.lock().map_or((0, 0.0), |st| {
            (
                st.trims,
                st.trimmed_samples as f64 * 1e3 / f64::from(self.rate.max(1)),
            )
        })
    }

    /// Device samples played as silence because nothing was queued.
    pub fn underrun_samples(&self) -> u64 {
        self.shared.state.lock().map_or(0, |st| st.underrun_samples)
    }

    /// Callbacks that asked for audio and did not get it within their wait.
    pub fn missed_pulls(&self) -> u64 {
        self.shared.state.lock().map_or(0, |st| st.missed_pulls)
    }

    /// Mean time from a callback to its first sample being played (device, driver and
    /// sound server), in milliseconds.
    pub fn device_delay_ms(&self) -> Option<f64> {
        self.shared.lead.mean_ms()
    }

    /// Mean audio waiting in our queue when the device asked for more, in milliseconds.
    pub fn queued_ms(&self) -> Option<f64> {
        self.shared.queued.mean_ms()
    }

    /// Mean time a callback that found too little queued waited for the call to decode
    /// it, in milliseconds.
    pub fn pull_wait_ms(&self) -> Option<f64> {
        self.shared.pull_wait.mean_ms()
    }

    pub fn setup(&self) -> &DeviceSetup {
        &self.setup
    }
}

/// Keeps a cpal stream alive on a thread until dropped.
struct StreamThread {
    stop: Option<std::sync::mpsc::Sender<()>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Drop for StreamThread {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn spawn_stream<F, T>(build: F) -> Result<(StreamThread, T), AudioError>
where
    F: FnOnce() -> Result<(cpal::Stream, T), AudioError> + Send + 'static,
    T: Send + 'static,
{
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let handle = std::thread::Builder::new()
        .name("call-audio".into())
        .spawn(move || {
            // Opening the PCM here may make alsa-lib print (see `hush`).
            let built = super::hush::alsa_to_log(|| {
                build().and_then(|(s, extra)| {
                    s.play().map_err(|e| AudioError::Device(e.to_string()))?;
                    Ok((s, extra))
                })
            });
            match built {
                Ok((stream, extra)) => {
                    let _ = ready_tx.send(Ok(extra));
                    // Blocks until the owner drops the sender.
                    let _ = stop_rx.recv();
                    drop(stream);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        })
        .map_err(|e| AudioError::Device(e.to_string()))?;
    let extra = ready_rx
        .recv()
        .map_err(|_| AudioError::Device("audio thread ended during start-up".into()))??;
    Ok((
        StreamThread {
            stop: Some(stop_tx),
            handle: Some(handle),
        },
        extra,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::tone::dominant_frequency;

    fn write_wav(path: &Path, rate: u32, channels: u16, freq: f64, seconds: f64) {
        let spec = hound::WavSpec {
            channels,
            sample_rate: rate,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let mut w = hound::WavWriter::create(path, spec).unwrap();
        let n = (f64::from(rate) * seconds) as usize;
        for i in 0..n {
            let v = (0.4
                * (std::f64::consts::TAU * freq * i as f64 / f64::from(rate)).sin()
                * f64::from(i16::MAX)) as i16;
            for _ in 0..channels {
                w.write_sample(v).unwrap();
            }
        }
        w.finalize().unwrap();
    }

    #[test]
    fn a_44k1_stereo_wav_becomes_48k_mono_at_the_same_pitch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.wav");
        write_wav(&path, 44_100, 2, 523.25, 1.0);
        let mut src = WavSource::open(&path).unwrap();
        let mut pcm = Vec::new();
        let mut frame = vec![0i16; 960];
        let mut frames = 0;
        while src.read_frame(&mut frame).unwrap() {
            pcm.extend_from_slice(&frame);
            frames += 1;
            assert!(frames < 100, "a 1 s file ends");
        }
        // 1 s at 48 kHz is 50 frames (the last one partly silence).
        assert!((49..=52).contains(&frames), "{frames} frames");
        let f = dominant_frequency(&pcm[4800..40_000], 100.0, 2000.0).unwrap();
        assert!((f - 523.25).abs() < 1.0, "{f}");
    }

    #[test]
    fn wav_sink_round_trips_through_wav_source() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.wav");
        let mut sink = WavSink::create(&path).unwrap();
        let mut tone = ToneSource::new(440.0);
        let mut frame = vec![0i16; 960];
        let mut written = Vec::new();
        for _ in 0..10 {
            tone.read_frame(&mut frame).unwrap();
            sink.write_frame(&frame).unwrap();
            written.extend_from_slice(&frame);
        }
        sink.finish().unwrap();
        let reader = hound::WavReader::open(&path).unwrap();
        assert_eq!(reader.spec().sample_rate, 48_000);
        let read: Vec<i16> = reader.into_samples::<i16>().map(Result::unwrap).collect();
        assert_eq!(read, written);
    }

    #[test]
    fn unreadable_wav_files_are_errors_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("junk.wav");
        std::fs::write(&path, b"RIFF but not really").unwrap();
        let err = WavSource::open(&path).err().unwrap();
        assert!(err.to_string().contains("junk.wav"), "{err}");
        let err = WavSource::open(&dir.path().join("missing.wav"))
            .err()
            .unwrap();
        assert!(err.to_string().contains("missing.wav"), "{err}");
    }

    /// Runs one playback callback of `frames` mono samples on its own thread.
    fn callback(
        shared: &Arc<PlaybackShared>,
        frames: usize,
        max_wait: Duration,
    ) -> std::thread::JoinHandle<Vec<f32>> {
        let shared = shared.clone();
        std::thread::spawn(move || {
            let mut data = vec![9.0; frames];
            play_callback(&shared, &mut data, 1, 48_000, Duration::ZERO, max_wait);
            data
        })
    }

    #[test]
    fn a_short_playback_callback_asks_for_a_frame_and_plays_it_when_it_comes() {
        let shared = Arc::new(PlaybackShared::new(4800));
        {
            let mut st = shared.state.lock().unwrap();
            st.fed = true;
            st.queue.extend([0.5; 100]);
        }
        // Far longer than this test needs: the callback is woken by the frame, not this.
        let cb = callback(&shared, 480, Duration::from_secs(30));
        // The callback says what it needs; nothing was asked before it.
        let asked = loop {
            if let Some(n) = shared.state.lock().unwrap().waiting {
                break n;
            }
            std::thread::yield_now();
        };
        assert_eq!(asked, 480);
        {
            let mut st = shared.state.lock().unwrap();
            st.queue.extend([0.25; 960]);
        }
        shared.filled.notify_all();
        let played = cb.join().unwrap();
        // The rest of the last frame first, then the new one, with no gap.
        assert!(played[..100].iter().all(|&v| v == 0.5));
        assert!(played[100..].iter().all(|&v| v == 0.25));
        let st = shared.state.lock().unwrap();
        assert_eq!((st.underrun_samples, st.missed_pulls), (0, 0));
        assert_eq!(st.queue.len(), 100 + 960 - 480);
        assert!(st.waiting.is_none());
        // Enough left for the next callback: the call is not asked again before it.
        assert_eq!(st.need(Instant::now(), 48_000), 0);
        assert!(shared.pull_wait.mean_ms().is_some());
    }

    #[test]
    fn a_callback_whose_frame_does_not_come_plays_silence_and_asks_ahead_from_then() {
        let shared = Arc::new(PlaybackShared::new(4800));
        shared.state.lock().unwrap().fed = true;
        let played = callback(&shared, 480, Duration::from_millis(1))
            .join()
            .unwrap();
        assert!(played.iter().all(|&v| v == 0.0));
        let st = shared.state.lock().unwrap();
        assert_eq!((st.underrun_samples, st.missed_pulls), (480, 1));
        // From now on the call is asked for the next callback's audio in advance.
        assert_eq!(st.need(Instant::now(), 48_000), 480 + 48);
        assert!(st.ahead_for > PULL_AHEAD_FOR);
    }

    #[test]
    fn before_the_call_writes_a_callback_does_not_wait_for_it() {
        let shared = Arc::new(PlaybackShared::new(4800));
        let played = callback(&shared, 480, Duration::from_secs(30))
            .join()
            .unwrap();
        assert!(played.iter().all(|&v| v == 0.0));
        let st = shared.state.lock().unwrap();
        assert_eq!(st.missed_pulls, 0);
        // It asks for a first frame at once.
        assert!(st.need(Instant::now(), 48_000) > 0);
    }

    #[test]
    fn resampler_keeps_the_rate_ratio() {
        let mut r = StreamResampler::new(16_000, 48_000).unwrap();
        for _ in 0..100 {
            r.push(&[0.1; 160]).unwrap();
        }
        // 16 000 input samples → about 48 000 out, less the filter's delay.
        let got = r.available();
        assert!((46_000..=48_100).contains(&got), "{got}");
    }
}
