"""A detector that needs no model: N boxes moving on fixed paths.

For benchmarks and tests of everything around the detector (tracker, votes, drawing, the
pipeline) at a known load, and for trying the system on a machine without models.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from edgecam.vision.detections import Detections

__all__ = ["SyntheticDetector"]


class SyntheticDetector:
    """Returns ``count`` boxes that drift a few pixels per call, P(mask) alternating."""

    def __init__(self, count: int = 20, input_size: tuple[int, int] = (640, 352)) -> None:
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        self._count = count
        self._size = input_size
        self._calls = 0

    @property
    def input_size(self) -> tuple[int, int]:
        return self._size

    def detect(self, frame: npt.NDArray[np.uint8]) -> Detections:
        w, h = self._size
        if frame.shape[:2] != (h, w):
            raise ValueError(f"frame is {frame.shape[1]}x{frame.shape[0]}, expected {w}x{h}")
        k = np.arange(self._count, dtype=np.float32)
        cols = 5
        bw, bh = w / (cols + 1) * 0.6, h / 5 * 0.6
        span = max(1, int(w / cols - bw - 8))
        step = (self._calls * 2) % (2 * span)
        x = (k % cols) * (w / cols) + 4 + min(step, 2 * span - step)  # back and forth
        y = (k // cols) * (h / 4) + 4
        xyxy = np.stack([x, y, x + bw, y + bh], axis=1).astype(np.float32)
        self._calls += 1
        return Detections(
            xyxy=xyxy,
            confidence=np.full(self._count, 0.9, dtype=np.float32),
            attribute=np.where(k % 2 == 0, 0.9, 0.1).astype(np.float32),
        )

    def close(self) -> None:
        pass
