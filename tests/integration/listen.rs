//! Liveness and ringing between real `call` processes on one TestRelay: a participant
//! killed with SIGKILL is dropped by the others and its dead call is not joined; a
//! `call listen --answer` bot answers calls started by `call join`; `--decline`/`--busy`
//! reach the caller.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use crate::common::cli::relay_flags;
use crate::common::users::{create_and_join, User};
use crate::common::TestRelay;
use serde_json::Value;

/// A running `call` process whose stdout and stderr lines arrive, with the time they were
/// read, on two channels.
pub(crate) struct Proc {
    child: Child,
    out: Receiver<(Instant, String)>,
    err: Receiver<(Instant, String)>,
    /// Every line seen so far by `wait_*` (for failure messages).
    seen: Vec<String>,
}

impl Proc {
    pub(crate) fn spawn(cmd: &mut Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pipe = |r: Box<dyn std::io::Read + Send>| {
            let (tx, rx) = channel();
            std::thread::spawn(move || {
                for line in BufReader::new(r).lines().map_while(Result::ok) {
                    if tx.send((Instant::now(), line)).is_err() {
                        break;
                    }
                }
            });
            rx
        };
        let out = pipe(Box::new(child.stdout.take().unwrap()));
        let err = pipe(Box::new(child.stderr.take().unwrap()));
        Self {
            child,
            out,
            err,
            seen: Vec::new(),
        }
    }

