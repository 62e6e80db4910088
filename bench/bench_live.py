"""Live: a 720p30 clip played in real time through the full pipeline, default mask profile.

``Pipeline(settings, mode="live", rtp=True)`` with the camera source set to the clip (sinks
sync to the clock, so the clip plays at 30 fps), the real models (CenterFace + mask
classifier) detecting as fast as allowed (``vision.detect_fps``, default 10), Norfair, the
overlay, x264 and RTP to two loopback ports that this script holds open (and never reads).

After a warm-up, over a measuring window it reports:

* output fps and frames short of real time: distinct frames (RTP timestamps) reaching the
  RTP sink vs window x 30;
* lateness of each frame at the RTP sink (clock running time - the frame's running time):
  a frame with lateness > 0 is sent late, i.e. the pipeline fell behind the camera;
* the video queue's fill level (``video_q``; full is normal for a file source, which runs
  ahead of the clock until the queues fill);
* detections a second and the mean detector call;
* CPU cores used (process CPU time / wall) and the CPU of each thread (where time goes);
* RSS: the max of VmRSS sampled every 100 ms, and VmHWM.

    .venv/bin/python bench/bench_live.py [CLIP] [--seconds 40] [--warmup 5] [--profile mask]
        [--synthetic N] [--camera-json '{"privacy": {"faces": "pixelate"}, "zones": {...}}']
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c

from edgecam.config import load_settings
from edgecam.device.workers import limit_malloc_arenas
from edgecam.media.gst import Gst
from edgecam.media.launch import Names
from edgecam.media.pipeline import Pipeline
from edgecam.vision.synthetic import SyntheticDetector

FPS = 30
TARGET_DETS = 8.0
TARGET_RSS_MB = 350.0


def udp_pair() -> tuple[list[socket.socket], int]:
    """Two bound UDP sockets on consecutive loopback ports (the pipeline's RTP consumers)."""
    for _ in range(50):
        a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        a.bind(("127.0.0.1", 0))
        port = a.getsockname()[1]
        if port >= 65533:
            a.close()
            continue
        b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            b.bind(("127.0.0.1", port + 1))
        except OSError:
            a.close()
            b.close()
            continue
        return [a, b], port
    raise SystemExit("no two consecutive free UDP ports")


def thread_cpu() -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) of every thread of this process, by thread id."""
    tick = os.sysconf("SC_CLK_TCK")
    result = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat", encoding="ascii", errors="replace") as f:
                text = f.read()
        except OSError:
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        result[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / tick)
    return result


class Monitor:
    """Counts frames and their lateness at the RTP sink; samples queues and memory."""

    def __init__(self, pipeline: Pipeline, warmup: float) -> None:
        self.p = pipeline
        self.warmup = warmup
        self.t_start = time.monotonic()
        self.window_open = False
        self.window_done = False
        self.frames = 0
        self.late = 0
        self.lateness_ms: list[float] = []
        self._last_pts = -1
        self.video_q_levels: list[int] = []
        self.rss_kb: list[int] = []
        self.t0 = self.cpu0 = 0.0
        self.threads0: dict[int, tuple[str, float]] = {}
        self.dets0 = 0
        self.detect_s0 = 0.0
        self._lock = threading.Lock()
        rtp_sink = pipeline.element(Names.RTP_SINK)
        video_q = pipeline.element(Names.VIDEO_QUEUE)
        if rtp_sink is None or video_q is None:
            raise SystemExit("the pipeline has no RTP sink or no video queue to watch")
        self.video_q = video_q
        sink = rtp_sink.get_static_pad("sink")
        # rtph264pay pushes a frame's packets as one buffer list or as single buffers
        # (depending on the frame): both must be counted.
        sink.add_probe(Gst.PadProbeType.BUFFER | Gst.PadProbeType.BUFFER_LIST, self._on_rtp)

    def _on_rtp(self, pad: Gst.Pad, info: Gst.PadProbeInfo) -> Gst.PadProbeReturn:
        if info.type & Gst.PadProbeType.BUFFER:
            buf = info.get_buffer()
        else:
            packets = info.get_buffer_list()
            if packets is None or packets.length() == 0:
                return Gst.PadProbeReturn.OK
            buf = packets.get(0)
        pts = buf.pts
        if pts == self._last_pts or not self.window_open:
            return Gst.PadProbeReturn.OK
        self._last_pts = pts
        now = self.p.running_time_ns()
        seg_event = pad.get_sticky_event(Gst.EventType.SEGMENT, 0)
        if now is None or seg_event is None:
            return Gst.PadProbeReturn.OK
        running = seg_event.parse_segment().to_running_time(Gst.Format.TIME, pts)
        late_ms = (now - running) / 1e6
        with self._lock:
            self.frames += 1
            self.lateness_ms.append(late_ms)
            if late_ms > 0:
                self.late += 1
        return Gst.PadProbeReturn.OK

    def __call__(self, pipeline: Pipeline) -> None:
        now = time.monotonic()
        if not self.window_open and not self.window_done and now - self.t_start >= self.warmup:
            self.t0, self.cpu0 = now, time.process_time()
            self.threads0 = thread_cpu()
            self.dets0, self.detect_s0 = pipeline.stats.detections, pipeline.stats.detect_seconds
            self.window_open = True
        if self.window_open:
            self.video_q_levels.append(int(self.video_q.get_property("current-level-buffers")))
        self.rss_kb.append(c.proc_status_kb("VmRSS"))

    def close_window(self) -> dict[str, Any]:
        self.window_open = False
        self.window_done = True
        wall = time.monotonic() - self.t0
        cpu = time.process_time() - self.cpu0
        threads1 = thread_cpu()
        names = {t.native_id: t.name for t in threading.enumerate()}
        by_name: dict[str, float] = defaultdict(float)
        for tid, (name, seconds) in threads1.items():
            before = self.threads0.get(tid, (name, 0.0))[1]
            label = names.get(tid, name)
            if label == name and name.startswith("python"):
                label = "unnamed native (x264 workers, ONNX Runtime pool, ...)"
            by_name[label] += seconds - before
        dets = self.p.stats.detections - self.dets0
        return {
            "wall": wall,
            "cpu": cpu,
            "threads": sorted(by_name.items(), key=lambda kv: -kv[1]),
            "dets": dets,
            "detect_s": self.p.stats.detect_seconds - self.detect_s0,
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("clip", nargs="?", type=Path, default=c.default_clip())
    parser.add_argument("--seconds", type=float, default=40, help="measuring window")
    parser.add_argument("--warmup", type=float, default=5, help="seconds before measuring")
    parser.add_argument("--profile", default="mask", choices=["mask", "people"])
    parser.add_argument("--detect-fps", type=float, default=10)
    parser.add_argument(
        "--synthetic",
        type=int,
        default=None,
        help="a SyntheticDetector of N moving boxes instead of the models (a known load)",
    )
    parser.add_argument(
        "--camera-json",
        default="{}",
        help='more camera keys, e.g. \'{"privacy": {"faces": "pixelate"}}\'',
    )
    parser.add_argument(
        "--overlay",
        default=None,
        choices=["direct", "overlaycomposition", "cairooverlay"],
        help="the drawing element (default: config's, direct)",
    )
    args = parser.parse_args()

    socks, port = udp_pair()
    cam = {**json.loads(args.camera_json), "source": str(args.clip), "loop": True, "rtp_port": port}
    limit_malloc_arenas()  # as `edgecam run` / `edgecam worker inference` do
    overrides: dict[str, object] = {
        "cameras": [cam],
        "vision.profile": args.profile,
        "vision.detect_fps": args.detect_fps,
    }
    if args.overlay is not None:
        overrides["overlay.element"] = args.overlay
    settings = load_settings(**overrides)
    print(
        f"clip {args.clip}; profile {args.profile}; camera {args.camera_json}; "
        f"overlay {settings.overlay.element}; {c.machine_note()}"
    )
    rss_imports = c.proc_status_kb("VmRSS") / 1024
    detector = SyntheticDetector(args.synthetic) if args.synthetic is not None else None
    with Pipeline(settings, mode="live", rtp=True, detector=detector) as pipeline:
        rss_built = c.proc_status_kb("VmRSS") / 1024
        monitor = Monitor(pipeline, args.warmup)
        result: dict[str, Any] = {}

        def tick(p: Pipeline) -> None:
            monitor(p)
            if monitor.window_open and time.monotonic() - monitor.t0 >= args.seconds:
                result.update(monitor.close_window())
                p.stop()

        pipeline.start()
        pipeline.run(timeout=args.warmup + args.seconds + 30, on_tick=tick)
    for s in socks:
        s.close()
    if not result:
        raise SystemExit("the pipeline ended before the measuring window closed")

    wall = result["wall"]
    fps_out = monitor.frames / wall
    expected = round(wall * FPS)
    short = max(0, expected - monitor.frames)
    dets_s = result["dets"] / wall
    cores = result["cpu"] / wall
    rss_max = max(monitor.rss_kb) / 1024
    hwm = c.proc_status_kb("VmHWM") / 1024
    lat = monitor.lateness_ms
    levels = monitor.video_q_levels
    detect_ms = 1000 * result["detect_s"] / max(result["dets"], 1)

    print("\nCPU by thread over the window (cores = CPU seconds / wall seconds):")
    print(
        c.table(
            ["thread", "cores"],
            [[name, sec / wall] for name, sec in result["threads"] if sec / wall >= 0.005],
        )
    )
    rows = [
        ["window (s)", wall, ""],
        ["output fps (frames at the RTP sink / s)", fps_out, f"{FPS}"],
        ["frames out / expected (window x 30)", f"{monitor.frames} / {expected}", "no shortfall"],
        ["frames short of real time", short, "0"],
        ["frames sent late (lateness > 0)", monitor.late, "0"],
        ["lateness at the sink, median / max (ms)", f"{c.median(lat):.1f} / {max(lat):.1f}", "< 0"],
        [
            "video_q level, min / median / max (of 30)",
            f"{min(levels)} / {c.median(levels):.0f} / {max(levels)}",
            "",
        ],
        ["detections / s", dets_s, f">= {TARGET_DETS:g}"],
        ["mean detector call (ms)", detect_ms, ""],
        ["CPU cores used (process CPU / wall)", cores, ""],
        ["RSS max sampled / VmHWM (MB)", f"{rss_max:.0f} / {hwm:.0f}", f"< {TARGET_RSS_MB:g}"],
        ["  RSS after imports / pipeline built (MB)", f"{rss_imports:.0f} / {rss_built:.0f}", ""],
    ]
    print()
    print(c.table(["live figure", "value", "target"], rows))
    ok_fps = fps_out >= FPS * 0.98 and short <= 1
    print(
        f"\ntargets: 30 fps out, no drops -> {c.verdict(ok_fps)} ({fps_out:.1f} fps, {short} "
        f"frames short, {monitor.late} sent late by up to {max(0.0, max(lat)):.0f} ms); "
        f">= {TARGET_DETS:g} detections/s -> {c.verdict(dets_s >= TARGET_DETS)}; "
        f"RSS < {TARGET_RSS_MB:g} MB -> {c.verdict(max(rss_max, hwm) < TARGET_RSS_MB)}"
    )
    print(f"finished {c.machine_note()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
