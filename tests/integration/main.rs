//! The integration tests, linked into one binary: each test binary links the whole stack
//! (MLS, SQLCipher, QUIC, Opus), so one binary instead of seventeen keeps a clean CI build
//! small on disk and quick to link. Tests that change process-wide state (rlimits) or need
//! a sound server live in their own files beside this folder.

mod common;

mod bench;
mod call_output;
mod call_session;
mod cert_errors;
mod cli;
mod client_stats;
mod datagram;
mod demo_call;
mod engine_sim;
mod epoch_change;
mod group_cli;
mod group_hardening;
mod group_keys;
mod join_cli;
mod listen;
mod live_forgery;
mod media_loss;
mod reconnect;
mod relay_bounds;
mod relay_fanout;
mod relay_limits;
mod relay_networks;
mod relay_restart;
mod vectors;
