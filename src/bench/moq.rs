//! MoQ between the two endpoints: an in-process call-relay, the publisher and the
//! subscriber each on an impaired leg to it, through the client `call join` uses.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use rand::RngCore;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use url::Url;

use super::harness::{Arrival, Link, LINK_QUEUE};
use super::{BenchError, Scenario, SETUP_LIMIT};
use crate::transport::{
    participant_namespace, CertVerification, ClientConfig, Delivery, ImpairedPath, MoqClient,
    TokenPolicy,
};

fn setup(what: &str, e: impl std::fmt::Display) -> BenchError {
    BenchError::Setup(format!("moq: {what}: {e}"))
}

/// `url` with its host and port replaced by `addr`.
fn via(url: &Url, addr: SocketAddr) -> Result<Url, BenchError> {
    let mut u = url.clone();
    u.set_ip_host(addr.ip())
        .map_err(|()| setup("relay URL", "cannot set the host"))?;
    u.set_port(Some(addr.port()))
        .map_err(|()| setup("relay URL", "cannot set the port"))?;
    Ok(u)
}

/// One group (QUIC stream) per frame through call-relay.
pub(crate) async fn stream(scenario: &Scenario, seed: u64) -> Result<Link, BenchError> {
    through_relay(scenario, seed, Delivery::Stream).await
}

/// One OBJECT_DATAGRAM per frame through call-relay.
pub(crate) async fn datagram(scenario: &Scenario, seed: u64) -> Result<Link, BenchError> {
    through_relay(scenario, seed, Delivery::Datagram).await
}

async fn through_relay(
    scenario: &Scenario,
    seed: u64,
    delivery: Delivery,
) -> Result<Link, BenchError> {
    let begun = Instant::now();
    let relay = call_relay::Relay::bind(&call_relay::RelayConfig::ephemeral())
        .await
        .map_err(|e| setup("starting call-relay", format!("{e:#}")))?;
    let url = relay.moq_url();
    let verify = CertVerification::fingerprint(relay.fingerprint()).map_err(|e| setup("pin", e))?;
    let target: SocketAddr = format!(
        "{}:{}",
        url.host_str().unwrap_or_default(),
        url.port().unwrap_or_default()
    )
    .parse()
    .map_err(|e| setup("relay address", e))?;
    let mut tasks = JoinSet::new();
    tasks.spawn(relay.run());
    // The sender's leg and the receiver's leg, each with half the path.
    let up = Arc::new(
        ImpairedPath::start(target, scenario.leg(seed))
            .await
            .map_err(|e| setup("impaired path", e))?,
    );
    let down = ImpairedPath::start(target, scenario.leg(seed.wrapping_add(1)))
        .await
        .map_err(|e| setup("impaired path", e))?;
    let mut token = vec![0u8; 32];
    rand::thread_rng().fill_bytes(&mut token);
    let mut ns_bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut ns_bytes);
    let ns_hex = hex::encode(ns_bytes);
    let namespace = participant_namespace(&ns_hex, "00").map_err(|e| setup("namespace", e))?;

    let mut client = |addr| -> Result<MoqClient, BenchError> {
        let config = ClientConfig::new(via(&url, addr)?, verify.clone(), Some(token.clone()))
            .with_token_policy(TokenPolicy::Always);
        let (client, driver) = MoqClient::new(config);
        tasks.spawn(driver);
        Ok(client)
    };
    let publisher = client(up.addr())?;
    let subscriber = client(down.addr())?;
    let mut local = publisher.publish_with(namespace.clone(), "audio", delivery);
    tokio::time::timeout(SETUP_LIMIT, local.announced())
        .await
        .map_err(|_| setup("announce", "timed out"))?
        .map_err(|e| setup("announce", e))?;
    let mut remote = subscriber.subscribe(namespace, "audio");

    let (frames, mut frames_rx) = mpsc::channel::<(u64, bytes::Bytes)>(LINK_QUEUE);
    let (arrivals_tx, arrivals) = mpsc::channel(LINK_QUEUE);
    let transport_late = Arc::new(AtomicU64::new(0));
    tasks.spawn(async move {
        let _client = publisher;
        while let Some((seq, payload)) = frames_rx.recv().await {
            // A frame no connection took is counted by the track and simply not heard.
            let _ = local.send(seq, payload);
        }
    });
    let late = transport_late.clone();
    tasks.spawn(async move {
        let _client = subscriber;
        let _down = down;
        while let Ok((seq, payload)) = remote.next().await {
            let at = Instant::now();
            late.store(
                remote.stats().late.load(Ordering::Relaxed),
                Ordering::Relaxed,
            );
            if arrivals_tx
                .send(Arrival { seq, payload, at })
                .await
                .is_err()
            {
                return;
            }
        }
    });
    Ok(Link {
        frames,
        arrivals,
        sender_path: up,
        transport_late,
        tasks,
        setup: begun.elapsed(),
    })
}
