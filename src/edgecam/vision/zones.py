"""Zones and counting lines, driven by a camera's tracks, frame by frame.

Pure logic over numpy arrays and a clock given by the caller (the frame's video time), so the
same tracks always give the same counts. Each track is reduced to one anchor point of its box
(the bottom centre by default: where a person stands).

* **Zones** (polygons): which tracks are in each zone now, entries, exits and each stay's
  dwell time. A track enters when its anchor is ``band`` pixels inside the polygon and leaves
  when it is ``band`` pixels outside, so an anchor jittering on the border counts nothing.
  A side of the polygon along the frame's edge is no border: nobody is seen beyond it, and
  the box of someone the edge cuts off (clipped to the frame) has its anchor on it.
  A track that ends (the tracker gave it up) leaves at the time it was last seen. A zone
  nowhere more than ``band`` deep can hold nobody: the config refuses one that is so on any
  frame, and the camera warns at start of one that is so at its frame size.
* **Lines** (segments): a track crosses when its anchor goes from beyond a band on one side
  of the line to beyond it on the other, between any two frames (it may jump the band in one
  step); while it is in the band its last side is kept. So one standing on the line counts
  nothing, one who crosses and comes back counts one in and one out, and one the tracker
  carries through a detector gap counts once. The crossing must pass within the segment
  (its ends extended by the band). A track seen first in the band comes from the half of
  the band it is in. A track whose id changes (the tracker lost it) starts afresh: a
  crossing needs one identity on both sides. Where the picture ends within the band on one
  side (a line along the frame's edge, or close to it), no anchor is ever beyond the band
  there: a box the frame's edge cuts on that side (someone partly out of the picture) is
  beyond it, its anchor taken to be on that edge.

Only positions a detection confirmed change anything: between detections the tracker's
estimate carries a box on at its last speed, and a track the detector has stopped finding
(someone who stopped, or a false track) would drift through a line or into a zone while it
lives. A crossing (or an entry, an exit) made by an estimate counts when the next detection
of that track confirms it, once; if none comes, it never happened.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from edgecam.config import Anchor, LineConfig, Polygon, along_frame_edge

__all__ = ["LineState", "ZoneCounter", "ZoneState", "anchors"]

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
# Anchors are kept this far (pixels) inside the frame: one on its edge (a clipped box) is
# then inside a zone whose side runs along that edge.
_EDGE_INSET = 0.5
# Cells of a zone's first look whether anything can be in it (once, at a new frame size) and
# the most it may split them into: a zone too close to the limit to tell goes unreported.
_FIRST_CELLS = 4096
_MAX_CELLS = 65536
_CHUNK = 4096  # cells a call: (cells, sides, 2) arrays of at most 6.5 MB
# A box's side this share of the frame from its edge is cut by it (detectors and the
# analytics clip boxes to the frame: on the pedestrian clip, those of people walking in or out
# end 0 or 1 px from it).
_CUT_SHARE = 0.005
# An edge of the frame stands in for a side of a line it faces within 60 degrees.
_FACING = 0.5
# The frame's edges (axis, outward: as in ``_Cut``) that, cutting a box, hide where its anchor
# is: its x is the box's middle, so either side edge does; its y is the box's bottom, top or
# middle, so only the edge that cuts that side (the feet of someone whose head the top edge
# cuts off are in the picture).
_HIDING_EDGES: dict[Anchor, frozenset[tuple[int, int]]] = {
    "bottom_centre": frozenset({(0, -1), (0, 1), (1, 1)}),
    "top_centre": frozenset({(0, -1), (0, 1), (1, -1)}),
    "centre": frozenset({(0, -1), (0, 1), (1, -1), (1, 1)}),
}
# Pixels under which a line's side is taken as not reached: beyond its band by less, or
# behind the line by less (an anchor put on the frame's edge that the line runs along).
_SUBPIXEL = 0.5


@dataclass(frozen=True, slots=True)
class ZoneState:
    """One zone on one frame."""

    name: str
    ids: tuple[int, ...]  # tracks in the zone now
    entered: tuple[int, ...]  # tracks that entered on this frame
    exited: tuple[tuple[int, float], ...]  # (track, dwell seconds) of stays ended on this frame
    longest_s: float  # the longest stay going on now (0 when empty)

    @property
    def occupancy(self) -> int:
        return len(self.ids)


@dataclass(frozen=True, slots=True)
class LineState:
    """One line on one frame: this frame's crossings and the totals since the start."""

    name: str
    crossings: tuple[tuple[int, str], ...]  # (track, "in" or "out") on this frame
    total_in: int
    total_out: int


