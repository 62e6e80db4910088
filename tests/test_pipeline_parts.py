"""The pipeline's parts: detectors owned by the caller, the bus handlers, the backoff, the
media backends, the overlay's composition cache."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from conftest import MEDIA, ROOT

from edgecam.config import CameraConfig, EncoderConfig, Settings, load_settings
from edgecam.errors import MissingPluginError, PipelineError, SourceError
from edgecam.media import backends
from edgecam.media.backends import (
    BACKENDS,
    ENCODERS,
    Backend,
    backend_problem,
    encoder_problem,
    probe_backend,
    resolve_backend,
    resolve_encoder,
)
from edgecam.media.detection import PipelineStats, VideoFormat
from edgecam.media.frames import MappedFrame
from edgecam.media.gst import Gst, GstVideo, init
from edgecam.media.launch import describe
from edgecam.media.offline import FileJob, process_file, process_files
from edgecam.media.overlay import DirectRenderer, LruCache
from edgecam.media.pipeline import Pipeline
from edgecam.media.supervisor import Backoff, SourceSupervisor
from edgecam.vision.analytics import FrameMeta, TrackInfo
from edgecam.vision.colour import BT709
from edgecam.vision.detections import Detections
from edgecam.vision.drawing import DrawBox, DrawList
from edgecam.vision.synthetic import SyntheticDetector


class _CountingDetector(SyntheticDetector):
    """A real detector that counts its calls and remembers being closed."""

    def __init__(self) -> None:
        super().__init__(3, (320, 192))
        self.calls = 0
        self.closed = 0

    def detect(self, frame: npt.NDArray[np.uint8]) -> Detections:
        self.calls += 1
        return super().detect(frame)

    def close(self) -> None:
        self.closed += 1


def _offline(**overrides: object) -> Settings:
    return load_settings(
        **{"cameras": [{"name": "main", "source": str(MEDIA / "motion_720p30_4s.mp4")}]},
        **{"vision.detect_fps": 5},
        **overrides,
    )


def test_detectors_from_outside_are_used_and_not_closed(tmp_path: Path) -> None:
    shared = [_CountingDetector()]
    with Pipeline(
        _offline(), mode="offline", rtp=False, out_file=tmp_path / "o.mp4", detectors=shared
    ) as p:
        p.start()
        p.run(timeout=60)
        # 4.2 s at 5 detections a second (t = 0 included), all made by the shared detector
        assert p.stats.detections == shared[0].calls == 21
    assert shared[0].closed == 0  # its owner closes it, not the pipeline


def test_an_owned_detector_is_closed(tmp_path: Path) -> None:
    own = _CountingDetector()
    with Pipeline(_offline(), mode="offline", rtp=False, detector=own):
        pass
    assert own.closed == 1


def test_detector_and_detectors_together_are_refused() -> None:
    with pytest.raises(ValueError, match="either detector or detectors"):
        Pipeline(
            _offline(),
            mode="offline",
            rtp=False,
            detector=_CountingDetector(),
            detectors=[_CountingDetector()],
        )


class _ClosedCounter(_CountingDetector):
    """A detector the pipeline owns (passed as ``detector``)."""


def test_detectors_are_closed_when_the_pipeline_cannot_be_described(tmp_path: Path) -> None:
    own = _CountingDetector()
    settings = load_settings(
        **{"cameras": [{"source": str(tmp_path / "missing.mp4")}], "vision.detect_fps": 5}
    )
    with pytest.raises(SourceError, match=r"missing\.mp4 does not exist"):
        Pipeline(settings, mode="offline", rtp=False, detector=own)
    assert own.closed == 1


def test_detectors_are_closed_when_the_pipeline_cannot_start(tmp_path: Path) -> None:
    own = _CountingDetector()
    shared = _CountingDetector()
    out = tmp_path / "a-folder.mp4"
    out.mkdir()  # the file sink cannot open a folder: the pipeline fails to start
    for kwargs in ({"detector": own}, {"detectors": [shared]}):
        pipeline = Pipeline(_offline(), mode="offline", rtp=False, out_file=out, **kwargs)
        with pytest.raises(SourceError, match="cannot start"):
            pipeline.start()
    assert own.closed == 1  # closed with the pipeline that failed
    assert shared.closed == 0  # its owner's to close


# -- the bus handlers and the backoff ----------------------------------------------------------


def _camera(**kw: object) -> CameraConfig:
    return CameraConfig.model_validate(
        {"name": "cam", "source": "test://", "reconnect_min_s": 0.1, "reconnect_max_s": 0.4} | kw
    )


def _supervised(
    description: str, *, live: bool
) -> tuple[Gst.Pipeline, SourceSupervisor, PipelineStats]:
    init()
    gst = Gst.parse_launch(description)
    stats = PipelineStats()
    sup = SourceSupervisor(
        gst,
        _camera(),
        entry=gst.get_by_name("entry").get_static_pad("sink"),
        live=live,
        reconnect=live,
        loops=False,
        stats=stats,
    )
    return gst, sup, stats


def test_an_element_error_offline_ends_the_run_naming_the_element() -> None:
    gst, sup, _ = _supervised(
        "filesrc name=broken location=/no/such/file ! identity name=entry ! fakesink", live=False
    )
    gst.set_state(Gst.State.PLAYING)
    try:
        with pytest.raises(PipelineError, match=r"\(broken\)"):
            sup.run(timeout=10, on_tick=None)
    finally:
        gst.set_state(Gst.State.NULL)


def test_an_element_error_live_is_a_reconnect_with_backoff() -> None:
    gst, sup, stats = _supervised(
        "filesrc name=broken location=/no/such/file ! identity name=entry ! fakesink", live=True
    )
    gst.set_state(Gst.State.PLAYING)
    try:
        sup.run(timeout=1.0, on_tick=None)  # errors, restarts, until the deadline stops it
    finally:
        gst.set_state(Gst.State.NULL)
    # 0.1 + 0.2 + 0.4 + 0.4 s of backoff fit in the second: 3 or 4 restarts, never more
    assert 2 <= stats.restarts <= 4
    assert sup.outage


def test_end_of_stream_ends_an_offline_run() -> None:
    gst, sup, stats = _supervised(
        "videotestsrc num-buffers=5 ! identity name=entry ! fakesink", live=False
    )
    gst.set_state(Gst.State.PLAYING)
    try:
        sup.run(timeout=10, on_tick=None)
    finally:
        gst.set_state(Gst.State.NULL)
    assert stats.restarts == 0 and sup.error is None


def test_a_failure_posted_from_code_ends_the_run_with_its_message() -> None:
    gst, sup, _ = _supervised(
        "videotestsrc is-live=true ! identity name=entry ! fakesink", live=True
    )
    gst.set_state(Gst.State.PLAYING)
    sup.fail("the detector broke")
    sup.fail("a later failure")  # the first one is the cause
    try:
        with pytest.raises(PipelineError, match=r"^the detector broke$"):
            sup.run(timeout=10, on_tick=None)
    finally:
        gst.set_state(Gst.State.NULL)


def test_backoff_doubles_up_to_its_maximum_and_resets() -> None:
    backoff = Backoff(0.5, 3.0)
    assert [backoff.failed() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    backoff.reset()
    assert backoff.failed() == 0.5


@pytest.mark.parametrize(("first", "most"), [(0, 1), (-1, 1), (2, 1)])
def test_backoff_refuses_bad_delays(first: float, most: float) -> None:
    with pytest.raises(ValueError, match=r"first_s|max_s"):
        Backoff(first, most)


# -- the media backends ------------------------------------------------------------------------

GOLDEN = json.loads((ROOT / "tests" / "data" / "pipeline_descriptions.json").read_text())


def _golden_settings(case: dict[str, Any], **extra: object) -> Settings:
    overrides = json.loads(json.dumps(case["overrides"]).replace("MEDIA/", f"{MEDIA}/"))
    return load_settings(**(overrides | extra))


def _describe(settings: Settings, case: dict[str, Any], backend: Backend | None = None) -> str:
    return describe(
        settings,
        0,
        case["mode"],
        infer_size=tuple(case["infer"]) if case["infer"] else None,
        analytics=case["analytics"],
        out_file=Path(case["out"]) if case["out"] else None,
        rtp_ports=tuple(case["ports"]),
        backend=backend,
    ).description


def _since_the_table(description: str) -> str:
    """A launch line from before the media backend table, with the change made since: the
    detector's frames are fitted on its thread (no scaling in the pipeline)."""
    return re.sub(
        r" ! videoscale ! videoconvert ! video/x-raw,format=RGB,width=\d+,height=\d+,"
        r"pixel-aspect-ratio=1/1 ! appsink",
        " ! appsink",
        description,
    )


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_cpu_backend_describes_the_pipeline_as_before(name: str) -> None:
    """Byte for byte the launch lines of the pipeline before the media backend table (taken
    from it, tests/data/pipeline_descriptions.json), drawn by the same element, but for the
    change made since on purpose (:func:`_since_the_table`)."""
    case = GOLDEN[name]
    element = case["overrides"].get("overlay.element", "overlaycomposition")
    settings = _golden_settings(case, **{"overlay.element": element})
    assert settings.media.backend == "auto"  # and auto is cpu on this machine
    expected = _since_the_table(case["description"])
    assert _describe(settings, case) == expected
    assert _describe(settings, case, BACKENDS["cpu"]) == expected
    if case["infer"]:
        assert "appsink name=infer_sink" in expected and "format=RGB" not in expected


