//! Call keys that follow the MLS epoch (PROTOCOL.md §3 rules): senders switch the moment a
//! commit is merged; receivers keep the previous epoch for [`PREVIOUS_EPOCH_GRACE`], hold
//! frames of a not-yet-known epoch for up to [`HOLD_UNKNOWN_EPOCH`], and count every
//! rejection by reason. Counters never repeat under one key, across restarts too, when a
//! [`CounterStore`] is used.

use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::keys::{CallSecret, KidLayout, MediaType, EPOCH_BITS};
use super::sframe::{FrameError, ReceiverKeys, SenderKeys};

/// How long a receiver keeps the previous epoch's keys after a newer one is installed.
pub const PREVIOUS_EPOCH_GRACE: Duration = Duration::from_secs(2);
/// How long a frame of an epoch we do not have yet may wait for its commit.
pub const HOLD_UNKNOWN_EPOCH: Duration = Duration::from_secs(1);
/// At most this many frames wait for an unknown epoch (about a second of 20 ms audio from
/// a few senders); further ones are refused.
pub const MAX_HELD_FRAMES: usize = 256;
/// Epochs ahead of ours (mod 2^E) whose frames are held rather than refused.
const HOLD_AHEAD: u64 = 2;
/// Counters reserved on disk at a time: a crash skips at most this many, never reuses one.
pub const COUNTER_BLOCK: u64 = 500;

/// Rejections by reason, as counted by a [`ReceiverKeyring`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RejectCounts {
    pub unknown_kid: u64,
    pub auth_failed: u64,
    pub replay: u64,
    pub stale_epoch: u64,
    pub malformed_header: u64,
    pub oversize: u64,
}

impl RejectCounts {
    pub fn total(&self) -> u64 {
        self.unknown_kid
            + self.auth_failed
            + self.replay
            + self.stale_epoch
            + self.malformed_header
            + self.oversize
    }
}

/// Why a frame was not delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    #[error("no key for KID {0}")]
    UnknownKid(u64),
    #[error("authentication failed")]
    AuthFailed,
    #[error("replayed or too old")]
    Replay,
    #[error("KID {0} names an epoch whose keys were retired")]
    StaleEpoch(u64),
    #[error("malformed SFrame header")]
    MalformedHeader,
    #[error("frame of {0} bytes is too large")]
    Oversize(usize),
}

/// A frame that authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decrypted {
    /// The transport sequence the caller gave with the frame ([`ReceiverKeyring::decrypt_seq`];
    /// 0 through [`ReceiverKeyring::decrypt`]), so frames released from hold keep their place.
    pub seq: u64,
    pub leaf_index: u32,
    pub epoch: u64,
    pub ctr: u64,
    pub payload: Vec<u8>,
}

/// What happened to one incoming frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    Frame(Decrypted),
    /// Waiting for the commit of a newer epoch; see [`ReceiverKeyring::install_epoch`].
    Held,
}

struct EpochKeys {
    epoch: u64,
    kids: Vec<u64>,
    retire_at: Option<Instant>,
}

struct HeldFrame {
    since: Instant,
    seq: u64,
    frame: Vec<u8>,
}

/// Every remote sender's keys of one media type in one call, across epochs.
pub struct ReceiverKeyring {
    layout: KidLayout,
    media: MediaType,
    keys: ReceiverKeys,
    /// Oldest first; the last one is current.
    epochs: VecDeque<EpochKeys>,
    held: VecDeque<HeldFrame>,
    rejects: RejectCounts,
}

impl std::fmt::Debug for ReceiverKeyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReceiverKeyring")
            .field(
                "epochs",
                &self.epochs.iter().map(|e| e.epoch).collect::<Vec<_>>(),
            )
            .field("held", &self.held.len())
            .field("rejects", &self.rejects)
            .finish()
    }
}

impl ReceiverKeyring {
    pub fn new(layout: KidLayout, media: MediaType) -> Self {
        Self {
            layout,
            media,
            keys: ReceiverKeys::new(),
            epochs: VecDeque::new(),
            held: VecDeque::new(),
            rejects: RejectCounts::default(),
        }
    }

    pub fn rejects(&self) -> RejectCounts {
        self.rejects
    }

    pub fn current_epoch(&self) -> Option<u64> {
        self.epochs.back().map(|e| e.epoch)
    }

