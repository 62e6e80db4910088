"""ONNX Runtime detector backends: CenterFace, BlazeFace, NanoDet and the mask classifier.

Tensor layouts and decoding follow ``edgecam/models/MODELS.md``. Every ``detect()`` takes an
RGB uint8 frame already scaled to the detector's ``input_size`` (the GStreamer pipeline does
the scaling) and returns boxes in that frame's pixels.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from edgecam.config import MODELS_DIR, VisionConfig
from edgecam.errors import EdgecamError, ModelError
from edgecam.vision.backends import InferenceBackend, Runtime, batch_dim, open_backend
from edgecam.vision.detections import PRIVACY_FACE, Detections, Detector
from edgecam.vision.settled import SettledTracks, unsettled

__all__ = [
    "BatchDetector",
    "BlazeFaceDetector",
    "CenterFaceDetector",
    "FaceMaskDetector",
    "MaskClassifier",
    "NanoDetDetector",
    "WithPrivacyFaces",
    "build_detector",
    "detect_batch",
    "nms",
]

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]
Frame = npt.NDArray[np.uint8]

# A dimension the model must have: an int, or None for "any". Symbolic model dims match anything.
_Shape = tuple[int | None, ...]


@dataclass(frozen=True)
class _ModelSpec:
    """What a model family looks like from outside, and the config key that points to it."""

    family: str
    key: str
    input: _Shape
    outputs: tuple[_Shape, ...]
    hint: str = ""  # what else to set when the file is of another family


_CENTERFACE = _ModelSpec(
    "CenterFace",
    "vision.face_model",
    (None, 3, None, None),
    ((None, 1, None, None), (None, 2, None, None), (None, 2, None, None), (None, 10, None, None)),
    " (or vision.face_detector to the family of this model, e.g. blazeface)",
)
_BLAZEFACE = _ModelSpec(
    "BlazeFace",
    "vision.face_model",
    (None, 192, 192, 3),
    ((None, None, 16), (None, None, 1)),
    " (or vision.face_detector to the family of this model, e.g. centerface)",
)
_MASK = _ModelSpec("mask classifier", "vision.mask_model", (None, 224, 224, 3), ((None, 2),))
_NANODET = _ModelSpec(
    "NanoDet",
    "vision.person_model",
    (None, 3, None, None),
    ((None, None, None),) * 6,  # cls_s8, cls_s16, cls_s32, reg_s8, reg_s16, reg_s32
)


def _env_name(key: str) -> str:
    return "EDGECAM_" + key.upper().replace(".", "__")


def _matches(actual: Sequence[object], expected: _Shape) -> bool:
    if len(actual) != len(expected):
        return False
    # A symbolic (str) or unknown (None) model dimension is accepted for any expectation.
    return all(
        e is None or not isinstance(a, int) or a == e for a, e in zip(actual, expected, strict=True)
    )


def _fmt(shape: Sequence[object]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _load(
    path: str | Path, runtime: Runtime, threads: int, spec: _ModelSpec = _CENTERFACE
) -> InferenceBackend:
    """``path`` loaded by the backend of ``runtime``, checked against the model family ``spec``."""
    path = Path(path)
    fix = f"set {spec.key} ({_env_name(spec.key)}) to a {spec.family} .onnx file{spec.hint}"
    if not path.is_file():
        raise ModelError(f"{spec.family} model file {path} not found; {fix}")
    try:
        backend = open_backend(path, runtime, threads)
    except (EdgecamError, ValueError):
        raise  # a missing engine or device, a bad argument: not the file's fault
    except Exception as exc:  # each engine raises its own exception types
        raise ModelError(f"cannot load {spec.family} model {path}: {exc}; {fix}") from exc

    got_in, got_out = backend.input_shape, backend.output_shapes
    if (
        backend.input_count != 1
        or backend.input_type != "tensor(float)"
        or not _matches(got_in, spec.input)
        or len(got_out) != len(spec.outputs)
        or not all(_matches(o, e) for o, e in zip(got_out, spec.outputs, strict=True))
    ):
        backend.close()
        raise ModelError(
            f"{path} does not look like a {spec.family} model: expected one float input "
            f"{_fmt(spec.input)} and outputs {[_fmt(s) for s in spec.outputs]}, got input "
            f"{_fmt(got_in)} ({backend.input_type}) and outputs {[_fmt(s) for s in got_out]}; "
            f"{fix}"
        )
    log.info("loaded %s model %s (%s)", spec.family, path, backend.description)
    return backend


class _Model:
    """One model on one backend; run() takes a batch (N, ...) and returns the outputs (N, ...)
    in graph order.

    ``provider`` is a :class:`Runtime`, or a device name (``"cpu"`` / ``"cuda"``) for ONNX
    Runtime. A model whose batch dimension is fixed at 1 still takes batches: it is run once a
    frame (``max_batch`` says so).
    """

    def __init__(
        self, path: str | Path, provider: str | Runtime, threads: int, spec: _ModelSpec
    ) -> None:
        self.runtime = Runtime.parse(provider)
        self._backend: InferenceBackend | None = _load(path, self.runtime, threads, spec)
        self.path = Path(path)
        self.family = spec.family
        self.input_shape: list[object] = list(self._backend.input_shape)
        self.max_batch = batch_dim(self._backend.input_shape)

    def run(self, x: FloatArray) -> list[FloatArray]:
        if self._backend is None:
            raise RuntimeError(f"{self.family} model {self.path} is closed")
        if self.max_batch is None or len(x) <= self.max_batch:
            return self._backend.run(x)
        step = self.max_batch
        parts = [self._backend.run(x[i : i + step]) for i in range(0, len(x), step)]
        return [np.concatenate(outs) for outs in zip(*parts, strict=True)]

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
        self._backend = None


# ---------------------------------------------------------------------------------------------
# Box helpers


def _iou_one(box: FloatArray, boxes: FloatArray) -> FloatArray:
    """IoU of one box (4,) with each of ``boxes`` (N, 4)."""
    ix1 = np.maximum(box[0], boxes[:, 0])
    iy1 = np.maximum(box[1], boxes[:, 1])
    ix2 = np.minimum(box[2], boxes[:, 2])
    iy2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
    area = max(float(box[2] - box[0]), 0.0) * max(float(box[3] - box[1]), 0.0)
    sides = np.clip(boxes[:, 2:] - boxes[:, :2], 0, None)
    areas = sides[:, 0] * sides[:, 1]
    result: FloatArray = inter / np.maximum(area + areas - inter, 1e-9)
    return result


def nms(
    boxes: FloatArray,
    scores: FloatArray,
    iou: float,
    classes: IntArray | None = None,
    max_det: int | None = None,
) -> IntArray:
    """Greedy non-maximum suppression; indices of the kept boxes, best score first.

    With ``classes``, boxes only suppress boxes of their own class.
    """
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    b = boxes.astype(np.float32, copy=True)
    if classes is not None:
        # Shift each class into its own region of the plane so classes never overlap.
        b += (classes.astype(np.float32) * (float(b.max()) + 1.0))[:, None]
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        best = int(order[0])
        keep.append(best)
        if max_det is not None and len(keep) >= max_det:
            break
        rest = order[1:]
        order = rest[_iou_one(b[best], b[rest]) <= iou]
    return np.asarray(keep, dtype=np.int64)


def _weighted_nms(
    boxes: FloatArray, scores: FloatArray, iou: float
) -> tuple[FloatArray, FloatArray]:
    """MediaPipe's WEIGHTED suppression: each group becomes its score-weighted mean box."""
    order = np.argsort(-scores, kind="stable")
    out_boxes: list[FloatArray] = []
    out_scores: list[float] = []
    while order.size:
        overlaps = _iou_one(boxes[order[0]], boxes[order])
        group = order[overlaps > iou]
        weights = scores[group]
        out_boxes.append((boxes[group] * weights[:, None]).sum(axis=0) / weights.sum())
        out_scores.append(float(scores[order[0]]))
        order = order[overlaps <= iou]
    return (
        np.asarray(out_boxes, dtype=np.float32).reshape(-1, 4),
        np.asarray(out_scores, dtype=np.float32),
    )


