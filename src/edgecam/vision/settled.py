"""Tracks whose label is settled, handed from the analytics to the detector's thread.

The analytics (on the video's streaming thread) publish, after every frame, the boxes of the
tracks whose label vote is settled (:meth:`edgecam.vision.votes.LabelVoter.settled`); the
mask detector (on its own thread) reads the latest boxes before classifying a frame's faces
and skips the faces that overlap one of them: those tracks keep their label without the
classifier's cost. One reference swap under a lock: the reader never sees half an update.

The analytics hold boxes in source pixels, the detector in model-frame pixels: the source is
scaled to fit the model frame, centred between borders (``videoscale add-borders``), and the
settled boxes are mapped the same way before they are compared. A source with non-square
pixels maps a little off; its faces then overlap less and are classified (never mislabelled).
"""

from __future__ import annotations

import threading

import numpy as np
import numpy.typing as npt

from edgecam.vision.letterbox import letterbox

__all__ = ["SETTLED_IOU", "SettledTracks", "unsettled"]

FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]

# A face is taken for a settled track's when their boxes overlap this much. The snapshot is
# a few frames older than the detector's frame; faces move little in that time.
SETTLED_IOU = 0.5


class SettledTracks:
    """The latest boxes of the settled tracks; written by one thread, read by another."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._boxes: FloatArray = np.zeros((0, 4), dtype=np.float32)
        self._size = (1, 1)

    def publish(self, boxes: FloatArray, frame_size: tuple[int, int]) -> None:
        """Replace the snapshot with ``boxes`` (N, 4) ``x1, y1, x2, y2`` in the pixels of a
        source frame of ``frame_size`` (width, height)."""
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        with self._lock:
            self._boxes, self._size = boxes, frame_size

    def boxes(self) -> tuple[FloatArray, tuple[int, int]]:
        """The latest boxes (never modified afterwards: safe to keep) and their frame size."""
        with self._lock:
            return self._boxes, self._size

    def boxes_in(self, size: tuple[int, int]) -> FloatArray:
        """The latest boxes in the pixels of a ``size`` (width, height) frame that holds the
        source fitted into it as the model's frame is (see :mod:`edgecam.vision.letterbox`)."""
        boxes, (sw, sh) = self.boxes()
        if not len(boxes):
            return boxes
        box = letterbox((sw, sh), (1, 1), size)
        factor = np.array([box.width / sw, box.height / sh] * 2, dtype=np.float32)
        offset = np.array([box.x, box.y] * 2, dtype=np.float32)
        mapped: FloatArray = boxes * factor + offset
        return mapped


def unsettled(faces: FloatArray, settled: FloatArray, iou: float = SETTLED_IOU) -> BoolArray:
    """Which of ``faces`` (N, 4) still need the classifier: those that overlap no settled box
    by ``iou`` or more. One face per settled box, the best-overlapping one first."""
    need = np.ones(len(faces), dtype=bool)
    if not len(faces) or not len(settled):
        return need
    lo = np.maximum(faces[:, None, :2], settled[None, :, :2])
    hi = np.minimum(faces[:, None, 2:], settled[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=2)
    area_f = np.prod(np.clip(faces[:, 2:] - faces[:, :2], 0, None), axis=1)
    area_s = np.prod(np.clip(settled[:, 2:] - settled[:, :2], 0, None), axis=1)
    overlap = inter / np.maximum(area_f[:, None] + area_s[None, :] - inter, 1e-9)
    # Greedy one-to-one: two faces on one settled track must not both skip.
    taken: set[int] = set()
    for flat in np.argsort(-overlap, axis=None, kind="stable"):
        f, s = divmod(int(flat), overlap.shape[1])
        if not overlap[f, s] >= iou:
            break
        if need[f] and s not in taken:
            need[f] = False
            taken.add(s)
    return need
