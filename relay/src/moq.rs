//! The MoQ side: accepts sessions, records which sessions announced which namespaces, and
//! serves each SUBSCRIBE from one shared upstream subscription per track.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use moq_native_ietf::quic;
use moq_transport::coding::TrackNamespace;
use moq_transport::serve::{FullTrackName, ServeError, Track, TrackReader};
use moq_transport::session::{Publisher, Session, Subscribed, Subscriber};
use tokio::sync::watch;

type Upstream = watch::Receiver<Option<Result<TrackReader, ServeError>>>;

struct TrackEntry {
    generation: u64,
    upstream: Upstream,
}

/// Routing state shared by every session.
#[derive(Default)]
pub(crate) struct Routes {
    /// Sessions that announced each namespace, oldest first. Several participants of one
    /// call announce the same namespace, each with its own track in it.
    namespaces: Mutex<HashMap<TrackNamespace, Vec<(u64, Subscriber)>>>,
    tracks: Mutex<HashMap<FullTrackName, TrackEntry>>,
    next_id: AtomicU64,
    pub(crate) stats: Stats,
}

#[derive(Default)]
pub(crate) struct Stats {
    pub sessions: AtomicU64,
    pub upstream_tracks: AtomicU64,
    pub downstream_subscriptions: AtomicU64,
}

impl Routes {
    fn announcers(&self, ns: &TrackNamespace) -> Vec<Subscriber> {
        let map = self.namespaces.lock().expect("routes lock");
        // Newest first: a re-joining participant is the likeliest owner of a fresh track.
        map.get(ns)
            .map(|v| v.iter().rev().map(|(_, s)| s.clone()).collect())
            .unwrap_or_default()
    }

    /// The shared upstream for `key`, starting one if none is live.
    fn upstream(self: &Arc<Self>, key: &FullTrackName) -> Upstream {
        let mut tracks = self.tracks.lock().expect("routes lock");
        if let Some(entry) = tracks.get(key) {
            let alive = match &*entry.upstream.borrow() {
                None => true,
                Some(Ok(reader)) => !reader.is_closed(),
                Some(Err(_)) => false,
            };
            if alive {
                return entry.upstream.clone();
            }
        }
        let generation = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(None);
        tracks.insert(
            key.clone(),
            TrackEntry {
                generation,
                upstream: rx.clone(),
            },
        );
        drop(tracks);
        let routes = self.clone();
        let key = key.clone();
        tokio::spawn(async move {
            routes.run_upstream(key.clone(), tx).await;
            let mut tracks = routes.tracks.lock().expect("routes lock");
            if tracks.get(&key).is_some_and(|e| e.generation == generation) {
                tracks.remove(&key);
            }
        });
        rx
    }

    /// Asks each session that announced the namespace for the track until one has it, then
    /// holds that subscription while anyone may read it.
    async fn run_upstream(
        &self,
        key: FullTrackName,
        tx: watch::Sender<Option<Result<TrackReader, ServeError>>>,
    ) {
        for mut announcer in self.announcers(&key.namespace) {
            let (writer, reader) = Track::new(key.namespace.clone(), key.name.clone()).produce();
            match announcer.subscribe_open(writer).await {
                Ok(subscription) => {
                    self.stats.upstream_tracks.fetch_add(1, Ordering::Relaxed);
                    let _ = tx.send(Some(Ok(reader)));
                    let _ = subscription.closed().await;
                    self.stats.upstream_tracks.fetch_sub(1, Ordering::Relaxed);
                    return;
                }
                Err(ServeError::NotFound | ServeError::NotFoundWithId(..)) => continue,
                Err(e) => tracing::debug!(track = %key.name, "upstream subscribe failed: {e}"),
            }
        }
        let _ = tx.send(Some(Err(ServeError::NotFound)));
    }

    async fn serve(self: Arc<Self>, subscribed: Subscribed) {
        let key = FullTrackName {
            namespace: subscribed.info.track_namespace.clone(),
            name: subscribed.info.track_name.clone(),
        };
        let mut upstream = self.upstream(&key);
        let ready = upstream
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|v| v.clone());
        match ready {
            Some(Ok(reader)) => {
                self.stats
                    .downstream_subscriptions
                    .fetch_add(1, Ordering::Relaxed);
                if let Err(e) = subscribed.serve(reader).await {
                    tracing::debug!(track = %key.name, "downstream ended: {e}");
                }
                self.stats
                    .downstream_subscriptions
                    .fetch_sub(1, Ordering::Relaxed);
            }
            Some(Err(e)) => {
                let _ = subscribed.close(e);
            }
            None => {
                let _ = subscribed.close(ServeError::Cancel);
            }
        }
    }

    /// Runs one client session until it ends.
    pub(crate) async fn session(
        self: Arc<Self>,
        transport: moq_transport::session::transport::Session,
        kind: moq_transport::session::Transport,
    ) {
        let (session, publisher, subscriber) = match Session::accept(transport, None, kind).await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!("moq setup failed: {e}");
                return;
            }
        };
        let (Some(publisher), Some(subscriber)) = (publisher, subscriber) else {
            return;
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.stats.sessions.fetch_add(1, Ordering::Relaxed);
        tokio::select! {
            res = session.run() => {
                if let Err(e) = res {
                    if !e.is_graceful_close() {
                        tracing::debug!(session = id, "session ended: {e}");
                    }
                }
            }
            () = self.clone().accept_announces(id, subscriber) => {}
            () = self.clone().accept_subscribes(publisher) => {}
        }
        self.namespaces.lock().expect("routes lock").retain(|_, v| {
            v.retain(|(sid, _)| *sid != id);
            !v.is_empty()
        });
        self.stats.sessions.fetch_sub(1, Ordering::Relaxed);
    }

    async fn accept_announces(self: Arc<Self>, id: u64, subscriber: Subscriber) {
        let mut incoming = subscriber.clone();
        while let Some(mut announce) = incoming.published_namespace().await {
            let ns = announce.namespace.clone();
            self.namespaces
                .lock()
                .expect("routes lock")
                .entry(ns.clone())
                .or_default()
                .push((id, subscriber.clone()));
            if announce.ok().is_err() {
                continue;
            }
            let routes = self.clone();
            tokio::spawn(async move {
                let _ = announce.closed().await;
                let mut map = routes.namespaces.lock().expect("routes lock");
                if let Some(v) = map.get_mut(&ns) {
                    v.retain(|(sid, _)| *sid != id);
                    if v.is_empty() {
                        map.remove(&ns);
                    }
                }
            });
        }
    }

    async fn accept_subscribes(self: Arc<Self>, mut publisher: Publisher) {
        while let Some(subscribed) = publisher.subscribed().await {
            tokio::spawn(self.clone().serve(subscribed));
        }
    }
}

/// Accepts QUIC connections until the server closes.
pub(crate) async fn accept_loop(mut server: quic::Server, routes: Arc<Routes>) {
    while let Some((transport, info)) = server.accept().await {
        tokio::spawn(routes.clone().session(transport, info.transport));
    }
}
