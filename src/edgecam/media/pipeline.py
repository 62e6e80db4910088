"""The inference pipeline.

source -> decode -> tee -> (detector appsink | overlay -> H.264 -> RTP and/or MP4).

The pipeline description is built in one function from config (:func:`describe`); the
:class:`Pipeline` class owns its life (start, run, stop) and the two places Python runs:

* detector threads pull model-sized RGB frames from an appsink and run the detector (one
  thread live; ``vision.offline_workers`` offline, results matched to frames by timestamp);
* the overlay callback, once per video frame, steps the tracker, publishes a
  :class:`~edgecam.vision.analytics.FrameMeta` and returns what to draw.

Offline (``mode="offline"``) the detector runs on exactly ``detect_fps`` frames a second of
video and the overlay waits for those results, so the output depends on the input only. Live
(``mode="live"``) the detector takes the newest frame whenever it is free, through a leaky
queue, and the video never waits for it; its boxes are applied when the video reaches the
frame they were found on.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edgecam.config import CameraConfig, EncoderConfig, Settings, redact_url
from edgecam.errors import PipelineError, SourceError
from edgecam.media.gst import GLib, Gst, GstVideo, init, require_elements
from edgecam.media.probe import probe_video
from edgecam.vision.analytics import Analytics, FrameMeta, MetaBus
from edgecam.vision.detections import Detections, Detector
from edgecam.vision.drawing import (
    DrawList,
    DrawText,
    Rendered,
    build_draw_list,
    draw_on_context,
    paint_on_context,
    region_label_positions,
    render_box,
    render_masks,
    render_regions,
    render_text,
)
from edgecam.vision.privacy import face_patch, fill_patch

__all__ = ["DetectionSchedule", "Mode", "Pipeline", "PipelineStats", "describe"]

log = logging.getLogger(__name__)

Mode = Literal["offline", "live"]


# Encoder element per config name: (factory, properties). Keyframes are forced by time from
# a pad probe; the encoders' own interval is only a long backstop. No access unit
# delimiters: rtph264pay sends one as an RTP packet of its own with the frame's timestamp,
# and RTSP clients that copy the stream (ffmpeg -c copy) take it for a second frame.
_ENCODERS: dict[str, tuple[str, str]] = {
    "x264": (
        "x264enc",
        "tune=zerolatency speed-preset={preset} bitrate={kbps} key-int-max=600 aud=false",
    ),
    "openh264": ("openh264enc", "bitrate={bps} complexity=low gop-size=600"),
    "nvh264": ("nvh264enc", "bitrate={kbps} preset=low-latency-hq zerolatency=true gop-size=600"),
    "vaapih264": ("vaapih264enc", "bitrate={kbps} keyframe-period=600"),
}
# The profile every browser decodes, in MSE and in WebRTC (x264 left alone picks High 4:4:4
# Predictive for I420 at ultrafast, which WebRTC peers may refuse): the encoder follows caps.
_H264_PROFILE_CAPS = "video/x-h264,profile=constrained-baseline"
_LOOP_START = "edgecam-loop-start"
_FIT_CAPS = "fit_caps"
_MIN_SIDE = 16  # mp4mux refuses smaller H.264 frames
# A detection further ahead of the video than this is from another timeline (the source
# restarted or looped): applied at once rather than held.
_MAX_LEAD_NS = 2 * Gst.SECOND
_AUTO_ORDER = ("nvh264", "vaapih264", "x264")
_TEXT_CACHE = 64  # rendered text lines kept (counts change a few times a second)


def _source_description(cam: CameraConfig) -> tuple[str, dict[str, object], bool]:
    """(description, properties of the element named ``src``, is_live) for one camera.

    Sources with dynamic pads end in ``decodebin name=dec`` (or leave ``src`` unlinked):
    :class:`Pipeline` links those pads itself, every time they appear, so that a source
    that is restarted after a reconnect is linked again.
    """
    uri = cam.source
    if uri.startswith("rtsp://") or uri.startswith("rtsps://"):
        desc = (
            f"rtspsrc name=src latency={cam.rtsp_latency_ms} protocols={cam.rtsp_transport} "
            "decodebin name=dec"
        )
        return desc, {"location": uri}, True
    if uri.startswith("v4l2://"):
        device = uri[len("v4l2://") :] or "/dev/video0"
        if not Path(device).exists():
            raise SourceError(f"camera {cam.name!r}: V4L2 device {device} does not exist")
        # Ask the camera for the configured mode, raw or MJPEG, whichever it offers.
        mode = f"width={cam.width},height={cam.height},framerate={cam.fps}/1"
        caps = f"video/x-raw,{mode};image/jpeg,{mode}"
        return (
            f'v4l2src name=src ! capsfilter caps="{caps}" ! decodebin name=dec',
            {"device": device},
            True,
        )
    if uri.startswith("test://"):
        desc = (
            "videotestsrc name=src is-live=true pattern=ball ! "
            f"video/x-raw,width={cam.width},height={cam.height},framerate={cam.fps}/1 !"
        )
        return desc, {}, True
    path = Path(uri[len("file://") :] if uri.startswith("file://") else uri)
    if not path.is_file():
        raise SourceError(f"camera {cam.name!r}: video file {path} does not exist")
    return "filesrc name=src ! decodebin name=dec", {"location": str(path)}, False


def _encoder_name(cfg: EncoderConfig) -> str:
    if cfg.element != "auto":
        return cfg.element
    for name in _AUTO_ORDER:
        if Gst.ElementFactory.find(_ENCODERS[name][0]) is not None:
            return name
    return "x264"


def _encoder_description(cfg: EncoderConfig) -> str:
    factory, props = _ENCODERS[_encoder_name(cfg)]
    props = props.format(preset=cfg.preset, kbps=cfg.bitrate_kbps, bps=cfg.bitrate_kbps * 1000)
    return f"{factory} name=enc {props} ! {_H264_PROFILE_CAPS}"


@dataclass(frozen=True)
class _Layout:
    """What :func:`describe` built, for :class:`Pipeline` to wire up."""

    description: str
    source_props: dict[str, object]
    is_live: bool
    elements: tuple[str, ...]


def describe(
    settings: Settings,
    camera_index: int,
    mode: Mode,
    *,
    infer_size: tuple[int, int] | None,
    analytics: bool,
    out_file: Path | None,
    rtp_ports: tuple[int, ...] = (),
) -> _Layout:
    """The GStreamer description of one camera's pipeline, built from config."""
    cam = settings.cameras[camera_index]
    src, src_props, is_live = _source_description(cam)
    sync = "true" if mode == "live" else "false"
    elements = ["videoconvert", "videoscale", "capsfilter", "tee", "queue", "h264parse"]
    # ``fit`` holds every frame to the first frame's size (even, as the encoders need):
    # :class:`Pipeline` pins its caps when the first caps arrive, so a source that changes
    # size mid-stream (joined files, a camera set to another resolution) is scaled to fit,
    # and the encoder, the muxer and the RTP clients never see a caps change.
    parts = [
        f"{src} videoconvert name=conv ! videoscale name=fit add-borders=true ! "
        f"capsfilter name={_FIT_CAPS} caps=video/x-raw,format=I420 ! tee name=t"
    ]

    if infer_size is not None:
        w, h = infer_size
        if mode == "live":
            q = (
                "queue name=infer_q leaky=downstream max-size-buffers=1 max-size-bytes=0 "
                "max-size-time=0"
            )
            sink = "appsink name=infer_sink sync=false async=false max-buffers=1 drop=true"
        else:
            q = "queue name=infer_q max-size-buffers=8 max-size-bytes=0 max-size-time=0"
            sink = "appsink name=infer_sink sync=false async=false max-buffers=4 drop=false"
        parts.append(
            # Letterboxed (the picture keeps its shape for the model); the detections are
            # mapped back through the borders by _from_model_frame.
            f"t. ! {q} ! videoscale ! videoconvert ! "
            f"video/x-raw,format=RGB,width={w},height={h},pixel-aspect-ratio=1/1 ! {sink}"
        )
        elements += ["videoscale", "appsink"]

    overlay = ""
    if analytics:
        # Privacy needs a drawing element even where nothing else is drawn.
        if not settings.overlay.enabled and not cam.privacy.active:
            overlay = "identity name=overlay signal-handoffs=true ! "
        elif settings.overlay.element == "cairooverlay":
            overlay = (
                "videoconvert ! cairooverlay name=overlay ! videoconvert ! "
                "video/x-raw,format=I420 ! "
            )
            elements.append("cairooverlay")
        else:
            overlay = "overlaycomposition name=overlay ! "
            elements.append("overlaycomposition")
    encoder = _encoder_description(settings.encoder)
    elements.append(encoder.split()[0])
    # Offline the queue lets decoding run ahead while a frame waits for its detection; live,
    # frames come in real time and every queued raw frame is only latency and memory.
    video_queue = 8 if mode == "live" else 30
    parts.append(
        f"t. ! queue name=video_q max-size-buffers={video_queue} max-size-bytes=0 "
        "max-size-time=0 ! "
        f"{overlay}{encoder} ! h264parse config-interval=-1 ! tee name=et"
    )
    if rtp_ports:
        clients = ",".join(f"127.0.0.1:{p}" for p in rtp_ports)
        parts.append(
            "et. ! queue ! rtph264pay config-interval=0 pt=96 ! "
            f"multiudpsink name=rtp_sink clients={clients} sync={sync} async=false"
        )
        elements += ["rtph264pay", "multiudpsink"]
    if out_file is not None:
        parts.append(
            f"et. ! queue ! mp4mux faststart=true ! filesink name=file_sink sync={sync} async=false"
        )
        elements += ["mp4mux", "filesink"]
    if not rtp_ports and out_file is None:
        parts.append(f"et. ! queue ! fakesink sync={sync} async=false")
    return _Layout(" ".join(parts), src_props, is_live, tuple(elements))


