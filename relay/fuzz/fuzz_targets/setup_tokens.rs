//! The relay's SETUP AUTHORIZATION TOKEN parsing and namespace token binding, fed by AFL.
//! Input layout and the checked rules: `call_relay::fuzz::fuzz_setup_and_namespace`.
#![forbid(unsafe_code)]

fn main() {
    afl::fuzz!(|data: &[u8]| {
        call_relay::fuzz::fuzz_setup_and_namespace(data);
    });
}
