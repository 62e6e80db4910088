"""The int8 CenterFace against the fp32 one it is made from, and the classifier's batching."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import pytest

from edgecam.config import MODELS_DIR, VisionConfig
from edgecam.vision.detectors import CenterFaceDetector, MaskClassifier
from edgecam.vision.evaluation import iou_matrix

DATA = Path(__file__).parent / "data"
FP32 = MODELS_DIR / "centerface.onnx"
INT8 = MODELS_DIR / "centerface_int8.onnx"

Image = npt.NDArray[np.uint8]


def _rgb(name: str, size: tuple[int, int]) -> Image:
    image = cv2.cvtColor(cv2.imread(str(DATA / name)), cv2.COLOR_BGR2RGB)
    return np.asarray(cv2.resize(image, size, interpolation=cv2.INTER_AREA), dtype=np.uint8)


def test_precision_picks_the_vendored_centerface() -> None:
    assert VisionConfig().face_model_path == FP32  # the default
    assert VisionConfig(face_model_precision="int8").face_model_path == INT8
    blaze = VisionConfig(face_detector="blazeface")  # only CenterFace has an int8 file
    assert blaze.face_model_path == MODELS_DIR / "blazeface_full.onnx"


@pytest.mark.parametrize("size", [(480, 256), (960, 640)])
@pytest.mark.parametrize(
    ("image", "count"),
    [
        ("astronaut.jpg", 1),
        ("faceapi_sample1.jpg", 3),
        ("faceapi_sample4.jpg", 4),
        ("faceapi_sample5.jpg", 5),
    ],
)
def test_int8_centerface_finds_the_faces_fp32_finds(
    image: str, count: int, size: tuple[int, int]
) -> None:
    frame = _rgb(image, size)
    fp32 = CenterFaceDetector(FP32, size, threads=1)
    int8 = CenterFaceDetector(INT8, size, threads=1)
    ref, got = fp32.detect(frame), int8.detect(frame)
    fp32.close()
    int8.close()
    assert len(ref) == len(got) == count
    # Every face matched one to one, the boxes nearly the same.
    best = iou_matrix(ref.xyxy, got.xyxy).max(axis=1)
    assert (best >= 0.8).all(), best
    np.testing.assert_allclose(np.sort(got.confidence), np.sort(ref.confidence), atol=0.1)


def test_classifier_batches_give_the_same_probabilities() -> None:
    frame = _rgb("faceapi_sample5.jpg", (960, 640))
    face = CenterFaceDetector(FP32, (960, 640), threads=1)
    boxes = face.detect(frame).xyxy
    face.close()
    assert len(boxes) == 5
    one = MaskClassifier(MODELS_DIR / "mask_classifier.onnx", threads=1, batch=1)
    many = MaskClassifier(MODELS_DIR / "mask_classifier.onnx", threads=1, batch=64)
    np.testing.assert_allclose(one.classify(frame, boxes), many.classify(frame, boxes), atol=1e-5)
    one.close()
    many.close()
    with pytest.raises(ValueError, match="batch must be >= 1"):
        MaskClassifier(MODELS_DIR / "mask_classifier.onnx", threads=1, batch=0)
