"""Accuracy of detectors and the tracker against a labelled evaluation set.

The set (``media/eval/``, its README says where each clip comes from and how it was
labelled) is a few scenes, each a JSON file of labelled frames of a video clip: person boxes
with an identity per person, ``ignore`` boxes for crowds too small to label one by one, and
optionally face boxes. This module loads it and holds the metric maths; the benchmark
``bench/bench_accuracy.py`` runs detectors and the tracker over it.

Matching is the PASCAL VOC rule at IoU 0.5: detections in descending score order each take
the unmatched labelled box of highest IoU >= 0.5; a detection that matches none but lies
mostly (>= 50 % of its area) inside an ``ignore`` box is neither a true nor a false positive.
AP50 is the area under the precision envelope (all-point interpolation).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from edgecam.errors import EdgecamError
from edgecam.vision.detections import Detections

__all__ = [
    "SIZE_BUCKETS",
    "EvalFrame",
    "EvalSetError",
    "Matches",
    "Scene",
    "average_precision",
    "bucket_of",
    "from_letterbox",
    "iou_matrix",
    "letterbox",
    "load_scene",
    "load_scenes",
    "match_frame",
    "pr_curve",
    "read_frames",
]

FloatArray = npt.NDArray[np.float32]
Frame = npt.NDArray[np.uint8]

#: Size buckets by box height in pixels of the source frame: [low, high).
SIZE_BUCKETS: dict[str, tuple[float, float]] = {
    "small": (0.0, 64.0),
    "medium": (64.0, 160.0),
    "large": (160.0, float("inf")),
}
IOU_MATCH = 0.5
IGNORE_COVER = 0.5


class EvalSetError(EdgecamError):
    """The evaluation set is missing, malformed, or does not match its clips."""


def _boxes(rows: Sequence[Sequence[float]], width: int, what: str) -> FloatArray:
    arr = np.asarray(rows, dtype=np.float32).reshape(-1, width) if rows else np.zeros((0, width))
    if len(arr) and np.any(arr[:, 2] <= arr[:, 0]) | np.any(arr[:, 3] <= arr[:, 1]):
        raise EvalSetError(f"{what}: a box with x2 <= x1 or y2 <= y1")
    return arr.astype(np.float32)


@dataclass(frozen=True)
class EvalFrame:
    """One labelled frame: ``persons`` (N, 4) xyxy with ``ids`` (N,), ``ignore``, ``faces``."""

    index: int
    persons: FloatArray
    ids: npt.NDArray[np.int64]
    ignore: FloatArray
    faces: FloatArray | None


@dataclass(frozen=True)
class Scene:
    """A labelled clip: which frames, how to decode them, how live would see them."""

    name: str
    clip: Path
    size: tuple[int, int]
    fps: float  # frame rate of the live camera this clip stands for
    step: int  # camera frames from one labelled frame to the next: the detector's period
    frames: tuple[EvalFrame, ...]
    condition: dict[str, float] = field(default_factory=dict)  # derived darkening, if any
    faces_labelled: bool = False

    @property
    def persons(self) -> int:
        """Distinct labelled persons (identities)."""
        ids: set[int] = set()
        for f in self.frames:
            ids.update(int(i) for i in f.ids)
        return len(ids)


def load_scene(path: Path, root: Path) -> Scene:
    """The scene in ``path``; its ``clip`` is relative to ``root`` (the repository)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EvalSetError(f"cannot read evaluation scene {path}: {exc}") from exc
    if "labels_from" in doc:  # a derived condition of another scene's frames and labels
        base = load_scene(path.parent / doc["labels_from"], root)
        return Scene(
            doc["name"],
            base.clip,
            base.size,
            base.fps,
            base.step,
            base.frames,
            {k: float(v) for k, v in doc["condition"].items()},
            base.faces_labelled,
        )
    try:
        faces_labelled = bool(doc.get("faces_labelled", False))
        frames = []
        for row in doc["frames"]:
            persons = _boxes(row.get("persons", []), 5, f"{path} frame {row['i']}")
            frames.append(
                EvalFrame(
                    int(row["i"]),
                    persons[:, :4].copy(),
                    persons[:, 4].astype(np.int64),
                    _boxes(row.get("ignore", []), 4, f"{path} frame {row['i']}"),
                    _boxes(row.get("faces", []), 4, f"{path} frame {row['i']}")
                    if faces_labelled
                    else None,
                )
            )
        indices = [f.index for f in frames]
        if indices != sorted(set(indices)):
            raise EvalSetError(f"{path}: frame indices must be increasing and unique")
        return Scene(
            doc["name"],
            root / doc["clip"],
            (int(doc["size"][0]), int(doc["size"][1])),
            float(doc["fps"]),
            int(doc["step"]),
            tuple(frames),
            {},
            faces_labelled,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise EvalSetError(f"{path} is not a valid evaluation scene: {exc!r}") from exc


def load_scenes(folder: Path, root: Path) -> list[Scene]:
    """Every ``*.json`` scene in ``folder``, by name."""
    paths = sorted(folder.glob("*.json"))
    if not paths:
        raise EvalSetError(f"no evaluation scenes (*.json) in {folder}")
    return [load_scene(p, root) for p in paths]


def _darken(frame: Frame, condition: dict[str, float], index: int) -> Frame:
    """Poor light made from a daylight frame: gain, gamma, then sensor-like noise."""
    x = frame.astype(np.float32) / 255.0
    x = condition.get("gain", 1.0) * x ** condition.get("gamma", 1.0)
    rng = np.random.default_rng(index)
    x = x * 255.0 + rng.normal(0.0, condition.get("noise", 0.0), x.shape)
    return np.clip(x, 0, 255).astype(np.uint8)


def letterbox(
    src: Frame, size: tuple[int, int], *, area: bool = False
) -> tuple[Frame, tuple[float, int, int]]:
    """``src`` scaled to fit ``size`` (width, height) between black borders, centred, as the
    pipeline's ``videoscale add-borders`` makes a model frame; (frame, (scale, dx, dy)):
    source pixels to the frame's are ``x * scale + dx``. Bilinear, or ``area`` averaging."""
    import cv2

    w, h = size
    sh, sw = src.shape[:2]
    scale = min(w / sw, h / sh)
    cw, ch = round(sw * scale), round(sh * scale)
    dx, dy = (w - cw) // 2, (h - ch) // 2
    out = np.zeros((h, w, 3), dtype=np.uint8)
    how = cv2.INTER_AREA if area else cv2.INTER_LINEAR
    out[dy : dy + ch, dx : dx + cw] = cv2.resize(src, (cw, ch), interpolation=how)
    return out, (scale, dx, dy)


def from_letterbox(dets: Detections, fit: tuple[float, int, int]) -> Detections:
    """``dets`` found in a frame :func:`letterbox` made, in the source's pixels (``fit`` is
    the ``(scale, dx, dy)`` it returned)."""
    scale, dx, dy = fit
    return dets.mapped(1 / scale, 1 / scale, -dx / scale, -dy / scale)


def read_frames(scene: Scene) -> Iterator[tuple[EvalFrame, Frame]]:
    """Each labelled frame of ``scene`` with its RGB picture, in order."""
    import cv2

    capture = cv2.VideoCapture(str(scene.clip))
    if not capture.isOpened():
        raise EvalSetError(f"cannot open {scene.clip} (scene {scene.name})")
    try:
        wanted = iter(scene.frames)
        target = next(wanted, None)
        index = 0
        while target is not None:
            ok, bgr = capture.read()
            if not ok:
                raise EvalSetError(
                    f"{scene.clip} ended at frame {index}; scene {scene.name} labels frame "
                    f"{target.index}"
                )
            if index == target.index:
                rgb = np.ascontiguousarray(bgr[:, :, ::-1])
                if (rgb.shape[1], rgb.shape[0]) != scene.size:
                    raise EvalSetError(
                        f"{scene.clip} is {rgb.shape[1]}x{rgb.shape[0]}, scene {scene.name} "
                        f"says {scene.size}"
                    )
                if scene.condition:
                    rgb = _darken(rgb, scene.condition, index)
                yield target, rgb
                target = next(wanted, None)
            index += 1
    finally:
        capture.release()


def iou_matrix(a: FloatArray, b: FloatArray) -> FloatArray:
    """IoU of each box of ``a`` (N, 4) with each of ``b`` (M, 4): (N, M)."""
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)), dtype=np.float32)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    result: FloatArray = (inter / np.maximum(union, 1e-9)).astype(np.float32)
    return result


