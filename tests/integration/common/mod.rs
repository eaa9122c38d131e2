//! Real relays on loopback for integration tests.
#![allow(dead_code)]

pub mod cli;
pub mod users;

use call_relay::{Relay, RelayConfig};
use url::Url;

/// Both relays, started in this process on ephemeral ports; stopped on drop. Ephemeral
/// (nothing on disk) unless started with [`TestRelay::start_persistent`].
pub struct TestRelay {
    pub moq_url: Url,
    pub nostr_url: Url,
    pub fingerprint: String,
    /// What it was started with, its ports filled in: [`TestRelay::restart`] reuses it.
    config: RelayConfig,
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

    /// A relay keeping its certificate and events in `state_dir`, as the binary does by
    /// default.
    pub async fn start_persistent(state_dir: &std::path::Path) -> Self {
        Self::start_with(RelayConfig {
            ephemeral: false,
            state_dir: Some(state_dir.to_path_buf()),
            ..RelayConfig::ephemeral()
        })
        .await
    }

    /// Stops the relay, waits `down`, and starts it again with the same configuration on
    /// the same ports (and, if persistent, the same state directory).
    pub async fn restart(self, down: std::time::Duration) -> Self {
        let config = self.config.clone();
        self.stop().await;
        tokio::time::sleep(down).await;
        Self::start_with(config).await
    }

    pub async fn start_with(mut config: RelayConfig) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        // In-process, a stopped relay's UDP socket is freed only once quinn has drained its
        // connections (up to the SETUP timeout for a handshake caught mid-way; a process that
        // exits frees it at once).
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
        let relay = loop {
            match Relay::bind(&config).await {
                Ok(relay) => break relay,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    if std::env::var_os("TEST_RELAY_DEBUG").is_some() {
                        eprintln!("relay bind: {e:#}");
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(e) => panic!("relay binds: {e:#}"),
            }
        };
        let stats = relay.stats_handle();
        config.moq_bind = relay_addr(&relay.moq_url());
        config.nostr_bind = relay_addr(&relay.nostr_url());
        Self {
            config,
            stats_handle: stats.clone(),
            stats: Box::new(move || stats.get()),
            moq_url: relay.moq_url(),
            nostr_url: relay.nostr_url(),
            fingerprint: relay.fingerprint().to_string(),
            task: tokio::spawn(relay.run()),
        }
    }
}

fn relay_addr(url: &Url) -> std::net::SocketAddr {
    let host = url.host_str().expect("host");
    format!("{host}:{}", url.port().expect("port"))
        .parse()
        .expect("addr")
}

impl TestRelay {
    pub fn moq_addr(&self) -> std::net::SocketAddr {
        relay_addr(&self.moq_url)
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