def test_the_default_overlay_differs_only_in_its_element() -> None:
    case = GOLDEN["offline_default_file"]
    direct = _describe(_golden_settings(case), case)
    assert direct == _since_the_table(case["description"]).replace(
        "overlaycomposition name=overlay", "identity name=overlay"
    )


def test_nvidia_backend_keeps_frames_on_the_gpu_and_feeds_nvenc_cuda_memory() -> None:
    case = GOLDEN["live_rtsp_rtp"]
    settings = _golden_settings(
        case, **{"overlay.element": "overlaycomposition", "encoder.element": "nvh264"}
    )
    line = _describe(settings, case, BACKENDS["nvidia"])
    assert "decodebin name=dec cudaupload name=conv ! cudaconvertscale name=fit" in line
    assert "caps=video/x-raw(memory:CUDAMemory),format=I420 ! tee name=t" in line
    # the detector's frame is scaled on the GPU and downloaded at model size
    assert (
        "cudaconvertscale add-borders=true ! video/x-raw(memory:CUDAMemory),format=RGB,"
        "width=640,height=352,pixel-aspect-ratio=1/1 ! cudadownload ! video/x-raw,format=RGB"
    ) in line
    # drawn in system memory, then uploaded as NV12 in CUDA memory for NVENC
    assert (
        "cudadownload ! overlaycomposition name=overlay ! cudaupload ! cudaconvertscale ! "
        "video/x-raw(memory:CUDAMemory),format=NV12 ! nvh264enc name=enc"
    ) in line
    assert "videoconvert" not in line and "videoscale" not in line
    # a software encoder on the nvidia backend gets system memory
    x264 = _golden_settings(GOLDEN["live_test_noverlay"], **{"encoder.element": "x264"})
    line = _describe(x264, GOLDEN["live_test_noverlay"], BACKENDS["nvidia"])
    assert "identity name=overlay signal-handoffs=true ! cudadownload ! x264enc name=enc" in line


