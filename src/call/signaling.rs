//! Call signaling rumors (PROTOCOL.md §2): kind 450 offer, 451 answer, 454 state. They only
//! ever travel inside MLS application messages.

use nostr_sdk::prelude::{EventBuilder, Kind, Tag, TagKind, Tags};
use url::Url;

use crate::transport::Delivery;

pub const KIND_OFFER: Kind = Kind::Custom(450);
pub const KIND_ANSWER: Kind = Kind::Custom(451);
pub const KIND_STATE: Kind = Kind::Custom(454);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignalError {
    #[error("kind {0} is not a call message")]
    WrongKind(u16),
    #[error("missing tag `{0}`")]
    Missing(&'static str),
    #[error("tag `{tag}`: {why}")]
    Bad { tag: &'static str, why: String },
}

fn bad(tag: &'static str, why: impl std::fmt::Display) -> SignalError {
    SignalError::Bad {
        tag,
        why: why.to_string(),
    }
}

/// The values of the first tag named `name` (without the name itself).
fn values<'a>(tags: &'a Tags, name: &'static str) -> Result<&'a [String], SignalError> {
    tags.iter()
        .map(|t| t.as_slice())
        .find(|s| s.first().is_some_and(|n| n == name))
        .map(|s| &s[1..])
        .ok_or(SignalError::Missing(name))
}

fn value<'a>(tags: &'a Tags, name: &'static str, i: usize) -> Result<&'a str, SignalError> {
    values(tags, name)?
        .get(i)
        .map(String::as_str)
        .ok_or_else(|| bad(name, format!("value {} missing", i + 1)))
}

fn hex_array<const N: usize>(tag: &'static str, s: &str) -> Result<[u8; N], SignalError> {
    let bytes = hex::decode(s).map_err(|e| bad(tag, e))?;
    bytes
        .try_into()
        .map_err(|_| bad(tag, format!("expected {N} bytes")))
}

fn tag(name: &str, vals: &[&str]) -> Tag {
    Tag::custom(TagKind::custom(name), vals.iter().map(|s| s.to_string()))
}

/// A participant's media track: its MoQ track name and MLS leaf index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackRef {
    pub name: [u8; 8],
    pub leaf_index: u32,
}

impl TrackRef {
    pub fn name_hex(&self) -> String {
        hex::encode(self.name)
    }

    fn to_tag(&self) -> Tag {
        tag("track", &[&self.name_hex(), &self.leaf_index.to_string()])
    }

    fn from_tags(tags: &Tags) -> Result<Self, SignalError> {
        Ok(Self {
            name: hex_array("track", value(tags, "track", 0)?)?,
            leaf_index: value(tags, "track", 1)?
                .parse()
                .map_err(|e| bad("track", e))?,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Privacy {
    Standard,
    Enhanced,
}

/// Kind 450: everything a member needs to join the call's media.
#[derive(Clone, PartialEq, Eq)]
pub struct CallOffer {
    pub call_id: [u8; 32],
    pub moq_url: Url,
    pub namespace: [u8; 16],
    pub token: [u8; 32],
    pub track: TrackRef,
    pub frame_ms: u32,
    pub sender_bits: u32,
    pub privacy: Privacy,
    /// How every participant publishes its track (`delivery` tag; docs/protocol.md §2).
    pub delivery: Delivery,
}

impl std::fmt::Debug for CallOffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallOffer")
            .field("call_id", &hex::encode(self.call_id))
            .field("track", &self.track)
            .field("frame_ms", &self.frame_ms)
            .field("sender_bits", &self.sender_bits)
            .field("privacy", &self.privacy)
            .field("delivery", &self.delivery)
            .finish_non_exhaustive()
    }
}

impl CallOffer {
    pub fn namespace_hex(&self) -> String {
        hex::encode(self.namespace)
    }

    pub fn to_rumor(&self) -> EventBuilder {
        EventBuilder::new(KIND_OFFER, "").tags(self.tags())
    }

    fn tags(&self) -> Vec<Tag> {
        vec![
            tag("call_id", &[&hex::encode(self.call_id)]),
            tag("call_type", &["audio"]),
            tag("transport", &["moq"]),
            tag("moq", &[self.moq_url.as_str(), &self.namespace_hex()]),
            tag("token", &[&hex::encode(self.token)]),
            self.track.to_tag(),
            tag(
                "codec",
                &["audio/opus", "48000", "1", &self.frame_ms.to_string()],
            ),
            tag("sframe", &["0x0004", &self.sender_bits.to_string()]),
            tag(
                "privacy",
                &[match self.privacy {
                    Privacy::Standard => "standard",
                    Privacy::Enhanced => "enhanced",
                }],
            ),
            tag("delivery", &[self.delivery.as_str()]),
        ]
    }

    pub fn from_rumor(kind: Kind, tags: &Tags) -> Result<Self, SignalError> {
        if kind != KIND_OFFER {
            return Err(SignalError::WrongKind(kind.as_u16()));
        }
        Self::from_tags(tags)
    }

    /// The offer's tags, wherever they travel (a 450, or a 454 `call_info`).
    fn from_tags(tags: &Tags) -> Result<Self, SignalError> {
        let call_type = value(tags, "call_type", 0)?;
        if call_type != "audio" {
            return Err(bad("call_type", format!("unsupported `{call_type}`")));
        }
        let transport = value(tags, "transport", 0)?;
        if transport != "moq" {
            return Err(bad("transport", format!("unsupported `{transport}`")));
        }
        let codec = values(tags, "codec")?;
        if codec.len() < 4 || codec[0] != "audio/opus" || codec[1] != "48000" || codec[2] != "1" {
            return Err(bad("codec", "expected audio/opus 48000 1 <ms>"));
        }
        let frame_ms: u32 = codec[3].parse().map_err(|e| bad("codec", e))?;
        if frame_ms != 10 && frame_ms != 20 {
            return Err(bad("codec", format!("frame of {frame_ms} ms")));
        }
        if value(tags, "sframe", 0)? != "0x0004" {
            return Err(bad("sframe", "only cipher suite 0x0004 is supported"));
        }
        let sender_bits: u32 = value(tags, "sframe", 1)?
            .parse()
            .map_err(|e| bad("sframe", e))?;
        if !(4..=32).contains(&sender_bits) {
            return Err(bad("sframe", format!("{sender_bits} sender bits")));
        }
        let privacy = match values(tags, "privacy").ok().and_then(|v| v.first()) {
            None => Privacy::Standard,
            Some(p) if p == "standard" => Privacy::Standard,
            Some(p) if p == "enhanced" => Privacy::Enhanced,
            Some(p) => return Err(bad("privacy", format!("unknown `{p}`"))),
        };
        // An offer from a client that predates the tag is a stream call.
        let delivery = match values(tags, "delivery").ok().and_then(|v| v.first()) {
            None => Delivery::Stream,
            Some(d) => d
                .parse::<Delivery>()
                .map_err(|_| bad("delivery", format!("unknown `{d}`")))?,
        };
        let moq_url = Url::parse(value(tags, "moq", 0)?).map_err(|e| bad("moq", e))?;
        Ok(Self {
            call_id: hex_array("call_id", value(tags, "call_id", 0)?)?,
            moq_url,
            namespace: hex_array("moq", value(tags, "moq", 1)?)?,
            token: hex_array("token", value(tags, "token", 0)?)?,
            track: TrackRef::from_tags(tags)?,
            frame_ms,
            sender_bits,
            privacy,
            delivery,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerStatus {
    Accept,
    Decline,
    Busy,
}

/// Kind 451.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallAnswer {
    pub call_id: [u8; 32],
    pub status: AnswerStatus,
    pub reason: Option<String>,
    /// Present on `accept`.
    pub track: Option<TrackRef>,
}

impl CallAnswer {
    pub fn accept(call_id: [u8; 32], track: TrackRef) -> Self {
        Self {
            call_id,
            status: AnswerStatus::Accept,
            reason: None,
            track: Some(track),
        }
    }

    pub fn to_rumor(&self) -> EventBuilder {
        let status = match self.status {
            AnswerStatus::Accept => "accept",
            AnswerStatus::Decline => "decline",
            AnswerStatus::Busy => "busy",
        };
        let mut tags = vec![
            tag("call_id", &[&hex::encode(self.call_id)]),
            tag("status", &[status]),
        ];
        if let Some(r) = &self.reason {
            tags.push(tag("reason", &[r]));
        }
        if let Some(t) = &self.track {
            tags.push(t.to_tag());
        }
        EventBuilder::new(KIND_ANSWER, "").tags(tags)
    }

    pub fn from_rumor(kind: Kind, tags: &Tags) -> Result<Self, SignalError> {
        if kind != KIND_ANSWER {
            return Err(SignalError::WrongKind(kind.as_u16()));
        }
        let status = match value(tags, "status", 0)? {
            "accept" => AnswerStatus::Accept,
            "decline" => AnswerStatus::Decline,
            "busy" => AnswerStatus::Busy,
            other => return Err(bad("status", format!("unknown `{other}`"))),
        };
        let track = match status {
            AnswerStatus::Accept => Some(TrackRef::from_tags(tags)?),
            _ => None,
        };
        Ok(Self {
            call_id: hex_array("call_id", value(tags, "call_id", 0)?)?,
            status,
            reason: value(tags, "reason", 0).ok().map(str::to_string),
            track,
        })
    }
}

/// What a kind-454 call state message says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateAction {
    /// The sender left the call.
    Leave,
    /// The sender ended the call for everyone.
    End,
    /// The call re-announced for members added mid-call, with every participant's track.
    CallInfo {
        offer: Box<CallOffer>,
        participants: Vec<TrackRef>,
    },
    /// An action this client does not act on (mute, quality reports, …).
    Other(String),
}

/// Kind 454.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallState {
    pub call_id: [u8; 32],
    pub action: StateAction,
}

impl CallState {
    pub fn to_rumor(&self) -> EventBuilder {
        let call_id = hex::encode(self.call_id);
        match &self.action {
            StateAction::CallInfo {
                offer,
                participants,
            } => {
                // The offer's own tags, then one `participant` tag per current participant
                // (docs/protocol.md §2: a member added mid-call cannot read the answers).
                let mut tags = offer.tags();
                tags.push(tag("action", &["call_info"]));
                for p in participants {
                    tags.push(tag(
                        "participant",
                        &[&p.name_hex(), &p.leaf_index.to_string()],
                    ));
                }
                EventBuilder::new(KIND_STATE, "").tags(tags)
            }
            action => {
                let name = match action {
                    StateAction::Leave => "leave",
                    StateAction::End => "end",
                    StateAction::Other(other) => other.as_str(),
                    StateAction::CallInfo { .. } => unreachable!("handled above"),
                };
                EventBuilder::new(KIND_STATE, "")
                    .tags([tag("call_id", &[&call_id]), tag("action", &[name])])
            }
        }
    }

    pub fn from_rumor(kind: Kind, tags: &Tags) -> Result<Self, SignalError> {
        if kind != KIND_STATE {
            return Err(SignalError::WrongKind(kind.as_u16()));
        }
        let call_id = hex_array("call_id", value(tags, "call_id", 0)?)?;
        let action = match value(tags, "action", 0)? {
            "leave" => StateAction::Leave,
            "end" => StateAction::End,
            "call_info" => {
                let offer = CallOffer::from_tags(tags)?;
                let mut participants = Vec::new();
                for t in tags.iter().map(|t| t.as_slice()) {
                    if t.first().map(String::as_str) != Some("participant") {
                        continue;
                    }
                    let (Some(name), Some(leaf)) = (t.get(1), t.get(2)) else {
                        return Err(bad("participant", "expected <track hex> <leaf index>"));
                    };
                    participants.push(TrackRef {
                        name: hex_array("participant", name)?,
                        leaf_index: leaf.parse().map_err(|e| bad("participant", e))?,
                    });
                }
                StateAction::CallInfo {
                    offer: Box::new(offer),
                    participants,
                }
            }
            other => StateAction::Other(other.to_string()),
        };
        Ok(Self { call_id, action })
    }
}

#[cfg(test)]
impl CallOffer {
    /// An offer for unit tests: call id `[id; 32]`, fixed other fields.
    pub(crate) fn sample(id: u8) -> Self {
        Self {
            call_id: [id; 32],
            moq_url: Url::parse("moqt://127.0.0.1:4443").unwrap(),
            namespace: [2; 16],
            token: [3; 32],
            track: TrackRef {
                name: [4; 8],
                leaf_index: 0,
            },
            frame_ms: 20,
            sender_bits: 4,
            privacy: Privacy::Standard,
            delivery: Delivery::Stream,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nostr_sdk::prelude::Keys;

    fn offer() -> CallOffer {
        CallOffer::sample(1)
    }

    #[test]
    fn offer_round_trips() {
        let rumor = offer().to_rumor().build(Keys::generate().public_key());
        assert_eq!(
            CallOffer::from_rumor(rumor.kind, &rumor.tags).unwrap(),
            offer()
        );
        let datagram = CallOffer {
            delivery: Delivery::Datagram,
            ..offer()
        };
        let rumor = datagram.to_rumor().build(Keys::generate().public_key());
        assert_eq!(
            CallOffer::from_rumor(rumor.kind, &rumor.tags).unwrap(),
            datagram
        );
    }

    #[test]
    fn the_delivery_tag_defaults_to_stream_and_refuses_unknown_values() {
        let good = offer().to_rumor().build(Keys::generate().public_key());
        let with = |value: Option<&str>| -> Tags {
            let mut tags: Vec<Tag> = good
                .tags
                .iter()
                .filter(|t| t.as_slice()[0] != "delivery")
                .cloned()
                .collect();
            if let Some(v) = value {
                tags.push(tag("delivery", &[v]));
            }
            Tags::from_list(tags)
        };
        // An offer from a client without the tag: a stream call.
        let old = CallOffer::from_rumor(KIND_OFFER, &with(None)).unwrap();
        assert_eq!(old.delivery, Delivery::Stream);
        let dgram = CallOffer::from_rumor(KIND_OFFER, &with(Some("datagram"))).unwrap();
        assert_eq!(dgram.delivery, Delivery::Datagram);
        match CallOffer::from_rumor(KIND_OFFER, &with(Some("carrier-pigeon"))) {
            Err(SignalError::Bad {
                tag: "delivery",
                why,
            }) => {
                assert!(why.contains("carrier-pigeon"), "{why}")
            }
            other => panic!("an unknown delivery was not refused: {other:?}"),
        }
    }

    #[test]
    fn answer_round_trips() {
        let a = CallAnswer::accept(
            [9; 32],
            TrackRef {
                name: [7; 8],
                leaf_index: 5,
            },
        );
        let rumor = a.to_rumor().build(Keys::generate().public_key());
        assert_eq!(CallAnswer::from_rumor(rumor.kind, &rumor.tags).unwrap(), a);
    }

    #[test]
    fn call_states_round_trip_and_unknown_actions_are_kept_as_such() {
        let pk = Keys::generate().public_key();
        let participants = vec![
            TrackRef {
                name: [4; 8],
                leaf_index: 0,
            },
            TrackRef {
                name: [5; 8],
                leaf_index: 2,
            },
        ];
        for action in [
            StateAction::Leave,
            StateAction::End,
            StateAction::Other("mute_audio".into()),
            StateAction::CallInfo {
                offer: Box::new(offer()),
                participants: participants.clone(),
            },
        ] {
            let state = CallState {
                call_id: [1; 32],
                action,
            };
            let rumor = state.to_rumor().build(pk);
            assert_eq!(
                CallState::from_rumor(rumor.kind, &rumor.tags).unwrap(),
                state
            );
        }
        let bad_info = Tags::from_list(vec![
            tag("call_id", &[&hex::encode([1u8; 32])]),
            tag("action", &["call_info"]),
        ]);
        assert!(CallState::from_rumor(KIND_STATE, &bad_info).is_err());
    }

    #[test]
    fn mangled_signaling_is_rejected_or_parsed_never_a_panic() {
        use rand::{Rng, SeedableRng};
        let pk = Keys::generate().public_key();
        let info = CallState {
            call_id: [1; 32],
            action: StateAction::CallInfo {
                offer: Box::new(offer()),
                participants: vec![offer().track],
            },
        };
        let answer = CallAnswer::accept([9; 32], offer().track);
        let samples: Vec<(Kind, Vec<Vec<String>>)> =
            [offer().to_rumor(), answer.to_rumor(), info.to_rumor()]
                .into_iter()
                .map(|b| {
                    let r = b.build(pk);
                    (
                        r.kind,
                        r.tags.iter().map(|t| t.as_slice().to_vec()).collect(),
                    )
                })
                .collect();
        let junk = [
            "",
            "-1",
            "0x",
            "zz",
            "18446744073709551616",
            "ünï",
            "moqt://",
            "0004",
        ];
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let (mut accepted, mut rejected) = (0, 0);
        for _ in 0..5000 {
            let (kind, tags) = &samples[rng.gen_range(0..samples.len())];
            let mut tags = tags.clone();
            for _ in 0..rng.gen_range(1..4) {
                let i = rng.gen_range(0..tags.len());
                match rng.gen_range(0..4) {
                    0 => {
                        tags.remove(i);
                        if tags.is_empty() {
                            break;
                        }
                    }
                    1 => {
                        let j = rng.gen_range(0..tags[i].len());
                        tags[i][j] = junk[rng.gen_range(0..junk.len())].to_string();
                    }
                    2 => {
                        let keep = rng.gen_range(1..=tags[i].len());
                        tags[i].truncate(keep);
                    }
                    _ => tags.push(tags[i].clone()),
                }
            }
            let list: Vec<Tag> = tags
                .iter()
                .filter(|t| !t.is_empty())
                .filter_map(|t| Tag::parse(t.clone()).ok())
                .collect();
            let tags = Tags::from_list(list);
            let parsed = [
                CallOffer::from_rumor(*kind, &tags).is_ok(),
                CallAnswer::from_rumor(*kind, &tags).is_ok(),
                CallState::from_rumor(*kind, &tags).is_ok(),
            ];
            // Each kind parses as itself at most.
            assert!(parsed.iter().filter(|p| **p).count() <= 1);
            if parsed.contains(&true) {
                accepted += 1;
            } else {
                rejected += 1;
            }
        }
        // The mangling reached both outcomes: unknown tags are ignored, broken ones refused.
        assert!(
            rejected > 1000 && accepted > 100,
            "{rejected} rejected, {accepted} accepted"
        );
    }

    #[test]
    fn malformed_offers_are_rejected_with_a_reason() {
        let pk = Keys::generate().public_key();
        let good = offer().to_rumor().build(pk);
        let without = |name: &str| -> Tags {
            Tags::from_list(
                good.tags
                    .iter()
                    .filter(|t| t.as_slice()[0] != name)
                    .cloned()
                    .collect(),
            )
        };
        assert_eq!(
            CallOffer::from_rumor(KIND_OFFER, &without("token")),
            Err(SignalError::Missing("token"))
        );
        let mut tags: Vec<Tag> = without("call_id").to_vec();
        tags.push(tag("call_id", &["zz"]));
        assert!(matches!(
            CallOffer::from_rumor(KIND_OFFER, &Tags::from_list(tags)),
            Err(SignalError::Bad { tag: "call_id", .. })
        ));
        assert_eq!(
            CallOffer::from_rumor(KIND_ANSWER, &good.tags),
            Err(SignalError::WrongKind(451))
        );
    }
}
