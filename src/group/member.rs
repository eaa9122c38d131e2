use std::collections::BTreeMap;
use std::time::Duration;

use mdk_core::prelude::*;
use mdk_storage_traits::MdkStorageProvider;
use nostr_sdk::prelude::*;
use openmls::prelude::OpenMlsProvider;

/// Kind of the addressable key package event (MIP-00); nostr 0.44 has no variant for it.
pub const KIND_KEY_PACKAGE: Kind = Kind::Custom(30443);
/// How far back gift wraps may be dated (NIP-59 randomises `created_at` up to 2 days).
pub(super) const GIFT_WRAP_LOOKBACK: Duration = Duration::from_secs(2 * 24 * 3600 + 3600);
/// Wait between attempts to reconnect to a Nostr relay that went away. nostr-sdk's default
/// (10 s, growing with every failure the client ever had, ±3 s jitter, at most 60 s) left
/// signaling dead for ~10 s after a relay restart. Fixed instead (see docs/protocol.md §1,
/// Relay reconnects): one TCP connection attempt a second per relay that is down.
pub const NOSTR_RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// How every Nostr relay connection is made: as nostr-sdk's client would (default
/// `ClientOptions`), but reconnecting every [`NOSTR_RETRY_INTERVAL`].
fn relay_options() -> RelayOptions {
    RelayOptions::new()
        .retry_interval(NOSTR_RETRY_INTERVAL)
        .adjust_retry_interval(false)
}

#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    #[error("mdk: {0}")]
    Mdk(#[from] mdk_core::Error),
    #[error("nostr client: {0}")]
    Client(#[from] nostr_sdk::client::Error),
    #[error("nostr event: {0}")]
    Event(#[from] nostr_sdk::event::builder::Error),
    #[error("gift wrap: {0}")]
    GiftWrap(String),
    #[error("no key package published by {0}")]
    NoKeyPackage(PublicKey),
    #[error("no relay accepted the event: {0}")]
    NotAccepted(String),
    #[error("group not found in local state")]
    GroupNotFound,
    #[error("mls: {0}")]
    Mls(String),
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("no relay accepted the commit, so it was not applied (pending commit cleared): {0}")]
    CommitNotAccepted(String),
    /// Boxed: it names a relay URL, and every `Result` of this crate carries this enum.
    #[error(transparent)]
    Fetch(Box<super::fetch::FetchError>),
}

impl From<super::fetch::FetchError> for GroupError {
    fn from(e: super::fetch::FetchError) -> Self {
        Self::Fetch(Box::new(e))
    }
}

/// The two ids of a Marmot group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupRef {
    pub mls_group_id: GroupId,
    /// Value of the `h` tag on kind-445 events.
    pub nostr_group_id: [u8; 32],
}

impl GroupRef {
    pub fn h_tag(&self) -> String {
        hex::encode(self.nostr_group_id)
    }
}

/// A decrypted inner message of a group, with the MLS-authenticated sender.
#[derive(Debug, Clone)]
pub struct Rumor {
    pub sender: PublicKey,
    pub sender_leaf: Option<u32>,
    pub kind: Kind,
    pub tags: Tags,
    pub content: String,
    pub epoch: Option<u64>,
    /// The rumor's own `created_at` (set by its sender: not trusted beyond ordering).
    pub created_at: Timestamp,
}

/// A call secret exported from one epoch of a group.
#[derive(Debug, Clone)]
pub struct CallSecretExport {
    pub epoch: u64,
    pub own_leaf: u32,
    pub secret: crate::media::keys::CallSecret,
}

/// One user's membership in Marmot groups: keys, MLS state and relay connections.
pub struct GroupMember<S: MdkStorageProvider> {
    pub(super) keys: Keys,
    pub(super) mdk: MDK<S>,
    pub(super) client: Client,
    pub(super) relays: Vec<RelayUrl>,
    pub(super) timeout: Duration,
    /// What the admission gate refused so far (see `fetch::AdmitGate`).
    pub(super) gate: super::fetch::GateCounters,
}

impl<S: MdkStorageProvider> std::fmt::Debug for GroupMember<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupMember")
            .field("pubkey", &self.keys.public_key().to_hex())
            .field("relays", &self.relays)
            .finish_non_exhaustive()
    }
}

