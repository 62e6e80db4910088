"""Zones and counting lines on synthetic tracks: the edge cases, one frame at a time."""

from __future__ import annotations

import numpy as np
import pytest

from edgecam.config import LineConfig
from edgecam.vision.zones import LineState, ZoneCounter, ZoneState

SIZE = (1000, 1000)  # pixels; the anchor of each box below is its bottom centre
FPS = 10.0


def _box(x: float, y: float) -> list[float]:
    """A 40 x 100 px person whose feet are at (x, y) in shares of the frame."""
    px, py = x * SIZE[0], y * SIZE[1]
    return [px - 20, py - 100, px + 20, py]


def _vertical(**kw: object) -> dict[str, LineConfig]:
    # From top to bottom at x = 0.5: "left" of that walk, on screen, is the right half.
    return {"door": LineConfig.model_validate({"start": [0.5, 0], "end": [0.5, 1], **kw})}


def _run(
    counter: ZoneCounter, frames: list[dict[int, tuple[float, float]]]
) -> list[tuple[tuple[ZoneState, ...], tuple[LineState, ...]]]:
    """Feed ``frames`` (track id -> feet position) at FPS; every frame's states."""
    out = []
    for k, tracks in enumerate(frames):
        ids = list(tracks)
        boxes = [_box(*tracks[i]) for i in ids] or np.zeros((0, 4))
        out.append(counter.update(k / FPS, ids, boxes, SIZE))
    return out


def _walk(x0: float, x1: float, n: int, y: float = 0.5) -> list[tuple[float, float]]:
    return [(x, y) for x in np.linspace(x0, x1, n).tolist()]


def _totals(states: list[tuple[tuple[ZoneState, ...], tuple[LineState, ...]]]) -> tuple[int, int]:
    last = states[-1][1][0]
    crossings = [c for _, lines in states for c in lines[0].crossings]
    assert sum(d == "in" for _, d in crossings) == last.total_in
    assert sum(d == "out" for _, d in crossings) == last.total_out
    return last.total_in, last.total_out


def test_a_walk_across_counts_once_in_the_in_direction() -> None:
    states = _run(ZoneCounter({}, _vertical()), [{1: p} for p in _walk(0.2, 0.8, 30)])
    assert _totals(states) == (1, 0)
    states = _run(ZoneCounter({}, _vertical()), [{1: p} for p in _walk(0.8, 0.2, 30)])
    assert _totals(states) == (0, 1)
    states = _run(
        ZoneCounter({}, _vertical(in_side="right")), [{1: p} for p in _walk(0.2, 0.8, 30)]
    )
    assert _totals(states) == (0, 1)


def test_standing_on_the_line_counts_nothing_more() -> None:
    # Up to the line, then 200 frames of jitter across it (+-1.5 % < the 3 % band), then on.
    jitter = [(0.5 + 0.015 * np.sin(k), 0.5) for k in range(200)]
    path = _walk(0.2, 0.5, 10) + jitter + _walk(0.5, 0.2, 10)
    assert _totals(_run(ZoneCounter({}, _vertical()), [{1: p} for p in path])) == (0, 0)
    path = _walk(0.2, 0.5, 10) + jitter + _walk(0.5, 0.8, 10)
    assert _totals(_run(ZoneCounter({}, _vertical()), [{1: p} for p in path])) == (1, 0)


def test_crossing_back_counts_in_then_out() -> None:
    path = _walk(0.2, 0.8, 20) + _walk(0.8, 0.2, 20) + _walk(0.2, 0.8, 20)
    states = _run(ZoneCounter({}, _vertical()), [{7: p} for p in path])
    assert _totals(states) == (2, 1)
    order = [d for _, lines in states for _, d in lines[0].crossings]
    assert order == ["in", "out", "in"]


def test_a_jump_over_the_band_between_two_frames_counts_once() -> None:
    # A detector gap: the tracker held the box on one side, the next detection is far over.
    path = [(0.3, 0.5)] * 5 + [(0.9, 0.5)] * 5
    assert _totals(_run(ZoneCounter({}, _vertical()), [{1: p} for p in path])) == (1, 0)


def test_a_gap_mid_crossing_counts_once() -> None:
    # Into the band, held there by the tracker (no detections) for a second, then out over.
    path = _walk(0.2, 0.49, 10) + [(0.49, 0.5)] * 10 + _walk(0.51, 0.8, 10)
    states = _run(ZoneCounter({}, _vertical()), [{1: p} for p in path])
    assert _totals(states) == (1, 0)


def test_leaving_the_frame_in_the_band_and_a_new_id_count_nothing() -> None:
    frames = [{1: p} for p in _walk(0.2, 0.5, 10)] + [{}] * 3
    frames += [{2: p} for p in _walk(0.55, 0.8, 5)]
    states = _run(ZoneCounter({}, _vertical()), frames)
    assert _totals(states) == (0, 0)
    # The same id coming back after its track ended starts afresh too.
    frames = [{1: p} for p in _walk(0.2, 0.45, 5)] + [{}] + [{1: p} for p in _walk(0.6, 0.8, 5)]
    assert _totals(_run(ZoneCounter({}, _vertical()), frames)) == (0, 0)


