//! Audio in and out at the codec's 48 kHz mono: sound devices through cpal (resampled with
//! rubato), and headless sources and sinks (tone, WAV, silence) for bots and tests. Headless
//! ones are paced by the caller's timer, one frame per call, never by a sound card.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex};

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

/// Shared between a cpal callback thread and the call: 48 kHz mono samples.
type SampleQueue = Arc<Mutex<StreamResampler>>;

/// Microphone capture. The cpal stream lives on its own thread (cpal streams are not `Send`
/// on every platform); frames are taken at the caller's pace.
pub struct DeviceCapture {
    queue: SampleQueue,
    _stream: StreamThread,
}

/// Speaker playback, fed at the caller's pace.
pub struct DevicePlayback {
    queue: Arc<Mutex<VecDeque<f32>>>,
    resampler: StreamResampler,
    _stream: StreamThread,
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

fn spawn_stream<F>(build: F) -> Result<StreamThread, AudioError>
where
    F: FnOnce() -> Result<cpal::Stream, AudioError> + Send + 'static,
{
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let handle = std::thread::Builder::new()
        .name("call-audio".into())
        .spawn(move || {
            match build().and_then(|s| {
                s.play().map_err(|e| AudioError::Device(e.to_string()))?;
                Ok(s)
            }) {
                Ok(stream) => {
                    let _ = ready_tx.send(Ok(()));
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
    ready_rx
        .recv()
        .map_err(|_| AudioError::Device("audio thread ended during start-up".into()))??;
    Ok(StreamThread {
        stop: Some(stop_tx),
        handle: Some(handle),
    })
}

impl DeviceCapture {
    pub fn open(name: Option<&str>) -> Result<Self, AudioError> {
        let device = find_device(true, name)?;
        let config = device
            .default_input_config()
            .map_err(|e| AudioError::Device(format!("{}: {e}", device_name(&device))))?;
        let rate = config.sample_rate();
        let channels = usize::from(config.channels());
        let queue: SampleQueue = Arc::new(Mutex::new(StreamResampler::new(rate, SAMPLE_RATE)?));
        let q = queue.clone();
        let stream = spawn_stream(move || {
            let mut mono = Vec::new();
            device
                .build_input_stream::<f32, _, _>(
                    config.into(),
                    move |data: &[f32], _| {
                        downmix_to_f32(data, channels, &mut mono);
                        if let Ok(mut r) = q.lock() {
                            let _ = r.push(&mono);
                        }
                    },
                    |e| tracing::warn!("capture: {e}"),
                    None,
                )
                .map_err(|e| AudioError::Device(e.to_string()))
        })?;
        Ok(Self {
            queue,
            _stream: stream,
        })
    }
}

impl AudioSource for DeviceCapture {
    /// Whatever the microphone delivered since the last call, up to one frame; a shortfall
    /// is filled with silence (the device and our timer run on different clocks).
    fn read_frame(&mut self, out: &mut [i16]) -> Result<bool, AudioError> {
        let n = self
            .queue
            .lock()
            .map_err(|_| AudioError::Device("capture queue poisoned".into()))?
            .pull(out);
        out[n..].fill(0);
        Ok(true)
    }
}

impl DevicePlayback {
    pub fn open(name: Option<&str>) -> Result<Self, AudioError> {
        let device = find_device(false, name)?;
        let config = device
            .default_output_config()
            .map_err(|e| AudioError::Device(format!("{}: {e}", device_name(&device))))?;
        let rate = config.sample_rate();
        let channels = usize::from(config.channels());
        let queue = Arc::new(Mutex::new(VecDeque::<f32>::new()));
        let q = queue.clone();
        let stream = spawn_stream(move || {
            device
                .build_output_stream::<f32, _, _>(
                    config.into(),
                    move |data: &mut [f32], _| {
                        let mut q = match q.lock() {
                            Ok(q) => q,
                            Err(_) => return,
                        };
                        for frame in data.chunks_mut(channels.max(1)) {
                            frame.fill(q.pop_front().unwrap_or(0.0));
                        }
                    },
                    |e| tracing::warn!("playback: {e}"),
                    None,
                )
                .map_err(|e| AudioError::Device(e.to_string()))
        })?;
        Ok(Self {
            queue,
            resampler: StreamResampler::new(SAMPLE_RATE, rate)?,
            _stream: stream,
        })
    }
}

impl AudioSink for DevicePlayback {
    fn write_frame(&mut self, pcm: &[i16]) -> Result<(), AudioError> {
        let f: Vec<f32> = pcm
            .iter()
            .map(|&s| f32::from(s) / f32::from(i16::MAX))
            .collect();
        self.resampler.push(&f)?;
        let mut out = vec![0i16; self.resampler.available()];
        let n = self.resampler.pull(&mut out);
        let mut q = self
            .queue
            .lock()
            .map_err(|_| AudioError::Device("playback queue poisoned".into()))?;
        q.extend(out[..n].iter().map(|&s| f32::from(s) / f32::from(i16::MAX)));
        // Never let more than half a second pile up if the device clock runs slow.
        let cap = SAMPLE_RATE as usize / 2;
        if q.len() > cap {
            let excess = q.len() - cap;
            q.drain(..excess);
        }
        Ok(())
    }
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
