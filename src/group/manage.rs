//! Managing groups over time: invites, removals, leaving, pending welcomes and catching up
//! on group events missed while offline. Every commit is published before it is merged.

use std::time::Duration;

use mdk_core::prelude::*;
use mdk_storage_traits::groups::types::Group;
use mdk_storage_traits::welcomes::types::Welcome;
use mdk_storage_traits::MdkStorageProvider;
use nostr_sdk::prelude::*;

use super::fetch::{horizon, is_future_dated, MAX_CLOCK_SKEW};
use super::member::{GroupError, GroupMember, Rumor, GIFT_WRAP_LOOKBACK};

/// Longest a commit waits after publishing for a competitor of the same second to reach
/// the relays. Wall-clock, so no timestamp from the network can make a command wait longer.
const MAX_SETTLE: Duration = Duration::from_secs(2);

/// What became of one group event.
#[derive(Debug)]
pub enum GroupEventOutcome {
    /// An application message, decrypted.
    Message(Rumor),
    /// A commit, merged: the group moved to a new epoch.
    Commit,
    /// A leave proposal that we (an admin) committed, published and merged; the id and
    /// stamp of that commit event.
    CommittedProposal(EventId, Timestamp),
    /// A proposal left for an admin to commit.
    PendingProposal,
    /// Not usable; the reason is logged and counted.
    Ignored(Refused),
}

/// Why an event was refused or dropped (each reason has its own counter in [`Dropped`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Stamped beyond now + [`MAX_CLOCK_SKEW`]: held back until it is due.
    FutureDated,
    /// Not what it claims: wrong kind, wrong `h` tag, a malformed welcome.
    Invalid,
    /// MLS or NIP-59 refused it: it does not decrypt or verify with any key we hold.
    Undecryptable,
    /// Well-formed but of a type we do not act on (e.g. a gift wrap that is not a welcome).
    Unsupported,
    /// Delivered again (by several relays, or on overlapping pages).
    Duplicate,
    /// Larger than `MAX_EVENT_BYTES`: refused before it is stored or processed.
    Oversized,
    /// Its id is not the hash of its content, or its signature does not verify. nostr-sdk
    /// drops most such events before they reach us (they are only logged there), but not
    /// one that reuses the id of an event it verified before (its cache is keyed by id):
    /// those are refused and counted here.
    InvalidSignature,
}

/// An event refused, with the reason for counting and a detail for the log.
#[derive(Debug, Clone)]
pub struct Refused {
    pub reason: DropReason,
    pub detail: String,
}

impl Refused {
    fn new(reason: DropReason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.detail)
    }
}

/// Events refused or dropped by one fetch, by reason: nothing is dropped uncounted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Dropped {
    pub future_dated: usize,
    pub invalid: usize,
    pub undecryptable: usize,
    pub unsupported: usize,
    pub duplicate: usize,
    pub oversized: usize,
    pub invalid_signature: usize,
}

impl Dropped {
    pub fn count(&mut self, reason: DropReason) {
        *match reason {
            DropReason::FutureDated => &mut self.future_dated,
            DropReason::Invalid => &mut self.invalid,
            DropReason::Undecryptable => &mut self.undecryptable,
            DropReason::Unsupported => &mut self.unsupported,
            DropReason::Duplicate => &mut self.duplicate,
            DropReason::Oversized => &mut self.oversized,
            DropReason::InvalidSignature => &mut self.invalid_signature,
        } += 1;
    }

    /// Adds every counter of `other` to ours.
    pub fn add(&mut self, other: &Dropped) {
        self.future_dated += other.future_dated;
        self.invalid += other.invalid;
        self.undecryptable += other.undecryptable;
        self.unsupported += other.unsupported;
        self.duplicate += other.duplicate;
        self.oversized += other.oversized;
        self.invalid_signature += other.invalid_signature;
    }