def _pinned_caps(first: Gst.Structure) -> Gst.Caps:
    """I420 at the first frame's size rounded down to even (what H.264 encoders take), at
    least 16 pixels a side (what mp4mux takes), with its aspect and colours, so that the
    encoder's caps never change."""
    width = max(_MIN_SIDE, first.get_value("width") // 2 * 2)
    height = max(_MIN_SIDE, first.get_value("height") // 2 * 2)
    fields = [f"video/x-raw,format=I420,width={width},height={height}"]
    ok, num, den = first.get_fraction("pixel-aspect-ratio")
    if ok and num > 0 and den > 0:
        fields.append(f"pixel-aspect-ratio={num}/{den}")
    colorimetry = first.get_string("colorimetry")
    if colorimetry:
        fields.append(f"colorimetry={colorimetry}")
    return Gst.Caps.from_string(",".join(fields))


def _from_model_frame(
    source: Gst.Structure, model: GstVideo.VideoInfo
) -> tuple[float, float, float, float]:
    """(sx, sy, dx, dy) taking model-frame pixels to source pixels (x * sx + dx).

    videoscale keeps the picture's shape (add-borders): a frame of another aspect than the
    model's is letterboxed (or pillarboxed) into it, centred, as computed here the way
    videoscale does it (integer pixels, the source's pixel aspect ratio included).
    """
    src_w, src_h = source.get_value("width"), source.get_value("height")
    ok, par_n, par_d = source.get_fraction("pixel-aspect-ratio")
    if not ok or par_n <= 0 or par_d <= 0:
        par_n, par_d = 1, 1
    dar_n, dar_d = src_w * par_n, src_h * par_d  # display aspect ratio of the source
    content_w, content_h = model.width, model.height
    to_h = model.width * dar_d // dar_n
    if to_h <= model.height:
        content_h = to_h
    else:
        content_w = model.height * dar_n // dar_d
    off_x, off_y = (model.width - content_w) // 2, (model.height - content_h) // 2
    sx, sy = src_w / content_w, src_h / content_h
    return sx, sy, -off_x * sx, -off_y * sy


_Probe = Callable[..., Gst.PadProbeReturn]


def _guarded(fallback: Gst.PadProbeReturn) -> Callable[[_Probe], _Probe]:
    """Keep video flowing when a probe's Python raises: PyGObject would return 0 (DROP) and
    every later buffer would vanish without a word. Log it and return ``fallback``."""

    def wrap(probe: _Probe) -> _Probe:
        @functools.wraps(probe)
        def guarded(*args: Any) -> Gst.PadProbeReturn:
            try:
                return probe(*args)
            except Exception:
                log.exception("pad probe %s failed; the frame passes unchanged", probe.__name__)
                return fallback

        return guarded

    return wrap


def _build_detectors(settings: Settings, mode: Mode) -> list[Detector]:
    """Live: one detector on the newest frame. Offline: ``offline_workers`` detectors on
    consecutive detection frames, splitting ``threads`` between them."""
    from edgecam.vision.detectors import build_detector

    vision = settings.vision
    workers = vision.offline_workers if mode == "offline" else 1
    threads = max(1, vision.threads // workers)
    shared = vision.model_copy(update={"threads": threads})
    faces = any(c.privacy.faces != "off" for c in settings.cameras)
    return [build_detector(shared, privacy_faces=faces) for _ in range(workers)]


class DetectionSchedule:
    """Which frames get a detection, as a pure function of their timestamps.

    A frame covering ``[pts - dur/2, pts + dur/2)`` is a detection frame when a multiple of
    ``1/fps`` falls in that interval: exactly ``fps`` detections per second of video
    (every frame when ``fps`` exceeds the frame rate), the same on every run.
    """

    def __init__(self, fps: float) -> None:
        if fps < 0:
            raise ValueError(f"detection fps must be >= 0, got {fps}")
        self.fps = fps

    def due(self, pts_ns: int, dur_ns: int) -> bool:
        if self.fps <= 0:
            return False
        half = dur_ns / 2e9
        t = pts_ns / 1e9
        return math.floor((t + half) * self.fps - 1e-9) > math.floor((t - half) * self.fps - 1e-9)


@dataclass
class PipelineStats:
    frames: int = 0
    detections: int = 0
    detect_seconds: float = 0.0
    restarts: int = 0
    video_end_s: float = 0.0  # stream time where the latest frame ends


class _Results:
    """Detections handed from the detector thread to the overlay callback."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._by_pts: dict[int, Detections] = {}
        self._pending: deque[tuple[int, Detections]] = deque(maxlen=64)  # live, by pts
        self._closed = False

    def post(self, pts: int, dets: Detections) -> None:
        with self._cond:
            self._by_pts[pts] = dets
            self._pending.append((pts, dets))
            self._cond.notify_all()

    def wait(self, pts: int, timeout: float) -> Detections | None:
        with self._cond:
            ok = self._cond.wait_for(lambda: pts in self._by_pts or self._closed, timeout)
            return self._by_pts.pop(pts, None) if ok else None

    def take_due(self, pts: int) -> Detections | None:
        """Live: the newest detections, once the video has reached the frame they were made
        on. Queued video runs behind the detector's branch (a file played live fills the
        queue), and boxes applied early would lead the people they belong to."""
        with self._cond:
            self._by_pts.clear()
            due = None
            while self._pending:
                det_pts, dets = self._pending[0]
                if pts < det_pts < pts + _MAX_LEAD_NS:
                    break  # not yet: that frame is still in the queue
                self._pending.popleft()
                due = dets  # of several due, the newest wins
            return due

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def reopen(self) -> None:
        with self._cond:
            self._closed = False
            self._by_pts.clear()
            self._pending.clear()


def _rectangle(
    pixels: bytes,
    x: int,
    y: int,
    width: int,
    height: int,
    image_width: int | None = None,
    image_height: int | None = None,
) -> Any:
    """An overlay rectangle of a premultiplied BGRA image placed at (x, y), scaled to
    ``width`` x ``height`` when the image's own size differs. A rectangle used again on later
    frames keeps the overlay's converted (and scaled) copy of its pixels."""
    buf = Gst.Buffer.new_wrapped(pixels)
    GstVideo.buffer_add_video_meta(
        buf,
        GstVideo.VideoFrameFlags.NONE,
        GstVideo.VideoFormat.BGRA,
        image_width or width,
        image_height or height,
    )
    return GstVideo.VideoOverlayRectangle.new_raw(
        buf, x, y, width, height, GstVideo.VideoOverlayFormatFlags.PREMULTIPLIED_ALPHA
    )


def _compose(composition: Any, rectangles: list[Any]) -> Any:
    """``composition`` (a new one when None) with ``rectangles`` added, in order."""
    for rect in rectangles:
        if composition is None:
            composition = GstVideo.VideoOverlayComposition.new(rect)
        else:
            composition.add_rectangle(rect)
    return composition


class Pipeline:
    """One camera's inference pipeline, with an explicit life: start(), run(), stop()."""

    def __init__(
        self,
        settings: Settings,
        camera: str | None = None,
        *,
        mode: Mode = "live",
        out_file: Path | None = None,
        rtp: bool = True,
        detector: Detector | None = None,
        detectors: Sequence[Detector] | None = None,
        analytics: bool | None = None,
        meta_bus: MetaBus | None = None,
    ) -> None:
        """``detector``: one detector the pipeline owns (closed with it). ``detectors``:
        detectors owned by the caller (shared with other pipelines, say), used instead of
        building any and never closed here. Neither: built from config and owned."""
        if detector is not None and detectors is not None:
            raise ValueError("give either detector or detectors, not both")
        if detectors is not None and not detectors:
            raise ValueError("detectors, when given, must hold at least one detector")
        init()
        self.settings = settings
        self.camera_index, self.camera = settings.camera(camera)
        self.mode: Mode = mode
        self.meta_bus = meta_bus or MetaBus()
        self.stats = PipelineStats()
        self.counts: dict[str, int] = {}
        detect_fps = settings.vision.detect_fps
        self._detectors: list[Detector] = []
        self._owns_detectors = detectors is None
        if detect_fps > 0:
            if detectors is not None:
                self._detectors = list(detectors)
            elif detector is not None:
                self._detectors = [detector]
            else:
                self._detectors = _build_detectors(settings, mode)
        self._detector = self._detectors[0] if self._detectors else None
        self._analytics_on = (
            bool(analytics if analytics is not None else self._detector)
            or self.camera.privacy.active
        )
        self._schedule = DetectionSchedule(detect_fps) if mode == "offline" else None
        self._min_interval = 1.0 / detect_fps if detect_fps > 0 else 0.0
        self._results = _Results()
        self._analytics = Analytics(settings, self.camera.name)
        self._frame_size: tuple[int, int] | None = None
        self._frame_dur = int(1e9 / 30)  # until the caps tell
        self._text_cache: dict[tuple[str, tuple[int, int, int]], Rendered] = {}
        self._text_rects: dict[tuple[str, tuple[int, int, int], int, int], Any] = {}
        self._static_rects: dict[tuple[int, int], tuple[list[Any], list[Any]]] = {}
        # Per frame size: the privacy masks and the zones and lines, drawn once.
        self._static: dict[tuple[int, int], tuple[list[Rendered], list[Rendered]]] = {}
        self._label_positions: dict[str, tuple[int, int]] = {}
        self._video_info: tuple[Any, Any] | None = None  # (caps, GstVideo.VideoInfo)
        self._error: str | None = None
        self._stopping = threading.Event()
        self._detector_threads: list[threading.Thread] = []
        self._workers_left = 0
        self._workers_lock = threading.Lock()
        self._last_frame_time = 0.0
        self._stop_event = threading.Event()
        self._stop_requested_at: float | None = None
        self._stop_timeout = 10.0
        self._outage = False

        infer_size = self._detector.input_size if self._detector else None
        layout = describe(
            settings,
            self.camera_index,
            mode,
            infer_size=infer_size,
            analytics=self._analytics_on,
            out_file=out_file,
            rtp_ports=settings.rtp_ports(self.camera_index) if rtp else (),
        )
        require_elements(layout.elements)
        if not layout.is_live:  # a file: say what is wrong with it before building anything
            probe_video(Path(str(layout.source_props["location"])))
        self.is_live_source = layout.is_live
        self._loops = mode == "live" and self.camera.loop and not layout.is_live
        self._layout = layout
        log.debug("pipeline: %s", layout.description)
        try:
            self._pipeline: Gst.Pipeline = Gst.parse_launch(layout.description)
        except GLib.Error as exc:
            raise PipelineError(f"cannot build the pipeline: {exc.message}") from exc
        src = self._pipeline.get_by_name("src")
        for key, value in layout.source_props.items():
            src.set_property(key, value)
        if out_file is not None:
            out_file.parent.mkdir(parents=True, exist_ok=True)
            self._pipeline.get_by_name("file_sink").set_property("location", str(out_file))
        self._wire()

    # -- wiring -------------------------------------------------------------------------

    def _wire(self) -> None:
        dec = self._pipeline.get_by_name("dec")
        if dec is not None:
            conv_sink = self._pipeline.get_by_name("conv").get_static_pad("sink")
            dec.connect("pad-added", self._on_decoded_pad, conv_sink)
            src = self._pipeline.get_by_name("src")
            if src.get_factory().get_name() == "rtspsrc":
                src.connect("pad-added", self._on_rtsp_pad, dec.get_static_pad("sink"))
        enc = self._pipeline.get_by_name("enc")
        self._next_keyframe: int | None = None
        self._keyframes = 0
        enc.get_static_pad("sink").add_probe(Gst.PadProbeType.BUFFER, self._on_enc_buffer)
        overlay = self._pipeline.get_by_name("overlay")
        if overlay is not None:
            factory = overlay.get_factory().get_name()
            handlers: dict[str, tuple[str, Callable[..., Any]]] = {
                "overlaycomposition": ("draw", self._on_draw_composition),
                "cairooverlay": ("draw", self._on_draw_cairo),
                "identity": ("handoff", self._on_handoff),
            }
            signal, handler = handlers[factory]
            overlay.connect(signal, handler)
        if self._schedule is not None and self._detector is not None:
            q = self._pipeline.get_by_name("infer_q")
            q.get_static_pad("sink").add_probe(Gst.PadProbeType.BUFFER, self._on_infer_buffer)
        if self._loops:
            self._loop_armed = False
            conv_sink = self._pipeline.get_by_name("conv").get_static_pad("sink")
            conv_sink.add_probe(
                Gst.PadProbeType.BLOCK_DOWNSTREAM | Gst.PadProbeType.BUFFER, self._on_loop_block
            )
        self._pinned_caps: Gst.Caps | None = None
        self._source_size: tuple[int, int] | None = None
        conv_sink = self._pipeline.get_by_name("conv").get_static_pad("sink")
        conv_sink.add_probe(Gst.PadProbeType.EVENT_DOWNSTREAM, self._on_source_caps)
        video_q = self._pipeline.get_by_name("video_q")
        video_q.get_static_pad("src").add_probe(Gst.PadProbeType.EVENT_DOWNSTREAM, self._on_caps)

    @staticmethod
    def _on_decoded_pad(_dec: Gst.Element, pad: Gst.Pad, sink: Gst.Pad) -> None:
        caps = pad.get_current_caps() or pad.query_caps(None)
        if not caps.get_structure(0).get_name().startswith("video/"):
            return  # audio and the like: left unlinked, the demuxer carries on
        if sink.is_linked():
            # A second video stream in the file: the first one is the video. (After a
            # restart, decodebin's old pads are gone, and the sink unlinked, before new
            # ones come.)
            log.info("ignoring another video stream (%s)", pad.get_name())
            return
        if pad.link(sink) != Gst.PadLinkReturn.OK:
            log.error("cannot link decoded video pad %s", pad.get_name())

    @staticmethod
    def _on_rtsp_pad(_src: Gst.Element, pad: Gst.Pad, sink: Gst.Pad) -> None:
        caps = pad.get_current_caps() or pad.query_caps(None)
        if caps.get_structure(0).get_string("media") != "video" or sink.is_linked():
            return
        if pad.link(sink) != Gst.PadLinkReturn.OK:
            log.error("cannot link RTSP pad %s", pad.get_name())

    @_guarded(Gst.PadProbeReturn.OK)
    def _on_enc_buffer(self, pad: Gst.Pad, info: Gst.PadProbeInfo) -> Gst.PadProbeReturn:
        # Every frame passes here, analytics or not: count it, feed the stall watchdog.
        self.stats.frames += 1
        self._last_frame_time = time.monotonic()
        self._outage = False
        # Keyframes by time, whatever the frame rate: encoder properties cannot change once
        # playing, and the rate of an RTSP or V4L2 source is known only then.
        buf = info.get_buffer()
        pts = buf.pts
        if pts == Gst.CLOCK_TIME_NONE:
            return Gst.PadProbeReturn.OK
        self.stats.video_end_s = (pts + self._duration(buf.duration)) / Gst.SECOND
        interval = int(self.settings.encoder.keyframe_s * Gst.SECOND)
        nxt = self._next_keyframe
        if nxt is None or pts >= nxt or pts < nxt - 2 * interval:
            self._next_keyframe = pts + interval - interval // 20
            self._keyframes += 1
            pad.send_event(
                GstVideo.video_event_new_downstream_force_key_unit(
                    Gst.CLOCK_TIME_NONE,
                    Gst.CLOCK_TIME_NONE,
                    Gst.CLOCK_TIME_NONE,
                    False,  # h264parse puts SPS/PPS before every keyframe itself
                    self._keyframes,
                )
            )
        return Gst.PadProbeReturn.OK

    @_guarded(Gst.PadProbeReturn.REMOVE)
    def _on_loop_block(self, pad: Gst.Pad, _info: Gst.PadProbeInfo) -> Gst.PadProbeReturn:
        # A file that loops must be in a segment seek before its first frame goes on, or
        # that frame and its followers would play twice. Hold the first frame here until
        # the bus thread has made the (flushing) segment seek, which releases it.
        if self._loop_armed:
            return Gst.PadProbeReturn.REMOVE
        pad.get_parent_element().post_message(
            Gst.Message.new_application(
                pad.get_parent_element(), Gst.Structure.new_empty(_LOOP_START)
            )
        )
        return Gst.PadProbeReturn.OK

    @_guarded(Gst.PadProbeReturn.OK)
    def _on_source_caps(self, _pad: Gst.Pad, info: Gst.PadProbeInfo) -> Gst.PadProbeReturn:
        # The first decoded caps fix the size of everything downstream; later ones (a size
        # change mid-stream, a camera back at another resolution) are scaled to it.
        event = info.get_event()
        if event.type != Gst.EventType.CAPS:
            return Gst.PadProbeReturn.OK
        s = event.parse_caps().get_structure(0)
        size = (s.get_value("width"), s.get_value("height"))
        if self._pinned_caps is None:
            self._pinned_caps = _pinned_caps(s)
            self._source_size = size
            self._pipeline.get_by_name(_FIT_CAPS).set_property("caps", self._pinned_caps)
            log.debug("camera %s: video pinned to %s", self.camera.name, self._pinned_caps)
        elif size != self._source_size:
            self._source_size = size
            log.info(
                "camera %s: source caps changed to %dx%d; scaled to %s",
                self.camera.name,
                s.get_value("width"),
                s.get_value("height"),
                self._pinned_caps.to_string(),
            )
        return Gst.PadProbeReturn.OK

    @_guarded(Gst.PadProbeReturn.OK)
    def _on_caps(self, _pad: Gst.Pad, info: Gst.PadProbeInfo) -> Gst.PadProbeReturn:
        event = info.get_event()
        if event.type == Gst.EventType.CAPS:
            s = event.parse_caps().get_structure(0)
            self._frame_size = (s.get_value("width"), s.get_value("height"))
            ok, num, den = s.get_fraction("framerate")
            self._frame_dur = int(1e9 * den / num) if ok and num > 0 else int(1e9 / 30)
        return Gst.PadProbeReturn.OK

    @_guarded(Gst.PadProbeReturn.OK)
    def _on_infer_buffer(self, _pad: Gst.Pad, info: Gst.PadProbeInfo) -> Gst.PadProbeReturn:
        buf = info.get_buffer()
        assert self._schedule is not None
        if self._schedule.due(buf.pts, self._duration(buf.duration)):
            return Gst.PadProbeReturn.OK
        return Gst.PadProbeReturn.DROP

    def _duration(self, dur: int) -> int:
        if dur == Gst.CLOCK_TIME_NONE or dur <= 0:
            return self._frame_dur
        return int(dur)

    # -- per-frame work (streaming threads) -----------------------------------------------

    def _frame_step(self, pts: int, dur: int) -> FrameMeta:
        """The Python work of one video frame: detections in, tracks and counts out."""
        dets: Detections | None = None
        if self._detector is not None:
            if self._schedule is not None:
                if self._schedule.due(pts, self._duration(dur)):
                    dets = self._results.wait(pts, timeout=120.0)
                    if dets is None and not self._stopping.is_set():
                        self._fail("the detector produced no result for a frame in time")
            else:
                dets = self._results.take_due(pts)
        seconds = pts / 1e9 if pts != Gst.CLOCK_TIME_NONE else 0.0
        meta = self._analytics.step(seconds, dets, self._frame_size)
        self.counts = meta.counts
        if self.meta_bus.active:
            self.meta_bus.publish(meta)
        return meta

    def _static_layers(self, size: tuple[int, int]) -> tuple[list[Rendered], list[Rendered]]:
        """(privacy masks, zones and lines) for this frame size, drawn once."""
        layers = self._static.get(size)
        if layers is None:
            cam = self.camera
            layers = (
                render_masks(cam.privacy, size),
                render_regions(cam, self.settings.overlay, size),
            )
            self._static = {size: layers}
            self._label_positions = region_label_positions(cam, size)
        return layers

    def _draw_list(self, meta: FrameMeta) -> DrawList | None:
        if self._frame_size is None:
            return None
        self._static_layers(self._frame_size)
        draws = build_draw_list(
            meta, self.settings.overlay, *self._frame_size, self._label_positions
        )
        return draws if draws.boxes or draws.texts else None

    def _text(self, text: DrawText) -> Rendered:
        key = (text.text, text.colour)
        cached = self._text_cache.get(key)
        if cached is None:
            if len(self._text_cache) >= _TEXT_CACHE:
                self._text_cache.clear()
            cached = self._text_cache[key] = render_text(text, self.settings.overlay)
        pixels, _x, _y, w, h = cached
        return pixels, text.x, text.y, w, h

    def _hide_faces(self, sample: Gst.Sample, meta: FrameMeta, composition: Any) -> Any:
        """Add to ``composition`` the images that hide this frame's face regions: made from
        those regions' pixels only (a few block means, or a fill), scaled up by the overlay."""
        privacy = self.camera.privacy
        caps = sample.get_caps()
        if self._video_info is None or self._video_info[0] != caps:
            self._video_info = (caps, GstVideo.VideoInfo.new_from_caps(caps))
        info = self._video_info[1]
        buf = sample.get_buffer()
        # A decoder's buffers may be laid out with padding: their video meta says how.
        layout = GstVideo.buffer_get_video_meta(buf) or info
        ok, mapinfo = buf.map(Gst.MapFlags.READ)
        if not ok:
            raise PipelineError("cannot read a video frame to hide its faces")
        try:
            w, h = info.width, info.height
            cw, ch = (w + 1) // 2, (h + 1) // 2
            planes: list[np.ndarray] = [
                np.ndarray(
                    shape,
                    dtype=np.uint8,
                    buffer=mapinfo.data,
                    offset=layout.offset[i],
                    strides=(layout.stride[i], 1),
                )
                for i, shape in enumerate(((h, w), (ch, cw), (ch, cw)))
            ]
            y, u, v = planes
            for face in meta.hidden:
                image = face_patch((y, u, v), face, privacy.faces, privacy.blocks, privacy.colour)
                x1, y1, x2, y2 = face
                ih, iw = image.shape[:2]
                patch = _rectangle(image.tobytes(), x1, y1, x2 - x1, y2 - y1, iw, ih)
                composition = _compose(composition, [patch])
        finally:
            buf.unmap(mapinfo)
        return composition

    def _static_rectangles(self, size: tuple[int, int]) -> tuple[list[Any], list[Any]]:
        """(privacy masks, zones and lines) as overlay rectangles, made once per size."""
        rects = self._static_rects.get(size)
        if rects is None:
            masks, regions = self._static_layers(size)
            rects = ([_rectangle(*m) for m in masks], [_rectangle(*r) for r in regions])
            self._static_rects = {size: rects}
        return rects

    def _text_rectangle(self, text: DrawText) -> Any:
        key = (text.text, text.colour, text.x, text.y)
        rect = self._text_rects.get(key)
        if rect is None:
            if len(self._text_rects) >= _TEXT_CACHE:
                self._text_rects.clear()
            rect = self._text_rects[key] = _rectangle(*self._text(text))
        return rect

    def _on_draw_composition(self, _overlay: Gst.Element, sample: Gst.Sample) -> Any:
        buf = sample.get_buffer()
        meta = self._frame_step(buf.pts, buf.duration)
        if self._frame_size is None:
            return None
        masks, regions = self._static_rectangles(self._frame_size)
        composition = None
        # Blended in this order: faces hidden first (their boxes are drawn over them), the
        # drawings, then the privacy masks over everything (nothing drawn shows inside one).
        if meta.blind:
            fill = fill_patch(self.camera.privacy.colour).tobytes()
            composition = _compose(None, [_rectangle(fill, 0, 0, *self._frame_size, 2, 2)])
        elif meta.hidden:
            composition = self._hide_faces(sample, meta, composition)
        rects = list(regions)
        draws = self._draw_list(meta)
        if draws is not None:
            cfg = self.settings.overlay
            rects += [_rectangle(*render_box(b, cfg, self._frame_size[0])) for b in draws.boxes]
            rects += [self._text_rectangle(t) for t in draws.texts]
        return _compose(composition, [*rects, *masks])

    def _on_draw_cairo(self, _overlay: Gst.Element, ctx: Any, pts: int, dur: int) -> None:
        meta = self._frame_step(pts, dur)
        if self._frame_size is None:
            return
        masks, regions = self._static_layers(self._frame_size)
        privacy = self.camera.privacy
        hidden = meta.hidden if privacy.faces == "fill" else ()
        if meta.blind:
            hidden = ((0, 0, *self._frame_size),)
        paint_on_context(ctx, hidden, privacy.colour, regions)
        draws = self._draw_list(meta)
        if draws is not None:
            draw_on_context(ctx, draws, self.settings.overlay)
        paint_on_context(ctx, (), privacy.colour, masks)

    def _on_handoff(self, _identity: Gst.Element, buf: Gst.Buffer) -> None:
        self._frame_step(buf.pts, buf.duration)

    # -- detector thread --------------------------------------------------------------------

    def _detector_loop(self, detector: Detector) -> None:
        try:
            self._detect_samples(detector)
        finally:
            with self._workers_lock:
                self._workers_left -= 1
                last = self._workers_left == 0
            if last:  # the others may still be finishing frames the video waits for
                self._results.close()

    def _detect_samples(self, detector: Detector) -> None:
        appsink = self._pipeline.get_by_name("infer_sink")
        tee_pad = self._pipeline.get_by_name("t").get_static_pad("sink")
        while not self._stopping.is_set():
            sample = appsink.try_pull_sample(100 * Gst.MSECOND)
            if sample is None:
                if appsink.is_eos() and self.mode == "offline":
                    break
                continue
            buf = sample.get_buffer()
            info = GstVideo.VideoInfo.new_from_caps(sample.get_caps())
            ok, mapinfo = buf.map(Gst.MapFlags.READ)
            if not ok:
                continue
            t0 = time.perf_counter()
            started = time.monotonic()
            try:
                frame: np.ndarray = np.ndarray(
                    (info.height, info.width, 3),
                    dtype=np.uint8,
                    buffer=mapinfo.data,
                    strides=(info.stride[0], 3, 1),
                )
                dets = detector.detect(frame)
            except Exception as exc:  # a broken model must stop the run, loudly
                log.exception("detector failed")
                self._fail(f"detector failed: {exc}")
                break
            finally:
                buf.unmap(mapinfo)
            with self._workers_lock:
                self.stats.detect_seconds += time.perf_counter() - t0
                self.stats.detections += 1
            caps = tee_pad.get_current_caps()
            if caps is not None:
                dets = dets.mapped(*_from_model_frame(caps.get_structure(0), info))
            self._results.post(buf.pts, dets)
            if self.mode == "live" and self._min_interval:
                delay = started + self._min_interval - time.monotonic()
                if delay > 0 and self._stopping.wait(delay):
                    break

    # -- life -------------------------------------------------------------------------------

    def _fail(self, message: str) -> None:
        if self._error is not None:
            return  # the first failure is the cause; the others follow from it
        self._error = message
        self._results.close()
        err = GLib.Error.new_literal(Gst.CoreError.quark(), message, Gst.CoreError.FAILED)
        self._pipeline.post_message(Gst.Message.new_error(self._pipeline, err, message))

    def start(self) -> None:
        """Start playing; returns at once."""
        self._stopping.clear()
        self._stop_event.clear()
        self._stop_requested_at = None
        # Until a live camera delivers its first frame there is nothing to drain on stop.
        self._outage = self.mode == "live" and self.is_live_source
        self._results.reopen()
        ret = self._pipeline.set_state(Gst.State.PLAYING)
        if ret == Gst.StateChangeReturn.FAILURE:
            err = self._pop_error(timeout_ns=0)
            self._teardown()
            raise SourceError(
                f"camera {self.camera.name!r}: cannot start {redact_url(self.camera.source)!r}"
                + (f": {err}" if err else "")
            )
        # After PLAYING was asked for: an appsink that has not started reports EOS.
        if not any(t.is_alive() for t in self._detector_threads):
            self._workers_left = len(self._detectors)
            self._detector_threads = [
                threading.Thread(
                    target=self._detector_loop,
                    args=(d,),
                    name=f"detector-{self.camera.name}-{i}",
                    daemon=True,
                )
                for i, d in enumerate(self._detectors)
            ]
            for t in self._detector_threads:
                t.start()

    def _pop_error(self, timeout_ns: int) -> str | None:
        msg = self._pipeline.get_bus().timed_pop_filtered(timeout_ns, Gst.MessageType.ERROR)
        if msg is None:
            return None
        err, _debug = msg.parse_error()
        return f"{err.message} ({msg.src.get_name()})"

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the pipeline to finish: EOS through every element, so files are complete.

        Safe from any thread or a signal handler; :meth:`run` returns once drained.
        """
        self._stop_timeout = timeout
        self._stop_requested_at = time.monotonic()
        self._stop_event.set()
        # EOS enters right after the source: it reaches every sink whatever the source is
        # doing (a demuxer pulling in a segment loop, an RTSP source waiting on the network).
        self._pipeline.get_by_name("conv").get_static_pad("sink").send_event(Gst.Event.new_eos())

    def run(
        self, timeout: float | None = None, on_tick: Callable[[Pipeline], None] | None = None
    ) -> None:
        """Run until end of stream, :meth:`stop` or ``timeout`` seconds.

        A live source that fails, ends or stalls is restarted with exponential backoff; a
        file that ends stops the run (or starts again when the camera loops).
        """
        bus = self._pipeline.get_bus()
        deadline = time.monotonic() + timeout if timeout else None
        backoff = self.camera.reconnect_min_s
        self._last_frame_time = time.monotonic()
        self._restart_frames = 0
        try:
            while True:
                msg = bus.timed_pop_filtered(
                    100 * Gst.MSECOND,
                    Gst.MessageType.ERROR
                    | Gst.MessageType.EOS
                    | Gst.MessageType.WARNING
                    | Gst.MessageType.SEGMENT_DONE
                    | Gst.MessageType.APPLICATION,
                )
                now = time.monotonic()
                if on_tick is not None:
                    on_tick(self)
                if deadline is not None and now > deadline and self._stop_requested_at is None:
                    self.stop()
                stopping = self._stop_requested_at is not None
                if stopping and self._outage:
                    return  # nothing flows during a camera outage: nothing to drain
                if stopping and now - (self._stop_requested_at or now) > self._stop_timeout:
                    log.warning(
                        "pipeline did not drain within %.0f s; forcing stop", self._stop_timeout
                    )
                    return
                if self.stats.frames - self._restart_frames > 100:
                    backoff = self.camera.reconnect_min_s
                reconnectable = self.mode == "live" and self.is_live_source and not stopping
                if msg is None:
                    if reconnectable and now - self._last_frame_time > self.camera.stall_timeout_s:
                        log.warning(
                            "camera %s: no frame for %.0f s; reconnecting",
                            self.camera.name,
                            self.camera.stall_timeout_s,
                        )
                        backoff = self._restart(backoff)
                    continue
                if msg.type == Gst.MessageType.APPLICATION:
                    if msg.get_structure().get_name() == _LOOP_START:
                        self._loop_armed = True  # the probe lets data through from now on
                        self._loop_seek(flush=True)
                    continue
                if msg.type == Gst.MessageType.SEGMENT_DONE:
                    self._loop_seek(flush=False)
                    continue
                if msg.type == Gst.MessageType.WARNING:
                    warn, _ = msg.parse_warning()
                    log.warning("%s: %s", msg.src.get_name(), warn.message)
                    continue
                if msg.type == Gst.MessageType.EOS:
                    if stopping:
                        return
                    if reconnectable:
                        log.warning("camera %s: stream ended; reconnecting", self.camera.name)
                        backoff = self._restart(backoff)
                        continue
                    return
                err, debug = msg.parse_error()
                text = f"{err.message} ({msg.src.get_name()})"
                log.debug("pipeline error debug: %s", debug)
                if stopping and self.mode == "live":
                    log.info("camera %s: error while stopping: %s", self.camera.name, text)
                    return
                if reconnectable and self._error is None:
                    log.warning(
                        "camera %s: %s; reconnecting in %.1f s", self.camera.name, text, backoff
                    )
                    backoff = self._restart(backoff)
                    continue
                raise PipelineError(self._error or f"camera {self.camera.name!r}: {text}")
        finally:
            self._teardown()

    def _loop_seek(self, *, flush: bool) -> None:
        # Segment seeks loop a file without EOS and with running time going on, so the
        # RTP timestamps downstream keep increasing across the loop.
        flags = Gst.SeekFlags.SEGMENT | (Gst.SeekFlags.FLUSH if flush else Gst.SeekFlags.NONE)
        ok = self._pipeline.seek(
            1.0, Gst.Format.TIME, flags, Gst.SeekType.SET, 0, Gst.SeekType.NONE, -1
        )
        if not ok:
            log.warning(
                "camera %s: cannot seek %s to loop it",
                self.camera.name,
                redact_url(self.camera.source),
            )

    def _restart(self, backoff: float) -> float:
        """Take the pipeline down, wait ``backoff`` seconds, bring it up; the next backoff."""
        self._pipeline.set_state(Gst.State.NULL)
        self.stats.restarts += 1
        self._restart_frames = self.stats.frames
        self._outage = True
        if self._stop_event.wait(backoff):
            return backoff
        self._pipeline.set_state(Gst.State.PLAYING)
        self._last_frame_time = time.monotonic()
        return min(backoff * 2, self.camera.reconnect_max_s)

    def _teardown(self) -> None:
        self._stopping.set()
        self._results.close()
        self._pipeline.set_state(Gst.State.NULL)
        for t in self._detector_threads:
            t.join(timeout=10)
        self._detector_threads = []
        self.meta_bus.publish(None)

    def close(self) -> None:
        """Release everything (idempotent)."""
        self._teardown()
        if self._owns_detectors:
            for detector in self._detectors:
                detector.close()
        self._detectors = []

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def position(self) -> tuple[float | None, float | None]:
        """(seconds played, seconds in all) of the source, each None while unknown."""
        ok_pos, pos = self._pipeline.query_position(Gst.Format.TIME)
        ok_dur, dur = self._pipeline.query_duration(Gst.Format.TIME)
        return (pos / 1e9 if ok_pos else None, dur / 1e9 if ok_dur and dur > 0 else None)

    @property
    def frame_size(self) -> tuple[int, int] | None:
        return self._frame_size

    @property
    def waiting_for_source(self) -> bool:
        """True while a live source is down and being reconnected (or not up yet)."""
        return self._outage
