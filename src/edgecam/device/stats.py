"""Per-camera statistics over an interval, from the inference worker's frame summaries."""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from edgecam.device.events import LineFrame, ZoneFrame
from edgecam.protocol import ZoneStats

__all__ = ["CameraFigures", "IntervalStats"]


@dataclass
class CameraFigures:
    """The inference worker's counters as last reported (monotonic totals of its process)."""

    frames_in: float = 0.0
    frames_out: float = 0.0
    detections: float = 0.0

    def minus(self, earlier: CameraFigures) -> CameraFigures:
        """What happened since ``earlier``; a restarted worker counts from zero again."""

        def delta(now: float, then: float) -> float:
            return now - then if now >= then else now

        return CameraFigures(
            delta(self.frames_in, earlier.frames_in),
            delta(self.frames_out, earlier.frames_out),
            delta(self.detections, earlier.detections),
        )


@dataclass
class _ZoneInterval:
    peak: int = 0
    entries: int = 0
    dwells: list[float] = field(default_factory=list)
    longest_now: float = 0.0  # of the stays going on at the last frame

    def add(self, zone: ZoneFrame) -> None:
        self.peak = max(self.peak, zone.occupancy)
        self.entries += zone.entered
        self.dwells += zone.dwell_s
        self.longest_now = zone.longest_s if zone.occupancy else 0.0

    def figures(self) -> ZoneStats:
        longest = max([*self.dwells, self.longest_now]) if self.dwells or self.peak else None
        return ZoneStats(
            occupancy_peak=self.peak,
            entries=self.entries,
            exits=len(self.dwells),
            dwell_median_s=round(statistics.median(self.dwells), 3) if self.dwells else None,
            dwell_max_s=round(longest, 3) if longest is not None else None,
        )


@dataclass
class IntervalStats:
    """One camera over ``[start, ...)``: each track counted once, under its last label; per
    zone and per line what happened in the interval.

    ``start`` is the wall time it began; its length is measured from ``started`` (monotonic),
    as the wall clock may be stepped meanwhile (NTP on a board without a clock battery)."""

    start: float
    started: float = field(default_factory=time.monotonic)
    labels: dict[tuple[int, int], str] = field(default_factory=dict)
    peak: int = 0
    frames: int = 0
    _zones: dict[str, _ZoneInterval] = field(default_factory=dict)
    _lines: dict[str, dict[str, int]] = field(default_factory=dict)

    def add_frame(
        self,
        source: int,
        tracks: list[tuple[int, str]],
        zones: Mapping[str, ZoneFrame] | None = None,
        lines: Mapping[str, LineFrame] | None = None,
    ) -> None:
        """``source`` tells track ids of one worker process from a restarted one's."""
        for track_id, label in tracks:
            self.labels[(source, track_id)] = label
        self.peak = max(self.peak, len(tracks))
        self.frames += 1
        for name, zone in (zones or {}).items():
            self._zones.setdefault(name, _ZoneInterval()).add(zone)
        for name, line in (lines or {}).items():
            counts = self._lines.setdefault(name, {"in": 0, "out": 0})
            counts["in"] += line.crossed_in
            counts["out"] += line.crossed_out

    def span(self, now: float) -> float:
        """Seconds since the interval began, ``now`` a monotonic time; never zero."""
        return max(now - self.started, 1e-6)

    def zone_figures(self) -> dict[str, ZoneStats]:
        return {name: zone.figures() for name, zone in self._zones.items()}

    def line_figures(self) -> dict[str, dict[str, int]]:
        return {name: dict(counts) for name, counts in self._lines.items()}

    def counts(self, known_labels: tuple[str, ...]) -> dict[str, int]:
        counts = dict.fromkeys(known_labels, 0)
        for label in self.labels.values():
            counts[label] = counts.get(label, 0) + 1
        return counts
