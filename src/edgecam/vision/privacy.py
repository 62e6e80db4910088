"""Which parts of a frame no output may show: faces (tracked, just detected or just lost) and
the camera's static privacy masks.

Pure logic: per frame, the face tracks' boxes and (on detection frames) the detector's raw
face boxes go in; rectangles to hide come out. The tracker carries faces between detections;
a raw detection covers a face the tracker has not confirmed yet (its first detections); and
anything seen in the last ``hold_s`` seconds stays hidden where it was last seen, so a face
the tracker just lost, or one the detector missed on one frame, is not shown. Each box is
enlarged by ``margin`` of its size on every side, for the motion between detections.

It cannot hide a face the detector never found: see the README's privacy section.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from edgecam.config import PrivacyConfig

__all__ = ["FaceHold", "Rect"]

Rect = tuple[int, int, int, int]  # x1, y1, x2, y2 in pixels, x2/y2 exclusive


@dataclass
class _Seen:
    box: npt.NDArray[np.float64]
    t: float


class FaceHold:
    """Face regions to hide on each frame, held for ``hold_s`` after they were last seen."""

    def __init__(self, config: PrivacyConfig) -> None:
        self._margin = config.margin
        self._hold = config.hold_s
        self._tracks: dict[int, _Seen] = {}
        self._detections: list[_Seen] = []

    def update(
        self,
        t: float,
        track_ids: npt.ArrayLike,
        track_boxes: npt.ArrayLike,
        detections: npt.ArrayLike | None,
        frame_size: tuple[int, int],
    ) -> tuple[Rect, ...]:
        """The rectangles to hide at video time ``t`` (s); boxes in source pixels."""
        boxes = np.asarray(track_boxes, dtype=np.float64).reshape(-1, 4)
        for tid, box in zip(np.asarray(track_ids).reshape(-1).tolist(), boxes, strict=True):
            self._tracks[int(tid)] = _Seen(box, t)
        if detections is not None:
            self._detections += [_Seen(b, t) for b in np.asarray(detections).reshape(-1, 4)]
        horizon = t - self._hold
        # A timeline that went back (a looped file, a restarted source) forgets everything.
        self._tracks = {k: s for k, s in self._tracks.items() if horizon <= s.t <= t}
        self._detections = [s for s in self._detections if horizon <= s.t <= t]
        seen = [s.box for s in self._tracks.values()] + [s.box for s in self._detections]
        if not seen:
            return ()
        return _expand(np.stack(seen), self._margin, frame_size)


def _expand(
    boxes: npt.NDArray[np.float64], margin: float, frame_size: tuple[int, int]
) -> tuple[Rect, ...]:
    w, h = frame_size
    size = boxes[:, 2:] - boxes[:, :2]
    grown = np.concatenate([boxes[:, :2] - margin * size, boxes[:, 2:] + margin * size], axis=1)
    grown = np.floor(grown).astype(np.int64)
    grown[:, 2:] += 1
    grown[:, [0, 2]] = np.clip(grown[:, [0, 2]], 0, w)
    grown[:, [1, 3]] = np.clip(grown[:, [1, 3]], 0, h)
    keep = (grown[:, 2] > grown[:, 0]) & (grown[:, 3] > grown[:, 1])
    return tuple((int(a), int(b), int(c), int(d)) for a, b, c, d in grown[keep].tolist())