    /// What was counted after `before` (counters that only grow; never below zero).
    pub fn since(&self, before: &Dropped) -> Dropped {
        Dropped {
            future_dated: self.future_dated.saturating_sub(before.future_dated),
            invalid: self.invalid.saturating_sub(before.invalid),
            undecryptable: self.undecryptable.saturating_sub(before.undecryptable),
            unsupported: self.unsupported.saturating_sub(before.unsupported),
            duplicate: self.duplicate.saturating_sub(before.duplicate),
            oversized: self.oversized.saturating_sub(before.oversized),
            invalid_signature: self
                .invalid_signature
                .saturating_sub(before.invalid_signature),
        }
    }

    /// The counters that are not zero, for a person: "1 invalid signature, 2 duplicate"
    /// ("none" if all are).
    pub fn summary(&self) -> String {
        let parts: Vec<String> = [
            (self.future_dated, "future-dated"),
            (self.invalid, "invalid"),
            (self.undecryptable, "undecryptable"),
            (self.unsupported, "unsupported"),
            (self.duplicate, "duplicate"),
            (self.oversized, "oversized"),
            (self.invalid_signature, "invalid signature"),
        ]
        .into_iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, what)| format!("{n} {what}"))
        .collect();
        if parts.is_empty() {
            "none".into()
        } else {
            parts.join(", ")
        }
    }

    pub fn total(&self) -> usize {
        self.future_dated
            + self.invalid
            + self.undecryptable
            + self.unsupported
            + self.duplicate
            + self.oversized
            + self.invalid_signature
    }
}

/// Result of fetching gift-wrapped welcomes.
#[derive(Debug, Default)]
pub struct WelcomeFetch {
    /// Every pending welcome (new or from earlier fetches).
    pub pending: Vec<Welcome>,
    /// Gift wraps fetched (distinct).
    pub fetched: usize,
    pub dropped: Dropped,
}

/// Where catching up on a group resumes: `created_at` of the newest event processed and
/// the ids of the events processed at that second.
pub type Resume = Option<(Timestamp, Vec<EventId>)>;

/// Result of publishing one of our commits.
#[derive(Debug)]
pub struct CommitOutcome {
    /// Our commit is the group's new epoch; `false`: another commit won this epoch.
    pub merged: bool,
    /// What was processed on the way (advance the group's cursor with it).
    pub sync: SyncOutcome,
}

/// A commit adding members, made but not yet published, with its welcomes.
#[derive(Debug)]
pub struct PreparedInvite {
    /// The group's epoch before the commit.
    pub epoch: u64,
    pub commit: Event,
    /// Each invitee with its welcome rumor (kind 444).
    pub welcomes: Vec<(PublicKey, UnsignedEvent)>,
}

/// Result of catching up on one group.
#[derive(Debug, Default)]
pub struct SyncOutcome {
    pub fetched: usize,
    pub messages: Vec<Rumor>,
    pub commits: usize,
    pub committed_proposals: usize,
    /// Proposals stored for an admin to commit (we are not one).
    pub pending_proposals: usize,
    /// Events fetched but not usable (sum of `dropped` except future-dated and duplicate).
    pub ignored: usize,
    /// Every event refused or dropped, by reason.
    pub dropped: Dropped,
    /// Every event fetched: processed or refused now, or processed by an earlier run (the
    /// cursor's own second is fetched again). A live stream opened before this catch-up
    /// receives all of them again and must skip them (MLS refuses a message twice).
    pub seen_ids: Vec<EventId>,
    /// Events that were commits and applied.
    pub commit_ids: Vec<EventId>,
    /// `created_at` of the newest event processed and the ids of the events at that second
    /// (see [`SyncOutcome::seen_ids`]); refused events never move it.
    pub cursor: Option<(Timestamp, Vec<EventId>)>,
}

