#!/usr/bin/env bash
# Interop of `call` and `call-relay` with independent MoQ (draft-18) implementations:
#   1. `call demo` through moq-relay-ietf (crates.io), our client against their relay;
#   2. moq-clock-ietf (crates.io) publishing and subscribing through our `call-relay`,
#      with the relay token presented in SETUP, and refused with a wrong token.
# Both tools are installed from crates.io into a cache directory, reused when present.
#
# Usage: scripts/interop.sh [--install-only]
# Env:   CALL_INTEROP_CACHE (default ~/.cache/call-interop), CALL_INTEROP_SECONDS (3)
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${CALL_INTEROP_CACHE:-$HOME/.cache/call-interop}"
seconds="${CALL_INTEROP_SECONDS:-3}"
mkdir -p "$cache"

install() {
  local crate="$1" version="$2" bin="$3"
  if [ -x "$cache/bin/$bin" ]; then
    echo "interop: $bin present in $cache/bin"
  else
    echo "interop: installing $crate $version into $cache (several minutes of CPU)"
    cargo install --locked --root "$cache" "$crate@$version"
  fi
}
install moq-relay-ietf 0.8.0 moq-relay-ietf
install moq-clock-ietf 0.6.25 moq-clock-ietf
[ "${1:-}" = "--install-only" ] && exit 0

# A throwaway certificate for moq-relay-ietf (it needs files).
if [ ! -f "$cache/cert.pem" ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 365 \
    -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    -keyout "$cache/key.pem" -out "$cache/cert.pem" 2>/dev/null
fi

cargo build --quiet --manifest-path "$root/Cargo.toml" --bins
call="$root/target/debug/call"
relay="$root/target/debug/call-relay"
work="$(mktemp -d)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -INT "$p" 2>/dev/null || true; done
  sleep 0.5   # moq-relay-ietf ignores SIGINT
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
failed=0
result() { # name status detail
  printf 'interop: %-58s %s  %s\n' "$1" "$2" "$3"
  [ "$2" = ok ] || failed=1
}

# 1. call demo through moq-relay-ietf.
port=$((20000 + RANDOM % 20000))
"$cache/bin/moq-relay-ietf" --bind "127.0.0.1:$port" --tls-cert "$cache/cert.pem" \
  --tls-key "$cache/key.pem" >"$work/ietf.log" 2>&1 &
pids+=($!)
sleep 1
if "$call" demo --moq-relay "moqt://127.0.0.1:$port" --moq-insecure -n 3 -s "$seconds" --json \
  >"$work/demo.json" 2>"$work/demo.err"; then
  result "call demo (3 parties) via moq-relay-ietf 0.8.0" ok "$(head -c 300 "$work/demo.json")"
else
  result "call demo (3 parties) via moq-relay-ietf 0.8.0" FAILED \
    "$(tail -n 3 "$work/demo.err" | tr '\n' ' ' | head -c 400) $(head -c 300 "$work/demo.json")"
fi

# 2. moq-clock-ietf through call-relay (token mode).
moq_port=$((20000 + RANDOM % 20000))
CALL_RELAY_MOQ_BIND="127.0.0.1:$moq_port" CALL_RELAY_NOSTR_BIND="127.0.0.1:0" \
  CALL_RELAY_AUTH=token "$relay" >"$work/relay.out" 2>"$work/relay.err" &
pids+=($!)
sleep 1
url="https://localhost:$moq_port"
token="$(head -c 32 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=')"
wrong="$(head -c 32 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=')"
clock="$cache/bin/moq-clock-ietf"
# moq-clock-ietf's URL is https://; raw QUIC is moqt://. Our relay speaks both.
url="moqt://localhost:$moq_port"
"$clock" "$url" --tls-disable-verify --publish --namespace call-interop \
  --auth-token "0:$token" >"$work/clock-pub.out" 2>"$work/clock-pub.err" &
pids+=($!)
sleep 1
timeout $((seconds + 2)) "$clock" "$url" --tls-disable-verify --namespace call-interop \
  --auth-token "0:$token" >"$work/clock-sub.out" 2>"$work/clock-sub.err" || true
lines=$(grep -c . "$work/clock-sub.out" || true)
if [ "$lines" -ge 2 ]; then
  result "moq-clock-ietf 0.6.25 pub+sub via call-relay (right token)" ok \
    "$lines clock lines, last: $(tail -n 1 "$work/clock-sub.out")"
else
  result "moq-clock-ietf 0.6.25 pub+sub via call-relay (right token)" FAILED \
    "$(tail -n 3 "$work/clock-sub.err" | tr '\n' ' ' | head -c 400)"
fi
timeout $((seconds + 2)) "$clock" "$url" --tls-disable-verify --namespace call-interop \
  --auth-token "0:$wrong" >"$work/clock-bad.out" 2>"$work/clock-bad.err" || true
bad=$(grep -c . "$work/clock-bad.out" || true)
if [ "$bad" -eq 0 ]; then
  result "moq-clock-ietf subscriber with a wrong token is refused" ok \
    "$(grep -io 'unauthorized\|error.*' "$work/clock-bad.err" | head -n 1 | head -c 200)"
else
  result "moq-clock-ietf subscriber with a wrong token is refused" FAILED "$bad lines received"
fi
exit "$failed"
