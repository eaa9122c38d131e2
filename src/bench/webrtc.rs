//! WebRTC peer to peer with str0m (sans-IO): ICE with host candidates on loopback,
//! DTLS-SRTP, one Opus RTP stream whose payload is the SFrame ciphertext (MIP-06's mesh).
//! The sender reaches the receiver only through the impaired path: neither SDP carries a
//! candidate, the sender is given the path's address, and the receiver is ICE-lite (it
//! answers checks, never starts any), so no pair can bypass the path.
//!
//! Two variants. `webrtc`: no NACK (str0m's default for audio). `webrtc-nack`: NACK with
//! RTX retransmission (RFC 4588), which str0m only does for audio at its RTP level: its
//! Opus packetizer marks every packet not resendable, and an offerer's audio stream gets
//! no RTX SSRC. So in that variant both peers run str0m's RTP mode (the sender writes the
//! RTP packets itself, marked resendable; the receiver takes RTP packets, retransmissions
//! included), Opus is configured with an RTX payload type, and the receiver makes the
//! offer, so that the sender, answering, declares its stream with an RTX SSRC.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use str0m::change::{SdpAnswer, SdpOffer};
use str0m::format::{Codec, FormatParams};
use str0m::media::{Direction, Frequency, MediaKind, MediaTime, Mid, Pt};
use str0m::net::{Protocol, Receive};
use str0m::rtp::{RtpWrite, SeqNo};
use str0m::{Candidate, Event, Input, Output, Rtc, RtcConfig};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use super::harness::{Arrival, Link, Media, LINK_QUEUE};
use super::{BenchError, Scenario, SETUP_LIMIT};
use crate::transport::ImpairedPath;

fn setup(what: &str, e: impl std::fmt::Display) -> BenchError {
    BenchError::Setup(format!("webrtc: {what}: {e}"))
}

/// The SDP without its candidate lines (addresses are given to the agents directly).
fn without_candidates(sdp: &str) -> String {
    sdp.split("\r\n")
        .filter(|l| !l.starts_with("a=candidate") && !l.starts_with("a=end-of-candidates"))
        .collect::<Vec<_>>()
        .join("\r\n")
}

/// Whether lost packets are asked for again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    NoNack,
    Nack,
}

/// Opus and its retransmissions in the NACK variant (the payload type str0m gives Opus, and
/// the next one).
const PT_OPUS: u8 = 111;
const PT_OPUS_RTX: u8 = 112;

fn config(variant: Variant) -> RtcConfig {
    let config = RtcConfig::new()
        .set_crypto_provider(Arc::new(str0m::crypto::from_feature_flags()))
        .clear_codecs()
        // Hand every packet on at once: reordering and gaps are the jitter buffer's job,
        // as on the MoQ side.
        .set_reordering_size_audio(0);
    match variant {
        Variant::NoNack => config.enable_opus(true, false),
        Variant::Nack => {
            let mut config = config.set_rtp_mode(true);
            // What `enable_opus` configures, plus an RTX payload type: with one, the
            // receiving stream sends NACKs and the sending stream keeps packets to resend.
            config.codec_config().add_config(
                PT_OPUS.into(),
                Some(PT_OPUS_RTX.into()),
                Codec::Opus,
                Frequency::FORTY_EIGHT_KHZ,
                Some(2),
                FormatParams {
                    min_p_time: Some(10),
                    use_inband_fec: Some(true),
                    ..Default::default()
                },
            );
            config
        }
    }
}

/// `webrtc`: no NACK.
pub(crate) async fn peer_to_peer(
    scenario: &Scenario,
    seed: u64,
    media: &Media,
) -> Result<Link, BenchError> {
    connect(scenario, seed, media, Variant::NoNack).await
}

/// `webrtc-nack`: NACK and RTX.
pub(crate) async fn peer_to_peer_nack(
    scenario: &Scenario,
    seed: u64,
    media: &Media,
) -> Result<Link, BenchError> {
    connect(scenario, seed, media, Variant::Nack).await
}

