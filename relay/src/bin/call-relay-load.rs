//! Load generator for MoQ relays (ours or any draft-18 relay): P publishers, each one
//! track of `rate` objects/s of `size` bytes, and S subscriber sessions each subscribed to
//! every track. Prints one JSON line: delivered fraction and latency through the relay.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use bytes::{BufMut, Bytes, BytesMut};
use clap::Parser;
use futures::stream::{FuturesUnordered, StreamExt};
use moq_native_ietf::quic;
use moq_transport::coding::TrackNamespace;
use moq_transport::serve::{ServeError, Subgroup, Track, TrackReaderMode, Tracks};
use moq_transport::session::{Publisher, Session, Subscriber};
use moq_transport::setup::AuthorizationToken;
use tokio::time::Instant;
use url::Url;

#[derive(Parser, Debug)]
#[command(
    name = "call-relay-load",
    about = "Load generator for MoQ relays",
    after_help = "Example:\n  call-relay-load --url moqt://127.0.0.1:4443 --publishers 10 --subscribers 100 --seconds 10"
)]
struct Args {
    /// Relay URL (moqt:// or https://). The certificate is not verified.
    #[arg(long, env = "CALL_RELAY_LOAD_URL")]
    url: Url,
    /// Publishing sessions, one track each.
    #[arg(long, env = "CALL_RELAY_LOAD_PUBLISHERS", default_value_t = 1)]
    publishers: usize,
    /// Subscriber sessions, each subscribed to every track.
    #[arg(long, env = "CALL_RELAY_LOAD_SUBSCRIBERS", default_value_t = 10)]
    subscribers: usize,
    /// Objects per second per track.
    #[arg(long, env = "CALL_RELAY_LOAD_RATE", default_value_t = 50)]
    rate: u32,
    /// Object size in bytes (at least 8).
    #[arg(long, env = "CALL_RELAY_LOAD_SIZE", default_value_t = 80)]
    size: usize,
    /// Seconds of sending.
    #[arg(long, env = "CALL_RELAY_LOAD_SECONDS", default_value_t = 10)]
    seconds: u64,
    /// Relay token (hex) presented in SETUP; none for open relays.
    #[arg(long, env = "CALL_RELAY_LOAD_TOKEN")]
    token: Option<String>,
}

struct Conn {
    _endpoint: quic::Endpoint,
    publisher: Publisher,
    subscriber: Subscriber,
}

