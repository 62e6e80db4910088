"""The detector side of a pipeline: detector threads, their results by timestamp, and the
per-frame step that turns them into tracks.

:class:`DetectorRunner` owns the detector threads: each pulls frames from the pipeline's
appsink, fits them to its model (:class:`edgecam.media.frames.ModelFit`), runs its detector
and posts the boxes (in source pixels) by the frame's PTS to :class:`DetectionResults`.
:class:`FrameAnalysis` is what runs once a video frame: the detections due on that frame in,
tracks, votes and counts out (a :class:`~edgecam.vision.analytics.FrameMeta`, also published
on the meta bus).

Offline the detector runs on exactly ``detect_fps`` frames a second of video
(:class:`DetectionSchedule`) and a frame waits for its detection, so the output depends on
the input only. Live the detector takes the newest frame whenever it is free, and its boxes
are applied when the video reaches the frame they were found on.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from edgecam.config import Settings
from edgecam.errors import PipelineError
from edgecam.media.frames import MappedFrame, ModelFit, from_model_frame
from edgecam.media.gst import Gst, GstVideo
from edgecam.vision.analytics import Analytics, FrameMeta, MetaBus
from edgecam.vision.detections import Detections, Detector

__all__ = [
    "DetectionResults",
    "DetectionSchedule",
    "DetectorRunner",
    "FrameAnalysis",
    "PipelineStats",
    "VideoFormat",
]

log = logging.getLogger(__name__)

# A detection further ahead of the video than this is from another timeline (the source
# restarted or looped): applied at once rather than held.
_MAX_LEAD_NS = 2 * Gst.SECOND
_PENDING_LIVE = 64  # live detections held until the video reaches their frame
_PULL_TIMEOUT_NS = 100 * Gst.MSECOND  # how often a detector thread looks at its stop flag
_RESULT_TIMEOUT_S = 120.0  # offline: a frame waits this long for its detection, then fails
_JOIN_TIMEOUT_S = 10.0
_UNUSABLE_LOGGED = 1000  # after the first, unusable boxes are logged once in so many
_DEFAULT_FRAME_NS = int(1e9 / 30)  # until the caps tell


@dataclass
class PipelineStats:
    frames: int = 0
    detections: int = 0
    detect_seconds: float = 0.0
    restarts: int = 0
    video_end_s: float = 0.0  # stream time where the latest frame ends


class VideoFormat:
    """The video branch's frame size and frame duration, as its caps say (set from a pad
    probe, read by the per-frame code)."""

    def __init__(self) -> None:
        self.size: tuple[int, int] | None = None
        self.frame_ns = _DEFAULT_FRAME_NS

    def set_caps(self, s: Gst.Structure) -> None:
        self.size = (s.get_value("width"), s.get_value("height"))
        ok, num, den = s.get_fraction("framerate")
        self.frame_ns = int(1e9 * den / num) if ok and num > 0 else _DEFAULT_FRAME_NS

    def duration(self, dur: int) -> int:
        """A buffer's duration, or one frame's where the buffer does not say."""
        if dur == Gst.CLOCK_TIME_NONE or dur <= 0:
            return self.frame_ns
        return int(dur)


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


class DetectionResults:
    """Detections handed from the detector threads to the per-frame step, by PTS."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._by_pts: dict[int, Detections] = {}
        self._pending: deque[tuple[int, Detections]] = deque(maxlen=_PENDING_LIVE)
        self._closed = False

    def post(self, pts: int, dets: Detections) -> None:
        with self._cond:
            self._by_pts[pts] = dets
            self._pending.append((pts, dets))
            self._cond.notify_all()

    def wait(self, pts: int, timeout: float) -> Detections | None:
        """Offline: the detections of the frame at ``pts``, once made (None: closed or
        timed out)."""
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