/// An offer/answer exchange with the candidates taken out of both SDPs.
fn negotiate(
    offerer: &mut Rtc,
    answerer: &mut Rtc,
    direction: Direction,
) -> Result<Mid, BenchError> {
    let mut change = offerer.sdp_api();
    let mid = change.add_media(MediaKind::Audio, direction, None, None, None);
    let (offer, pending) = change.apply().ok_or_else(|| setup("offer", "no change"))?;
    let offer = SdpOffer::from_sdp_string(&without_candidates(&offer.to_sdp_string()))
        .map_err(|e| setup("offer", e))?;
    let answer = answerer
        .sdp_api()
        .accept_offer(offer)
        .map_err(|e| setup("answer", e))?;
    let answer = SdpAnswer::from_sdp_string(&without_candidates(&answer.to_sdp_string()))
        .map_err(|e| setup("answer", e))?;
    offerer
        .sdp_api()
        .accept_answer(pending, answer)
        .map_err(|e| setup("answer", e))?;
    Ok(mid)
}

async fn connect(
    scenario: &Scenario,
    seed: u64,
    media: &Media,
    variant: Variant,
) -> Result<Link, BenchError> {
    let begun = Instant::now();
    let socket_a = UdpSocket::bind("127.0.0.1:0")
        .await
        .map_err(|e| setup("socket", e))?;
    let socket_b = UdpSocket::bind("127.0.0.1:0")
        .await
        .map_err(|e| setup("socket", e))?;
    let addr_a = socket_a.local_addr().map_err(|e| setup("socket", e))?;
    let addr_b = socket_b.local_addr().map_err(|e| setup("socket", e))?;
    let path = Arc::new(
        ImpairedPath::start(addr_b, scenario.direct(seed))
            .await
            .map_err(|e| setup("impaired path", e))?,
    );

    let now = Instant::now();
    // `a` sends, `b` receives.
    let mut a = config(variant).build(now);
    let mut b = config(variant).set_ice_lite(true).build(now);
    let host = |addr: SocketAddr| Candidate::host(addr, "udp").map_err(|e| setup("candidate", e));
    a.add_local_candidate(host(addr_a)?);
    b.add_local_candidate(host(addr_b)?);
    let mid = match variant {
        Variant::NoNack => negotiate(&mut a, &mut b, Direction::SendOnly)?,
        // The answerer's sending stream is the one declared with an RTX SSRC.
        Variant::Nack => negotiate(&mut b, &mut a, Direction::RecvOnly)?,
    };
    a.add_remote_candidate(host(path.addr())?);

    let spf = media.codec.samples_per_frame() as u64;
    let (frames, frames_rx) = mpsc::channel::<(u64, Bytes)>(LINK_QUEUE);
    let (arrivals_tx, arrivals) = mpsc::channel(LINK_QUEUE);
    let (a_up, mut a_connected) = watch::channel(false);
    let (b_up, mut b_connected) = watch::channel(false);
    let mut tasks = JoinSet::new();
    tasks.spawn(drive(
        a,
        socket_a,
        Role::Sender {
            mid,
            frames: frames_rx,
            spf,
            rtp: variant == Variant::Nack,
        },
        a_up,
    ));
    tasks.spawn(drive(
        b,
        socket_b,
        Role::Receiver {
            arrivals: arrivals_tx,
            spf,
        },
        b_up,
    ));
    let connected = async {
        a_connected.wait_for(|c| *c).await.is_ok() && b_connected.wait_for(|c| *c).await.is_ok()
    };
    match tokio::time::timeout(SETUP_LIMIT, connected).await {
        Ok(true) => {}
        Ok(false) => return Err(setup("connect", "a peer stopped")),
        Err(_) => return Err(setup("connect", "ICE/DTLS did not complete")),
    }
    Ok(Link {
        frames,
        arrivals,
        sender_path: path,
        transport_late: Arc::new(AtomicU64::new(0)),
        tasks,
        setup: begun.elapsed(),
    })
}

enum Role {
    Sender {
        mid: Mid,
        frames: mpsc::Receiver<(u64, Bytes)>,
        spf: u64,
        /// Writes RTP packets itself (str0m's RTP mode), resendable on NACK.
        rtp: bool,
    },
    Receiver {
        arrivals: mpsc::Sender<Arrival>,
        spf: u64,
    },
}