async fn connect(url: &Url, token: Option<&[u8]>) -> anyhow::Result<Conn> {
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AnyCert))
    .with_no_client_auth();
    let bind: SocketAddr = "0.0.0.0:0".parse()?;
    let endpoint = quic::Endpoint::new(quic::Config::new(
        bind,
        None,
        moq_native_ietf::tls::Config {
            client: tls,
            server: None,
            fingerprints: Vec::new(),
        },
    )?)?;
    let (transport, _cid, kind) = endpoint.client.connect(url, None).await?;
    let tokens = token
        .map(|t| vec![AuthorizationToken::new(0, t.to_vec())])
        .unwrap_or_default();
    let (session, publisher, subscriber) =
        Session::connect_with_tokens(transport, None, kind, tokens).await?;
    tokio::spawn(session.run());
    Ok(Conn {
        _endpoint: endpoint,
        publisher,
        subscriber,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    anyhow::ensure!(args.size >= 8, "--size must be at least 8");
    let token = args
        .token
        .as_deref()
        .map(hex::decode)
        .transpose()
        .context("--token is not hex")?;
    let start = Instant::now();

    // Publishers: announce, then wait for the go signal.
    let mut writers = Vec::new();
    let mut pub_conns = Vec::new();
    for i in 0..args.publishers {
        let mut conn = connect(&args.url, token.as_deref()).await?;
        let ns = TrackNamespace::try_from(vec!["bench".to_string(), format!("p{i}")])
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let (mut tracks, _request, reader) = Tracks::new(ns.clone()).produce();
        let track = tracks.create("t").context("track")?;
        let subgroups = track.subgroups()?;
        let announce = conn.publisher.publish_namespace_start(ns.clone()).await?;
        announce.ok().await?;
        tokio::spawn(async move {
            let mut serving = FuturesUnordered::new();
            loop {
                tokio::select! {
                    next = announce.subscribed() => match next {
                        Ok(Some(subscribed)) => {
                            let reader = reader.clone();
                            serving.push(async move {
                                let _ = Publisher::serve_subscribe(subscribed, reader).await;
                            });
                        }
                        _ => break,
                    },
                    Some(()) = serving.next(), if !serving.is_empty() => {}
                }
            }
        });
        writers.push((subgroups, tracks));
        pub_conns.push((conn, ns));
    }

    // Subscribers: every session subscribes to every track and reads at once.
    let received = Arc::new(AtomicU64::new(0));
    let latencies: Arc<Mutex<Vec<u32>>> = Arc::default();
    let mut sub_conns = Vec::new();
    let mut subscriptions = Vec::new();
    for _ in 0..args.subscribers {
        let conn = connect(&args.url, token.as_deref()).await?;
        for (_, ns) in &pub_conns {
            let mut subscriber = conn.subscriber.clone();
            let mut attempt = 0;
            let subscription = loop {
                let (writer, reader) = Track::new(ns.clone(), "t").produce();
                match subscriber.subscribe_open(writer).await {
                    Ok(s) => break (s, reader),
                    Err(ServeError::NotFound | ServeError::NotFoundWithId(..)) if attempt < 50 => {
                        attempt += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(e) => anyhow::bail!("subscribe: {e}"),
                }
            };
            let (handle, reader) = subscription;
            let received = received.clone();
            let latencies = latencies.clone();
            tokio::spawn(async move {
                let Ok(TrackReaderMode::Subgroups(mut groups)) = reader.mode().await else {
                    return;
                };
                let mut local = Vec::new();
                while let Ok(Some(mut group)) = groups.next().await {
                    while let Ok(Some(object)) = group.read_next().await {
                        let sent = u64::from_be_bytes(object[..8].try_into().expect("8 bytes"));
                        let now = start.elapsed().as_micros() as u64;
                        local.push(now.saturating_sub(sent) as u32);
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                }
                latencies.lock().expect("lock").extend(local);
            });
            subscriptions.push(handle);
        }
        sub_conns.push(conn);
    }

    // Send: every track paced at `rate`, phases spread over one interval.
    let interval = Duration::from_secs(1) / args.rate;
    let frames = args.seconds * u64::from(args.rate);
    let sent = Arc::new(AtomicU64::new(0));
    let mut senders = Vec::new();
    let n = writers.len().max(1) as u32;
    for (i, (mut subgroups, tracks)) in writers.into_iter().enumerate() {
        let sent = sent.clone();
        let size = args.size;
        senders.push(tokio::spawn(async move {
            let _tracks = tracks;
            tokio::time::sleep(interval * i as u32 / n).await;
            let mut tick = tokio::time::interval(interval);
            for seq in 0..frames {
                tick.tick().await;
                let mut payload = BytesMut::with_capacity(size);
                payload.put_u64(start.elapsed().as_micros() as u64);
                payload.resize(size, 0x5a);
                let Ok(mut group) = subgroups.create(Subgroup {
                    group_id: seq,
                    subgroup_id: 0,
                    priority: 0,
                }) else {
                    break;
                };
                if group.write(Bytes::from(payload)).is_ok() {
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                let _ = group.finish();
            }
        }));
    }
    for s in senders {
        s.await?;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(subscriptions);
    drop(sub_conns);
    drop(pub_conns);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let sent = sent.load(Ordering::Relaxed);
    let expected = sent * args.subscribers as u64;
    let received = received.load(Ordering::Relaxed);
    let mut lat = latencies.lock().expect("lock").clone();
    lat.sort_unstable();
    let pct = |q: f64| -> f64 {
        if lat.is_empty() {
            return f64::NAN;
        }
        let i = ((lat.len() - 1) as f64 * q).round() as usize;
        f64::from(lat[i]) / 1000.0
    };
    println!(
        "{{\"publishers\":{},\"subscribers\":{},\"subscriptions\":{},\"sent\":{},\"expected\":{},\"received\":{},\"delivered\":{:.4},\"latency_p50_ms\":{:.3},\"latency_p99_ms\":{:.3}}}",
        args.publishers,
        args.subscribers,
        args.publishers * args.subscribers,
        sent,
        expected,
        received,
        if expected == 0 { 0.0 } else { received as f64 / expected as f64 },
        pct(0.50),
        pct(0.99),
    );
    Ok(())
}

/// Benchmarks run against relays with throwaway certificates.
#[derive(Debug)]
struct AnyCert;

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
