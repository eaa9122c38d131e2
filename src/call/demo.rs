//! `call demo`: N headless participants in one process form a Marmot group and hold a call
//! in it, each through the same driver and engine as `call join` (a tone instead of a
//! microphone). Every layer is the real one. The report is built from the participants'
//! own reports and per-frame records, so the demo's figures are the product's figures.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use mdk_memory_storage::MdkMemoryStorage;
use nostr_sdk::prelude::{Keys, PublicKey, RelayUrl};
use serde::Serialize;
use tokio::sync::mpsc;
use url::Url;

use super::engine::{npub, CallEvent, UserCommand};
use super::session::{self, CallTarget, JoinOptions, Session};
use super::signaling::Privacy;
use super::timing::{ms, ms_between, LatencySummary};
use super::CallError;
use crate::group::{GroupMember, GroupRef};
use crate::media::audio::NullSink;
use crate::media::io::{AudioIn, AudioOut};
use crate::media::jitter::JitterStats;
use crate::media::keyring::RejectCounts;
use crate::media::tone::ToneSource;
use crate::transport::{CertVerification, Delivery, ImpairedPath, Impairment, TokenPolicy};

type Member = GroupMember<MdkMemoryStorage>;

/// A peer must deliver at least this share of its frames for the demo to pass.
pub const MIN_RECEIVED: f64 = 0.90;
/// How far the heard tone may be from the sent one: 3 Hz, or 1 % of the tone where that
/// is more. The pitch is judged on decoded and FEC-recovered frames only, and each gap
/// left by a concealed frame bends the phase of what is analysed by a little; 1 % (a sixth
/// of a semitone) still keeps neighbouring tones (110 Hz apart) far apart.
pub const MAX_FREQ_ERROR_HZ: f64 = 3.0;
pub const MAX_FREQ_ERROR_SHARE: f64 = 0.01;
const SIGNALING_TIMEOUT: Duration = Duration::from_secs(15);
/// Frames sent this close to the end of the call may still be on their way; they are not
/// expected (on top of twice the impaired path's delay and jitter).
const TAIL_MARGIN: Duration = Duration::from_millis(300);

/// The pitch tolerance for a tone.
pub fn pitch_tolerance(tone_hz: f64) -> f64 {
    MAX_FREQ_ERROR_HZ.max(MAX_FREQ_ERROR_SHARE * tone_hz)
}

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
    /// Whether participants present the relay token (docs/protocol.md §4).
    pub relay_token: TokenPolicy,
    /// How the caller's offer says frames travel (every participant follows it).
    pub delivery: Delivery,
}

