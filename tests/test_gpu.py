"""The torch backend on an NVIDIA GPU against ONNX Runtime on the CPU, on real frames.

Run on a machine with PyTorch + CUDA, onnx and onnx2torch (no GStreamer needed):
``pytest -m gpu --noconftest -s tests/test_gpu.py``. Elsewhere every test here is skipped.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from gpu_frames import differences, frames

from edgecam.config import MODELS_DIR
from edgecam.vision.backends import Runtime, TorchBackend
from edgecam.vision.detections import Detections
from edgecam.vision.detectors import (
    _BLAZEFACE,
    _CENTERFACE,
    _MASK,
    _NANODET,
    CenterFaceDetector,
    MaskClassifier,
    NanoDetDetector,
    _Model,
    _ModelSpec,
)


def _why_no_gpu() -> str:
    missing = [m for m in ("torch", "onnx", "onnx2torch") if importlib.util.find_spec(m) is None]
    if missing:
        return f"needs {', '.join(missing)} (pip install 'edgecam[gpu]') and a CUDA GPU"
    import torch

    return "" if torch.cuda.is_available() else "PyTorch sees no CUDA GPU (CI has none)"


WHY = _why_no_gpu()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(bool(WHY), reason=WHY)]

CENTERFACE = MODELS_DIR / "centerface.onnx"
NANODET = MODELS_DIR / "nanodet_g.onnx"
MASK = MODELS_DIR / "mask_classifier.onnx"
BLAZEFACE = MODELS_DIR / "blazeface_full.onnx"

GPU = Runtime("torch", "cuda")
GPU_HALF = Runtime("torch", "cuda", half=True)


def _compare(
    factory: type, path: object, kind: str, runtime: Runtime, iou: float, score: float
) -> tuple[int, list[str]]:
    cpu, gpu = factory(path, provider="cpu"), factory(path, provider=runtime)
    boxes, problems = 0, []
    worst_iou, worst_score = 1.0, 0.0
    for k, frame in enumerate(frames(kind)):
        want, got = cpu.detect(frame), gpu.detect(frame)
        boxes += len(want)
        problems += [
            f"{kind} frame {k}: {p}" for p in differences(want, got, cpu.threshold, iou, score)
        ]
        worst_iou, worst_score = _worst(want, got, worst_iou, worst_score)
    print(
        f"\n{factory.__name__} {runtime} vs onnxruntime cpu: {boxes} boxes on "
        f"{len(frames(kind))} {kind} frames, {len(problems)} differences; worst matched IoU "
        f"{worst_iou:.4f}, largest score difference {worst_score:.4f}"
    )
    cpu.close()
    gpu.close()
    return boxes, problems


def _worst(want: Detections, got: Detections, iou: float, score: float) -> tuple[float, float]:
    """The lowest best-match IoU and largest score gap of ``want``'s boxes in ``got``."""
    for box, conf in zip(want.xyxy, want.confidence, strict=True):
        if not len(got):
            return 0.0, 1.0
        lo = np.maximum(box[:2], got.xyxy[:, :2])
        hi = np.minimum(box[2:], got.xyxy[:, 2:])
        inter = np.prod(np.clip(hi - lo, 0, None), axis=1)
        union = np.prod(box[2:] - box[:2]) + np.prod(got.xyxy[:, 2:] - got.xyxy[:, :2], axis=1)
        overlaps = inter / (union - inter)
        best = int(np.argmax(overlaps))
        iou = min(iou, float(overlaps[best]))
        score = max(score, abs(float(conf) - float(got.confidence[best])))
    return iou, score


@pytest.mark.parametrize(
    ("factory", "path", "kind"),
    [(CenterFaceDetector, CENTERFACE, "faces"), (NanoDetDetector, NANODET, "people")],
)
def test_gpu_boxes_match_the_cpu_backend(factory: type, path: object, kind: str) -> None:
    boxes, problems = _compare(factory, path, kind, GPU, iou=0.99, score=0.01)
    assert boxes >= 8, f"only {boxes} boxes on the {kind} frames: the test would prove little"
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("factory", "path", "kind"),
    [(CenterFaceDetector, CENTERFACE, "faces"), (NanoDetDetector, NANODET, "people")],
)
def test_gpu_fp16_boxes_stay_close(factory: type, path: object, kind: str) -> None:
    """fp16 is an option, not the default: its boxes must still be the same objects."""
    boxes, problems = _compare(factory, path, kind, GPU_HALF, iou=0.95, score=0.03)
    assert boxes >= 8
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("runtime", [GPU, GPU_HALF], ids=str)
def test_gpu_mask_probabilities_match_the_cpu_backend(runtime: Runtime) -> None:
    faces = CenterFaceDetector(CENTERFACE)
    cpu, gpu = MaskClassifier(MASK), MaskClassifier(MASK, provider=runtime)
    gaps, count = [], 0
    for frame in frames("faces"):
        found = faces.detect(frame)
        count += len(found)
        if len(found):
            gaps.append(np.abs(cpu.classify(frame, found.xyxy) - gpu.classify(frame, found.xyxy)))
    largest = float(np.concatenate(gaps).max())
    print(f"\nmask classifier {runtime}: {count} faces, largest P(mask) difference {largest:.5f}")
    assert count >= 10
    assert largest <= (0.01 if runtime == GPU else 0.03)


