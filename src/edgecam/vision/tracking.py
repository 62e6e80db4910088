"""Multi-object tracking behind a small interface; Norfair is the default backend."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from edgecam.config import TrackerConfig
from edgecam.native import check as check_native
from edgecam.native import match_iou
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
    """Norfair's model, vectorised over all tracks at once.

    The same per-coordinate Kalman filter as Norfair's ``OptimizedKalmanFilter`` (R=4,
    Q=0.1, initial variances 10 / 0 / 1), the same hit counters, initialisation delay and
    greedy IoU matching (initialised tracks first, compiled: :func:`edgecam.native.match_iou`),
    so it gives Norfair's tracks; but a detection frame costs a handful of numpy operations
    instead of ~70 us of Python per object, which matters on two cores at 20 objects.
    """

    _R, _Q = 4.0, 0.1

    def __init__(self, config: TrackerConfig) -> None:
        check_native()  # the matching is compiled: an install without it fails here, saying so
        self._threshold = config.distance_threshold
        self._max = config.hit_counter_max
        self._delay = config.initialization_delay
        self._pos = np.zeros((0, 4))  # x1, y1, x2, y2
        self._vel = np.zeros((0, 4))
        self._pv = np.zeros((0, 4))  # position variance
        self._pvc = np.zeros((0, 4))  # position-velocity covariance
        self._vv = np.zeros((0, 4))  # velocity variance
        self._hits = np.zeros(0, dtype=np.int64)
        self._ids = np.zeros(0, dtype=np.int64)  # 0 while initialising
        self._conf = np.zeros(0, dtype=np.float32)
        self._next_id = 1

    def update(self, detections: Detections | None, period: int = 1) -> TrackUpdate:
        if period < 1:
            raise ValueError(f"period must be >= 1, got {period}")
        self._keep(self._hits >= 0)
        self._hits -= 1
        self._pos += self._vel
        n_old = len(self._hits)
        matched = np.zeros(n_old, dtype=bool)
        attr = np.full(n_old, np.nan, dtype=np.float32)
        if detections is not None and len(detections):
            boxes = detections.xyxy.astype(np.float64)
            free = np.ones(len(boxes), dtype=bool)
            order: list[np.ndarray] = []  # tracks hit, in Norfair's matching order
            det_of = np.full(n_old, -1, dtype=np.int64)
            for group in (self._ids > 0, self._ids == 0):
                objs = np.flatnonzero(group)
                dets = np.flatnonzero(free)
                d, o = match_iou(boxes[dets], self._pos[objs], self._threshold)
                if len(d):
                    det, obj = dets[d], objs[o]
                    free[det] = False
                    det_of[obj] = det
                    order.append(obj)
            if order:
                hit = np.concatenate(order)
                matched[hit] = True
                attr[hit] = detections.attribute[det_of[hit]]
                self._conf[hit] = detections.confidence[det_of[hit]]
                self._kalman_update(hit, boxes[det_of[hit]])
                self._hits[hit] = np.minimum(self._hits[hit] + 2 * period, self._max)
                self._promote(hit)
            self._spawn(boxes[free], detections.confidence[free], period)
            # A new track was seen by this frame's detector: it votes like a matched one.
            matched = np.concatenate([matched, np.ones(int(free.sum()), dtype=bool)])
            attr = np.concatenate([attr, detections.attribute[free]])
        show = (self._ids > 0) & (self._hits >= 0)
        tracks = Detections(
            xyxy=self._pos[show].astype(np.float32),
            confidence=self._conf[show].copy(),
            attribute=attr[show],
            tracker_id=self._ids[show].copy(),
        )
        return TrackUpdate(tracks, matched[show])

    def _kalman_update(self, idx: np.ndarray, z: np.ndarray) -> None:
        r, q = self._R, self._Q
        error = z - self._pos[idx]
        a = self._pvc[idx] + self._vv[idx]
        added = self._pv[idx] + self._pvc[idx] + a + q + r
        k_pos = 1.0 - r / added
        k_vel = a / added
        self._pos[idx] += k_pos * error
        self._vel[idx] += k_vel * error
        self._pv[idx] = k_pos * r
        self._pvc[idx] = k_vel * r
        self._vv[idx] += q - k_vel**2 * added

    def _promote(self, idx: np.ndarray) -> None:
        new = idx[(self._ids[idx] == 0) & (self._hits[idx] > self._delay)]
        self._ids[new] = np.arange(self._next_id, self._next_id + len(new))
        self._next_id += len(new)

    def _spawn(self, boxes: np.ndarray, conf: np.ndarray, period: int) -> None:
        n = len(boxes)
        if not n:
            return
        first = len(self._hits)
        self._pos = np.concatenate([self._pos, boxes])
        self._vel = np.concatenate([self._vel, np.zeros((n, 4))])
        self._pv = np.concatenate([self._pv, np.full((n, 4), 10.0)])
        self._pvc = np.concatenate([self._pvc, np.zeros((n, 4))])
        self._vv = np.concatenate([self._vv, np.ones((n, 4))])
        self._hits = np.concatenate([self._hits, np.full(n, period, dtype=np.int64)])
        self._ids = np.concatenate([self._ids, np.zeros(n, dtype=np.int64)])
        self._conf = np.concatenate([self._conf, conf.astype(np.float32)])
        self._promote(np.arange(first, first + n))

    def _keep(self, mask: np.ndarray) -> None:
        if mask.all():
            return
        for name in ("_pos", "_vel", "_pv", "_pvc", "_vv", "_hits", "_ids", "_conf"):
            setattr(self, name, getattr(self, name)[mask])


# Config ``tracker.backend`` -> implementation.
TRACKERS: dict[str, type[NorfairTracker] | type[NumpyTracker]] = {
    "norfair": NorfairTracker,
    "numpy": NumpyTracker,
}