impl<S: MdkStorageProvider> GroupMember<S> {
    /// Publishes a commit to every relay and merges it only once one relay accepted it;
    /// if none did, the pending commit is cleared so the group stays at its epoch.
    ///
    /// Merging goes through the relays (MIP-03 order): after publishing we wait until the
    /// clock has passed the commit's second (at most [`MAX_SETTLE`]), fetch the group's events from `resume` on —
    /// our own commit among them — and process them oldest first (`created_at`, then id).
    /// If another commit for this epoch sorts first, it is applied and ours is dropped
    /// (`merged: false`), exactly as every other member processing the same events does.
    /// `resume` must be where the group's catching up stands now (nothing unprocessed
    /// before it).
    pub async fn publish_then_merge(
        &self,
        group_id: &GroupId,
        commit: &Event,
        resume: Resume,
    ) -> Result<CommitOutcome, GroupError> {
        let commit = &stamp_after(commit, resume.as_ref().map(|(t, _)| *t))?;
        if let Err(e) = self.publish(commit).await {
            self.mdk.clear_pending_commit(group_id)?;
            return Err(GroupError::CommitNotAccepted(e.to_string()));
        }
        // A competitor stamped with the same second has had that second to reach a relay.
        // Bounded by wall-clock time: our stamp may follow a (skewed) stamp from the network.
        let settle_until = commit.created_at.as_secs() + 1;
        let settle_deadline = tokio::time::Instant::now() + MAX_SETTLE;
        while Timestamp::now().as_secs() < settle_until
            && tokio::time::Instant::now() < settle_deadline
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
        let group = self
            .mdk
            .get_group(group_id)?
            .ok_or(GroupError::GroupNotFound)?;
        let (since, seen) = match resume {
            Some((t, ids)) => (Some(t), ids),
            None => (None, Vec::new()),
        };
        let sync = self.sync_group(&group, since, &seen).await?;
        // `resume` is current, so the first commit applied now is the one for our epoch.
        // (MDK reports our own commit as a commit even when it no longer applies.)
        let merged = if sync.commit_ids.first() == Some(&commit.id) {
            true
        } else if sync.seen_ids.contains(&commit.id) {
            // Another commit for this epoch sorts first and was applied; ours is void.
            let _ = self.mdk.clear_pending_commit(group_id);
            false
        } else {
            // The relays did not return it (yet); nothing competes that we can see.
            tracing::warn!(id = %commit.id, "own commit not returned by the relays; merging it");
            self.mdk.merge_pending_commit(group_id)?;
            true
        };
        Ok(CommitOutcome { merged, sync })
    }

    /// Every group in local state.
    pub fn groups(&self) -> Result<Vec<Group>, GroupError> {
        Ok(self.mdk.get_groups()?)
    }

    /// Adds `invitees` (by their newest key package) to the group: publish the commit,
    /// merge it, then gift-wrap each welcome to its invitee. A crash between publishing and
    /// sending loses the welcomes: callers that persist state use [`Self::prepare_invite`],
    /// store its welcomes, then [`Self::publish_then_merge`] and [`Self::send_welcome`].
    pub async fn invite(
        &self,
        group_id: &GroupId,
        invitees: &[PublicKey],
        resume: Resume,
    ) -> Result<CommitOutcome, GroupError> {
        let prepared = self.prepare_invite(group_id, invitees).await?;
        let outcome = self
            .publish_then_merge(group_id, &prepared.commit, resume)
            .await?;
        if !outcome.merged {
            return Ok(outcome);
        }
        for (invitee, rumor) in prepared.welcomes {
            self.send_welcome(&invitee, rumor).await?;
        }
        Ok(outcome)
    }

    /// Makes (does not publish) the commit adding `invitees` and their welcomes. MDK keeps
    /// the commit pending until it is merged or cleared.
    pub async fn prepare_invite(
        &self,
        group_id: &GroupId,
        invitees: &[PublicKey],
    ) -> Result<PreparedInvite, GroupError> {
        let epoch = self
            .mdk
            .get_group(group_id)?
            .ok_or(GroupError::GroupNotFound)?
            .epoch;
        let mut kps = Vec::with_capacity(invitees.len());
        for pk in invitees {
            kps.push(self.fetch_key_package(*pk).await?);
        }
        let update = self.mdk.add_members(group_id, &kps)?;
        // welcome_rumors[i] answers kps[i].
        let welcomes = update
            .welcome_rumors
            .unwrap_or_default()
            .into_iter()
            .zip(&kps)
            .map(|(rumor, kp)| (kp.pubkey, rumor))
            .collect();
        Ok(PreparedInvite {
            epoch,
            commit: update.evolution_event,
            welcomes,
        })
    }