/// What one participant heard from one peer.
#[derive(Debug, Clone, Serialize)]
pub struct PeerReport {
    pub from: usize,
    /// Frames the peer sent while we listened (from our first frame of it to the end of
    /// the call, less the frames still in flight at the end).
    pub expected: u64,
    /// Of those, how many arrived and authenticated.
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
    /// Encrypted → decrypted (the network part).
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    /// Captured → played, frame by frame.
    pub mouth_to_ear_ms: Option<LatencySummary>,
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
    /// Start of this participant's `call join` session → first peer audio played.
    pub first_audio_ms: Option<f64>,
    pub peers: Vec<PeerReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DemoReport {
    pub ok: bool,
    pub participants: usize,
    pub seconds: u64,
    pub frame_ms: u32,
    /// How the frames travelled (the caller's offer).
    pub delivery: Delivery,
    pub moq_relay: String,
    pub nostr_relays: Vec<String>,
    /// The impairment of every participant's path to the MoQ relay, if any.
    pub impairment: Option<ImpairmentReport>,
    pub mls_epoch: u64,
    /// Start → every participant hears every other (group, welcomes, signaling, MoQ).
    pub setup_ms: f64,
    pub wall_ms: f64,
    /// Encrypted → decrypted, over every frame of every peer.
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    /// Captured → played, over every frame of every peer.
    pub mouth_to_ear_ms: Option<LatencySummary>,
    /// Session start → first peer audio played, over the participants that joined a running
    /// call.
    pub join_to_first_audio_ms: Option<LatencySummary>,
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

/// One participant's session, running.
struct Running {
    commands: mpsc::UnboundedSender<UserCommand>,
    task: tokio::task::JoinHandle<Result<Session, CallError>>,
}

fn start_participant(
    i: usize,
    member: Member,
    group: GroupRef,
    opts: JoinOptions,
    events: mpsc::UnboundedSender<(usize, CallEvent)>,
) -> Running {
    let (commands, command_rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let result = session::run_session(
            &member,
            &group,
            None,
            &opts,
            AudioIn::Timer(Box::new(ToneSource::new(tone_of(i)))),
            AudioOut::Timer(Box::new(NullSink)),
            command_rx,
            |e: &CallEvent| {
                let _ = events.send((i, e.clone()));
            },
        )
        .await;
        member.disconnect().await;
        result
    });
    Running { commands, task }
}

pub async fn run(
    config: DemoConfig,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<DemoReport, CallError> {
    let n = config.participants;
    if n < 2 {
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

    progress(&format!("creating {n} identities"));
    let keys: Vec<Keys> = (0..n).map(|_| Keys::generate()).collect();
    let mut members = Vec::with_capacity(n);
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
    let index_of: HashMap<String, usize> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| (npub(&k.public_key()), i))
        .collect();

    // Every participant through its own impaired path to the relay, when asked for.
    let mut paths = Vec::new();
    let mut options = Vec::new();
    for i in 0..n {
        let mut opts =
            JoinOptions::new(Some(config.moq_relay.clone()), config.verification.clone());
        opts.target = if i == 0 {
            CallTarget::New
        } else {
            CallTarget::Auto
        };
        opts.privacy = config.privacy;
        opts.frame_ms = config.frame_ms;
        opts.ring_timeout = Duration::ZERO;
        opts.record_frames = true;
        opts.relay_token = config.relay_token;
        if i == 0 {
            // Only the caller chooses; the others take it from the offer.
            opts.delivery = Some(config.delivery);
        }
        if let Some(imp) = config.impairment {
            let imp = Impairment {
                seed: imp.seed.wrapping_add(i as u64),
                ..imp
            };
            let (url, path) = impaired_url(&config.moq_relay, imp).await?;
            opts.moq_through = Some(url);
            paths.push(path);
        }
        options.push(opts);
    }

    progress("starting the call (participant 0), then the others join it");
    let (event_tx, mut events) = mpsc::unbounded_channel();
    let mut members = members.into_iter();
    let mut options = options.into_iter();
    let first = members.next().expect("n >= 2");
    let mut running = vec![start_participant(
        0,
        first,
        group.clone(),
        options.next().expect("n >= 2"),
        event_tx.clone(),
    )];
    let deadline = Instant::now() + SIGNALING_TIMEOUT;
    let mut started_call = false;
    while !started_call {
        let (_, e) = next_event(&mut events, &mut running, deadline)
            .await?
            .ok_or_else(|| CallError::Protocol("participant 0 did not start the call".into()))?;
        started_call = matches!(e, CallEvent::Started { .. });
    }
    for (i, (member, opts)) in members.zip(options).enumerate() {
        running.push(start_participant(
            i + 1,
            member,
            group.clone(),
            opts,
            event_tx.clone(),
        ));
    }
    drop(event_tx);
    // Media runs once everyone hears everyone.
    let mut heard_by: Vec<usize> = vec![0; n];
    let deadline = Instant::now() + SIGNALING_TIMEOUT;
    while heard_by.iter().any(|&c| c < n - 1) {
        let next = match next_event(&mut events, &mut running, deadline).await {
            Ok(next) => next,
            Err(e) => {
                for r in &running {
                    let _ = r.commands.send(UserCommand::Leave);
                }
                return Err(e);
            }
        };
        match next {
            Some((i, CallEvent::PeerJoined { .. })) => heard_by[i] += 1,
            Some(_) => {}
            None => {
                for r in &running {
                    let _ = r.commands.send(UserCommand::Leave);
                }
                return Err(CallError::Protocol(format!(
                    "participants did not all find each other within {SIGNALING_TIMEOUT:?} \
                     (peers per participant: {heard_by:?})"
                )));
            }
        }
    }
    let media_ready = Instant::now();
    progress(&format!(
        "every participant hears every other; {} s of media",
        config.seconds
    ));
    let until = tokio::time::Instant::now() + Duration::from_secs(config.seconds);
    while tokio::time::timeout_at(until, events.recv())
        .await
        .is_ok_and(|e| e.is_some())
    {}
    let stopped_at = Instant::now();
    for r in &running {
        let _ = r.commands.send(UserCommand::Leave);
    }
    let mut sessions = Vec::new();
    for (i, r) in running.into_iter().enumerate() {
        let s = r
            .task
            .await
            .map_err(|e| CallError::Protocol(format!("participant {i}: {e}")))?
            .map_err(|e| CallError::Protocol(format!("participant {i}: {e}")))?;
        sessions.push(s);
    }
    drop(paths);

    let margin = TAIL_MARGIN
        + config
            .impairment
            .map_or(Duration::ZERO, |i| 2 * (i.delay + i.jitter));
    let pubkeys: Vec<String> = keys.iter().map(|k| k.public_key().to_hex()).collect();
    let report = build_report(&config, &sessions, &index_of, &pubkeys, stopped_at, margin);
    let epochs: Vec<u64> = sessions
        .iter()
        .map(|s| s.report.epochs.last().copied().unwrap_or_default())
        .collect();
    if epochs.windows(2).any(|w| w[0] != w[1]) {
        return Err(CallError::Protocol(format!(
            "participants ended in different epochs: {epochs:?}"
        )));
    }
    Ok(DemoReport {
        mls_epoch: epochs[0],
        setup_ms: ms(media_ready - started),
        wall_ms: ms(started.elapsed()),
        ..report
    })
}

/// The next event of any participant before `deadline` (`None` past it); a participant
/// whose session ends while the call is being set up is an error, with its reason.
async fn next_event(
    rx: &mut mpsc::UnboundedReceiver<(usize, CallEvent)>,
    running: &mut [Running],
    deadline: Instant,
) -> Result<Option<(usize, CallEvent)>, CallError> {
    let finished = futures::future::select_all(running.iter_mut().map(|r| &mut r.task));
    tokio::select! {
        e = tokio::time::timeout_at(deadline.into(), rx.recv()) => Ok(e.ok().flatten()),
        (result, i, _) = finished => Err(match result {
            Ok(Ok(_)) => CallError::Protocol(format!("participant {i} left during set-up")),
            Ok(Err(e)) => CallError::Protocol(format!("participant {i}: {e}")),
            Err(e) => CallError::Protocol(format!("participant {i}: {e}")),
        }),
    }
}

/// Joins every participant's records: what each sent (capture and send times) against
/// what each other received and played.
fn build_report(
    config: &DemoConfig,
    sessions: &[Session],
    index_of: &HashMap<String, usize>,
    pubkeys: &[String],
    stopped_at: Instant,
    margin: Duration,
) -> DemoReport {
    let n = sessions.len();
    // Per sender track: seq → (captured, sent).
    let sent: HashMap<[u8; 8], HashMap<u64, (Instant, Instant)>> = sessions
        .iter()
        .map(|s| {
            let frames = s
                .records
                .as_ref()
                .map(|r| r.sent.iter().map(|&(q, c, t)| (q, (c, t))).collect())
                .unwrap_or_default();
            (s.track, frames)
        })
        .collect();
    let track_of: Vec<[u8; 8]> = sessions.iter().map(|s| s.track).collect();
    let expect_until = stopped_at.checked_sub(margin).unwrap_or(stopped_at);
    let (mut all_network, mut all_m2e, mut first_audio) = (Vec::new(), Vec::new(), Vec::new());
    let mut reports = Vec::new();
    for (i, s) in sessions.iter().enumerate() {
        let no_records = super::timing::FrameRecords::default();
        let records = s.records.as_ref().unwrap_or(&no_records);
        let mut peers = Vec::new();
        for p in &s.report.peers {
            let Some(&from) = index_of.get(&p.npub) else {
                continue;
            };
            let track = track_of[from];
            let their_sent = &sent[&track];
            let arrived: Vec<(u64, Instant)> = records
                .arrived
                .iter()
                .filter(|(t, _, _)| *t == track)
                .map(|&(_, q, at)| (q, at))
                .collect();
            let first_seq = arrived.iter().map(|(q, _)| *q).min();
            let in_window = |q: u64| {
                first_seq.is_some_and(|f| q >= f)
                    && their_sent.get(&q).is_some_and(|(_, t)| *t <= expect_until)
            };
            let expected = their_sent.keys().filter(|&&q| in_window(q)).count() as u64;
            let received = arrived.iter().filter(|(q, _)| in_window(*q)).count() as u64;
            let network: Vec<f64> = arrived
                .iter()
                .filter_map(|(q, at)| their_sent.get(q).map(|(_, t)| ms_between(*t, *at)))
                .collect();
            let m2e: Vec<f64> = records
                .played
                .iter()
                .filter(|(t, _, _)| *t == track)
                .filter_map(|&(_, q, at)| their_sent.get(&q).map(|(c, _)| ms_between(*c, at)))
                .collect();
            let net = LatencySummary::of(&network);
            let tone = tone_of(from);
            let received_pct = if expected == 0 {
                0.0
            } else {
                100.0 * received as f64 / expected as f64
            };
            peers.push(PeerReport {
                from,
                expected,
                received,
                decrypt_failed: p.rejects.total(),
                rejects: p.rejects,
                jitter: p.jitter,
                received_pct,
                distinct_payload_sizes: p.distinct_payload_sizes,
                tone_hz: tone,
                heard_hz: p.heard_hz,
                latency_p50_ms: net.map(|l| l.p50),
                latency_p99_ms: net.map(|l| l.p99),
                mouth_to_ear_ms: LatencySummary::of(&m2e),
                ok: expected > 0
                    && received as f64 >= MIN_RECEIVED * expected as f64
                    && p.heard_hz
                        .is_some_and(|f| (f - tone).abs() <= pitch_tolerance(tone)),
            });
            all_network.extend(network);
            all_m2e.extend(m2e);
        }
        peers.sort_by_key(|p| p.from);
        if i > 0 {
            first_audio.extend(s.report.first_audio_ms);
        }
        reports.push(ParticipantReport {
            index: i,
            pubkey: pubkeys[i].clone(),
            leaf_index: s.report.leaf_index,
            tone_hz: tone_of(i),
            sent: s.report.sent,
            relay_rtt_ms: s.report.relay_rtt_ms,
            first_audio_ms: s.report.first_audio_ms,
            peers,
        });
    }
    let net = LatencySummary::of(&all_network);
    let ok = reports
        .iter()
        .all(|r| r.peers.len() == n - 1 && r.peers.iter().all(|p| p.ok));
    DemoReport {
        ok,
        participants: n,
        seconds: config.seconds,
        frame_ms: config.frame_ms,
        delivery: config.delivery,
        moq_relay: config.moq_relay.to_string(),
        nostr_relays: config.nostr_relays.iter().map(Url::to_string).collect(),
        impairment: config.impairment.map(|i| ImpairmentReport {
            loss_pct: i.loss * 100.0,
            delay_ms: ms(i.delay),
            jitter_ms: ms(i.jitter),
            seed: i.seed,
        }),
        mls_epoch: 0,
        setup_ms: 0.0,
        wall_ms: 0.0,
        latency_p50_ms: net.map(|l| l.p50),
        latency_p99_ms: net.map(|l| l.p99),
        mouth_to_ear_ms: LatencySummary::of(&all_m2e),
        join_to_first_audio_ms: LatencySummary::of(&first_audio),
        reports,
    }
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
