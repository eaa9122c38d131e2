//! `call demo`: N headless participants in one process form a Marmot group, signal a call
//! through it and exchange SFrame-encrypted Opus tones over a MoQ relay. Every layer is the
//! real one; only the microphone is replaced by a tone.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use mdk_memory_storage::MdkMemoryStorage;
use nostr_sdk::prelude::{Keys, PublicKey, RelayUrl};
use serde::Serialize;
use tokio::sync::{watch, Barrier};
use url::Url;

use super::signaling::{
    AnswerStatus, CallAnswer, CallOffer, Privacy, TrackRef, KIND_ANSWER, KIND_OFFER,
};
use super::{random, CallError};
use crate::group::{GroupMember, GroupRef};
use crate::media::jitter::JitterStats;
use crate::media::keyring::{Received, ReceiverKeyring, RejectCounts, SenderKeyring};
use crate::media::keys::{KidLayout, MediaType};
use crate::media::opus::{CodecConfig, OpusEncoder, SAMPLE_RATE};
use crate::media::playout::{PlayoutDecoder, SlotKind};
use crate::media::tone::{dominant_frequency, ToneSource};
use crate::transport::{
    participant_namespace, CertVerification, ClientConfig, ImpairedPath, Impairment, MoqClient,
    RemoteTrack, TokenPolicy,
};

type Member = GroupMember<MdkMemoryStorage>;

/// A peer must deliver at least this share of its frames for the demo to pass.
pub const MIN_RECEIVED: f64 = 0.90;
/// How far the heard tone may be from the sent one.
pub const MAX_FREQ_ERROR_HZ: f64 = 3.0;
const SIGNALING_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Clone)]
pub struct DemoConfig {
    pub participants: usize,
    pub seconds: u64,
    pub frame_ms: u32,
    pub moq_relay: Url,
    pub nostr_relays: Vec<Url>,
    pub verification: CertVerification,
    /// `enhanced`: constant bit rate and one packet size (PROTOCOL.md §5).
    pub privacy: Privacy,
    /// Every participant reaches the MoQ relay through its own path impaired like this
    /// (loss, delay, jitter; seeded per participant).
    pub impairment: Option<Impairment>,
    /// When the relay token is presented in SETUP (docs/protocol.md §4).
    pub relay_token: TokenPolicy,
}

