#!/usr/bin/env bash
# Device-to-device delay of `call loopback` on PulseAudio null sinks, against a plain
# PulseAudio pass-through measured the same way: five runs each at 20 and 10 ms frames, then
# a long run (CALL_DEVICE_BENCH_SECONDS, default 600) for creep. Needs scripts/setup.sh.
#   scripts/device-bench.sh                       # about 12 minutes
#   CALL_DEVICE_BENCH_SECONDS=60 scripts/device-bench.sh
#   CALL_DEVICE_BENCH_BIN=/path/to/older/call scripts/device-bench.sh   # measure another build
# (CALL_DEVICE_BENCH_SECONDS=0 skips the long run.)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release --test device_audio -- --ignored --nocapture device_to_device_benchmark
