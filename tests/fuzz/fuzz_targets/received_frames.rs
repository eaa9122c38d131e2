//! A remote track's frames as a hostile relay or peer could deliver them (genuine,
//! flipped, reordered, foreign, junk), through SFrame, the jitter buffer and Opus.
//! Input layout and the checked rules: `call::fuzz::received_frames`.
#![forbid(unsafe_code)]

fn main() {
    afl::fuzz!(|data: &[u8]| {
        call::fuzz::received_frames(data);
    });
}