def _check_threshold(threshold: float) -> None:
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")


def _check_frame(frame: Frame, size: tuple[int, int]) -> None:
    w, h = size
    if frame.shape != (h, w, 3):
        raise ValueError(f"frame must be (H, W, 3) = ({h}, {w}, 3) RGB, got {frame.shape}")


def _check_input_size(size: tuple[int, int], multiple: int, model: _Model) -> tuple[int, int]:
    w, h = (int(size[0]), int(size[1]))
    if w <= 0 or h <= 0 or w % multiple or h % multiple:
        raise ValueError(f"input_size {size} must be positive multiples of {multiple}")
    fixed_h, fixed_w = model.input_shape[2:4]  # NCHW
    for name, want, got in (("width", fixed_w, w), ("height", fixed_h, h)):
        if isinstance(want, int) and want != got:
            raise ValueError(f"{model.path} has a fixed input {name} of {want}, input_size {size}")
    return w, h


def _bilinear_weights(n_src: int, n_dst: int) -> FloatArray:
    """(n_dst, n_src) matrix of bilinear weights, pixel centres aligned as in cv2.resize."""
    src = np.clip((np.arange(n_dst, dtype=np.float32) + 0.5) * (n_src / n_dst) - 0.5, 0, n_src - 1)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_src - 1)
    frac = src - i0
    weights = np.zeros((n_dst, n_src), dtype=np.float32)
    rows = np.arange(n_dst)
    weights[rows, i0] = 1 - frac
    weights[rows, i1] += frac  # i1 == i0 only at the last pixel, where frac is 0
    return weights


