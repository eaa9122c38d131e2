//! Calls: the sans-IO engine (`engine`), its driver for `call join` and `call demo`
//! (`session`), signaling over the group, `call loopback`, and latency bookkeeping.

pub mod demo;
pub mod engine;
pub mod listen;
pub mod loopback;
pub mod probe;
pub mod session;
pub mod signaling;
pub mod timing;

use crate::group::GroupError;
use crate::media::opus::CodecError;
use crate::media::sframe::FrameError;
use crate::transport::TransportError;

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error(transparent)]
    Group(#[from] GroupError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("signaling: {0}")]
    Signal(#[from] signaling::SignalError),
    #[error(transparent)]
    Audio(#[from] crate::media::audio::AudioError),
    #[error(transparent)]
    Engine(#[from] engine::EngineError),
    #[error(transparent)]
    Pipeline(#[from] crate::media::pipeline::PipelineError),
    #[error("starting a call needs a MoQ relay: pass --moq-relay or set moq_relay in config.toml")]
    NoMoqRelay,
    #[error("the MoQ relay did not accept our track within {0:?}")]
    AnnounceTimeout(std::time::Duration),
    #[error("counter store: {0}")]
    CounterStore(std::io::Error),
    #[error("the media thread: {0}")]
    MediaThread(String),
    #[error("call {0} has ended")]
    CallEnded(String),
    #[error("no call with an id starting with `{0}` in this group")]
    NoSuchCall(String),
    #[error("`{prefix}` matches {count} calls; use a longer prefix")]
    AmbiguousCall { prefix: String, count: usize },
    #[error("{0}")]
    Protocol(String),
}

/// Fresh random bytes (call ids, namespaces, tokens, track names).
fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut b);
    b
}
