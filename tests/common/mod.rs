//! Real relays on loopback for integration tests.
#![allow(dead_code)]

use call_relay::{Relay, RelayConfig};
use url::Url;

/// Both relays, started in this process on ephemeral ports; stopped on drop.
pub struct TestRelay {
    pub moq_url: Url,
    pub nostr_url: Url,
    pub fingerprint: String,
    stats: Box<dyn Fn() -> call_relay::RelayStats + Send + Sync>,
    task: tokio::task::JoinHandle<()>,
}

impl TestRelay {
    pub async fn start() -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let relay = Relay::bind(&RelayConfig::ephemeral())
            .await
            .expect("relay binds");
        let stats = relay.stats_handle();
        Self {
            stats: Box::new(move || stats.get()),
            moq_url: relay.moq_url(),
            nostr_url: relay.nostr_url(),
            fingerprint: relay.fingerprint().to_string(),
            task: tokio::spawn(relay.run()),
        }
    }
}

impl TestRelay {
    pub fn stats(&self) -> call_relay::RelayStats {
        (self.stats)()
    }
}

impl Drop for TestRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}
