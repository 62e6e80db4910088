"""The trackers: Norfair, and its compiled twin that must give exactly Norfair's tracks."""

from __future__ import annotations

import numpy as np
import pytest

from edgecam.config import TrackerConfig
from edgecam.native import match_iou
from edgecam.vision.detections import Detections
from edgecam.vision.tracking import TRACKERS, NorfairTracker, NumpyTracker, TrackUpdate


class _NumpyReference:
    """The tracker as it was in numpy before its step was compiled (``track.c``): the
    reference the compiled step must equal, bit for bit."""

    _R, _Q = 4.0, 0.1

    def __init__(self, config: TrackerConfig) -> None:
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


@pytest.mark.parametrize(
    ("seed", "every", "cfg"),
    [
        (0, 3, {}),
        (5, 1, {"initialization_delay": 0}),
        (6, 4, {"distance_threshold": 0.9, "hit_counter_max": 4}),
        (7, 2, {"initialization_delay": 8, "hit_counter_max": 40}),
    ],
)
def test_compiled_step_equals_the_numpy_version_bit_for_bit(
    seed: int, every: int, cfg: dict[str, float]
) -> None:
    config = TrackerConfig.model_validate(cfg)
    reference, compiled = _NumpyReference(config), NumpyTracker(config)
    scene = _scene(seed, 400, every)
    # Empty detection frames and crowded ones too (more rows than the table starts with).
    scene[50] = Detections.empty()
    rng = np.random.default_rng(seed)
    crowd = rng.uniform(0, 600, (40, 2))
    crowd_boxes = np.concatenate([crowd, crowd + 40], axis=1).astype(np.float32)
    for f in range(100, 130, every):
        jitter = rng.normal(0, 1, crowd_boxes.shape).astype(np.float32)
        scene[f] = Detections(crowd_boxes + jitter, np.full(40, 0.8, dtype=np.float32))
    shown = 0
    for f, dets in enumerate(scene):
        period = every if dets is not None else 1
        a, b = reference.update(dets, period), compiled.update(dets, period)
        assert a.tracks.tracker_id.tolist() == b.tracks.tracker_id.tolist(), f"frame {f}"
        assert a.matched.tolist() == b.matched.tolist(), f"frame {f}"
        assert a.tracks.xyxy.tobytes() == b.tracks.xyxy.tobytes(), f"frame {f}"
        assert a.tracks.confidence.tobytes() == b.tracks.confidence.tobytes(), f"frame {f}"
        assert a.tracks.attribute.tobytes() == b.tracks.attribute.tobytes(), f"frame {f}"
        shown += len(b.tracks)
    assert shown > 2000  # the crowd really was tracked


def test_compiled_step_refuses_mismatched_arrays() -> None:
    tracker = NumpyTracker(TrackerConfig())
    box = np.zeros((2, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="scores"):
        tracker._table.step(box, np.zeros(1, dtype=np.float32), np.zeros(2, dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(n, 4\)"):
        tracker._table.step(box.reshape(4, 2), np.zeros(4), np.zeros(4))


def test_a_table_that_cannot_grow_is_left_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    config = TrackerConfig()
    tracker, reference = NumpyTracker(config), NumpyTracker(config)
    scene = _scene(8, 60, 1)
    for dets in scene[:20]:
        tracker.update(dets), reference.update(dets)
    crowd = np.concatenate([np.arange(40)[:, None] * 20.0 + [0, 0, 10, 10]]).astype(np.float32)
    big = Detections(crowd, np.full(40, 0.9, np.float32))  # more rows than the table holds
    zeros, calls = np.zeros, [0]

    def failing(*args: object, **kwargs: object) -> np.ndarray:
        calls[0] += 1
        if calls[0] == 3:
            raise MemoryError("no memory")
        return zeros(*args, **kwargs)  # type: ignore[call-overload,no-any-return]

    monkeypatch.setattr(np, "zeros", failing)
    with pytest.raises(MemoryError):
        tracker.update(big)
    monkeypatch.setattr(np, "zeros", zeros)
    for dets in [big, *scene[20:]]:  # it goes on exactly as a table that never failed
        a, b = reference.update(dets), tracker.update(dets)
        assert a.tracks.tracker_id.tolist() == b.tracks.tracker_id.tolist()
        assert a.tracks.xyxy.tobytes() == b.tracks.xyxy.tobytes()


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
    with pytest.raises(ValueError, match="period"):
        NumpyTracker(TrackerConfig()).update(None, period=2**62)
