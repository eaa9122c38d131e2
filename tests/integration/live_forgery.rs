//! Forged group events during a live call are counted for scripts (issue 11's accounting,
//! for `call join`): a hostile Nostr relay pushes forged kind-445 events for the group onto
//! a member's live subscription while two members are in a call; the member's status and
//! report count them (`group_events.dropped.invalid_signature`) and the call goes on.
//! Real `call` processes, the project's relay for the group and the call, and a hostile
//! relay of a few lines beside it (the project's relay refuses forged events, so only a
//! hostile one can deliver them).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::cli::relay_flags;
use crate::common::users::{create_and_join, User};
use crate::common::TestRelay;
use crate::group_hardening::{garbage, nostr_group_id};
use crate::listen::{event, Proc};
use nostr_sdk::prelude::*;
use serde_json::Value;

/// A relay that accepts every EVENT (`OK true`, stores nothing), answers every REQ with
/// EOSE at once and keeps it open, and sends each event pushed into it to every open
/// subscription it matches, as a hostile relay would.
struct HostileRelay {
    url: url::Url,
    push: tokio::sync::broadcast::Sender<Event>,
    /// Events sent to subscribers so far.
    delivered: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl HostileRelay {
    async fn start() -> Self {
        use futures::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = url::Url::parse(&format!("ws://{}", listener.local_addr().unwrap())).unwrap();
        let (push, _) = tokio::sync::broadcast::channel::<Event>(64);
        let delivered = Arc::new(AtomicUsize::new(0));
        let (tx, count) = (push.clone(), delivered.clone());
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (mut pushed, count) = (tx.subscribe(), count.clone());
                tokio::spawn(async move {
                    let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                        return;
                    };
                    let mut subs: Vec<(SubscriptionId, Vec<Filter>)> = Vec::new();
                    loop {
                        let reply = tokio::select! {
                            msg = ws.next() => {
                                let text = match msg {
                                    Some(Ok(Message::Text(text))) => text,
                                    Some(Ok(_)) => continue,
                                    _ => return,
                                };
                                match ClientMessage::from_json(text.as_str()) {
                                    Ok(ClientMessage::Req { subscription_id, filters }) => {
                                        let id = subscription_id.into_owned();
                                        subs.push((
                                            id.clone(),
                                            filters.into_iter().map(|f| f.into_owned()).collect(),
                                        ));
                                        vec![RelayMessage::eose(id)]
                                    }
                                    Ok(ClientMessage::Close(id)) => {
                                        subs.retain(|(s, _)| *s != *id);
                                        vec![]
                                    }
                                    Ok(ClientMessage::Event(e)) => {
                                        vec![RelayMessage::ok(e.id, true, "")]
                                    }
                                    _ => vec![],
                                }
                            }
                            forged = pushed.recv() => {
                                let forged = match forged {
                                    Ok(e) => e,
                                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                                    Err(_) => return,
                                };
                                subs.iter()
                                    .filter(|(_, fs)| {
                                        fs.iter().any(|f| f.match_event(&forged, MatchEventOptions::new()))
                                    })
                                    .map(|(id, _)| RelayMessage::event(id.clone(), forged.clone()))
                                    .collect()
                            }
                        };
                        for m in reply {
                            let is_event = matches!(m, RelayMessage::Event { .. });
                            if ws.send(Message::Text(m.as_json().into())).await.is_err() {
                                return;
                            }
                            if is_event {
                                count.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                });
            }
        });
        Self {
            url,
            push,
            delivered,
            task,
        }
    }
}

