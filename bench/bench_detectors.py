"""Latency of each detector backend at its configured input size, 1 and 2 threads.

Times the whole ``detect()`` / ``classify()`` call (preprocessing, inference, decoding) on a
real image. Run: ``.venv/bin/python bench/bench_detectors.py [--runs 30] [--warmup 5]``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import _common as c
import cv2
import numpy as np
import numpy.typing as npt

from edgecam.config import MODELS_DIR, VisionConfig
from edgecam.vision.detectors import (
    BlazeFaceDetector,
    CenterFaceDetector,
    MaskClassifier,
    NanoDetDetector,
)

ROOT = Path(__file__).parents[1]
IMAGE = ROOT / "tests" / "data" / "faceapi_sample5.jpg"
VIDEO = ROOT / "media" / "pedestrians_30s.mp4"

Image = npt.NDArray[np.uint8]
Case = Callable[[int], tuple[str, str, Callable[[], object], Callable[[], None]]]


def _rgb(image: Image, size: tuple[int, int]) -> Image:
    return np.asarray(cv2.resize(image, size, interpolation=cv2.INTER_AREA), dtype=np.uint8)


def _photo() -> Image:
    return np.asarray(cv2.cvtColor(cv2.imread(str(IMAGE)), cv2.COLOR_BGR2RGB), dtype=np.uint8)


def _street() -> Image:
    capture = cv2.VideoCapture(str(VIDEO))
    ok, frame = capture.read()
    capture.release()
    if not ok:
        raise SystemExit(f"cannot decode {VIDEO}")
    return np.asarray(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), dtype=np.uint8)


def _cases(v: VisionConfig) -> list[Case]:
    photo, street = _photo(), _street()

    def centerface(threads: int) -> tuple[str, str, Callable[[], object], Callable[[], None]]:
        d = CenterFaceDetector(v.face_model_path, v.face_input, v.face_threshold, threads=threads)
        frame = _rgb(photo, d.input_size)
        return "centerface", "x".join(map(str, v.face_input)), lambda: d.detect(frame), d.close

    def blazeface(threads: int) -> tuple[str, str, Callable[[], object], Callable[[], None]]:
        d = BlazeFaceDetector(ROOT / "src/edgecam/models/blazeface_full.onnx", threads=threads)
        frame = _rgb(photo, d.input_size)
        return "blazeface_full", "192x192", lambda: d.detect(frame), d.close

    def nanodet(threads: int) -> tuple[str, str, Callable[[], object], Callable[[], None]]:
        d = NanoDetDetector(
            MODELS_DIR / "nanodet_g.onnx", v.person_input, v.person_threshold, threads=threads
        )
        frame = _rgb(street, d.input_size)
        return "nanodet_g", "x".join(map(str, v.person_input)), lambda: d.detect(frame), d.close

    def mask(faces: int) -> Case:
        def case(threads: int) -> tuple[str, str, Callable[[], object], Callable[[], None]]:
            c = MaskClassifier(v.mask_model, threads=threads, margin=v.mask_crop_margin)
            frame = _rgb(photo, v.face_input)
            boxes = np.tile(np.array([[100, 60, 160, 140]], np.float32), (faces, 1))
            label = f"{faces} face{'s' if faces > 1 else ''} 224x224"
            return "mask_classifier", label, lambda: c.classify(frame, boxes), c.close

        return case

    return [centerface, mask(1), mask(4), nanodet, blazeface]


def _time(call: Callable[[], object], runs: int, warmup: int) -> tuple[float, float]:
    ms = c.timed_ms(call, runs, warmup)
    return c.median(ms), c.percentile(ms, 90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    header = ["model", "input"] + [
        f"{t} thr {stat}" for t in args.threads for stat in ("p50", "p90")
    ]
    rows = []
    for case in _cases(VisionConfig.model_validate({})):
        cells: list[str] = []
        name = size = ""
        for threads in args.threads:
            name, size, call, close = case(threads)
            p50, p90 = _time(call, args.runs, args.warmup)
            close()
            cells += [f"{p50:.1f} ms", f"{p90:.1f} ms"]
        rows.append([name, size, *cells])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print(f"whole call incl. pre/post-processing; {args.runs} runs after {args.warmup} warm-up")
    for r in [header, ["-" * w for w in widths], *rows]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")


if __name__ == "__main__":
    main()