impl<S: MdkStorageProvider> GroupMember<S> {
    /// Connects to `relays` as `keys`, with MLS state in `storage`.
    pub async fn connect(keys: Keys, storage: S, relays: &[RelayUrl]) -> Result<Self, GroupError> {
        let gate = super::fetch::AdmitGate::new(super::fetch::MAX_EVENT_BYTES);
        let counters = gate.counters();
        let client = Client::builder()
            .signer(keys.clone())
            .admit_policy(gate)
            .build();
        for url in relays {
            client
                .pool()
                .add_relay(url.clone(), relay_options())
                .await
                .map_err(nostr_sdk::client::Error::from)?;
        }
        client.connect().await;
        // Wait for every relay, but once one is up give the rest only a moment: a relay
        // that is down must not hold up every command.
        let started = tokio::time::Instant::now();
        loop {
            let states: Vec<bool> = client
                .relays()
                .await
                .values()
                .map(|r| r.is_connected())
                .collect();
            let waited = started.elapsed();
            if states.iter().all(|c| *c)
                || (states.iter().any(|c| *c) && waited >= Duration::from_millis(500))
                || waited >= Duration::from_secs(5)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Ok(Self {
            keys,
            mdk: MDK::new(storage),
            client,
            relays: relays.to_vec(),
            timeout: Duration::from_secs(10),
            gate: counters,
        })
    }

    /// How long relay queries wait for answers (default 10 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Largest event accepted from relays (default `MAX_EVENT_BYTES`); larger ones are
    /// refused and counted as `oversized`.
    pub fn with_max_event_bytes(self, max: usize) -> Self {
        self.gate.set_max(max);
        self
    }

    pub fn relays(&self) -> &[RelayUrl] {
        &self.relays
    }

    /// What the admission gate refused since this member connected (every fetch and
    /// subscription): `oversized` and `invalid_signature`, the rest zero. A long-running
    /// session reports the difference over its run ([`super::Dropped::since`]).
    pub fn refused_at_gate(&self) -> super::manage::Dropped {
        super::manage::Dropped {
            oversized: self.gate.oversized(),
            invalid_signature: self.gate.invalid_signature(),
            ..Default::default()
        }
    }

    pub fn public_key(&self) -> PublicKey {
        self.keys.public_key()
    }

    pub fn mdk(&self) -> &MDK<S> {
        &self.mdk
    }

    pub(super) async fn publish(&self, event: &Event) -> Result<EventId, GroupError> {
        let out = self
            .client
            .send_event_to(self.connected_relays().await?, event)
            .await?;
        if out.success.is_empty() {
            let why: Vec<String> = out
                .failed
                .iter()
                .map(|(u, e)| format!("{u}: {e}"))
                .collect();
            return Err(GroupError::NotAccepted(why.join("; ")));
        }
        Ok(out.val)
    }

    /// The configured relays that are connected now; an error if none is. Fetches and
    /// publishes use only these: a relay that is down would make every query wait for the
    /// whole timeout.
    pub(super) async fn connected_relays(&self) -> Result<Vec<RelayUrl>, GroupError> {
        let connected: Vec<RelayUrl> = self
            .client
            .relays()
            .await
            .into_iter()
            .filter(|(_, r)| r.is_connected())
            .map(|(u, _)| u)
            .collect();
        if connected.is_empty() {
            return Err(GroupError::NotAccepted(format!(
                "none of the relays is reachable: {}",
                self.relays
                    .iter()
                    .map(|u| u.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        Ok(connected)
    }

    /// Publishes one fresh key package as kind 30443 and, for older peers, kind 443.
    pub async fn publish_key_package(&self) -> Result<EventId, GroupError> {
        let kp = self
            .mdk
            .create_key_package_for_event(&self.keys.public_key(), self.relays.clone())?;
        let legacy = EventBuilder::new(Kind::MlsKeyPackage, kp.content.clone())
            .tags(kp.tags_443)
            .sign_with_keys(&self.keys)?;
        let current = EventBuilder::new(KIND_KEY_PACKAGE, kp.content)
            .tags(kp.tags_30443)
            .sign_with_keys(&self.keys)?;
        self.publish(&legacy).await?;
        self.publish(&current).await
    }

    /// The newest key package `author` published, preferring kind 30443.
    pub(super) async fn fetch_key_package(&self, author: PublicKey) -> Result<Event, GroupError> {
        let filter = Filter::new()
            .kinds([KIND_KEY_PACKAGE, Kind::MlsKeyPackage])
            .author(author);
        // Paged: a flood of key packages must not hide the newest one.
        let fetched = self
            .fetch_all("key packages", filter, super::fetch::horizon())
            .await?;
        fetched
            .events
            .into_iter()
            .max_by_key(|e| (e.kind == KIND_KEY_PACKAGE, e.created_at))
            .ok_or(GroupError::NoKeyPackage(author))
    }

    /// Creates a group with this member as admin and `invitees` as members, and sends each
    /// invitee its welcome gift-wrapped. MDK merges the creating commit itself; there is no
    /// commit to publish for a new group.
    pub async fn create_group(
        &self,
        name: &str,
        invitees: &[PublicKey],
    ) -> Result<GroupRef, GroupError> {
        self.create_group_with_admins(name, invitees, &[]).await
    }

    /// Like [`Self::create_group`], with `admins` (who must be among the invitees) as
    /// admins besides ourselves.
    pub async fn create_group_with_admins(
        &self,
        name: &str,
        invitees: &[PublicKey],
        admins: &[PublicKey],
    ) -> Result<GroupRef, GroupError> {
        let mut kps = Vec::with_capacity(invitees.len());
        for pk in invitees {
            kps.push(self.fetch_key_package(*pk).await?);
        }
        let config = NostrGroupConfigData::new(
            name.to_string(),
            String::new(),
            None,
            None,
            None,
            self.relays.clone(),
            std::iter::once(self.keys.public_key())
                .chain(admins.iter().copied())
                .collect(),
        );
        let res = self
            .mdk
            .create_group(&self.keys.public_key(), kps.clone(), config)?;
        // welcome_rumors[i] answers kps[i].
        for (rumor, kp) in res.welcome_rumors.into_iter().zip(&kps) {
            let wrap = EventBuilder::gift_wrap(&self.keys, &kp.pubkey, rumor, [])
                .await
                .map_err(|e| GroupError::GiftWrap(e.to_string()))?;
            self.publish(&wrap).await?;
        }
        Ok(GroupRef {
            mls_group_id: res.group.mls_group_id,
            nostr_group_id: res.group.nostr_group_id,
        })
    }

    /// Fetches gift-wrapped welcomes addressed to us and accepts every pending one.
    /// Waits until at least one is accepted or the timeout passes.
    pub async fn accept_welcomes(&self) -> Result<Vec<GroupRef>, GroupError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let pending = self.fetch_welcomes().await?;
            if !pending.is_empty() {
                let mut joined = Vec::with_capacity(pending.len());
                for welcome in pending {
                    self.mdk.accept_welcome(&welcome)?;
                    joined.push(GroupRef {
                        mls_group_id: welcome.mls_group_id,
                        nostr_group_id: welcome.nostr_group_id,
                    });
                }
                return Ok(joined);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(GroupError::Timeout("a welcome"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Encrypts `rumor` (an unsigned event authored by us) to the group and publishes it.
    pub async fn send_rumor(
        &self,
        group: &GroupRef,
        rumor: EventBuilder,
    ) -> Result<EventId, GroupError> {
        let rumor = rumor.build(self.keys.public_key());
        let event = self.mdk.create_message(&group.mls_group_id, rumor, None)?;
        self.publish(&event).await
    }

    /// Subscribes to the group's kind-445 events stamped `since` or later (`None`: all),
    /// undecrypted: the caller processes them with [`GroupMember::process_group_event`]
    /// (the same path as catching up), so commits and messages are handled alike.
    ///
    /// Opened before a catch-up, `since` should be that catch-up's cursor ([`live_since`]):
    /// an event stamped before the moment of subscribing but reaching the relay after the
    /// catch-up's fetch (a sender's clock behind ours, a slow publish) then still arrives
    /// here. The relay also sends what it holds from `since` on; nostr-sdk notifies each id
    /// once per process, and the caller skips the ids the catch-up reports
    /// ([`super::SyncOutcome::seen_ids`]).
    pub async fn group_events(
        &self,
        group: &GroupRef,
        since: Option<Timestamp>,
    ) -> Result<GroupEvents, GroupError> {
        self.subscribe_events(group, since).await
    }

    /// Like [`GroupMember::group_events`], for several groups on one relay subscription
    /// (`call listen`): the events of every group in `groups`, each with its `h` tag.
    pub async fn groups_events(
        &self,
        groups: &[GroupRef],
        since: Option<Timestamp>,
    ) -> Result<GroupEvents, GroupError> {
        let hs: Vec<String> = groups.iter().map(GroupRef::h_tag).collect();
        self.subscribe_events_of(hs, since).await
    }

    /// Ends the relay subscription behind `events` (a long-running listener opens a new one
    /// after every call; relays cap subscriptions per connection).
    pub async fn close_events(&self, events: GroupEvents) {
        self.client.unsubscribe(&events.subscription).await;
    }

    async fn subscribe_events(
        &self,
        group: &GroupRef,
        since: Option<Timestamp>,
    ) -> Result<GroupEvents, GroupError> {
        self.subscribe_events_of(vec![group.h_tag()], since).await
    }

    async fn subscribe_events_of(
        &self,
        hs: Vec<String>,
        since: Option<Timestamp>,
    ) -> Result<GroupEvents, GroupError> {
        let notifications = self.client.notifications();
        let mut filter = Filter::new()
            .kind(Kind::MlsGroupMessage)
            .custom_tags(SingleLetterTag::lowercase(Alphabet::H), hs.iter().cloned());
        if let Some(since) = since {
            filter = filter.since(since);
        }
        let subscription = self.client.subscribe(filter, None).await?.val;
        Ok(GroupEvents {
            hs,
            notifications,
            held_back: 0,
            subscription,
        })
    }

    /// `call_secret` of the group's current epoch for `call_id`, with our own leaf index.
    pub fn export_call_secret(
        &self,
        group: &GroupRef,
        call_id: &[u8; 32],
    ) -> Result<CallSecretExport, GroupError> {
        let mls =
            openmls::group::MlsGroup::load(self.mdk.provider.storage(), group.mls_group_id.inner())
                .map_err(|e| GroupError::Mls(e.to_string()))?
                .ok_or(GroupError::GroupNotFound)?;
        let secret = mls
            .export_secret(
                self.mdk.provider.crypto(),
                super::EXPORTER_LABEL,
                call_id,
                32,
            )
            .map_err(|e| GroupError::Mls(e.to_string()))?;
        let secret: [u8; 32] = secret
            .try_into()
            .map_err(|_| GroupError::Mls("exporter returned a short secret".into()))?;
        Ok(CallSecretExport {
            epoch: mls.epoch().as_u64(),
            own_leaf: mls.own_leaf_index().u32(),
            secret: crate::media::keys::CallSecret::from_bytes(secret),
        })
    }

    /// Active members by leaf index.
    pub fn leaf_map(&self, group: &GroupRef) -> Result<BTreeMap<u32, PublicKey>, GroupError> {
        Ok(self.mdk.group_leaf_map(&group.mls_group_id)?)
    }

    pub async fn disconnect(&self) {
        self.client.disconnect().await;
    }
}

/// Where a live subscription opened before catching up from `cursors` (one per group)
/// starts: the oldest cursor's second (inclusive), so nothing the catch-up cannot see
/// any more is missed; `None` (everything) if a group has no cursor yet.
pub fn live_since<'a>(
    cursors: impl IntoIterator<Item = &'a super::manage::Resume>,
) -> Option<Timestamp> {
    let mut since: Option<Timestamp> = None;
    for cursor in cursors {
        let (at, _) = cursor.as_ref()?;
        since = Some(since.map_or(*at, |s| s.min(*at)));
    }
    since
}

/// One group's kind-445 events as relays deliver them (duplicates included: several relays
/// may deliver one event). Events stamped beyond now + `MAX_CLOCK_SKEW` are held back
/// (counted, not returned): the next catch-up fetches them once they are due.
pub struct GroupEvents {
    /// The `h` tags of the groups (one, except for [`GroupMember::groups_events`]).
    hs: Vec<String>,
    notifications: tokio::sync::broadcast::Receiver<RelayPoolNotification>,
    held_back: usize,
    subscription: SubscriptionId,
}

impl GroupEvents {
    /// The group's `h` tag value, for [`GroupMember::process_group_event`] (the first
    /// group's, for a stream of several).
    pub fn h_tag(&self) -> &str {
        self.hs.first().map_or("", String::as_str)
    }

    /// Future-dated events held back so far.
    pub fn held_back(&self) -> usize {
        self.held_back
    }

    /// The next event of the group; `None` once the client is shut down.
    pub async fn next(&mut self) -> Option<Event> {
        self.next_tagged().await.map(|(_, e)| e)
    }

    /// The next event of any of the groups, with its group's `h` tag.
    pub async fn next_tagged(&mut self) -> Option<(String, Event)> {
        loop {
            let event = match self.notifications.recv().await {
                Ok(RelayPoolNotification::Event { event, .. }) => event,
                Ok(_) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!("group events lagged by {n} notifications");
                    continue;
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            };
            let h = (event.kind == Kind::MlsGroupMessage)
                .then(|| event.tags.find(TagKind::h()).and_then(|t| t.content()))
                .flatten()
                .filter(|h| self.hs.iter().any(|ours| ours == h))
                .map(str::to_string);
            let Some(h) = h else { continue };
            if super::fetch::is_future_dated(&event) {
                tracing::warn!(id = %event.id, "holding back a future-dated group event");
                self.held_back += 1;
                continue;
            }
            return Some((h, *event));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_subscription_starts_at_the_oldest_cursor_or_at_the_beginning() {
        let at = |t: u64| -> super::super::manage::Resume {
            Some((Timestamp::from(t), vec![EventId::all_zeros()]))
        };
        assert_eq!(
            live_since([&at(30), &at(10), &at(20)]),
            Some(Timestamp::from(10))
        );
        // A group that was never caught up: everything.
        assert_eq!(live_since([&at(30), &None]), None);
        assert_eq!(live_since(std::iter::empty()), None);
    }
}
