"""Mask classifier crops: from the detector's model-sized frame, or from the source frame?

The pipeline classifies face crops cut from the model-sized RGB frame the detector sees
(one appsink, no full-resolution frame in Python). This measures what a second, larger
appsink would buy: P(mask) from model-frame crops vs source-resolution crops of the same
faces. Three sources: the small face clip (176x144, faces about 50 px: the model frame is
*larger* than the source), the test photos (960 px wide), and the HD face clip (1280x720,
faces 60-100 px in the source, half that in the model frame). Each face is also measured
with a drawn mask (a flat light-blue polygon over nose, mouth and chin), since none of the
media shows a real mask. The model frame is made as the pipeline makes it: the source
scaled to fit 640x352 with borders (letterbox or pillarbox), boxes mapped back.

    .venv/bin/python bench/bench_crops.py
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_faces import with_masks

from edgecam.config import VisionConfig
from edgecam.vision.detectors import CenterFaceDetector, MaskClassifier
from edgecam.vision.evaluation import from_letterbox, letterbox

ROOT = Path(__file__).resolve().parents[1]


def _clip_frames(path: Path, every: int, group: str) -> list[tuple[str, str, np.ndarray]]:
    out = []
    cap = cv2.VideoCapture(str(path))
    i = 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        if i % every == 0:
            out.append((group, f"{path.name}#{i}", cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)))
        i += 1
    cap.release()
    return out


def _frames() -> list[tuple[str, str, np.ndarray]]:
    out = _clip_frames(ROOT / "media" / "faces.mp4", 10, "face clip 176x144")
    for photo in sorted((ROOT / "tests" / "data").glob("*.jpg")):
        rgb = cv2.cvtColor(cv2.imread(str(photo)), cv2.COLOR_BGR2RGB)
        out.append(("photos ~960 px", photo.name, rgb))
    out += _clip_frames(ROOT / "media" / "faces_720p30_15s.mp4", 15, "HD face clip 1280x720")
    return out


def main() -> None:
    cfg = VisionConfig()
    face = CenterFaceDetector(cfg.face_model_path, cfg.face_input, cfg.face_threshold)
    mask = MaskClassifier(cfg.mask_model, margin=cfg.mask_crop_margin)
    stats: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for group, _name, src in _frames():
        model, fit = letterbox(src, cfg.face_input)
        dets = face.detect(model)
        if not len(dets):
            continue
        in_model = dets.xyxy
        in_src = from_letterbox(dets, fit).xyxy
        for variant in ("plain", "masked"):
            image = src if variant == "plain" else with_masks(src, in_src)
            framed = model if variant == "plain" else letterbox(image, cfg.face_input)[0]
            p_model = mask.classify(framed, in_model)
            p_src = mask.classify(image, in_src)
            s = stats[(group, variant)]
            s["dp"] += np.abs(p_model - p_src).tolist()
            s["agree"] += ((p_model >= 0.5) == (p_src >= 0.5)).astype(float).tolist()
            s["mask_model"] += (p_model >= 0.5).astype(float).tolist()
            s["mask_src"] += (p_src >= 0.5).astype(float).tolist()
            s["w_model"] += (in_model[:, 2] - in_model[:, 0]).tolist()
            s["w_src"] += (in_src[:, 2] - in_src[:, 0]).tolist()
    header = (
        "| source | faces | variant | face width px, model / source (median) | mean abs dP "
        "| max abs dP | same call | called mask, model / source |"
    )
    print(header)
    print("|" + "---|" * 8)
    for (group, variant), s in stats.items():
        n = len(s["dp"])
        print(
            f"| {group} | {n} | {variant} | {np.median(s['w_model']):.0f} / "
            f"{np.median(s['w_src']):.0f} | {np.mean(s['dp']):.3f} | {np.max(s['dp']):.3f} | "
            f"{100 * np.mean(s['agree']):.0f} % | {100 * np.mean(s['mask_model']):.0f} % / "
            f"{100 * np.mean(s['mask_src']):.0f} % |"
        )


if __name__ == "__main__":
    main()
