"""Zones and counting lines on synthetic tracks: the edge cases, one frame at a time."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import MEDIA

from edgecam.config import AlertsConfig, CameraConfig, LineConfig, Settings, load_settings
from edgecam.device.events import FrameSummary, LineFrame, ZoneFrame, parse_event
from edgecam.device.rules import RuleEngine
from edgecam.device.stats import IntervalStats
from edgecam.media.offline import process_file
from edgecam.protocol import Stats
from edgecam.vision.analytics import Analytics
from edgecam.vision.detections import Detections
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
    counter: ZoneCounter, frames: list[dict[int, tuple[float, float]]], clip: bool = False
) -> list[tuple[tuple[ZoneState, ...], tuple[LineState, ...]]]:
    """Feed ``frames`` (track id -> feet position) at FPS; every frame's states. ``clip``:
    boxes clipped to the picture, as the analytics give them (one partly out of it ends on
    its edge)."""
    out = []
    for k, tracks in enumerate(frames):
        ids = list(tracks)
        boxes = np.array([_box(*tracks[i]) for i in ids]).reshape(-1, 4)
        if clip:
            boxes = np.clip(boxes, 0, [*SIZE, *SIZE])
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


def _run_seen(
    counter: ZoneCounter, path: list[tuple[float, float]], seen: list[bool]
) -> list[tuple[tuple[ZoneState, ...], tuple[LineState, ...]]]:
    return [
        counter.update(k / FPS, [1], [_box(*p)], SIZE, seen=[s])
        for k, (p, s) in enumerate(zip(path, seen, strict=True))
    ]


def test_a_track_drifting_on_estimates_alone_counts_nothing() -> None:
    # Detected left of the line, then only the tracker's estimate carries it over (a false
    # track, or someone who stopped where the detector lost them): no crossing, no entry.
    path = _walk(0.2, 0.4, 10) + _walk(0.42, 0.8, 20)
    seen = [True] * 10 + [False] * 20
    square = {"right": [(0.6, 0.2), (0.95, 0.2), (0.95, 0.8), (0.6, 0.8)]}
    states = _run_seen(ZoneCounter(square, _vertical()), path, seen)
    assert _totals(states) == (0, 0)
    assert all(not z[0].ids for z, _ in states)


def test_an_estimated_crossing_counts_once_when_a_detection_confirms_it() -> None:
    # Detections every third frame (30 fps video, 10 detections a second).
    path = _walk(0.2, 0.8, 31)
    seen = [k % 3 == 0 for k in range(31)]
    states = _run_seen(ZoneCounter({}, _vertical()), path, seen)
    assert _totals(states) == (1, 0)
    (frame,) = [k for k, (_, lines) in enumerate(states) if lines[0].crossings]
    assert seen[frame]  # counted on a detection frame


def test_a_track_first_seen_on_the_line_comes_from_the_half_it_is_in() -> None:
    # Out of a crowd standing at the line, 1 % right of it (inside the 3 % band), then left.
    path = [(0.51, 0.5)] * 5 + _walk(0.51, 0.2, 10)
    assert _totals(_run(ZoneCounter({}, _vertical()), [{1: p} for p in path])) == (0, 1)
    path = [(0.51, 0.5)] * 5 + _walk(0.51, 0.8, 10)  # back the way it came: nothing
    assert _totals(_run(ZoneCounter({}, _vertical()), [{1: p} for p in path])) == (0, 0)


def test_leaving_the_frame_in_the_band_and_a_new_id_count_nothing() -> None:
    frames = [{1: p} for p in _walk(0.2, 0.5, 10)] + [{}] * 3
    frames += [{2: p} for p in _walk(0.56, 0.8, 5)]
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


def test_a_zone_reaching_the_frame_edge_holds_people_cut_off_by_it() -> None:
    # Someone close to the camera, feet below the picture: the analytics clip the box to the
    # frame, so the anchor is on its bottom edge. A zone's sides along the frame's edge are
    # not a border one can be outside of (they were: depth 0, never in).
    whole = [(0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0)]
    queue = [(0.1, 0.5), (0.45, 0.5), (0.45, 1.0), (0.1, 1.0)]  # the README's
    counter = ZoneCounter({"whole": whole, "queue": queue}, {})
    frames = [{1: (0.3, 1.0), 2: (0.8, 0.4), 3: (0.05, 1.0)}] * 5
    frames += [{1: (0.3, 1.0), 2: (0.8, 0.4), 3: (0.3 + 0.01 * k, 0.1)} for k in range(5)]
    states = _run(counter, frames)
    whole_state, queue_state = states[-1][0]
    assert whole_state.ids == (1, 2, 3)  # everyone in the picture
    assert queue_state.ids == (1,)  # the one beside the queue (x 0.05) is not in it
    assert [len(z.entered) for z in states[0][0]] == [3, 1]
    assert all(not z.exited for s, _ in states for z in s)


def _down(y0: float, y1: float, n: int, x: float = 0.5) -> list[tuple[float, float]]:
    return [(x, y) for y in np.linspace(y0, y1, n).tolist()]


# Someone walking out of the picture and back in again, or only in, with their box cut off
# by the frame's edge while they are partly out (feet 5 % past the bottom, or the box's
# middle on the left edge).
OUT_AND_BACK_DOWN = _down(0.6, 1.05, 15) + _down(1.05, 0.6, 15)
IN_FROM_BELOW = _down(1.05, 0.6, 15)
OUT_AND_BACK_LEFT = _walk(0.4, 0.0, 15) + _walk(0.0, 0.4, 15)


@pytest.mark.parametrize(
    ("line", "path", "order"),
    [
        # Along the bottom edge: "in" (left, walking from start to end) is the picture.
        ({"start": [0, 1], "end": [1, 1]}, OUT_AND_BACK_DOWN, ["out", "in"]),
        ({"start": [0, 1], "end": [1, 1]}, IN_FROM_BELOW, ["in"]),
        ({"start": [1, 1], "end": [0, 1]}, OUT_AND_BACK_DOWN, ["in", "out"]),
        # Near it: the band (3 % of the height) reaches past the bottom edge.
        ({"start": [0, 0.98], "end": [1, 0.98]}, OUT_AND_BACK_DOWN, ["out", "in"]),
        ({"start": [0, 0.99], "end": [1, 0.97]}, OUT_AND_BACK_DOWN, ["out", "in"]),
        # A door in the bottom edge: through it, and beside it (nothing).
        ({"start": [0.4, 1], "end": [0.6, 1]}, OUT_AND_BACK_DOWN, ["out", "in"]),
        ({"start": [0.4, 1], "end": [0.6, 1]}, _down(0.6, 1.05, 15, x=0.8), []),
        # Along the left edge, the anchor (the box's bottom centre) never reaches it.
        ({"start": [0, 0], "end": [0, 1]}, OUT_AND_BACK_LEFT, ["out", "in"]),
    ],
)
def test_a_line_along_or_near_the_frame_edge_counts_people_it_cuts_off(
    line: dict[str, object], path: list[tuple[float, float]], order: list[str]
) -> None:
    # Before, the anchor could never be beyond the band on the picture's far side of the
    # line: such a line counted nothing, and nothing said so.
    counter = ZoneCounter({}, {"edge": LineConfig.model_validate(line)})
    states = _run(counter, [{1: p} for p in path], clip=True)
    assert [d for _, lines in states for _, d in lines[0].crossings] == order


def test_standing_on_the_frame_edge_line_counts_once() -> None:
    # Out over the bottom edge, then feet 1 % in and 1 % out of the picture by turns: the
    # box is cut, then not (its anchor within the band), and so on.
    jitter = [(0.5, 0.99 + 0.02 * (k % 2)) for k in range(50)]
    counter = ZoneCounter({}, {"edge": LineConfig.model_validate({"start": [0, 1], "end": [1, 1]})})
    states = _run(counter, [{1: p} for p in _down(0.6, 1.0, 10) + jitter], clip=True)
    assert _totals(states) == (0, 1)


def test_a_line_inside_the_picture_ignores_boxes_the_edge_cuts() -> None:
    # The vertical line reaches the bottom edge; its band does not reach past the picture on
    # either side: someone cut off by the bottom edge beside it is where their anchor is.
    path = [(0.45, 1.05)] * 5 + [(0.55, 1.05)] * 5 + _walk(0.55, 0.8, 5, y=1.05)
    states = _run(ZoneCounter({}, _vertical()), [{1: p} for p in path], clip=True)
    assert _totals(states) == (1, 0)


def test_a_line_along_the_top_edge_counts_no_one_whose_head_it_cuts_off() -> None:
    # Someone walking towards the camera and back, their feet (the anchor) never above the
    # middle of the picture, their box growing past the top edge on the way. Before, a box
    # the top edge cut was beyond the line whatever its anchor: one out and one in.
    top = {"start": [0, 0], "end": [1, 0]}
    feet = np.concatenate([np.linspace(500, 950, 20), np.linspace(950, 500, 20)])
    heights = 300 + 0.4 * feet + 200 * (feet - 500) / 450  # 500 px tall, then 880 px
    boxes = np.clip(np.stack([feet * 0 + 480, feet - heights, feet * 0 + 520, feet], 1), 0, 1000)
    counter = ZoneCounter({}, {"top": LineConfig.model_validate(top)})
    states = [counter.update(k / FPS, [1], boxes[k : k + 1], SIZE) for k in range(len(feet))]
    assert boxes[:, 1].min() == 0  # the head was cut off
    assert _totals(states) == (0, 0)
    # With the box's top as its anchor, the top edge hides it: walking out over it counts.
    line = LineConfig.model_validate({**top, "anchor": "top_centre"})
    path = _down(0.6, 0.05, 15)
    states = _run(ZoneCounter({}, {"top": line}), [{1: p} for p in path], clip=True)
    assert [d for _, lines in states for _, d in lines[0].crossings] == ["in"]


# A zone nowhere deeper than zone_band (2 % of the height) can hold nobody: a track enters
# when its anchor is that far inside the border.
THIN = {
    "strip": [(0.1, 0.485), (0.9, 0.485), (0.9, 0.515), (0.1, 0.515)],  # 3 % tall
    "kerb": [(0.0, 0.985), (1.0, 0.985), (1.0, 1.0), (0.0, 1.0)],  # 1.5 % along the bottom
    "sliver": [(0.2, 0.5), (0.8, 0.4825), (0.8, 0.5175)],  # 3.5 % at its widest
}


@pytest.mark.parametrize("name", list(THIN))
def test_a_zone_thinner_than_its_band_holds_nobody_and_is_refused(name: str) -> None:
    zone = THIN[name]
    counter = ZoneCounter({name: zone}, {})
    low, high = min(y for _, y in zone), max(y for _, y in zone)
    # Walking along its middle (and the kerb's bottom): never in.
    for y in (low + high) / 2, high:
        states = _run(counter, [{1: p} for p in _walk(0.0, 1.0, 50, y=y)], clip=True)
        assert all(not z[0].ids for z, _ in states)
    with pytest.raises(ValueError, match=f"camera 'gate': zone '{name}' can never hold anyone"):
        CameraConfig(name="gate", zones={name: zone})
    # With a narrower band it is kept and holds who walks along it.
    camera = CameraConfig(name="gate", zones={name: zone}, zone_band=0.005)
    counter = ZoneCounter(camera.zones, {}, zone_band=camera.zone_band)
    states = _run(counter, [{1: p} for p in _walk(0.0, 1.0, 50, y=(low + high) / 2)])
    assert any(z[0].ids for z, _ in states)


def test_a_zone_too_thin_at_the_frame_size_is_said_once_at_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # 1 % of the width across, top to bottom: 10 px at 1000 x 1000, under twice the 20 px band;
    # on a frame over four times as wide as tall it would be deep enough, so the config check
    # cannot refuse it.
    narrow = [[0.45, 0], [0.46, 0], [0.46, 1], [0.45, 1]]
    wide = [[0.2, 0], [0.3, 0], [0.3, 1], [0.2, 1]]
    settings = Settings.model_validate(
        {"cameras": [{"name": "gate", "zones": {"narrow": narrow, "wide": wide}}]}
    )
    analytics = Analytics(settings, "gate")
    with caplog.at_level("WARNING", logger="edgecam.vision.analytics"):
        for k in range(3):
            analytics.step(k / FPS, None, SIZE)
    (record,) = caplog.records
    message = record.getMessage()
    assert "camera 'gate': zone 'narrow' can never hold anyone at 1000x1000" in message
    assert "zone_band (0.02 of the frame height, 20.0 px)" in message
    caplog.clear()
    with caplog.at_level("WARNING", logger="edgecam.vision.analytics"):
        analytics.step(1.0, None, (5000, 1000))  # wide enough there
    assert not caplog.records


def test_counter_rejects_mismatched_arrays() -> None:
    with pytest.raises(ValueError, match="2 ids for 1 boxes"):
        ZoneCounter({}, _vertical()).update(0.0, [1, 2], [_box(0.1, 0.1)], SIZE)


# -- through the device: frame summaries, interval statistics, alert rules ---------------------


def _zone(occupancy: int, longest: float = 0.0, entered: int = 0, dwell: tuple = ()) -> ZoneFrame:
    return ZoneFrame(occupancy=occupancy, entered=entered, dwell_s=list(dwell), longest_s=longest)


def test_interval_stats_per_zone_and_line() -> None:
    stats = IntervalStats(start=0.0)
    stats.add_frame(1, [], {"q": _zone(1, 0.0, entered=1)}, {"door": LineFrame(crossed_in=1)})
    stats.add_frame(1, [], {"q": _zone(2, 4.0, entered=1)}, {"door": LineFrame()})
    stats.add_frame(1, [], {"q": _zone(1, 2.0, dwell=(5.0,))}, {"door": LineFrame(crossed_out=2)})
    stats.add_frame(1, [], {"q": _zone(0, dwell=(3.0, 1.0))}, {"door": LineFrame(crossed_in=1)})
    zone = stats.zone_figures()["q"]
    assert (zone.occupancy_peak, zone.entries, zone.exits) == (2, 2, 3)
    assert zone.dwell_median_s == 3.0 and zone.dwell_max_s == 5.0
    assert stats.line_figures() == {"door": {"in": 2, "out": 2}}
    # A stay still going on at the end of the interval counts towards the longest.
    later = IntervalStats(start=1.0)
    later.add_frame(1, [], {"q": _zone(1, 42.0)})
    assert later.zone_figures()["q"].dwell_max_s == 42.0
    assert later.zone_figures()["q"].dwell_median_s is None
    stats_msg = Stats(
        device="d",
        camera="c",
        seq=1,
        start=0,
        end=1,
        zones=stats.zone_figures(),
        lines=stats.line_figures(),
    )
    wire = json.loads(stats_msg.model_dump_json())
    assert wire["zones"]["q"]["dwell_max_s"] == 5.0 and wire["lines"]["door"] == {"in": 2, "out": 2}


def _engine(**rules: dict[str, object]) -> RuleEngine:
    return RuleEngine(AlertsConfig.model_validate(rules))


def test_zone_occupancy_rule_per_zone_with_hold_clear_and_cooldown() -> None:
    engine = _engine(
        zone_occupancy={"max_people": 1, "hold_s": 1, "clear_s": 2, "cooldown_s": 10},
        occupancy={"enabled": False},
    )
    two = {"queue": _zone(2), "door": _zone(0)}
    assert engine.on_frame("cam", 0.0, 1, [], two) == []
    (raised,) = engine.on_frame("cam", 1.0, 1, [], two)
    assert raised.alert.rule == "zone_occupancy" and raised.alert.subject == "cam/queue"
    assert "zone queue" in raised.alert.message and raised.alert.value == 2
    assert engine.on_frame("cam", 2.0, 1, [], {"queue": _zone(1)}) == []
    (ended,) = engine.on_frame("cam", 4.0, 1, [], {"queue": _zone(1)})
    assert ended.change == "ended"
    assert engine.on_frame("cam", 5.0, 1, [], two) == []
    assert engine.on_frame("cam", 7.0, 1, [], two) == []  # cooling down until 14
    # Only the zones listed, when some are.
    engine.set_rule("zone_occupancy", {"zones": ["door"], "cooldown_s": 0})
    assert engine.on_frame("cam", 20.0, 1, [], two) == []
    assert engine.on_frame("cam", 22.0, 1, [], two) == []


def test_dwell_rule_trips_on_the_longest_stay() -> None:
    engine = _engine(dwell={"max_s": 30})
    assert engine.on_frame("c", 0.0, 1, [], {"q": _zone(1, 29.0)}) == []
    (raised,) = engine.on_frame("c", 1.0, 1, [], {"q": _zone(1, 30.5)})
    assert raised.alert.rule == "dwell" and raised.alert.threshold == 30
    (ended,) = engine.on_frame("c", 2.0, 1, [], {"q": _zone(0)})
    assert ended.change == "ended"
    assert engine.set_rule("dwell", {"max_s": 60})["max_s"] == 60
    with pytest.raises(ValueError, match="max_s"):
        engine.set_rule("dwell", {"max_s": -1})


def test_set_rule_refuses_a_zone_or_line_no_camera_has() -> None:
    cameras = [
        CameraConfig(
            name="a",
            zones={"door": [(0, 0), (1, 0), (0, 1)]},
            lines={"exit": LineConfig(start=(0, 0.5), end=(1, 0.5))},
        )
    ]
    engine = RuleEngine(AlertsConfig(), cameras)
    assert engine.set_rule("dwell", {"zones": ["door"]})["zones"] == ["door"]
    for rule, params in [
        ("dwell", {"zones": ["<script>"]}),
        ("zone_occupancy", {"zones": ["dor"]}),
        ("line_crossing", {"forbidden": {"exti": "out"}}),
    ]:
        with pytest.raises(ValueError, match="is no camera's"):
            engine.set_rule(rule, params)
    assert engine.config.dwell.zones == ["door"]  # unchanged by the refused ones
    assert engine.config.line_crossing.forbidden == {}


def test_line_crossing_rule_only_in_the_forbidden_direction() -> None:
    engine = _engine(line_crossing={"forbidden": {"exit": "in"}, "clear_s": 5})
    assert engine.on_frame("c", 0.0, 1, [], lines={"exit": LineFrame(crossed_out=3)}) == []
    assert engine.on_frame("c", 0.0, 1, [], lines={"other": LineFrame(crossed_in=3)}) == []
    (raised,) = engine.on_frame("c", 1.0, 1, [], lines={"exit": LineFrame(crossed_in=1)})
    assert raised.alert.rule == "line_crossing" and raised.alert.subject == "c/exit"
    assert engine.on_frame("c", 3.0, 1, [], lines={"exit": LineFrame(crossed_in=1)}) == []
    assert engine.on_frame("c", 7.0, 1, [], lines={"exit": LineFrame()}) == []  # 4 s quiet
    (ended,) = engine.on_frame("c", 8.0, 1, [], lines={"exit": LineFrame()})
    assert ended.change == "ended"
    assert "line_crossing" in engine.describe()


def test_frame_summary_carries_zones_and_lines() -> None:
    summary = FrameSummary(
        worker="inference",
        camera="c",
        frame=3,
        wall_time=1.0,
        zones={"q": _zone(2, 1.5, entered=1, dwell=(0.5,))},
        lines={"door": LineFrame(crossed_in=1)},
    )
    back = parse_event(summary.model_dump_json().encode())
    assert back == summary


def test_analytics_puts_zones_and_lines_in_frame_meta_and_events() -> None:
    settings = Settings.model_validate(
        {
            "vision": {"profile": "people"},
            "tracker": {"min_age_frames": 0, "initialization_delay": 0},
            "cameras": [
                {
                    "zones": {"right": [[0.5, 0], [1, 0], [1, 1], [0.5, 1]]},
                    "lines": {"mid": {"start": [0.5, 0], "end": [0.5, 1]}},
                }
            ],
        }
    )
    analytics = Analytics(settings, "main")
    metas = []
    for k, x in enumerate(np.linspace(0.2, 0.8, 80).tolist()):
        box = np.array([_box(x, 0.5)], dtype=np.float32)
        metas.append(analytics.step(k / FPS, Detections(box, np.ones(1, np.float32)), SIZE))
    event = metas[-1].to_event()
    assert event["lines"]["mid"]["in"] == 1 and event["lines"]["mid"]["out"] == 0
    assert event["zones"]["right"]["occupancy"] == 1
    assert sum(len(m.to_event()["zones"]["right"]["entered"]) for m in metas) == 1
    assert {"frame", "pts", "tracks", "counts"} <= set(event)
    plain = Analytics(Settings(), "main").step(0.0, None, SIZE).to_event()
    assert set(plain) == {"frame", "pts", "tracks", "counts"}  # no zones: the old event


# -- on a real clip ------------------------------------------------------------------------------

# media/pedestrians_30s.mp4, a vertical line across the walkway at x = 0.45 (345 px of 768),
# y 0.26..0.69; "in" is its right side. Counted by eye on frames rendered with the line drawn
# in (docs/benchmarks.md, "Zones, lines and privacy", says how): feet crossing left to right
# at ~1.2 s and ~9.8 s; right to left at ~6.2, ~16.2, ~18.2, ~22.2, ~25.7, ~28.2 and ~29.6 s
# (the last ends 20 px past the line, just beyond the 17 px band).
PEDESTRIAN_LINE = {"start": [0.45, 0.26], "end": [0.45, 0.69]}
PEDESTRIAN_IN, PEDESTRIAN_OUT = 2, 7
# Lines along the left and right edges, "in" being the picture: people walk into it over the
# right edge (counted at 1.8, 2.3, 4.6, 13.8, 22.4 and 23.4 s) and out over it (14.8, 20.6 s),
# and out over the left edge (17.5, 21.9, 28.1 s): each track's first or last box touches that
# edge, and frames with the boxes drawn in show the people walking in or out there.
EDGE_LINES = {
    "left_edge": {"start": [0, 0], "end": [0, 1]},
    "right_edge": {"start": [1, 0], "end": [1, 1], "in_side": "right"},
}
EDGE_COUNTS = {"left_edge": (0, 3), "right_edge": (6, 2)}


def test_line_counts_on_the_pedestrian_clip(tmp_path: Path) -> None:
    settings = load_settings(
        **{
            "vision.profile": "people",
            "cameras": [{"lines": {"walkway": PEDESTRIAN_LINE, **EDGE_LINES}}],
        }
    )
    events = tmp_path / "e.jsonl"
    process_file(
        settings, MEDIA / "pedestrians_30s.mp4", tmp_path / "o.mp4", events=events, progress=False
    )
    frames = [json.loads(line) for line in events.read_text().splitlines()]
    last = frames[-1]["lines"]["walkway"]
    crossed = [c for f in frames for c in f["lines"]["walkway"]["crossed"]]
    assert (last["in"], last["out"]) == (
        len([c for c in crossed if c["dir"] == "in"]),
        len([c for c in crossed if c["dir"] == "out"]),
    )
    # Offline runs are deterministic; allow one miscount for another machine's ONNX Runtime.
    assert abs(last["in"] - PEDESTRIAN_IN) + abs(last["out"] - PEDESTRIAN_OUT) <= 1, last
    # Lines along the frame's edges counted nothing before: no anchor is ever beyond them.
    for name, (true_in, true_out) in EDGE_COUNTS.items():
        edge = frames[-1]["lines"][name]
        assert abs(edge["in"] - true_in) + abs(edge["out"] - true_out) <= 1, (name, edge)