def test_a_crossing_beside_the_segment_does_not_count() -> None:
    lines = {"gate": LineConfig.model_validate({"start": [0.5, 0.0], "end": [0.5, 0.4]})}
    below = _run(ZoneCounter({}, lines), [{1: p} for p in _walk(0.2, 0.8, 20, y=0.8)])
    assert below[-1][1][0].total_in == 0
    through = _run(ZoneCounter({}, lines), [{1: p} for p in _walk(0.2, 0.8, 20, y=0.3)])
    assert through[-1][1][0].total_in == 1


def test_many_tracks_at_once_each_count_once() -> None:
    n = 20
    frames = []
    for k in range(40):
        frames.append({i: (0.1 + 0.8 * min(1, max(0, (k - i) / 15)), 0.05 * i) for i in range(n)})
    states = _run(ZoneCounter({}, _vertical()), frames)
    assert _totals(states) == (n, 0)
    crossed = sorted(t for _, lines in states for t, _ in lines[0].crossings)
    assert crossed == list(range(n))


@pytest.mark.parametrize(("anchor", "crossings"), [("top_centre", 1), ("bottom_centre", 0)])
def test_diagonal_line_and_anchor(anchor: str, crossings: int) -> None:
    diagonal = {"start": [0, 0], "end": [1, 1], "anchor": anchor}
    lines = {"diag": LineConfig.model_validate(diagonal)}
    # Walking right with the feet at 0.6: the head (0.1 higher) meets the diagonal at x = 0.5,
    # the feet would at x = 0.6, which they never reach.
    states = _run(ZoneCounter({}, lines), [{1: p} for p in _walk(0.3, 0.55, 30, y=0.6)])
    total = states[-1][1][0]
    assert total.total_in + total.total_out == crossings


SQUARE = [(0.2, 0.2), (0.6, 0.2), (0.6, 0.6), (0.2, 0.6)]


def test_zone_occupancy_entries_exits_and_dwell() -> None:
    counter = ZoneCounter({"queue": SQUARE}, {})
    frames: list[dict[int, tuple[float, float]]] = []
    for k in range(60):
        tracks = {}
        if k < 40:
            tracks[1] = (0.1 + 0.02 * k, 0.4)  # in at x > 0.2 + band, out past 0.6
        if 10 <= k < 50:
            tracks[2] = (0.4, 0.4)  # stands in the zone, then its track ends
        frames.append(tracks)
    states = _run(counter, frames)
    zone = [z[0] for z, _ in states]
    assert max(z.occupancy for z in zone) == 2
    entered = [(k, t) for k, z in enumerate(zone) for t in z.entered]
    exited = [(k, t, round(d, 2)) for k, z in enumerate(zone) for t, d in z.exited]
    assert [t for _, t in entered] == [1, 2]
    # Track 1: enters at x > 0.22 (frame 7), leaves at x < 0.62... i.e. x > 0.62 (frame 27).
    assert entered[0][0] == 7 and entered[1][0] == 10
    assert exited == [(27, 1, 2.0), (50, 2, 3.9)]  # 2 ends after its last frame, 4.9 s
    assert zone[30].ids == (2,) and zone[30].longest_s == pytest.approx(2.0)
    assert zone[-1].occupancy == 0 and zone[-1].longest_s == 0


def test_zone_border_jitter_is_one_stay() -> None:
    counter = ZoneCounter({"queue": SQUARE}, {}, zone_band=0.02)
    path = _walk(0.1, 0.2, 5) + [(0.2 + 0.01 * (-1) ** k, 0.4) for k in range(50)]
    path += _walk(0.2, 0.4, 5)
    states = _run(counter, [{3: p} for p in path])
    assert sum(len(z[0].entered) for z, _ in states) == 1
    assert sum(len(z[0].exited) for z, _ in states) == 0


def test_points_in_concave_zone() -> None:
    # An L shape: the notch is outside.
    ell = [(0.1, 0.1), (0.5, 0.1), (0.5, 0.3), (0.3, 0.3), (0.3, 0.5), (0.1, 0.5)]
    counter = ZoneCounter({"ell": ell}, {}, zone_band=0.0)
    boxes = [_box(0.2, 0.2), _box(0.4, 0.4), _box(0.4, 0.2)]
    (zone,), _ = counter.update(0.0, [1, 2, 3], boxes, SIZE)
    assert zone.ids == (1, 3)


def test_counter_rejects_mismatched_arrays() -> None:
    with pytest.raises(ValueError, match="2 ids for 1 boxes"):
        ZoneCounter({}, _vertical()).update(0.0, [1, 2], [_box(0.1, 0.1)], SIZE)
