//! `call keys publish`, `call group …` and `call sync`: Marmot groups kept in `$CALL_HOME`.

use std::collections::BTreeMap;

use anyhow::{bail, Context};
use clap::Subcommand;
use nostr_sdk::prelude::*;
use serde_json::json;

use super::config::Settings;
use crate::group::{
    CommitOutcome, Group, GroupError, GroupMember, Home, MdkSqliteStorage, OutboxWelcome, Resume,
    SyncCursor, SyncOutcome, Welcome,
};

type Member = GroupMember<MdkSqliteStorage>;

#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Publish a fresh key package (kind 30443 and legacy 443) so others can invite you.
    Publish,
}

#[derive(Subcommand, Debug)]
pub enum GroupCommand {
    /// Create a group with you as admin, optionally inviting people right away.
    Create {
        /// Name shown to members; must differ from your other groups' names, since
        /// commands find groups by name.
        name: String,
        /// npub (or hex) of someone to invite; repeat for several.
        #[arg(long = "invite", value_name = "NPUB")]
        invite: Vec<String>,
        /// An invitee who is also admin (may invite and remove); repeat for several.
        #[arg(long = "admin", value_name = "NPUB")]
        admin: Vec<String>,
    },
    /// Add people to a group (admins only).
    Invite {
        /// Group name or a unique prefix of its id.
        group: String,
        #[arg(required = true, value_name = "NPUB")]
        npubs: Vec<String>,
    },
    /// Fetch invitations (gift-wrapped welcomes) and list those not yet accepted.
    Pending,
    /// Join the group of a pending welcome (by id prefix, or `all`).
    Accept {
        #[arg(value_name = "WELCOME_ID|all")]
        welcome: String,
    },
    /// List your groups.
    List,
    /// Catch up on the group, then list its members.
    Members {
        /// Group name or a unique prefix of its id.
        group: String,
    },
    /// Remove members from a group (admins only).
    Remove {
        /// Group name or a unique prefix of its id.
        group: String,
        #[arg(required = true, value_name = "NPUB")]
        npubs: Vec<String>,
    },
    /// Ask to leave a group; an admin's client commits it on its next sync.
    Leave {
        /// Group name or a unique prefix of its id.
        group: String,
    },
}

pub(super) async fn connect(settings: &Settings) -> anyhow::Result<(Home, Member)> {
    let home = Home::open(&settings.home)?;
    connect_home(settings, home).await
}

