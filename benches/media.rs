//! Per-frame costs of the media path. Run with `cargo bench --bench media`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use call::media::keyring::{Received, ReceiverKeyring, SenderKeyring};
use call::media::keys::{CallSecret, KidLayout, MediaType};
use call::media::opus::{CodecConfig, OpusDecoder, OpusEncoder};
use call::media::playout::PlayoutDecoder;
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

/// Tone → Opus → SFrame on one side; SFrame → jitter buffer → Opus → PCM on the other.
fn pipeline(c: &mut Criterion) {
    let codec = CodecConfig::default();
    let secret = CallSecret::from_bytes([2; 32]);
    let mut tx = SenderKeyring::new(layout(), MediaType::Audio, 1, 1, &secret, None).unwrap();
    let mut enc = OpusEncoder::new(codec).unwrap();
    let mut tone = ToneSource::new(440.0);
    let mut pcm = vec![0i16; codec.samples_per_frame()];
    c.bench_function("send pipeline per frame", |b| {
        b.iter(|| {
            tone.fill(&mut pcm);
            let packet = enc.encode(&pcm).unwrap();
            black_box(tx.encrypt(packet).unwrap().len())
        })
    });

    // Pre-encrypt a long stream so the receive side measures only itself.
    let frames: Vec<Vec<u8>> = (0..20_000)
        .map(|_| {
            tone.fill(&mut pcm);
            let packet = enc.encode(&pcm).unwrap().to_vec();
            tx.encrypt(&packet).unwrap().to_vec()
        })
        .collect();
    let t0 = Instant::now();
    let mut rx = ReceiverKeyring::new(layout(), MediaType::Audio);
    rx.install_epoch(1, &secret, [1], t0).unwrap();
    let mut player = PlayoutDecoder::new(codec).unwrap();
    let mut i = 0usize;
    c.bench_function("receive pipeline per frame", |b| {
        b.iter(|| {
            // Simulated clock: one frame arrives and one slot plays per iteration.
            let now = t0 + Duration::from_millis(20 * i as u64);
            let frame = &frames[i % frames.len()];
            if let Ok(Received::Frame(d)) = rx.decrypt(frame, now) {
                player.push(i as u64, d.payload, now);
            }
            black_box(player.next(now).map(|(_, pcm)| pcm.len()));
            i += 1;
        })
    });
}

criterion_group!(benches, sframe, opus, pipeline);
criterion_main!(benches);
