"""Tracks, labels and counts of one frame: what is drawn is what is counted."""

from __future__ import annotations

import numpy as np

from edgecam.config import load_settings
from edgecam.vision.analytics import Analytics
from edgecam.vision.detections import Detections

FRAME = (400, 300)


def _boxes(*boxes: tuple[float, float, float, float]) -> Detections:
    return Detections(np.array(boxes, dtype=np.float32), np.full(len(boxes), 0.9, np.float32))


def _analytics(min_age: int = 5) -> Analytics:
    settings = load_settings(
        **{"vision.profile": "people", "tracker.min_age_frames": min_age}
        | {"tracker.initialization_delay": 2}
    )
    return Analytics(settings, "main")


def test_young_tracks_are_shown_but_not_counted() -> None:
    analytics = _analytics(min_age=5)
    metas = [analytics.step(i / 30, _boxes((100, 100, 150, 160)), FRAME) for i in range(12)]
    shown = [m for m in metas if m.tracks]
    assert shown, "the track never appeared"
    first = metas.index(shown[0])
    young = [m for m in metas[first:] if not m.tracks[0].counted]
    old = [m for m in metas[first:] if m.tracks[0].counted]
    assert young and old  # shown while young, counted once old enough
    assert all(m.counts == {"person": 0} for m in young)
    assert all(m.counts == {"person": 1} for m in old)
    assert all(m.tracks[0].label == "person" for m in shown)


def test_tracks_out_of_the_picture_are_not_counted() -> None:
    analytics = _analytics(min_age=0)
    inside, outside = (100, 100, 150, 160), (450, 100, 500, 160)  # right of a 400 px frame
    for i in range(10):
        meta = analytics.step(i / 30, _boxes(inside, outside), FRAME)
    assert [t.box for t in meta.tracks] == [inside]
    assert meta.counts == {"person": 1}  # only the box that is drawn
    assert sum(meta.counts.values()) == sum(t.counted for t in meta.tracks)
