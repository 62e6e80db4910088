"""The detector's frame made on its thread (media.frames): the letterbox that videoscale made,
the right picture in it, the caps' colours."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from conftest import MEDIA

from edgecam.errors import PipelineError
from edgecam.media.frames import I420Frame, MappedFrame, ModelFit, from_model_frame
from edgecam.media.gst import Gst, GstVideo, init
from edgecam.vision.letterbox import letterbox

U8 = npt.NDArray[np.uint8]


def _info(w: int, h: int, extra: str = "") -> object:
    init()
    caps = Gst.Caps.from_string(f"video/x-raw,format=I420,width={w},height={h}{extra}")
    return GstVideo.VideoInfo.new_from_caps(caps)


def _flat(w: int, h: int, y: int, u: int = 128, v: int = 128) -> I420Frame:
    uv = np.empty((2, (h + 1) // 2, (w + 1) // 2), dtype=np.uint8)
    uv[0], uv[1] = u, v
    return I420Frame(np.full((h, w), y, dtype=np.uint8), uv)


def _gstreamer_pairs(
    clip: str, model: tuple[int, int], n: int
) -> tuple[tuple[int, int, int, int], list[tuple[U8, U8]]]:
    """The size and pixel aspect ratio of ``clip``, and ``n`` of its frames: (ours from the
    decoded I420, videoscale ! videoconvert's)."""
    init()
    w, h = model
    pipeline = Gst.parse_launch(
        f"filesrc location={clip} ! decodebin ! videoconvert ! video/x-raw,format=I420 ! "
        "tee name=t t. ! queue ! appsink name=raw sync=false "
        "t. ! queue ! videoscale ! videoconvert ! "
        f"video/x-raw,format=RGB,width={w},height={h},pixel-aspect-ratio=1/1 ! "
        "appsink name=scaled sync=false"
    )
    raw, scaled = pipeline.get_by_name("raw"), pipeline.get_by_name("scaled")
    pipeline.set_state(Gst.State.PLAYING)
    pairs = []
    shape = (0, 0, 1, 1)
    try:
        for _ in range(n):
            a, b = raw.try_pull_sample(5 * Gst.SECOND), scaled.try_pull_sample(5 * Gst.SECOND)
            assert a is not None and b is not None
            info = GstVideo.VideoInfo.new_from_caps(a.get_caps())
            shape = (info.width, info.height, info.par_n, info.par_d)
            with MappedFrame(a.get_buffer(), info, Gst.MapFlags.READ) as planes:
                ours = ModelFit(info, model)(planes)
            binfo = GstVideo.VideoInfo.new_from_caps(b.get_caps())
            ok, mapped = b.get_buffer().map(Gst.MapFlags.READ)
            assert ok
            theirs = np.ndarray((h, w, 3), np.uint8, mapped.data, 0, (binfo.stride[0], 3, 1))
            pairs.append((ours, theirs.copy()))
            b.get_buffer().unmap(mapped)
    finally:
        pipeline.set_state(Gst.State.NULL)
    return shape, pairs


@pytest.mark.parametrize(
    ("clip", "model"),
    [("pedestrians_30s.mp4", (640, 352)), ("faces.mp4", (640, 352)), ("faces.mp4", (416, 416))],
)
def test_the_picture_is_the_one_videoscale_made(clip: str, model: tuple[int, int]) -> None:
    (w, h, par_n, par_d), pairs = _gstreamer_pairs(str(MEDIA / clip), model, 5)
    box = letterbox((w, h), (par_n, par_d), model)
    border = np.ones((model[1], model[0]), dtype=bool)  # a pixel inside the content's edge
    border[
        max(0, box.y - 1) : box.y + box.height + 1, max(0, box.x - 1) : box.x + box.width + 1
    ] = False
    for ours, theirs in pairs:
        assert ours.shape == theirs.shape == (model[1], model[0], 3)
        assert not ours[border].any() and not theirs[border].any()  # black borders, both
        diff = np.abs(ours.astype(np.int16) - theirs.astype(np.int16))
        # The same picture: a pixel apart at most where videoscale's phase differs, and
        # colours a few levels apart (it leaves out the range expansion; we do not).
        assert diff.mean() < 8, diff.mean()
        assert abs(float(ours.mean()) - float(theirs.mean())) < 4


def test_a_thin_line_lands_where_the_boxes_are_mapped_back_from() -> None:
    w, h, model = 1280, 720, (640, 352)
    frame = _flat(w, h, 16)
    frame.y[:, 640:642] = 235  # a 2-pixel line, its centre at x = 641
    frame.y[300:302, :] = 235
    out = ModelFit(_info(w, h), model)(frame)
    sx, sy, dx, dy = from_model_frame(
        Gst.Caps.from_string(f"video/x-raw,width={w},height={h}").get_structure(0), model
    )
    column, row = (641 - dx) / sx, (301 - dy) / sy  # in model pixel edges
    bright_cols = np.flatnonzero(out[100, :, 0] > 60)
    bright_rows = np.flatnonzero(out[:, 300, 0] > 60)
    assert bright_cols.min() >= int(column) - 1 and bright_cols.max() <= int(column) + 1
    assert bright_rows.min() >= int(row) - 1 and bright_rows.max() <= int(row) + 1
    # its weight centred on the mapped position
    cols = np.arange(out.shape[1])
    centre = float((out[100, :, 0] * (cols + 0.5)).sum() / out[100, :, 0].sum())
    assert centre == pytest.approx(column, abs=0.25)


@pytest.mark.parametrize(
    ("caps", "yuv", "rgb"),
    [
        ("", (126, 128, 128), (128, 128, 128)),  # limited range: 16..235 to 0..255
        (",colorimetry=1:4:0:0", (126, 128, 128), (126, 126, 126)),  # full range (0-255)
        ("", (81, 90, 240), (255, 24, 0)),  # BT.709 red
        (",colorimetry=bt601", (81, 90, 240), (254, 0, 0)),  # BT.601 red
        ("", (16, 128, 128), (0, 0, 0)),
        ("", (235, 128, 128), (255, 255, 255)),
    ],
)
def test_colours_follow_the_caps_matrix_and_range(
    caps: str, yuv: tuple[int, int, int], rgb: tuple[int, int, int]
) -> None:
    w, h = 1280, 720
    out = ModelFit(_info(w, h, caps), (640, 352))(_flat(w, h, *yuv))
    assert tuple(int(c) for c in out[176, 320]) == pytest.approx(rgb, abs=1)


@pytest.mark.parametrize(
    ("source", "par", "model"),
    [
        ((1920, 1080), (1, 1), (416, 416)),  # shrunk 4.6x: area-averaged by 4 first
        ((1365, 767), (1, 1), (640, 352)),  # by 2.1x, the factor does not divide: OpenCV's area
        ((175, 143), (1, 1), (640, 352)),  # odd sizes, grown
        ((720, 576), (16, 11), (640, 352)),  # anamorphic: the display shape is kept
        ((640, 352), (1, 1), (640, 352)),  # already the model's size
    ],
)
def test_every_shape_is_letterboxed_as_mapped_back(
    source: tuple[int, int], par: tuple[int, int], model: tuple[int, int]
) -> None:
    w, h = source
    info = _info(w, h, f",pixel-aspect-ratio={par[0]}/{par[1]}")
    out = ModelFit(info, model)(_flat(w, h, 180))
    box = letterbox(source, par, model)
    assert out.shape == (model[1], model[0], 3)
    lit = out[..., 0] > 0
    assert lit.sum() == box.width * box.height
    assert lit[box.y : box.y + box.height, box.x : box.x + box.width].all()
    sx, sy, dx, dy = from_model_frame(
        Gst.Caps.from_string(
            f"video/x-raw,width={w},height={h},pixel-aspect-ratio={par[0]}/{par[1]}"
        ).get_structure(0),
        model,
    )
    # the content's corners map back to the source's
    assert (box.x * sx + dx, box.y * sy + dy) == pytest.approx((0, 0), abs=1e-6)
    assert ((box.x + box.width) * sx + dx, (box.y + box.height) * sy + dy) == pytest.approx(
        (w, h), abs=1e-6
    )


def _sample(caps: str, data: bytes) -> Gst.Sample:
    init()
    return Gst.Sample.new(Gst.Buffer.new_wrapped(data), Gst.Caps.from_string(caps), None, None)


def test_the_detector_thread_takes_i420_frames_or_rgb_at_the_model_size() -> None:
    from edgecam.media.detection import _ModelFrames

    source = Gst.Caps.from_string("video/x-raw,format=I420,width=1280,height=720")
    # I420, as the cpu and vaapi backends hand it: fitted here, mapped back from its caps.
    i420 = np.concatenate([np.full(1280 * 720, 235, np.uint8), np.full(640 * 720, 128, np.uint8)])
    frames = _ModelFrames((640, 352), lambda: None)
    frame, to_source = frames.read(
        _sample("video/x-raw,format=I420,width=1280,height=720", i420.tobytes())
    )
    assert frame.shape == (352, 640, 3) and frame[176, 320].tolist() == [255, 255, 255]
    assert to_source == pytest.approx((1280 / 625, 720 / 352, -7 * 1280 / 625, 0.0))
    # RGB at the model's size, as a backend that scales on its device hands it: copied.
    rgb = np.arange(352 * 640 * 3, dtype=np.uint8)
    frames = _ModelFrames((640, 352), lambda: source)
    frame, to_source = frames.read(
        _sample("video/x-raw,format=RGB,width=640,height=352", rgb.tobytes())
    )
    assert np.array_equal(frame.ravel(), rgb) and frame.flags.writeable
    assert to_source == pytest.approx((1280 / 625, 720 / 352, -7 * 1280 / 625, 0.0))
    # Anything else is refused, saying what came.
    for caps in (
        "video/x-raw,format=RGB,width=320,height=176",
        "video/x-raw,format=NV12,width=640,height=352",
    ):
        with pytest.raises(PipelineError, match="neither I420 video nor RGB at the model's"):
            frames.read(_sample(caps, bytes(640 * 352 * 3)))
    # A refused format is not remembered: the next frame of the same caps is refused too,
    # and a good one after it is read.
    with pytest.raises(PipelineError):
        frames.read(_sample("video/x-raw,format=NV12,width=640,height=352", bytes(640 * 528)))
    again, _ = frames.read(_sample("video/x-raw,format=RGB,width=640,height=352", rgb.tobytes()))
    assert np.array_equal(again.ravel(), rgb)


@pytest.mark.parametrize(("height", "kr"), [(720, 0.2126), (480, 0.299)])
def test_an_unknown_colour_matrix_is_gstreamers_default_for_the_height(
    height: int, kr: float
) -> None:
    from types import SimpleNamespace

    from edgecam.media.frames import colour_matrix
    from edgecam.vision.colour import YuvMatrix

    init()
    # Caps that leave the matrix out get GStreamer's default from VideoInfo itself ...
    info = _info(height * 16 // 9, height, ",colorimetry=2:0:0:0")
    assert colour_matrix(info) == YuvMatrix(kr, 0.0722 if kr < 0.25 else 0.114, False)
    # ... and a matrix that has no Kr/Kb (RGB) falls back to the same rule here.
    limited = getattr(GstVideo.VideoColorRange, "16_235")
    rgb = SimpleNamespace(matrix=GstVideo.VideoColorMatrix.RGB, range=limited)
    fake = SimpleNamespace(colorimetry=rgb, height=height)
    assert colour_matrix(fake) == colour_matrix(info)