/// [`connect`] with the home already open (its identity is checked again here).
pub(super) async fn connect_home(
    settings: &Settings,
    home: Home,
) -> anyhow::Result<(Home, Member)> {
    let keys = home.keys()?;
    if settings.nostr_relays.is_empty() {
        bail!("no Nostr relays: pass --nostr-relay, set CALL_NOSTR_RELAYS or nostr_relays in config.toml");
    }
    let relays = settings
        .nostr_relays
        .iter()
        .map(|u| RelayUrl::parse(u.as_str()).with_context(|| format!("relay {u}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let storage = open_storage(&home).await?;
    let member = Member::connect(keys, storage, &relays)
        .await?
        .with_timeout(settings.timeout);
    Ok((home, member))
}

/// The home's MLS storage. Opened read-only beside a running call, the database may be
/// locked for the moment that process commits; try again briefly (SQLite waits for nobody
/// by itself here).
async fn open_storage(home: &Home) -> anyhow::Result<MdkSqliteStorage> {
    let mut tries = 0;
    loop {
        match home.storage() {
            Err(crate::group::HomeError::Storage { .. }) if home.is_read_only() && tries < 40 => {
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            other => return Ok(other?),
        }
    }
}

/// Says on stderr (not in `--json` output) that a read-only command did not catch up.
pub(super) fn note_not_caught_up(settings: &Settings, home: &Home) {
    if home.is_read_only() && !settings.json {
        eprintln!(
            "note: another `call` process (a call?) is using {}; shown as it stands, not caught up",
            home.dir().display()
        );
    }
}

fn parse_pubkeys(list: &[String]) -> anyhow::Result<Vec<PublicKey>> {
    list.iter()
        .map(|s| {
            PublicKey::parse(s).with_context(|| format!("`{s}` is not an npub or hex public key"))
        })
        .collect()
}

fn npub(pk: &PublicKey) -> String {
    pk.to_bech32().unwrap_or_else(|_| pk.to_hex())
}

fn group_id_hex(g: &Group) -> String {
    hex::encode(g.mls_group_id.as_slice())
}

/// A group by exact name or unique prefix of its id (hex). Ambiguity lists the candidates.
pub fn resolve_group(groups: &[Group], query: &str) -> anyhow::Result<Group> {
    let by_name: Vec<&Group> = groups.iter().filter(|g| g.name == query).collect();
    let matches = if by_name.is_empty() {
        let q = query.to_ascii_lowercase();
        groups
            .iter()
            .filter(|g| !q.is_empty() && group_id_hex(g).starts_with(&q))
            .collect()
    } else {
        by_name
    };
    match matches.as_slice() {
        [one] => Ok((*one).clone()),
        [] => {
            bail!("no group named `{query}` or with an id starting with it (see `call group list`)")
        }
        many => {
            let list: Vec<String> = many
                .iter()
                .map(|g| format!("  {}  {}", group_id_hex(g), g.name))
                .collect();
            bail!(
                "`{query}` is ambiguous; it matches:\n{}\nuse a longer id prefix",
                list.join("\n")
            )
        }
    }
}

fn welcome_id(w: &Welcome) -> String {
    w.wrapper_event_id.to_hex()
}

/// Where catching up on `group` resumes.
pub(super) fn resume_of(home: &Home, group: &Group) -> anyhow::Result<Resume> {
    Ok(home.sync_cursors()?.get(&group_id_hex(group)).map(|c| {
        (
            Timestamp::from(c.at),
            c.seen
                .iter()
                .filter_map(|id| EventId::from_hex(id).ok())
                .collect(),
        )
    }))
}

/// Advances `group`'s cursor past what `outcome` processed.
fn save_outcome(home: &Home, group: &Group, outcome: &SyncOutcome) -> anyhow::Result<()> {
    save_cursor(home, group, &outcome.cursor)
}

/// Stores where catching up on `group` stands (nothing when `cursor` is `None`).
pub(super) fn save_cursor(home: &Home, group: &Group, cursor: &Resume) -> anyhow::Result<()> {
    if let Some((at, ids)) = cursor {
        let mut cursors = home.sync_cursors()?;
        cursors.insert(
            group_id_hex(group),
            SyncCursor {
                at: at.as_secs(),
                seen: ids.iter().map(|i| i.to_hex()).collect(),
            },
        );
        home.save_sync_cursors(&cursors)?;
    }
    Ok(())
}

/// Catches up on `groups`, advancing and saving their cursors.
async fn sync_groups(
    home: &Home,
    member: &Member,
    groups: &[Group],
) -> anyhow::Result<Vec<(Group, SyncOutcome)>> {
    let mut out = Vec::new();
    for group in groups {
        let (since, seen) = resume_of(home, group)?.unzip();
        let outcome = member
            .sync_group(group, since, &seen.unwrap_or_default())
            .await
            .with_context(|| format!("catching up on group {}", group.name))?;
        save_outcome(home, group, &outcome)?;
        // After a complete catch-up, a pending commit of ours is one a crash kept from
        // ever reaching a relay (published, it would have been applied just now); it would
        // block every later commit.
        member.drop_unpublished_commit(&group.mls_group_id)?;
        flush_outbox(home, member, group).await?;
        out.push((group.clone(), outcome));
    }
    Ok(out)
}

/// Sends the welcomes of `group` left unsent by an earlier command (a crash between
/// publishing a commit and sending its welcomes) and drops those that can no longer be
/// used. Returns the invitees whose welcome was sent now. Run only right after a complete
/// catch-up on `group`: a commit of ours not applied by then never reached a relay.
async fn flush_outbox(
    home: &Home,
    member: &Member,
    group: &Group,
) -> anyhow::Result<Vec<PublicKey>> {
    let outbox = home.outbox()?;
    let gid = group_id_hex(group);
    if !outbox.iter().any(|w| w.group == gid) {
        return Ok(Vec::new());
    }
    let group = member
        .mdk()
        .get_group(&group.mls_group_id)?
        .context("group missing from local state")?;
    let members: Vec<PublicKey> = member
        .mdk()
        .group_leaf_map(&group.mls_group_id)
        .map(|m| m.into_values().collect())
        .unwrap_or_default();
    let mut keep = Vec::new();
    let mut sent = Vec::new();
    for w in outbox {
        if w.group != gid {
            keep.push(w);
            continue;
        }
        if group.epoch <= w.epoch {
            tracing::warn!(group = %group.name, "dropping a welcome whose commit never reached a relay");
            member.drop_unpublished_commit(&group.mls_group_id)?;
            continue;
        }
        let invitee = PublicKey::from_hex(&w.invitee).context("outbox: invitee")?;
        if !members.contains(&invitee) {
            tracing::warn!(group = %group.name, invitee = %w.invitee, "dropping a welcome: the invitee is not in the group (our commit lost, or removed since)");
            continue;
        }
        let rumor: UnsignedEvent =
            serde_json::from_value(w.rumor.clone()).context("outbox: welcome rumor")?;
        match member.send_welcome(&invitee, rumor).await {
            Ok(_) => sent.push(invitee),
            Err(e) => {
                tracing::warn!(invitee = %w.invitee, "could not send a welcome yet: {e}");
                keep.push(w);
            }
        }
    }
    home.save_outbox(&keep)?;
    Ok(sent)
}

/// Removes the welcomes of `group` for `invitees` from the outbox (sent, or void).
fn forget_welcomes(home: &Home, group: &Group, invitees: &[PublicKey]) -> anyhow::Result<()> {
    let gid = group_id_hex(group);
    let hex: Vec<String> = invitees.iter().map(|p| p.to_hex()).collect();
    let mut outbox = home.outbox()?;
    outbox.retain(|w| !(w.group == gid && hex.contains(&w.invitee)));
    Ok(home.save_outbox(&outbox)?)
}

/// `call group invite`: welcomes are stored before the commit is published and removed
/// once sent, so a crash at any point leaves either nothing published or a welcome that the
/// next command sends. Invitees already in the group get their unsent welcome, not a new
/// commit (MLS refuses to add a member twice).
async fn invite(
    home: &Home,
    member: &Member,
    group: &Group,
    invitees: &[PublicKey],
) -> anyhow::Result<(Vec<PublicKey>, Vec<PublicKey>)> {
    // Catching up also sends any welcome a crashed command left unsent.
    sync_groups(home, member, std::slice::from_ref(group)).await?;
    let members: Vec<PublicKey> = member
        .mdk()
        .group_leaf_map(&group.mls_group_id)?
        .into_values()
        .collect();
    let new: Vec<PublicKey> = invitees
        .iter()
        .filter(|p| !members.contains(p))
        .copied()
        .collect();
    let already: Vec<PublicKey> = invitees
        .iter()
        .filter(|p| members.contains(p))
        .copied()
        .collect();
    if new.is_empty() {
        return Ok((Vec::new(), already));
    }
    let prepared = member.prepare_invite(&group.mls_group_id, &new).await?;
    let gid = group_id_hex(group);
    let mut outbox = home.outbox()?;
    for (invitee, rumor) in &prepared.welcomes {
        outbox.push(OutboxWelcome {
            group: gid.clone(),
            epoch: prepared.epoch,
            invitee: invitee.to_hex(),
            rumor: serde_json::to_value(rumor)?,
        });
    }
    if let Err(e) = home.save_outbox(&outbox) {
        member.drop_unpublished_commit(&group.mls_group_id)?;
        return Err(e.into());
    }
    let outcome = match member
        .publish_then_merge(
            &group.mls_group_id,
            &prepared.commit,
            resume_of(home, group)?,
        )
        .await
    {
        Ok(o) => o,
        Err(e) => {
            if matches!(e, GroupError::CommitNotAccepted(_)) {
                // Not published: the welcomes are void.
                forget_welcomes(home, group, &new)?;
            }
            return Err(e.into());
        }
    };
    if !outcome.merged {
        forget_welcomes(home, group, &new)?;
    }
    settle(home, group, &outcome)?;
    for (invitee, rumor) in prepared.welcomes {
        member
            .send_welcome(&invitee, rumor)
            .await
            .with_context(|| {
                format!(
                    "sending the welcome to {} (it is kept; the next command resends it)",
                    npub(&invitee)
                )
            })?;
        forget_welcomes(home, group, &[invitee])?;
    }
    Ok((new, already))
}

/// Saves what a commit processed; fails if another commit won the epoch.
fn settle(home: &Home, group: &Group, outcome: &CommitOutcome) -> anyhow::Result<()> {
    save_outcome(home, group, &outcome.sync)?;
    if !outcome.merged {
        bail!(
            "another admin's commit for the same epoch of {} came first (MIP-03 order); \
             yours was not applied. The group is up to date now: run the command again",
            group.name
        );
    }
    Ok(())
}

/// Starts a fresh group's cursor at `at`, so catching up skips what came before we joined.
fn start_cursor(home: &Home, group: &Group, at: Timestamp) -> anyhow::Result<()> {
    let mut cursors = home.sync_cursors()?;
    cursors
        .entry(group_id_hex(group))
        .or_insert_with(|| SyncCursor {
            at: at.as_secs(),
            seen: vec![],
        });
    Ok(home.save_sync_cursors(&cursors)?)
}

fn group_json(g: &Group) -> serde_json::Value {
    json!({
        "id": group_id_hex(g),
        "nostr_group_id": hex::encode(g.nostr_group_id),
        "name": g.name,
        "epoch": g.epoch,
        "state": g.state.as_str(),
        "admins": g.admin_pubkeys.iter().map(npub).collect::<Vec<_>>(),
    })
}

fn sync_json(g: &Group, o: &SyncOutcome) -> serde_json::Value {
    json!({
        "group": group_id_hex(g),
        "name": g.name,
        "fetched": o.fetched,
        "commits": o.commits,
        "committed_proposals": o.committed_proposals,
        "pending_proposals": o.pending_proposals,
        "ignored": o.ignored,
        "dropped": o.dropped,
        "messages": o.messages.iter().map(|m| json!({
            "sender": npub(&m.sender),
            "kind": m.kind.as_u16(),
            "content": m.content,
            "epoch": m.epoch,
            "call_signal": call_signal(m),
        })).collect::<Vec<_>>(),
    })
}

/// A call signaling message (kinds 450–454) in words, e.g. `call 3fa2b1c4…: left`;
/// `None` for anything else (chat).
fn call_signal(m: &crate::group::Rumor) -> Option<String> {
    use crate::call::signaling::{
        AnswerStatus, CallAnswer, CallOffer, CallState, StateAction, KIND_ANSWER, KIND_OFFER,
        KIND_STATE,
    };
    let short = |id: &[u8; 32]| format!("call {}…", &hex::encode(id)[..8]);
    let malformed = |what: &str| Some(format!("malformed call {what}"));
    if m.kind == KIND_OFFER {
        return Some(match CallOffer::from_rumor(m.kind, &m.tags) {
            Ok(o) => format!("{}: offered on {}", short(&o.call_id), o.moq_url),
            Err(_) => return malformed("offer"),
        });
    }
    if m.kind == KIND_ANSWER {
        return Some(match CallAnswer::from_rumor(m.kind, &m.tags) {
            Ok(a) => format!(
                "{}: {}",
                short(&a.call_id),
                match a.status {
                    AnswerStatus::Accept => "joined",
                    AnswerStatus::Decline => "declined",
                    AnswerStatus::Busy => "busy",
                }
            ),
            Err(_) => return malformed("answer"),
        });
    }
    if m.kind == KIND_STATE {
        return Some(match CallState::from_rumor(m.kind, &m.tags) {
            Ok(st) => format!(
                "{}: {}",
                short(&st.call_id),
                match &st.action {
                    StateAction::Leave => "left".to_string(),
                    StateAction::End => "ended".to_string(),
                    StateAction::CallInfo { .. } => "re-announced".to_string(),
                    StateAction::Other(a) => a.replace('_', " "),
                }
            ),
            Err(_) => return malformed("state"),
        });
    }
    None
}

fn print(settings: &Settings, value: serde_json::Value, human: impl FnOnce() -> String) {
    if settings.json {
        println!("{value}");
    } else {
        println!("{}", human());
    }
}

pub async fn run_keys(settings: &Settings, cmd: &KeysCommand) -> anyhow::Result<u8> {
    let KeysCommand::Publish = cmd;
    let (_home, member) = connect(settings).await?;
    let id = member.publish_key_package().await?;
    member.disconnect().await;
    print(settings, json!({ "key_package": id.to_hex() }), || {
        format!("published key package {id}")
    });
    Ok(super::exit::OK)
}

pub async fn run_sync(settings: &Settings) -> anyhow::Result<u8> {
    let (home, member) = connect(settings).await?;
    let fetched = member.fetch_welcomes_counted().await?;
    let welcomes = &fetched.pending;
    let groups: Vec<Group> = member
        .groups()?
        .into_iter()
        .filter(|g| g.state.as_str() == "active")
        .collect();
    let results = sync_groups(&home, &member, &groups).await?;
    member.disconnect().await;
    print(
        settings,
        json!({
            "pending_welcomes": welcomes.len(),
            "gift_wraps": { "fetched": fetched.fetched, "dropped": fetched.dropped },
            "groups": results.iter().map(|(g, o)| sync_json(g, o)).collect::<Vec<_>>(),
        }),
        || {
            let mut s = format!(
                "{} pending welcome(s); {} gift wrap(s) refused",
                welcomes.len(),
                fetched.dropped.total()
            );
            for (g, o) in &results {
                s.push_str(&format!(
                    "\n{}: {} event(s), {} commit(s), {} message(s), {} ignored, {} held back \
                     (future-dated)",
                    g.name,
                    o.fetched,
                    o.commits + o.committed_proposals,
                    o.messages.len(),
                    o.ignored,
                    o.dropped.future_dated
                ));
                for m in &o.messages {
                    match call_signal(m) {
                        Some(signal) => s.push_str(&format!("\n  {}: [{signal}]", npub(&m.sender))),
                        None => s.push_str(&format!("\n  {}: {}", npub(&m.sender), m.content)),
                    }
                }
            }
            s
        },
    );
    Ok(super::exit::OK)
}

pub async fn run_group(settings: &Settings, cmd: &GroupCommand) -> anyhow::Result<u8> {
    // Listing only reads: it works during a call, and does not create a home.
    let home = match cmd {
        GroupCommand::List | GroupCommand::Members { .. } => Home::open_read(&settings.home)?,
        _ => Home::open(&settings.home)?,
    };
    let (home, member) = connect_home(settings, home).await?;
    let result = run_group_connected(settings, &home, &member, cmd).await;
    member.disconnect().await;
    result
}

async fn run_group_connected(
    settings: &Settings,
    home: &Home,
    member: &Member,
    cmd: &GroupCommand,
) -> anyhow::Result<u8> {
    let find = |query: &str| -> anyhow::Result<Group> { resolve_group(&member.groups()?, query) };
    match cmd {
        GroupCommand::Create {
            name,
            invite,
            admin,
        } => {
            let invitees = parse_pubkeys(invite)?;
            let admins = parse_pubkeys(admin)?;
            if let Some(same) = member.groups()?.iter().find(|g| &g.name == name) {
                bail!(
                    "you already have a group named `{name}` ({}, {}); every `call join {name}` \
                     would be ambiguous: pick another name",
                    group_id_hex(same),
                    same.state.as_str()
                );
            }
            if let Some(a) = admins.iter().find(|a| !invitees.contains(a)) {
                bail!("admin {} must also be invited (--invite)", npub(a));
            }
            let started = Timestamp::now();
            let group_ref = member
                .create_group_with_admins(name, &invitees, &admins)
                .await?;
            let group = member
                .mdk()
                .get_group(&group_ref.mls_group_id)?
                .context("the new group is missing from local state")?;
            start_cursor(home, &group, started)?;
            print(settings, group_json(&group), || {
                format!(
                    "created group {} ({}), {} invited",
                    group.name,
                    group_id_hex(&group),
                    invitees.len()
                )
            });
        }
        GroupCommand::Invite { group, npubs } => {
            let invitees = parse_pubkeys(npubs)?;
            let group = find(group)?;
            let (added, already) = invite(home, member, &group, &invitees).await?;
            let group = find(&group_id_hex(&group))?;
            let mut value = group_json(&group);
            value["added"] = json!(added.iter().map(npub).collect::<Vec<_>>());
            value["already_members"] = json!(already.iter().map(npub).collect::<Vec<_>>());
            print(settings, value, || {
                let mut s = format!(
                    "invited {} to {} (epoch {})",
                    added.len(),
                    group.name,
                    group.epoch
                );
                if !already.is_empty() {
                    s.push_str(&format!(
                        "; already members (any unsent welcome was sent): {}",
                        already.iter().map(npub).collect::<Vec<_>>().join(", ")
                    ));
                }
                s
            });
        }
        GroupCommand::Pending => {
            let fetched = member.fetch_welcomes_counted().await?;
            let welcomes = &fetched.pending;
            let list: Vec<serde_json::Value> = welcomes
                .iter()
                .map(|w| {
                    json!({
                        "id": welcome_id(w),
                        "group_name": w.group_name,
                        "group_id": hex::encode(w.mls_group_id.as_slice()),
                        "from": npub(&w.welcomer),
                        "members": w.member_count,
                    })
                })
                .collect();
            let counts = json!({ "fetched": fetched.fetched, "dropped": fetched.dropped });
            print(
                settings,
                json!({ "pending": list, "gift_wraps": counts }),
                || {
                    if welcomes.is_empty() {
                        return "no pending welcomes".into();
                    }
                    welcomes
                        .iter()
                        .map(|w| {
                            format!(
                                "{}  {}  from {} ({} members)",
                                welcome_id(w),
                                w.group_name,
                                npub(&w.welcomer),
                                w.member_count
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("\n")
                },
            );
        }
        GroupCommand::Accept { welcome } => {
            let pending = member.fetch_welcomes().await?;
            let chosen: Vec<&Welcome> = if welcome == "all" {
                pending.iter().collect()
            } else {
                let q = welcome.to_ascii_lowercase();
                let m: Vec<&Welcome> = pending
                    .iter()
                    .filter(|w| welcome_id(w).starts_with(&q))
                    .collect();
                match m.len() {
                    0 => bail!("no pending welcome with an id starting with `{welcome}` (see `call group pending`)"),
                    1 => m,
                    _ => bail!(
                        "`{welcome}` is ambiguous; it matches:\n{}",
                        m.iter()
                            .map(|w| format!("  {}  {}", welcome_id(w), w.group_name))
                            .collect::<Vec<_>>()
                            .join("\n")
                    ),
                }
            };
            if chosen.is_empty() {
                bail!("no pending welcomes");
            }
            let mut joined = Vec::new();
            for w in &chosen {
                member.accept(w)?;
                let group = member
                    .mdk()
                    .get_group(&w.mls_group_id)?
                    .context("the joined group is missing from local state")?;
                // The rumor's stamp is the inviter's clock: never start in the future.
                start_cursor(home, &group, w.event.created_at.min(Timestamp::now()))?;
                joined.push(group);
            }
            // The key package the welcome used is spent: publish a fresh one.
            let replenished = member.publish_key_package().await;
            if let Err(e) = &replenished {
                tracing::warn!("could not publish a fresh key package: {e}");
            }
            print(
                settings,
                json!({
                    "joined": joined.iter().map(group_json).collect::<Vec<_>>(),
                    "key_package_replenished": replenished.is_ok(),
                }),
                || {
                    joined
                        .iter()
                        .map(|g| format!("joined {} ({})", g.name, group_id_hex(g)))
                        .collect::<Vec<_>>()
                        .join("\n")
                },
            );
        }
        GroupCommand::List => {
            let groups = member.groups()?;
            print(
                settings,
                json!({ "groups": groups.iter().map(group_json).collect::<Vec<_>>() }),
                || {
                    if groups.is_empty() {
                        return "no groups".into();
                    }
                    groups
                        .iter()
                        .map(|g| {
                            format!(
                                "{}  {}  epoch {}  {}",
                                group_id_hex(g),
                                g.name,
                                g.epoch,
                                g.state.as_str()
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("\n")
                },
            );
        }
        GroupCommand::Members { group } => {
            let group = find(group)?;
            // Read-only beside a call: that process keeps the group current.
            let caught_up = group.state.as_str() == "active" && !home.is_read_only();
            if caught_up {
                sync_groups(home, member, std::slice::from_ref(&group)).await?;
            }
            note_not_caught_up(settings, home);
            let group = find(&group_id_hex(&group))?;
            let leaves: BTreeMap<u32, PublicKey> = member
                .mdk()
                .group_leaf_map(&group.mls_group_id)
                .unwrap_or_default();
            let list: Vec<serde_json::Value> = leaves
                .iter()
                .map(|(leaf, pk)| {
                    json!({
                        "npub": npub(pk),
                        "hex": pk.to_hex(),
                        "leaf": leaf,
                        "admin": group.admin_pubkeys.contains(pk),
                    })
                })
                .collect();
            print(
                settings,
                json!({ "group": group_json(&group), "members": list, "caught_up": caught_up }),
                || {
                    let mut s = format!("{} (epoch {})", group.name, group.epoch);
                    for (leaf, pk) in &leaves {
                        let admin = if group.admin_pubkeys.contains(pk) {
                            "  admin"
                        } else {
                            ""
                        };
                        s.push_str(&format!("\n  leaf {leaf}  {}{admin}", npub(pk)));
                    }
                    s
                },
            );
        }
        GroupCommand::Remove { group, npubs } => {
            let removed = parse_pubkeys(npubs)?;
            let group = find(group)?;
            sync_groups(home, member, std::slice::from_ref(&group)).await?;
            let outcome = member
                .remove(&group.mls_group_id, &removed, resume_of(home, &group)?)
                .await?;
            settle(home, &group, &outcome)?;
            let group = find(&group_id_hex(&group))?;
            print(settings, group_json(&group), || {
                format!(
                    "removed {} from {} (epoch {})",
                    removed.len(),
                    group.name,
                    group.epoch
                )
            });
        }
        GroupCommand::Leave { group } => {
            let group = find(group)?;
            sync_groups(home, member, std::slice::from_ref(&group)).await?;
            let demotion = member
                .leave(&group.mls_group_id, resume_of(home, &group)?)
                .await?;
            if let Some(outcome) = &demotion {
                settle(home, &group, outcome)?;
            }
            let was_admin = demotion.is_some();
            print(
                settings,
                json!({ "group": group_id_hex(&group), "was_admin": was_admin, "proposal_published": true }),
                || {
                    format!(
                        "asked to leave {}{}; an admin's client commits it on its next sync",
                        group.name,
                        if was_admin {
                            " (gave up admin rights first)"
                        } else {
                            ""
                        }
                    )
                },
            );
        }
    }
    Ok(super::exit::OK)
}
