//! Real relays on loopback for integration tests.
#![allow(dead_code)]

pub mod users;

use call_relay::{Relay, RelayConfig};
use url::Url;

/// Both relays, started in this process on ephemeral ports; stopped on drop.
pub struct TestRelay {
    pub moq_url: Url,
    pub nostr_url: Url,
    pub fingerprint: String,
    stats: Box<dyn Fn() -> call_relay::RelayStats + Send + Sync>,
    stats_handle: call_relay::StatsHandle,
    task: tokio::task::JoinHandle<()>,
}

impl TestRelay {
    pub async fn start() -> Self {
        Self::start_with(RelayConfig::ephemeral()).await
    }

    /// A relay whose MoQ listener takes `moq_addr` (retried briefly: a stopped relay's
    /// socket is released once its connections have drained).
    pub async fn start_on(moq_addr: std::net::SocketAddr) -> Self {
        let config = RelayConfig {
            moq_bind: moq_addr,
            ..RelayConfig::ephemeral()
        };
        Self::start_with(config).await
    }

    pub async fn start_with(config: RelayConfig) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        let relay = loop {
            match Relay::bind(&config).await {
                Ok(relay) => break relay,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(e) => panic!("relay binds: {e:#}"),
            }
        };
        let stats = relay.stats_handle();
        Self {
            stats_handle: stats.clone(),
            stats: Box::new(move || stats.get()),
            moq_url: relay.moq_url(),
            nostr_url: relay.nostr_url(),
            fingerprint: relay.fingerprint().to_string(),
            task: tokio::spawn(relay.run()),
        }
    }
}

impl TestRelay {
    pub fn moq_addr(&self) -> std::net::SocketAddr {
        let host = self.moq_url.host_str().expect("host");
        format!("{host}:{}", self.moq_url.port().expect("port"))
            .parse()
            .expect("addr")
    }

    /// Stops the relay as its binary does on ctrl-c: every session is closed.
    pub async fn stop(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }

    pub fn stats(&self) -> call_relay::RelayStats {
        (self.stats)()
    }

    /// A function reading the relay's counters, for tasks that outlive a borrow.
    pub fn stats_fn(&self) -> impl Fn() -> call_relay::RelayStats + Send + 'static {
        let stats = self.stats_handle.clone();
        move || stats.get()
    }
}

impl Drop for TestRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A UDP path between clients and a relay that can be cut (see `ImpairedPath`).
pub async fn udp_pipe(target: std::net::SocketAddr) -> call::transport::ImpairedPath {
    call::transport::ImpairedPath::start(target, call::transport::Impairment::none())
        .await
        .expect("impaired path")
}

/// A fresh identity with in-memory MLS state, connected to `relay`.
pub async fn memory_member(
    relay: &nostr_sdk::prelude::RelayUrl,
) -> call::group::GroupMember<mdk_memory_storage::MdkMemoryStorage> {
    call::group::GroupMember::connect(
        nostr_sdk::prelude::Keys::generate(),
        mdk_memory_storage::MdkMemoryStorage::default(),
        std::slice::from_ref(relay),
    )
    .await
    .unwrap()
}
