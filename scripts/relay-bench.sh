#!/usr/bin/env bash
# Relay benchmark: P publishers x S subscribers (every subscriber session subscribes to
# every track) of RATE objects/s of SIZE bytes on loopback, against call-relay with stream
# delivery (a QUIC stream per object), call-relay with datagram delivery (an OBJECT_DATAGRAM
# per object), and then moq-relay-ietf with each delivery under the same load. Prints per run:
# delivered fraction, latency through the relay (publisher send -> subscriber receive,
# p50/p99), relay CPU % (of one core) and peak RSS, then the ratios.
#
# Usage: scripts/relay-bench.sh [P] [S] [SECONDS]     (default 10 100 10 = 1000 subscriptions)
# Env:   CALL_INTEROP_CACHE (where scripts/interop.sh installs moq-relay-ietf)
#        CALL_BENCH_PIN (1 by default with 2+ CPUs and taskset: the relay runs on CPU 0 and
#        the load generator on the others, so neither steals the other's core; 0 = off)
#        CALL_BENCH_IETF (1 by default; 0 = skip moq-relay-ietf and its install, and compare
#        call-relay's datagram delivery with its own stream delivery only)
set -euo pipefail

P="${1:-10}"; S="${2:-100}"; SECS="${3:-10}"
RATE=50; SIZE=80
root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${CALL_INTEROP_CACHE:-$HOME/.cache/call-interop}"
mkdir -p "$cache"
ietf="${CALL_BENCH_IETF:-1}"
[ "$ietf" = 0 ] || [ -x "$cache/bin/moq-relay-ietf" ] ||
  cargo install --locked --root "$cache" moq-relay-ietf@0.8.0   # as scripts/interop.sh does
[ -f "$cache/cert.pem" ] || openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
  -nodes -days 365 -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
  -keyout "$cache/key.pem" -out "$cache/cert.pem" 2>/dev/null
cargo build --quiet --release --manifest-path "$root/Cargo.toml" -p call-relay --bin call-relay -p call --bin call-relay-load
load="$root/target/release/call-relay-load"
tick=$(getconf CLK_TCK)

# Pinning keeps the load generator off the relay's core: "per core" then means one core.
relay_cpu=(); load_cpu=()
if [ "${CALL_BENCH_PIN:-1}" = 1 ] && [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null; then
  relay_cpu=(taskset -c 0); load_cpu=(taskset -c "1-$(($(nproc) - 1))")
  echo "relay pinned to CPU 0, load generator to CPUs 1-$(($(nproc) - 1))" >&2
fi

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# bench NAME PORT DELIVERY -- relay command...
bench() {
  local name="$1" port="$2" delivery="$3"; shift 4
  "${relay_cpu[@]}" "$@" >/tmp/relay-bench-$name.log 2>&1 &
  local pid=$!
  sleep 1.5
  local t0 c0 t1 c1 out
  t0=$(date +%s.%N); c0=$(cpu_ticks $pid)
  out=$("${load_cpu[@]}" "$load" --url "moqt://127.0.0.1:$port" --publishers "$P" --subscribers "$S" \
    --rate "$RATE" --size "$SIZE" --seconds "$SECS" --delivery "$delivery")
  t1=$(date +%s.%N); c1=$(cpu_ticks $pid)
  local rss; rss=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
  # moq-relay-ietf ignores SIGINT; call-relay shuts down on it.
  kill -INT $pid 2>/dev/null || true; sleep 0.5
  kill -KILL $pid 2>/dev/null || true; wait $pid 2>/dev/null || true
  local cpu; cpu=$(echo "($c1 - $c0) / $tick / ($t1 - $t0) * 100" | bc -l)
  printf '%s %s cpu_pct=%.1f peak_rss_kib=%s\n' "$name" "$out" "$cpu" "$rss"
}

port_a=$((20000 + RANDOM % 20000)); port_b=$((port_a + 1)); port_c=$((port_a + 2)); port_d=$((port_a + 3))
# Every load session comes from 127.0.0.1: lift the per-address session limit.
relay_env=(CALL_RELAY_NOSTR_BIND=127.0.0.1:0 CALL_RELAY_AUTH=open CALL_RELAY_STATS_INTERVAL=0
  CALL_RELAY_MAX_SESSIONS_PER_ADDRESS=100000
  CALL_RELAY_EPHEMERAL=true)
a=$(bench call-relay "$port_a" stream -- env CALL_RELAY_MOQ_BIND="127.0.0.1:$port_a" \
  "${relay_env[@]}" "$root/target/release/call-relay")
echo "$a"
d=$(bench call-relay-datagram "$port_c" datagram -- env CALL_RELAY_MOQ_BIND="127.0.0.1:$port_c" \
  "${relay_env[@]}" "$root/target/release/call-relay")
echo "$d"

field() { echo "$1" | grep -o "\"$2\":[0-9.]*" | cut -d: -f2; }
kv() { echo "$1" | grep -o "$2=[0-9.]*" | cut -d= -f2; }
# Throughput per core: delivered objects per second per 100 % CPU.
tpc() { echo "$(field "$1" received) / $SECS / ($(kv "$1" cpu_pct) / 100)" | bc -l; }
# ratios LABEL A B
ratios() {
  printf 'ratios (%s): delivered %.3f  p50 %.2f  p99 %.2f  cpu %.2f  rss %.2f  objects/s per core %.2f\n' \
  "$1" \
  "$(echo "$(field "$2" delivered) / $(field "$3" delivered)" | bc -l)" \
  "$(echo "$(field "$2" latency_p50_ms) / $(field "$3" latency_p50_ms)" | bc -l)" \
  "$(echo "$(field "$2" latency_p99_ms) / $(field "$3" latency_p99_ms)" | bc -l)" \
  "$(echo "$(kv "$2" cpu_pct) / $(kv "$3" cpu_pct)" | bc -l)" \
  "$(echo "$(kv "$2" peak_rss_kib) / $(kv "$3" peak_rss_kib)" | bc -l)" \
  "$(echo "$(tpc "$2") / $(tpc "$3")" | bc -l)"
}
printf 'objects/s per core: call-relay stream %.0f, datagram %.0f\n' "$(tpc "$a")" "$(tpc "$d")"
ratios "call-relay datagram / stream" "$d" "$a"
[ "$ietf" = 0 ] && exit 0
ietf_cmd=("$cache/bin/moq-relay-ietf" --tls-cert "$cache/cert.pem" --tls-key "$cache/key.pem")
b=$(bench moq-relay-ietf "$port_b" stream -- "${ietf_cmd[@]}" --bind "127.0.0.1:$port_b")
echo "$b"
# moq-relay-ietf forwards OBJECT_DATAGRAMs through moq-transport's datagram tracks.
e=$(bench moq-relay-ietf-datagram "$port_d" datagram -- "${ietf_cmd[@]}" --bind "127.0.0.1:$port_d")
echo "$e"
printf 'objects/s per core: moq-relay-ietf stream %.0f, datagram %.0f\n' "$(tpc "$b")" "$(tpc "$e")"
ratios "call-relay stream / moq-relay-ietf stream" "$a" "$b"
ratios "call-relay datagram / moq-relay-ietf datagram" "$d" "$e"
ratios "call-relay datagram / moq-relay-ietf stream" "$d" "$b"
exit 0