impl Drop for HostileRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn counted_forged(v: &Value) -> u64 {
    v["group_events"]["dropped"]["invalid_signature"]
        .as_u64()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_group_events_during_a_call_are_counted_and_the_call_goes_on() {
    let relay = TestRelay::start().await;
    let hostile = HostileRelay::start().await;
    let (a, b) = (
        User::new("forge-a", &[&relay.nostr_url]),
        User::new("forge-b", &[&relay.nostr_url]),
    );
    a.new_identity().await;
    let b_npub = b.new_identity().await;
    create_and_join("team", &a, &[(&b, &b_npub)]).await;
    let h = nostr_group_id(&a, "team").await;

    let mut a_proc = Proc::spawn(
        a.command()
            .args([
                "join",
                "team",
                "--new",
                "--ring-timeout",
                "0",
                "--seconds",
                "20",
            ])
            .args(["--source", "tone:440", "--sink", "null"])
            .args(relay_flags(&relay)),
    );
    a_proc.wait_json(false, Duration::from_secs(20), "A's call", |v| {
        event(v, "started")
    });
    // B reads the group from both relays; the hostile one is where forgeries come from.
    let both = format!(
        "{},{}",
        relay.nostr_url.as_str().trim_end_matches('/'),
        hostile.url.as_str().trim_end_matches('/')
    );
    let mut b_proc = Proc::spawn(
        b.command()
            .env("CALL_NOSTR_RELAYS", &both)
            .args(["join", "team", "--seconds", "12"])
            .args(["--source", "tone:660", "--sink", "null"])
            .args(relay_flags(&relay)),
    );
    b_proc.wait_json(false, Duration::from_secs(20), "B joining", |v| {
        event(v, "joined")
    });

    // The group's real events so far (A's offer among them): B's catch-up fetched and
    // verified each. Forged copies keep their ids and signatures over other content, and
    // are stamped now so that B's live subscription (`since` its start) matches them.
    let probe = Client::new(Keys::generate());
    probe.add_relay(relay.nostr_url.as_str()).await.unwrap();
    probe.connect().await;
    probe.wait_for_connection(Duration::from_secs(5)).await;
    let real = probe
        .fetch_events(
            Filter::new()
                .kind(Kind::MlsGroupMessage)
                .custom_tag(SingleLetterTag::lowercase(Alphabet::H), h.clone()),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    probe.disconnect().await;
    assert!(!real.is_empty(), "no group events on the relay");
    let mut forged: Vec<Event> = Vec::new();
    for (i, e) in real.iter().enumerate() {
        let mut copy = e.clone();
        copy.content = garbage(i);
        copy.created_at = Timestamp::now();
        assert!(copy.verify().is_err());
        forged.push(copy);
    }
    // And one with a fresh id and a flipped signature byte (nostr-sdk drops that one
    // itself; it must not disturb the call either).
    let mut bad_sig = EventBuilder::new(Kind::MlsGroupMessage, garbage(99))
        .tag(Tag::custom(TagKind::h(), [h.clone()]))
        .sign_with_keys(&Keys::generate())
        .unwrap();
    let mut sig = bad_sig.sig.serialize();
    sig[5] ^= 1;
    bad_sig.sig = Signature::from_slice(&sig).unwrap();
    forged.push(bad_sig);

    let deadline = Instant::now() + Duration::from_secs(10);
    while hostile.delivered.load(Ordering::Relaxed) == 0 {
        assert!(
            Instant::now() < deadline,
            "B never subscribed to the hostile relay"
        );
        for e in &forged {
            let _ = hostile.push.send(e.clone());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let pushed_at = Instant::now();

    // B's next status counts them (statuses come every 5 s), and frames keep coming.
    let (_, status) = b_proc.wait_json(false, Duration::from_secs(12), "B's count", |v| {
        event(v, "status") && counted_forged(v) >= 1
    });
    println!(
        "forged events delivered to B: {}; B's status {:.1} s later: {}",
        hostile.delivered.load(Ordering::Relaxed),
        pushed_at.elapsed().as_secs_f64(),
        status["group_events"]
    );
    let received_then = status["peers"][0]["received"].as_u64().unwrap_or(0);
    assert!(
        status["group_events"]["processed"].as_u64().unwrap() >= 1,
        "{status}"
    );

    let (code, rest) = b_proc.finish();
    assert_eq!(code, Some(0), "B: {rest:?}");
    let b_report: Value = serde_json::from_str(rest.last().unwrap()).unwrap();
    println!("B's report: {}", b_report["group_events"]);
    assert!(counted_forged(&b_report) >= 1, "{b_report}");
    assert!(
        counted_forged(&b_report) >= counted_forged(&status),
        "{b_report}"
    );
    let peer = &b_report["peers"][0];
    assert!(
        (peer["heard_hz"].as_f64().unwrap_or(0.0) - 440.0).abs() <= 3.0,
        "{b_report}"
    );
    // 20 ms frames: at least another second of A's audio after the count.
    assert!(
        peer["received"].as_u64().unwrap() >= received_then + 50,
        "the call stalled after the forgeries: {received_then} then {b_report}"
    );
    assert_eq!(peer["rejects"]["auth_failed"], 0, "{b_report}");

    let (code, rest) = a_proc.finish();
    assert_eq!(code, Some(0), "A: {rest:?}");
    let a_report: Value = serde_json::from_str(rest.last().unwrap()).unwrap();
    // A reads only the project's relay: nothing forged reached it.
    assert_eq!(counted_forged(&a_report), 0, "{a_report}");
    assert!(
        (a_report["peers"][0]["heard_hz"].as_f64().unwrap_or(0.0) - 660.0).abs() <= 3.0,
        "{a_report}"
    );
}
