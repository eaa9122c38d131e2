//! Media: Opus, SFrame with the profile's key schedule, tone source and analysis.

pub mod audio;
pub mod hush;
pub mod io;
pub mod jitter;
pub mod keyring;
pub mod keys;
pub mod opus;
pub mod pipeline;
pub mod playout;
pub mod sframe;
pub mod tone;