/// What one participant heard from one peer.
#[derive(Debug, Clone, Serialize)]
pub struct PeerReport {
    pub from: usize,
    pub expected: u64,
    pub received: u64,
    /// Frames refused by SFrame (sum of `rejects`).
    pub decrypt_failed: u64,
    pub rejects: RejectCounts,
    /// The receiver's jitter buffer: target delay, late, concealed, FEC recoveries, ….
    pub jitter: JitterStats,
    pub received_pct: f64,
    /// How many different SFrame plaintext (Opus packet) lengths arrived: 1 with `privacy
    /// enhanced`. The ciphertext adds only the header, whose length follows the counter.
    pub distinct_payload_sizes: usize,
    pub tone_hz: f64,
    pub heard_hz: Option<f64>,
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    pub ok: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ParticipantReport {
    pub index: usize,
    pub pubkey: String,
    pub leaf_index: u32,
    pub tone_hz: f64,
    pub sent: u64,
    /// QUIC smoothed round-trip time to the MoQ relay at the end of the call.
    pub relay_rtt_ms: Option<f64>,
    pub peers: Vec<PeerReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DemoReport {
    pub ok: bool,
    pub participants: usize,
    pub seconds: u64,
    pub frame_ms: u32,
    pub moq_relay: String,
    pub nostr_relays: Vec<String>,
    /// The impairment of every participant's path to the MoQ relay, if any.
    pub impairment: Option<ImpairmentReport>,
    pub mls_epoch: u64,
    pub setup_ms: f64,
    pub wall_ms: f64,
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    pub reports: Vec<ParticipantReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ImpairmentReport {
    pub loss_pct: f64,
    pub delay_ms: f64,
    pub jitter_ms: f64,
    pub seed: u64,
}

/// Tone of participant `i`: 330, 440, 550 … Hz, far enough apart to tell apart.
pub fn tone_of(i: usize) -> f64 {
    330.0 + 110.0 * i as f64
}

/// When each frame was handed to the encryptor, by (track, sequence); read by receivers in
/// the same process to measure encrypt → decrypt latency.
#[derive(Default)]
struct SendLog {
    sent_at: Mutex<HashMap<([u8; 8], u64), Instant>>,
    sent_count: Mutex<HashMap<[u8; 8], u64>>,
}

/// Shared by the participant tasks of one demo run.
struct Stage {
    config: DemoConfig,
    barrier: Barrier,
    log: SendLog,
    tone_by_pubkey: HashMap<PublicKey, (usize, f64)>,
}

/// A participant's report plus what the run summary needs from it.
struct Outcome {
    report: ParticipantReport,
    latencies_ms: Vec<f64>,
    epoch: u64,
    media_ready: Instant,
}

pub async fn run(
    config: DemoConfig,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<DemoReport, CallError> {
    if config.participants < 2 {
        return Err(CallError::Protocol(
            "a call needs at least 2 participants".into(),
        ));
    }
    let started = Instant::now();
    let relays: Vec<RelayUrl> = config
        .nostr_relays
        .iter()
        .map(|u| RelayUrl::parse(u.as_str()))
        .collect::<Result<_, _>>()
        .map_err(|e| CallError::Protocol(format!("nostr relay URL: {e}")))?;

    progress(&format!("creating {} identities", config.participants));
    let keys: Vec<Keys> = (0..config.participants).map(|_| Keys::generate()).collect();
    let mut members = Vec::with_capacity(keys.len());
    for k in &keys {
        members.push(Member::connect(k.clone(), MdkMemoryStorage::default(), &relays).await?);
    }

    progress("publishing key packages");
    for m in &members[1..] {
        m.publish_key_package().await?;
    }
    progress("creating the Marmot group and sending welcomes");
    let invitees: Vec<PublicKey> = keys[1..].iter().map(Keys::public_key).collect();
    let group = members[0].create_group("call demo", &invitees).await?;
    progress("joining from welcomes");
    let joins = futures::future::join_all(members[1..].iter().map(|m| m.accept_welcomes())).await;
    for joined in joins {
        if !joined?.iter().any(|g| g.mls_group_id == group.mls_group_id) {
            return Err(CallError::Protocol("welcome was for another group".into()));
        }
    }

    let stage = Arc::new(Stage {
        barrier: Barrier::new(config.participants),
        log: SendLog::default(),
        tone_by_pubkey: keys
            .iter()
            .enumerate()
            .map(|(i, k)| (k.public_key(), (i, tone_of(i))))
            .collect(),
        config: config.clone(),
    });

    progress(&format!(
        "signaling the call; then {} s of media",
        config.seconds
    ));
    // A participant that fails leaves the others waiting at a barrier; bound the whole run.
    let limit = 2 * SIGNALING_TIMEOUT + Duration::from_secs(config.seconds);
    let mut tasks = Vec::new();
    for (i, member) in members.into_iter().enumerate() {
        let stage = stage.clone();
        let group = group.clone();
        tasks.push(tokio::spawn(async move {
            let result = tokio::time::timeout(limit, participant(i, &member, &group, &stage))
                .await
                .unwrap_or_else(|_| {
                    Err(CallError::Protocol(format!(
                        "participant {i} did not finish within {limit:?}"
                    )))
                });
            member.disconnect().await;
            result
        }));
    }
    let mut outcomes = Vec::new();
    for t in tasks {
        let outcome = t
            .await
            .map_err(|e| CallError::Protocol(format!("participant task: {e}")))??;
        outcomes.push(outcome);
    }
    outcomes.sort_by_key(|o| o.report.index);

    let mut latencies: Vec<f64> = outcomes
        .iter()
        .flat_map(|o| o.latencies_ms.iter().copied())
        .collect();
    latencies.sort_by(f64::total_cmp);
    let epochs: Vec<u64> = outcomes.iter().map(|o| o.epoch).collect();
    if epochs.windows(2).any(|w| w[0] != w[1]) {
        return Err(CallError::Protocol(format!(
            "participants ended in different epochs: {epochs:?}"
        )));
    }
    let media_ready = outcomes
        .iter()
        .map(|o| o.media_ready)
        .max()
        .unwrap_or(started);
    let reports: Vec<ParticipantReport> = outcomes.into_iter().map(|o| o.report).collect();
    let ok = reports
        .iter()
        .all(|r| r.peers.len() == config.participants - 1 && r.peers.iter().all(|p| p.ok));
    Ok(DemoReport {
        ok,
        participants: config.participants,
        seconds: config.seconds,
        frame_ms: config.frame_ms,
        moq_relay: config.moq_relay.to_string(),
        nostr_relays: config.nostr_relays.iter().map(Url::to_string).collect(),
        impairment: config.impairment.map(|i| ImpairmentReport {
            loss_pct: i.loss * 100.0,
            delay_ms: ms(i.delay),
            jitter_ms: ms(i.jitter),
            seed: i.seed,
        }),
        mls_epoch: epochs[0],
        setup_ms: ms(media_ready - started),
        wall_ms: ms(started.elapsed()),
        latency_p50_ms: percentile(&latencies, 0.50),
        latency_p99_ms: percentile(&latencies, 0.99),
        reports,
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// Signals the call through the group: the first participant offers, the others accept.
/// Returns the offer and every peer's track, checked against the MLS leaf of its sender.
async fn signal(
    i: usize,
    member: &Member,
    group: &GroupRef,
    stage: &Stage,
    my_track: &TrackRef,
) -> Result<(CallOffer, HashMap<PublicKey, TrackRef>), CallError> {
    let n = stage.config.participants;
    let leaves = member.leaf_map(group)?;
    let check_leaf = |sender: &PublicKey, track: &TrackRef| -> Result<(), CallError> {
        match leaves.get(&track.leaf_index) {
            Some(pk) if pk == sender => Ok(()),
            _ => Err(CallError::Protocol(format!(
                "{sender} claims leaf {} which is not theirs",
                track.leaf_index
            ))),
        }
    };
    let mut inbox = member.inbox(group).await?;
    // Nobody speaks before every inbox is listening: relays do not replay live messages.
    stage.barrier.wait().await;

    let mut offer = None;
    let mut tracks = HashMap::new();
    let mut early_answers = Vec::new();
    if i == 0 {
        let max_leaf = leaves.keys().copied().max().unwrap_or(0);
        let o = CallOffer {
            call_id: random(),
            moq_url: stage.config.moq_relay.clone(),
            namespace: random(),
            token: random(),
            track: my_track.clone(),
            frame_ms: stage.config.frame_ms,
            sender_bits: KidLayout::for_max_leaf(max_leaf).sender_bits(),
            privacy: stage.config.privacy,
        };
        member.send_rumor(group, o.to_rumor()).await?;
        offer = Some(o);
    }
    while offer.is_none() || tracks.len() < n - 1 {
        let rumor = inbox.next(SIGNALING_TIMEOUT).await?;
        if rumor.kind == KIND_OFFER && offer.is_none() {
            let o = CallOffer::from_rumor(rumor.kind, &rumor.tags)?;
            check_leaf(&rumor.sender, &o.track)?;
            tracks.insert(rumor.sender, o.track.clone());
            member
                .send_rumor(
                    group,
                    CallAnswer::accept(o.call_id, my_track.clone()).to_rumor(),
                )
                .await?;
            offer = Some(o);
        } else if rumor.kind == KIND_ANSWER {
            early_answers.push((
                rumor.sender,
                CallAnswer::from_rumor(rumor.kind, &rumor.tags)?,
            ));
        }
        if let Some(o) = &offer {
            for (sender, answer) in early_answers.drain(..) {
                if answer.call_id != o.call_id || answer.status != AnswerStatus::Accept {
                    continue;
                }
                let track = answer
                    .track
                    .ok_or_else(|| CallError::Protocol("accept without a track".into()))?;
                check_leaf(&sender, &track)?;
                tracks.insert(sender, track);
            }
        }
    }
    let offer = offer.expect("loop ends only with an offer");
    Ok((offer, tracks))
}

async fn participant(
    i: usize,
    member: &Member,
    group: &GroupRef,
    stage: &Stage,
) -> Result<Outcome, CallError> {
    let cfg = &stage.config;
    let my_track = TrackRef {
        name: random(),
        leaf_index: member
            .mdk()
            .own_leaf_index(&group.mls_group_id)
            .map_err(crate::group::GroupError::from)?,
    };
    let (offer, peers) = signal(i, member, group, stage, &my_track).await?;

    let export = member.export_call_secret(group, &offer.call_id)?;
    let layout =
        KidLayout::new(offer.sender_bits).map_err(crate::media::sframe::FrameError::from)?;
    let mut sender_keys = SenderKeyring::new(
        layout,
        MediaType::Audio,
        my_track.leaf_index,
        export.epoch,
        &export.secret,
        None,
    )
    .map_err(|e| CallError::Protocol(e.to_string()))?;

    // An impaired path of our own to the relay, when asked for (kept for the whole call).
    let (moq_url, _path) = match cfg.impairment {
        Some(imp) => {
            let imp = Impairment {
                seed: imp.seed.wrapping_add(i as u64),
                ..imp
            };
            let (url, path) = impaired_url(&offer.moq_url, imp).await?;
            (url, Some(path))
        }
        None => (offer.moq_url.clone(), None),
    };
    let (client, driver) = MoqClient::new(
        ClientConfig::new(
            moq_url,
            cfg.verification.clone(),
            Some(offer.token.to_vec()),
        )
        .with_token_policy(cfg.relay_token),
    );
    let driver = tokio::spawn(driver);
    let namespace = offer.namespace_hex();
    let mut publisher = client.publish(
        participant_namespace(&namespace, &my_track.name_hex())?,
        &my_track.name_hex(),
    );
    tokio::time::timeout(SIGNALING_TIMEOUT, publisher.announced())
        .await
        .map_err(|_| {
            CallError::Protocol(format!(
                "the relay did not accept the announce of track {} within {SIGNALING_TIMEOUT:?}",
                my_track.name_hex()
            ))
        })??;
    stage.barrier.wait().await; // every track is announced

    let mut inputs = Vec::new();
    for (pk, track) in &peers {
        let sub = client.subscribe(
            participant_namespace(&namespace, &track.name_hex())?,
            &track.name_hex(),
        );
        let mut keys = ReceiverKeyring::new(layout, MediaType::Audio);
        keys.install_epoch(
            export.epoch,
            &export.secret,
            [track.leaf_index],
            Instant::now(),
        )?;
        inputs.push((*pk, track.name, sub, keys));
    }
    stage.barrier.wait().await; // every subscription is in place
    let media_ready = Instant::now();

    let codec = match offer.privacy {
        Privacy::Enhanced => CodecConfig::enhanced(offer.frame_ms),
        Privacy::Standard => CodecConfig {
            frame_ms: offer.frame_ms,
            ..CodecConfig::default()
        },
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let receivers = futures::future::join_all(inputs.into_iter().map(|(pk, name, sub, keys)| {
        receive(sub, keys, name, codec, &stage.log, stop_rx.clone(), pk)
    }));
    let tone_hz = tone_of(i);
    let sender = async {
        let frames = cfg.seconds * 1000 / u64::from(offer.frame_ms);
        let sent = send_tone(
            &mut publisher,
            &mut sender_keys,
            my_track.name,
            codec,
            tone_hz,
            frames,
            &stage.log,
        )
        .await;
        stage.barrier.wait().await; // everyone has sent everything
        tokio::time::sleep(Duration::from_millis(500)).await;
        let _ = stop_tx.send(true);
        sent
    };
    let (sent, heard) = tokio::join!(sender, receivers);
    let relay_rtt_ms = client.rtt().map(ms);
    drop(client);
    let _ = tokio::time::timeout(Duration::from_secs(1), driver).await;
    let sent = sent?;

    let sent_counts = stage.log.sent_count.lock().expect("log lock").clone();
    let mut peers_report = Vec::new();
    let mut latencies_ms = Vec::new();
    for h in heard {
        let h = h?;
        let (from, tone) = stage.tone_by_pubkey[&h.pubkey];
        let expected = sent_counts.get(&h.track).copied().unwrap_or(0);
        let heard_hz = dominant_frequency(&h.pcm, 100.0, 2000.0);
        let received_pct = if expected == 0 {
            0.0
        } else {
            100.0 * h.received as f64 / expected as f64
        };
        let mut lat = h.latencies_ms;
        lat.sort_by(f64::total_cmp);
        peers_report.push(PeerReport {
            from,
            expected,
            received: h.received,
            decrypt_failed: h.rejects.total(),
            distinct_payload_sizes: h.payload_sizes.len(),
            rejects: h.rejects,
            jitter: h.jitter,
            received_pct,
            tone_hz: tone,
            heard_hz,
            latency_p50_ms: percentile(&lat, 0.50),
            latency_p99_ms: percentile(&lat, 0.99),
            ok: expected > 0
                && h.received as f64 >= MIN_RECEIVED * expected as f64
                && heard_hz.is_some_and(|f| (f - tone).abs() <= MAX_FREQ_ERROR_HZ),
        });
        latencies_ms.extend(lat);
    }
    peers_report.sort_by_key(|p| p.from);
    Ok(Outcome {
        report: ParticipantReport {
            index: i,
            pubkey: member.public_key().to_hex(),
            leaf_index: my_track.leaf_index,
            tone_hz,
            sent,
            relay_rtt_ms,
            peers: peers_report,
        },
        latencies_ms,
        epoch: export.epoch,
        media_ready,
    })
}

/// `url` reached through a new impaired path: the same scheme, the path's local address.
/// The relay's certificate is then checked by fingerprint (names no longer match).
async fn impaired_url(url: &Url, imp: Impairment) -> Result<(Url, ImpairedPath), CallError> {
    let host = url
        .host_str()
        .ok_or_else(|| CallError::Protocol(format!("{url} has no host")))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = url.port().unwrap_or(443);
    let target = tokio::net::lookup_host((host.as_str(), port))
        .await
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| CallError::Protocol(format!("cannot resolve {url}")))?;
    let path = ImpairedPath::start(target, imp)
        .await
        .map_err(|e| CallError::Protocol(format!("impaired path: {e}")))?;
    let mut through = url.clone();
    through
        .set_ip_host(path.addr().ip())
        .map_err(|()| CallError::Protocol(format!("{url}: cannot set the host")))?;
    through
        .set_port(Some(path.addr().port()))
        .map_err(|()| CallError::Protocol(format!("{url}: cannot set the port")))?;
    Ok((through, path))
}

/// Encodes, encrypts and publishes `frames` frames of a tone, paced like a microphone.
async fn send_tone(
    publisher: &mut crate::transport::LocalTrack,
    keys: &mut SenderKeyring,
    track: [u8; 8],
    codec: CodecConfig,
    tone_hz: f64,
    frames: u64,
    log: &SendLog,
) -> Result<u64, CallError> {
    let mut encoder = OpusEncoder::new(codec)?;
    let mut tone = ToneSource::new(tone_hz);
    let mut pcm = vec![0i16; codec.samples_per_frame()];
    let mut tick = tokio::time::interval(Duration::from_millis(u64::from(codec.frame_ms)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for seq in 0..frames {
        tick.tick().await;
        tone.fill(&mut pcm);
        let packet = encoder.encode(&pcm)?;
        log.sent_at
            .lock()
            .expect("log lock")
            .insert((track, seq), Instant::now());
        let frame = keys
            .encrypt(packet)
            .map_err(|e| CallError::Protocol(e.to_string()))?;
        // A frame sent while the relay is unreachable is dropped (counted in the track's
        // stats): late audio is worth nothing.
        publisher.send(seq, Bytes::copy_from_slice(frame));
    }
    log.sent_count
        .lock()
        .expect("log lock")
        .insert(track, frames);
    Ok(frames)
}

struct Heard {
    pubkey: PublicKey,
    track: [u8; 8],
    received: u64,
    rejects: RejectCounts,
    jitter: JitterStats,
    payload_sizes: std::collections::BTreeSet<usize>,
    pcm: Vec<i16>,
    latencies_ms: Vec<f64>,
}

/// Reads one peer's track until told to stop: decrypts frames as they arrive into a jitter
/// buffer, and plays it out on a frame-rate clock (decode, FEC or concealment).
async fn receive(
    mut sub: RemoteTrack,
    mut keys: ReceiverKeyring,
    track: [u8; 8],
    codec: CodecConfig,
    log: &SendLog,
    mut stop: watch::Receiver<bool>,
    pubkey: PublicKey,
) -> Result<Heard, CallError> {
    let mut player = PlayoutDecoder::new(codec)?;
    let mut pcm = Vec::with_capacity(SAMPLE_RATE as usize * 10);
    // Audio up to the last slot that held a real frame; what follows is concealment of a
    // stream that ended, not something the peer sent.
    let mut pcm_through_last_frame = 0;
    // Likewise the buffer's counters: concealment after the peer stopped sending is not loss.
    let mut stats_at_last_frame = player.stats();
    let mut received = 0;
    let mut latencies_ms = Vec::new();
    let mut payload_sizes = std::collections::BTreeSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(u64::from(codec.frame_ms)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut track_open = true;
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            _ = tick.tick() => {
                if let Some((kind, frame)) = player.next(Instant::now()) {
                    pcm.extend_from_slice(frame);
                    if matches!(kind, SlotKind::Decoded { .. } | SlotKind::Fec { .. }) {
                        pcm_through_last_frame = pcm.len();
                        stats_at_last_frame = player.stats();
                    }
                }
            }
            next = sub.next(), if track_open => match next {
                Ok((seq, payload)) => {
                    let now = Instant::now();
                    match keys.decrypt(&payload, now) {
                        Ok(Received::Frame(d)) => {
                            let sent_at = log.sent_at.lock().expect("log lock").get(&(track, seq)).copied();
                            if let Some(t) = sent_at {
                                latencies_ms.push(ms(t.elapsed()));
                            }
                            received += 1;
                            payload_sizes.insert(d.payload.len());
                            player.push(seq, d.payload, now);
                        }
                        Ok(Received::Held) => {}
                        Err(e) => tracing::debug!("frame {seq} from {}: {e}", hex::encode(track)),
                    }
                }
                Err(e) => {
                    tracing::warn!("track {} ended: {e}", hex::encode(track));
                    track_open = false;
                }
            },
        }
    }
    pcm.truncate(pcm_through_last_frame);
    Ok(Heard {
        pubkey,
        track,
        received,
        rejects: keys.rejects(),
        jitter: JitterStats {
            late: player.stats().late,
            ..stats_at_last_frame
        },
        payload_sizes,
        pcm,
        latencies_ms,
    })
}
