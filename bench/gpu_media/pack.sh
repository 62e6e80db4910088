#!/bin/bash
# Packs what the GPU benchmark machine lacks to run edgecam's media backends there with
# gst-launch-1.0 (it has an NVIDIA driver but no GStreamer, and no package registry):
# this machine's GStreamer 1.22 (Debian 12) with the plugins the launch lines use and every
# library they load but the C/C++ runtime, the NVRTC stand-in (nvrtc_arch.c), and the
# launch lines and probes as edgecam builds them (lines.py). Writes .gpu/ in the repo root
# (ignored by git); run.sh then runs there:
#   bash bench/gpu_media/pack.sh    # here
#   device run, carry [".gpu"]:  bash bench/gpu_media/run.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT=$ROOT/.gpu
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT" "$WORK/gst/lib" "$WORK/gst/plugins" "$WORK/gst/bin"
PLUGINS=/usr/lib/x86_64-linux-gnu/gstreamer-1.0
for p in coreelements isomp4 videoparsersbad nvcodec videoconvertscale videotestsrc app \
    playback typefindfunctions x264 openh264; do
    cp "$PLUGINS/libgst$p.so" "$WORK/gst/plugins/"
done
cp /usr/bin/gst-launch-1.0 /usr/bin/gst-inspect-1.0 \
    /usr/lib/x86_64-linux-gnu/gstreamer1.0/gstreamer-1.0/gst-plugin-scanner "$WORK/gst/bin/"
for f in "$WORK"/gst/plugins/*.so "$WORK"/gst/bin/*; do
    ldd "$f" | awk '/=>/ {print $3}'
done | sort -u | grep -v -E '/(libc|libm|libpthread|libdl|librt|libstdc\+\+|libgcc_s)\.so' |
    while read -r lib; do cp -L "$lib" "$WORK/gst/lib/"; done
gcc -O2 -Wall -shared -fPIC -o "$WORK/gst/lib/libnvrtc_arch.so" "$ROOT/bench/gpu_media/nvrtc_arch.c" -ldl
tar -C "$WORK" -cJf "$OUT/gst.tar.xz" gst
"$ROOT/.venv/bin/python" "$ROOT/bench/gpu_media/lines.py" "$OUT"
du -sh "$OUT"
