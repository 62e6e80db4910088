"""The pipeline's parts: detectors owned by the caller, the bus handlers, the backoff, the
media backends, the overlay's composition cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from conftest import MEDIA

from edgecam.config import Settings, load_settings
from edgecam.media.pipeline import Pipeline
from edgecam.vision.detections import Detections
from edgecam.vision.synthetic import SyntheticDetector


class _CountingDetector(SyntheticDetector):
    """A real detector that counts its calls and remembers being closed."""

    def __init__(self) -> None:
        super().__init__(3, (320, 192))
        self.calls = 0
        self.closed = 0

    def detect(self, frame: npt.NDArray[np.uint8]) -> Detections:
        self.calls += 1
        return super().detect(frame)

    def close(self) -> None:
        self.closed += 1


def _offline(**overrides: object) -> Settings:
    return load_settings(
        **{"cameras": [{"name": "main", "source": str(MEDIA / "motion_720p30_4s.mp4")}]},
        **{"vision.detect_fps": 5},
        **overrides,
    )


def test_detectors_from_outside_are_used_and_not_closed(tmp_path: Path) -> None:
    shared = [_CountingDetector()]
    with Pipeline(
        _offline(), mode="offline", rtp=False, out_file=tmp_path / "o.mp4", detectors=shared
    ) as p:
        p.start()
        p.run(timeout=60)
        # 4.2 s at 5 detections a second (t = 0 included), all made by the shared detector
        assert p.stats.detections == shared[0].calls == 21
    assert shared[0].closed == 0  # its owner closes it, not the pipeline


def test_an_owned_detector_is_closed(tmp_path: Path) -> None:
    own = _CountingDetector()
    with Pipeline(_offline(), mode="offline", rtp=False, detector=own):
        pass
    assert own.closed == 1


def test_detector_and_detectors_together_are_refused() -> None:
    with pytest.raises(ValueError, match="either detector or detectors"):
        Pipeline(
            _offline(),
            mode="offline",
            rtp=False,
            detector=_CountingDetector(),
            detectors=[_CountingDetector()],
        )