    /// Gift-wraps a welcome rumor to `invitee` and publishes it.
    pub async fn send_welcome(
        &self,
        invitee: &PublicKey,
        rumor: UnsignedEvent,
    ) -> Result<EventId, GroupError> {
        let wrap = EventBuilder::gift_wrap(&self.keys, invitee, rumor, [])
            .await
            .map_err(|e| GroupError::GiftWrap(e.to_string()))?;
        self.publish(&wrap).await
    }

    /// Drops a commit of ours that never reached a relay (a crash before publishing), so
    /// new commits can be made. Call only after a complete catch-up: had the commit been
    /// published, that catch-up would have applied it.
    pub fn drop_unpublished_commit(&self, group_id: &GroupId) -> Result<(), GroupError> {
        Ok(self.mdk.clear_pending_commit(group_id)?)
    }

    /// Removes members (admins only): publish the commit, then merge it.
    pub async fn remove(
        &self,
        group_id: &GroupId,
        members: &[PublicKey],
        resume: Resume,
    ) -> Result<CommitOutcome, GroupError> {
        let update = self.mdk.remove_members(group_id, members)?;
        self.publish_then_merge(group_id, &update.evolution_event, resume)
            .await
    }

    /// Asks to leave: an admin first gives up admin rights (a commit, MIP-03), then a
    /// self-remove proposal is published for an admin to commit. Returns the outcome of
    /// the demotion commit if we were an admin (the proposal is sent only if it merged).
    pub async fn leave(
        &self,
        group_id: &GroupId,
        resume: Resume,
    ) -> Result<Option<CommitOutcome>, GroupError> {
        let group = self
            .mdk
            .get_group(group_id)?
            .ok_or(GroupError::GroupNotFound)?;
        let mut demotion = None;
        if group.admin_pubkeys.contains(&self.keys.public_key()) {
            let demote = self.mdk.self_demote(group_id)?;
            let outcome = self
                .publish_then_merge(group_id, &demote.evolution_event, resume)
                .await?;
            if !outcome.merged {
                return Ok(Some(outcome));
            }
            demotion = Some(outcome);
        }
        let proposal = self.mdk.leave_group(group_id)?;
        self.publish(&proposal.evolution_event).await?;
        Ok(demotion)
    }

    /// Fetches gift wraps addressed to us (NIP-59 back-dates them up to 2 days), stores
    /// every valid welcome as pending, and returns all pending welcomes.
    pub async fn fetch_welcomes(&self) -> Result<Vec<Welcome>, GroupError> {
        Ok(self.fetch_welcomes_counted().await?.pending)
    }

    /// Like [`Self::fetch_welcomes`], with what was fetched and refused. Pages through every
    /// gift wrap of the last 2 days, so junk wraps cannot hide a real welcome.
    pub async fn fetch_welcomes_counted(&self) -> Result<WelcomeFetch, GroupError> {
        let filter = Filter::new()
            .kind(Kind::GiftWrap)
            .pubkey(self.keys.public_key())
            .since(Timestamp::now() - GIFT_WRAP_LOOKBACK);
        let fetched = self
            .fetch_all("gift wraps", filter.clone(), horizon())
            .await?;
        let mut out = WelcomeFetch {
            fetched: fetched.events.len(),
            ..Default::default()
        };
        out.dropped.duplicate = fetched.duplicates;
        out.dropped.oversized = fetched.oversized;
        out.dropped.invalid_signature = fetched.invalid_signature;
        out.dropped.future_dated = self.count_future_dated(filter).await?;
        for wrap in &fetched.events {
            if let Err(refused) = self.process_gift_wrap(wrap).await {
                tracing::warn!(id = %wrap.id, "ignoring gift wrap: {refused}");
                out.dropped.count(refused.reason);
            }
        }
        out.pending = self.mdk.get_pending_welcomes(None)?;
        Ok(out)
    }

