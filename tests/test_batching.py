"""Detectors on several frames in one model call, and one detector shared by cameras."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import pytest

from edgecam.config import MODELS_DIR
from edgecam.vision.batching import BatcherStopped, BatchFailed, DetectorBatcher
from edgecam.vision.detections import Detections, Detector
from edgecam.vision.detectors import (
    BatchDetector,
    BlazeFaceDetector,
    CenterFaceDetector,
    FaceMaskDetector,
    MaskClassifier,
    NanoDetDetector,
    WithPrivacyFaces,
)
from edgecam.vision.settled import SettledTracks

MEDIA = Path(__file__).parents[1] / "media"
FACES = MEDIA / "faces_720p30_15s.mp4"
PEDESTRIANS = MEDIA / "pedestrians_30s.mp4"

Image = npt.NDArray[np.uint8]


def _frames(path: Path, n: int, size: tuple[int, int]) -> list[Image]:
    """``n`` frames spread over the clip, RGB, scaled to ``size``."""
    capture = cv2.VideoCapture(str(path))
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    frames = []
    for k in range(n):
        capture.set(cv2.CAP_PROP_POS_FRAMES, k * total // n)
        ok, frame = capture.read()
        assert ok, f"cannot decode frame {k * total // n} of {path}"
        rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        frames.append(np.ascontiguousarray(cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)))
    capture.release()
    return frames


def _centerface() -> CenterFaceDetector:
    return CenterFaceDetector(MODELS_DIR / "centerface.onnx", (640, 352), threads=1)


def _nanodet() -> NanoDetDetector:
    return NanoDetDetector(MODELS_DIR / "nanodet_g.onnx", threads=1)


def _blazeface() -> BlazeFaceDetector:
    return BlazeFaceDetector(MODELS_DIR / "blazeface_full.onnx", threads=1)


def _mask() -> FaceMaskDetector:
    return FaceMaskDetector(_centerface(), MaskClassifier(MODELS_DIR / "mask_classifier.onnx"))


def _people_with_faces() -> WithPrivacyFaces:
    faces = CenterFaceDetector(MODELS_DIR / "centerface.onnx", (416, 416), threads=1)
    return WithPrivacyFaces(_nanodet(), faces)


def _same(a: Detections, b: Detections) -> None:
    np.testing.assert_array_equal(a.xyxy, b.xyxy)
    np.testing.assert_array_equal(a.confidence, b.confidence)
    np.testing.assert_array_equal(a.class_id, b.class_id)
    np.testing.assert_array_equal(a.attribute, b.attribute)


@pytest.mark.parametrize(
    ("build", "clip", "least"),
    [
        (_centerface, FACES, 15),
        (_blazeface, FACES, 6),
        (_nanodet, PEDESTRIANS, 15),
        (_mask, FACES, 15),
        (_people_with_faces, PEDESTRIANS, 15),
    ],
    ids=["centerface", "blazeface", "nanodet", "mask", "people+faces"],
)
def test_detect_batch_equals_detect_frame_by_frame(
    build: Callable[[], BatchDetector], clip: Path, least: int
) -> None:
    detector = build()
    try:
        assert isinstance(detector, BatchDetector)
        frames = _frames(clip, 5, detector.input_size)
        alone = [detector.detect(f) for f in frames]
        together = detector.detect_batch(frames)
        assert len(together) == len(frames)
        assert sum(map(len, alone)) >= least  # real scenes: the frames have things to find
        for a, b in zip(alone, together, strict=True):
            _same(a, b)
        assert detector.detect_batch([]) == []
    finally:
        detector.close()


def test_detect_batch_refuses_a_frame_of_another_size() -> None:
    detector = _centerface()
    try:
        good = _frames(FACES, 1, detector.input_size)[0]
        with pytest.raises(ValueError, match="frame must be"):
            detector.detect_batch([good, good[:100]])
    finally:
        detector.close()


# -- the shared detector -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def face_frames() -> list[Image]:
    return _frames(FACES, 4, (640, 352))


@pytest.fixture
def batcher_of() -> Iterator[Callable[..., DetectorBatcher]]:
    made: list[DetectorBatcher] = []

    def make(
        max_batch: int, deadline_s: float, detector: Detector | None = None, workers: int = 1
    ) -> DetectorBatcher:
        batcher = DetectorBatcher(
            detector or _centerface(), max_batch=max_batch, deadline_s=deadline_s, workers=workers
        )
        batcher.start()
        made.append(batcher)
        return batcher

    yield make
    for b in made:
        b.stop()


def _in_threads(calls: list[Callable[[], object]]) -> list[object]:
    """Run each call in a thread of its own; what each returned or raised."""
    out: list[object] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            out[i] = calls[i]()
        except Exception as exc:
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
        assert not t.is_alive(), "a camera is still waiting for its detections"
    return out


def test_a_full_batch_runs_in_one_call_with_each_cameras_own_result(
    batcher_of: Callable[..., DetectorBatcher], face_frames: list[Image]
) -> None:
    # A deadline far away: only a full batch can have run.
    batcher = batcher_of(max_batch=3, deadline_s=1.0)
    cams = [batcher.attach(c) for c in ("a", "b", "c")]
    got = _in_threads(
        [lambda c=c, f=f: c.detect(f) for c, f in zip(cams, face_frames, strict=False)]
    )
    assert batcher.stats.sizes == {3: 1}
    reference = _centerface()
    try:
        for frame, dets in zip(face_frames, got, strict=False):
            assert isinstance(dets, Detections)
            _same(dets, reference.detect(frame))
    finally:
        reference.close()


def test_two_workers_serve_every_camera_with_its_own_frame(
    batcher_of: Callable[..., DetectorBatcher], face_frames: list[Image]
) -> None:
    batcher = batcher_of(max_batch=1, deadline_s=0.0, workers=2)
    cams = [batcher.attach(f"cam{i}") for i in range(len(face_frames))]
    rounds = 3
    got = _in_threads(
        [
            lambda c=c, f=f: [c.detect(f) for _ in range(rounds)]
            for c, f in zip(cams, face_frames, strict=True)
        ]
    )
    reference = _centerface()
    try:
        for frame, results in zip(face_frames, got, strict=True):
            assert isinstance(results, list)
            for dets in results:
                _same(dets, reference.detect(frame))
    finally:
        reference.close()
    assert batcher.stats.sizes == {1: rounds * len(face_frames)}


def test_a_batch_closes_at_its_deadline_when_a_camera_is_silent(
    batcher_of: Callable[..., DetectorBatcher], face_frames: list[Image]
) -> None:
    batcher = batcher_of(max_batch=3, deadline_s=0.02)
    a, b = batcher.attach("a"), batcher.attach("b")
    batcher.attach("silent")  # attached, never sends a frame (a camera whose source is lost)
    got = _in_threads([lambda: a.detect(face_frames[0]), lambda: b.detect(face_frames[1])])
    assert all(isinstance(d, Detections) and len(d) >= 3 for d in got)
    assert sum(batcher.stats.sizes.values()) >= 1 and 3 not in batcher.stats.sizes
    assert batcher.stats.frames == 2


def test_a_bad_frame_fails_only_its_own_camera(
    batcher_of: Callable[..., DetectorBatcher], face_frames: list[Image]
) -> None:
    batcher = batcher_of(max_batch=3, deadline_s=0.05)
    a, b, bad = batcher.attach("a"), batcher.attach("b"), batcher.attach("bad")
    got = _in_threads(
        [
            lambda: a.detect(face_frames[0]),
            lambda: bad.detect(face_frames[1][:200]),
            lambda: b.detect(face_frames[2]),
        ]
    )
    assert isinstance(got[1], ValueError) and "bad" in str(got[1])
    assert isinstance(got[0], Detections) and isinstance(got[2], Detections)
    assert len(got[0]) >= 3 and len(got[2]) >= 3


def test_a_failing_detector_reaches_every_camera_of_the_batch(
    batcher_of: Callable[..., DetectorBatcher], face_frames: list[Image]
) -> None:
    detector = _centerface()
    batcher = batcher_of(max_batch=2, deadline_s=1.0, detector=detector)
    a, b = batcher.attach("a"), batcher.attach("b")
    detector.close()  # the model is gone: its next call raises
    got = _in_threads([lambda: a.detect(face_frames[0]), lambda: b.detect(face_frames[1])])
    for result in got:
        assert isinstance(result, BatchFailed) and "closed" in str(result)
    assert batcher.stats.errors == 1
    # The batcher is still there for the next batch (which fails the same way, loudly).
    assert isinstance(_in_threads([lambda: a.detect(face_frames[0])])[0], BatchFailed)


def test_stop_unblocks_waiting_cameras(
    batcher_of: Callable[..., DetectorBatcher], face_frames: list[Image]
) -> None:
    batcher = batcher_of(max_batch=8, deadline_s=1.0)
    cams = [batcher.attach(c) for c in ("a", "b")]
    results: list[object] = []
    threads = [
        threading.Thread(target=lambda c=c: results.append(_catch(c.detect, face_frames[0])))
        for c in cams
    ]
    for t in threads:
        t.start()
    while len(batcher._queue) < 2:  # both frames wait in a batch that is not yet due
        threading.Event().wait(0.005)
    batcher.stop()
    for t in threads:
        t.join(timeout=10)
        assert not t.is_alive()
    assert len(results) == 2 and all(isinstance(r, BatcherStopped) for r in results)
    with pytest.raises(BatcherStopped):
        cams[0].detect(face_frames[0])
    with pytest.raises(BatcherStopped, match="make a new one"):
        batcher.start()  # its model is closed


def _catch(fn: Callable[[Image], Detections], frame: Image) -> object:
    try:
        return fn(frame)
    except Exception as exc:
        return exc


def test_closing_a_camera_detaches_it_and_leaves_the_model_open(
    batcher_of: Callable[..., DetectorBatcher], face_frames: list[Image]
) -> None:
    batcher = batcher_of(max_batch=2, deadline_s=0.01)
    a, b = batcher.attach("a"), batcher.attach("b")
    a.close()
    assert batcher.cameras == {"b"}
    with pytest.raises(BatcherStopped, match="detached"):
        a.detect(face_frames[0])
    assert len(b.detect(face_frames[0])) >= 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_batch": 0}, "max_batch"),
        ({"deadline_s": -1.0}, "deadline_s"),
        ({"workers": 0}, "workers"),
    ],
)
def test_bad_batcher_arguments(kwargs: dict[str, float], message: str) -> None:
    detector = _centerface()
    try:
        with pytest.raises(ValueError, match=message):
            DetectorBatcher(detector, **kwargs)  # type: ignore[arg-type]
    finally:
        detector.close()


def test_each_camera_skips_only_its_own_settled_faces(
    batcher_of: Callable[..., DetectorBatcher], face_frames: list[Image]
) -> None:
    # Both cameras see the same frame in one batch; camera a's settled tracks cover every
    # face, camera b has none settled: a's faces are not classified (NaN), b's are.
    detector = _mask()
    batcher = batcher_of(max_batch=2, deadline_s=1.0, detector=detector)
    frame = face_frames[0]
    faces = _centerface().detect(frame)
    assert len(faces) >= 2, "the face-rich frame should hold several faces"
    settled = SettledTracks()
    settled.publish(faces.xyxy, (frame.shape[1], frame.shape[0]))
    cam_a, cam_b = batcher.attach("a"), batcher.attach("b")
    cam_a.follow(settled)
    got_a, got_b = _in_threads([lambda: cam_a.detect(frame), lambda: cam_b.detect(frame)])
    assert batcher.stats.sizes == {2: 1}
    assert isinstance(got_a, Detections) and isinstance(got_b, Detections)
    assert got_a.attribute is not None and got_b.attribute is not None
    assert np.isnan(got_a.attribute).all()
    assert not np.isnan(got_b.attribute).any()
    assert detector.faces_skipped == len(faces) and detector.faces_classified == len(faces)
    # The shared detector itself follows no camera.
    assert detector.settled is None
