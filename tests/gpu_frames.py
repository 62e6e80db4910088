"""Real frames at the detectors' input sizes, for the backend tests (no GStreamer needed).

``data/gpu_frames.npz`` holds JPEG (quality 95) bytes of model-size frames cut with ffmpeg from
the project's clips, so that machines without GStreamer or ffmpeg (the GPU benchmark machine)
run the same frames:

- ``faces_0`` ... ``faces_5``: ``media/faces_720p30_15s.mp4`` at 1.25 + 2.5 k s (one frame of
  each group photo, 3-5 faces), scaled to 640x352 (CenterFace's default input);
- ``people_0`` ... ``people_3``: ``media/pedestrians_30s.mp4`` at 3 + 7 k s, scaled to 416x416
  (NanoDet's default input).

Each was made with ``ffmpeg -ss T -i CLIP -frames:v 1 -vf scale=W:H:flags=bilinear -f rawvideo
-pix_fmt rgb24`` and ``cv2.imencode('.jpg', bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])``.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from edgecam.vision.detections import Detections
from edgecam.vision.evaluation import iou_matrix

FRAMES = Path(__file__).parent / "data" / "gpu_frames.npz"

Image = npt.NDArray[np.uint8]


def frames(kind: str) -> list[Image]:
    """The RGB frames of ``kind`` ("faces" or "people"), in order."""
    with np.load(FRAMES) as data:
        names = sorted((n for n in data.files if n.startswith(kind + "_")), key=_index)
        decoded = [cv2.imdecode(data[n], cv2.IMREAD_COLOR) for n in names]
    if not decoded:
        raise ValueError(f"no frames of kind {kind!r} in {FRAMES}")
    return [np.ascontiguousarray(cv2.cvtColor(f, cv2.COLOR_BGR2RGB)) for f in decoded]


def _index(name: str) -> int:
    return int(name.rsplit("_", 1)[1])


def differences(
    want: Detections, got: Detections, threshold: float, iou: float = 0.99, score: float = 0.01
) -> list[str]:
    """How ``got`` differs from ``want`` beyond the tolerances: each box of one must have a box
    of the other with IoU >= ``iou`` and a score within ``score`` (a box whose score is within
    ``score`` of the detector's ``threshold`` may be missing from the other). Empty when equal."""
    problems: list[str] = []
    for name, a, b in (("missing", want, got), ("extra", got, want)):
        overlaps = iou_matrix(a.xyxy, b.xyxy)
        for k in range(len(a)):
            best = int(np.argmax(overlaps[k])) if len(b) else -1
            if best >= 0 and overlaps[k, best] >= iou:
                gap = abs(float(a.confidence[k]) - float(b.confidence[best]))
                if gap > score:
                    problems.append(f"box {a.xyxy[k]}: scores differ by {gap:.4f}")
            elif float(a.confidence[k]) > threshold + score:
                near = float(overlaps[k, best]) if best >= 0 else 0.0
                problems.append(
                    f"{name} box {a.xyxy[k]} score {a.confidence[k]:.3f} (IoU {near:.3f})"
                )
    return problems
