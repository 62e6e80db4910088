"""``edgecam demo``: the system on the bundled clips, with figures printed as it goes.

1. Offline: the ``people`` profile on the pedestrian clip and the ``mask`` profile on the
   face clip, each to an annotated MP4 and a per-frame events file.
2. Live: the whole device (``edgecam run``) with a Mosquitto of its own: the pedestrian clip
   played as a camera, statistics and an alert over MQTT, the alert's clip downloaded through
   its signed link, a command sent over MQTT (see :mod:`edgecam.device.demo_live`).
"""

from __future__ import annotations

import json
import logging
import secrets
from collections import Counter
from pathlib import Path

from edgecam.config import Settings, load_settings
from edgecam.media.offline import process_file

__all__ = ["run_demo"]

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
MEDIA = ROOT / "media"


def _summarise(events: Path) -> str:
    rows = [json.loads(line) for line in events.read_text().splitlines()]
    ids = {t["id"] for r in rows for t in r["tracks"]}
    peak: Counter[str] = Counter()
    for r in rows:
        for label, n in r["counts"].items():
            peak[label] = max(peak[label], n)
    return f"{len(rows)} frames, {len(ids)} tracks, peak counts {dict(peak)}"


def _offline(settings: Settings, out: Path) -> None:
    jobs = [
        ("people", MEDIA / "pedestrians_30s.mp4", "people"),
        ("mask", MEDIA / "faces.mp4", "faces"),
    ]
    for profile, clip, name in jobs:
        cfg = settings.model_copy(
            update={"vision": settings.vision.model_copy(update={"profile": profile})}
        )
        video, events = out / f"{name}.mp4", out / f"{name}.jsonl"
        print(f"\n== offline, profile {profile}: {clip.name} -> {video}")
        result = process_file(cfg, clip, video, events=events, progress=True)
        print(
            f"   {result.frames} frames in {result.seconds:.1f} s = {result.fps:.1f} fps, "
            f"{result.detections} detections; {_summarise(events)}"
        )


def run_demo(config: str | None, out: Path, live_seconds: float) -> int:
    """Run the demo, writing everything under ``out``; 0 when every step worked."""
    out.mkdir(parents=True, exist_ok=True)
    settings = load_settings(config)
    _offline(settings, out)
    if live_seconds > 0:
        from edgecam.device.demo_live import run_live_demo

        token = secrets.token_urlsafe(16)
        return run_live_demo(settings, out, live_seconds, token)
    return 0