/// One peer's run loop: drain the engine's output to its next timeout, then feed it one
/// input (a datagram, a frame to send, or the timeout), as str0m's contract asks.
async fn drive(mut rtc: Rtc, socket: UdpSocket, mut role: Role, connected: watch::Sender<bool>) {
    let Ok(local) = socket.local_addr() else {
        return;
    };
    let mut buf = vec![0u8; 2048];
    let mut pt: Option<Pt> = None;
    let mut is_connected = false;
    // Start the clock: until its first time step an agent may schedule nothing (the
    // answering side's ICE agent does not start checking otherwise).
    if let Err(e) = rtc.handle_input(Input::Timeout(Instant::now())) {
        tracing::debug!("webrtc start: {e}");
        return;
    }
    loop {
        let timeout = loop {
            match rtc.poll_output() {
                Ok(Output::Timeout(t)) => break t,
                Ok(Output::Transmit(t)) => {
                    // UDP: a send the kernel refuses is a lost datagram.
                    let _ = socket.try_send_to(&t.contents, t.destination);
                }
                Ok(Output::Event(e)) => match e {
                    Event::Connected => {
                        is_connected = true;
                        let _ = connected.send(true);
                    }
                    // RTP mode (the NACK variant): retransmissions come out here too,
                    // under their original sequence number and timestamp.
                    Event::RtpPacket(p) => {
                        if let Role::Receiver { arrivals, spf } = &role {
                            let arrival = Arrival {
                                seq: u64::from(p.header.timestamp) / *spf,
                                payload: Bytes::copy_from_slice(&p.payload),
                                at: p.timestamp,
                            };
                            if arrivals.try_send(arrival).is_err() && arrivals.is_closed() {
                                return;
                            }
                        }
                    }
                    Event::MediaData(d) => {
                        if let Role::Receiver { arrivals, spf } = &role {
                            // The sender stamps frame `seq` with RTP time seq × samples per
                            // frame (48 kHz), so the time gives the frame back.
                            let arrival = Arrival {
                                seq: d.time.numer() / *spf,
                                payload: Bytes::copy_from_slice(&d.data),
                                at: d.network_time,
                            };
                            if arrivals.try_send(arrival).is_err() && arrivals.is_closed() {
                                return;
                            }
                        }
                    }
                    _ => {}
                },
                Err(e) => {
                    tracing::debug!("webrtc peer: {e}");
                    return;
                }
            }
        };
        if !rtc.is_alive() {
            return;
        }
        let input = tokio::select! {
            r = socket.recv_from(&mut buf) => {
                let Ok((n, source)) = r else { return };
                let Ok(contents) = buf[..n].try_into() else { continue };
                Input::Receive(
                    Instant::now(),
                    Receive { proto: Protocol::Udp, source, destination: local, contents },
                )
            }
            f = async {
                match &mut role {
                    Role::Sender { frames, .. } => frames.recv().await,
                    Role::Receiver { .. } => std::future::pending().await,
                }
            } => {
                let Some((seq, payload)) = f else { return };
                let Role::Sender { mid, spf, rtp, .. } = &role else { continue };
                if *rtp {
                    // Before ICE completes a frame is dropped, like a frame with no
                    // connection.
                    if !is_connected {
                        continue;
                    }
                    let p = match pt {
                        Some(p) => p,
                        None => {
                            let Some(p) = rtc
                                .codec_config()
                                .iter()
                                .find(|p| p.spec().codec == Codec::Opus)
                                .map(|p| p.pt())
                            else {
                                continue;
                            };
                            pt = Some(p);
                            p
                        }
                    };
                    let mut api = rtc.direct_api();
                    let Some(stream) = api.stream_tx_by_mid(*mid, None) else {
                        continue;
                    };
                    // RTP time as in the frame API: frame `seq` at seq × samples per frame;
                    // RTP sequence numbers follow the frames.
                    let time = (seq * *spf) as u32;
                    let payload: Arc<[u8]> = Arc::from(&payload[..]);
                    let now = Instant::now();
                    stream.write_rtp(
                        RtpWrite::new(p, SeqNo::from(seq), time, now, payload).nackable(true),
                    );
                    // A written packet leaves on str0m's next time step: take it now.
                    Input::Timeout(now)
                } else {
                let Some(writer) = rtc.writer(*mid) else { continue };
                let p = match pt {
                    Some(p) => p,
                    None => {
                        let Some(p) = writer
                            .payload_params()
                            .find(|p| p.spec().codec == Codec::Opus)
                            .map(|p| p.pt())
                        else {
                            continue;
                        };
                        pt = Some(p);
                        p
                    }
                };
                let time = MediaTime::new(seq * *spf, Frequency::FORTY_EIGHT_KHZ);
                // Before ICE completes a write is dropped, like a frame with no connection.
                if let Err(e) = writer.write(p, Instant::now(), time, payload.to_vec()) {
                    tracing::debug!("webrtc write: {e}");
                }
                continue;
                }
            }
            () = tokio::time::sleep_until(timeout.into()) => Input::Timeout(Instant::now()),
        };
        if let Err(e) = rtc.handle_input(input) {
            tracing::debug!("webrtc input: {e}");
        }
    }
}