    /// Unwraps one gift wrap and stores its welcome as pending.
    pub async fn process_gift_wrap(&self, wrap: &Event) -> Result<(), Refused> {
        if wrap.kind != Kind::GiftWrap {
            return Err(Refused::new(
                DropReason::Invalid,
                format!("kind {} is not a gift wrap", wrap.kind),
            ));
        }
        // `fetch_all` verified it already; this also covers callers that did not.
        if let Err(e) = wrap.verify() {
            return Err(Refused::new(DropReason::InvalidSignature, e.to_string()));
        }
        if is_future_dated(wrap) {
            return Err(Refused::new(
                DropReason::FutureDated,
                format!("created_at {} is ahead of our clock", wrap.created_at),
            ));
        }
        let unwrapped = UnwrappedGift::from_gift_wrap(&self.keys, wrap)
            .await
            .map_err(|e| Refused::new(DropReason::Undecryptable, e.to_string()))?;
        if unwrapped.rumor.kind != Kind::MlsWelcome {
            return Err(Refused::new(
                DropReason::Unsupported,
                format!("kind {} is not a welcome", unwrapped.rumor.kind),
            ));
        }
        self.mdk
            .process_welcome(&wrap.id, &unwrapped.rumor)
            .map(|_| ())
            .map_err(|e| Refused::new(DropReason::Invalid, format!("welcome: {e}")))
    }

    /// Joins the group of a pending welcome.
    pub fn accept(&self, welcome: &Welcome) -> Result<(), GroupError> {
        Ok(self.mdk.accept_welcome(welcome)?)
    }

    /// Fetches the group's events since `since` (inclusive; events in `seen` are skipped)
    /// up to now + [`MAX_CLOCK_SKEW`], paged to completion, and processes them oldest first.
    /// Refused events are logged and counted. Fails without processing anything if the
    /// fetch cannot complete (the caller's cursor then stays where it was).
    pub async fn sync_group(
        &self,
        group: &Group,
        since: Option<Timestamp>,
        seen: &[EventId],
    ) -> Result<SyncOutcome, GroupError> {
        let h = hex::encode(group.nostr_group_id);
        let mut filter = Filter::new()
            .kind(Kind::MlsGroupMessage)
            .custom_tag(SingleLetterTag::lowercase(Alphabet::H), h);
        if let Some(since) = since {
            filter = filter.since(since);
        }
        let fetched = self
            .fetch_all("group events", filter.clone(), horizon())
            .await?;
        let future_dated = self.count_future_dated(filter).await?;
        let mut out = self
            .process_fetched(group, fetched.events, since, seen)
            .await;
        out.dropped.duplicate += fetched.duplicates;
        out.dropped.oversized += fetched.oversized;
        out.dropped.invalid_signature += fetched.invalid_signature;
        out.dropped.future_dated += future_dated;
        Ok(out)
    }

    /// The part of [`Self::sync_group`] after its fetch: processes the events of one
    /// complete fetch of the group (any order, no duplicate ids) oldest first, with the
    /// cursor starting at `since` (events in `seen` were processed before and are skipped).
    /// Every event is processed or refused with a counted reason; the cursor moves only
    /// over processed events.
    pub async fn process_fetched(
        &self,
        group: &Group,
        events: Vec<Event>,
        since: Option<Timestamp>,
        seen: &[EventId],
    ) -> SyncOutcome {
        let h = hex::encode(group.nostr_group_id);
        let mut out = SyncOutcome {
            cursor: since.map(|t| (t, seen.to_vec())),
            ..Default::default()
        };
        out.seen_ids = events.iter().map(|e| e.id).collect();
        let mut events: Vec<Event> = events
            .into_iter()
            .filter(|e| !seen.contains(&e.id))
            .collect();
        // Commits must be applied in order; relays answer newest first.
        events.sort_by_key(|e| (e.created_at, e.id));
        out.fetched = events.len();
        let mut refused_at: Vec<(Timestamp, EventId)> = Vec::new();
        for event in &events {
            match self.process_group_event(&h, event).await {
                GroupEventOutcome::Message(r) => out.messages.push(r),
                GroupEventOutcome::Commit => {
                    out.commits += 1;
                    out.commit_ids.push(event.id);
                }
                GroupEventOutcome::CommittedProposal(id, at) => {
                    out.committed_proposals += 1;
                    // Our own commit comes back on the next fetch: count it as seen.
                    advance(&mut out.cursor, at, id);
                }
                GroupEventOutcome::PendingProposal => out.pending_proposals += 1,
                GroupEventOutcome::Ignored(why) => {
                    tracing::warn!(id = %event.id, "ignoring group event: {why}");
                    out.dropped.count(why.reason);
                    if why.reason != DropReason::FutureDated {
                        out.ignored += 1;
                    }
                    refused_at.push((event.created_at, event.id));
                    // A refused event does not move the cursor: if it is newer than every
                    // processed event it may still become readable (it is fetched again).
                    continue;
                }
            }
            advance(&mut out.cursor, event.created_at, event.id);
        }
        // Refused events stamped no later than the newest processed one are settled: the
        // keys of their epoch were there when they were tried, and a later commit already
        // applied. Those in the cursor's own second join its ids (else fetched again).
        if let Some((at, ids)) = &mut out.cursor {
            for (t, id) in refused_at {
                if t == *at && !ids.contains(&id) {
                    ids.push(id);
                }
            }
        }
        out
    }