    /// Installs `epoch`'s keys for `senders` (leaf indices) and starts the previous epoch's
    /// grace period. Returns held frames that now decrypt, in arrival order.
    pub fn install_epoch(
        &mut self,
        epoch: u64,
        secret: &CallSecret,
        senders: impl IntoIterator<Item = u32>,
        now: Instant,
    ) -> Result<Vec<Decrypted>, FrameError> {
        self.retire(now);
        if let Some(prev) = self.epochs.back_mut() {
            if prev.epoch == epoch {
                return Ok(Vec::new());
            }
            prev.retire_at.get_or_insert(now + PREVIOUS_EPOCH_GRACE);
        }
        let mut kids = Vec::new();
        for leaf in senders {
            kids.push(
                self.keys
                    .add_sender(secret, self.layout, self.media, leaf, epoch)?,
            );
        }
        self.epochs.push_back(EpochKeys {
            epoch,
            kids,
            retire_at: None,
        });
        let held = std::mem::take(&mut self.held);
        let mut out = Vec::new();
        for h in held {
            match self.decrypt_seq(h.seq, &h.frame, now) {
                Ok(Received::Frame(d)) => out.push(d),
                // Still ahead of us: keep its original arrival time.
                Ok(Received::Held) => {
                    if let Some(last) = self.held.back_mut() {
                        last.since = h.since;
                    }
                }
                Err(_) => {}
            }
        }
        Ok(out)
    }

    /// Drops keys whose grace period ended and held frames that waited too long.
    pub fn retire(&mut self, now: Instant) {
        while self
            .epochs
            .front()
            .and_then(|e| e.retire_at)
            .is_some_and(|t| t <= now)
        {
            let old = self.epochs.pop_front().expect("checked");
            for kid in old.kids {
                // A KID can recur 2^E epochs later; only drop keys no live epoch uses.
                if !self.epochs.iter().any(|e| e.kids.contains(&kid)) {
                    self.keys.remove(kid);
                }
            }
        }
        while self
            .held
            .front()
            .is_some_and(|h| now.duration_since(h.since) >= HOLD_UNKNOWN_EPOCH)
        {
            self.held.pop_front();
            self.rejects.unknown_kid += 1;
        }
    }

    fn epoch_of(&self, kid: u64) -> Option<u64> {
        self.epochs
            .iter()
            .rev()
            .find(|e| e.kids.contains(&kid))
            .map(|e| e.epoch)
    }

    /// Authenticates one frame. Every `Err` is counted in [`Self::rejects`].
    pub fn decrypt(&mut self, frame: &[u8], now: Instant) -> Result<Received, Reject> {
        self.decrypt_seq(0, frame, now)
    }

    /// [`Self::decrypt`] for a frame that arrived with transport sequence `seq`; the
    /// sequence comes back with the frame, also when it is released from hold later.
    pub fn decrypt_seq(
        &mut self,
        seq: u64,
        frame: &[u8],
        now: Instant,
    ) -> Result<Received, Reject> {
        self.retire(now);
        let err = match self.keys.decrypt(frame) {
            Ok((info, payload)) => {
                let parts = self.layout.split(info.kid);
                let payload = payload.to_vec();
                return Ok(Received::Frame(Decrypted {
                    seq,
                    leaf_index: parts.leaf_index,
                    epoch: self.epoch_of(info.kid).unwrap_or_default(),
                    ctr: info.ctr,
                    payload,
                }));
            }
            Err(FrameError::UnknownKid(kid)) => match self.classify_unknown(kid) {
                None => return self.hold(kid, seq, frame, now),
                Some(reject) => reject,
            },
            Err(FrameError::Oversize(n)) => Reject::Oversize(n),
            Err(FrameError::MalformedHeader) => Reject::MalformedHeader,
            Err(FrameError::Replay { .. }) => Reject::Replay,
            Err(_) => Reject::AuthFailed,
        };
        Err(self.count(err))
    }

    fn count(&mut self, reject: Reject) -> Reject {
        let c = &mut self.rejects;
        match reject {
            Reject::UnknownKid(_) => c.unknown_kid += 1,
            Reject::AuthFailed => c.auth_failed += 1,
            Reject::Replay => c.replay += 1,
            Reject::StaleEpoch(_) => c.stale_epoch += 1,
            Reject::MalformedHeader => c.malformed_header += 1,
            Reject::Oversize(_) => c.oversize += 1,
        }
        reject
    }

