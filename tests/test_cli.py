"""`edgecam process` as a user runs it, and the in-process metadata subscriber API."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import MEDIA

from edgecam.config import load_settings
from edgecam.media.pipeline import Pipeline
from edgecam.vision.analytics import FrameMeta
from edgecam.vision.synthetic import SyntheticDetector

EDGECAM = [sys.executable, "-m", "edgecam.cli"]


def test_process_command_writes_video_and_events(tmp_path: Path) -> None:
    out, events = tmp_path / "o.mp4", tmp_path / "e.jsonl"
    res = subprocess.run(
        [
            *EDGECAM,
            "process",
            str(MEDIA / "faces.mp4"),
            "--out",
            str(out),
            "--events",
            str(events),
            "--profile",
            "mask",
            "--detect-fps",
            "5",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert out.stat().st_size > 10_000
    rows = [json.loads(line) for line in events.read_text().splitlines()]
    assert len(rows) == 120
    assert [r["frame"] for r in rows] == list(range(120))
    assert set(rows[0]) == {"frame", "pts", "tracks", "counts"}
    assert "done: 120 frames" in res.stderr  # the progress/summary lines


def test_process_command_rejects_bad_input_clearly(tmp_path: Path) -> None:
    res = subprocess.run(
        [*EDGECAM, "process", str(tmp_path / "missing.mp4"), "--out", str(tmp_path / "o.mp4")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 1
    assert "error:" in res.stderr and "missing.mp4" in res.stderr
    assert "Traceback" not in res.stderr
    res = subprocess.run(
        [*EDGECAM, "process", str(MEDIA / "faces.mp4"), "--out", str(tmp_path / "o.avi")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2 and "MP4" in res.stderr  # a usage error


def _detections(stderr: str) -> int:
    match = re.search(r"done: \d+ frames .*, (\d+) detections", stderr)
    assert match, stderr
    return int(match.group(1))


def test_process_command_honours_config_and_environment(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("vision:\n  profile: people\n  detect_fps: 2\n")
    events = tmp_path / "e.jsonl"
    args = [*EDGECAM, "process", str(MEDIA / "motion_720p30_4s.mp4"), "--out"]
    args += [str(tmp_path / "o.mp4"), "--events", str(events), "--config", str(cfg)]

    def run(*extra: str, **env: str) -> subprocess.CompletedProcess[str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("EDGECAM_")}
        res = subprocess.run(
            [*args, *extra], capture_output=True, text=True, timeout=120, env={**base, **env}
        )
        assert res.returncode == 0, res.stderr
        return res

    res = run(EDGECAM_VISION__DETECT_FPS="1")
    rows = [json.loads(line) for line in events.read_text().splitlines()]
    assert set(rows[-1]["counts"]) == {"person"}  # profile from the file
    assert _detections(res.stderr) == 4  # 1 a second (the environment) over 4 s, not 2
    # The command line beats the environment, which beats the file.
    res = run("--detect-fps", "0", EDGECAM_VISION__DETECT_FPS="30")
    assert _detections(res.stderr) == 0
    res = run("--profile", "mask", "--detect-fps", "1", EDGECAM_VISION__PROFILE="people")
    rows = [json.loads(line) for line in events.read_text().splitlines()]
    assert set(rows[-1]["counts"]) <= {"mask", "no_mask", "undecided"}
    assert "NanoDet" not in res.stderr and "CenterFace" in res.stderr


def test_subscribers_receive_typed_frame_messages(tmp_path: Path) -> None:
    settings = load_settings(**{"vision.detect_fps": 10})
    settings = settings.model_copy(
        update={
            "cameras": [
                settings.cameras[0].model_copy(
                    update={"name": "lobby", "source": str(MEDIA / "faces.mp4")}
                )
            ]
        }
    )
    with Pipeline(
        settings,
        mode="offline",
        rtp=False,
        out_file=tmp_path / "o.mp4",
        detector=SyntheticDetector(4, (640, 352)),
    ) as pipeline:
        everything = pipeline.meta_bus.subscribe(maxsize=0)
        tiny = pipeline.meta_bus.subscribe(maxsize=2)  # a slow consumer: loses the oldest
        pipeline.start()
        pipeline.run()
    got: list[FrameMeta] = []
    while (meta := everything.get(timeout=5)) is not None:
        got.append(meta)
    assert len(got) == 120
    assert all(m.camera == "lobby" for m in got)
    assert [m.frame for m in got] == list(range(120))
    assert sum(m.detected for m in got) == 40
    assert any(len(m.tracks) == 4 for m in got)
    assert all(m.pts >= 0 for m in got)
    assert pipeline.meta_bus.dropped > 100
    assert tiny.qsize() == 2


def test_camera_password_never_logged(tmp_path: Path) -> None:
    """A camera that cannot be reached is logged about, again and again, without its
    password or its URL token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGECAM_")}
    env |= {
        "EDGECAM_CAMERAS__0__SOURCE": "rtsp://admin:Hunter2pw@127.0.0.1:1/cam?token=TOK123456",
        "EDGECAM_VISION__DETECT_FPS": "0",
        "EDGECAM_RECORDER__RING_DIR": str(tmp_path / "run"),
    }
    proc = subprocess.Popen(
        [*EDGECAM, "-v", "worker", "inference"],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + 60
    while sum("reconnecting" in line for line in lines) < 2 and time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=30)[1]
    stderr = "".join(lines) + rest
    assert sum("reconnecting" in line for line in lines) >= 2, stderr  # it tried, and logged
    assert "Hunter2pw" not in stderr and "TOK123456" not in stderr


def test_bench_command_runs_a_bench_that_imports_its_helpers() -> None:
    # The benches import bench/_common.py, which `edgecam bench` did not put on sys.path.
    res = subprocess.run(
        [*EDGECAM, "bench", "fleet-memory", "--help"], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    assert "--alerts" in res.stdout
