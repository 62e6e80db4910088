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
from edgecam.vision.colour import YuvMatrix

_PIXELATE_REPEAT = 6
Planes = tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8], npt.NDArray[np.uint8]]

__all__ = ["FaceHold", "Rect", "face_patch", "fill_patch"]

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
        self._blind_after = config.blind_after_s
        self._tracks: dict[int, _Seen] = {}
        self._detections: list[_Seen] = []
        self._last_look: float | None = None
        self.blind = True

    def update(
        self,
        t: float,
        track_ids: npt.ArrayLike,
        track_boxes: npt.ArrayLike,
        detections: npt.ArrayLike | None,
        frame_size: tuple[int, int],
    ) -> tuple[Rect, ...]:
        """The rectangles to hide at video time ``t`` (s); boxes in source pixels.
        ``detections`` is None where the detector did not look at this frame; after the
        call, :attr:`blind` says whether the whole picture must be hidden (the detector has
        not looked yet, or not for ``blind_after_s``)."""
        boxes = np.asarray(track_boxes, dtype=np.float64).reshape(-1, 4)
        for tid, box in zip(np.asarray(track_ids).reshape(-1).tolist(), boxes, strict=True):
            self._tracks[int(tid)] = _Seen(box, t)
        if detections is not None:
            found = np.asarray(detections, dtype=np.float64).reshape(-1, 4)
            # A detection a track covers needs no rectangle of its own; nor does an older
            # one that a track or a newer detection now covers.
            fresh = found[~_covered(found, boxes)]
            current = np.concatenate([boxes, fresh])
            self._detections = [
                s for s in self._detections if not _covered(s.box[None], current)[0]
            ]
            self._detections += [_Seen(b, t) for b in fresh]
            self._last_look = t
        last = self._last_look
        self.blind = last is None or not 0 <= t - last <= self._blind_after
        horizon = t - self._hold
        # A timeline that went back (a looped file, a restarted source) forgets everything.
        self._tracks = {k: s for k, s in self._tracks.items() if horizon <= s.t <= t}
        self._detections = [s for s in self._detections if horizon <= s.t <= t]
        seen = [s.box for s in self._tracks.values()] + [s.box for s in self._detections]
        if not seen:
            return ()
        return _expand(np.stack(seen), self._margin, frame_size)


def _covered(boxes: npt.NDArray[np.float64], by: npt.NDArray[np.float64]) -> npt.NDArray[np.bool_]:
    """Which of ``boxes`` have their centre inside one of ``by``."""
    if not len(boxes) or not len(by):
        return np.zeros(len(boxes), dtype=bool)
    cx = (boxes[:, 0] + boxes[:, 2])[:, None] / 2
    cy = (boxes[:, 1] + boxes[:, 3])[:, None] / 2
    inside = (by[:, 0] <= cx) & (cx <= by[:, 2]) & (by[:, 1] <= cy) & (cy <= by[:, 3])
    return np.asarray(inside.any(axis=1))


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


def _block_means(
    plane: npt.NDArray[np.uint8], y1: int, y2: int, x1: int, x2: int, by: int, bx: int
) -> npt.NDArray[np.float32]:
    """(by, bx) means of ``plane[y1:y2, x1:x2]`` cut into equal blocks (a remainder of fewer
    than a block's rows or columns left out); reads that region only."""
    kh, kw = max(1, (y2 - y1) // by), max(1, (x2 - x1) // bx)
    region = plane[y1 : y1 + by * kh, x1 : x1 + bx * kw]
    sums = region.reshape(by, kh, bx, kw).sum(axis=(1, 3), dtype=np.uint32)
    return np.asarray(sums, dtype=np.float32) / (kh * kw)


def fill_patch(colour: tuple[int, int, int]) -> npt.NDArray[np.uint8]:
    """A 2x2 opaque BGRA image of ``colour``, for the overlay to scale to any rectangle."""
    r, g, b = colour
    return np.tile(np.array([b, g, r, 255], dtype=np.uint8), (2, 2, 1))


def face_patch(
    planes: Planes,
    rect: Rect,
    mode: str,
    blocks: int,
    colour: tuple[int, int, int],
    matrix: YuvMatrix,
) -> npt.NDArray[np.uint8]:
    """The opaque BGRA image that hides ``rect`` of an I420 frame (``planes`` Y, U, V).

    ``fill``: a 2x2 image of ``colour``; ``blur``: ``blocks / 2`` block means across the
    face, to be scaled up smoothly (linearly) by the overlay; ``pixelate``: ``blocks`` block
    means across it, each repeated 6 x 6 for the overlay to scale up. Only the rectangle's
    pixels are read. Their means go to RGB by ``matrix``: the one the overlay takes the
    image back into the frame's YUV with, so that the colours come back as they were.
    """
    x1, y1, x2, y2 = rect
    w, h = x2 - x1, y2 - y1
    if mode == "fill" or w < 2 or h < 2:
        return fill_patch(colour)
    if mode == "blur":  # smooth upscaling shows more than blocks: take fewer samples
        blocks = max(2, blocks // 2)
    # On the chroma grid (every second luma pixel each way): a block mean of a quarter of
    # the block's pixels is as good a mean, and reads 4x less.
    y_plane, u_plane, v_plane = planes
    cy1, cy2, cx1, cx2 = y1 // 2, (y2 + 1) // 2, x1 // 2, (x2 + 1) // 2
    bx = max(1, min(blocks, cx2 - cx1))
    by = max(1, min(round(blocks * h / w), cy2 - cy1))
    luma = _block_means(y_plane[::2, ::2], cy1, cy2, cx1, cx2, by, bx)
    u = _block_means(u_plane, cy1, cy2, cx1, cx2, by, bx)
    v = _block_means(v_plane, cy1, cy2, cx1, cx2, by, bx)
    to_rgb = matrix.yuv_to_rgb
    rgb = np.stack([luma, u, v], axis=-1) @ to_rgb[:, :3].T + to_rgb[:, 3]
    image = np.empty((by, bx, 4), dtype=np.uint8)
    image[..., :3] = np.clip(rgb[..., ::-1] + 0.5, 0, 255)
    image[..., 3] = 255
    if mode == "pixelate":
        # Each block repeated a few times: the overlay's smooth scaling then softens only a
        # thin seam between blocks, at a fraction of the pixels of a full-size image.
        image = np.repeat(np.repeat(image, _PIXELATE_REPEAT, axis=0), _PIXELATE_REPEAT, axis=1)
    return np.ascontiguousarray(image)