def anchors(boxes: npt.ArrayLike, anchor: Anchor) -> FloatArray:
    """(N, 2) anchor points of (N, 4) ``x1, y1, x2, y2`` boxes."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x = (b[:, 0] + b[:, 2]) / 2
    y = {"bottom_centre": b[:, 3], "top_centre": b[:, 1], "centre": (b[:, 1] + b[:, 3]) / 2}
    return np.stack([x, y[anchor]], axis=1)


def _depth(points: FloatArray, polygon: FloatArray, border: BoolArray) -> FloatArray:
    """Signed distance of each point to the polygon's ``border`` edges (the others are
    left out): > 0 inside, < 0 outside; infinite where it has none."""
    v = polygon
    w = np.roll(polygon, -1, axis=0)
    px, py = points[:, :1], points[:, 1:]  # (N, 1) against (E,) edges
    straddles = (v[:, 1] > py) != (w[:, 1] > py)
    dy = np.where(w[:, 1] == v[:, 1], 1.0, w[:, 1] - v[:, 1])
    x_cross = v[:, 0] + (py - v[:, 1]) * (w[:, 0] - v[:, 0]) / dy
    inside = (straddles & (px < x_cross)).sum(axis=1) % 2 == 1
    edge = w - v
    length2 = np.maximum((edge**2).sum(axis=1), 1e-12)
    rel = points[:, None, :] - v[None, :, :]
    t = np.clip((rel * edge).sum(axis=2) / length2, 0.0, 1.0)
    nearest = rel - t[:, :, None] * edge[None, :, :]
    dist = np.where(border, np.sqrt((nearest**2).sum(axis=2)), np.inf).min(axis=1)
    return np.where(inside, dist, -dist)


def _border_edges(unit: FloatArray) -> BoolArray:
    """Which edges of a polygon (in shares of the frame) are a border: those not along the
    frame's edge."""
    points = [(float(x), float(y)) for x, y in unit]
    ends = points[1:] + points[:1]
    return np.array([not along_frame_edge(p, q) for p, q in zip(points, ends, strict=True)])


