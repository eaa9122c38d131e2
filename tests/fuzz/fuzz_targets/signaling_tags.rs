//! Call signaling tags from any group member, parsed as offer, answer and state and
//! replayed as a call history. Input layout and the checked rules:
//! `call::fuzz::signaling_tags`.
#![forbid(unsafe_code)]

fn main() {
    afl::fuzz!(|data: &[u8]| {
        call::fuzz::signaling_tags(data);
    });
}