def test_vaapi_backend_decodes_converts_and_encodes_through_vaapi() -> None:
    case = GOLDEN["offline_default_file"]
    line = _describe(_golden_settings(case), case, BACKENDS["vaapi"])
    assert "decodebin name=dec vaapipostproc name=conv ! videoscale name=fit" in line
    assert "identity name=overlay ! vaapih264enc name=enc bitrate=2500 keyframe-period=600" in line
    assert BACKENDS["vaapi"].decoders == ("vaapih264dec", "vaapih265dec")


def test_nvidia_backend_without_nvenc_encodes_with_x264(caplog: pytest.LogCaptureFixture) -> None:
    """A GPU that decodes but has no NVENC (an A100, H100, H200; or none at all, as here):
    encoder auto on the nvidia backend is x264, fed system memory, and says why once."""
    caplog.set_level(logging.INFO, logger="edgecam.media.backends")
    assert encoder_problem("nvh264") is not None  # no NVIDIA GPU on this machine
    backends._say_fallback.cache_clear()  # said once a process: this test may not be first
    case = GOLDEN["offline_default_file"]
    line = _describe(_golden_settings(case), case, BACKENDS["nvidia"])
    assert "cudadownload ! identity name=overlay ! x264enc name=enc" in line
    assert "nvh264enc" not in line and "cudaupload ! cudaconvertscale ! " not in line
    assert resolve_encoder(EncoderConfig(), BACKENDS["nvidia"]) is ENCODERS["x264"]
    said = [r for r in caplog.records if "not nvh264enc" in r.getMessage()]
    assert len(said) == 1 and "x264 encodes" in said[0].getMessage()
    # asked for by name, NVENC is not replaced: the pipeline would refuse to start instead
    explicit = EncoderConfig(element="nvh264")
    assert resolve_encoder(explicit, BACKENDS["nvidia"]) is ENCODERS["nvh264"]


