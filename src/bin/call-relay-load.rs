//! Load generator for MoQ relays (ours or any draft-18 relay): P publishers, each one
//! track of `rate` objects/s of `size` bytes, and S subscriber sessions each subscribed to
//! every track. Prints one JSON line: delivered fraction and latency through the relay.
//! It is a plain client of `call::transport`, the same code a call uses.
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use bytes::{BufMut, BytesMut};
use call::transport::{CertVerification, ClientConfig, Delivery, MoqClient, MoqConnection};
use clap::builder::BoolishValueParser;
use clap::Parser;
use moq_transport::coding::TrackNamespace;
use tokio::time::Instant;
use url::Url;

#[derive(Parser, Debug)]
#[command(
    name = "call-relay-load",
    about = "Load generator for MoQ relays",
    after_help = "Example:\n  call-relay-load --url moqt://127.0.0.1:4443 --publishers 10 --subscribers 100 --seconds 10"
)]
struct Args {
    /// Relay URL (moqt:// or https://). The certificate is not verified. Several
    /// (comma-separated) spread the sessions over the nodes of a relay cluster round-robin,
    /// publishers and subscribers alike, so every track crosses between nodes.
    #[arg(
        long,
        env = "CALL_RELAY_LOAD_URL",
        value_delimiter = ',',
        required = true
    )]
    url: Vec<Url>,
    /// Seconds a subscriber waits for a track the relay does not know yet (in a cluster,
    /// announcements take a moment to reach the other nodes).
    #[arg(long, env = "CALL_RELAY_LOAD_SUBSCRIBE_WAIT", default_value_t = 5)]
    subscribe_wait: u64,
    /// Subscribe as a call does (`MoqClient`: re-subscribes when a subscription is refused
    /// or ends), waiting `--subscribe-wait` seconds before sending so routes are set up.
    #[arg(long, env = "CALL_RELAY_LOAD_CALL_CLIENT", value_parser = BoolishValueParser::new())]
    call_client: bool,
    /// Publishing sessions, one track each.
    #[arg(long, env = "CALL_RELAY_LOAD_PUBLISHERS", default_value_t = 1)]
    publishers: usize,
    /// Subscriber sessions, each subscribed to every track.
    #[arg(long, env = "CALL_RELAY_LOAD_SUBSCRIBERS", default_value_t = 10)]
    subscribers: usize,
    /// Objects per second per track.
    #[arg(long, env = "CALL_RELAY_LOAD_RATE", default_value_t = 50,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    rate: u32,
    /// Object size in bytes (at least 8: the send time is carried in the first 8).
    #[arg(long, env = "CALL_RELAY_LOAD_SIZE", default_value_t = 80,
          value_parser = clap::value_parser!(u16).range(8..))]
    size: u16,
    /// Seconds of sending.
    #[arg(long, env = "CALL_RELAY_LOAD_SECONDS", default_value_t = 10)]
    seconds: u64,
    /// How publishers send their objects: `stream` (a QUIC stream per object) or
    /// `datagram` (a MoQ OBJECT_DATAGRAM per object). Example: --delivery datagram
    #[arg(long, env = "CALL_RELAY_LOAD_DELIVERY", default_value_t = Delivery::Stream,
          value_name = "stream|datagram")]
    delivery: Delivery,
    /// Relay token (hex) presented in SETUP; none for open relays.
    #[arg(long, env = "CALL_RELAY_LOAD_TOKEN")]
    token: Option<String>,
}

async fn connect(url: &Url, token: Option<&[u8]>) -> anyhow::Result<MoqConnection> {
    // Benchmarks run against relays with throwaway certificates.
    let (conn, driver) = MoqConnection::connect_with_token(url, &CertVerification::Insecure, token)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    tokio::spawn(driver);
    Ok(conn)
}