class DetectorRunner:
    """The detector threads of one pipeline: started with the pipeline, joined on stop.

    ``detectors`` are used, never closed here (their owner closes them). ``source_caps``
    gives the full-size video's current caps, to map boxes found in frames that a backend
    scaled on its own device back to source pixels. ``on_failure`` is called (once a
    failure) when a detector raises.
    """

    def __init__(
        self,
        detectors: Sequence[Detector],
        *,
        name: str,
        live: bool,
        detect_fps: float,
        stats: PipelineStats,
        on_failure: Callable[[str], None],
    ) -> None:
        self.results = DetectionResults()
        self._detectors = list(detectors)
        self._name = name
        self._live = live
        self._min_interval = 1.0 / detect_fps if detect_fps > 0 else 0.0
        self._stats = stats
        self._on_failure = on_failure
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._left = 0
        self._lock = threading.Lock()
        # Live with a rate cap: when (monotonic seconds) the next detection may start.
        self._next_start = 0.0
        self._unusable = 0  # boxes left out for being NaN, infinite or empty

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def reopen(self) -> None:
        """Ready for a (re)start: no stale results, waits no longer cut short."""
        self._stopping.clear()
        self._next_start = 0.0
        self.results.reopen()

    @property
    def gates_frames(self) -> bool:
        """Live with a rate cap: detections are spaced ``1 / detect_fps`` apart, and
        :meth:`wants_frame` says which frames to scale."""
        return self._live and self._min_interval > 0

    def wants_frame(self, lead_s: float) -> bool:
        """Live: whether a frame arriving now is worth scaling for the detector.

        Under a rate cap the detector takes no frame until its next detection may start, so
        frames that come earlier than ``lead_s`` before that are dropped before they are
        scaled (at 10 detections/s of a 30 fps camera, two frames in three). Those that come
        within ``lead_s`` keep the detector's frame as fresh as without the gate.
        """
        return time.monotonic() >= self._next_start - lead_s

    def start(self, appsink: Gst.Element, source_caps: Callable[[], Gst.Caps | None]) -> None:
        """Start the threads (after the pipeline was asked to play: an appsink that has not
        started reports EOS). Idempotent while they run."""
        if self.running:
            return
        self._left = len(self._detectors)
        self._threads = [
            threading.Thread(
                target=self._loop,
                args=(d, appsink, source_caps),
                name=f"detector-{self._name}-{i}",
                daemon=True,
            )
            for i, d in enumerate(self._detectors)
        ]
        for t in self._threads:
            t.start()

    def halt(self) -> None:
        """Tell the threads to stop; frames waiting for a detection are released."""
        self._stopping.set()
        self.results.close()

    def join(self) -> None:
        """Wait for the threads to end (after :meth:`halt`)."""
        for t in self._threads:
            t.join(timeout=_JOIN_TIMEOUT_S)
        self._threads = []

    def _loop(
        self,
        detector: Detector,
        appsink: Gst.Element,
        source_caps: Callable[[], Gst.Caps | None],
    ) -> None:
        try:
            self._detect_samples(detector, appsink, source_caps)
        finally:
            with self._lock:
                self._left -= 1
                last = self._left == 0
            if last:  # the others may still be finishing frames the video waits for
                self.results.close()

    def _detect_samples(
        self,
        detector: Detector,
        appsink: Gst.Element,
        source_caps: Callable[[], Gst.Caps | None],
    ) -> None:
        frames = _ModelFrames(detector.input_size, source_caps)
        while not self._stopping.is_set():
            sample = appsink.try_pull_sample(_PULL_TIMEOUT_NS)
            if sample is None:
                if appsink.is_eos() and not self._live:
                    break
                continue
            pts = sample.get_buffer().pts
            started = time.monotonic()
            if self.gates_frames:
                self._next_start = started + self._min_interval
            try:
                frame, to_source = frames.read(sample)
                # The video frame goes back to the pipeline before the detector runs (the
                # drawing would copy a frame still held here before writing into it).
                del sample
                t0 = time.perf_counter()
                dets = detector.detect(frame)
            except Exception as exc:  # a broken model must stop the run, loudly
                log.exception("detector failed")
                self._on_failure(f"detector failed: {exc}")
                break
            with self._lock:
                self._stats.detect_seconds += time.perf_counter() - t0
                self._stats.detections += 1
            if to_source is not None:
                dets = dets.mapped(*to_source)
            self.results.post(pts, self._usable(dets))
            if self.gates_frames:
                delay = started + self._min_interval - time.monotonic()
                if delay > 0 and self._stopping.wait(delay):
                    break

    def _usable(self, dets: Detections) -> Detections:
        usable = dets.usable()
        if usable is not dets:
            left_out = len(dets) - len(usable)
            with self._lock:
                before = self._unusable
                self._unusable = total = before + left_out
            if not before or total // _UNUSABLE_LOGGED > before // _UNUSABLE_LOGGED:
                log.warning(
                    "%s: the detector gave boxes that are NaN, infinite or empty (%d so far); "
                    "they are left out",
                    self._name,
                    total,
                )
        return usable