@pytest.mark.parametrize(
    ("probe", "falls_back"),
    [("videotestsrc num-buffers=5 ! identity error-after=2 ! fakesink", True),
     ("videotestsrc num-buffers=2 ! fakesink", False)],
)  # fmt: skip
def test_an_encoder_is_kept_only_where_its_probe_runs(
    monkeypatch: pytest.MonkeyPatch, probe: str, falls_back: bool
) -> None:
    """Registered is not enough (nvcodec registers nvh264enc on a GPU without NVENC): the
    encoder's own test pipeline must run to its end."""
    present = dataclasses.replace(ENCODERS["nvh264"], factory="x264enc", probe=probe)
    monkeypatch.setitem(ENCODERS, "nvh264", present)
    encoder_problem.cache_clear()
    try:
        chosen = resolve_encoder(EncoderConfig(), BACKENDS["nvidia"])
    finally:
        encoder_problem.cache_clear()
    assert chosen is (ENCODERS["x264"] if falls_back else present)


def test_nvdec_backend_decodes_on_the_gpu_and_does_the_rest_as_cpu() -> None:
    """Where GStreamer has NVDEC but not the CUDA converter (before 1.22; 1.22 with CUDA 13's
    NVRTC): the cpu backend's launch line, with NVDEC preferred by decodebin."""
    nvdec = BACKENDS["nvdec"]
    assert nvdec.decoders == ("nvh264dec", "nvh265dec") and nvdec.elements == ("nvh264dec",)
    for name in ("offline_default_file", "live_rtsp_rtp"):
        case = GOLDEN[name]
        settings = _golden_settings(case)
        assert _describe(settings, case, nvdec) == _describe(settings, case, BACKENDS["cpu"])
    assert "nvh264dec ! videoconvert" in (nvdec.probe or "")


def test_a_backend_partly_installed_says_what_would_do_instead() -> None:
    partial = dataclasses.replace(
        BACKENDS["cpu"], elements=("videotestsrc", "nosuchelement"), missing_hint="try cpu"
    )
    problem = probe_backend(partial)
    assert problem == "GStreamer element(s) nosuchelement not installed (try cpu)"
    # none of them installed: the common case, said plainly
    absent = dataclasses.replace(partial, elements=("nosuchelement",))
    assert probe_backend(absent) == "GStreamer element(s) nosuchelement not installed"


def test_auto_falls_back_to_cpu_saying_why(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="edgecam.media.backends")
    backends._auto_backend.cache_clear()  # said once a process: this test may not be first
    assert resolve_backend(load_settings()) is BACKENDS["cpu"]
    assert resolve_backend(load_settings()) is BACKENDS["cpu"]
    for name in ("nvidia", "vaapi", "nvdec"):
        problem = backend_problem(name)
        assert problem is not None  # no GPU, no VA-API device on this machine
        assert caplog.text.count(f"media backend auto: not {name}: {problem}") == 1


def test_an_explicit_backend_that_cannot_run_is_a_clear_error() -> None:
    with pytest.raises(MissingPluginError, match=r"media backend nvidia .* cannot run here"):
        resolve_backend(load_settings(**{"media.backend": "nvidia"}))
    # asking for NVENC with backend auto asks for the nvidia backend
    with pytest.raises(MissingPluginError, match="nvh264enc"):
        resolve_backend(load_settings(**{"encoder.element": "nvh264"}))


