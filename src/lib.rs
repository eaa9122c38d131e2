//! `call`: end-to-end encrypted group voice calls over Marmot (MLS over Nostr), SFrame and
//! Media over QUIC. Layers, each depending only on those below it:
//! `cli` → `call` → `group` and `media` → `transport`.
#![forbid(unsafe_code)]

pub mod bench;
pub mod call;
pub mod cli;
pub mod group;
pub mod media;
pub mod transport;
// Fuzz entry points (hostile frames and signaling); driven by tests/fuzz and unit tests.
#[doc(hidden)]
pub mod fuzz;
