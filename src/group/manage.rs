//! Managing groups over time: invites, removals, leaving, pending welcomes and catching up
//! on group events missed while offline. Every commit is published before it is merged.

use std::time::Duration;

use mdk_core::prelude::*;
use mdk_storage_traits::groups::types::Group;
use mdk_storage_traits::welcomes::types::Welcome;
use mdk_storage_traits::MdkStorageProvider;
use nostr_sdk::prelude::*;

use super::member::{GroupError, GroupMember, Rumor, GIFT_WRAP_LOOKBACK};

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
    /// Not usable; the reason is logged.
    Ignored(String),
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

/// Result of catching up on one group.
#[derive(Debug, Default)]
pub struct SyncOutcome {
    pub fetched: usize,
    pub messages: Vec<Rumor>,
    pub commits: usize,
    pub committed_proposals: usize,
    /// Proposals stored for an admin to commit (we are not one).
    pub pending_proposals: usize,
    pub ignored: usize,
    /// Every event processed, and those that were commits and applied.
    pub seen_ids: Vec<EventId>,
    pub commit_ids: Vec<EventId>,
    /// `created_at` of the newest event seen, and the ids of every event seen at that second.
    pub cursor: Option<(Timestamp, Vec<EventId>)>,
}

impl<S: MdkStorageProvider> GroupMember<S> {
    /// Publishes a commit to every relay and merges it only once one relay accepted it;
    /// if none did, the pending commit is cleared so the group stays at its epoch.
    ///
    /// Merging goes through the relays (MIP-03 order): after publishing we wait until the
    /// clock has passed the commit's second, fetch the group's events from `resume` on —
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
        let commit = &stamp_after(commit, resume.as_ref().map(|(t, _)| *t)).await?;
        if let Err(e) = self.publish(commit).await {
            self.mdk.clear_pending_commit(group_id)?;
            return Err(GroupError::CommitNotAccepted(e.to_string()));
        }
        // A competitor stamped with the same second has had that second to reach a relay.
        let settle_until = commit.created_at.as_secs() + 1;
        while Timestamp::now().as_secs() < settle_until {
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
    /// merge it, then gift-wrap each welcome to its invitee.
    pub async fn invite(
        &self,
        group_id: &GroupId,
        invitees: &[PublicKey],
        resume: Resume,
    ) -> Result<CommitOutcome, GroupError> {
        let mut kps = Vec::with_capacity(invitees.len());
        for pk in invitees {
            kps.push(self.fetch_key_package(*pk).await?);
        }
        let update = self.mdk.add_members(group_id, &kps)?;
        let outcome = self
            .publish_then_merge(group_id, &update.evolution_event, resume)
            .await?;
        if !outcome.merged {
            return Ok(outcome);
        }
        // welcome_rumors[i] answers kps[i].
        for (rumor, kp) in update
            .welcome_rumors
            .unwrap_or_default()
            .into_iter()
            .zip(&kps)
        {
            let wrap = EventBuilder::gift_wrap(&self.keys, &kp.pubkey, rumor, [])
                .await
                .map_err(|e| GroupError::GiftWrap(e.to_string()))?;
            self.publish(&wrap).await?;
        }
        Ok(outcome)
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
        let filter = Filter::new()
            .kind(Kind::GiftWrap)
            .pubkey(self.keys.public_key())
            .since(Timestamp::now() - GIFT_WRAP_LOOKBACK);
        for wrap in self.fetch(filter).await? {
            let unwrapped = match UnwrappedGift::from_gift_wrap(&self.keys, &wrap).await {
                Ok(u) => u,
                Err(e) => {
                    tracing::warn!(id = %wrap.id, "ignoring gift wrap: {e}");
                    continue;
                }
            };
            if unwrapped.rumor.kind != Kind::MlsWelcome {
                tracing::warn!(id = %wrap.id, kind = %unwrapped.rumor.kind, "ignoring gift wrap: not a welcome");
                continue;
            }
            if let Err(e) = self.mdk.process_welcome(&wrap.id, &unwrapped.rumor) {
                tracing::warn!(id = %wrap.id, "ignoring welcome: {e}");
            }
        }
        Ok(self.mdk.get_pending_welcomes(None)?)
    }

    /// Joins the group of a pending welcome.
    pub fn accept(&self, welcome: &Welcome) -> Result<(), GroupError> {
        Ok(self.mdk.accept_welcome(welcome)?)
    }

    /// Fetches the group's events since `since` (inclusive; events in `seen` are skipped),
    /// oldest first, and processes each. Bad events are logged and skipped.
    pub async fn sync_group(
        &self,
        group: &Group,
        since: Option<Timestamp>,
        seen: &[EventId],
    ) -> Result<SyncOutcome, GroupError> {
        let h = hex::encode(group.nostr_group_id);
        let mut filter = Filter::new()
            .kind(Kind::MlsGroupMessage)
            .custom_tag(SingleLetterTag::lowercase(Alphabet::H), h.clone());
        if let Some(since) = since {
            filter = filter.since(since);
        }
        let mut events: Vec<Event> = self
            .fetch(filter)
            .await?
            .into_iter()
            .filter(|e| !seen.contains(&e.id))
            .collect();
        // Commits must be applied in order; relays answer newest first.
        events.sort_by_key(|e| (e.created_at, e.id));
        let mut out = SyncOutcome {
            fetched: events.len(),
            cursor: since.map(|t| (t, seen.to_vec())),
            ..Default::default()
        };
        for event in &events {
            out.seen_ids.push(event.id);
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
                    out.ignored += 1;
                }
            }
            advance(&mut out.cursor, event.created_at, event.id);
        }
        Ok(out)
    }

    /// Processes one event that claims to belong to the group whose `h` tag is `h`.
    pub async fn process_group_event(&self, h: &str, event: &Event) -> GroupEventOutcome {
        if event.kind != Kind::MlsGroupMessage {
            return GroupEventOutcome::Ignored(format!(
                "kind {} is not a group message",
                event.kind
            ));
        }
        let event_h = event.tags.find(TagKind::h()).and_then(|t| t.content());
        if event_h != Some(h) {
            return GroupEventOutcome::Ignored(format!(
                "h tag {:?} is not this group's",
                event_h.unwrap_or("(none)")
            ));
        }
        let outcome = match self.mdk.process_message_with_context(event) {
            Ok(o) => o,
            Err(e) => return GroupEventOutcome::Ignored(e.to_string()),
        };
        match outcome.result {
            MessageProcessingResult::ApplicationMessage(msg) => GroupEventOutcome::Message(Rumor {
                sender: msg.pubkey,
                sender_leaf: outcome.context.sender_leaf_index,
                kind: msg.kind,
                tags: msg.tags,
                content: msg.content,
                epoch: msg.epoch,
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
                let commit =
                    match stamp_after(&update.evolution_event, Some(event.created_at)).await {
                        Ok(c) => c,
                        Err(e) => {
                            let _ = self.mdk.clear_pending_commit(&group_id);
                            return GroupEventOutcome::Ignored(format!("stamping a commit: {e}"));
                        }
                    };
                if let Err(e) = self.publish(&commit).await {
                    let _ = self.mdk.clear_pending_commit(&group_id);
                    return GroupEventOutcome::Ignored(format!(
                        "no relay accepted our commit of a proposal (cleared): {e}"
                    ));
                }
                let done = GroupEventOutcome::CommittedProposal(commit.id, commit.created_at);
                match self.mdk.process_message(&commit) {
                    Ok(MessageProcessingResult::Commit { .. }) => done,
                    _ => match self.mdk.merge_pending_commit(&group_id) {
                        Ok(()) => done,
                        Err(e) => {
                            GroupEventOutcome::Ignored(format!("merging a proposal commit: {e}"))
                        }
                    },
                }
            }
            MessageProcessingResult::PendingProposal { .. } => GroupEventOutcome::PendingProposal,
            other => GroupEventOutcome::Ignored(format!("{other:?}")),
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
/// re-signed by a fresh ephemeral key once the clock has passed `after`. Receivers order a
/// group's events by `created_at`, then id: a commit stamped in the same second as an event
/// it depends on (the proposal it commits, a commit it builds on) could sort before it.
async fn stamp_after(commit: &Event, after: Option<Timestamp>) -> Result<Event, GroupError> {
    let Some(after) = after else {
        return Ok(commit.clone());
    };
    if commit.created_at > after {
        return Ok(commit.clone());
    }
    while Timestamp::now() <= after {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(EventBuilder::new(commit.kind, commit.content.clone())
        .tags(commit.tags.iter().cloned())
        .custom_created_at(Timestamp::now())
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
}