/// Subscribes, retrying any refusal but a wrong token until `wait` has passed, as a call's
/// `MoqClient` does. A relay cluster can refuse a first SUBSCRIBE while it sets up the route
/// between its nodes (moq-dev moq-relay 0.17.10: its track probe races the publisher's
/// duplicate-subscription check, docs/interop.md).
async fn subscribe(
    conn: &mut MoqConnection,
    ns: &TrackNamespace,
    wait: Duration,
) -> anyhow::Result<call::transport::TrackSubscriber> {
    let deadline = Instant::now() + wait;
    let mut backoff = Duration::from_millis(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match conn.subscribe(ns.clone(), "t", left).await {
            Ok(sub) => return Ok(sub),
            Err(e @ call::transport::TransportError::Unauthorized) => return Err(e.into()),
            Err(e) if Instant::now() + backoff >= deadline => return Err(e.into()),
            Err(_) => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    let token = args
        .token
        .as_deref()
        .map(hex::decode)
        .transpose()
        .context("--token is not hex")?;
    let start = Instant::now();

    // Publishers: announce, serving subscribers in the background.
    let mut tracks = Vec::new();
    let mut pub_conns = Vec::new();
    let node = |i: usize| &args.url[i % args.url.len()];
    let run = format!("{:08x}", rand::random::<u32>());
    for i in 0..args.publishers {
        let mut conn = connect(node(i), token.as_deref()).await?;
        // A fresh run id: a relay that still caches a previous run's last group of the
        // same namespace must not count it as delivered.
        let ns = TrackNamespace::try_from(vec!["bench".to_string(), format!("p{i}"), run.clone()])
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let (track, serve) = conn.publish_with(ns.clone(), "t", args.delivery).await?;
        tokio::spawn(serve);
        tracks.push(track);
        pub_conns.push((conn, ns));
    }

    // Subscribers: every session subscribes to every track and reads at once.
    let received = Arc::new(AtomicU64::new(0));
    let latencies: Arc<Mutex<Vec<u32>>> = Arc::default();
    let mut sub_conns = Vec::new();
    let mut readers = Vec::new();
    let mut call_clients = Vec::new();
    let record = move |object: &[u8], local: &mut Vec<u32>| {
        if let Some(stamp) = object.get(..8) {
            let sent = u64::from_be_bytes(stamp.try_into().expect("8 bytes"));
            let now = start.elapsed().as_micros() as u64;
            local.push(u32::try_from(now.saturating_sub(sent)).unwrap_or(u32::MAX));
        }
    };
    for j in 0..args.subscribers {
        if args.call_client {
            let config = ClientConfig::new(
                node(j + 1).clone(),
                CertVerification::Insecure,
                token.clone(),
            );
            let (client, driver) = MoqClient::new(config);
            tokio::spawn(driver);
            for (_, ns) in &pub_conns {
                let mut remote = client.subscribe(ns.clone(), "t");
                let received = received.clone();
                let latencies = latencies.clone();
                // A MoqClient track never ends by itself: stop after 2 s of silence, once
                // sending has begun.
                let mut silence = Duration::from_secs(args.subscribe_wait + 2);
                readers.push(tokio::spawn(async move {
                    let mut local = Vec::new();
                    // A re-subscription may deliver recent groups again: count each once,
                    // as a call's jitter buffer would play it once.
                    let mut seen = std::collections::HashSet::new();
                    while let Ok(Ok((_, object))) =
                        tokio::time::timeout(silence, remote.next()).await
                    {
                        silence = Duration::from_secs(2);
                        // Keyed by the send time the object carries, not its group id: a
                        // relay that re-sequences groups must not make one frame two.
                        let Some(stamp) = object.get(..8) else {
                            continue; // not one of ours (an empty object)
                        };
                        if seen.insert(stamp.to_vec()) {
                            record(&object, &mut local);
                            received.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    latencies.lock().expect("lock").extend(local);
                }));
            }
            call_clients.push(client);
            continue;
        }
        // Offset by one: with as many nodes as publishers, no subscriber sits on the node
        // of the publisher of the same index.
        let mut conn = connect(node(j + 1), token.as_deref()).await?;
        for (_, ns) in &pub_conns {
            let mut sub = subscribe(&mut conn, ns, Duration::from_secs(args.subscribe_wait))
                .await
                .context("subscribe")?;
            let received = received.clone();
            let latencies = latencies.clone();
            readers.push(tokio::spawn(async move {
                let mut local = Vec::new();
                while let Ok(Some((_, object))) = sub.next().await {
                    record(&object, &mut local);
                    received.fetch_add(1, Ordering::Relaxed);
                }
                latencies.lock().expect("lock").extend(local);
            }));
        }
        sub_conns.push(conn);
    }

    if args.call_client {
        tokio::time::sleep(Duration::from_secs(args.subscribe_wait)).await;
    }
    // Send: every track paced at `rate`, phases spread over one interval.
    let interval = Duration::from_secs(1) / args.rate;
    let frames = args.seconds * u64::from(args.rate);
    let sent = Arc::new(AtomicU64::new(0));
    let n = tracks.len().max(1) as u32;
    let mut senders = Vec::new();
    for (i, mut track) in tracks.into_iter().enumerate() {
        let sent = sent.clone();
        let size = usize::from(args.size);
        senders.push(tokio::spawn(async move {
            tokio::time::sleep(interval * i as u32 / n).await;
            let mut tick = tokio::time::interval(interval);
            for seq in 0..frames {
                tick.tick().await;
                let mut payload = BytesMut::with_capacity(size);
                payload.put_u64(start.elapsed().as_micros() as u64);
                payload.resize(size, 0x5a);
                if track.send(seq, payload.freeze()).is_err() {
                    break;
                }
                sent.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for s in senders {
        s.await?;
    }
    // Let the last objects arrive, then end the sessions so every reader finishes.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for conn in sub_conns.iter().chain(pub_conns.iter().map(|(c, _)| c)) {
        conn.close();
    }
    let _ = tokio::time::timeout(Duration::from_secs(3), futures::future::join_all(readers)).await;

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
        "{{\"delivery\":\"{}\",\"relays\":{},\"publishers\":{},\"subscribers\":{},\"subscriptions\":{},\"sent\":{},\"expected\":{},\"received\":{},\"delivered\":{:.4},\"latency_p50_ms\":{:.3},\"latency_p99_ms\":{:.3}}}",
        args.delivery,
        args.url.len(),
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