class FrameAnalysis:
    """The Python work of one video frame: its detections in, tracks and counts out.

    ``runner`` None: nothing is detected (privacy masks, zones and lines still need the
    step). ``schedule`` (offline) says which frames wait for a detection.
    """

    def __init__(
        self,
        settings: Settings,
        camera: str,
        *,
        runner: DetectorRunner | None,
        schedule: DetectionSchedule | None,
        video: VideoFormat,
        meta_bus: MetaBus,
        on_failure: Callable[[str], None],
    ) -> None:
        self._analytics = Analytics(settings, camera)
        self._runner = runner
        self._schedule = schedule
        self._video = video
        self._meta_bus = meta_bus
        self._on_failure = on_failure
        self.counts: dict[str, int] = {}

    def share_settled(self, detectors: Sequence[Detector]) -> int:
        """Let the detectors skip the faces of this camera's settled tracks (live only:
        offline output must not depend on timing); how many can."""
        return self._analytics.share_settled(detectors)

    def step(self, pts: int, dur: int) -> FrameMeta:
        dets: Detections | None = None
        runner = self._runner
        if runner is not None:
            if self._schedule is not None:
                if self._schedule.due(pts, self._video.duration(dur)):
                    dets = runner.results.wait(pts, timeout=_RESULT_TIMEOUT_S)
                    if dets is None and not runner.stopping:
                        self._on_failure("the detector produced no result for a frame in time")
            else:
                dets = runner.results.take_due(pts)
        seconds = pts / 1e9 if pts != Gst.CLOCK_TIME_NONE else 0.0
        meta = self._analytics.step(seconds, dets, self._video.size)
        self.counts = meta.counts
        if self._meta_bus.active:
            self._meta_bus.publish(meta)
        return meta


class _ModelFrames:
    """One detector thread's RGB frames for its model, from the appsink's samples; with the
    mapping of their pixels back to the source's (None: the source's caps are not known
    yet). What depends only on the samples' caps is worked out again only when they change.

    System-memory backends hand the video frame itself (I420), fitted here; a backend that
    scales on its own device hands RGB already at the model's size (its frame is copied:
    the buffer goes back to the pipeline before the detector runs).
    """

    def __init__(self, model: tuple[int, int], source_caps: Callable[[], Gst.Caps | None]) -> None:
        self._model = model
        self._source_caps = source_caps
        self._caps: Gst.Caps | None = None
        self._info: GstVideo.VideoInfo | None = None
        self._fit: ModelFit | None = None  # None: RGB at the model's size

    def _learn(self, caps: Gst.Caps) -> None:
        info = GstVideo.VideoInfo.new_from_caps(caps)
        fmt = info.finfo.format
        if fmt == GstVideo.VideoFormat.I420:
            fit = ModelFit(info, self._model)
        elif fmt == GstVideo.VideoFormat.RGB and (info.width, info.height) == self._model:
            fit = None
        else:
            w, h = self._model
            raise PipelineError(
                f"the detector's appsink got {caps.to_string()}: neither I420 video nor RGB "
                f"at the model's {w}x{h}"
            )
        self._caps, self._info, self._fit = caps, info, fit

    def read(
        self, sample: Gst.Sample
    ) -> tuple[np.ndarray, tuple[float, float, float, float] | None]:
        buf, caps = sample.get_buffer(), sample.get_caps()
        if self._caps is None or not caps.is_equal(self._caps):
            self._learn(caps)
        info, fit = self._info, self._fit
        if fit is not None:
            with MappedFrame(buf, info, Gst.MapFlags.READ) as planes:
                return fit(planes), fit.to_source
        assert info is not None
        ok, mapinfo = buf.map(Gst.MapFlags.READ)
        if not ok:
            raise PipelineError("cannot map the detector's frame")
        try:
            frame: np.ndarray = np.ndarray(
                (info.height, info.width, 3),
                dtype=np.uint8,
                buffer=mapinfo.data,
                strides=(info.stride[0], 3, 1),
            ).copy()
        finally:
            buf.unmap(mapinfo)
        source = self._source_caps()
        if source is None:
            return frame, None
        return frame, from_model_frame(source.get_structure(0), self._model)
