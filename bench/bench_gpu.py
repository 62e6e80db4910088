"""Each vendored model on the GPU (torch backend, fp32 and fp16) against the CPU backend (ONNX
Runtime) of the same machine, at batch 1, 8 and 32; and how many 1080p30 streams' worth of
detection at every frame one GPU sustains.

Two timings per backend and batch, each the median of ``--runs`` calls after ``--warmup``:

- ``model``: a float32 batch at the model's input size, in host memory, through
  ``InferenceBackend.run`` (host -> device copy through the pinned buffer, the graph, the
  outputs back to host memory as float32);
- ``1080p``: a batch of 1080p RGB uint8 frames in host memory to the model's outputs in host
  memory, preprocessing included: on the GPU the frames are copied up through pinned memory,
  scaled (bilinear) and normalised by PyTorch; on the CPU by ``cv2.resize`` and numpy. For the
  mask classifier, the batch is that many 224x224 face crops of one 1080p frame
  (``torchvision.ops.roi_align`` on the GPU, ``cv2.resize`` on the CPU).

Torch variants (``VARIANTS``): fp32 (TF32 off, CUDA graphs), fp16 (CUDA graphs), fp16 without
graphs, fp16 with channels-last activations.

Streams: the best ``1080p`` throughput of a face or person detector, divided by 30 fps.
The box decoding (numpy, per frame, on the CPU) is not included. Needs PyTorch with CUDA, onnx,
onnx2torch (third_party/wheels) and OpenCV; not GStreamer.

Run: ``edgecam bench gpu`` (or ``python bench/bench_gpu.py``) ``[--batches 1 8 32]
[--runs 30] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))

import _common as c
import cv2
import onnxruntime as ort
import torch
import torch.nn.functional as F
import torchvision

from edgecam.config import MODELS_DIR
from edgecam.vision.backends import OnnxRuntimeBackend, TorchBackend

STREAM_FPS = 30
FRAME_1080P = (1080, 1920)
# NanoDet's normalisation (BGR order in the model; frames are RGB).
NANODET_MEAN_RGB = np.array([123.675, 116.28, 103.53], dtype=np.float32)
NANODET_STD_RGB = np.array([58.395, 57.12, 57.375], dtype=np.float32)


@dataclass(frozen=True)
class Model:
    name: str
    file: str
    size: tuple[int, int]  # (width, height) of the input
    nchw: bool
    detector: bool  # a per-frame detector (counts towards streams), or the face classifier

    @property
    def path(self) -> Path:
        return MODELS_DIR / self.file


MODELS = [
    Model("centerface", "centerface.onnx", (640, 352), nchw=True, detector=True),
    Model("nanodet_g", "nanodet_g.onnx", (416, 416), nchw=True, detector=True),
    Model("blazeface_full", "blazeface_full.onnx", (192, 192), nchw=False, detector=True),
    Model("mask_classifier", "mask_classifier.onnx", (224, 224), nchw=False, detector=False),
]

# Face boxes of one 1080p frame for the classifier's crops (x1, y1, x2, y2), tiled to a batch.
FACES_1080P = np.array(
    [[300, 200, 420, 360], [800, 250, 900, 380], [1200, 300, 1330, 470], [1600, 220, 1700, 350]],
    dtype=np.float32,
)


# ---------------------------------------------------------------------------------------------
# Preprocessing: the same arithmetic on the CPU (numpy) and on the GPU (torch)


def _normalise_np(model: Model, x: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) float32 RGB 0..255 at the model's size -> the model's input."""
    if model.name == "centerface":
        return x.transpose(0, 3, 1, 2)
    if model.name == "nanodet_g":
        return ((x - NANODET_MEAN_RGB) / NANODET_STD_RGB).transpose(0, 3, 1, 2)[:, ::-1]
    return x / 127.5 - 1.0


def _normalise_torch(model: Model, x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) float RGB 0..255 on the GPU -> the model's input."""
    if model.name == "centerface":
        return x
    if model.name == "nanodet_g":
        mean = torch.as_tensor(NANODET_MEAN_RGB, device=x.device, dtype=x.dtype)[:, None, None]
        std = torch.as_tensor(NANODET_STD_RGB, device=x.device, dtype=x.dtype)[:, None, None]
        return ((x - mean) / std).flip(1)
    return (x / 127.5 - 1.0).permute(0, 2, 3, 1)