    /// Processes one event that claims to belong to the group whose `h` tag is `h`.
    pub async fn process_group_event(&self, h: &str, event: &Event) -> GroupEventOutcome {
        let refuse =
            |reason, detail: String| GroupEventOutcome::Ignored(Refused::new(reason, detail));
        if event.kind != Kind::MlsGroupMessage {
            return refuse(
                DropReason::Invalid,
                format!("kind {} is not a group message", event.kind),
            );
        }
        // nostr-sdk verifies what relays send, except an event reusing an id it verified
        // before; MLS does not look at the outer signature at all.
        if let Err(e) = event.verify() {
            return refuse(
                DropReason::InvalidSignature,
                format!("id or signature does not verify: {e}"),
            );
        }
        let event_h = event.tags.find(TagKind::h()).and_then(|t| t.content());
        if event_h != Some(h) {
            return refuse(
                DropReason::Invalid,
                format!(
                    "h tag {:?} is not this group's",
                    event_h.unwrap_or("(none)")
                ),
            );
        }
        // Time from the network is not trusted: MLS would order a far-future commit first.
        if is_future_dated(event) {
            return refuse(
                DropReason::FutureDated,
                format!(
                    "created_at {} is more than {} s ahead of our clock: held back",
                    event.created_at,
                    MAX_CLOCK_SKEW.as_secs()
                ),
            );
        }
        let outcome = match self.mdk.process_message_with_context(event) {
            Ok(o) => o,
            Err(e) => return refuse(DropReason::Undecryptable, e.to_string()),
        };
        match outcome.result {
            MessageProcessingResult::ApplicationMessage(msg) => GroupEventOutcome::Message(Rumor {
                sender: msg.pubkey,
                sender_leaf: outcome.context.sender_leaf_index,
                kind: msg.kind,
                tags: msg.tags,
                content: msg.content,
                epoch: msg.epoch,
                created_at: msg.created_at,
            }),
            MessageProcessingResult::Commit { .. } => GroupEventOutcome::Commit,
            MessageProcessingResult::Proposal(update) => {
                // MDK commits a leave proposal at once; only admins publish that commit
                // (MIP-03), others drop it and keep the proposal for an admin's commit.
                let group_id = update.mls_group_id;
                let is_admin = self
                    .mdk
                    .get_group(&group_id)
                    .ok()
                    .flatten()
                    .is_some_and(|g| g.admin_pubkeys.contains(&self.keys.public_key()));
                if !is_admin {
                    if let Err(e) = self.mdk.clear_pending_commit(&group_id) {
                        tracing::warn!("dropping a proposal commit: {e}");
                    }
                    return GroupEventOutcome::PendingProposal;
                }
                let commit = match stamp_after(&update.evolution_event, Some(event.created_at)) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = self.mdk.clear_pending_commit(&group_id);
                        return refuse(DropReason::Invalid, format!("stamping a commit: {e}"));
                    }
                };
                if let Err(e) = self.publish(&commit).await {
                    let _ = self.mdk.clear_pending_commit(&group_id);
                    return refuse(
                        DropReason::Unsupported,
                        format!("no relay accepted our commit of a proposal (cleared): {e}"),
                    );
                }
                let done = GroupEventOutcome::CommittedProposal(commit.id, commit.created_at);
                match self.mdk.process_message(&commit) {
                    Ok(MessageProcessingResult::Commit { .. }) => done,
                    _ => match self.mdk.merge_pending_commit(&group_id) {
                        Ok(()) => done,
                        Err(e) => refuse(
                            DropReason::Undecryptable,
                            format!("merging a proposal commit: {e}"),
                        ),
                    },
                }
            }
            MessageProcessingResult::PendingProposal { .. } => GroupEventOutcome::PendingProposal,
            // Events MLS could not read now or before.
            other @ (MessageProcessingResult::Unprocessable { .. }
            | MessageProcessingResult::PreviouslyFailed) => {
                refuse(DropReason::Undecryptable, format!("{other:?}"))
            }
            other => refuse(DropReason::Unsupported, format!("{other:?}")),
        }
    }
}