def _resize_bilinear(image: Frame, size: int) -> FloatArray:
    """``image`` (h, w, 3) resized to (size, size, 3) float32: two small matrix products."""
    h, w = image.shape[:2]
    cols = _bilinear_weights(h, size) @ image.reshape(h, w * 3).astype(np.float32)  # (size, w*3)
    cols = cols.reshape(size, w, 3).transpose(1, 0, 2).reshape(w, size * 3)
    out = (_bilinear_weights(w, size) @ cols).reshape(size, size, 3)  # (x, y, c)
    result: FloatArray = out.transpose(1, 0, 2)
    return result


def _empty() -> Detections:
    return Detections.empty()


@runtime_checkable
class BatchDetector(Detector, Protocol):
    """A :class:`Detector` that also takes several frames in one model call."""

    def detect_batch(self, frames: Sequence[Frame]) -> list[Detections]:
        """``detect`` of each frame, in order, from one stacked model input."""
        ...


def detect_batch(
    detector: Detector,
    frames: Sequence[Frame],
    settled: Sequence[SettledTracks | None] | None = None,
) -> list[Detections]:
    """``detector``'s detections of each frame: in one call where it batches, else in turn.

    ``settled`` (one per frame, for a detector shared by cameras) are the settled tracks of
    each frame's camera, for a detector that skips them (:class:`FaceMaskDetector`).
    """
    if settled is not None and isinstance(detector, FaceMaskDetector):
        return detector.detect_batch(frames, settled)
    if isinstance(detector, BatchDetector):
        return detector.detect_batch(frames)
    return [detector.detect(f) for f in frames]


def _run_batch(model: _Model, x: FloatArray) -> list[FloatArray]:
    """``model``'s outputs for the stacked input ``x`` (N, ...). A model file whose batch
    dimension is fixed at 1 (the vendored NanoDet and BlazeFace) is run once per frame and
    its outputs stacked: the same results, without the saving of one call."""
    if len(x) == 1 or model.input_shape[0] != 1:
        return model.run(x)
    runs = [model.run(x[i : i + 1]) for i in range(len(x))]
    return [np.concatenate(outs) for outs in zip(*runs, strict=True)]


def _check_frames(frames: Sequence[Frame], size: tuple[int, int]) -> None:
    for frame in frames:
        _check_frame(frame, size)


# ---------------------------------------------------------------------------------------------
# Detectors