    fn hold(&mut self, kid: u64, seq: u64, frame: &[u8], now: Instant) -> Result<Received, Reject> {
        if self.held.len() >= MAX_HELD_FRAMES {
            return Err(self.count(Reject::UnknownKid(kid)));
        }
        self.held.push_back(HeldFrame {
            since: now,
            seq,
            frame: frame.to_vec(),
        });
        Ok(Received::Held)
    }

    /// A KID we hold no key for: `None` if it names a coming epoch (hold the frame), else
    /// why it is refused: a retired epoch (stale) or nothing we know.
    fn classify_unknown(&self, kid: u64) -> Option<Reject> {
        let parts = self.layout.split(kid);
        let Some(current) = self.current_epoch() else {
            return Some(Reject::UnknownKid(kid));
        };
        if parts.media != self.media as u8 {
            return Some(Reject::UnknownKid(kid));
        }
        let modulus = 1u64 << EPOCH_BITS;
        let ahead = (u64::from(parts.epoch_low) + modulus - current % modulus) % modulus;
        if (1..=HOLD_AHEAD).contains(&ahead) {
            return None;
        }
        if ahead != 0 {
            return Some(Reject::StaleEpoch(kid));
        }
        Some(Reject::UnknownKid(kid))
    }
}

/// On-disk high-water marks of SFrame counters, so a restarted or re-joining sender never
/// reuses a (key, CTR) pair in the same epoch.
#[derive(Debug, Clone)]
pub struct CounterStore {
    dir: PathBuf,
}

impl CounterStore {
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// One file per key, named by a hash so the directory listing reveals no call id.
    fn path(&self, call_id: &[u8; 32], epoch: u64, kid: u64) -> PathBuf {
        let mut h = Sha256::new();
        h.update(call_id);
        h.update(epoch.to_be_bytes());
        h.update(kid.to_be_bytes());
        self.dir
            .join(format!("ctr-{}", hex::encode(&h.finalize()[..16])))
    }

