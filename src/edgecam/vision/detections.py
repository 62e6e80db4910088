"""The one typed object that travels between vision stages."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

__all__ = ["PRIVACY_FACE", "Detections", "Detector"]

# class_id of the faces a non-face profile's detector adds for privacy only (never counted).
PRIVACY_FACE = 1

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]


def _floats(n: int) -> FloatArray:
    return np.full(n, np.nan, dtype=np.float32)


@dataclass(frozen=True, slots=True)
class Detections:
    """N boxes with their scores, as numpy arrays of one length.

    ``xyxy`` is (N, 4) float32 pixel corners ``x1, y1, x2, y2``; ``attribute`` is an optional
    per-box probability of the profile's attribute (P(mask) for faces), NaN where unknown;
    ``tracker_id`` is -1 until a tracker assigns one.
    """

    xyxy: FloatArray
    confidence: FloatArray
    class_id: IntArray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    attribute: FloatArray = field(default_factory=lambda: _floats(0))
    tracker_id: IntArray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __post_init__(self) -> None:
        n = len(self.xyxy)
        # Fill omitted optional arrays to length n; frozen, so go through object.__setattr__.
        if len(self.class_id) != n:
            if len(self.class_id):
                raise ValueError(f"class_id has {len(self.class_id)} rows, xyxy has {n}")
            object.__setattr__(self, "class_id", np.zeros(n, dtype=np.int64))
        if len(self.attribute) != n:
            if len(self.attribute):
                raise ValueError(f"attribute has {len(self.attribute)} rows, xyxy has {n}")
            object.__setattr__(self, "attribute", _floats(n))
        if len(self.tracker_id) != n:
            if len(self.tracker_id):
                raise ValueError(f"tracker_id has {len(self.tracker_id)} rows, xyxy has {n}")
            object.__setattr__(self, "tracker_id", np.full(n, -1, dtype=np.int64))
        if self.xyxy.shape != (n, 4):
            raise ValueError(f"xyxy must have shape (N, 4), got {self.xyxy.shape}")
        if len(self.confidence) != n:
            raise ValueError(f"confidence has {len(self.confidence)} rows, xyxy has {n}")

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros((0, 4), dtype=np.float32), np.zeros(0, dtype=np.float32))

    def __len__(self) -> int:
        return len(self.xyxy)

    def __getitem__(self, index: npt.NDArray[np.bool_] | npt.NDArray[np.int64]) -> Detections:
        return Detections(
            self.xyxy[index],
            self.confidence[index],
            self.class_id[index],
            self.attribute[index],
            self.tracker_id[index],
        )

    def mapped(self, sx: float, sy: float, dx: float, dy: float) -> Detections:
        """The same boxes with x -> x * sx + dx and y -> y * sy + dy."""
        factor = np.array([sx, sy, sx, sy], dtype=np.float32)
        offset = np.array([dx, dy, dx, dy], dtype=np.float32)
        return Detections(
            self.xyxy * factor + offset,
            self.confidence,
            self.class_id,
            self.attribute,
            self.tracker_id,
        )

    def usable(self) -> Detections:
        """Only the boxes a tracker can follow: finite corners, a positive width and height,
        a finite score (a broken model can give NaN, infinite or inverted boxes: NaN boxes
        would be tracked as people and written as NaN, which is no JSON). Itself when all
        are."""
        xyxy = self.xyxy
        ok = np.isfinite(xyxy).all(axis=1) & np.isfinite(self.confidence)
        ok &= (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
        return self if ok.all() else self[ok]

    def scaled(self, sx: float, sy: float) -> Detections:
        """The same boxes with x multiplied by ``sx`` and y by ``sy``."""
        factor = np.array([sx, sy, sx, sy], dtype=np.float32)
        return Detections(
            self.xyxy * factor, self.confidence, self.class_id, self.attribute, self.tracker_id
        )


class Detector(Protocol):
    """Finds objects in one RGB frame of the detector's own input size."""

    @property
    def input_size(self) -> tuple[int, int]:
        """(width, height) of the frames :meth:`detect` expects."""
        ...

    def detect(self, frame: npt.NDArray[np.uint8]) -> Detections:
        """Detect in ``frame`` (H, W, 3) RGB uint8; boxes in that frame's pixels."""
        ...

    def close(self) -> None:
        """Release the model's resources."""
        ...
