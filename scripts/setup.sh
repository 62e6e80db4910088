#!/usr/bin/env bash
# Set up edgecam on a fresh Debian 12 machine (run as root, or with sudo available).
# Idempotent: a second run installs nothing and prints little.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  python3-venv python3-gi python3-gi-cairo python3-gst-1.0
  gir1.2-gstreamer-1.0 gir1.2-gst-plugins-base-1.0 gir1.2-gst-rtsp-server-1.0
  gstreamer1.0-tools gstreamer1.0-plugins-base gstreamer1.0-plugins-good
  gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly gstreamer1.0-libav
  gstreamer1.0-x gstreamer1.0-nice gir1.2-gst-plugins-bad-1.0 mosquitto ffmpeg
  fonts-dejavu-core chromium postgresql gcc libc6-dev
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "setup: installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian's interpreter, so that Debian's PyGObject and GStreamer bindings are visible.
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.edgecam-installed
# Installing also builds the compiled core (src/edgecam/native/*.c) in place.
native_built() { compgen -G "src/edgecam/native/_core*.so" >/dev/null; }
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ] || ! native_built \
  || [ -n "$(find src/edgecam/native -name '*.c' -newer "$stamp")" ]; then
  echo "setup: installing edgecam and its Python dependencies into .venv"
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev,bench]"
  touch "$stamp"
fi
