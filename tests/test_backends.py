"""Inference backends on the CPU: batches, the default session, the choice by config, and the
torch backend where PyTorch and onnx2torch are installed (GPU runs: tests/test_gpu.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from gpu_frames import differences, frames

from edgecam.config import MODELS_DIR, VisionConfig
from edgecam.errors import ModelError
from edgecam.vision.backends import BACKENDS, OnnxRuntimeBackend, Runtime
from edgecam.vision.detectors import (
    _BLAZEFACE,
    _CENTERFACE,
    _MASK,
    _NANODET,
    CenterFaceDetector,
    NanoDetDetector,
    _Model,
    _ModelSpec,
    build_detector,
)

CENTERFACE = MODELS_DIR / "centerface.onnx"
NANODET = MODELS_DIR / "nanodet_g.onnx"
MASK = MODELS_DIR / "mask_classifier.onnx"
BLAZEFACE = MODELS_DIR / "blazeface_full.onnx"

HAS_TORCH = all(importlib.util.find_spec(m) for m in ("torch", "onnx", "onnx2torch"))


def _inputs(spec: _ModelSpec) -> np.ndarray:
    """Three real frames in the model's input layout (values as the detectors scale them)."""
    faces, people = frames("faces"), frames("people")
    table = {
        "CenterFace": lambda: np.stack([f.transpose(2, 0, 1) for f in faces[:3]]),
        "NanoDet": lambda: np.stack([(p.transpose(2, 0, 1) - 128.0) / 58.0 for p in people[:3]]),
        "BlazeFace": lambda: np.stack([f[:192, 200:392] / 127.5 - 1 for f in faces[:3]]),
        "mask classifier": lambda: np.stack([f[100:324, 200:424] / 127.5 - 1 for f in faces[:3]]),
    }
    return np.ascontiguousarray(table[spec.family](), dtype=np.float32)


@pytest.mark.parametrize(
    ("path", "spec"),
    [(CENTERFACE, _CENTERFACE), (NANODET, _NANODET), (BLAZEFACE, _BLAZEFACE), (MASK, _MASK)],
)
def test_every_model_takes_a_batch(path: Path, spec: _ModelSpec) -> None:
    model = _Model(path, "cpu", 1, spec)
    assert model.max_batch is None, f"{path.name} batch dimension is {model.input_shape[0]}"
    batch = _inputs(spec)
    together = model.run(batch)
    for k in range(len(batch)):
        alone = model.run(batch[k : k + 1])
        for t, a in zip(together, alone, strict=True):
            assert t.shape[0] == len(batch)
            np.testing.assert_allclose(t[k : k + 1], a, rtol=1e-4, atol=1e-4)
    model.close()
    with pytest.raises(RuntimeError, match="closed"):
        model.run(batch)


def test_default_is_the_tuned_onnxruntime_cpu_session() -> None:
    """The CPU path keeps its options: sequential, N intra-op threads that do not spin."""
    runtime = Runtime.of(VisionConfig())
    assert runtime == Runtime("onnxruntime", "cpu", False)
    model = _Model(CENTERFACE, runtime, 2, _CENTERFACE)
    backend = model._backend
    assert isinstance(backend, OnnxRuntimeBackend) and backend._session is not None
    options = backend._session.get_session_options()
    assert options.intra_op_num_threads == 2
    assert options.inter_op_num_threads == 1
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert backend._session.get_providers() == ["CPUExecutionProvider"]
    model.close()


def test_backends_are_a_table_of_the_config_choices() -> None:
    assert set(BACKENDS) == {"onnxruntime", "torch"}
    assert Runtime.parse("cpu") == Runtime()
    assert Runtime.parse("cuda") == Runtime("onnxruntime", "cuda")
    v = VisionConfig(backend="torch", provider="cuda", half=True)
    assert Runtime.of(v) == Runtime("torch", "cuda", True)
    assert str(Runtime.of(v)) == "torch cuda fp16"
    with pytest.raises(ValueError, match="provider must be"):
        Runtime.parse("tpu")
    with pytest.raises(ValueError, match="half precision"):
        Runtime("onnxruntime", "cuda", True)


@pytest.mark.skipif(HAS_TORCH, reason="PyTorch, onnx and onnx2torch are installed here")
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_torch_backend_without_torch_says_what_to_install(device: str) -> None:
    v = VisionConfig(profile="people", backend="torch", provider=device)  # type: ignore[arg-type]
    with pytest.raises(ModelError, match=r"pip install 'edgecam\[gpu\]'.*vision\.backend"):
        build_detector(v)


needs_torch = pytest.mark.skipif(
    not HAS_TORCH, reason="needs PyTorch, onnx and onnx2torch (pip install 'edgecam[gpu]')"
)


@needs_torch
def test_torch_backend_on_the_cpu_matches_onnxruntime() -> None:
    """The onnx2torch graph gives ONNX Runtime's detections on the real frames."""
    torch_cpu = Runtime("torch", "cpu")
    pairs = [
        (
            CenterFaceDetector(CENTERFACE, provider="cpu"),
            CenterFaceDetector(CENTERFACE, provider=torch_cpu),
            "faces",
        ),
        (
            NanoDetDetector(NANODET, provider="cpu"),
            NanoDetDetector(NANODET, provider=torch_cpu),
            "people",
        ),
    ]
    for reference, candidate, kind in pairs:
        found = 0
        for frame in frames(kind):
            want, got = reference.detect(frame), candidate.detect(frame)
            found += len(want)
            assert not differences(want, got, reference.threshold)
        assert found >= 8, f"only {found} boxes on the {kind} frames: the test would prove little"
        reference.close()
        candidate.close()


@pytest.mark.skipif(
    importlib.util.find_spec("onnx") is None, reason="needs onnx to write a fixed-batch model"
)
def test_fixed_batch_model_is_run_frame_by_frame(tmp_path: Path) -> None:
    """A NanoDet whose batch is fixed at 1 (as most exports are) still takes batches."""
    import onnx

    model = onnx.load(str(NANODET))
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_value = 1
    fixed = tmp_path / "nanodet_batch1.onnx"
    onnx.save(model, str(fixed))
    one, any_batch = _Model(fixed, "cpu", 1, _NANODET), _Model(NANODET, "cpu", 1, _NANODET)
    assert (one.max_batch, any_batch.max_batch) == (1, None)
    batch = _inputs(_NANODET)
    for a, b in zip(one.run(batch), any_batch.run(batch), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_opening_a_model_holds_numpy_blas_to_one_thread() -> None:
    # A fresh interpreter: the limit is process-wide and another test may have set it.
    # OpenBLAS's idle pool threads spin after each small product the detectors make.
    script = (
        "import json, threadpoolctl, numpy\n"
        "def blas():\n"
        "    return [p['num_threads'] for p in threadpoolctl.threadpool_info()"
        " if p['user_api'] == 'blas']\n"
        "before = blas()\n"
        "from edgecam.config import MODELS_DIR\n"
        "from edgecam.vision.detectors import CenterFaceDetector\n"
        "CenterFaceDetector(MODELS_DIR / 'centerface.onnx').close()\n"
        "print(json.dumps([before, blas()]))\n"
    )
    limits = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    env = {k: v for k, v in os.environ.items() if k not in limits}
    out = subprocess.run(
        [sys.executable, "-c", script],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    before, after = json.loads(out.stdout.strip().splitlines()[-1])
    assert before, "numpy has no BLAS pool threadpoolctl can see"
    if (os.cpu_count() or 1) > 1:
        assert max(before) > 1, before  # what the limit changes
    assert after == [1] * len(after), after