    /// The first JSON line on stdout (`stdout`) or stderr for which `pred` holds, and when it
    /// was read; panics after `limit`.
    pub(crate) fn wait_json(
        &mut self,
        stdout: bool,
        limit: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> (Instant, Value) {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let rx = if stdout { &self.out } else { &self.err };
            match rx.recv_timeout(left) {
                Ok((at, line)) => {
                    self.seen.push(line.clone());
                    if let Ok(v) = serde_json::from_str::<Value>(&line) {
                        if pred(&v) {
                            return (at, v);
                        }
                    }
                }
                Err(_) => panic!(
                    "no {what} within {limit:?}; seen:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    pub(crate) fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Waits for the exit; returns the code and the remaining stdout lines.
    pub(crate) fn finish(mut self) -> (Option<i32>, Vec<String>) {
        let status = self.child.wait().unwrap();
        let rest: Vec<String> = self.out.iter().map(|(_, l)| l).collect();
        (status.code(), rest)
    }

    /// [`Proc::finish`], with the stderr lines not read by `wait_json` as well.
    fn finish_with_stderr(mut self) -> (Option<i32>, Vec<String>, Vec<String>) {
        let status = self.child.wait().unwrap();
        let rest: Vec<String> = self.out.iter().map(|(_, l)| l).collect();
        let err: Vec<String> = self.err.iter().map(|(_, l)| l).collect();
        (status.code(), rest, err)
    }
}

/// A test that fails midway must not leave a `call listen` (which never ends by itself)
/// behind: the process goes with its `Proc`.
impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `user`'s `call listen --answer` bot (tone 660 Hz in, nothing out), once it listens;
/// with its `listening` event.
fn answering_bot(user: &User, relay: &TestRelay) -> (Proc, Value) {
    let mut bot = Proc::spawn(
        user.command()
            .args([
                "listen", "--answer", "--source", "tone:660", "--sink", "null",
            ])
            .args(relay_flags(relay)),
    );
    let (_, listening) = bot.wait_json(true, Duration::from_secs(20), "listening", |v| {
        event(v, "listening")
    });
    (bot, listening)
}

pub(crate) fn event(v: &Value, name: &str) -> bool {
    v["event"] == name
}

/// The whole report of `call join --json` (stdout).
fn join_report(out: &std::process::Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_participant_is_dropped_and_its_dead_call_is_not_joined() {
    let relay = TestRelay::start().await;
    let (a, b, c) = (
        User::new("live-a", &[&relay.nostr_url]),
        User::new("live-b", &[&relay.nostr_url]),
        User::new("live-c", &[&relay.nostr_url]),
    );
    a.new_identity().await;
    let b_npub = b.new_identity().await;
    let c_npub = c.new_identity().await;
    create_and_join("crew", &a, &[(&b, &b_npub), (&c, &c_npub)]).await;

    let mut a_proc = Proc::spawn(
        a.command()
            .args(["join", "crew", "--new", "--ring-timeout", "0"])
            .args(["--source", "tone:440", "--sink", "null"])
            .args(relay_flags(&relay)),
    );
    let (_, started) = a_proc.wait_json(false, Duration::from_secs(20), "A's call", |v| {
        event(v, "started")
    });
    let call_id = started["call_id"].as_str().unwrap().to_string();
    let mut b_proc = Proc::spawn(
        b.command()
            .args(["join", "crew", "--source", "tone:660", "--sink", "null"])
            .args(relay_flags(&relay)),
    );
    b_proc.wait_json(false, Duration::from_secs(20), "B joining", |v| {
        event(v, "joined") && v["call_id"] == call_id.as_str()
    });
    a_proc.wait_json(false, Duration::from_secs(10), "B in A's call", |v| {
        event(v, "peer_joined")
    });

    // While both send, the relay shows the call alive.
    let t = Instant::now();
    let calls = c
        .ok(&["calls", "crew", "--moq-fingerprint", &relay.fingerprint])
        .await;
    let alive_ms = t.elapsed().as_secs_f64() * 1000.0;
    let t = Instant::now();
    c.ok(&["calls", "crew", "--no-probe"]).await;
    println!(
        "`call calls`: {alive_ms:.0} ms probing a live call, {:.0} ms without probing",
        t.elapsed().as_secs_f64() * 1000.0
    );
    assert_eq!(calls["calls"][0]["id"], call_id.as_str(), "{calls}");
    assert_eq!(calls["calls"][0]["state"], "running", "{calls}");

    // B crashes: no `leave` is ever sent. A shows it lost, then drops it within 15 s.
    b_proc.signal("-KILL");
    let killed = Instant::now();
    let (lost_at, _) = a_proc.wait_json(false, Duration::from_secs(15), "peer_lost", |v| {
        event(v, "peer_lost") && v["npub"] == b_npub.as_str()
    });
    let (left_at, left) = a_proc.wait_json(false, Duration::from_secs(15), "peer_left", |v| {
        event(v, "peer_left") && v["npub"] == b_npub.as_str()
    });
    assert_eq!(left["why"], "lost", "{left}");
    let dropped_after = left_at.duration_since(killed);
    println!(
        "B SIGKILLed: lost after {:.1} s, dropped after {:.1} s",
        lost_at.duration_since(killed).as_secs_f64(),
        dropped_after.as_secs_f64()
    );
    assert!(
        dropped_after <= Duration::from_secs(15),
        "{dropped_after:?}"
    );
    let _ = b_proc.finish();

    // A crashes too: the signaling still says A and B are in the call, but nobody is.
    a_proc.signal("-KILL");
    let _ = a_proc.finish();
    let t = Instant::now();
    let calls = c
        .ok(&["calls", "crew", "--moq-fingerprint", &relay.fingerprint])
        .await;
    println!(
        "`call calls`: {:.0} ms probing a dead call",
        t.elapsed().as_secs_f64() * 1000.0
    );
    assert_eq!(calls["calls"][0]["id"], call_id.as_str(), "{calls}");
    assert_eq!(
        calls["calls"][0]["participants"].as_array().unwrap().len(),
        2,
        "nobody said leave: {calls}"
    );
    assert_eq!(calls["calls"][0]["state"], "dead", "{calls}");
    let no_probe = c.ok(&["calls", "crew", "--no-probe"]).await;
    assert_eq!(no_probe["calls"][0]["state"], "running", "{no_probe}");

    // `call join` without --call does not walk into it: it starts a call of its own
    // (which nobody answers: exit 3).
    let joined_at = Instant::now();
    let out = c
        .run(&[
            "join",
            "crew",
            "--source",
            "silence",
            "--sink",
            "null",
            "--ring-timeout",
            "1",
            "--moq-relay",
            relay.moq_url.as_str(),
            "--moq-fingerprint",
            &relay.fingerprint,
        ])
        .await;
    let report = join_report(&out);
    println!(
        "join past a dead call: {:.1} s in all (1 s of it ringing)",
        joined_at.elapsed().as_secs_f64()
    );
    assert_eq!(out.status.code(), Some(3), "{report}");
    assert_eq!(report["started"], true, "{report}");
    assert_ne!(report["call_id"], call_id.as_str(), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listening_bot_answers_calls_and_both_sides_hear_each_other() {
    let relay = TestRelay::start().await;
    let (a, b) = (
        User::new("ring-a", &[&relay.nostr_url]),
        User::new("ring-b", &[&relay.nostr_url]),
    );
    let a_npub = a.new_identity().await;
    let b_npub = b.new_identity().await;
    create_and_join("desk", &a, &[(&b, &b_npub)]).await;

    let (mut bot, listening) = answering_bot(&b, &relay);
    assert_eq!(listening["groups"], serde_json::json!(["desk"]));
    assert!(listening["ts"].as_f64().unwrap() > 1.0e9, "{listening}");

    for (round, seconds) in [(1, "4"), (2, "3")] {
        let mut caller = Proc::spawn(
            a.command()
                .args(["join", "desk", "--new", "--seconds", seconds])
                .args(["--source", "tone:440", "--sink", "null"])
                .args(relay_flags(&relay)),
        );
        let (offered_at, started) =
            caller.wait_json(false, Duration::from_secs(20), "started", |v| {
                event(v, "started")
            });
        let call_id = started["call_id"].as_str().unwrap().to_string();
        let (_, ringing) = bot.wait_json(true, Duration::from_secs(10), "ringing", |v| {
            event(v, "ringing")
        });
        assert_eq!(ringing["call_id"], call_id.as_str());
        assert_eq!(ringing["caller"], a_npub.as_str());
        assert_eq!(ringing["group"], "desk");
        let (answered_at, answered) = bot.wait_json(true, Duration::from_secs(10), "answer", |v| {
            event(v, "answered")
        });
        assert_eq!(answered["status"], "accept");
        println!(
            "round {round}: caller's offer out → bot answered {:.0} ms (bot: ringing → accept queued {:.0} ms)",
            answered_at.duration_since(offered_at).as_secs_f64() * 1000.0,
            answered["after_ms"].as_f64().unwrap()
        );
        let (_, ended) = bot.wait_json(true, Duration::from_secs(30), "call_ended", |v| {
            event(v, "call_ended")
        });
        let (code, rest) = caller.finish();
        assert_eq!(code, Some(0), "caller: {rest:?}");
        let caller_report: Value = serde_json::from_str(rest.last().unwrap()).unwrap();

        let bot_report = &ended["report"];
        println!("round {round}: caller {caller_report}\nbot {bot_report}");
        assert_eq!(bot_report["call_id"], call_id.as_str());
        assert_eq!(bot_report["started"], false);
        assert_eq!(
            bot_report["ended_by"], "alone",
            "the caller left: {bot_report}"
        );
        let heard = |r: &Value| r["peers"][0]["heard_hz"].as_f64().unwrap_or(0.0);
        let received = |r: &Value| r["peers"][0]["received"].as_u64().unwrap_or(0);
        assert!((heard(bot_report) - 440.0).abs() <= 3.0, "{bot_report}");
        assert!(
            (heard(&caller_report) - 660.0).abs() <= 3.0,
            "{caller_report}"
        );
        assert!(received(bot_report) >= 75, "{bot_report}");
        assert!(received(&caller_report) >= 75, "{caller_report}");
        assert_eq!(caller_report["peers"][0]["rejects"]["auth_failed"], 0);
    }

    // SIGTERM: a clean stop, reported as such.
    bot.signal("-TERM");
    let (_, stopped) = bot.wait_json(true, Duration::from_secs(10), "stopped", |v| {
        event(v, "stopped")
    });
    assert_eq!(stopped["reason"], "stopped");
    let (code, _) = bot.finish();
    assert_eq!(code, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decline_and_busy_from_a_listener_reach_the_caller() {
    let relay = TestRelay::start().await;
    let (a, b) = (
        User::new("decl-a", &[&relay.nostr_url]),
        User::new("decl-b", &[&relay.nostr_url]),
    );
    a.new_identity().await;
    let b_npub = b.new_identity().await;
    create_and_join("desk", &a, &[(&b, &b_npub)]).await;

    for (flag, status) in [("--decline", "decline"), ("--busy", "busy")] {
        let mut listener = Proc::spawn(
            b.command()
                .args(["listen", "desk", flag, "--reason", "not now"])
                .args(relay_flags(&relay)),
        );
        listener.wait_json(true, Duration::from_secs(20), "listening", |v| {
            event(v, "listening")
        });
        let mut caller = Proc::spawn(
            a.command()
                .args(["join", "desk", "--new", "--ring-timeout", "3"])
                .args(["--source", "silence", "--sink", "null"])
                .args(relay_flags(&relay)),
        );
        let (_, said) = caller.wait_json(false, Duration::from_secs(20), "the answer", |v| {
            event(v, "peer_declined")
        });
        assert_eq!(said["npub"], b_npub.as_str(), "{said}");
        assert_eq!(said["status"], status, "{said}");
        assert_eq!(said["reason"], "not now", "{said}");
        let (_, answered) = listener.wait_json(true, Duration::from_secs(5), "answered", |v| {
            event(v, "answered")
        });
        assert_eq!(answered["status"], status);
        let (code, _) = caller.finish();
        assert_eq!(code, Some(3), "nobody accepted: exit 3");

        listener.signal("-TERM");
        let (code, rest) = listener.finish();
        assert_eq!(code, Some(0));
        // Every stdout line of the listener is one JSON object with a timestamp.
        for line in listener_lines(&rest) {
            let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
            assert!(v["ts"].is_number(), "{line}");
        }
    }
}

/// The bot's call with A ends when A leaves (exit 0), A's 440 Hz heard; then the bot is
/// stopped, and C's call (`c_call`, over by then) never rang on it. Returns `call_ended`.
fn bot_call_ends_and_c_never_rings(mut bot: Proc, a_proc: Proc, c_call: &str) -> Value {
    let (_, ended) = bot.wait_json(true, Duration::from_secs(30), "call_ended", |v| {
        event(v, "call_ended")
    });
    let heard = ended["report"]["peers"][0]["heard_hz"]
        .as_f64()
        .unwrap_or(0.0);
    assert!((heard - 440.0).abs() <= 3.0, "{ended}");
    let (code, _) = a_proc.finish();
    assert_eq!(code, Some(0));
    bot.signal("-TERM");
    let (code, rest) = bot.finish();
    assert_eq!(code, Some(0));
    assert!(
        !listener_lines(&rest).any(|l| l.contains(r#""event":"ringing""#) && l.contains(c_call)),
        "C's call rang after the bot's call: {rest:?}"
    );
    ended
}

/// C starts a call in `group` while the listening bot (B, `b_npub`) is in a call: C is told
/// `busy` ("in another call") at once, the bot reports the call missed (`in_call`) and
/// answered busy, and C's call ends unaccepted (exit 3). Returns C's call id.
fn second_call_told_busy(
    c: &User,
    relay: &TestRelay,
    group: &str,
    bot: &mut Proc,
    b_npub: &str,
) -> String {
    let mut c_proc = Proc::spawn(
        c.command()
            .args(["join", group, "--new", "--ring-timeout", "6"])
            .args(["--source", "silence", "--sink", "null"])
            .args(relay_flags(relay)),
    );
    let (offered_at, started) = c_proc.wait_json(false, Duration::from_secs(20), "C's call", |v| {
        event(v, "started")
    });
    let c_call = started["call_id"].as_str().unwrap().to_string();
    let (told_at, said) = c_proc.wait_json(false, Duration::from_secs(10), "C told busy", |v| {
        event(v, "peer_declined")
    });
    println!(
        "C's offer in {group} out → busy from the listener in a call: {:.0} ms",
        told_at.duration_since(offered_at).as_secs_f64() * 1000.0
    );
    assert_eq!(said["npub"], b_npub, "{said}");
    assert_eq!(said["status"], "busy", "{said}");
    assert_eq!(said["reason"], "in another call", "{said}");
    let (_, missed) = bot.wait_json(true, Duration::from_secs(5), "missed in_call", |v| {
        event(v, "missed")
    });
    assert_eq!(missed["reason"], "in_call", "{missed}");
    assert_eq!(missed["group"], group, "{missed}");
    assert_eq!(missed["call_id"], c_call.as_str(), "{missed}");
    let (_, busy) = bot.wait_json(true, Duration::from_secs(5), "answered busy", |v| {
        event(v, "answered")
    });
    assert_eq!(busy["status"], "busy", "{busy}");
    assert_eq!(busy["call_id"], c_call.as_str(), "{busy}");
    let (code, _) = c_proc.finish();
    assert_eq!(code, Some(3), "nobody accepted C's call");
    c_call
}

fn listener_lines(rest: &[String]) -> impl Iterator<Item = &str> {
    rest.iter()
        .map(String::as_str)
        .filter(|l| !l.trim().is_empty())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_in_a_call_answers_busy_to_a_call_in_another_group() {
    let relay = TestRelay::start().await;
    let (a, b, c) = (
        User::new("inbusy-a", &[&relay.nostr_url]),
        User::new("inbusy-b", &[&relay.nostr_url]),
        User::new("inbusy-c", &[&relay.nostr_url]),
    );
    a.new_identity().await;
    let b_npub = b.new_identity().await;
    c.new_identity().await;
    create_and_join("desk", &a, &[(&b, &b_npub)]).await;
    create_and_join("side", &c, &[(&b, &b_npub)]).await;

    let (mut bot, listening) = answering_bot(&b, &relay);
    assert_eq!(
        listening["groups"].as_array().unwrap().len(),
        2,
        "{listening}"
    );

    // A calls in `desk`; the bot takes it.
    let a_proc = Proc::spawn(
        a.command()
            .args(["join", "desk", "--new", "--seconds", "15"])
            .args(["--source", "tone:440", "--sink", "null"])
            .args(relay_flags(&relay)),
    );
    bot.wait_json(true, Duration::from_secs(20), "the bot answering A", |v| {
        event(v, "answered") && v["status"] == "accept" && v["group"] == "desk"
    });

    // C calls in `side` meanwhile: told busy at once (it still rings out its 6 s: a caller
    // waits for every member).
    let c_call = second_call_told_busy(&c, &relay, "side", &mut bot, &b_npub);

    // The bot's call with A was not disturbed: it ends when A leaves, heard both ways.
    let ended = bot_call_ends_and_c_never_rings(bot, a_proc, &c_call);
    assert_eq!(ended["group"], "desk", "{ended}");
}

/// docs/protocol.md, Ringing: a second call started in the group of the call the listener
/// is in is answered `busy` too (it cannot be in two calls), and its own call goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_in_a_call_answers_busy_to_a_second_call_in_the_same_group() {
    let relay = TestRelay::start().await;
    let (a, b, c) = (
        User::new("samebusy-a", &[&relay.nostr_url]),
        User::new("samebusy-b", &[&relay.nostr_url]),
        User::new("samebusy-c", &[&relay.nostr_url]),
    );
    a.new_identity().await;
    let b_npub = b.new_identity().await;
    let c_npub = c.new_identity().await;
    create_and_join("desk", &a, &[(&b, &b_npub), (&c, &c_npub)]).await;

    let (mut bot, _) = answering_bot(&b, &relay);
    // A calls; the bot takes it.
    let a_proc = Proc::spawn(
        a.command()
            .args(["join", "desk", "--new", "--seconds", "15"])
            .args(["--source", "tone:440", "--sink", "null"])
            .args(relay_flags(&relay)),
    );
    let (_, answered) = bot.wait_json(true, Duration::from_secs(20), "the bot answering A", |v| {
        event(v, "answered") && v["status"] == "accept"
    });
    let a_call = answered["call_id"].as_str().unwrap().to_string();

    // C starts a second call in the same group meanwhile: told busy at once.
    let c_call = second_call_told_busy(&c, &relay, "desk", &mut bot, &b_npub);
    assert_ne!(c_call, a_call);

    // The bot's call with A was not disturbed.
    let ended = bot_call_ends_and_c_never_rings(bot, a_proc, &c_call);
    assert_eq!(ended["call_id"], a_call.as_str(), "{ended}");
    assert_eq!(ended["report"]["ended_by"], "alone", "{ended}");
}

/// An offer stamped before the listener subscribed but reaching the relay after its
/// catch-up (the caller's clock a few seconds behind ours, or a slow publish) rings at
/// once: the listener's subscription starts at its catch-up cursor, not at the moment it
/// was opened (which let such an offer wait for the next catch-up, after some later call).
/// Events the subscription repeats from the catch-up are processed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offer_stamped_before_the_listener_subscribed_rings_at_once() {
    use call::call::signaling::{CallOffer, Privacy, TrackRef};
    use nostr_sdk::prelude::{Client, EventBuilder, Keys, Kind, Timestamp};

    let relay = TestRelay::start().await;
    let (a, b) = (
        User::new("early-a", &[&relay.nostr_url]),
        User::new("early-b", &[&relay.nostr_url]),
    );
    let a_npub = a.new_identity().await;
    let b_npub = b.new_identity().await;
    create_and_join("desk", &a, &[(&b, &b_npub)]).await;

    // A message moves B's catch-up cursor to its second.
    let (_home, am) = a.open_member(&relay.nostr_url).await;
    let g = crate::common::users::group_ref(&am, "desk");
    am.send_rumor(&g, EventBuilder::new(Kind::Custom(9), "hello"))
        .await
        .unwrap();
    let synced = b.ok(&["sync"]).await;
    assert_eq!(synced["groups"][0]["messages"][0]["content"], "hello");
    let cursor = crate::group_hardening::sync_cursor_at(&b);
    // The listener subscribes a few seconds after that second.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut listener = Proc::spawn(
        b.command()
            .args(["listen", "desk"])
            .args(relay_flags(&relay)),
    );
    listener.wait_json(true, Duration::from_secs(20), "listening", |v| {
        event(v, "listening")
    });

    // A's offer, stamped one second after the cursor: before the listener subscribed.
    let stamp = Timestamp::from(cursor + 1);
    assert!(stamp.as_secs() + 2 <= Timestamp::now().as_secs());
    let offer = CallOffer {
        call_id: rand::random(),
        moq_url: relay.moq_url.clone(),
        namespace: rand::random(),
        token: rand::random(),
        track: TrackRef {
            name: rand::random(),
            leaf_index: 0,
        },
        frame_ms: 20,
        sender_bits: 4,
        privacy: Privacy::Standard,
        delivery: Default::default(),
    };
    let rumor = offer
        .to_rumor()
        .custom_created_at(stamp)
        .build(am.public_key());
    let sealed = am
        .mdk()
        .create_message(&g.mls_group_id, rumor, None)
        .unwrap();
    // MDK stamps its event now; the same content and tags, re-signed by another ephemeral
    // key (MLS does not look at the outer signature), stamped as a slow clock would.
    let late = EventBuilder::new(sealed.kind, sealed.content.clone())
        .tags(sealed.tags.iter().cloned())
        .custom_created_at(stamp)
        .sign_with_keys(&Keys::generate())
        .unwrap();
    am.disconnect().await;
    let publisher = Client::new(Keys::generate());
    publisher.add_relay(relay.nostr_url.as_str()).await.unwrap();
    publisher.connect().await;
    publisher.wait_for_connection(Duration::from_secs(5)).await;
    let sent = publisher.send_event(&late).await.unwrap();
    assert!(!sent.success.is_empty(), "{:?}", sent.failed);
    let sent_at = Instant::now();
    publisher.disconnect().await;

    let call_id = hex::encode(offer.call_id);
    let (rang_at, ringing) = listener.wait_json(true, Duration::from_secs(10), "ringing", |v| {
        event(v, "ringing")
    });
    println!(
        "offer stamped {} s before it was sent → ringing after {:.0} ms",
        Timestamp::now().as_secs() - stamp.as_secs(),
        rang_at.duration_since(sent_at).as_secs_f64() * 1000.0
    );
    assert_eq!(ringing["call_id"], call_id.as_str(), "{ringing}");
    assert_eq!(ringing["caller"], a_npub.as_str(), "{ringing}");
    assert_eq!(ringing["group"], "desk", "{ringing}");

    listener.signal("-TERM");
    let seen = listener.seen.clone();
    let (code, rest, stderr) = listener.finish_with_stderr();
    assert_eq!(code, Some(0), "{rest:?} {stderr:?}");
    let rang = seen
        .iter()
        .chain(&rest)
        .filter(|l| l.contains(r#""event":"ringing""#))
        .count();
    assert_eq!(rang, 1, "{seen:?} {rest:?}");
    // Nothing was processed twice: MLS would have refused the repeat with an error log.
    let errors: Vec<String> = listener_stderr_errors(&stderr);
    assert!(errors.is_empty(), "{errors:?}");
}

/// Error-level log lines among `lines` (stderr lines are JSON `log` objects).
fn listener_stderr_errors(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .filter(|l| l.contains(r#""event":"log""#) && l.contains(r#""level":"error""#))
        .cloned()
        .collect()
}