class CenterFaceDetector:
    """CenterFace faces; input raw RGB 0..255 NCHW, any size in multiples of 32."""

    def __init__(
        self,
        path: str | Path,
        input_size: tuple[int, int] = (640, 352),
        threshold: float = 0.5,
        provider: str | Runtime = "cpu",
        threads: int = 2,
        nms_iou: float = 0.3,
    ) -> None:
        _check_threshold(threshold)
        self._model = _Model(path, provider, threads, _CENTERFACE)
        self._size = _check_input_size(input_size, 32, self._model)
        self.threshold = threshold
        self.nms_iou = nms_iou

    @property
    def input_size(self) -> tuple[int, int]:
        return self._size

    def detect(self, frame: Frame) -> Detections:
        return self.detect_batch([frame])[0]

    def detect_batch(self, frames: Sequence[Frame]) -> list[Detections]:
        _check_frames(frames, self._size)
        if not frames:
            return []
        x = np.stack(frames).transpose(0, 3, 1, 2).astype(np.float32)  # NCHW, contiguous
        heat, scale, offset = _run_batch(self._model, x)[:3]
        return [self._decode(heat[i], scale[i], offset[i]) for i in range(len(frames))]

    def _decode(self, heat: FloatArray, scale: FloatArray, offset: FloatArray) -> Detections:
        rows, cols = np.nonzero(heat[0] > self.threshold)
        if rows.size == 0:
            return _empty()
        w, h = self._size
        bh = np.exp(scale[0, rows, cols]) * 4
        bw = np.exp(scale[1, rows, cols]) * 4
        cy = (rows + offset[0, rows, cols] + 0.5) * 4
        cx = (cols + offset[1, rows, cols] + 0.5) * 4
        x1 = np.clip(cx - bw / 2, 0, w)
        y1 = np.clip(cy - bh / 2, 0, h)
        boxes = np.stack([x1, y1, np.minimum(x1 + bw, w), np.minimum(y1 + bh, h)], axis=1)
        boxes = boxes.astype(np.float32)
        scores = heat[0, rows, cols].astype(np.float32)
        keep = nms(boxes, scores, self.nms_iou)
        return Detections(boxes[keep], scores[keep])

    def close(self) -> None:
        self._model.close()


class BlazeFaceDetector:
    """MediaPipe BlazeFace full range; ``input_size`` is (192, 192).

    Letterboxing the camera frame into the 192x192 square (and undoing it on the boxes) is the
    caller's job: :meth:`detect` sees only the square.
    """

    _SIZE = 192
    _GRID = 48

    def __init__(
        self,
        path: str | Path,
        threshold: float = 0.5,
        provider: str | Runtime = "cpu",
        threads: int = 1,
        nms_iou: float = 0.3,
    ) -> None:
        _check_threshold(threshold)
        self._model = _Model(path, provider, threads, _BLAZEFACE)
        self.threshold = threshold
        self.nms_iou = nms_iou
        centres = (np.arange(self._GRID, dtype=np.float32) + 0.5) / self._GRID * self._SIZE
        ys, xs = np.meshgrid(centres, centres, indexing="ij")  # row-major: y outer, x inner
        self._anchors = np.stack([xs.ravel(), ys.ravel()], axis=1)  # in input pixels

    @property
    def input_size(self) -> tuple[int, int]:
        return (self._SIZE, self._SIZE)

    def detect(self, frame: Frame) -> Detections:
        return self.detect_batch([frame])[0]

    def detect_batch(self, frames: Sequence[Frame]) -> list[Detections]:
        _check_frames(frames, self.input_size)
        if not frames:
            return []
        x = np.stack(frames).astype(np.float32) / np.float32(127.5) - np.float32(1.0)
        regressors, logits = _run_batch(self._model, x)
        return [self._decode(regressors[i], logits[i]) for i in range(len(frames))]

    def _decode(self, regressors: FloatArray, logits: FloatArray) -> Detections:
        scores = 1.0 / (1.0 + np.exp(-np.clip(logits[:, 0], -80, 80)))
        keep = np.nonzero(scores > self.threshold)[0]
        if keep.size == 0:
            return _empty()
        r = regressors[keep, :4]
        centre = self._anchors[keep] + r[:, :2]
        half = r[:, 2:4] / 2
        boxes = np.concatenate([centre - half, centre + half], axis=1).astype(np.float32)
        boxes, conf = _weighted_nms(boxes, scores[keep].astype(np.float32), self.nms_iou)
        return Detections(np.clip(boxes, 0, self._SIZE), conf)

    def close(self) -> None:
        self._model.close()


