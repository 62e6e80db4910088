"""Mask classifier crops: from the detector's model-sized frame, or from the source frame?

The pipeline classifies face crops cut from the model-sized RGB frame the detector sees
(one appsink, no full-resolution frame in Python). This measures what a second, larger
appsink would buy: P(mask) from model-frame crops vs source-resolution crops of the same
faces, on the face clip and the face photos.

    .venv/bin/python bench/bench_crops.py
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from edgecam.config import VisionConfig
from edgecam.vision.detectors import CenterFaceDetector, MaskClassifier

ROOT = Path(__file__).resolve().parents[1]


def _frames() -> list[tuple[str, np.ndarray]]:
    out = []
    cap = cv2.VideoCapture(str(ROOT / "media" / "faces.mp4"))
    i = 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        if i % 10 == 0:
            out.append((f"faces.mp4#{i}", cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)))
        i += 1
    for photo in sorted((ROOT / "tests" / "data").glob("*.jpg")):
        out.append((photo.name, cv2.cvtColor(cv2.imread(str(photo)), cv2.COLOR_BGR2RGB)))
    return out


def main() -> None:
    cfg = VisionConfig()
    face = CenterFaceDetector(cfg.face_model_path, cfg.face_input, cfg.face_threshold)
    mask = MaskClassifier(cfg.mask_model, margin=cfg.mask_crop_margin)
    w, h = cfg.face_input
    diffs, agree, n = [], 0, 0
    print(f"{'image':24} {'faces':>5} {'P(mask) model-frame':>20} {'P(mask) source':>16}")
    for name, src in _frames():
        model = cv2.resize(src, (w, h), interpolation=cv2.INTER_LINEAR)
        dets = face.detect(model)
        if not len(dets):
            continue
        sx, sy = src.shape[1] / w, src.shape[0] / h
        p_model = mask.classify(model, dets.xyxy)
        p_src = mask.classify(src, dets.scaled(sx, sy).xyxy)
        diffs.extend(np.abs(p_model - p_src).tolist())
        agree += int(np.sum((p_model >= 0.5) == (p_src >= 0.5)))
        n += len(dets)
        print(
            f"{name:24} {len(dets):5d} {np.array2string(p_model, precision=2):>20} "
            f"{np.array2string(p_src, precision=2):>16}"
        )
    print(
        f"\n{n} faces: mean |dP| {np.mean(diffs):.3f}, max |dP| {np.max(diffs):.3f}, "
        f"same mask/no-mask call on {agree}/{n} ({100 * agree / n:.0f} %)"
    )


if __name__ == "__main__":
    main()
