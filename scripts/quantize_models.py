"""Make the int8 models from the vendored fp32 ones (ONNX Runtime's static quantizer).

Calibration data, none of it from the face-rich benchmark clip or the photos it is made of:
the frames of ``media/faces.mp4`` (one man, 176x144), the astronaut photo, frames of the
pedestrian and motion clips (no faces close up), letterboxed into the face input as the
pipeline does; for the classifier, the face crops CenterFace finds there, each also with a
mask drawn on. Needs ``onnx`` (a development tool, not a dependency of edgecam) and OpenCV.

    python scripts/quantize_models.py [--face-input 480x256] [--models centerface,mask]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import onnx
import onnx.version_converter
import onnxruntime
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_faces import decode, letterbox, with_masks  # the benchmark's own frame helpers

from edgecam.config import MODELS_DIR
from edgecam.vision.detectors import CenterFaceDetector, MaskClassifier

Image = npt.NDArray[np.uint8]
MEDIA = ROOT / "media"


def calibration_frames(size: tuple[int, int]) -> list[Image]:
    astronaut = cv2.cvtColor(cv2.imread(str(ROOT / "tests/data/astronaut.jpg")), cv2.COLOR_BGR2RGB)
    sources = [
        *decode(MEDIA / "faces.mp4", 4)[0],
        np.asarray(astronaut, dtype=np.uint8),
        *decode(MEDIA / "pedestrians_30s.mp4", 60)[0],
        *decode(MEDIA / "motion_720p30_4s.mp4", 40)[0],
    ]
    return [letterbox(s, size)[0] for s in sources]


def _heads(path: Path) -> list[str]:
    """The layers that make the outputs (the last Conv before each output, through an
    activation): kept in float, since box sizes and scores are read from them directly.
    Nodes without a name are given one."""
    model = onnx.load(str(path))
    made_by = {out: node for node in model.graph.node for out in node.output}
    for k, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"node_{k}"
    heads = []
    for output in model.graph.output:
        node = made_by[output.name]
        while node.op_type != "Conv" and node.input and node.input[0] in made_by:
            heads.append(node.name)
            node = made_by[node.input[0]]
        heads.append(node.name)
    onnx.save(model, str(path))
    return heads


class _Reader(CalibrationDataReader):
    def __init__(self, name: str, batches: list[npt.NDArray[np.float32]]) -> None:
        self._it: Iterator[npt.NDArray[np.float32]] = iter(batches)
        self._name = name

    def get_next(self) -> dict[str, npt.NDArray[np.float32]] | None:
        x = next(self._it, None)
        return None if x is None else {self._name: x}


def _quantize(fp32: Path, dst: Path, reader: _Reader) -> None:
    src = fp32
    with tempfile.TemporaryDirectory() as tmp:
        model = onnx.load(str(src))
        opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        if opset < 13:  # per-channel DequantizeLinear (its axis) needs opset 13
            model = onnx.version_converter.convert_version(model, 13)
            src = Path(tmp) / "opset13.onnx"
            onnx.save(model, str(src))
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        heads = _heads(prepared)
        quantize_static(
            str(prepared),
            str(dst),
            reader,
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=heads,
        )
    print(f"{dst}: {dst.stat().st_size:,} bytes (from {fp32.name}, {fp32.stat().st_size:,})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--face-input", default="480x256")
    parser.add_argument("--models", default="centerface,mask")
    parser.add_argument("--out", type=Path, default=MODELS_DIR)
    args = parser.parse_args()
    size = (int(args.face_input.split("x")[0]), int(args.face_input.split("x")[1]))
    print(f"onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}")
    frames = calibration_frames(size)
    face = CenterFaceDetector(MODELS_DIR / "centerface.onnx", size, threads=2)
    models = args.models.split(",")
    if "centerface" in models:
        batches = [
            np.ascontiguousarray(f.transpose(2, 0, 1)[None], dtype=np.float32) for f in frames
        ]
        _quantize(
            MODELS_DIR / "centerface.onnx",
            args.out / "centerface_int8.onnx",
            _Reader("input.1", batches),
        )
    if "mask" in models:
        mask = MaskClassifier(MODELS_DIR / "mask_classifier.onnx", threads=2)
        crops = []
        for f in frames:
            boxes = face.detect(f).xyxy
            if len(boxes):
                for image in (f, with_masks(f, boxes)):
                    c = mask._crops(image, boxes)
                    crops.extend(c / np.float32(127.5) - np.float32(1.0))
        print(f"classifier calibration: {len(crops)} crops")
        batches = [x[None] for x in crops]
        _quantize(
            MODELS_DIR / "mask_classifier.onnx",
            args.out / "mask_classifier_int8.onnx",
            _Reader("input", batches),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
