"""Multi-object tracking behind a small interface; Norfair is the default backend."""

from __future__ import annotations

from typing import Protocol

import numpy as np
from norfair import Detection as _NfDetection
from norfair import Tracker as _NfTracker

from edgecam.config import TrackerConfig
from edgecam.vision.detections import Detections

__all__ = ["NorfairTracker", "TrackUpdate", "Tracker"]


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
        self._tracker = _NfTracker(
            distance_function="iou",
            distance_threshold=config.distance_threshold,
            hit_counter_max=config.hit_counter_max,
            initialization_delay=config.initialization_delay,
        )

    def update(self, detections: Detections | None, period: int = 1) -> TrackUpdate:
        if period < 1:
            raise ValueError(f"period must be >= 1, got {period}")
        nf_dets: list[_NfDetection] | None = None
        if detections is not None:
            nf_dets = [
                _NfDetection(
                    points=detections.xyxy[i].reshape(2, 2).astype(np.float64),
                    scores=np.repeat(float(detections.confidence[i]), 2),
                    data=i,
                )
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
        for k, obj in enumerate(objects):
            xyxy[k] = obj.estimate.reshape(4)
            ids[k] = obj.id
            last = obj.last_detection
            confidence[k] = float(last.scores[0]) if last is not None else 0.0
            if last is not None and id(last) in current and detections is not None:
                matched[k] = True
                attribute[k] = detections.attribute[last.data]
        tracks = Detections(
            xyxy=xyxy,
            confidence=confidence,
            class_id=np.zeros(n, dtype=np.int64),
            attribute=attribute,
            tracker_id=ids,
        )
        return TrackUpdate(tracks, matched)
