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
}

impl Drop for TestRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A UDP forwarder between clients and a relay that can be cut: with the cut on, every
/// datagram in either direction is dropped, as when a relay's host vanishes from the
/// network without closing anything.
pub struct UdpPipe {
    pub addr: std::net::SocketAddr,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl UdpPipe {
    pub async fn start(target: std::net::SocketAddr) -> Self {
        use std::collections::HashMap;
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        use tokio::net::UdpSocket;

        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind pipe"));
        let addr = front.local_addr().expect("pipe addr");
        let cut = Arc::new(AtomicBool::new(false));
        let cut2 = cut.clone();
        let task = tokio::spawn(async move {
            // One upstream socket per client address, so the relay sees distinct peers.
            let mut upstreams: HashMap<std::net::SocketAddr, Arc<UdpSocket>> = HashMap::new();
            let mut buf = vec![0u8; 65536];
            let mut backs = tokio::task::JoinSet::new();
            loop {
                let Ok((n, client)) = front.recv_from(&mut buf).await else {
                    return;
                };
                if cut2.load(Ordering::Relaxed) {
                    continue;
                }
                let up = match upstreams.get(&client) {
                    Some(up) => up.clone(),
                    None => {
                        let up = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
                        up.connect(target).await.expect("connect upstream");
                        let (up2, front2, cut3) = (up.clone(), front.clone(), cut2.clone());
                        backs.spawn(async move {
                            let mut buf = vec![0u8; 65536];
                            while let Ok(n) = up2.recv(&mut buf).await {
                                if !cut3.load(Ordering::Relaxed) {
                                    let _ = front2.send_to(&buf[..n], client).await;
                                }
                            }
                        });
                        upstreams.insert(client, up.clone());
                        up
                    }
                };
                let _ = up.send(&buf[..n]).await;
            }
        });
        Self { addr, cut, task }
    }

    /// Drops every datagram from now on (`true`) or forwards again (`false`).
    pub fn set_cut(&self, cut: bool) {
        self.cut.store(cut, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for UdpPipe {
    fn drop(&mut self) {
        self.task.abort();
    }
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
