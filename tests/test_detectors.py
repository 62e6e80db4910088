"""Detector backends on the vendored models and real images."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest

from edgecam.config import MODELS_DIR, VisionConfig
from edgecam.errors import ModelError
from edgecam.vision.detections import Detections
from edgecam.vision.detectors import (
    BlazeFaceDetector,
    CenterFaceDetector,
    FaceMaskDetector,
    MaskClassifier,
    NanoDetDetector,
    build_detector,
    nms,
)
from edgecam.vision.person_detectors import TiledDetector

DATA = Path(__file__).parent / "data"
MEDIA = Path(__file__).parents[1] / "media"
CENTERFACE = MODELS_DIR / "centerface.onnx"
MASK = MODELS_DIR / "mask_classifier.onnx"
NANODET = MODELS_DIR / "nanodet_g.onnx"
BLAZEFACE = MODELS_DIR / "blazeface_full.onnx"

# The astronaut's face and landmarks at 512x512, from MODELS.md.
ASTRONAUT_FACE = [182, 58, 270, 178]
LIGHT_BLUE = (160, 205, 230)

Image = npt.NDArray[np.uint8]


def _resize(image: Image, size: tuple[int, int]) -> Image:
    return np.asarray(cv2.resize(image, size, interpolation=cv2.INTER_AREA), dtype=np.uint8)


def _rgb(path: Path, size: tuple[int, int] | None = None) -> Image:
    image = np.asarray(cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB), dtype=np.uint8)
    return image if size is None else _resize(image, size)


@pytest.fixture(scope="module")
def astronaut() -> Image:
    return _rgb(DATA / "astronaut.jpg")


@pytest.fixture(scope="module")
def classifier() -> MaskClassifier:
    return MaskClassifier(MASK, threads=1)


def test_centerface_finds_the_astronaut(astronaut: Image) -> None:
    detector = CenterFaceDetector(CENTERFACE, (512, 512), threshold=0.5, threads=1)
    faces = detector.detect(astronaut)
    detector.close()
    assert len(faces) == 1
    np.testing.assert_allclose(faces.xyxy[0], ASTRONAUT_FACE, atol=4)
    assert faces.confidence[0] > 0.85
    assert faces.xyxy.dtype == np.float32


@pytest.mark.parametrize(
    ("image", "count"),
    [("faceapi_sample1.jpg", 3), ("faceapi_sample4.jpg", 4), ("faceapi_sample5.jpg", 5)],
)
def test_centerface_counts_every_face(image: str, count: int) -> None:
    detector = CenterFaceDetector(CENTERFACE, (960, 640), threshold=0.5, threads=1)
    faces = detector.detect(_rgb(DATA / image, detector.input_size))
    assert len(faces) == count
    assert (faces.confidence > 0.75).all()
    assert ((faces.xyxy >= 0) & (faces.xyxy <= [960, 640, 960, 640])).all()


def test_blazeface_finds_the_astronaut(astronaut: Image) -> None:
    detector = BlazeFaceDetector(BLAZEFACE, threshold=0.5)
    assert detector.input_size == (192, 192)
    faces = detector.detect(_resize(astronaut, (192, 192)))
    assert len(faces) == 1
    # MODELS.md: [174, 70, 279, 175] in the 512 px image.
    np.testing.assert_allclose(faces.xyxy[0] * 512 / 192, [174, 70, 279, 175], atol=5)


def _first_frame(path: Path) -> Image:
    capture = cv2.VideoCapture(str(path))
    ok, frame = capture.read()
    capture.release()
    assert ok, f"cannot decode {path}"
    return np.asarray(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), dtype=np.uint8)


def test_nanodet_counts_pedestrians() -> None:
    detector = NanoDetDetector(NANODET, threshold=0.5, threads=1)
    frame = _resize(_first_frame(MEDIA / "pedestrians_30s.mp4"), detector.input_size)
    people = detector.detect(frame)
    # MODELS.md, vtest frame 0: 3 persons scoring 0.80, 0.76, 0.74 (measured again here).
    assert len(people) == 3
    assert (people.class_id == 0).all()
    np.testing.assert_allclose(sorted(people.confidence), [0.744, 0.764, 0.798], atol=0.02)
    heights = people.xyxy[:, 3] - people.xyxy[:, 1]
    np.testing.assert_allclose(sorted(heights), [54.4, 61.3, 64.5], atol=3)


def test_nanodet_reports_other_classes_when_asked() -> None:
    detector = NanoDetDetector(NANODET, threshold=0.45, classes=(2, 7), threads=1)
    frame = _resize(_first_frame(MEDIA / "pedestrians_30s.mp4"), detector.input_size)
    vehicles = detector.detect(frame)
    # The parked van (truck 0.55) and car (0.52) of MODELS.md.
    found = sorted(zip(vehicles.class_id.tolist(), vehicles.confidence.tolist(), strict=True))
    assert [c for c, _ in found] == [2, 7]
    np.testing.assert_allclose([p for _, p in found], [0.518, 0.548], atol=0.02)


def _masked(image: Image, top: int) -> Image:
    """A flat light-blue mask polygon from ``top`` down to the chin, across the face."""
    x1, _, x2, y2 = ASTRONAUT_FACE
    polygon = np.array([[x1, top], [x2, top], [x2 - 5, 160], [226, y2], [x1 + 8, 160]], np.int32)
    out = image.copy()
    cv2.fillPoly(out, [polygon], LIGHT_BLUE)
    return out


def test_mask_classifier_plain_and_masked(astronaut: Image, classifier: MaskClassifier) -> None:
    box = np.array([ASTRONAUT_FACE], dtype=np.float32)
    plain = classifier.classify(astronaut, box)
    over_nose = classifier.classify(_masked(astronaut, top=114), box)
    assert plain.shape == (1,)
    assert plain[0] < 0.02  # measured 0.005
    assert over_nose[0] == pytest.approx(0.75, abs=0.05)
    assert classifier.classify(astronaut, np.zeros((0, 4), np.float32)).shape == (0,)


def test_mask_classifier_batches_and_clips(astronaut: Image, classifier: MaskClassifier) -> None:
    boxes = np.array(
        [ASTRONAUT_FACE, [-50, -50, 100, 100], [500, 500, 600, 600], [10, 10, 10, 10]],
        dtype=np.float32,
    )
    probs = classifier.classify(astronaut, boxes)
    assert probs.shape == (4,)
    # Measured: the face, a corner crop cut at the picture's edge, one outside, an empty box.
    np.testing.assert_allclose(probs, [0.005, 0.568, 0.023, 0.282], atol=0.02)
    assert probs[0] == pytest.approx(classifier.classify(astronaut, boxes[:1])[0], abs=1e-5)


def test_face_mask_detector_sets_p_mask(astronaut: Image, classifier: MaskClassifier) -> None:
    detector = FaceMaskDetector(CenterFaceDetector(CENTERFACE, (512, 512), threads=1), classifier)
    assert detector.input_size == (512, 512)
    plain = detector.detect(astronaut)
    masked = detector.detect(_masked(astronaut, top=114))
    assert len(plain) == 1
    assert plain.class_id.tolist() == [0]
    assert plain.attribute[0] < 0.02  # measured 0.005
    assert len(masked) == 1
    assert masked.attribute[0] == pytest.approx(0.70, abs=0.05)
    assert (plain.tracker_id == -1).all()


@pytest.mark.parametrize(
    ("vision", "kind", "size"),
    [
        ({"profile": "mask"}, CenterFaceDetector, (640, 352)),
        ({"profile": "mask", "face_detector": "blazeface"}, BlazeFaceDetector, (192, 192)),
        (
            {"profile": "mask", "face_detector": "blazeface"} | {"face_model": BLAZEFACE},
            BlazeFaceDetector,
            (192, 192),
        ),
        ({"profile": "people"}, NanoDetDetector, (416, 416)),
        # The more accurate choice: two 416 tiles of a 736x416 frame (docs/benchmarks.md).
        ({"profile": "people", "person_tiles": (2, 1)}, TiledDetector, (736, 416)),
    ],
)
def test_build_detector_by_profile(
    vision: dict[str, object], kind: type, size: tuple[int, int]
) -> None:
    detector = build_detector(VisionConfig.model_validate(vision | {"threads": 1}))
    if isinstance(detector, FaceMaskDetector):
        assert isinstance(detector.face_detector, kind)
    else:
        assert isinstance(detector, kind)
    assert detector.input_size == size
    found = detector.detect(np.zeros((size[1], size[0], 3), dtype=np.uint8))
    assert isinstance(found, Detections)
    assert len(found) == 0
    detector.close()


def test_missing_model_names_path_and_key(tmp_path: Path) -> None:
    missing = tmp_path / "nope.onnx"
    with pytest.raises(ModelError, match=r"vision\.face_model") as info:
        CenterFaceDetector(missing)
    assert str(missing) in str(info.value)


def test_unreadable_model(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.onnx"
    bogus.write_bytes(b"not a model")
    with pytest.raises(ModelError, match="cannot load"):
        NanoDetDetector(bogus)


@pytest.mark.parametrize(
    ("factory", "wrong"),
    [
        (CenterFaceDetector, MASK),
        (CenterFaceDetector, NANODET),
        (NanoDetDetector, CENTERFACE),
        (MaskClassifier, NANODET),
        (BlazeFaceDetector, MASK),
    ],
)
def test_wrong_model_family(factory: type, wrong: Path) -> None:
    with pytest.raises(ModelError, match="does not look like"):
        factory(wrong)


@pytest.mark.skipif(
    "CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is available"
)
def test_cuda_without_cuda_is_an_error() -> None:
    with pytest.raises(ModelError, match="CUDA"):
        CenterFaceDetector(CENTERFACE, provider="cuda")


@pytest.mark.parametrize(
    ("factory", "kwargs"),
    [
        (CenterFaceDetector, {"path": CENTERFACE, "input_size": (630, 352)}),
        (CenterFaceDetector, {"path": CENTERFACE, "input_size": (0, 352)}),
        (CenterFaceDetector, {"path": CENTERFACE, "threshold": 1.5}),
        (NanoDetDetector, {"path": NANODET, "input_size": (320, 320)}),
        (NanoDetDetector, {"path": NANODET, "classes": (80,)}),
        (MaskClassifier, {"path": MASK, "margin": -0.1}),
    ],
)
def test_bad_arguments(factory: type, kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        factory(**kwargs)


def test_frame_of_wrong_size_is_rejected() -> None:
    detector = CenterFaceDetector(CENTERFACE, (320, 256), threads=1)
    with pytest.raises(ValueError, match="frame must be"):
        detector.detect(np.zeros((320, 256, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    ("classes", "kept"),
    [(None, [0, 2]), (np.array([0, 1, 1], dtype=np.int64), [0, 1, 2])],
)
def test_nms(classes: npt.NDArray[np.int64] | None, kept: list[int]) -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], dtype=np.float32)
    scores = np.array([0.9, 0.8, 0.7], dtype=np.float32)
    assert sorted(nms(boxes, scores, 0.5, classes=classes).tolist()) == kept
    assert nms(boxes, scores, 0.5, max_det=1).tolist() == [0]
    assert nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.5).size == 0


def test_face_model_of_the_other_family_says_which_option_to_set() -> None:
    vision = VisionConfig.model_validate({"face_model": BLAZEFACE, "threads": 1})
    with pytest.raises(ModelError, match=r"vision\.face_detector"):
        build_detector(vision)


def test_blazeface_end_to_end(tmp_path: Path) -> None:
    from edgecam.config import load_settings
    from edgecam.media.offline import process_file

    settings = load_settings(
        **{"vision.face_detector": "blazeface", "vision.detect_fps": 10, "vision.threads": 1}
    )
    events = tmp_path / "e.jsonl"
    process_file(settings, MEDIA / "faces.mp4", tmp_path / "o.mp4", events=events, progress=False)
    rows = [json.loads(line) for line in events.read_text().splitlines()]
    assert len(rows) == 120
    assert sum(len(r["tracks"]) == 1 for r in rows[10:]) >= 100  # the one man, found


def test_the_mask_classifier_runs_one_crop_a_call_on_one_thread() -> None:
    # A second thread doubled its CPU a crop and did not shorten the call.
    detector = build_detector(VisionConfig(profile="mask", threads=2))
    try:
        assert isinstance(detector, FaceMaskDetector)
        described = detector.classifier._model._backend.description
        assert described.endswith(", 1 threads"), described
        faces = detector.face_detector._model._backend.description  # type: ignore[attr-defined]
        assert faces.endswith(", 1 threads"), faces  # vision.face_threads, below
    finally:
        detector.close()
    batched = build_detector(VisionConfig(profile="mask", threads=2, mask_batch=8))
    try:
        assert isinstance(batched, FaceMaskDetector)
        assert batched.classifier._model._backend.description.endswith(", 2 threads")
    finally:
        batched.close()


@pytest.mark.parametrize(
    ("threads", "face_threads", "expected"), [(2, 1, 1), (2, 2, 2), (2, 4, 2), (4, 3, 3)]
)
def test_the_face_detector_takes_face_threads_at_most_threads(
    threads: int, face_threads: int, expected: int
) -> None:
    # A second thread made CenterFace 1.2-1.8x faster for 1.1-1.7x its CPU: one by default.
    for vision in (
        VisionConfig(profile="mask", threads=threads, face_threads=face_threads),
        VisionConfig(profile="people", threads=threads, face_threads=face_threads),
    ):
        detector = build_detector(vision, privacy_faces=True)
        try:
            faces = (
                detector.face_detector  # type: ignore[attr-defined]
                if isinstance(detector, FaceMaskDetector)
                else detector.faces  # type: ignore[attr-defined]
            )
            described = faces._model._backend.description
            assert described.endswith(f", {expected} threads"), (vision.profile, described)
        finally:
            detector.close()
