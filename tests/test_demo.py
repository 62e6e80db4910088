"""The live demo: four worker processes, RTSP, a saved clip, an authenticated download."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgecam.config import load_settings
from edgecam.device.demo_live import run_live_demo


def test_live_demo_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = run_live_demo(load_settings(), tmp_path, seconds=0, token="t0ken-for-the-test-only")
    out = capsys.readouterr().out
    assert code == 0, out
    assert "RTSP client decoded 30 frames of 768x576" in out
    assert "matches the clip" in out
    assert "without the token the file server answers 401" in out
    for worker in ("streaming", "recorder", "fileserver", "inference"):
        assert f"worker {worker} stopped (exit 0)" in out
    clips = list((tmp_path / "clips").glob("*.mp4"))
    assert len(clips) == 1
    sidecar = json.loads(clips[0].with_suffix(".json").read_text())
    assert sidecar["reason"] == "demo" and 7.5 <= sidecar["end"] - sidecar["start"] <= 10.5
    assert (tmp_path / "edgecam-live.yaml").stat().st_mode & 0o077 == 0  # holds the token
