"""The inference pipeline of one camera, assembled from its parts.

source -> decode -> tee -> (detector appsink | overlay -> H.264 -> RTP and/or MP4).

* :mod:`edgecam.media.launch` builds the launch description from config, with the media
  backend's (:mod:`edgecam.media.backends`) decode, convert, scale and encode fragments;
* :class:`~edgecam.media.detection.DetectorRunner` runs the detector threads and hands their
  results over by timestamp; :class:`~edgecam.media.detection.FrameAnalysis` turns them into
  tracks once a frame;
* an overlay renderer (:mod:`edgecam.media.overlay`) draws each frame;
* :class:`~edgecam.media.supervisor.SourceSupervisor` runs the bus: end of stream, errors,
  reconnects, stalls, loops.

:class:`Pipeline` builds them, wires the pad probes that keep the video's shape and
keyframes, and owns their life: start(), run(), stop(), close().
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from edgecam.config import Settings, redact_url
from edgecam.errors import PipelineError, SourceError
from edgecam.media.backends import prefer_decoders, resolve_backend
from edgecam.media.detection import (
    DetectionSchedule,
    DetectorRunner,
    FrameAnalysis,
    PipelineStats,
    VideoFormat,
)
from edgecam.media.gst import GLib, Gst, GstVideo, init, require_elements
from edgecam.media.launch import Layout, Mode, Names, describe
from edgecam.media.overlay import DirectRenderer, Renderer, make_renderer
from edgecam.media.probe import probe_video
from edgecam.media.supervisor import SourceSupervisor, guarded
from edgecam.vision.analytics import MetaBus
from edgecam.vision.detections import Detector

__all__ = ["DetectionSchedule", "Mode", "Pipeline", "PipelineStats", "describe"]

log = logging.getLogger(__name__)

_MIN_SIDE = 16  # mp4mux refuses smaller H.264 frames
_KEYFRAME_EARLY = 20  # a forced keyframe may come 1/20 of the interval early
_STOP_TIMEOUT_S = 10.0
# Live: frames are scaled for the detector from this many frame times before it may take one.
_LIVE_INFER_LEAD = 1.5


def _pinned_caps(first: Gst.Structure, feature: str) -> Gst.Caps:
    """I420 at the first frame's size rounded down to even (what H.264 encoders take), at
    least 16 pixels a side (what mp4mux takes), with its aspect and colours, so that the
    encoder's caps never change. ``feature``: the media backend's memory, e.g.
    ``(memory:CUDAMemory)``."""
    width = max(_MIN_SIDE, first.get_value("width") // 2 * 2)
    height = max(_MIN_SIDE, first.get_value("height") // 2 * 2)
    fields = [f"video/x-raw{feature},format=I420,width={width},height={height}"]
    ok, num, den = first.get_fraction("pixel-aspect-ratio")
    if ok and num > 0 and den > 0:
        fields.append(f"pixel-aspect-ratio={num}/{den}")
    colorimetry = first.get_string("colorimetry")
    if colorimetry:
        fields.append(f"colorimetry={colorimetry}")
    return Gst.Caps.from_string(",".join(fields))


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


def _launch(layout: Layout, out_file: Path | None) -> Gst.Pipeline:
    """The pipeline ``layout`` describes, built, its source and file sink set."""
    require_elements(layout.elements)
    if not layout.is_live:  # a file: say what is wrong with it before building anything
        probe_video(Path(str(layout.source_props["location"])))
    prefer_decoders(layout.backend)
    log.debug("pipeline (%s backend): %s", layout.backend.name, layout.description)
    try:
        pipeline: Gst.Pipeline = Gst.parse_launch(layout.description)
    except GLib.Error as exc:
        raise PipelineError(f"cannot build the pipeline: {exc.message}") from exc
    src = pipeline.get_by_name(Names.SRC)
    for key, value in layout.source_props.items():
        src.set_property(key, value)
    if out_file is not None:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        pipeline.get_by_name(Names.FILE_SINK).set_property("location", str(out_file))
    return pipeline


def _replace(pipeline: Gst.Pipeline, name: str, element: Gst.Element) -> None:
    """Put ``element`` where the element called ``name`` is, linked the same way."""
    old = pipeline.get_by_name(name)
    sink, src = old.get_static_pad("sink"), old.get_static_pad("src")
    upstream, downstream = sink.get_peer(), src.get_peer()
    upstream.unlink(sink)
    src.unlink(downstream)
    pipeline.remove(old)
    element.set_name(name)
    pipeline.add(element)
    if (
        upstream.link(element.get_static_pad("sink")) != Gst.PadLinkReturn.OK
        or element.get_static_pad("src").link(downstream) != Gst.PadLinkReturn.OK
    ):
        raise PipelineError(f"cannot link the {name} element into the pipeline")


def _on_decoded_pad(_dec: Gst.Element, pad: Gst.Pad, sink: Gst.Pad) -> None:
    caps = pad.get_current_caps() or pad.query_caps(None)
    if not caps.get_structure(0).get_name().startswith("video/"):
        return  # audio and the like: left unlinked, the demuxer carries on
    if sink.is_linked():
        # A second video stream in the file: the first one is the video. (After a restart,
        # decodebin's old pads are gone, and the sink unlinked, before new ones come.)
        log.info("ignoring another video stream (%s)", pad.get_name())
        return
    if pad.link(sink) != Gst.PadLinkReturn.OK:
        log.error("cannot link decoded video pad %s", pad.get_name())


def _on_rtsp_pad(_src: Gst.Element, pad: Gst.Pad, sink: Gst.Pad) -> None:
    caps = pad.get_current_caps() or pad.query_caps(None)
    if caps.get_structure(0).get_string("media") != "video" or sink.is_linked():
        return
    if pad.link(sink) != Gst.PadLinkReturn.OK:
        log.error("cannot link RTSP pad %s", pad.get_name())


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
        init()
        self.settings = settings
        self.camera_index, self.camera = settings.camera(camera)
        self.mode: Mode = mode
        self.meta_bus = meta_bus or MetaBus()
        self.stats = PipelineStats()
        detect_fps = settings.vision.detect_fps
        self._owned: list[Detector] = []  # closed with the pipeline
        used: list[Detector] = []
        try:  # a backend that cannot run here fails before a model is loaded
            backend = resolve_backend(settings)
        except BaseException:
            if detector is not None:
                detector.close()  # owned from here on, as when the pipeline cannot be built
            raise
        if detect_fps > 0:
            if detectors is not None:
                used = list(detectors)
            else:
                self._owned = (
                    [detector] if detector is not None else _build_detectors(settings, mode)
                )
                used = self._owned
        analytics_on = bool(analytics if analytics is not None else used)
        analytics_on = analytics_on or self.camera.privacy.active
        try:
            layout = describe(
                settings,
                self.camera_index,
                mode,
                infer_size=used[0].input_size if used else None,
                analytics=analytics_on,
                out_file=out_file,
                rtp_ports=settings.rtp_ports(self.camera_index) if rtp else (),
                backend=backend,
            )
            pipeline = _launch(layout, out_file)
        except BaseException:
            self._close_detectors()  # nothing else holds them yet
            raise
        self.is_live_source = layout.is_live
        self._layout = layout
        self._pipeline: Gst.Pipeline = pipeline
        self._entry = pipeline.get_by_name(Names.CONVERT).get_static_pad("sink")
        self._video = VideoFormat()
        self._schedule = DetectionSchedule(detect_fps) if mode == "offline" else None
        self._runner: DetectorRunner | None = None
        if used:
            self._runner = DetectorRunner(
                used,
                name=self.camera.name,
                live=mode == "live",
                detect_fps=detect_fps,
                stats=self.stats,
                on_failure=self._fail,
            )
        self._supervisor = SourceSupervisor(
            pipeline,
            self.camera,
            entry=self._entry,
            live=mode == "live",
            reconnect=mode == "live" and layout.is_live,
            loops=mode == "live" and self.camera.loop and not layout.is_live,
            stats=self.stats,
        )
        self._analysis: FrameAnalysis | None = None
        self._renderer: Renderer | None = None
        if layout.overlay is not None:
            self._analysis = FrameAnalysis(
                settings,
                self.camera.name,
                runner=self._runner,
                schedule=self._schedule,
                video=self._video,
                meta_bus=self.meta_bus,
                on_failure=self._fail,
            )
            self._renderer = make_renderer(
                layout.overlay, settings, self.camera, self._analysis, self._video
            )
            if mode == "live":
                self._analysis.share_settled(used)
        self._next_keyframe: int | None = None
        self._keyframes = 0
        self._pinned: Gst.Caps | None = None
        self._source_size: tuple[int, int] | None = None
        try:
            self._wire()
        except BaseException:
            self.close()
            raise

    # -- wiring -------------------------------------------------------------------------

    def _wire(self) -> None:
        get = self._pipeline.get_by_name
        dec = get(Names.DECODER)
        if dec is not None:
            dec.connect("pad-added", _on_decoded_pad, self._entry)
            src = get(Names.SRC)
            if src.get_factory().get_name() == "rtspsrc":
                src.connect("pad-added", _on_rtsp_pad, dec.get_static_pad("sink"))
        enc = get(Names.ENCODER)
        enc.get_static_pad("sink").add_probe(Gst.PadProbeType.BUFFER, self._on_enc_buffer)
        if isinstance(self._renderer, DirectRenderer):
            _replace(self._pipeline, Names.OVERLAY, self._renderer.element())
        elif self._renderer is not None:
            self._renderer.attach(get(Names.OVERLAY))
        if self._runner is not None:
            q = get(Names.INFER_QUEUE)
            if self._schedule is not None:
                q.get_static_pad("sink").add_probe(Gst.PadProbeType.BUFFER, self._on_infer_buffer)
            elif self._runner.gates_frames:
                q.get_static_pad("src").add_probe(Gst.PadProbeType.BUFFER, self._on_live_infer)
        self._entry.add_probe(Gst.PadProbeType.EVENT_DOWNSTREAM, self._on_source_caps)
        video_q = get(Names.VIDEO_QUEUE)
        video_q.get_static_pad("src").add_probe(Gst.PadProbeType.EVENT_DOWNSTREAM, self._on_caps)

    @guarded(Gst.PadProbeReturn.OK)
    def _on_enc_buffer(self, pad: Gst.Pad, info: Gst.PadProbeInfo) -> Gst.PadProbeReturn:
        # Every frame passes here, analytics or not: count it, feed the stall watchdog.
        self.stats.frames += 1
        self._supervisor.frame_seen()
        # Keyframes by time, whatever the frame rate: encoder properties cannot change once
        # playing, and the rate of an RTSP or V4L2 source is known only then.
        buf = info.get_buffer()
        pts = buf.pts
        if pts == Gst.CLOCK_TIME_NONE:
            return Gst.PadProbeReturn.OK
        self.stats.video_end_s = (pts + self._video.duration(buf.duration)) / Gst.SECOND
        interval = int(self.settings.encoder.keyframe_s * Gst.SECOND)
        nxt = self._next_keyframe
        if nxt is None or pts >= nxt or pts < nxt - 2 * interval:
            self._next_keyframe = pts + interval - interval // _KEYFRAME_EARLY
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

    @guarded(Gst.PadProbeReturn.OK)
    def _on_source_caps(self, _pad: Gst.Pad, info: Gst.PadProbeInfo) -> Gst.PadProbeReturn:
        # The first decoded caps fix the size of everything downstream; later ones (a size
        # change mid-stream, a camera back at another resolution) are scaled to it.
        event = info.get_event()
        if event.type != Gst.EventType.CAPS:
            return Gst.PadProbeReturn.OK
        s = event.parse_caps().get_structure(0)
        size = (s.get_value("width"), s.get_value("height"))
        if self._pinned is None:
            self._pinned = _pinned_caps(s, self._layout.backend.caps_feature)
            self._source_size = size
            self._pipeline.get_by_name(Names.FIT_CAPS).set_property("caps", self._pinned)
            log.debug("camera %s: video pinned to %s", self.camera.name, self._pinned)
        elif size != self._source_size:
            self._source_size = size
            log.info(
                "camera %s: source caps changed to %dx%d; scaled to %s",
                self.camera.name,
                s.get_value("width"),
                s.get_value("height"),
                self._pinned.to_string(),
            )
        return Gst.PadProbeReturn.OK

    @guarded(Gst.PadProbeReturn.OK)
    def _on_caps(self, _pad: Gst.Pad, info: Gst.PadProbeInfo) -> Gst.PadProbeReturn:
        event = info.get_event()
        if event.type == Gst.EventType.CAPS:
            self._video.set_caps(event.parse_caps().get_structure(0))
        return Gst.PadProbeReturn.OK

    @guarded(Gst.PadProbeReturn.OK)
    def _on_infer_buffer(self, _pad: Gst.Pad, info: Gst.PadProbeInfo) -> Gst.PadProbeReturn:
        buf = info.get_buffer()
        assert self._schedule is not None
        if self._schedule.due(buf.pts, self._video.duration(buf.duration)):
            return Gst.PadProbeReturn.OK
        return Gst.PadProbeReturn.DROP

    @guarded(Gst.PadProbeReturn.OK)
    def _on_live_infer(self, _pad: Gst.Pad, _info: Gst.PadProbeInfo) -> Gst.PadProbeReturn:
        # Live, before scaling: only the frames the detector may take (the leaky queue has
        # already let the older ones go).
        assert self._runner is not None
        if self._runner.wants_frame(_LIVE_INFER_LEAD * self._video.frame_ns / 1e9):
            return Gst.PadProbeReturn.OK
        return Gst.PadProbeReturn.DROP

    # -- life -------------------------------------------------------------------------------

    def _fail(self, message: str) -> None:
        if self._runner is not None:
            self._runner.results.close()
        self._supervisor.fail(message)

    def start(self) -> None:
        """Start playing; returns at once. A pipeline that cannot start is closed (its
        detectors too) and raises :class:`SourceError`."""
        self._supervisor.arm()
        if self._runner is not None:
            self._runner.reopen()
        ret = self._pipeline.set_state(Gst.State.PLAYING)
        if ret == Gst.StateChangeReturn.FAILURE:
            err = self._pop_error(timeout_ns=0)
            self.close()
            raise SourceError(
                f"camera {self.camera.name!r}: cannot start {redact_url(self.camera.source)!r}"
                + (f": {err}" if err else "")
            )
        # After PLAYING was asked for: an appsink that has not started reports EOS.
        if self._runner is not None:
            tee_sink = self._pipeline.get_by_name(Names.TEE).get_static_pad("sink")
            self._runner.start(
                self._pipeline.get_by_name(Names.INFER_SINK), tee_sink.get_current_caps
            )

    def _pop_error(self, timeout_ns: int) -> str | None:
        msg = self._pipeline.get_bus().timed_pop_filtered(timeout_ns, Gst.MessageType.ERROR)
        if msg is None:
            return None
        err, _debug = msg.parse_error()
        return f"{err.message} ({msg.src.get_name()})"

    def stop(self, timeout: float = _STOP_TIMEOUT_S) -> None:
        """Ask the pipeline to finish: EOS through every element, so files are complete.

        Safe from any thread or a signal handler; :meth:`run` returns once drained.
        """
        self._supervisor.stop(timeout)

    def run(
        self, timeout: float | None = None, on_tick: Callable[[Pipeline], None] | None = None
    ) -> None:
        """Run until end of stream, :meth:`stop` or ``timeout`` seconds.

        A live source that fails, ends or stalls is restarted with exponential backoff; a
        file that ends stops the run (or starts again when the camera loops).
        """
        try:
            self._supervisor.run(timeout, (lambda: on_tick(self)) if on_tick else None)
        finally:
            self._teardown()

    def _teardown(self) -> None:
        # Release a streaming thread waiting for a detection before stopping the pipeline,
        # which waits for its streaming threads.
        if self._runner is not None:
            self._runner.halt()
        self._pipeline.set_state(Gst.State.NULL)
        if self._runner is not None:
            self._runner.join()
        self.meta_bus.publish(None)

    def _close_detectors(self) -> None:
        for detector in self._owned:
            detector.close()
        self._owned = []

    def close(self) -> None:
        """Release everything (idempotent); detectors passed in as ``detectors`` are left
        to their owner."""
        self._teardown()
        self._close_detectors()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what others may look at ------------------------------------------------------------

    def position(self) -> tuple[float | None, float | None]:
        """(seconds played, seconds in all) of the source, each None while unknown."""
        ok_pos, pos = self._pipeline.query_position(Gst.Format.TIME)
        ok_dur, dur = self._pipeline.query_duration(Gst.Format.TIME)
        return (pos / 1e9 if ok_pos else None, dur / 1e9 if ok_dur and dur > 0 else None)

    def element(self, name: str) -> Gst.Element | None:
        """The pipeline's element called ``name`` (see :class:`~edgecam.media.launch.Names`),
        for benchmarks and tests that measure it; None when there is none."""
        element: Gst.Element | None = self._pipeline.get_by_name(name)
        return element

    def running_time_ns(self) -> int | None:
        """The pipeline clock's running time now (None before it has a clock)."""
        clock = self._pipeline.get_clock()
        if clock is None:
            return None
        return int(clock.get_time() - self._pipeline.get_base_time())

    @property
    def description(self) -> str:
        """The launch description this pipeline was built from."""
        return self._layout.description

    @property
    def backend(self) -> str:
        """The media backend in use (``cpu``, ``nvidia``, ``nvdec`` or ``vaapi``)."""
        return self._layout.backend.name

    @property
    def counts(self) -> dict[str, int]:
        """The latest frame's counts per label."""
        return self._analysis.counts if self._analysis is not None else {}

    @property
    def frame_size(self) -> tuple[int, int] | None:
        return self._video.size

    @property
    def waiting_for_source(self) -> bool:
        """True while a live source is down and being reconnected (or not up yet)."""
        return self._supervisor.outage
