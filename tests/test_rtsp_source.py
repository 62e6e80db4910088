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
    def __init__(self, port: int) -> None:
        self.port = port
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(HERE / "rtsp_camera.py"),
                str(self.port),
                str(MEDIA / "pedestrians_30s.mp4"),
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
