//! Per-frame costs of the media path. Run with `cargo bench --bench media`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use call::media::keyring::SenderKeyring;
use call::media::keys::{CallSecret, KidLayout, MediaType};
use call::media::opus::{CodecConfig, OpusDecoder, OpusEncoder};
use call::media::pipeline::{Inbound, Outbound};
use call::media::sframe::{ReceiverKeys, SenderKeys};
use call::media::tone::ToneSource;
use criterion::{criterion_group, criterion_main, Criterion};

fn layout() -> KidLayout {
    KidLayout::new(4).unwrap()
}

fn sframe(c: &mut Criterion) {
    let secret = CallSecret::from_bytes([1; 32]);
    let mut tx = SenderKeys::new(&secret, layout(), MediaType::Audio, 1, 1, 0).unwrap();
    let mut rx = ReceiverKeys::new();
    rx.add_sender(&secret, layout(), MediaType::Audio, 1, 1)
        .unwrap();
    let payload = [0x5au8; 100];
    let mut frame = Vec::with_capacity(128);
    c.bench_function("sframe encrypt+decrypt 100 B", |b| {
        b.iter(|| {
            frame.clear();
            frame.extend_from_slice(tx.encrypt(black_box(&payload)).unwrap());
            black_box(rx.decrypt(&frame).unwrap().1.len())
        })
    });
}

fn opus(c: &mut Criterion) {
    let codec = CodecConfig::default();
    let mut enc = OpusEncoder::new(codec).unwrap();
    let mut tone = ToneSource::new(440.0);
    let mut pcm = vec![0i16; codec.samples_per_frame()];
    c.bench_function("opus encode 20 ms", |b| {
        b.iter(|| {
            tone.fill(&mut pcm);
            black_box(enc.encode(black_box(&pcm)).unwrap().len())
        })
    });
    tone.fill(&mut pcm);
    let packet = enc.encode(&pcm).unwrap().to_vec();
    let mut dec = OpusDecoder::new(codec).unwrap();
    let mut out = Vec::new();
    c.bench_function("opus decode 20 ms", |b| {
        b.iter(|| {
            dec.decode(black_box(&packet), &mut out).unwrap();
            black_box(out.len())
        })
    });
}

/// The call's pipeline: tone → Opus → SFrame on one side (`Outbound`); SFrame → jitter
/// buffer → Opus → PCM on the other (`Inbound`).
fn pipeline(c: &mut Criterion) {
    let codec = CodecConfig::default();
    let secret = CallSecret::from_bytes([2; 32]);
    let keys = SenderKeyring::new(layout(), MediaType::Audio, 1, 1, &secret, None).unwrap();
    let mut tx = Outbound::new(codec, keys).unwrap();
    let mut tone = ToneSource::new(440.0);
    let mut pcm = vec![0i16; codec.samples_per_frame()];
    c.bench_function("send pipeline per frame", |b| {
        b.iter(|| {
            tone.fill(&mut pcm);
            black_box(tx.encode(&pcm).unwrap().payload.len())
        })
    });

    // Pre-encrypt a long stream so the receive side measures only itself.
    let keys = SenderKeyring::new(layout(), MediaType::Audio, 1, 2, &secret, None).unwrap();
    let mut tx = Outbound::new(codec, keys).unwrap();
    let frames: Vec<_> = (0..20_000)
        .map(|_| {
            tone.fill(&mut pcm);
            tx.encode(&pcm).unwrap()
        })
        .collect();
    let t0 = Instant::now();
    let mut rx = Inbound::new(codec, layout(), 1).unwrap();
    rx.install_epoch(2, &secret, t0).unwrap();
    let mut i = 0usize;
    c.bench_function("receive pipeline per frame", |b| {
        b.iter(|| {
            // Simulated clock: one frame arrives and one slot plays per iteration.
            let now = t0 + Duration::from_millis(20 * i as u64);
            let frame = &frames[i % frames.len()];
            let _ = rx.receive(frame.seq, &frame.payload, now);
            black_box(rx.next(now).map(|s| s.pcm.len()));
            i += 1;
        })
    });
}

criterion_group!(benches, sframe, opus, pipeline);
criterion_main!(benches);
