"""The live demo: the whole device with its own broker, checked by its results."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

from edgecam.config import load_settings
from edgecam.device.demo_live import run_live_demo


def test_live_demo_end_to_end(tmp_path: Path) -> None:
    code = run_live_demo(load_settings(), tmp_path, seconds=0, token="t0ken-for-the-test-only")
    assert code == 0
    clips = sorted((tmp_path / "clips").glob("*.mp4"))
    sidecars = [json.loads(c.with_suffix(".json").read_text()) for c in clips]
    alert_clips = [s for s in sidecars if s["reason"] == "alert:occupancy"]
    assert alert_clips, [s["reason"] for s in sidecars]
    for clip, sidecar in zip(clips, sidecars, strict=True):
        assert hashlib.sha256(clip.read_bytes()).hexdigest() == sidecar["sha256"]
    # Everything the device made reached the broker: nothing waits in the outbox.
    with sqlite3.connect(tmp_path / "outbox.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM messages").fetchone() == (0,)
    assert (tmp_path / "edgecam-live.yaml").stat().st_mode & 0o077 == 0  # holds secrets
