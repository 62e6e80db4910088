"""The trackers: Norfair, and its vectorised twin that must give exactly Norfair's tracks."""

from __future__ import annotations

import numpy as np
import pytest

from edgecam.config import TrackerConfig
from edgecam.vision.detections import Detections
from edgecam.vision.tracking import TRACKERS, NorfairTracker, NumpyTracker


def _scene(seed: int, frames: int, every: int) -> list[Detections | None]:
    """People-like boxes walking across, with jitter, missed detections, arrivals, exits."""
    rng = np.random.default_rng(seed)
    n = 12
    start = rng.uniform([0, 0], [600, 400], (n, 2))
    vel = rng.uniform(-4, 4, (n, 2))
    size = rng.uniform([30, 60], [80, 160], (n, 2))
    born = rng.integers(0, frames // 2, n)
    out: list[Detections | None] = []
    for f in range(frames):
        if f % every:
            out.append(None)
            continue
        alive = (born <= f) & (f < born + rng.integers(60, 400, n))
        seen = alive & (rng.random(n) > 0.15)
        centre = start + vel * f + rng.normal(0, 2, (n, 2))
        xyxy = np.concatenate([centre - size / 2, centre + size / 2], axis=1)[seen]
        out.append(
            Detections(
                xyxy.astype(np.float32),
                rng.uniform(0.5, 1, int(seen.sum())).astype(np.float32),
                attribute=rng.random(int(seen.sum())).astype(np.float32),
            )
        )
    return out


@pytest.mark.parametrize(
    ("seed", "every", "cfg"),
    [
        (0, 3, {}),
        (1, 1, {}),
        (2, 5, {"distance_threshold": 0.6, "hit_counter_max": 8}),
        (3, 3, {"initialization_delay": 0}),
        (4, 2, {"initialization_delay": 6, "hit_counter_max": 30}),
    ],
)
def test_numpy_tracker_gives_norfairs_tracks(seed: int, every: int, cfg: dict[str, float]) -> None:
    config = TrackerConfig.model_validate(cfg)
    reference, fast = NorfairTracker(config), NumpyTracker(config)
    shown = 0
    for f, dets in enumerate(_scene(seed, 300, every)):
        period = every if dets is not None else 1
        a, b = reference.update(dets, period), fast.update(dets, period)
        assert a.tracks.tracker_id.tolist() == b.tracks.tracker_id.tolist(), f"frame {f}"
        assert a.matched.tolist() == b.matched.tolist(), f"frame {f}"
        np.testing.assert_allclose(a.tracks.xyxy, b.tracks.xyxy, atol=1e-3)
        np.testing.assert_allclose(a.tracks.confidence, b.tracks.confidence, atol=1e-6)
        np.testing.assert_array_equal(a.tracks.attribute, b.tracks.attribute)
        shown += len(a.tracks)
    assert shown > 500  # the scene really had tracks to compare


def test_tracker_carries_a_box_between_detections() -> None:
    tracker = NumpyTracker(TrackerConfig())
    box = np.array([[100, 100, 150, 200]], dtype=np.float32)
    for f in range(30):
        moved = box + np.array([3 * f, 0, 3 * f, 0], dtype=np.float32)
        dets = Detections(moved, np.array([0.9], dtype=np.float32)) if f % 3 == 0 else None
        update = tracker.update(dets, 3 if dets is not None else 1)
    assert update.tracks.tracker_id.tolist() == [1]
    # the Kalman filter learnt the motion: the box keeps moving without detections
    assert update.tracks.xyxy[0, 0] == pytest.approx(100 + 3 * 29, abs=6)


def test_backend_chosen_by_config() -> None:
    assert set(TRACKERS) == {"norfair", "numpy"}
    assert TrackerConfig().backend == "numpy"
    with pytest.raises(ValueError):
        TrackerConfig.model_validate({"backend": "sort"})
    with pytest.raises(ValueError, match="period"):
        NumpyTracker(TrackerConfig()).update(None, period=0)
