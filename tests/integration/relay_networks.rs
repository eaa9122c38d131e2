//! The client against relays that behave like ones others operate: an anonymous relay that
//! refuses any token at SETUP (the relay token policy), and a relay that subscribes to a
//! track after its first frames went out and asks for them with a joining FETCH.
//!
//! The relay side here is a minimal MoQ endpoint built on moq-transport over real QUIC on
//! loopback: call-relay never sends FETCH and never refuses a session for its token, so it
//! cannot show either behaviour.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::TestRelay;
use bytes::Bytes;
use call::transport::{
    participant_namespace, CertVerification, ClientConfig, MoqClient, TokenPolicy, TransportError,
    SESSION_UNAUTHORIZED,
};
use call_relay::ServerCert;
use moq_transport::coding::{KeyValuePairs, TrackNamespace};
use moq_transport::data::FetchRecord;
use moq_transport::message::{FetchType, RequestErrorCode, StandaloneFetch};
use moq_transport::serve::{Track, TrackReaderMode};
use moq_transport::session::{transport as wt, Session, Subscriber, Transport};
use tokio::time::{timeout, Instant};
use url::Url;

const TOKEN: [u8; 32] = [7; 32];

/// A QUIC listener speaking raw-QUIC MoQ (ALPN moqt-18) with a fresh self-signed cert.
struct Listener {
    endpoint: quinn::Endpoint,
    url: Url,
    verify: CertVerification,
}

impl Listener {
    fn bind() -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let cert = ServerCert::self_signed(&["localhost".into(), "127.0.0.1".into()]).unwrap();
        let mut tls = cert.server_config().unwrap();
        tls.alpn_protocols = vec![moq_transport::setup::DraftVersion::Draft18
            .alpn_bytes()
            .to_vec()];
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
        let config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        let endpoint =
            quinn::Endpoint::server(config, "127.0.0.1:0".parse::<SocketAddr>().unwrap()).unwrap();
        let addr = endpoint.local_addr().unwrap();
        Self {
            endpoint,
            url: Url::parse(&format!("moqt://{addr}")).unwrap(),
            verify: CertVerification::fingerprint(&cert.fingerprint).unwrap(),
        }
    }

    /// The next MoQ session, after SETUP; with whether the client presented a token.
    async fn accept(&self) -> Option<Accepted> {
        loop {
            let incoming = self.endpoint.accept().await?;
            let Ok(conn) = incoming.await else { continue };
            let transport: wt::Session = wt::quinn::Session::raw(
                conn,
                self.url.clone(),
                wt::quinn::proto::ConnectResponse::default(),
            )
            .into();
            let Ok((session, publisher, subscriber)) =
                Session::accept(transport.clone(), None, Transport::RawQuic).await
            else {
                continue;
            };
            let token = moq_transport::setup::decode_setup_tokens(session.setup_params())
                .map(|t| !t.is_empty())
                .unwrap_or(true);
            return Some(Accepted {
                transport,
                session,
                publisher: publisher?,
                subscriber: subscriber?,
                token,
            });
        }
    }
}

struct Accepted {
    transport: wt::Session,
    session: Session,
    #[allow(dead_code)]
    publisher: moq_transport::session::Publisher,
    subscriber: Subscriber,
    token: bool,
}

/// An anonymous relay as moq-dev's `moq-relay --auth-public` behaves: a session that
/// presents a token it cannot verify is closed as UNAUTHORIZED; others may announce.
/// Records, per session, whether a token was presented.
fn public_relay(listener: Listener) -> (Url, CertVerification, Arc<Mutex<Vec<bool>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (url, verify) = (listener.url.clone(), listener.verify.clone());
    let log = seen.clone();
    tokio::spawn(async move {
        while let Some(s) = listener.accept().await {
            log.lock().unwrap().push(s.token);
            if s.token {
                s.transport.close(
                    SESSION_UNAUTHORIZED,
                    "a token was presented to public rules",
                );
                continue;
            }
            tokio::spawn(async move {
                let mut subscriber = s.subscriber.clone();
                let announces = async {
                    while let Some(mut announce) = subscriber.published_namespace().await {
                        let _ = announce.ok();
                        // Held until the session ends: dropping it withdraws the accept.
                        tokio::spawn(async move {
                            let _ = announce.closed().await;
                        });
                    }
                };
                tokio::select! {
                    _ = s.session.run() => {}
                    () = announces => {}
                }
            });
        }
    });
    (url, verify, seen)
}

