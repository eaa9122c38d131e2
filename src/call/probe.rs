//! Is anybody alive in a call? Participants who crash never say `leave`, so the group's
//! signaling alone cannot tell a running call from a dead one. A participant in a call
//! sends a frame every 10 or 20 ms, muted or not (docs/protocol.md §2, Liveness), so a short
//! subscription to the participants' tracks on the call's MoQ relay answers the question:
//! fresh frames arrive within a few frame times, or nobody is there.

use std::time::Duration;

use futures::future::join_all;
use url::Url;

use super::session::KnownCall;
use crate::transport::{
    participant_namespace, CertVerification, ClientConfig, MoqClient, TokenPolicy,
};

/// How long a probe waits for frames once connected. Frames flow every 20 ms at most, and a
/// relay that subscribes upstream only when asked needs about one round trip more.
pub const PROBE_WINDOW: Duration = Duration::from_secs(1);
/// How long a probe may take to reach the relay at all.
pub const PROBE_CONNECT: Duration = Duration::from_secs(3);
/// At most this many calls are probed at once (each costs one QUIC connection).
pub const MAX_PROBES: usize = 8;

/// What a probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Liveness {
    /// Fresh frames arrived from at least one participant.
    Alive,
    /// The relay answered but no participant's track delivered fresh frames.
    Silent,
    /// The relay could not be reached or refused us (the reason); nothing is known.
    Unreachable(String),
}

impl Liveness {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Alive => "alive",
            Self::Silent => "silent",
            Self::Unreachable(_) => "unreachable",
        }
    }
}

/// How to reach calls' relays.
#[derive(Debug, Clone)]
pub struct ProbeOptions {
    pub verification: CertVerification,
    pub relay_token: TokenPolicy,
    /// Reach the relay here instead of at the offer's URL (see `JoinOptions::moq_through`).
    pub through: Option<Url>,
}

/// Subscribes to every participant's track of `call` for [`PROBE_WINDOW`]: alive when one
/// of them delivers two different groups. Two, because a relay may hand a new subscriber
/// the newest group it still holds of a track whose publisher has died.
pub async fn probe_call(call: &KnownCall, opts: &ProbeOptions) -> Liveness {
    if call.participants.is_empty() {
        return Liveness::Silent;
    }
    let relay = opts.through.clone().unwrap_or(call.offer.moq_url.clone());
    let (client, driver) = MoqClient::new(
        ClientConfig::new(
            relay,
            opts.verification.clone(),
            Some(call.offer.token.to_vec()),
        )
        .with_token_policy(opts.relay_token),
    );
    let driver = tokio::spawn(driver);
    let namespace = call.offer.namespace_hex();
    let mut tracks = Vec::new();
    for t in call.participants.values() {
        let name = t.name_hex();
        match participant_namespace(&namespace, &name) {
            Ok(ns) => tracks.push(client.subscribe(ns, &name)),
            Err(e) => tracing::debug!("probe: track {name}: {e}"),
        }
    }
    let found = async {
        // The window starts once a connection is up: a slow handshake is not silence.
        let connect_deadline = tokio::time::Instant::now() + PROBE_CONNECT;
        while client.connects() == 0 {
            // Gave up (a refused certificate, no route): say why, not only "no connection".
            if let Some(e) = client.failure() {
                return Liveness::Unreachable(e.to_string());
            }
            if tokio::time::Instant::now() >= connect_deadline {
                return Liveness::Unreachable("no connection to the relay".into());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let watches = tracks.iter_mut().map(|track| async move {
            let mut first = None;
            loop {
                match track.next().await {
                    Ok((seq, _)) if first.is_some_and(|f| f != seq) => return Ok(()),
                    Ok((seq, _)) => first = Some(seq),
                    Err(e) => return Err(e.to_string()),
                }
            }
        });
        let any_alive = async {
            let mut pending: Vec<_> = watches.map(Box::pin).collect();
            let mut last_error = None;
            while !pending.is_empty() {
                let (result, _, rest) = futures::future::select_all(pending).await;
                match result {
                    Ok(()) => return Liveness::Alive,
                    Err(e) => last_error = Some(e),
                }
                pending = rest;
            }
            // Every subscription was refused: the relay does not let us look.
            Liveness::Unreachable(last_error.unwrap_or_default())
        };
        tokio::time::timeout(PROBE_WINDOW, any_alive)
            .await
            .unwrap_or(Liveness::Silent)
    }
    .await;
    drop(tracks);
    drop(client);
    // The driver ends with its client; do not wait long for the connection to close.
    let _ = tokio::time::timeout(Duration::from_millis(200), driver).await;
    found
}

/// Probes the newest `MAX_PROBES` of `calls` (all at once) and returns their liveness in
/// the same order; calls beyond that are `Unreachable("not probed")`.
pub async fn probe_calls(calls: &[&KnownCall], opts: &ProbeOptions) -> Vec<Liveness> {
    let mut order: Vec<usize> = (0..calls.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(calls[i].offered_at));
    let probed: Vec<usize> = order.into_iter().take(MAX_PROBES).collect();
    let results = join_all(probed.iter().map(|&i| probe_call(calls[i], opts))).await;
    let mut out = vec![Liveness::Unreachable("not probed".into()); calls.len()];
    for (i, r) in probed.into_iter().zip(results) {
        out[i] = r;
    }
    out
}
