//! Media: Opus, SFrame with the profile's key schedule, tone source and analysis.

pub mod audio;
pub mod jitter;
pub mod keyring;
pub mod keys;
pub mod opus;
pub mod playout;
pub mod sframe;
pub mod tone;