fn client(url: &Url, verify: &CertVerification, policy: TokenPolicy) -> MoqClient {
    let config = ClientConfig::new(url.clone(), verify.clone(), Some(TOKEN.to_vec()))
        .with_token_policy(policy);
    let (client, driver) = MoqClient::new(config);
    tokio::spawn(driver);
    client
}

#[tokio::test]
async fn auto_connects_without_the_token_to_a_relay_that_refuses_it_and_remembers() {
    let (url, verify, seen) = public_relay(Listener::bind());
    let client = client(&url, &verify, TokenPolicy::Auto);
    assert!(
        client.presents_token(),
        "auto starts by presenting the token"
    );
    let mut track = client.publish(participant_namespace("aa", "bb").unwrap(), "bb");
    timeout(Duration::from_secs(5), track.announced())
        .await
        .expect("announced in time")
        .expect("the tokenless session is accepted");
    assert!(!client.presents_token());
    assert_eq!(*seen.lock().unwrap(), vec![true, false]);
    assert_eq!(
        client.connects(),
        1,
        "only the tokenless session was established"
    );
}

#[tokio::test]
async fn always_reports_a_refused_session_as_refused_not_unreachable() {
    let (url, verify, seen) = public_relay(Listener::bind());
    let client = client(&url, &verify, TokenPolicy::Always);
    let mut track = client.publish(participant_namespace("aa", "bb").unwrap(), "bb");
    let mut remote = client.subscribe(participant_namespace("aa", "cc").unwrap(), "cc");
    let err = timeout(Duration::from_secs(5), track.announced())
        .await
        .expect("an answer in time")
        .expect_err("the relay refuses every session with a token");
    assert!(
        matches!(&err, TransportError::SessionRefused(r) if r.contains("public rules")),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .starts_with("the relay refused our token/session: unauthorized"),
        "{err}"
    );
    let err = timeout(Duration::from_secs(5), remote.next())
        .await
        .expect("an answer in time")
        .expect_err("remote tracks fail too");
    assert!(matches!(err, TransportError::SessionRefused(_)), "{err:?}");
    // Refused once, not retried: retrying the same way cannot help.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(*seen.lock().unwrap(), vec![true]);
}

#[tokio::test]
async fn never_presents_no_token_at_all() {
    let (url, verify, seen) = public_relay(Listener::bind());
    let client = client(&url, &verify, TokenPolicy::Never);
    assert!(!client.presents_token());
    let mut track = client.publish(participant_namespace("aa", "bb").unwrap(), "bb");
    timeout(Duration::from_secs(5), track.announced())
        .await
        .expect("announced in time")
        .expect("accepted");
    assert_eq!(*seen.lock().unwrap(), vec![false]);
}

#[tokio::test]
async fn auto_keeps_the_token_for_call_relay_which_binds_namespaces_to_it() {
    let relay = TestRelay::start().await;
    let verify = CertVerification::fingerprint(&relay.fingerprint).unwrap();
    let client = client(&relay.moq_url, &verify, TokenPolicy::Auto);
    let mut track = client.publish(participant_namespace("aa", "bb").unwrap(), "bb");
    timeout(Duration::from_secs(5), track.announced())
        .await
        .expect("announced in time")
        .expect("accepted");
    assert!(client.presents_token());
    // Never without the token: call-relay refuses the announce (namespace-level), which is
    // a different error from a refused session.
    let never = self::client(&relay.moq_url, &verify, TokenPolicy::Never);
    let mut other = never.publish(participant_namespace("aa", "cc").unwrap(), "cc");
    let err = timeout(Duration::from_secs(5), other.announced())
        .await
        .expect("an answer in time")
        .expect_err("the namespace is bound to the token");
    assert!(matches!(err, TransportError::Unauthorized), "{err:?}");
}