    /// The first counter not yet reserved for this key (0 if never used).
    pub fn load(&self, call_id: &[u8; 32], epoch: u64, kid: u64) -> std::io::Result<u64> {
        match std::fs::read_to_string(self.path(call_id, epoch, kid)) {
            Ok(s) => s.trim().parse().map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("counter file is corrupt: {e}"),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// Durably records that counters below `upto` may be in use.
    pub fn reserve(
        &self,
        call_id: &[u8; 32],
        epoch: u64,
        kid: u64,
        upto: u64,
    ) -> std::io::Result<()> {
        let path = self.path(call_id, epoch, kid);
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        writeln!(f, "{upto}")?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }
}

struct CounterLease {
    store: CounterStore,
    call_id: [u8; 32],
    reserved: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("counter store: {0}")]
    Store(#[from] std::io::Error),
}

/// The local sender's key for one media type, switched at every epoch change.
pub struct SenderKeyring {
    layout: KidLayout,
    media: MediaType,
    leaf_index: u32,
    epoch: u64,
    keys: SenderKeys,
    lease: Option<CounterLease>,
}

impl std::fmt::Debug for SenderKeyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SenderKeyring")
            .field("epoch", &self.epoch)
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

impl SenderKeyring {
    /// Keys for `leaf_index` in `epoch`. With a store, counters continue above anything a
    /// previous run of this call in this epoch may have used.
    pub fn new(
        layout: KidLayout,
        media: MediaType,
        leaf_index: u32,
        epoch: u64,
        secret: &CallSecret,
        store: Option<(CounterStore, [u8; 32])>,
    ) -> Result<Self, SendError> {
        let kid = layout
            .kid(media, leaf_index, epoch)
            .map_err(FrameError::from)?;
        let (first, lease) = match store {
            Some((store, call_id)) => {
                let first = store.load(&call_id, epoch, kid)?;
                let reserved = first + COUNTER_BLOCK;
                store.reserve(&call_id, epoch, kid, reserved)?;
                (
                    first,
                    Some(CounterLease {
                        store,
                        call_id,
                        reserved,
                    }),
                )
            }
            None => (0, None),
        };
        Ok(Self {
            layout,
            media,
            leaf_index,
            epoch,
            keys: SenderKeys::new(secret, layout, media, leaf_index, epoch, first)?,
            lease,
        })
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn kid(&self) -> u64 {
        self.keys.kid()
    }

    /// Switches to `epoch`'s key; call it as soon as the commit is merged.
    pub fn rekey(&mut self, epoch: u64, secret: &CallSecret) -> Result<(), SendError> {
        let store = self.lease.take().map(|l| (l.store, l.call_id));
        *self = Self::new(
            self.layout,
            self.media,
            self.leaf_index,
            epoch,
            secret,
            store,
        )?;
        Ok(())
    }

    pub fn encrypt(&mut self, payload: &[u8]) -> Result<&[u8], SendError> {
        if let Some(lease) = &mut self.lease {
            if self.keys.next_ctr() >= lease.reserved {
                let upto = lease.reserved + COUNTER_BLOCK;
                lease
                    .store
                    .reserve(&lease.call_id, self.epoch, self.keys.kid(), upto)?;
                lease.reserved = upto;
            }
        }
        Ok(self.keys.encrypt(payload)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAYOUT_BITS: u32 = 4;

    fn secret(epoch: u64) -> CallSecret {
        CallSecret::from_bytes([epoch as u8 + 1; 32])
    }

    fn sender(epoch: u64) -> SenderKeyring {
        let layout = KidLayout::new(LAYOUT_BITS).unwrap();
        SenderKeyring::new(layout, MediaType::Audio, 1, epoch, &secret(epoch), None).unwrap()
    }

    fn receiver(epoch: u64, now: Instant) -> ReceiverKeyring {
        let mut rx = ReceiverKeyring::new(KidLayout::new(LAYOUT_BITS).unwrap(), MediaType::Audio);
        rx.install_epoch(epoch, &secret(epoch), [1, 2], now)
            .unwrap();
        rx
    }

    fn payload(r: Result<Received, Reject>) -> Vec<u8> {
        match r {
            Ok(Received::Frame(d)) => d.payload,
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    #[test]
    fn previous_epoch_is_kept_for_the_grace_period_only() {
        let t0 = Instant::now();
        let mut tx = sender(5);
        let mut rx = receiver(5, t0);
        let old = tx.encrypt(b"old epoch").unwrap().to_vec();
        let old2 = tx.encrypt(b"old epoch 2").unwrap().to_vec();
        tx.rekey(6, &secret(6)).unwrap();
        let new = tx.encrypt(b"new epoch").unwrap().to_vec();
        rx.install_epoch(6, &secret(6), [1, 2], t0).unwrap();

        assert_eq!(payload(rx.decrypt(&new, t0)), b"new epoch");
        let late = t0 + PREVIOUS_EPOCH_GRACE - Duration::from_millis(1);
        assert_eq!(payload(rx.decrypt(&old, late)), b"old epoch");
        let expired = t0 + PREVIOUS_EPOCH_GRACE;
        assert_eq!(
            rx.decrypt(&old2, expired),
            Err(Reject::StaleEpoch(tx_kid(5)))
        );
        assert_eq!(rx.rejects().stale_epoch, 1);
    }

    fn tx_kid(epoch: u64) -> u64 {
        KidLayout::new(LAYOUT_BITS)
            .unwrap()
            .kid(MediaType::Audio, 1, epoch)
            .unwrap()
    }

    #[test]
    fn frames_of_a_coming_epoch_wait_for_its_keys() {
        let t0 = Instant::now();
        let mut tx = sender(7);
        tx.rekey(8, &secret(8)).unwrap();
        let early = tx.encrypt(b"from the future").unwrap().to_vec();
        let mut rx = receiver(7, t0);
        assert_eq!(rx.decrypt(&early, t0), Ok(Received::Held));
        let released = rx
            .install_epoch(8, &secret(8), [1], t0 + Duration::from_millis(300))
            .unwrap();
        assert_eq!(released.len(), 1);
        assert_eq!(released[0].payload, b"from the future");
        assert_eq!(released[0].epoch, 8);
        assert_eq!(rx.rejects().total(), 0);
    }

    #[test]
    fn held_frames_expire_after_a_second() {
        let t0 = Instant::now();
        let mut tx = sender(3);
        tx.rekey(4, &secret(4)).unwrap();
        let early = tx.encrypt(b"never keyed").unwrap().to_vec();
        let mut rx = receiver(3, t0);
        assert_eq!(rx.decrypt(&early, t0), Ok(Received::Held));
        rx.retire(t0 + HOLD_UNKNOWN_EPOCH);
        assert_eq!(rx.rejects().unknown_kid, 1);
        let released = rx
            .install_epoch(4, &secret(4), [1], t0 + HOLD_UNKNOWN_EPOCH)
            .unwrap();
        assert!(released.is_empty());
    }

    #[test]
    fn bad_frames_are_counted_by_reason_and_the_stream_continues() {
        let t0 = Instant::now();
        let mut tx = sender(2);
        let mut rx = receiver(2, t0);
        let good = tx.encrypt(b"fine").unwrap().to_vec();

        // Forged KID: a sender leaf nobody has (leaf 9), current epoch.
        let mut forged = good.clone();
        forged[1] = KidLayout::new(LAYOUT_BITS)
            .unwrap()
            .kid(MediaType::Audio, 9, 2)
            .unwrap() as u8;
        assert!(matches!(
            rx.decrypt(&forged, t0),
            Err(Reject::UnknownKid(_))
        ));
        // Flipped tag bit.
        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 0x01;
        assert_eq!(rx.decrypt(&flipped, t0), Err(Reject::AuthFailed));
        // Truncated header: extended KID flag set, KID bytes missing.
        assert_eq!(rx.decrypt(&good[..1], t0), Err(Reject::MalformedHeader));
        // 64 KiB frame.
        let huge = vec![0u8; 64 * 1024];
        assert_eq!(rx.decrypt(&huge, t0), Err(Reject::Oversize(64 * 1024)));
        // The genuine frame still decrypts, once.
        assert_eq!(payload(rx.decrypt(&good, t0)), b"fine");
        assert_eq!(rx.decrypt(&good, t0), Err(Reject::Replay));
        let next = tx.encrypt(b"next").unwrap().to_vec();
        assert_eq!(payload(rx.decrypt(&next, t0)), b"next");

        assert_eq!(
            rx.rejects(),
            RejectCounts {
                unknown_kid: 1,
                auth_failed: 1,
                replay: 1,
                stale_epoch: 0,
                malformed_header: 1,
                oversize: 1,
            }
        );
    }

    #[test]
    fn a_restarted_sender_never_repeats_a_counter_in_the_same_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let store = CounterStore::open(dir.path()).unwrap();
        let layout = KidLayout::new(LAYOUT_BITS).unwrap();
        let call_id = [9u8; 32];
        let mut rx = ReceiverKeyring::new(layout, MediaType::Audio);
        let t0 = Instant::now();
        rx.install_epoch(1, &secret(1), [1], t0).unwrap();

        let mut seen = std::collections::HashSet::new();
        // Three runs of the same sender in the same epoch, the second one longer than a
        // reservation block, each "crashing" (dropped) without any shutdown step.
        for frames in [10, COUNTER_BLOCK + 7, 3] {
            let mut tx = SenderKeyring::new(
                layout,
                MediaType::Audio,
                1,
                1,
                &secret(1),
                Some((store.clone(), call_id)),
            )
            .unwrap();
            for _ in 0..frames {
                let frame = tx.encrypt(b"x").unwrap().to_vec();
                let Ok(Received::Frame(d)) = rx.decrypt(&frame, t0) else {
                    panic!("a fresh counter must decrypt");
                };
                assert!(seen.insert((tx.kid(), d.ctr)), "CTR {} reused", d.ctr);
            }
        }
        assert_eq!(rx.rejects().replay, 0);
        // Without the store the same sender would start at 0 again: the receiver catches it.
        let mut naive =
            SenderKeyring::new(layout, MediaType::Audio, 1, 1, &secret(1), None).unwrap();
        let frame = naive.encrypt(b"x").unwrap().to_vec();
        assert_eq!(rx.decrypt(&frame, t0), Err(Reject::Replay));
    }

    #[test]
    fn a_corrupt_counter_file_is_an_error_not_a_reset() {
        let dir = tempfile::tempdir().unwrap();
        let store = CounterStore::open(dir.path()).unwrap();
        let call_id = [1u8; 32];
        store.reserve(&call_id, 1, 17, 42).unwrap();
        assert_eq!(store.load(&call_id, 1, 17).unwrap(), 42);
        let path = store.path(&call_id, 1, 17);
        std::fs::write(&path, "not a number").unwrap();
        assert!(store.load(&call_id, 1, 17).is_err());
    }
}