class MaskClassifier:
    """MobileNetV2 mask / no-mask classifier on enlarged face crops (224x224 NHWC, [-1, 1]).

    The crops go through the model ``batch`` at a time. On a CPU a batch is no faster per
    crop than one crop, while ONNX Runtime's arena keeps the working set of the largest
    batch it has seen (five crops: about 95 MB, one: about 16 MB); a GPU wants larger ones.
    """

    _SIZE = 224

    def __init__(
        self,
        path: str | Path,
        provider: str | Runtime = "cpu",
        threads: int = 2,
        margin: float = 0.3,
        batch: int = 1,
    ) -> None:
        if not 0.0 <= margin <= 1.0:
            raise ValueError(f"margin must be in [0, 1], got {margin}")
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        self._model = _Model(path, provider, threads, _MASK)
        self.margin = margin
        self.batch = batch

    def classify(self, frame: Frame, xyxy: FloatArray) -> FloatArray:
        """P(mask) of each box in ``frame`` (H, W, 3) RGB uint8; boxes (N, 4) in its pixels."""
        if len(xyxy) == 0:
            return np.zeros(0, dtype=np.float32)
        crops = self._crops(frame, np.asarray(xyxy, dtype=np.float32))
        np.divide(crops, np.float32(127.5), out=crops)
        crops -= np.float32(1.0)
        probs = [
            self._model.run(crops[k : k + self.batch])[0] for k in range(0, len(crops), self.batch)
        ]
        return np.concatenate(probs)[:, 0].astype(np.float32)

    def _crops(self, frame: Frame, xyxy: FloatArray) -> FloatArray:
        """Each box enlarged by the margin, clipped, resized to 224x224: (N, 224, 224, 3)."""
        h, w = frame.shape[:2]
        half = (xyxy[:, 2:] - xyxy[:, :2]) * (self.margin / 2)
        lo = np.floor(np.clip(xyxy[:, :2] - half, 0, [w - 1, h - 1])).astype(np.int64)
        hi = np.ceil(np.clip(xyxy[:, 2:] + half, 0, [w, h])).astype(np.int64)
        hi = np.maximum(hi, lo + 1)
        crops = np.empty((len(xyxy), self._SIZE, self._SIZE, 3), dtype=np.float32)
        for k, ((x1, y1), (x2, y2)) in enumerate(zip(lo, hi, strict=True)):
            crops[k] = _resize_bilinear(frame[y1:y2, x1:x2], self._SIZE)
        return crops

    def close(self) -> None:
        self._model.close()


class FaceMaskDetector:
    """Faces from ``face_detector`` with ``attribute`` = P(mask) from ``classifier``.

    After :meth:`follow` of the analytics' :class:`~edgecam.vision.settled.SettledTracks`,
    faces of tracks whose label is settled are not classified: their ``attribute`` is NaN
    (no vote), and the track keeps its label.
    """

    def __init__(self, face_detector: Detector, classifier: MaskClassifier) -> None:
        self.face_detector = face_detector
        self.classifier = classifier
        self.settled: SettledTracks | None = None
        self.faces_classified = 0
        self.faces_skipped = 0

    @property
    def input_size(self) -> tuple[int, int]:
        return self.face_detector.input_size

    def follow(self, settled: SettledTracks) -> None:
        """Skip the classifier for faces of the tracks in ``settled`` from now on.

        One camera's: a detector that several cameras share must not follow any one of
        them, but take each frame's camera's settled tracks in :meth:`_classify`.
        """
        if self.settled is not None and self.settled is not settled:
            raise ValueError(
                "this detector already follows another camera's settled tracks; a detector "
                "shared by cameras takes each frame's camera's in _classify(..., settled)"
            )
        self.settled = settled

    def detect(self, frame: Frame) -> Detections:
        return self.detect_batch([frame])[0]

    def detect_batch(
        self, frames: Sequence[Frame], settled: Sequence[SettledTracks | None] | None = None
    ) -> list[Detections]:
        """The faces of every frame in one face-detector call, then each frame's faces
        classified; ``settled``, one per frame, are the settled tracks of each frame's own
        camera when cameras share this detector (default: the followed ones)."""
        per_frame = list(settled) if settled is not None else [None] * len(frames)
        faces = detect_batch(self.face_detector, frames)
        return [
            self._classified(frame, found, tracks)
            for frame, found, tracks in zip(frames, faces, per_frame, strict=True)
        ]

    def _classified(
        self, frame: Frame, faces: Detections, settled: SettledTracks | None = None
    ) -> Detections:
        if not len(faces):
            return faces
        return Detections(
            faces.xyxy,
            faces.confidence,
            np.zeros(len(faces), dtype=np.int64),
            self._classify(frame, faces.xyxy, settled),
        )

    def _classify(
        self, frame: Frame, xyxy: FloatArray, settled: SettledTracks | None = None
    ) -> FloatArray:
        """P(mask) of each face; NaN for the faces of the tracks in ``settled`` (default:
        the followed ones; a detector shared by cameras passes each frame's camera's)."""
        settled = settled or self.settled
        if settled is None:
            self.faces_classified += len(xyxy)
            return self.classifier.classify(frame, xyxy)
        need = unsettled(xyxy, settled.boxes_in((frame.shape[1], frame.shape[0])))
        probs = np.full(len(xyxy), np.nan, dtype=np.float32)
        if need.any():
            probs[need] = self.classifier.classify(frame, xyxy[need])
        n = int(need.sum())
        self.faces_classified += n
        self.faces_skipped += len(xyxy) - n
        return probs

    def close(self) -> None:
        self.face_detector.close()
        self.classifier.close()


