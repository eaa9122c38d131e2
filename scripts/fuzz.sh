#!/bin/sh
# Coverage-guided fuzzing of call-relay on the stable toolchain (cargo-afl).
#
#   scripts/fuzz.sh [MINUTES]        default 5 minutes per target
#
# Needs cargo-afl (`cargo install cargo-afl`, then `cargo afl config --build` once) and,
# on Debian, `apt-get install afl++` for afl-fuzz's system settings tools (optional).
# Targets live in relay/fuzz; findings go to target/fuzz/afl-<target>. Prints executions
# and crashes per target and copies crashing inputs to relay/fuzz/regressions/, where the
# unit test `fuzz_setup_tokens_and_namespace_bindings` replays them.
set -eu

minutes=${1:-5}
root=$(cd "$(dirname "$0")/.." && pwd)
target_dir="$root/target/fuzz"
targets="setup_tokens"

# Seeds: valid inputs written by the unit test that fuzzes the same function.
seeds="$target_dir/seeds"
CALL_RELAY_FUZZ_WRITE_SEEDS="$seeds" CALL_RELAY_FUZZ_CASES=1 \
    cargo test -q -p call-relay --lib fuzz_setup_tokens >/dev/null

cd "$root/relay/fuzz"
CARGO_TARGET_DIR="$target_dir" cargo afl build --release

status=0
for t in $targets; do
    out="$target_dir/afl-$t"
    mkdir -p "$out"
    # No UI (logs instead), no CPU-frequency or core-pattern checks: this also runs in
    # containers and CI, where those settings cannot be changed.
    AFL_NO_UI=1 AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 \
        AFL_NO_AFFINITY=1 \
        cargo afl fuzz -V $((minutes * 60)) -i "$seeds" -o "$out" \
        "$target_dir/release/$t" >"$out/fuzz.log" 2>&1 || true
    stats="$out/default/fuzzer_stats"
    if [ ! -f "$stats" ]; then
        echo "$t: afl-fuzz did not start; see $out/fuzz.log" >&2
        tail -n 20 "$out/fuzz.log" >&2
        status=1
        continue
    fi
    execs=$(sed -n 's/^execs_done *: //p' "$stats")
    rate=$(sed -n 's/^execs_per_sec *: //p' "$stats")
    corpus=$(sed -n 's/^corpus_count *: //p' "$stats")
    crashes=$(sed -n 's/^saved_crashes *: //p' "$stats")
    hangs=$(sed -n 's/^saved_hangs *: //p' "$stats")
    echo "$t: $execs executions ($rate/s), corpus $corpus, crashes $crashes, hangs $hangs"
    for f in "$out"/default/crashes/id:*; do
        [ -e "$f" ] || continue
        cp "$f" "$root/relay/fuzz/regressions/$t-$(basename "$f" | cut -d, -f1 | tr : -)"
        status=1
    done
done
exit $status