def test_a_backend_that_cannot_run_fails_before_a_model_is_loaded(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Loading the models takes seconds on a small box; a config that cannot run is said
    first, by a pipeline and by several files side by side."""
    import edgecam.vision.detectors as detectors

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(detectors, "build_detector", refuse)
    settings = _offline(**{"media.backend": "nvdec"})
    clip = MEDIA / "motion_720p30_4s.mp4"
    with pytest.raises(MissingPluginError, match=r"media backend nvdec .* nvh264dec"):
        Pipeline(settings, mode="offline", rtp=False, out_file=tmp_path / "o.mp4")
    own = _CountingDetector()  # given to the pipeline to own: closed all the same
    with pytest.raises(MissingPluginError, match=r"media backend nvdec"):
        Pipeline(settings, mode="offline", rtp=False, detector=own)
    assert own.closed == 1
    job = FileJob(clip, tmp_path / "o.mp4")
    with pytest.raises(MissingPluginError, match=r"media backend nvdec .* nvh264dec"):
        process_files(settings, [job, FileJob(clip, tmp_path / "p.mp4")], progress=False)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("probe", "why"),
    [
        ("filesrc location=/no/such/device ! fakesink", "does not start"),
        ("videotestsrc num-buffers=5 ! identity error-after=2 ! fakesink", "failed"),
        ("videotestsrc num-buffers=2 ! video/x-raw,format=I420 ! jpegdec ! fakesink", "build"),
    ],
)
def test_a_backend_whose_elements_exist_but_do_not_run_is_passed_over(probe: str, why: str) -> None:
    """Elements present are not enough: the probe pipeline must run to its end."""
    refusing = dataclasses.replace(BACKENDS["cpu"], elements=("videotestsrc",), probe=probe)
    problem = probe_backend(refusing)
    assert problem is not None and why in problem
    assert probe_backend(BACKENDS["cpu"]) is None


# -- the overlay: direct drawing, its caches --------------------------------------------------


def test_lru_cache_keeps_the_recently_used() -> None:
    cache: LruCache[str, int] = LruCache(2)
    made: list[str] = []

    def make(key: str) -> Callable[[], int]:
        return lambda: made.append(key) or len(made)

    assert cache.get("a", make("a")) == 1
    assert cache.get("b", make("b")) == 2
    assert cache.get("a", make("a")) == 1  # a hit: "a" is now the most recent
    cache.get("c", make("c"))  # evicts "b", the least recently used
    assert cache.get("a", make("a")) == 1
    cache.get("b", make("b"))  # made again
    assert made == ["a", "b", "c", "b"] and len(cache) == 2
    assert (cache.hits, cache.misses) == (2, 4)
    with pytest.raises(ValueError, match="size"):
        LruCache(0)


def _i420_buffer(width: int, height: int, luma: int = 100) -> tuple[Gst.Buffer, Any]:
    init()
    info = GstVideo.VideoInfo.new_from_caps(
        Gst.Caps.from_string(f"video/x-raw,format=I420,width={width},height={height}")
    )
    data = bytearray([128]) * info.size
    data[: width * height] = bytes([luma]) * (width * height)
    return Gst.Buffer.new_wrapped(bytes(data)), info


def _planes(buf: Gst.Buffer, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    ok, mapinfo = buf.map(Gst.MapFlags.READ)
    assert ok
    data = np.frombuffer(bytes(mapinfo.data), np.uint8)
    buf.unmap(mapinfo)
    return data[: width * height].reshape(height, width), data[width * height :]


def test_direct_drawing_writes_outlines_and_cached_labels_into_the_frame() -> None:
    settings = load_settings(**{"overlay.colours": {"mask": [255, 0, 255]}})
    renderer = DirectRenderer(settings, settings.cameras[0], None, None)  # type: ignore[arg-type]
    buf, info = _i420_buffer(320, 240)
    box = DrawBox(100, 80, 199, 159, (255, 0, 255), "7 mask")
    with MappedFrame(buf, info, Gst.MapFlags.READ | Gst.MapFlags.WRITE) as frame:
        renderer._draw_list(frame, DrawList((box,), ()))
        renderer._draw_list(frame, DrawList((box,), ()))
    y, chroma = _planes(buf, 320, 240)
    magenta_y = 106  # BT.601 limited range: 16 + (65.481 + 24.966) * 255 / 255
    lw = settings.overlay.line_width
    assert (y[80 : 80 + lw, 100:200] == magenta_y).all()  # top edge
    assert (y[80:160, 199 - lw + 1 : 200] == magenta_y).all()  # right edge
    assert (y[80 + lw : 160 - lw, 100 + lw : 200 - lw] == 100).all()  # inside untouched
    label_h = settings.overlay.font_size + 4
    label = y[80 - label_h : 80, 100:160]
    assert (label == 16).any() and (label == magenta_y).any()  # black text on the colour
    assert (y[: 80 - label_h] == 100).all()  # nothing above the label
    u = chroma[: 160 * 120].reshape(120, 160)
    assert (u[40, 50:100] == 202).all()  # the top edge's chroma is magenta's too
    assert (renderer.label_cache.hits, renderer.label_cache.misses) == (1, 1)


class _OneTrack:
    """Every frame's analysis: one person tracked at ``box`` (what is tested is drawing it)."""

    def __init__(self, box: tuple[float, float, float, float]) -> None:
        track = TrackInfo(7, box, "mask", 0.9, True)
        self.meta = FrameMeta("main", 0, 0.0, 0.0, (track,), {}, 30.0, True)

    def step(self, _pts: int, _dur: int) -> FrameMeta:
        return self.meta


def _drawn_rgb(renderer: DirectRenderer, caps: str) -> np.ndarray:
    """One black frame of ``caps`` through the direct element, then videoconvert (which
    reads the frame's colours by the caps' matrix and range) to RGB."""
    init()
    pipeline = Gst.Pipeline()
    source = Gst.parse_bin_from_description(
        f'videotestsrc num-buffers=1 pattern=black ! capsfilter caps="{caps}"', True
    )
    to_rgb = Gst.parse_bin_from_description(
        "videoconvert ! video/x-raw,format=RGB ! appsink name=sink sync=false", True
    )
    draw = renderer.element()
    for element in (source, draw, to_rgb):
        pipeline.add(element)
    assert source.link(draw) and draw.link(to_rgb)
    pipeline.set_state(Gst.State.PLAYING)
    try:
        sample = to_rgb.get_by_name("sink").emit("pull-sample")
        assert sample is not None, "no frame came out"
        info = GstVideo.VideoInfo.new_from_caps(sample.get_caps())
        ok, mapinfo = sample.get_buffer().map(Gst.MapFlags.READ)
        assert ok
        rows = np.frombuffer(bytes(mapinfo.data), np.uint8)[: info.stride[0] * info.height]
        sample.get_buffer().unmap(mapinfo)
    finally:
        pipeline.set_state(Gst.State.NULL)
    return rows.reshape(info.height, info.stride[0])[:, : info.width * 3].reshape(
        info.height, info.width, 3
    )


@pytest.mark.parametrize(
    "caps",
    [
        "width=1280,height=720,colorimetry=bt709",  # HD, as most cameras tag it
        "width=1280,height=720",  # HD untagged: GStreamer takes it for BT.709
        "width=1280,height=720,colorimetry=1:3:5:1",  # BT.709 at full range (0-255)
        "width=1280,height=720,colorimetry=bt2020",
        "width=640,height=480",  # SD: BT.601, as everything was drawn before
    ],
)
def test_direct_drawing_converts_colours_with_the_frames_own_matrix(caps: str) -> None:
    mask_rgb, box_rgb = (255, 0, 255), (0, 200, 255)
    settings = load_settings(
        **{
            "cameras": [{"privacy": {"masks": [[[0, 0.6], [0.35, 0.6], [0.35, 1], [0, 1]]],
                                     "colour": list(mask_rgb)}}],
            "overlay.colours": {"mask": list(box_rgb)},
            "overlay.line_width": 12,
        }
    )  # fmt: skip
    full = f"video/x-raw,format=I420,framerate=30/1,{caps}"
    video = VideoFormat()
    video.set_caps(Gst.Caps.from_string(full).get_structure(0))
    assert video.size is not None
    w, h = video.size
    box = (0.5 * w, 0.3 * h, 0.9 * w, 0.9 * h)
    renderer = DirectRenderer(settings, settings.cameras[0], _OneTrack(box), video)  # type: ignore[arg-type]
    rgb = _drawn_rgb(renderer, full).astype(np.int64)
    # Inside the mask, clear of its edges (chroma is shared by 2x2 pixels, and upsampled).
    mask = rgb[int(0.6 * h) + 4 : h - 4, 4 : int(0.35 * w) - 4].reshape(-1, 3)
    assert np.abs(mask - mask_rgb).max() <= 3, f"mask {mask.min(axis=0)}..{mask.max(axis=0)}"
    # The middle of the box's right side (12 px wide; its label is on the top one).
    side = rgb[int(0.5 * h) : int(0.7 * h), int(0.9 * w) - 8 : int(0.9 * w) - 4].reshape(-1, 3)
    # videoconvert's own 8-bit arithmetic takes this colour 4 levels off (as drawn before
    # on SD frames too); BT.601 into BT.709 frames was 20 off.
    assert np.abs(side - box_rgb).max() <= 5, f"box {side.min(axis=0)}..{side.max(axis=0)}"


def test_direct_drawing_makes_its_colours_again_when_the_matrix_changes() -> None:
    settings = load_settings(**{"overlay.colours": {"mask": [255, 0, 255]}})
    renderer = DirectRenderer(settings, settings.cameras[0], None, None)  # type: ignore[arg-type]
    box = DrawBox(100, 80, 199, 159, (255, 0, 255), "7 mask")
    lw = settings.overlay.line_width
    label_h = settings.overlay.font_size + 4
    for caps, magenta_y in (("", 106), (",colorimetry=bt709", 78), ("", 106)):
        buf, info = _i420_buffer(320, 240)
        renderer.set_info(
            GstVideo.VideoInfo.new_from_caps(
                Gst.Caps.from_string(f"video/x-raw,format=I420,width=320,height=240{caps}")
            )
        )
        with MappedFrame(buf, info, Gst.MapFlags.READ | Gst.MapFlags.WRITE) as frame:
            renderer._draw_list(frame, DrawList((box,), ()))
        y, _chroma = _planes(buf, 320, 240)
        assert (y[80 : 80 + lw, 100:200] == magenta_y).all()  # the outline
        label = y[80 - label_h : 80, 100:160]
        assert (label == magenta_y).any() and not ({106, 78} - {magenta_y} & set(label.flat))
    # Each matrix change made the label again (3 misses), not taken from the cache.
    assert renderer.label_cache.misses == 3
    assert BT709.yuv((255, 0, 255))[0] == 78


def test_direct_drawing_never_reaches_the_detectors_frames(tmp_path: Path) -> None:
    """The drawing writes into a copy of the frame the detector's branch also holds."""

    class MagentaSeer(SyntheticDetector):
        def __init__(self) -> None:
            super().__init__(20, (640, 352))
            self.magenta: list[int] = []

        def detect(self, frame: npt.NDArray[np.uint8]) -> Detections:
            hits = (frame[..., 0] > 200) & (frame[..., 1] < 80) & (frame[..., 2] > 200)
            self.magenta.append(int(hits.sum()))
            return super().detect(frame)

    seer = MagentaSeer()
    settings = _offline(**{"overlay.colours": {"mask": [255, 0, 255], "no_mask": [255, 0, 255],
                                              "undecided": [255, 0, 255]}})  # fmt: skip
    out = tmp_path / "o.mp4"
    with Pipeline(settings, mode="offline", rtp=False, out_file=out, detector=seer) as p:
        p.start()
        p.run(timeout=120)
    assert len(seer.magenta) == 21
    assert max(seer.magenta) == 0


def test_a_burst_of_new_labels_is_spread_over_frames() -> None:
    settings = load_settings()
    renderer = DirectRenderer(settings, settings.cameras[0], None, None)  # type: ignore[arg-type]
    boxes = tuple(
        DrawBox(10 + 110 * k, 40, 50 + 110 * k, 90, (0, 200, 0), f"{k} mask") for k in range(10)
    )
    made = []
    for _ in range(4):
        buf, info = _i420_buffer(1120, 120)
        with MappedFrame(buf, info, Gst.MapFlags.READ | Gst.MapFlags.WRITE) as frame:
            renderer._draw_list(frame, DrawList(boxes, ()))
        made.append(renderer.label_cache.misses)
        y, _chroma = _planes(buf, 1120, 120)
        label_h = settings.overlay.font_size + 4
        with_label = sum(
            bool((y[40 - label_h : 40, box.x1 : box.x1 + 20] == 16).any()) for box in boxes
        )
        assert with_label == min(10, made[-1])  # each label drawn once it is made
        assert (y[40:43, 10:50] != 100).all()  # every box's outline, label or not
    assert made == [4, 8, 10, 10]


class _FollowingDetector(_CountingDetector):
    """A real detector that records the settled tracks it was told to follow."""

    def __init__(self) -> None:
        super().__init__()
        self.followed: list[object] = []

    def follow(self, settled: object) -> None:
        self.followed.append(settled)


@pytest.mark.parametrize(
    ("mode", "profile", "follows"),
    [("live", "mask", True), ("offline", "mask", False), ("live", "people", False)],
)
def test_live_mask_pipeline_lets_its_detectors_skip_settled_tracks(
    mode: str, profile: str, follows: bool
) -> None:
    # Live, the mask detector skips the faces of tracks whose vote is settled; offline it
    # must not (the output would depend on timing), nor in a profile that does not classify.
    detectors = [_FollowingDetector(), _FollowingDetector()]
    settings = _offline(**{"vision.profile": profile})
    with Pipeline(settings, mode=mode, rtp=False, detectors=detectors):  # type: ignore[arg-type]
        pass
    for d in detectors:
        assert len(d.followed) == int(follows)
    if follows:
        assert detectors[0].followed[0] is detectors[1].followed[0]


# -- what a broken model gives ----------------------------------------------------------------


def test_only_usable_boxes_are_kept() -> None:
    xyxy = np.array(
        [[1, 2, 3, 4], [np.nan, 2, 3, 4], [1, 2, np.inf, 4], [5, 2, 3, 4], [1, 4, 3, 4],
         [1, 2, 3, 4]],
        dtype=np.float32,
    )  # fmt: skip
    conf = np.array([0.9, 0.9, 0.9, 0.9, 0.9, np.nan], dtype=np.float32)
    dets = Detections(xyxy, conf, attribute=np.arange(6, dtype=np.float32))
    usable = dets.usable()
    assert usable.xyxy.tolist() == [[1, 2, 3, 4]] and usable.attribute.tolist() == [0.0]
    good = dets[np.array([0])]
    assert good.usable() is good  # nothing left out: no copy


def test_boxes_a_broken_model_gives_are_left_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(SyntheticDetector):
        """Five boxes a call, three of them unusable: NaN, infinite, inverted."""

        def detect(self, frame: npt.NDArray[np.uint8]) -> Detections:
            dets = super().detect(frame)
            xyxy = dets.xyxy.copy()
            xyxy[0] = np.nan
            xyxy[1, 2] = np.inf
            xyxy[2] = [1e30, 1e30, -1e30, 5]
            return Detections(xyxy, dets.confidence, attribute=dets.attribute)

    settings = load_settings(**{"vision.detect_fps": 10, "vision.profile": "people"})
    events = tmp_path / "events.jsonl"
    with caplog.at_level(logging.WARNING):
        process_file(
            settings, MEDIA / "motion_720p30_4s.mp4", tmp_path / "out.mp4", progress=False,
            detector=Broken(5), events=events,
        )  # fmt: skip

    def no_constant(name: str) -> None:
        raise AssertionError(f"{name} in the events: not JSON")

    lines = events.read_text().splitlines()
    frames = [json.loads(line, parse_constant=no_constant) for line in lines]
    assert len(frames) > 100
    assert max(len(f["tracks"]) for f in frames) == 2  # the two usable boxes, tracked
    messages = [r.getMessage() for r in caplog.records]
    assert sum("NaN, infinite or empty" in m for m in messages) == 1
    assert not any("drawing failed" in m for m in messages)