@pytest.mark.parametrize(
    ("path", "spec", "shape"),
    [
        (CENTERFACE, _CENTERFACE, (3, 352, 640)),
        (NANODET, _NANODET, (3, 416, 416)),
        (BLAZEFACE, _BLAZEFACE, (192, 192, 3)),
        (MASK, _MASK, (224, 224, 3)),
    ],
)
def test_gpu_batch_equals_frame_by_frame(path: object, spec: _ModelSpec, shape: tuple) -> None:
    """A batch of 8 through the GPU gives each frame's own outputs, and the CPU's."""
    rng = np.random.default_rng(0)
    scale = 255.0 if spec is _CENTERFACE else 1.0
    batch = (rng.random((8, *shape), dtype=np.float32) * scale).astype(np.float32)
    gpu, cpu = _Model(path, GPU, 1, spec), _Model(path, "cpu", 2, spec)
    together, reference = gpu.run(batch), cpu.run(batch)
    alone = [gpu.run(batch[k : k + 1]) for k in range(len(batch))]
    by_frame = [np.concatenate(outs) for outs in zip(*alone, strict=True)]
    to_frames, to_cpu = _gap(together, by_frame), _gap(together, reference)
    print(
        f"\n{spec.family}: batch 8 on the GPU, largest gap relative to the output's range: "
        f"{to_frames:.1e} to the same frames one by one, {to_cpu:.1e} to onnxruntime cpu"
    )
    assert to_frames < 1e-4
    assert to_cpu < 1e-4


def _gap(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    """Largest absolute difference of any output, over that output's largest magnitude."""
    return max(
        float(np.abs(g - w).max() / max(1.0, float(np.abs(w).max())))
        for g, w in zip(got, want, strict=True)
    )


def test_gpu_inputs_go_through_one_reused_pinned_buffer() -> None:
    backend = TorchBackend(CENTERFACE, "cuda", 1)
    small = np.zeros((2, 3, 352, 640), dtype=np.float32)
    backend.run(small)
    buffer = backend._host
    assert buffer is not None and buffer.is_pinned()
    backend.run(small[:1])
    assert backend._host is buffer, "a smaller batch must reuse the buffer"
    backend.run(np.zeros((4, 3, 352, 640), dtype=np.float32))
    assert backend._host is not buffer and backend._host.is_pinned()
    backend.close()
    with pytest.raises(RuntimeError, match="closed"):
        backend.run(small)


@pytest.mark.parametrize(
    ("path", "shape"),
    [
        (CENTERFACE, (3, 352, 640)),
        (NANODET, (3, 416, 416)),
        (BLAZEFACE, (192, 192, 3)),
        (MASK, (224, 224, 3)),
    ],
)
@pytest.mark.parametrize("half", [False, True], ids=["fp32", "fp16"])
def test_gpu_cuda_graphs_replay_the_module(path: object, shape: tuple, half: bool) -> None:
    """Each model is captured as a CUDA graph (no fallback) and its replays equal the module."""
    rng = np.random.default_rng(1)
    graphs = TorchBackend(path, "cuda", 1, half)  # type: ignore[arg-type]
    eager = TorchBackend(path, "cuda", 1, half, graphs=False)  # type: ignore[arg-type]
    for n in (1, 4, 1):  # a shape seen before replays its own graph
        batch = rng.random((n, *shape), dtype=np.float32)
        got, want = graphs.run(batch), eager.run(batch)
        assert _gap(got, want) < (1e-5 if not half else 1e-2)
    assert graphs._graphs is not None and set(graphs._graphs) == {(1, *shape), (4, *shape)}
    assert all(g is not None for g in graphs._graphs.values()), "a capture fell back to eager"