/// Frames of the publisher below: group `seq` carries these bytes.
fn payload(seq: u64) -> Bytes {
    Bytes::from(format!("frame {seq:04}").into_bytes())
}

/// A relay that accepts our client's announce, lets it send `early` frames, then subscribes
/// and sends a joining FETCH of `kind`; returns every group it received by either way, and
/// the first group the subscription delivered.
async fn late_relay(kind: FetchType, early: u64, total: u64) -> (BTreeMap<u64, Bytes>, u64, u64) {
    let listener = Listener::bind();
    let client = client(&listener.url, &listener.verify, TokenPolicy::Auto);
    let ns = participant_namespace("0123", "4567").unwrap();
    let mut local = client.publish(ns.clone(), "4567");

    let mut s = timeout(Duration::from_secs(5), listener.accept())
        .await
        .expect("a session in time")
        .expect("a session");
    let run = tokio::spawn(s.session.run());
    let mut announce = timeout(Duration::from_secs(5), s.subscriber.published_namespace())
        .await
        .expect("an announce in time")
        .expect("an announce");
    announce.ok().unwrap();
    timeout(Duration::from_secs(5), local.announced())
        .await
        .unwrap()
        .unwrap();

    // The call: a frame every 20 ms.
    let sender = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        for seq in 0..total {
            tick.tick().await;
            local.send(seq, payload(seq));
        }
        local
    });
    // The relay's first subscriber arrives late.
    tokio::time::sleep(Duration::from_millis(20 * early + 10)).await;

    let (writer, reader) = Track::new(ns.clone(), "4567").produce();
    let subscribe = s
        .subscriber
        .subscribe_open(writer)
        .await
        .expect("subscribed");
    let largest = subscribe
        .subscribe_ok()
        .expect("SUBSCRIBE_OK")
        .params
        .largest_object()
        .unwrap()
        .expect("SUBSCRIBE_OK names the largest group already sent");
    assert!(
        largest.group_id >= 1,
        "the subscription came late: {largest:?}"
    );
    let start = match kind {
        FetchType::RelativeJoining => largest.group_id, // back to group 0
        _ => 0,
    };
    let mut fetch = s
        .subscriber
        .joining_fetch(kind, subscribe.info.id, start, KeyValuePairs::default())
        .await
        .expect("FETCH sent");
    fetch.ok().await.expect("FETCH_OK");

    let mut got = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Some(record) = timeout(deadline - Instant::now(), fetch.next())
        .await
        .expect("the FETCH response ends in time")
        .expect("a well-formed FETCH response")
    {
        let FetchRecord::Object(object) = record else {
            continue;
        };
        let mut body = Vec::new();
        while let Some(chunk) = fetch.read_payload_chunk(4096).await.unwrap() {
            body.extend_from_slice(&chunk);
        }
        got.insert(object.group_id, Bytes::from(body));
    }
    let fetched = got.len() as u64;

    let TrackReaderMode::Subgroups(mut groups) = reader.mode().await.unwrap() else {
        panic!("subgroups mode");
    };
    let mut first_live = u64::MAX;
    while (got.len() as u64) < total && Instant::now() < deadline {
        let Ok(Ok(Some(mut group))) = timeout(deadline - Instant::now(), groups.next()).await
        else {
            break;
        };
        first_live = first_live.min(group.group_id);
        if let Ok(Some(object)) = group.read_next().await {
            got.insert(group.group_id, object);
        }
    }
    let local = sender.await.unwrap();
    assert_eq!(
        local.stats().fetched(),
        fetched,
        "the publisher counts what it answered"
    );
    drop(subscribe);
    run.abort();
    (got, first_live, fetched)
}

