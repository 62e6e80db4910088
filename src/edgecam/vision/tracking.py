"""Multi-object tracking behind a small interface; Norfair is the default backend."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from edgecam.config import TrackerConfig
from edgecam.native import TrackTable
from edgecam.vision.detections import Detections

__all__ = ["TRACKERS", "NorfairTracker", "NumpyTracker", "TrackUpdate", "Tracker"]


class TrackUpdate:
    """What one tracker step returns: the live tracks, and which of them a detection hit now."""

    __slots__ = ("matched", "tracks")

    def __init__(self, tracks: Detections, matched: np.ndarray) -> None:
        self.tracks = tracks
        self.matched = matched


class Tracker(Protocol):
    def update(self, detections: Detections | None, period: int = 1) -> TrackUpdate:
        """Advance one frame. ``detections`` is None on frames the detector skipped;
        ``period`` is the number of frames since the previous detections."""
        ...


class NorfairTracker:
    """Norfair with IoU distance on boxes; carries boxes with its Kalman filter between
    detections, so the detector can run on every Nth frame only."""

    def __init__(self, config: TrackerConfig) -> None:
        # Imported here: Norfair brings SciPy (and OpenCV when installed), ~60 MB of memory
        # that the default backend does without.
        import norfair

        self._detection = norfair.Detection
        self._tracker = norfair.Tracker(
            distance_function="iou",
            distance_threshold=config.distance_threshold,
            hit_counter_max=config.hit_counter_max,
            initialization_delay=config.initialization_delay,
        )
        self._confidence: dict[int, float] = {}  # last detection score of each live track

    def update(self, detections: Detections | None, period: int = 1) -> TrackUpdate:
        if period < 1:
            raise ValueError(f"period must be >= 1, got {period}")
        nf_dets: list[Any] | None = None
        if detections is not None:
            points = detections.xyxy.reshape(-1, 2, 2).astype(np.float64)
            nf_dets = [
                # No per-point scores: Norfair then takes its cheaper all-points-seen path;
                # the index in ``data`` leads back to the detection's confidence.
                self._detection(points=points[i], data=i)
                for i in range(len(detections))
            ]
            objects = self._tracker.update(detections=nf_dets, period=period)
        else:
            objects = self._tracker.update()
        n = len(objects)
        xyxy = np.empty((n, 4), dtype=np.float32)
        confidence = np.zeros(n, dtype=np.float32)
        attribute = np.full(n, np.nan, dtype=np.float32)
        ids = np.empty(n, dtype=np.int64)
        matched = np.zeros(n, dtype=bool)
        current = {id(d) for d in nf_dets} if nf_dets else set()
        known = self._confidence
        self._confidence = {}
        for k, obj in enumerate(objects):
            tid = obj.id if obj.id is not None else -1  # returned objects have ids
            xyxy[k] = obj.estimate.reshape(4)
            ids[k] = tid
            last = obj.last_detection
            if detections is not None and last is not None and id(last) in current:
                matched[k] = True
                attribute[k] = detections.attribute[last.data]
                confidence[k] = detections.confidence[last.data]
            else:
                confidence[k] = known.get(tid, 0.0)
            self._confidence[tid] = float(confidence[k])
        tracks = Detections(
            xyxy=xyxy,
            confidence=confidence,
            class_id=np.zeros(n, dtype=np.int64),
            attribute=attribute,
            tracker_id=ids,
        )
        return TrackUpdate(tracks, matched)


class NumpyTracker:
    """Norfair's model, compiled: one C call a frame for all tracks (``tracker.backend:
    numpy``, the name it had as a numpy version).

    The same per-coordinate Kalman filter as Norfair's ``OptimizedKalmanFilter`` (R=4,
    Q=0.1, initial variances 10 / 0 / 1), the same hit counters, initialisation delay and
    greedy IoU matching (initialised tracks first), so it gives Norfair's tracks; but a frame
    costs one call of ``edgecam.native`` instead of ~70 us of Python per object (Norfair) or
    some twenty numpy calls (the numpy version, kept in tests/test_tracking.py as the
    reference this one must equal bit for bit).
    """

    def __init__(self, config: TrackerConfig) -> None:
        # An install without the compiled core fails here, saying so.
        self._table = TrackTable(
            config.distance_threshold, config.hit_counter_max, config.initialization_delay
        )

    def update(self, detections: Detections | None, period: int = 1) -> TrackUpdate:
        if detections is None:
            step = self._table.step(None, period=period)
        else:
            step = self._table.step(
                detections.xyxy, detections.confidence, detections.attribute, period
            )
        tracks = Detections(
            xyxy=step.xyxy,
            confidence=step.confidence,
            attribute=step.attribute,
            tracker_id=step.ids,
        )
        return TrackUpdate(tracks, step.matched)


# Config ``tracker.backend`` -> implementation.
TRACKERS: dict[str, type[NorfairTracker] | type[NumpyTracker]] = {
    "norfair": NorfairTracker,
    "numpy": NumpyTracker,
}
