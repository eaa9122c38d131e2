#!/bin/sh
# Coverage-guided fuzzing on the stable toolchain (cargo-afl): call-relay's SETUP tokens
# and namespace bindings (relay/fuzz), and the client's received frames, call signaling
# and group events (tests/fuzz).
#
#   scripts/fuzz.sh [MINUTES] [TARGET…]   default 5 minutes per target, every target
#
# Needs cargo-afl (`cargo install cargo-afl`, then `cargo afl config --build` once) and,
# on Debian, `apt-get install afl++` for afl-fuzz's system settings tools (optional).
# Findings go to target/fuzz/afl-<target>. Prints executions and crashes per target and
# copies crashing inputs to the package's regressions/ folder, which the unit tests replay
# (relay: `moq::tests::fuzz_setup_tokens_and_namespace_bindings`; client: `fuzz::tests`).
# Exits 1 if any target crashed or did not start.
set -eu

minutes=${1:-5}
[ $# -gt 0 ] && shift
root=$(cd "$(dirname "$0")/.." && pwd)
target_dir="$root/target/fuzz"
all="setup_tokens received_frames signaling_tags group_events"
targets=${*:-$all}

# Seeds: valid inputs written by the unit tests that fuzz the same functions.
seeds="$target_dir/seeds"
mkdir -p "$seeds/setup_tokens"
CALL_RELAY_FUZZ_WRITE_SEEDS="$seeds/setup_tokens" CALL_RELAY_FUZZ_CASES=1 \
    cargo test -q -p call-relay --lib fuzz_setup_tokens >/dev/null
CALL_FUZZ_WRITE_SEEDS="$seeds" cargo test -q -p call --lib fuzz:: >/dev/null

(cd "$root/relay/fuzz" && CARGO_TARGET_DIR="$target_dir" cargo afl build --release)
(cd "$root/tests/fuzz" && CARGO_TARGET_DIR="$target_dir" cargo afl build --release)

status=0
for t in $targets; do
    case $t in
        setup_tokens) regressions="$root/relay/fuzz/regressions" ;;
        received_frames | signaling_tags | group_events) regressions="$root/tests/fuzz/regressions/$t" ;;
        *) echo "unknown target $t (targets: $all)" >&2; exit 2 ;;
    esac
    out="$target_dir/afl-$t"
    mkdir -p "$out"
    # group_events builds a real MLS group per input (~50 ms): AFL's default timeout
    # (calibrated, often 100 ms) would report loaded-machine slowness as hangs.
    case $t in
        group_events) exec_timeout="-t 2000" ;;
        *) exec_timeout="" ;;
    esac
    # No UI (logs instead), no CPU-frequency or core-pattern checks: this also runs in
    # containers and CI, where those settings cannot be changed.
    AFL_NO_UI=1 AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 \
        AFL_NO_AFFINITY=1 \
        cargo afl fuzz -V $((minutes * 60)) $exec_timeout -i "$seeds/$t" -o "$out" \
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
        name="$(basename "$f" | cut -d, -f1 | tr : -)"
        case $t in
            setup_tokens) cp "$f" "$regressions/$t-$name" ;;
            *) cp "$f" "$regressions/$name" ;;
        esac
        status=1
    done
done
exit $status