def _covered(boxes: FloatArray, regions: FloatArray) -> npt.NDArray[np.bool_]:
    """Whether each box lies at least IGNORE_COVER of its area inside one of ``regions``."""
    if not len(boxes) or not len(regions):
        return np.zeros(len(boxes), dtype=bool)
    lt = np.maximum(boxes[:, None, :2], regions[None, :, :2])
    rb = np.minimum(boxes[:, None, 2:], regions[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = np.prod(np.clip(boxes[:, 2:] - boxes[:, :2], 1e-9, None), axis=1)
    covered: npt.NDArray[np.bool_] = (inter / area[:, None] >= IGNORE_COVER).any(axis=1)
    return covered


def bucket_of(boxes: FloatArray) -> list[str]:
    """The size bucket of each box, by its height."""
    heights = boxes[:, 3] - boxes[:, 1]
    out = []
    for h in heights:
        for name, (lo, hi) in SIZE_BUCKETS.items():
            if lo <= h < hi:
                out.append(name)
                break
    return out


@dataclass(frozen=True)
class Matches:
    """One frame's detections judged against its labels.

    ``tp``/``ignored`` per detection (in the order given); ``gt_hit`` per labelled box: the
    index of the detection that matched it, or -1.
    """

    tp: npt.NDArray[np.bool_]
    ignored: npt.NDArray[np.bool_]
    gt_hit: npt.NDArray[np.int64]


def match_frame(
    boxes: FloatArray, scores: FloatArray, truth: FloatArray, ignore: FloatArray
) -> Matches:
    """Greedy matching by descending score at IoU >= 0.5 (PASCAL VOC)."""
    n = len(boxes)
    tp = np.zeros(n, dtype=bool)
    gt_hit = np.full(len(truth), -1, dtype=np.int64)
    iou = iou_matrix(boxes, truth)
    for d in np.argsort(-scores, kind="stable"):
        if not len(truth):
            break
        candidates = np.where(gt_hit < 0, iou[d], -1.0)
        g = int(np.argmax(candidates))
        if candidates[g] >= IOU_MATCH:
            gt_hit[g] = d
            tp[d] = True
    ignored = ~tp & _covered(boxes, ignore)
    return Matches(tp, ignored, gt_hit)


def pr_curve(
    scores: FloatArray, tp: npt.NDArray[np.bool_], n_truth: int
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """(thresholds, precision, recall) with detections pooled over frames, best first."""
    order = np.argsort(-scores, kind="stable")
    hits = tp[order].astype(np.float64)
    ctp = np.cumsum(hits)
    cfp = np.cumsum(1.0 - hits)
    precision = ctp / np.maximum(ctp + cfp, 1e-9)
    recall = ctp / max(n_truth, 1)
    return (
        scores[order].astype(np.float32),
        precision.astype(np.float32),
        recall.astype(np.float32),
    )


def average_precision(precision: FloatArray, recall: FloatArray) -> float:
    """All-point interpolated AP: area under the monotone precision envelope."""
    if not len(precision):
        return 0.0
    r = np.concatenate([[0.0], recall.astype(np.float64), [recall[-1]]])
    p = np.concatenate([[1.0], precision.astype(np.float64), [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]
    return float(np.sum((r[1:] - r[:-1]) * p[1:]))
