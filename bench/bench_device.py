"""The whole device (`edgecam run`, every worker a process, a real Mosquitto): what it costs
and how fast it reacts.

1. Footprint: the 720p30 clip played live as one camera (mask profile by default): CPU
   cores and total RSS of all the device's processes, and frames out against the source's
   30 fps (dropped frames) from its own stats messages.
2. Restart after kill -9 of each worker: seconds until the device reports it running again,
   and until an RTSP client decodes frames again.
3. Alerts: an occupancy rule that the pedestrian clip trips again and again: latency from
   the frame that tripped it (the alert's ``started``) to the alert at an MQTT subscriber,
   and from the alert's end to its clip's announcement (target: post + 3 s).

    edgecam bench device [--seconds 40] [--clip PATH] [--profile mask|people]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import default_clip, machine_note, median, percentile, table, verdict

from edgecam.device.broker import LocalBroker
from edgecam.device.demo_live import _rtsp_frames, demo_config
from edgecam.device.harness import Device

TARGET_RSS_MB = 500
ALERT_P95_S = 1.0


def _device(folder: Path, broker: LocalBroker, name: str, **overrides: Any) -> Device:
    folder.mkdir(parents=True, exist_ok=True)
    config = demo_config(folder, broker, "bench-token-0123456789", device=name)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    dev = Device(folder, config, broker)
    dev.start()
    dev.wait_running()
    return dev


def _tree(dev: Device) -> list[psutil.Process]:
    assert dev.proc is not None
    root = psutil.Process(dev.proc.pid)
    return [root, *root.children(recursive=True)]


def footprint(folder: Path, broker: LocalBroker, clip: Path, profile: str, seconds: float) -> None:
    camera = {"name": "main", "source": str(clip), "loop": True}
    dev = _device(
        folder,
        broker,
        "bench-foot",
        cameras=[camera],
        vision={"profile": profile, "detect_fps": 10},
        stats={"interval_s": 5},
    )
    try:
        time.sleep(5)  # warm up: models loaded, ring filling
        procs = _tree(dev)
        cpu0 = {p.pid: sum(p.cpu_times()[:2]) for p in procs}
        mark = dev.listener.mark()
        t0 = time.monotonic()
        peak_rss = peak_pss = 0.0
        while time.monotonic() - t0 < seconds:
            live = [p for p in procs if p.is_running()]
            # RSS counts shared libraries once per process; PSS shares them out.
            peak_rss = max(peak_rss, sum(p.memory_info().rss for p in live) / 2**20)
            peak_pss = max(peak_pss, sum(p.memory_full_info().pss for p in live) / 2**20)
            time.sleep(1)
        elapsed = time.monotonic() - t0
        cores = sum(sum(p.cpu_times()[:2]) - cpu0[p.pid] for p in procs) / elapsed
        stats = [d for k, d in dev.listener.messages[mark:] if k == "stats"]
        out_frames = sum(s["fps_out"] * (s["end"] - s["start"]) for s in stats)
        span = sum(s["end"] - s["start"] for s in stats)
        per_proc = {
            " ".join(p.cmdline()[p.cmdline().index("worker") :][:4])
            if "worker" in p.cmdline()
            else "orchestrator": p
            for p in procs
        }
    finally:
        dev.stop()
        dev.listener.close()
    expected = 30 * span
    print(f"\n1. Footprint, {clip.name} live, profile {profile}, {elapsed:.0f} s")
    print(f"   processes: {', '.join(per_proc)}")
    print(
        table(
            ["cores (all processes)", "peak RSS MB (sum)", "peak PSS MB (sum)", "frames out",
             "expected at 30 fps", "dropped"],
            [[cores, peak_rss, peak_pss, round(out_frames), round(expected),
              max(0, round(expected - out_frames))]],
        )
    )  # fmt: skip
    print(
        f"   RSS (sum) < {TARGET_RSS_MB} MB: {verdict(peak_rss < TARGET_RSS_MB)}; "
        f"PSS (sum) < {TARGET_RSS_MB} MB: {verdict(peak_pss < TARGET_RSS_MB)}"
    )


def restarts(folder: Path, broker: LocalBroker) -> None:
    dev = _device(folder, broker, "bench-kill", supervisor={"restart_min_s": 0.25})
    rows = []
    try:
        port = dev.config["streaming"]["port"]
        for key in ("fileserver", "streaming", "recorder/main", "inference"):
            pid = dev.workers()[key]["pid"]
            mark = dev.listener.mark()
            t0 = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            dev.wait_running(timeout=60, after=mark)
            running = time.monotonic() - t0
            frames, _ = _rtsp_frames(f"rtsp://127.0.0.1:{port}/main", count=1, timeout=20)
            playing = time.monotonic() - t0 if frames else float("nan")
            rows.append([key, running, playing])
            time.sleep(2)
    finally:
        dev.stop()
        dev.listener.close()
    print("\n2. Restart after kill -9 (seconds)")
    print(table(["worker", "running again", "RTSP plays again"], rows))
    print(f"   all running again within 2 s: {verdict(all(r[1] < 2 for r in rows))}")


def alerts(folder: Path, broker: LocalBroker, seconds: float) -> None:
    post = 2.0
    dev = _device(
        folder,
        broker,
        "bench-alert",
        recorder={"pre_s": 1, "post_s": post, "max_clip_s": 30},
        alerts={
            # Incidents apart (cool-down > pre + post + a segment), so that no two alerts'
            # clips merge into one and each clip's delay is its own.
            "occupancy": {"max_people": 5, "hold_s": 0, "clear_s": 0.3, "cooldown_s": 6},
        },
    )
    try:
        time.sleep(seconds)
        time.sleep(post + 8)  # let the last clips arrive
        msgs = [d for k, d in dev.listener.messages if k == "alerts"]
    finally:
        dev.stop()
        dev.listener.close()
    raised = [m for m in msgs if m["state"] == "raised"]
    to_mqtt = [m["_received"] - m["started"] for m in raised]
    ended = {m["alert_id"]: m for m in msgs if m["state"] == "ended"}
    clip_after_end = [
        m["_received"] - ended[m["alert_id"]]["ended"]
        for m in msgs
        if m["state"] == "clip" and m["alert_id"] in ended
        and m["_received"] > ended[m["alert_id"]]["ended"]
    ]  # fmt: skip
    print(f"\n3. Alerts ({len(raised)} raised in {seconds:.0f} s, occupancy > 5, post {post} s)")
    print(
        table(
            ["", "n", "p50 s", "p95 s", "max s", "target"],
            [
                ["frame -> alert at subscriber", len(to_mqtt), median(to_mqtt),
                 percentile(to_mqtt, 95), max(to_mqtt, default=float("nan")),
                 f"p95 < {ALERT_P95_S}"],
                ["alert end -> clip announced", len(clip_after_end), median(clip_after_end),
                 percentile(clip_after_end, 95), max(clip_after_end, default=float("nan")),
                 f"< post + 3 = {post + 3:.0f}"],
            ],
        )
    )  # fmt: skip
    print(f"   alert p95 < {ALERT_P95_S} s: {verdict(percentile(to_mqtt, 95) < ALERT_P95_S)}")
    ok = bool(clip_after_end) and max(clip_after_end) < post + 3
    print(f"   clip ready within post + 3 s of the end: {verdict(ok)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=40, help="length of each measurement")
    parser.add_argument("--clip", type=Path, default=None, help="clip for the footprint")
    parser.add_argument("--profile", choices=["mask", "people"], default="mask")
    parser.add_argument("--only", choices=["footprint", "restarts", "alerts"], action="append")
    args = parser.parse_args()
    clip = args.clip or default_clip()
    print(f"edgecam bench device: {machine_note()}")
    parts = args.only or ["footprint", "restarts", "alerts"]
    with tempfile.TemporaryDirectory(prefix="bench-device-") as tmp:
        folder = Path(tmp)
        names = ["bench-foot", "bench-kill", "bench-alert"]
        with LocalBroker(folder / "broker", names) as broker:
            if "footprint" in parts:
                footprint(folder / "foot", broker, clip, args.profile, args.seconds)
            if "restarts" in parts:
                restarts(folder / "kill", broker)
            if "alerts" in parts:
                alerts(folder / "alert", broker, args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