fn assert_every_frame(got: &BTreeMap<u64, Bytes>, total: u64) {
    let missing: Vec<u64> = (0..total).filter(|g| !got.contains_key(g)).collect();
    assert!(missing.is_empty(), "groups missing: {missing:?}");
    for (g, body) in got {
        assert_eq!(body, &payload(*g), "group {g} carries its own frame");
    }
}

#[tokio::test]
async fn a_relay_subscribing_late_loses_no_frame_with_an_absolute_joining_fetch() {
    let total = 30;
    let (got, first_live, fetched) = late_relay(FetchType::AbsoluteJoining, 10, total).await;
    assert_every_frame(&got, total);
    assert!(fetched >= 5, "the early frames came by FETCH: {fetched}");
    // No gap between the two: the subscription starts at or before the FETCH's end
    // (moq-transport also replays a few recent groups on it; the relay drops duplicates).
    assert!(
        first_live <= fetched,
        "FETCH ends where the subscription starts: fetched 0..{fetched}, live from {first_live}"
    );
}

#[tokio::test]
async fn a_relay_subscribing_late_loses_no_frame_with_a_relative_joining_fetch() {
    let total = 30;
    let (got, _, fetched) = late_relay(FetchType::RelativeJoining, 10, total).await;
    assert_every_frame(&got, total);
    assert!(fetched >= 5, "the early frames came by FETCH: {fetched}");
}

#[tokio::test]
async fn a_fetch_for_a_track_we_do_not_publish_is_refused_and_counted() {
    let listener = Listener::bind();
    let client = client(&listener.url, &listener.verify, TokenPolicy::Auto);
    let ns = participant_namespace("0123", "4567").unwrap();
    let mut local = client.publish(ns.clone(), "4567");
    let mut s = listener.accept().await.unwrap();
    let run = tokio::spawn(s.session.run());
    let mut announce = s.subscriber.published_namespace().await.unwrap();
    announce.ok().unwrap();
    local.announced().await.unwrap();
    for seq in 0..3 {
        local.send(seq, payload(seq));
    }
    let other: TrackNamespace = participant_namespace("0123", "9999").unwrap();
    let fetch = s
        .subscriber
        .fetch(
            StandaloneFetch {
                track_namespace: other,
                track_name: "9999".to_string().into(),
                start_location: moq_transport::coding::Location::new(0, 0),
                end_location: moq_transport::coding::Location::new(2, 1),
            },
            KeyValuePairs::default(),
        )
        .await
        .unwrap();
    let err = timeout(Duration::from_secs(5), fetch.ok())
        .await
        .expect("an answer in time")
        .expect_err("refused");
    assert!(
        matches!(err, moq_transport::serve::ServeError::Closed(c) if c == RequestErrorCode::DoesNotExist as u64),
        "{err:?}"
    );
    // The same FETCH for our own track is answered from the cache.
    let mut fetch = s
        .subscriber
        .fetch(
            StandaloneFetch {
                track_namespace: ns,
                track_name: "4567".to_string().into(),
                start_location: moq_transport::coding::Location::new(0, 0),
                end_location: moq_transport::coding::Location::new(2, 1),
            },
            KeyValuePairs::default(),
        )
        .await
        .unwrap();
    timeout(Duration::from_secs(5), fetch.ok())
        .await
        .unwrap()
        .unwrap();
    let mut groups = Vec::new();
    while let Some(record) = fetch.next().await.unwrap() {
        if let FetchRecord::Object(o) = record {
            while fetch.read_payload_chunk(4096).await.unwrap().is_some() {}
            groups.push(o.group_id);
        }
    }
    assert_eq!(groups, vec![0, 1, 2]);
    run.abort();
}
