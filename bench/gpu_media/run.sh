#!/bin/bash
# Device side of pack.sh: edgecam's media-backend probes and launch lines through
# gst-launch-1.0 on the GPU machine, with the carried GStreamer 1.22.
R=$(cd "$(dirname "$0")/../.." && pwd)
cd "$R" || exit 1
tar -C /tmp -xJf .gpu/gst.tar.xz
G=/tmp/gst
REAL=$(find / -name 'libnvrtc.so.1*' -not -path '/proc/*' 2>/dev/null | grep -v builtins | head -1)
export LD_LIBRARY_PATH=$G/lib:$(dirname "$REAL"):/usr/local/nvidia/lib64
export GST_PLUGIN_SYSTEM_PATH=$G/plugins GST_PLUGIN_PATH= GST_PLUGIN_SCANNER=$G/bin/gst-plugin-scanner
export GST_REGISTRY=/tmp/gst-registry.bin PATH=$G/bin:$PATH XDG_RUNTIME_DIR=/tmp
export EDGECAM_REAL_NVRTC=$REAL
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
nproc
probe() {
    if gst-launch-1.0 -q $(cat ".gpu/$1.txt") >/tmp/probe.log 2>&1; then echo "  $1: runs"
    else echo "  $1: FAILS: $(grep -m1 -i 'error\|erroneous' /tmp/probe.log)"; fi
}
for nvrtc in "$REAL" "$G/lib/libnvrtc_arch.so"; do
    rm -f "$GST_REGISTRY"
    export GST_CUDA_NVRTC_LIBNAME=$nvrtc
    echo "== NVRTC $nvrtc: nvcodec's CUDA elements and encoders"
    gst-inspect-1.0 nvcodec | grep -E "^  (cuda|nvh26[45](enc|dec))" | sed 's/^/  /'
    for p in probe_nvidia probe_nvdec probe_nvh264enc; do probe $p; done
done
frames() {
    gst-launch-1.0 -v filesrc location="$1" ! qtdemux ! h264parse ! fakesink silent=false 2>/dev/null |
        grep -c "chain"
}
run_line() {  # name, env...
    local name=$1; shift
    env "$@" gst-launch-1.0 -v $(cat ".gpu/line_$name.txt") 2>&1 |
        grep -o "nvh264dec\|openh264dec\|GstNvH264Enc\|GstX264Enc" | sort -u | tr '\n' ' '
    for round in 1 2 3; do
        /usr/bin/time -f "%e %U %S" -o /tmp/time.txt env "$@" gst-launch-1.0 -q $(cat ".gpu/line_$name.txt") >/tmp/run.log 2>&1 ||
            { echo "  $name: FAILS: $(grep -m1 -i error /tmp/run.log)"; return; }
        read -r wall user sys </tmp/time.txt
        echo "  $name round $round: $(frames "/tmp/out_$name.mp4") frames out, ${wall} s wall, ${user} s user, ${sys} s sys"
    done
}
# A longer clip, so that each process's start (CUDA's among it) weighs less: the face clip
# four times over, re-encoded as the camera would send it.
gst-launch-1.0 -q concat name=c ! videoconvert ! x264enc speed-preset=ultrafast bitrate=2500 \
    key-int-max=30 ! h264parse ! mp4mux ! filesink location=/tmp/long720.mp4 \
    $(for k in 1 2 3 4; do echo "filesrc location=media/faces_720p30_15s.mp4 ! qtdemux ! h264parse ! nvh264dec ! c."; done) || exit 1
sed -i 's|location=media/faces_720p30_15s.mp4|location=/tmp/long720.mp4|' .gpu/line_*.txt
echo "== edgecam process, mask profile's branches, $(frames /tmp/long720.mp4) frames of 720p30"
run_line nvidia_x264
run_line nvidia_nvh264
run_line nvdec_x264
run_line cpu_x264 GST_PLUGIN_FEATURE_RANK=nvh264dec:NONE,nvh264sldec:NONE,openh264dec:PRIMARY
echo "== NVDEC alone: streams of 1080p30 decoded at once"
gst-launch-1.0 -q filesrc location=media/faces_720p30_15s.mp4 ! qtdemux ! h264parse ! nvh264dec ! \
    cudaupload ! cudaconvertscale ! "video/x-raw(memory:CUDAMemory),width=1920,height=1080" ! \
    cudadownload ! x264enc speed-preset=ultrafast bitrate=6000 key-int-max=30 ! h264parse ! \
    mp4mux ! filesink location=/tmp/1080p.mp4 || exit 1
gst-launch-1.0 -q concat name=c ! h264parse ! mp4mux ! filesink location=/tmp/1080p4.mp4 \
    $(for k in 1 2 3 4; do echo "filesrc location=/tmp/1080p.mp4 ! qtdemux ! h264parse ! c."; done) || exit 1
n1080=$(frames /tmp/1080p4.mp4)
for n in 1 4 8 16 32; do
    start=$(date +%s.%N)
    for k in $(seq "$n"); do
        gst-launch-1.0 -q filesrc location=/tmp/1080p4.mp4 ! qtdemux ! h264parse ! nvh264dec ! \
            fakesink sync=false >/dev/null 2>&1 &
    done
    wait
    end=$(date +%s.%N)
    python3 -c "n=$n; f=$n1080; w=$end-$start; print(f'  {n} streams: {n*f} frames in {w:.2f} s: {n*f/w:.0f} fps, {n*f/w/30:.1f} x 1080p30')"
done