def _cpu_1080p(model: Model, frames: np.ndarray) -> np.ndarray:
    w, h = model.size
    if model.detector:
        scaled = [cv2.resize(f, (w, h), interpolation=cv2.INTER_LINEAR) for f in frames]
    else:
        frame, boxes = frames[0], _boxes(len(frames))
        scaled = [
            cv2.resize(frame[int(y1) : int(y2), int(x1) : int(x2)], (w, h))
            for x1, y1, x2, y2 in boxes
        ]
    x = np.stack(scaled).astype(np.float32)
    return np.ascontiguousarray(_normalise_np(model, x), dtype=np.float32)


def _boxes(n: int) -> np.ndarray:
    return np.tile(FACES_1080P, (n // len(FACES_1080P) + 1, 1))[:n]


class GpuPreprocess:
    """1080p uint8 frames in host memory -> the model's input on the GPU (pinned upload)."""

    def __init__(self, model: Model, frames: np.ndarray, dtype: torch.dtype) -> None:
        self.model, self.dtype = model, dtype
        crops = len(frames)
        if not model.detector:
            frames = frames[:1]  # the crops all come from one frame
        self.host = torch.empty(frames.shape, dtype=torch.uint8, pin_memory=True)
        self.frames = torch.from_numpy(frames)
        if not model.detector:
            boxes = torch.from_numpy(_boxes(crops))
            index = torch.zeros((len(boxes), 1))
            self.rois = torch.cat([index, boxes], dim=1).cuda()

    def __call__(self) -> torch.Tensor:
        self.host.copy_(self.frames)  # stands for the decoder writing into pinned memory
        dev = self.host.cuda(non_blocking=True)
        w, h = self.model.size
        if self.model.detector:
            x = dev.permute(0, 3, 1, 2).to(self.dtype)
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        else:
            x = dev.permute(0, 3, 1, 2).float()
            x = torchvision.ops.roi_align(x, self.rois, (h, w), aligned=True).to(self.dtype)
        return _normalise_torch(self.model, x).contiguous()


# ---------------------------------------------------------------------------------------------
# Timing


def _median_ms(call: Callable[[], object], runs: int, warmup: int) -> float:
    return c.median(c.timed_ms(call, runs, warmup))


def _frames_1080p(batch: int) -> np.ndarray:
    """``batch`` real 1080p frames: the test frames of the project's clips, scaled up."""
    from gpu_frames import frames

    real = frames("faces") + frames("people")
    scaled = [cv2.resize(real[k % len(real)], FRAME_1080P[::-1]) for k in range(batch)]
    return np.stack(scaled)


# The torch backend's variants measured: the default of each precision (CUDA graphs on), and
# what graphs and channels-last storage change.
VARIANTS: dict[str, dict[str, Any]] = {
    "fp32": {"half": False},
    "fp16": {"half": True},
    "fp16 no graphs": {"half": True, "graphs": False},
    "fp16 NHWC": {"half": True, "channels_last": True},
}


def _measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    threads = args.cpu_threads or os.cpu_count() or 1
    frames = _frames_1080p(max(args.batches))
    for model in MODELS:
        cpu = OnnxRuntimeBackend(model.path, "cpu", threads)
        gpus = {name: TorchBackend(model.path, "cuda", 1, **kw) for name, kw in VARIANTS.items()}
        for batch in args.batches:
            host = frames[:batch]
            x = _cpu_1080p(model, host)
            reference = cpu.run(x)
            row: dict[str, Any] = {"model": model.name, "batch": batch}
            runs = max(3, args.runs // 4) if batch > 1 else args.runs  # the CPU is slow
            row["cpu model ms"] = _median_ms(lambda: cpu.run(x), runs, 2)  # noqa: B023
            row["cpu 1080p ms"] = _median_ms(
                lambda: cpu.run(_cpu_1080p(model, host)),  # noqa: B023
                runs,
                2,
            )
            for name, gpu in gpus.items():
                prep = GpuPreprocess(model, host, gpu.dtype)
                got = gpu.run(x)
                row[f"{name} max diff"] = max(
                    float(np.abs(g - r).max()) for g, r in zip(got, reference, strict=True)
                )
                row[f"{name} model ms"] = _median_ms(
                    lambda: gpu.run(x),  # noqa: B023
                    args.runs,
                    args.warmup,
                )

                def full() -> list[np.ndarray]:
                    outs = gpu.run_tensor(prep())  # noqa: B023
                    return [o.float().cpu().numpy() for o in outs]

                row[f"{name} 1080p ms"] = _median_ms(full, args.runs, args.warmup)
            rows.append(row)
            print(json.dumps(row), flush=True)
        cpu.close()
        for gpu in gpus.values():
            gpu.close()
        torch.cuda.empty_cache()
    return rows


def _table(rows: list[dict[str, Any]], what: str) -> str:
    names = ["cpu", *VARIANTS]
    header = ["model", "batch", "CPU ORT", *(f"GPU {n}" for n in VARIANTS), "fp16 vs CPU"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in rows:
        b = r["batch"]
        cells = [
            f"{r[f'{n} {what} ms']:.2f} ms ({b / r[f'{n} {what} ms'] * 1000:,.0f}/s)" for n in names
        ]
        ratio = r[f"cpu {what} ms"] / r[f"fp16 {what} ms"]
        lines.append("| " + " | ".join([r["model"], str(b), *cells, f"{ratio:.1f}x"]) + " |")
    return "\n".join(lines)


def _accuracy(rows: list[dict[str, Any]]) -> str:
    header = ["model", "batch", *(f"GPU {n}" for n in VARIANTS)]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in rows:
        cells = [f"{r[f'{n} max diff']:.2g}" for n in VARIANTS]
        lines.append("| " + " | ".join([r["model"], str(r["batch"]), *cells]) + " |")
    return "\n".join(lines)


def _streams(rows: list[dict[str, Any]]) -> str:
    lines = []
    for name in sorted({r["model"] for r in rows if r["model"] != "mask_classifier"}):
        best = {
            p: max(r["batch"] / r[f"{p} 1080p ms"] * 1000 for r in rows if r["model"] == name)
            for p in ("cpu", *VARIANTS)
        }
        fastest = max(VARIANTS, key=lambda p: best[p])
        lines.append(
            f"- {name}: fp32 {best['fp32']:,.0f} frames/s = {best['fp32'] / STREAM_FPS:.0f} "
            f"streams; fp16 {best['fp16']:,.0f} frames/s = {best['fp16'] / STREAM_FPS:.0f} "
            f"streams; best ({fastest}) {best[fastest] / STREAM_FPS:.0f} streams of "
            f"1080p{STREAM_FPS} (CPU ORT, all cores: {best['cpu'] / STREAM_FPS:.1f}); "
            f"target >= 32 with the default fp32: "
            f"{'met' if best['fp32'] / STREAM_FPS >= 32 else 'missed'}, fp16: "
            f"{'met' if best['fp16'] / STREAM_FPS >= 32 else 'missed'}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--cpu-threads", type=int, default=0, help="0: every core")
    parser.add_argument("--json", type=Path, help="write the measurements here too")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench gpu needs PyTorch with a CUDA GPU")

    print(
        f"GPU {torch.cuda.get_device_name()} | torch {torch.__version__} (CUDA "
        f"{torch.version.cuda}) | onnxruntime {ort.__version__} CPU, "
        f"{args.cpu_threads or os.cpu_count()} threads | {os.cpu_count()} cores "
        f"{platform.processor() or platform.machine()} | Python {platform.python_version()}"
    )
    rows = _measure(args)
    print("\nmedian latency of one batch (throughput), outputs back in host memory as float32")
    print("input at model size (float32, host memory):\n")
    print(_table(rows, "model"))
    print("\n1080p uint8 frames (host memory), preprocessing included:\n")
    print(_table(rows, "1080p"))
    print("\nlargest absolute output difference from ONNX Runtime CPU (same input):\n")
    print(_accuracy(rows))
    print()
    print(_streams(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