/// Moves a cursor to (`at`, `id`) if that is not older than where it stands.
pub fn advance(cursor: &mut Option<(Timestamp, Vec<EventId>)>, at: Timestamp, id: EventId) {
    match cursor {
        Some((t, ids)) if *t == at => {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        Some((t, _)) if *t > at => {}
        _ => *cursor = Some((at, vec![id])),
    }
}

/// `commit`, or if it is not stamped later than `after`, the same content and tags
/// re-signed by a fresh ephemeral key and stamped `max(now, after + 1 s)`. Receivers order a
/// group's events by `created_at`, then id: a commit stamped in the same second as an event
/// it depends on (the proposal it commits, a commit it builds on) could sort before it.
/// Nothing waits here: `after` comes from the network (at most [`MAX_CLOCK_SKEW`] ahead,
/// since later events are never processed), and waiting on it would let a stamp freeze us.
fn stamp_after(commit: &Event, after: Option<Timestamp>) -> Result<Event, GroupError> {
    let Some(after) = after else {
        return Ok(commit.clone());
    };
    if commit.created_at > after {
        return Ok(commit.clone());
    }
    let at = Timestamp::now().max(after + Duration::from_secs(1));
    Ok(EventBuilder::new(commit.kind, commit.content.clone())
        .tags(commit.tags.iter().cloned())
        .custom_created_at(at)
        .sign_with_keys(&Keys::generate())?)
}

/// How long a command waits for relays by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_only_moves_forward_and_collects_ids_of_its_second() {
        let (a, b, c) = (
            EventId::all_zeros(),
            EventId::from_byte_array([1; 32]),
            EventId::from_byte_array([2; 32]),
        );
        let mut cursor = None;
        advance(&mut cursor, Timestamp::from(10), a);
        advance(&mut cursor, Timestamp::from(10), b);
        advance(&mut cursor, Timestamp::from(10), b);
        assert_eq!(cursor, Some((Timestamp::from(10), vec![a, b])));
        advance(&mut cursor, Timestamp::from(9), c);
        assert_eq!(cursor, Some((Timestamp::from(10), vec![a, b])));
        advance(&mut cursor, Timestamp::from(11), c);
        assert_eq!(cursor, Some((Timestamp::from(11), vec![c])));
    }

    #[test]
    fn dropped_counts_add_subtract_and_read_for_a_person() {
        let mut before = Dropped::default();
        before.count(DropReason::Oversized);
        let mut now = before;
        now.count(DropReason::InvalidSignature);
        now.count(DropReason::InvalidSignature);
        let since = now.since(&before);
        assert_eq!((since.oversized, since.invalid_signature), (0, 2));
        assert_eq!(since.summary(), "2 invalid signature");
        let mut sum = since;
        sum.add(&before);
        assert_eq!(sum, now);
        assert_eq!(sum.total(), 3);
        assert_eq!(Dropped::default().summary(), "none");
        // Counters never run below zero, whatever order they are read in.
        assert_eq!(before.since(&now), Dropped::default());
    }
}
