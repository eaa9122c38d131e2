//! Group events (kind 445) and gift wraps (kind 1059) as a hostile relay could deliver
//! them to a member of a real MLS group: restamped, future-dated, forged, cut, grown,
//! retagged. Input layout and the checked rules: `call::fuzz::group_events`.
#![forbid(unsafe_code)]

fn main() {
    afl::fuzz!(|data: &[u8]| {
        call::fuzz::group_events(data);
    });
}
