"""Settled tracks skip the mask classifier: the geometry, and the real models on a real clip."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import pytest

from edgecam.config import MODELS_DIR, load_settings
from edgecam.vision.analytics import Analytics
from edgecam.vision.detectors import CenterFaceDetector, FaceMaskDetector, MaskClassifier
from edgecam.vision.evaluation import from_letterbox, letterbox
from edgecam.vision.settled import SettledTracks, unsettled

MEDIA = Path(__file__).parents[1] / "media"
FACE_INPUT = (640, 352)

Image = npt.NDArray[np.uint8]


def _boxes(*rows: list[float]) -> npt.NDArray[np.float32]:
    return np.array(rows, dtype=np.float32).reshape(-1, 4)


@pytest.mark.parametrize(
    ("faces", "settled", "need"),
    [
        (_boxes([0, 0, 10, 10]), _boxes(), [True]),  # nothing settled
        (_boxes([0, 0, 10, 10]), _boxes([1, 1, 11, 11]), [False]),  # IoU 0.68
        (_boxes([0, 0, 10, 10]), _boxes([5, 5, 15, 15]), [True]),  # IoU 0.14
        # Two faces on one settled box: only the better-overlapping one skips.
        (_boxes([0, 0, 10, 10], [1, 0, 11, 10]), _boxes([1, 0, 11, 10]), [True, False]),
        (_boxes([0, 0, 10, 10], [50, 50, 60, 60]), _boxes([50, 50, 60, 60]), [True, False]),
        (_boxes(), _boxes([0, 0, 1, 1]), []),
    ],
)
def test_unsettled(
    faces: npt.NDArray[np.float32], settled: npt.NDArray[np.float32], need: list[bool]
) -> None:
    assert unsettled(faces, settled).tolist() == need


def test_settled_boxes_map_into_the_letterboxed_model_frame() -> None:
    snapshot = SettledTracks()
    assert snapshot.boxes_in(FACE_INPUT).shape == (0, 4)
    # 1280x720 fits 640x352 as 625x352 (whole pixels, rounded down as videoscale does), 7 px
    # on the left: as the detector's frame is made (media.frames).
    snapshot.publish(_boxes([0, 0, 1280, 720], [640, 360, 740, 460]), (1280, 720))
    sx, sy = 625 / 1280, 352 / 720
    np.testing.assert_allclose(
        snapshot.boxes_in(FACE_INPUT),
        [[7, 0, 632, 352], [7 + 640 * sx, 360 * sy, 7 + 740 * sx, 460 * sy]],
        atol=1e-3,
    )
    # A 176x144 source is pillarboxed: 430x352, 105 px each side.
    snapshot.publish(_boxes([0, 0, 176, 144]), (176, 144))
    np.testing.assert_allclose(snapshot.boxes_in(FACE_INPUT), [[105, 0, 535, 352]], atol=1e-3)


@pytest.fixture(scope="module")
def face_clip() -> list[Image]:
    cap = cv2.VideoCapture(str(MEDIA / "faces.mp4"))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(np.asarray(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), dtype=np.uint8))
    cap.release()
    assert len(frames) == 120
    return frames


def _run(
    frames: list[Image], skip: bool
) -> tuple[list[list[tuple[int, str]]], dict[str, int], int, int]:
    """The clip through the real detector and analytics, a detection on every 3rd frame,
    the detector seeing the analytics' settled tracks of the frame before, as live."""
    settings = load_settings(**{"vision.threads": 1})
    analytics = Analytics(settings, "main")
    detector = FaceMaskDetector(
        CenterFaceDetector(MODELS_DIR / "centerface.onnx", FACE_INPUT, threads=1),
        MaskClassifier(MODELS_DIR / "mask_classifier.onnx", threads=1),
    )
    assert analytics.share_settled([detector] if skip else []) == int(skip)
    labels = []
    counts: dict[str, int] = {}
    for i, src in enumerate(frames):
        dets = None
        if i % 3 == 0:
            model, fit = letterbox(src, FACE_INPUT)
            dets = from_letterbox(detector.detect(model), fit)
        meta = analytics.step(i / 30, dets, (src.shape[1], src.shape[0]))
        labels.append([(t.id, t.label) for t in meta.tracks])
        counts = meta.counts
    detector.close()
    return labels, counts, detector.faces_classified, detector.faces_skipped


def test_settled_tracks_skip_the_classifier_and_keep_their_labels(
    face_clip: list[Image],
) -> None:
    labels, counts, classified, skipped = _run(face_clip, skip=False)
    assert skipped == 0 and classified >= 38  # one face on (nearly) all 40 detections
    labels_skip, counts_skip, classified_skip, skipped_skip = _run(face_clip, skip=True)
    assert labels_skip == labels  # the same tracks with the same labels on every frame
    assert counts_skip == counts == {"mask": 0, "no_mask": 1, "undecided": 0}
    assert classified_skip + skipped_skip == classified
    # Votes settle after 5 detections; then one classification a recheck (30 frames).
    assert classified_skip <= classified / 2


def test_only_a_classifying_profile_shares_settled_tracks() -> None:
    classifier = MaskClassifier(MODELS_DIR / "mask_classifier.onnx", threads=1)
    detector = FaceMaskDetector(
        CenterFaceDetector(MODELS_DIR / "centerface.onnx", FACE_INPUT, threads=1), classifier
    )
    for overrides, shared in [
        ({}, 1),
        ({"vision.profile": "people"}, 0),
        ({"voting.settle_votes": 0}, 0),
    ]:
        analytics = Analytics(load_settings(**overrides), "main")
        assert analytics.share_settled([detector, object()]) == shared
    # A second camera's analytics cannot take over a detector that follows the first's.
    other = Analytics(load_settings(), "main")
    with pytest.raises(ValueError, match="already follows another camera"):
        other.share_settled([detector])
    detector.close()
