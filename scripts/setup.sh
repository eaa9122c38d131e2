#!/usr/bin/env bash
# Installs the Debian packages the build needs: cmake (libopus is built from source by the
# opus crate), ALSA headers (cpal), pkg-config and OpenSSL headers (SQLCipher in mdk-sqlite-storage),
# and a user-space PulseAudio with ALSA's pulse plugin, whose null sinks give the device tests a
# real clocked sound card on machines without one. Safe to run again.
set -euo pipefail

packages=(cmake libasound2-dev pkg-config libssl-dev pulseaudio pulseaudio-utils libasound2-plugins)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all packages present (${packages[*]})"
  exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "setup: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
  sudo="sudo"
fi
echo "setup: installing ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
