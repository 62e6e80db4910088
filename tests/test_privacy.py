"""Privacy on real clips: no face found in the output where the input has one, and privacy
masks filled uniformly, in the one encoded stream every output comes from."""

from __future__ import annotations

import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import MEDIA, ROOT

import edgecam.media.overlay as overlay
from edgecam.config import PrivacyConfig, VisionConfig, load_settings
from edgecam.media.detection import VideoFormat
from edgecam.media.gst import Gst, GstVideo, init
from edgecam.media.offline import process_file
from edgecam.vision.analytics import FrameMeta
from edgecam.vision.colour import BT709
from edgecam.vision.detectors import CenterFaceDetector
from edgecam.vision.privacy import FaceHold, face_patch

FACES = MEDIA / "faces.mp4"  # 120 frames, one face in every one of them
# At most this many frames of 120 (under 2 %) may still show a face a detector finds.
LEAK_TOLERANCE = 2
MASK = [[0.0, 0.6], [0.35, 0.6], [0.35, 1.0], [0.0, 1.0]]  # bottom-left corner
MASK_RGB = (255, 0, 255)


def _frames(path: Path) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    capture.release()
    return frames


@pytest.fixture(scope="module")
def face_detector() -> CenterFaceDetector:
    cfg = VisionConfig()
    return CenterFaceDetector(cfg.face_model_path, cfg.face_input, cfg.face_threshold, threads=1)


def _faces(detector: CenterFaceDetector, frames: list[np.ndarray]) -> list[int]:
    size = detector.input_size
    return [
        len(detector.detect(cv2.resize(f, size, interpolation=cv2.INTER_LINEAR))) for f in frames
    ]


@pytest.fixture(scope="module")
def faces_in_input(face_detector: CenterFaceDetector) -> list[int]:
    """Faces the detector finds in each frame of the face clip itself."""
    return _faces(face_detector, _frames(FACES))


def _process(
    tmp_path: Path,
    privacy: dict[str, object],
    clip: Path = FACES,
    frames: int = 120,
    **overrides: object,
) -> list[np.ndarray]:
    settings = load_settings(**{"cameras": [{"privacy": privacy}], **overrides})
    out = tmp_path / "out.mp4"
    process_file(settings, clip, out, progress=False)
    decoded = _frames(out)
    assert len(decoded) == frames
    return decoded