def _deeper_than(
    band: float, polygon: FloatArray, border: BoolArray, size: tuple[int, int]
) -> bool | None:
    """Whether an anchor (kept ``_EDGE_INSET`` inside the frame) can be more than ``band``
    pixels inside the zone; None where that could not be told in ``_MAX_CELLS`` cells.

    Cells of the zone's box: the depth changes no faster than the distance, so a cell whose
    centre is ``d`` deep holds no point deeper than ``d`` plus its half-diagonal. Cells that
    might hold one are split in four until one point is found or none can be.
    """
    lo = np.maximum(polygon.min(axis=0), _EDGE_INSET)
    hi = np.minimum(polygon.max(axis=0), np.asarray(size, dtype=np.float64) - _EDGE_INSET)
    extent = hi - lo
    if (extent < 0).any():
        return False
    step = max(band, float(np.sqrt(extent.prod() / _FIRST_CELLS)), 1e-3)
    counts = np.maximum(np.ceil(extent / step), 1).astype(np.int64)
    half = extent / counts / 2
    gx, gy = (lo[i] + half[i] * (2 * np.arange(counts[i]) + 1) for i in (0, 1))
    centres = np.stack(np.meshgrid(gx, gy), axis=-1).reshape(-1, 2)
    while len(centres) <= _MAX_CELLS:
        chunks = np.array_split(centres, -(-len(centres) // _CHUNK))
        depth = np.concatenate([_depth(c, polygon, border) for c in chunks])
        if (depth > band).any():
            return True
        centres = centres[depth + float(np.hypot(*half)) > band]
        if not len(centres):
            return False
        half = half / 2
        quarter = np.array([[-1, -1], [1, -1], [-1, 1], [1, 1]]) * half
        centres = (centres[:, None, :] + quarter[None, :, :]).reshape(-1, 2)
    return None


@dataclass
class _Zone:
    name: str
    unit: FloatArray  # polygon in shares of the frame
    pixels: FloatArray = field(default_factory=lambda: np.zeros((0, 2)))
    border: BoolArray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    entered_at: dict[int, float] = field(default_factory=dict)  # track -> time it entered


@dataclass(frozen=True, slots=True)
class _Cut:
    """An edge of the frame facing a side of a line that the picture does not reach beyond
    the band: a box this edge cuts is beyond the band on that side."""

    side: int  # +1 "in", -1 "out"
    axis: int  # 0: the left or right edge, 1: the top or bottom one
    at: float  # its x or y (pixels)
    outward: int  # -1: left or top, +1: right or bottom
    tolerance: float  # a box's side this near the edge (pixels) is cut by it


@dataclass
class _Line:
    name: str
    config: LineConfig
    origin: FloatArray = field(default_factory=lambda: np.zeros(2))
    along: FloatArray = field(default_factory=lambda: np.zeros(2))  # unit, start -> end
    normal: FloatArray = field(default_factory=lambda: np.zeros(2))  # unit, towards "in"
    length: float = 0.0
    band: float = 0.0
    cuts: tuple[_Cut, ...] = ()
    # track -> (side +1 in / -1 out, signed distance, position along) at its last definite side
    side: dict[int, tuple[int, float, float]] = field(default_factory=dict)
    total_in: int = 0
    total_out: int = 0


def _clip(
    polygon: FloatArray, origin: FloatArray, direction: FloatArray, least: float
) -> FloatArray:
    """The part of a convex polygon where ``(p - origin) @ direction >= least``."""
    value = (polygon - origin) @ direction - least
    kept: list[FloatArray] = []
    for i in range(len(polygon)):
        j = (i + 1) % len(polygon)
        if value[i] >= 0:
            kept.append(polygon[i])
        if (value[i] >= 0) != (value[j] >= 0):
            kept.append(polygon[i] + (polygon[j] - polygon[i]) * (value[i] / (value[i] - value[j])))
    return np.array(kept, dtype=np.float64).reshape(-1, 2)


def _cuts(line: _Line, frame_size: tuple[int, int]) -> tuple[_Cut, ...]:
    """The frame's edges that stand in for a side of ``line`` the picture does not reach
    beyond the band, beside the segment (a line along the frame's edge, or within its band
    of it): a track's anchor can never be beyond the band there, but its box, cut by the
    edge, is seen to go past it. Only edges that hide the anchor of a box they cut."""
    w, h = frame_size
    picture = np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float64)
    # Never empty: the segment is in the picture.
    beside = _clip(picture, line.origin, line.along, -line.band)
    beside = _clip(beside, line.origin, -line.along, -(line.length + line.band))
    signed = (beside - line.origin) @ line.normal
    edges = ((0, 0.0, -1), (0, float(w), 1), (1, 0.0, -1), (1, float(h), 1))
    return tuple(
        _Cut(side, axis, at, outward, max(1.0, _CUT_SHARE * frame_size[axis]))
        for side in (1, -1)
        if (side * signed).max() <= line.band + _SUBPIXEL
        for axis, at, outward in edges
        if outward * side * line.normal[axis] > _FACING
        and (axis, outward) in _HIDING_EDGES[line.config.anchor]
    )


def _cut_off(line: _Line, points: FloatArray, boxes: FloatArray) -> dict[int, tuple[int, float]]:
    """The boxes that an edge of ``line.cuts`` cuts, on its side of the line: box index ->
    (that side, where its anchor, put on the edge, is along the line). A box cut by edges of
    both sides is left out: which one it is beyond is not known."""
    found: dict[int, tuple[int, float]] = {}
    both: set[int] = set()
    (ox, oy), (ax, ay), (nx, ny) = line.origin.tolist(), line.along.tolist(), line.normal.tolist()
    for cut in line.cuts:
        edge = boxes[:, cut.axis + (2 if cut.outward > 0 else 0)]
        for k in np.flatnonzero(cut.outward * (edge - cut.at) >= -cut.tolerance).tolist():
            x, y = points[k].tolist()
            if cut.axis == 0:
                x = cut.at
            else:
                y = cut.at
            rx, ry = x - ox, y - oy
            if cut.side * (rx * nx + ry * ny) < -_SUBPIXEL:
                continue  # the edge is on the line's other side here
            if found.get(k, (cut.side,))[0] != cut.side:
                both.add(k)
            found[k] = (cut.side, rx * ax + ry * ay)
    for k in both:
        del found[k]
    return found


class ZoneCounter:
    """Zone occupancy, entries, exits and dwell; line in/out counts; one camera's tracks."""

    def __init__(
        self,
        zones: Mapping[str, Polygon],
        lines: Mapping[str, LineConfig],
        *,
        zone_anchor: Anchor = "bottom_centre",
        zone_band: float = 0.02,
    ) -> None:
        if zone_band < 0:
            raise ValueError(f"zone_band must be >= 0, got {zone_band}")
        self._zones = [_Zone(n, np.asarray(p, dtype=np.float64)) for n, p in zones.items()]
        for z in self._zones:
            z.border = _border_edges(z.unit)
        self._lines = [_Line(n, cfg) for n, cfg in lines.items()]
        self._zone_anchor: Anchor = zone_anchor
        self._zone_band_share = zone_band
        self._zone_band = 0.0
        self._size: tuple[int, int] | None = None
        self._last_seen: dict[int, float] = {}  # live track -> when last detected

    @property
    def empty(self) -> bool:
        return not self._zones and not self._lines

    def geometry(
        self, frame_size: tuple[int, int]
    ) -> tuple[dict[str, FloatArray], dict[str, tuple[FloatArray, FloatArray, FloatArray]]]:
        """Zones (polygons) and lines (start, end, unit normal towards "in") in pixels of a
        ``frame_size`` picture."""
        self._resize(frame_size)
        zones = {z.name: z.pixels for z in self._zones}
        lines = {
            ln.name: (ln.origin, ln.origin + ln.along * ln.length, ln.normal) for ln in self._lines
        }
        return zones, lines

    def unreachable_zones(self, frame_size: tuple[int, int]) -> list[str]:
        """The zones no track can ever be in on a ``frame_size`` picture: none of their
        points lies more than ``zone_band`` inside their border."""
        self._resize(frame_size)
        return [
            z.name
            for z in self._zones
            if _deeper_than(self._zone_band, z.pixels, z.border, frame_size) is False
        ]

    @property
    def zone_band_pixels(self) -> float:
        """``zone_band`` in pixels of the last frame size seen."""
        return self._zone_band

    def _resize(self, frame_size: tuple[int, int]) -> None:
        if frame_size == self._size:
            return
        w, h = frame_size
        scale = np.array([w, h], dtype=np.float64)
        self._size = frame_size
        self._zone_band = self._zone_band_share * h
        for z in self._zones:
            z.pixels = z.unit * scale
        for ln in self._lines:
            start = np.asarray(ln.config.start, dtype=np.float64) * scale
            end = np.asarray(ln.config.end, dtype=np.float64) * scale
            d = end - start
            ln.length = float(np.hypot(*d))
            ln.origin = start
            ln.along = d / ln.length
            dx, dy = ln.along
            # Screen coordinates (y down): the left of a walk from start to end is (dy, -dx).
            left = np.array([dy, -dx])
            ln.normal = left if ln.config.in_side == "left" else -left
            ln.band = ln.config.band * h
            ln.cuts = _cuts(ln, frame_size)

    def update(
        self,
        t: float,
        ids: npt.ArrayLike,
        boxes: npt.ArrayLike,
        frame_size: tuple[int, int],
        seen: npt.ArrayLike | None = None,
    ) -> tuple[tuple[ZoneState, ...], tuple[LineState, ...]]:
        """One frame at video time ``t`` (s): the tracks' ids and boxes (pixels), and which
        of them a detection matched on this frame (``seen``; None: all)."""
        self._resize(frame_size)
        track_ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        box_array = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        if len(track_ids) != len(box_array):
            raise ValueError(f"{len(track_ids)} ids for {len(box_array)} boxes")
        confirmed = (
            [True] * len(track_ids)
            if seen is None
            else [bool(v) for v in np.asarray(seen).reshape(-1)]
        )
        if len(confirmed) != len(track_ids):
            raise ValueError(f"{len(confirmed)} seen flags for {len(track_ids)} ids")
        present = set(track_ids)
        gone = {tid: seen for tid, seen in self._last_seen.items() if tid not in present}
        for tid, sure in zip(track_ids, confirmed, strict=True):
            if sure or tid not in self._last_seen:
                self._last_seen[tid] = t  # a track that ends left when last detected
        for tid in gone:
            del self._last_seen[tid]
        zones = tuple(
            self._update_zone(z, t, track_ids, box_array, confirmed, gone) for z in self._zones
        )
        lines = tuple(
            self._update_line(ln, track_ids, box_array, confirmed, gone) for ln in self._lines
        )
        return zones, lines

    def _update_zone(
        self,
        zone: _Zone,
        t: float,
        ids: list[int],
        boxes: FloatArray,
        confirmed: list[bool],
        gone: dict[int, float],
    ) -> ZoneState:
        exited: list[tuple[int, float]] = []
        for tid, seen in gone.items():
            since = zone.entered_at.pop(tid, None)
            if since is not None:
                exited.append((tid, seen - since))
        entered: list[int] = []
        if ids:
            size = np.asarray(self._size, dtype=np.float64)
            points = np.clip(anchors(boxes, self._zone_anchor), _EDGE_INSET, size - _EDGE_INSET)
            depth = _depth(points, zone.pixels, zone.border)
            band = self._zone_band
            for tid, d, sure in zip(ids, depth.tolist(), confirmed, strict=True):
                if not sure:
                    continue  # an estimate: wait for a detection to say where it is
                inside = tid in zone.entered_at
                if not inside and d > band:
                    zone.entered_at[tid] = t
                    entered.append(tid)
                elif inside and d < -band:
                    exited.append((tid, t - zone.entered_at.pop(tid)))
        longest = t - min(zone.entered_at.values()) if zone.entered_at else 0.0
        return ZoneState(
            zone.name,
            tuple(sorted(zone.entered_at)),
            tuple(entered),
            tuple(exited),
            longest,
        )

    def _update_line(
        self,
        line: _Line,
        ids: list[int],
        boxes: FloatArray,
        confirmed: list[bool],
        gone: dict[int, float],
    ) -> LineState:
        for tid in gone:
            line.side.pop(tid, None)
        crossings: list[tuple[int, str]] = []
        if ids:
            points = anchors(boxes, line.config.anchor)
            rel = points - line.origin
            signed = rel @ line.normal
            along = rel @ line.along
            cut_off = _cut_off(line, points, boxes) if line.cuts else {}
            band = line.band
            for k, (tid, s, a, sure) in enumerate(
                zip(ids, signed.tolist(), along.tolist(), confirmed, strict=True)
            ):
                if not sure:
                    continue  # an estimate: keep the last side
                off = cut_off.get(k)
                if off is not None:
                    # Cut off by the frame's edge where the picture ends within the band.
                    side, a = off
                    s = side * band
                elif abs(s) <= band:
                    if tid not in line.side and s != 0:
                        # First seen on the line (out of a crowd, say): the half it is on
                        # is where it comes from.
                        line.side[tid] = (1 if s > 0 else -1, s, a)
                    continue  # on the line: keep the last side
                else:
                    side = 1 if s > 0 else -1
                before = line.side.get(tid)
                line.side[tid] = (side, s, a)
                if before is None or before[0] == side:
                    continue
                # Where the anchor's path met the line, along the segment.
                _, s0, a0 = before
                at = a0 + (a - a0) * (s0 / (s0 - s) if s0 != s else 0.5)
                if -band <= at <= line.length + band:
                    crossings.append((tid, "in" if side > 0 else "out"))
        line.total_in += sum(1 for _, d in crossings if d == "in")
        line.total_out += len(crossings) - sum(1 for _, d in crossings if d == "in")
        return LineState(line.name, tuple(crossings), line.total_in, line.total_out)