class NanoDetDetector:
    """NanoDet-g (COCO-80, GFL head); only ``classes`` (default person) are reported."""

    _STRIDES = (8, 16, 32)
    _MEAN_BGR = np.array([103.53, 116.28, 123.675], dtype=np.float32)
    _STD_BGR = np.array([57.375, 57.12, 58.395], dtype=np.float32)

    def __init__(
        self,
        path: str | Path,
        input_size: tuple[int, int] = (416, 416),
        threshold: float = 0.5,
        provider: str | Runtime = "cpu",
        threads: int = 2,
        classes: Sequence[int] = (0,),
        nms_iou: float = 0.6,
        max_det: int = 100,
    ) -> None:
        _check_threshold(threshold)
        if not classes or any(not 0 <= c < 80 for c in classes):
            raise ValueError(f"classes must be COCO-80 indices 0..79, got {classes}")
        self._model = _Model(path, provider, threads, _NANODET)
        self._size = _check_input_size(input_size, 32, self._model)
        self.threshold = threshold
        self.classes = np.asarray(classes, dtype=np.int64)
        self.nms_iou = nms_iou
        self.max_det = max_det
        # Frames arrive RGB; the model wants BGR, so normalise in RGB order and flip channels.
        self._mean_rgb = self._MEAN_BGR[::-1].copy()
        self._inv_std_rgb = (1.0 / self._STD_BGR[::-1]).astype(np.float32)

    @property
    def input_size(self) -> tuple[int, int]:
        return self._size

    def detect(self, frame: Frame) -> Detections:
        return self.detect_batch([frame])[0]

    def detect_batch(self, frames: Sequence[Frame]) -> list[Detections]:
        _check_frames(frames, self._size)
        if not frames:
            return []
        x = (np.stack(frames).astype(np.float32) - self._mean_rgb) * self._inv_std_rgb
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2)[:, ::-1])
        outputs = _run_batch(self._model, x)
        return [self._decode([o[i] for o in outputs]) for i in range(len(frames))]

    def _decode(self, outputs: list[FloatArray]) -> Detections:
        """One frame's detections from its six head outputs (batch dimension removed)."""
        n = len(self._STRIDES)
        w, h = self._size
        all_boxes, all_scores, all_classes = [], [], []
        for stride, cls, reg in zip(self._STRIDES, outputs[:n], outputs[n:], strict=True):
            scores = cls[:, self.classes]
            pos, which = np.nonzero(scores > self.threshold)
            if pos.size == 0:
                continue
            bins = reg.shape[-1] // 4
            logits = reg[pos].reshape(-1, 4, bins)
            prob = np.exp(logits - logits.max(axis=-1, keepdims=True))
            prob /= prob.sum(axis=-1, keepdims=True)
            dist = prob @ np.arange(bins, dtype=np.float32) * stride  # (M, 4): l, t, r, b
            cols = w // stride
            centre = np.stack([pos % cols, pos // cols], axis=1).astype(np.float32)
            centre = (centre + 0.5) * stride
            boxes = np.concatenate([centre - dist[:, :2], centre + dist[:, 2:]], axis=1)
            all_boxes.append(np.clip(boxes, 0, [w, h, w, h]).astype(np.float32))
            all_scores.append(scores[pos, which].astype(np.float32))
            all_classes.append(self.classes[which])
        if not all_boxes:
            return _empty()
        boxes = np.concatenate(all_boxes)
        conf = np.concatenate(all_scores)
        class_id = np.concatenate(all_classes)
        keep = nms(boxes, conf, self.nms_iou, classes=class_id, max_det=self.max_det)
        return Detections(boxes[keep], conf[keep], class_id[keep])

    def close(self) -> None:
        self._model.close()


class WithPrivacyFaces:
    """A profile's detector plus a face detector on the same frame, for privacy only: the
    faces come back among the detections with ``class_id`` :data:`PRIVACY_FACE`, which the
    analytics track apart and never count."""

    def __init__(self, main: Detector, faces: Detector) -> None:
        if faces.input_size != main.input_size:
            raise ValueError(f"face detector input {faces.input_size} must match {main.input_size}")
        self.main = main
        self.faces = faces

    @property
    def input_size(self) -> tuple[int, int]:
        return self.main.input_size

    def detect(self, frame: Frame) -> Detections:
        return self.detect_batch([frame])[0]

    def detect_batch(self, frames: Sequence[Frame]) -> list[Detections]:
        found = detect_batch(self.main, frames)
        faces = detect_batch(self.faces, frames)
        return [self._merged(f, fc) for f, fc in zip(found, faces, strict=True)]

    @staticmethod
    def _merged(found: Detections, faces: Detections) -> Detections:
        if not len(faces):
            return found
        if np.any(found.class_id == PRIVACY_FACE):
            raise ValueError(f"the main detector uses class_id {PRIVACY_FACE}, kept for faces")
        return Detections(
            np.concatenate([found.xyxy, faces.xyxy]),
            np.concatenate([found.confidence, faces.confidence]),
            np.concatenate([found.class_id, np.full(len(faces), PRIVACY_FACE, np.int64)]),
            np.concatenate([found.attribute, faces.attribute]),
        )

    def close(self) -> None:
        self.main.close()
        self.faces.close()


# ---------------------------------------------------------------------------------------------
# Choosing by config


def _face_threads(v: VisionConfig) -> int:
    return min(v.threads, v.face_threads)


def _centerface(v: VisionConfig) -> Detector:
    return CenterFaceDetector(
        v.face_model_path, v.face_input, v.face_threshold, Runtime.of(v), _face_threads(v)
    )


def _blazeface(v: VisionConfig) -> Detector:
    return BlazeFaceDetector(v.face_model_path, v.face_threshold, Runtime.of(v), _face_threads(v))


_FACE_DETECTORS: dict[str, Callable[[VisionConfig], Detector]] = {
    "centerface": _centerface,
    "blazeface": _blazeface,
}


def _build_mask(v: VisionConfig) -> Detector:
    faces = _FACE_DETECTORS[v.face_detector](v)
    # One crop a call is too small to share: a second thread doubled the classifier's CPU
    # (13.9 against 7.3 ms a crop) and did not shorten the call (7.6 against 7.3 ms).
    threads = 1 if v.mask_batch == 1 else v.threads
    try:
        classifier = MaskClassifier(
            v.mask_model, Runtime.of(v), threads, v.mask_crop_margin, v.mask_batch
        )
    except Exception:
        faces.close()
        raise
    return FaceMaskDetector(faces, classifier)


def _build_people(v: VisionConfig) -> Detector:
    # Imported here: person_detectors builds on this module's helpers.
    from edgecam.vision.person_detectors import build_person_detector

    return build_person_detector(v)


_BUILDERS: dict[str, Callable[[VisionConfig], Detector]] = {
    "mask": _build_mask,
    "people": _build_people,
}


def build_detector(vision: VisionConfig, *, privacy_faces: bool = False) -> Detector:
    """The detector of ``vision.profile``; its ``input_size`` is what frames must be scaled to.

    With ``privacy_faces``, a profile that does not find faces gets a face detector beside
    it (on the same frame), whose faces are for privacy masking only.
    """
    detector = _BUILDERS[vision.profile](vision)
    if not privacy_faces or vision.profile == "mask":
        return detector
    # CenterFace takes the main detector's own frame size; BlazeFace's input is fixed.
    model = (
        vision.face_model_path
        if vision.face_detector == "centerface"
        else MODELS_DIR / "centerface.onnx"
    )
    try:
        faces = CenterFaceDetector(
            model,
            detector.input_size,
            vision.face_threshold,
            Runtime.of(vision),
            _face_threads(vision),
        )
    except Exception:
        detector.close()
        raise
    return WithPrivacyFaces(detector, faces)