@pytest.fixture(scope="module")
def five_faces(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 s (30 frames) panning across a photo of five people facing the camera."""
    out = tmp_path_factory.mktemp("five") / "five.mp4"
    subprocess.run(
        [
            "ffmpeg", "-v", "error", "-y", "-loop", "1",
            "-i", str(ROOT / "tests" / "data" / "faceapi_sample5.jpg"),
            "-t", "3", "-r", "10",
            "-vf", "crop=880:640:x='min(80,t*30)':y=0,format=yuv420p",
            "-c:v", "libx264", "-preset", "ultrafast", str(out),
        ],
        check=True,
        timeout=60,
    )  # fmt: skip
    return out


@pytest.mark.parametrize("mode", ["pixelate", "blur", "fill"])
def test_five_faces_are_all_hidden(
    tmp_path: Path, face_detector: CenterFaceDetector, five_faces: Path, mode: str
) -> None:
    inputs = _faces(face_detector, _frames(five_faces))
    assert inputs == [5] * 30
    outputs = _faces(face_detector, _process(tmp_path, {"faces": mode}, five_faces, 30))
    # Faces found in the output, over all 150 faces of the input: at most 2 (about 1 %).
    assert sum(outputs) <= LEAK_TOLERANCE, outputs


@pytest.mark.parametrize(
    ("mode", "overrides"),
    [
        ("pixelate", {}),
        ("blur", {}),
        ("fill", {}),
        ("fill", {"overlay.element": "cairooverlay"}),
        # The people profile finds no faces itself: a face detector runs beside it.
        ("pixelate", {"vision.profile": "people"}),
    ],
)
def test_no_face_is_found_in_the_output(
    tmp_path: Path,
    face_detector: CenterFaceDetector,
    faces_in_input: list[int],
    mode: str,
    overrides: dict[str, object],
) -> None:
    inputs = faces_in_input
    assert sum(1 for n in inputs if n) == 120  # the detector does see the face in the input
    outputs = _faces(face_detector, _process(tmp_path, {"faces": mode}, **overrides))
    leaks = [i for i, (a, b) in enumerate(zip(inputs, outputs, strict=True)) if a and b]
    assert len(leaks) <= LEAK_TOLERANCE, f"faces found in output frames {leaks}"


def test_without_privacy_the_face_is_in_the_output(
    tmp_path: Path, face_detector: CenterFaceDetector
) -> None:
    # The check above means something: the same run without privacy shows the face.
    outputs = _faces(face_detector, _process(tmp_path, {"faces": "off"}))
    assert sum(1 for n in outputs if n) >= 110


@pytest.mark.parametrize(
    ("element", "font_size"),
    # An odd font size made the direct drawing's counts line fail on every frame, and the
    # masks, drawn after it, were left out.
    [("direct", 23), ("overlaycomposition", 18), ("cairooverlay", 18)],
)
def test_privacy_mask_is_uniformly_filled_on_every_frame(
    tmp_path: Path, element: str, font_size: int
) -> None:
    # The face's box and label are drawn, and must not show inside the mask either.
    frames = _process(
        tmp_path,
        {"masks": [MASK], "colour": list(MASK_RGB)},
        **{"overlay.element": element, "overlay.font_size": font_size},
    )
    h, w = frames[0].shape[:2]
    # The polygon's inside, 4 px in from its edges (chroma is shared by 2x2 pixels).
    x2, y1 = int(0.35 * w) - 4, int(0.6 * h) + 4
    for frame in frames:
        inside = frame[y1:h, 0:x2].reshape(-1, 3).astype(np.int64)
        assert np.abs(inside - MASK_RGB).max() <= 32, "mask not the mask colour"
        assert inside.std(axis=0).max() < 2.0, "mask not uniform"
    outside = frames[60][: int(0.6 * h) - 8, :].reshape(-1, 3).astype(np.int64)
    assert outside.std(axis=0).min() > 10  # the rest of the picture is still the picture


@pytest.mark.parametrize("element", ["direct", "overlaycomposition", "cairooverlay"])
def test_a_frame_that_fails_to_draw_is_hidden_whole_never_shown_unmasked(
    tmp_path: Path, element: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*_args: object) -> None:
        raise RuntimeError("a drawing bug")

    monkeypatch.setattr(overlay._Drawing, "draw_list", broken)
    frames = _process(
        tmp_path, {"masks": [MASK], "colour": list(MASK_RGB)}, **{"overlay.element": element}
    )
    for frame in frames:  # the privacy colour, all over: nothing of the picture
        pixels = frame.reshape(-1, 3).astype(np.int64)
        assert np.abs(pixels - MASK_RGB).max() <= 32 and pixels.std(axis=0).max() < 2.0
    assert [r.message for r in caplog.records].count("drawing failed") == 1
    # Without privacy the video goes on, undrawn.
    plain = _process(tmp_path, {}, **{"overlay.element": element})
    assert plain[30].reshape(-1, 3).std(axis=0).min() > 10


# -- which regions are hidden, frame by frame (no video) ----------------------------------------


def _hold(**kw: object) -> FaceHold:
    return FaceHold(PrivacyConfig.model_validate({"faces": "blur", "margin": 0, **kw}))


SIZE = (1000, 500)


def test_the_whole_picture_is_hidden_until_the_detector_has_looked() -> None:
    hold = _hold(blind_after_s=1.0)
    assert hold.update(0.0, [], np.zeros((0, 4)), None, SIZE) == () and hold.blind
    hold.update(0.1, [], np.zeros((0, 4)), np.zeros((0, 4)), SIZE)  # looked: nobody there
    assert not hold.blind
    hold.update(1.0, [], np.zeros((0, 4)), None, SIZE)
    assert not hold.blind
    hold.update(1.2, [], np.zeros((0, 4)), None, SIZE)  # no look for more than 1 s
    assert hold.blind


def test_a_face_stays_hidden_for_the_hold_time_after_it_is_lost() -> None:
    hold = _hold(hold_s=0.5)
    box = [[100, 100, 150, 160]]
    assert hold.update(0.0, [7], box, box, SIZE) == ((100, 100, 151, 161),)
    # The tracker moves it between detections; then loses it.
    assert hold.update(0.1, [7], [[110, 100, 160, 160]], None, SIZE) == ((110, 100, 161, 161),)
    assert hold.update(0.4, [], np.zeros((0, 4)), None, SIZE) == ((110, 100, 161, 161),)
    assert hold.update(0.7, [], np.zeros((0, 4)), None, SIZE) == ()


def test_an_unconfirmed_detection_is_hidden_and_covered_ones_are_not_repeated() -> None:
    hold = _hold(hold_s=1.0, margin=0.5)
    # Detected, no track yet (the tracker waits for a second detection): hidden, with margin.
    assert hold.update(0.0, [], np.zeros((0, 4)), [[100, 100, 140, 140]], SIZE) == (
        (80, 80, 161, 161),
    )
    # The track takes over: one rectangle, not the track's and the old detection's.
    rects = hold.update(0.1, [3], [[102, 100, 142, 140]], [[102, 100, 142, 140]], SIZE)
    assert rects == ((82, 80, 163, 161),)
    # Clipped to the picture.
    assert hold.update(0.2, [4], [[980, 480, 1010, 520]], None, SIZE)[-1] == (965, 460, 1000, 500)


def test_face_patch_reads_only_its_rectangle_and_is_opaque() -> None:
    y = np.full((100, 100), 16, np.uint8)
    u = np.full((50, 50), 128, np.uint8)
    v = np.full((50, 50), 128, np.uint8)
    y[20:60, 20:60] = 235  # a white square on black
    for mode, shape in (("fill", (2, 2)), ("blur", (4, 4)), ("pixelate", (48, 48))):
        image = face_patch((y, u, v), (20, 20, 60, 60), mode, 8, (1, 2, 3), BT709)
        assert image.shape[:2] == shape and (image[..., 3] == 255).all()
        if mode == "fill":
            assert image[0, 0].tolist() == [3, 2, 1, 255]  # BGRA
        else:
            assert image[..., :3].min() >= 250  # white: nothing from outside was read


class _HiddenFace:
    """Every frame's analysis: one face to hide at ``rect`` (what is tested is hiding it)."""

    def __init__(self, rect: tuple[int, int, int, int]) -> None:
        self.meta = FrameMeta("main", 0, 0.0, 0.0, (), {}, 30.0, True, hidden=(rect,))

    def step(self, _pts: int, _dur: int) -> FrameMeta:
        return self.meta


@pytest.mark.parametrize(
    "caps",
    [
        "width=640,height=480",
        "width=1280,height=720,colorimetry=bt709",
        "width=640,height=480,colorimetry=1:4:0:0",
    ],
)
@pytest.mark.parametrize("mode", ["pixelate", "blur"])
def test_a_face_hidden_by_overlaycomposition_keeps_its_colours(caps: str, mode: str) -> None:
    init()
    full = f"video/x-raw,format=I420,framerate=30/1,{caps}"
    video = VideoFormat()
    video.set_caps(Gst.Caps.from_string(full).get_structure(0))
    assert video.size is not None
    w, h = video.size
    rect = (w // 4, h // 4, w // 2, h // 2)
    settings = load_settings(**{"cameras": [{"privacy": {"faces": mode}}]})
    renderer = overlay.CompositionRenderer(settings, settings.cameras[0], _HiddenFace(rect), video)  # type: ignore[arg-type]
    # A flat green: a face's blocks are that colour, and must be put back as it. (Made RGB
    # by BT.601 before, and blended back by GStreamer with BT.709 on every frame: 14 off.)
    pipeline = Gst.parse_launch(
        f"videotestsrc num-buffers=1 pattern=solid-color foreground-color=0xff3cc850 ! "
        f'capsfilter caps="{full}" ! overlaycomposition name=draw ! appsink name=sink'
    )
    renderer.attach(pipeline.get_by_name("draw"))
    pipeline.set_state(Gst.State.PLAYING)
    try:
        sample = pipeline.get_by_name("sink").emit("pull-sample")
        info = GstVideo.VideoInfo.new_from_caps(sample.get_caps())
        ok, mapinfo = sample.get_buffer().map(Gst.MapFlags.READ)
        assert ok
        data = np.frombuffer(bytes(mapinfo.data), np.uint8)
        sample.get_buffer().unmap(mapinfo)
    finally:
        pipeline.set_state(Gst.State.NULL)
    x1, y1, x2, y2 = rect
    for plane, (sx, sy) in enumerate(((1, 1), (2, 2), (2, 2))):
        rows = data[info.offset[plane] :][: info.stride[plane] * (h // sy)]
        image = rows.reshape(h // sy, info.stride[plane]).astype(np.int64)
        face = image[y1 // sy + 2 : y2 // sy - 2, x1 // sx + 2 : x2 // sx - 2]
        picture = image[0, 0]
        assert np.abs(face - picture).max() <= 2, (
            f"plane {plane}: {picture} -> {face.min()}..{face.max()}"
        )


def test_boxes_line_up_with_the_picture_whatever_its_aspect(
    face_detector: CenterFaceDetector, five_faces: Path
) -> None:
    # An 880x640 source (not the model's 640x352 shape): the pipeline letterboxes it into
    # the model's frame, and its face boxes must come back to where the faces are on the
    # picture (they were once left in letterbox coordinates, shifted towards the middle).
    from edgecam.media.pipeline import Pipeline

    settings = load_settings(
        **{"cameras": [{"source": str(five_faces)}], "tracker.initialization_delay": 0}
    )
    pipeline = Pipeline(settings, mode="offline", rtp=False)
    frames = pipeline.meta_bus.subscribe(maxsize=0)
    with pipeline:
        pipeline.start()
        pipeline.run()
    third = [frames.get() for _ in range(3)][-1]
    got = np.array(sorted(t.box for t in third.tracks))
    picture = _frames(five_faces)[2]
    w, h = face_detector.input_size
    scale = min(w / 880, h / 640)
    cw, ch = round(880 * scale), round(640 * scale)
    ox, oy = (w - cw) // 2, (h - ch) // 2
    boxed = np.zeros((h, w, 3), np.uint8)
    boxed[oy : oy + ch, ox : ox + cw] = cv2.resize(picture, (cw, ch))
    direct = face_detector.detect(boxed)
    back = (direct.xyxy - np.array([ox, oy, ox, oy])) / scale
    want = np.array(sorted(tuple(float(v) for v in b) for b in back))
    assert got.shape == want.shape == (5, 4)
    # videoscale and OpenCV interpolate a little differently: a few pixels on ~100 px faces.
    assert np.abs(got - want).max() <= 6
