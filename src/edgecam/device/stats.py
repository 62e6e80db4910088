"""Per-camera statistics over an interval, from the inference worker's frame summaries."""

from __future__ import annotations

from dataclasses import dataclass, field

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
class IntervalStats:
    """One camera over ``[start, ...)``: each track counted once, under its last label."""

    start: float
    labels: dict[tuple[int, int], str] = field(default_factory=dict)
    peak: int = 0
    frames: int = 0

    def add_frame(self, source: int, tracks: list[tuple[int, str]]) -> None:
        """``source`` tells track ids of one worker process from a restarted one's."""
        for track_id, label in tracks:
            self.labels[(source, track_id)] = label
        self.peak = max(self.peak, len(tracks))
        self.frames += 1

    def counts(self, known_labels: tuple[str, ...]) -> dict[str, int]:
        counts = dict.fromkeys(known_labels, 0)
        for label in self.labels.values():
            counts[label] = counts.get(label, 0) + 1
        return counts
