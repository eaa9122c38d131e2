//! The call engine: signaling over the group, and the media path from tone to MoQ and back.

pub mod demo;
pub mod loopback;
pub mod session;
pub mod signaling;

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
    #[error("{0}")]
    Protocol(String),
}

/// Fresh random bytes (call ids, namespaces, tokens, track names).
fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut b);
    b
}
