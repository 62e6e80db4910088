"""An RTSP camera that is late, drops and comes back: the pipeline resumes by itself."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import MEDIA, free_port, free_udp_pair

from edgecam.config import Settings
from edgecam.media.pipeline import Pipeline
from edgecam.vision.synthetic import SyntheticDetector

HERE = Path(__file__).parent


class _Camera:
    def __init__(self, port: int, clip: Path = MEDIA / "pedestrians_30s.mp4") -> None:
        self.port = port
        self.clip = clip
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(HERE / "rtsp_camera.py"),
                str(self.port),
                str(self.clip),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            if self.proc.stdout:
                self.proc.stdout.close()
            self.proc = None


@pytest.fixture
def camera() -> Iterator[_Camera]:
    cam = _Camera(free_port())
    yield cam
    cam.stop()


def _wait(pred: object, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


def test_rtsp_camera_late_dropped_and_back(camera: _Camera) -> None:
    settings = Settings.model_validate(
        {
            "cameras": [
                {
                    "name": "door",
                    "source": f"rtsp://127.0.0.1:{camera.port}/cam",
                    "rtsp_latency_ms": 100,
                    "reconnect_min_s": 0.5,
                    "reconnect_max_s": 2,
                    "stall_timeout_s": 3,
                    "rtp_port": free_udp_pair(),
                }
            ],
            "vision": {"detect_fps": 5},
        }
    )
    pipeline = Pipeline(settings, mode="live", detector=SyntheticDetector(2, (640, 352)))
    runner = threading.Thread(target=pipeline.run, daemon=True)
    pipeline.start()  # the camera is not up yet: no error, the pipeline retries
    runner.start()
    try:
        time.sleep(1.5)
        assert pipeline.stats.frames == 0
        camera.start()
        assert _wait(lambda: pipeline.stats.frames > 20, 20), "never got frames"
        assert pipeline.frame_size == (768, 576)
        restarts = pipeline.stats.restarts
        camera.stop()  # the camera drops
        time.sleep(2)
        frames_while_down = pipeline.stats.frames
        time.sleep(2)
        assert pipeline.stats.frames - frames_while_down <= 3
        camera.start()  # ...and comes back on the same address
        assert _wait(lambda: pipeline.stats.frames > frames_while_down + 20, 25), "did not resume"
        assert pipeline.stats.restarts > restarts
        assert pipeline.stats.detections > 0
    finally:
        pipeline.stop()
        runner.join(timeout=15)
        pipeline.close()
    assert not runner.is_alive()


def _live(source: str, **camera: object) -> Settings:
    return Settings.model_validate(
        {
            "cameras": [
                {"name": "door", "source": source, "rtp_port": free_udp_pair()} | camera,
            ],
            "vision": {"detect_fps": 5},
        }
    )


def test_returning_camera_streams_within_5_s(camera: _Camera) -> None:
    # Default backoff: a camera away for a while is probed often enough to be back at once.
    settings = _live(f"rtsp://127.0.0.1:{camera.port}/cam", rtsp_latency_ms=100)
    pipeline = Pipeline(settings, mode="live", detector=SyntheticDetector(2, (640, 352)))
    runner = threading.Thread(target=pipeline.run, daemon=True)
    camera.start()
    pipeline.start()
    runner.start()
    try:
        assert _wait(lambda: pipeline.stats.frames > 20, 20), "never got frames"
        camera.stop()
        time.sleep(8)  # long enough for a doubling backoff to reach 8-16 s
        frames = pipeline.stats.frames
        camera.start()
        back = time.monotonic()
        assert _wait(lambda: pipeline.stats.frames > frames + 5, 10), "did not resume"
        assert time.monotonic() - back < 5
    finally:
        pipeline.stop()
        runner.join(timeout=15)
        pipeline.close()


def test_rtsp_camera_changing_size_mid_stream_carries_on(tmp_path: Path) -> None:
    ffmpeg = ["ffmpeg", "-v", "error", "-y", "-f", "lavfi"]
    x264 = ["-c:v", "libx264", "-x264-params", "repeat-headers=1", "-pix_fmt", "yuv420p"]
    parts = []
    for size in ("320x240", "640x360"):
        part = tmp_path / f"{size}.mp4"
        subprocess.run([*ffmpeg, "-i", f"testsrc=s={size}:r=30:d=2", *x264, str(part)], check=True)
        parts.append(f"file '{part}'\n")
    (tmp_path / "list.txt").write_text("".join(parts))
    joined = tmp_path / "joined.mp4"
    concat = ["-f", "concat", "-safe", "0", "-i", str(tmp_path / "list.txt")]
    subprocess.run(["ffmpeg", "-v", "error", *concat, "-c", "copy", str(joined)], check=True)
    camera = _Camera(free_port(), joined)
    camera.start()
    settings = _live(f"rtsp://127.0.0.1:{camera.port}/cam", rtsp_latency_ms=100)
    pipeline = Pipeline(settings, mode="live", detector=SyntheticDetector(2, (640, 352)))
    runner = threading.Thread(target=pipeline.run, daemon=True)
    pipeline.start()
    runner.start()
    try:
        # Both halves arrive (120 frames, a few lost to the RTSP start), with no restart.
        assert _wait(lambda: pipeline.stats.frames >= 100, 20), pipeline.stats
        assert pipeline.stats.restarts == 0
        assert pipeline.frame_size == (320, 240)
    finally:
        pipeline.stop()
        runner.join(timeout=15)
        pipeline.close()
        camera.stop()
