"""The recorder worker: the last minute of video in a RAM ring, saved as clips on request.

The pipeline ``udpsrc -> rtpjitterbuffer -> rtph264depay -> h264parse -> splitmuxsink``
stores the camera's H.264 RTP (no re-encode) as keyframe-aligned MPEG-TS segments in
``ring_dir/<camera>/``. MPEG-TS stays readable when the process is killed, and each
segment's file name holds its wall-clock start, so the ring survives kill -9 and the index
is rebuilt from the folder on restart.

Two threads besides the caller: the bus thread (segment opened/closed, errors, ring
trimming) and the clip thread (cuts clips once their video is in the ring).
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from types import TracebackType
from typing import Any

from edgecam.config import Settings
from edgecam.errors import EdgecamError, PipelineError
from edgecam.media.clips import (
    ClipError,
    ClipJob,
    ClipPlanner,
    ClipRequest,
    ClipStore,
    SegmentRing,
    pick_run,
    segment_name,
)
from edgecam.media.gst import RTP_CAPS, UDP_BUFFER_BYTES, Gst, make_element
from edgecam.paths import secure_folder
from edgecam.protocol import ClipReady

__all__ = ["Recorder", "ring_folder"]

log = logging.getLogger(__name__)

_H264_CAPS = "video/x-h264,stream-format=byte-stream,alignment=au"
_JITTER_LATENCY_MS = 100  # loopback: packets only need reordering, not waiting for
_BUS_POLL_S = 0.2  # also the ring's trimming period
_EOS_TIMEOUT_S = 5.0
_DISK_FULL_RETRY_S = 1.0  # after "No space left": trim, then a new pipeline this much later

ClipCallback = Callable[[ClipReady], None]


def ring_folder(settings: Settings, camera: str | None = None) -> Path:
    """The RAM ring folder of ``camera`` (the first when None)."""
    _, cam = settings.camera(camera)
    return settings.recorder.ring_dir / cam.name


class Recorder:
    """Ring recorder of one camera, with an explicit life: ``start()``, ``stop()``.

    ``request_clip()`` returns a future that resolves to the :class:`ClipReady` of the
    clip holding the requested window (merged requests share one clip), or raises
    :class:`ClipError` (e.g. :class:`DiskFullError`). Subscribers added with
    ``subscribe()`` get every ClipReady from the clip thread; keep them short.
    """

    def __init__(
        self,
        settings: Settings,
        camera: str | None = None,
        *,
        port: int | None = None,
    ) -> None:
        index, cam = settings.camera(camera)
        self.settings = settings
        self.camera = cam.name
        self.port = settings.rtp_ports(index)[1] if port is None else port
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be 1..65535, got {self.port}")
        cfg = settings.recorder
        self.folder = ring_folder(settings, cam.name)
        self.ring = SegmentRing(self.folder, cfg.ring_seconds, cfg.ring_max_bytes)
        self.planner = ClipPlanner(cfg.max_clip_s)
        self.store = ClipStore(
            cfg.clips_dir,
            max_bytes=cfg.max_clips_bytes,
            max_age_s=cfg.max_clip_age_days * 86400,
            min_free_bytes=cfg.min_free_bytes,
            owner=cam.name,
        )
        self._run = uuid.uuid4().hex[:8]
        self._fragments = 0
        self._subscribers: list[ClipCallback] = []
        self._pipeline: Gst.Pipeline | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._eos = threading.Event()
        self._first_segment = threading.Event()
        self._wake = threading.Condition()
        self.error: str | None = None
        self._restart_at: float | None = None  # monotonic time of a planned restart
        self.disk_full_restarts = 0

    # ------------------------------------------------------------------ life

    def start(self) -> None:
        if self._pipeline is not None:
            raise RuntimeError("recorder already started")
        if not Gst.is_initialized():
            Gst.init(None)
        secure_folder(self.folder, "recorder.ring_dir")
        clips_dir = self.settings.recorder.clips_dir
        try:
            clips_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ClipError(
                f"cannot create the clips folder {clips_dir}: {exc.strerror}; "
                "check recorder.clips_dir"
            ) from exc
        kept = self.ring.rebuild()
        if kept:
            log.info(
                "%s: %d segment(s) from an earlier run kept in %s", self.camera, kept, self.folder
            )
        self.ring.trim(time.time())
        self.store.remove_own_leftovers()
        self.store.apply_retention()
        pipeline = self._build()
        self._pipeline = pipeline
        if pipeline.set_state(Gst.State.PLAYING) == Gst.StateChangeReturn.FAILURE:
            msg = self._pop_error(pipeline) or "state change failed"
            pipeline.set_state(Gst.State.NULL)
            self._pipeline = None
            raise PipelineError(f"recorder for {self.camera} cannot start: {msg}")
        for target, name in ((self._bus_loop, "bus"), (self._clip_loop, "clips")):
            t = threading.Thread(target=target, name=f"recorder-{self.camera}-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        log.info("recorder %s: RTP on 127.0.0.1:%d -> %s", self.camera, self.port, self.folder)

    def stop(self) -> None:
        """Close the current segment cleanly (EOS), cut pending clips, release everything."""
        pipeline = self._pipeline
        if pipeline is None:
            return
        pipeline.send_event(Gst.Event.new_eos())
        if not self._eos.wait(_EOS_TIMEOUT_S):
            log.warning("recorder %s: no EOS within %.0f s", self.camera, _EOS_TIMEOUT_S)
        self._stopping.set()
        with self._wake:
            self._wake.notify_all()
        for t in self._threads:
            t.join(timeout=60)
        self._threads.clear()
        pipeline = self._pipeline or pipeline  # the bus thread may have made a new one
        pipeline.set_state(Gst.State.NULL)
        self._pipeline = None
        self.ring.close_all(time.time())
        log.info("recorder %s stopped", self.camera)

    def __enter__(self) -> Recorder:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def wait_ready(self, timeout: float) -> bool:
        """Wait until the first segment is being written (video is arriving)."""
        return self._first_segment.wait(timeout)

    @property
    def running(self) -> bool:
        return self._pipeline is not None and self.error is None

    # ------------------------------------------------------------------ clips

    def subscribe(self, callback: ClipCallback) -> None:
        self._subscribers.append(callback)

    def unsubscribe(self, callback: ClipCallback) -> None:
        self._subscribers.remove(callback)

    def request_clip(
        self,
        *,
        reason: str = "manual",
        pre: float | None = None,
        post: float | None = None,
        key: str | None = None,
        counts: dict[str, int] | None = None,
        at: float | None = None,
        request_id: str | None = None,
    ) -> Future[ClipReady]:
        """Ask for the video from ``at - pre`` to ``at + post`` (defaults: now, config)."""
        cfg = self.settings.recorder
        pre = cfg.pre_s if pre is None else pre
        post = cfg.post_s if post is None else post
        if not (0 <= pre < math.inf and 0 <= post < math.inf):
            raise ValueError(f"pre and post must be finite and >= 0, got {pre} and {post}")
        now = time.time()
        at = now if at is None else at
        earliest, latest = now - cfg.ring_seconds - pre, now + cfg.max_clip_s
        if not earliest <= at <= latest:
            raise ValueError(
                f"at must be a wall time (Unix s) from {earliest:.3f} (the ring holds "
                f"{cfg.ring_seconds:g} s, plus pre) to {latest:.3f} (now + recorder.max_clip_s), "
                f"got {at}"
            )
        req = ClipRequest(
            at=at,
            pre=pre,
            post=post,
            reason=reason,
            key=key,
            counts=dict(counts or {}),
        )
        if request_id is not None:
            req.id = request_id
        future = self.planner.add(req)
        log.info(
            "%s: clip requested (%s) for [%.1f s, +%.1f s], key %s",
            self.camera,
            reason,
            pre,
            post,
            key,
        )
        with self._wake:
            self._wake.notify_all()
        return future

    def status(self) -> dict[str, Any]:
        now = time.time()
        secs, size = self.ring.totals(now)
        segs = self.ring.snapshot()
        return {
            "camera": self.camera,
            "running": self.running,
            "error": self.error,
            "ring_seconds": round(secs, 3),
            "ring_bytes": size,
            "segments": len(segs),
            "ring_limit_bytes": self.ring.limit_bytes,
            "ring_disk_limited": self.ring.disk_limited,
            "disk_full_restarts": self.disk_full_restarts,
            "oldest": segs[0].start if segs else None,
            "pending_clips": self.planner.pending(),
        }

    # ------------------------------------------------------------------ pipeline

    def _build(self) -> Gst.Pipeline:
        cfg = self.settings.recorder
        pipeline = Gst.Pipeline.new(f"recorder-{self.camera}")
        src = make_element(
            "udpsrc",
            address="127.0.0.1",
            port=self.port,
            caps=Gst.Caps.from_string(RTP_CAPS),
            buffer_size=UDP_BUFFER_BYTES,
        )
        jitter = make_element("rtpjitterbuffer", latency=_JITTER_LATENCY_MS)
        depay = make_element("rtph264depay")
        parse = make_element("h264parse", config_interval=-1)
        # Whole access units: one buffer a frame, so that keyframes are recognisable.
        aligned = make_element("capsfilter", caps=Gst.Caps.from_string(_H264_CAPS))
        sink = make_element(
            "splitmuxsink",
            muxer_factory="mpegtsmux",
            max_size_time=int(cfg.segment_s * Gst.SECOND),
            send_keyframe_requests=False,
            async_finalize=False,
        )
        sink.connect("format-location-full", self._on_format_location)
        aligned.get_static_pad("src").add_probe(Gst.PadProbeType.BUFFER, self._until_keyframe)
        chain = [src, jitter, depay, parse, aligned, sink]
        for element in chain:
            pipeline.add(element)
        for a, b in itertools.pairwise(chain):
            if not a.link(b):
                raise PipelineError(f"cannot link {a.get_name()} to {b.get_name()}")
        return pipeline

    def _until_keyframe(self, _pad: Gst.Pad, info: Gst.PadProbeInfo) -> Gst.PadProbeReturn:
        # Joining a stream mid-GOP: drop frames until the first keyframe, so that every
        # segment, and so every clip, starts with one.
        buf = info.get_buffer()
        if (
            buf is None
            or buf.has_flags(Gst.BufferFlags.DELTA_UNIT)
            or buf.pts == Gst.CLOCK_TIME_NONE
        ):
            return Gst.PadProbeReturn.DROP
        return Gst.PadProbeReturn.REMOVE

    def _wall(self, running_time: int | None) -> float:
        """Wall-clock time of a running time of the pipeline."""
        now = time.time()
        pipeline = self._pipeline
        clock = pipeline.get_clock() if pipeline is not None else None
        if clock is None or running_time is None or running_time == Gst.CLOCK_TIME_NONE:
            return now
        now_rt = clock.get_time() - pipeline.get_base_time()  # type: ignore[union-attr]
        return now - (now_rt - running_time) / Gst.SECOND

    def _on_format_location(self, _sink: Gst.Element, fragment: int, sample: Gst.Sample) -> str:
        # Streaming thread: name the file after the wall time of its first frame, and return.
        running: int | None = None
        if sample is not None:
            buf, segment = sample.get_buffer(), sample.get_segment()
            if buf is not None and segment is not None and buf.pts != Gst.CLOCK_TIME_NONE:
                running = segment.to_running_time(Gst.Format.TIME, buf.pts)
        return str(self.folder / segment_name(self._wall(running), self._run, fragment))

    def _bus_loop(self) -> None:
        while not self._stopping.is_set():
            pipeline = self._pipeline
            if pipeline is None:
                break
            msg = pipeline.get_bus().timed_pop(int(_BUS_POLL_S * Gst.SECOND))
            if msg is not None:
                self._on_message(msg)
            for path in self.ring.trim(time.time(), headroom_s=2 * _BUS_POLL_S):
                log.debug("ring: removed %s", path.name)
            if self._restart_at is not None and time.monotonic() >= self._restart_at:
                self._restart_recording()

    def _restart_recording(self) -> None:
        """After the ring's disk ran full: a new pipeline (a new run: its timestamps start
        again) once the trimming has made room."""
        old = self._pipeline
        if old is not None:
            old.set_state(Gst.State.NULL)
        self.ring.close_all(time.time())
        self.ring.trim(time.time())
        self._run = uuid.uuid4().hex[:8]
        self._eos.clear()
        pipeline = self._build()
        self._pipeline = pipeline
        if pipeline.set_state(Gst.State.PLAYING) == Gst.StateChangeReturn.FAILURE:
            log.error("recorder %s: cannot restart: %s", self.camera, self._pop_error(pipeline))
            self._restart_at = time.monotonic() + _DISK_FULL_RETRY_S
            return
        self._restart_at = None
        self.disk_full_restarts += 1
        log.info("recorder %s: recording again after the disk ran full", self.camera)

    def _on_message(self, msg: Gst.Message) -> None:
        if msg.type == Gst.MessageType.ELEMENT:
            s = msg.get_structure()
            name = s.get_name() if s is not None else ""
            if name == "splitmuxsink-fragment-opened":
                self.ring.opened(Path(s.get_string("location")))
                self._first_segment.set()
            elif name == "splitmuxsink-fragment-closed":
                ok, rt = s.get_uint64("running-time")
                self.ring.closed(Path(s.get_string("location")), self._wall(rt if ok else None))
                with self._wake:
                    self._wake.notify_all()
        elif msg.type == Gst.MessageType.EOS:
            self._eos.set()
        elif msg.type == Gst.MessageType.ERROR:
            err, debug = msg.parse_error()
            if self._restart_at is not None:
                return  # the rest of a disk-full failure: the restart is already planned
            if err.matches(Gst.ResourceError.quark(), Gst.ResourceError.NO_SPACE_LEFT):
                log.warning(
                    "recorder %s: the ring's disk %s is full; trimming and recording again "
                    "in %.0f s",
                    self.camera,
                    self.folder,
                    _DISK_FULL_RETRY_S,
                )
                self._restart_at = time.monotonic() + _DISK_FULL_RETRY_S
                return
            self.error = f"{err.message} ({debug})"
            log.error("recorder %s: pipeline error: %s", self.camera, self.error)
            self._eos.set()
        elif msg.type == Gst.MessageType.WARNING:
            warn, _ = msg.parse_warning()
            log.warning("recorder %s: %s", self.camera, warn.message)

    @staticmethod
    def _pop_error(pipeline: Gst.Pipeline) -> str | None:
        msg = pipeline.get_bus().pop_filtered(Gst.MessageType.ERROR)
        if msg is None:
            return None
        err, _ = msg.parse_error()
        return str(err.message)

    # ------------------------------------------------------------------ clip thread

    def _clip_loop(self) -> None:
        stall_s = max(5.0, 3 * self.settings.recorder.segment_s)
        while not self._stopping.is_set():
            with self._wake:
                self._wake.wait(0.25)
            try:
                self._collect()
                covered = self.ring.covered_until(self._run)
                due = self.planner.due(covered, time.time(), stall_s, steady=time.monotonic())
                for job in due:
                    self._cut(job, include_open=job.end > covered)
            except Exception:
                # Whatever went wrong with one clip, the next ones must still be saved.
                log.exception("%s: clip thread error; going on", self.camera)
        # Shutdown: the last segment is closed by now (EOS); cut what is still pending.
        self.ring.close_all(time.time())
        try:
            self._collect()
        except Exception:
            log.exception("%s: clip thread error at shutdown", self.camera)
        for job in self.planner.drain():
            self._cut(job, include_open=False)

    def _collect(self, jobs: list[ClipJob] | None = None, include_open: bool = False) -> None:
        """Copy the closed segments pending clips need out of the ring as they arrive, so
        that a clip survives the ring's trimming (and may be longer than the ring)."""
        for job in self.planner.jobs() if jobs is None else jobs:
            if job.error is not None:
                continue
            segs = self.ring.overlapping(job.start, job.end, include_open)
            if job.run is None:
                current = self.ring.first_start(self._run)
                job.run = (
                    self._run
                    if current is not None and job.end > current
                    else pick_run(segs, job.start, job.end)
                )
            have = {p.path.name for p in job.parts}
            try:
                for seg in segs:
                    if seg.run == job.run and seg.path.name not in have:
                        self.store.add_part(job, seg)
            except (EdgecamError, OSError) as exc:
                job.error = exc if isinstance(exc, EdgecamError) else ClipError(str(exc))
                self.store.discard(job)  # reported and logged when the job is cut

    def _cut(self, job: ClipJob, include_open: bool) -> None:
        """Save the job's clip and answer its future; never raises."""
        try:
            if include_open:
                self._collect([job], include_open=True)
            if job.error is not None:
                raise job.error
            ready = self.store.save(job, device=self.settings.device, camera=self.camera)
        except Exception as exc:
            self.store.discard(job)
            if isinstance(exc, EdgecamError | OSError):
                log.error(
                    "%s: clip for [%.1f, %.1f] not saved: %s", self.camera, job.start, job.end, exc
                )
            else:
                log.exception("%s: clip for [%.1f, %.1f] failed", self.camera, job.start, job.end)
            job.future.set_exception(exc if isinstance(exc, EdgecamError) else ClipError(str(exc)))
            return
        log.info("clip ready: %s", ready.model_dump_json())
        job.future.set_result(ready)
        for callback in list(self._subscribers):
            try:
                callback(ready)
            except Exception:
                log.exception("clip subscriber %r failed", callback)
