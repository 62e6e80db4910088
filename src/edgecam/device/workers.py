"""The workers: each wraps media resources in the :class:`~edgecam.device.runner.Worker`
shape, and :data:`WORKERS` is the one registry the CLI, the demo and the orchestrator use.

Per camera: ``recorder`` (the RAM ring and clips). Per device: ``inference`` (every
camera's pipeline, one shared detector), ``streaming`` (one RTSP server, a mount per camera)
and ``fileserver`` (one HTTP server for every camera's clips, and the one place clip
retention runs).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import queue
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, NamedTuple

from edgecam.config import Settings, redact_url
from edgecam.device.control import Handler
from edgecam.device.events import ClipEvent, ClipFailed, FrameSummary, LineFrame, ZoneFrame
from edgecam.device.runner import Worker, WorkerContext
from edgecam.errors import ConfigError, EdgecamError
from edgecam.protocol import ClipReady, SaveClipArgs

if TYPE_CHECKING:
    from edgecam.media.pipeline import Pipeline
    from edgecam.vision.analytics import FrameMeta
    from edgecam.vision.batching import DetectorBatcher
    from edgecam.vision.detections import Detector

__all__ = [
    "WORKERS",
    "FileServerWorker",
    "InferenceWorker",
    "RecorderWorker",
    "StreamingWorker",
    "limit_malloc_arenas",
]

log = logging.getLogger(__name__)

# A pipeline that has not produced a frame for this long, while not waiting for its
# camera to come back, is hung (the orchestrator restarts it).
_STUCK_S = 10.0
# Every camera's pipeline drains together: one deadline for all (a drain takes up to the
# pipeline's 10 s), well inside the runner's forced exit, whatever the number of cameras.
_STOP_ALL_S = 15.0
_RETENTION_EVERY_S = 60.0
_KEEP_CLIP_RESULTS = 256
_LISTEN_TIMEOUT_S = 10.0
_COUNTS_EVERY_S = 1.0
_TOTALLED = ("frames", "detections", "restarts")  # PipelineStats counters summed over rebuilds
# A camera whose detections over this window fall below this fraction of those it asks
# for (its detect_fps, or every frame where its video is slower) is said to be behind: the
# shared detector cannot keep up with every camera on this machine.
_RATE_WINDOW_S = 30.0
_BEHIND_FRACTION = 0.5


def limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives each thread that allocates its own malloc arena; the live pipeline has
    dozens of threads (GStreamer, ONNX Runtime) and runs for months. Two arenas hold ~20 MB
    less (measured on the live pipeline: 296 -> 280 MB peak) at no measured cost."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to tune
        ctypes.CDLL("libc.so.6").mallopt(-8, arenas)  # -8: M_ARENA_MAX


def _frame_summary(worker: str, camera: str, meta: FrameMeta) -> FrameSummary:
    return FrameSummary(
        worker=worker,
        camera=camera,
        frame=meta.frame,
        wall_time=meta.wall_time,
        tracks=[(t.id, t.label) for t in meta.tracks if t.counted],
        detected=meta.detected,
        zones={
            z.name: ZoneFrame(
                occupancy=z.occupancy,
                entered=len(z.entered),
                dwell_s=[round(d, 3) for _, d in z.exited],
                longest_s=round(z.longest_s, 3),
            )
            for z in meta.zones
        },
        lines={
            ln.name: LineFrame(
                crossed_in=sum(d == "in" for _, d in ln.crossings),
                crossed_out=sum(d == "out" for _, d in ln.crossings),
            )
            for ln in meta.lines
        },
    )


class _Window(NamedTuple):
    """A camera's figures at the start (or end) of a rate window."""

    start: float
    frames: float
    detections: float
    breaks: float  # source restarts and pipeline rebuilds
    flowing: bool  # its video came: not lost, rebuilding or ended


class _CameraBranch:
    """One camera's live pipeline inside the inference worker, on a thread of its own.

    The pipeline reconnects a lost live source itself (with backoff); a pipeline that fails
    anyway (its detector failed, an error that is not the source's) is rebuilt here after a
    backoff, while the other cameras go on. A file source that ends finishes the branch.
    """

    def __init__(self, worker: InferenceWorker, camera: str) -> None:
        self.worker = worker
        self.camera = camera
        self.settings = worker.settings.for_camera(camera)
        self.cam = self.settings.camera(camera)[1]
        self.pipeline: Pipeline | None = None
        self.detectors: list[Detector] = []
        self.error: str | None = None
        self.finished = False
        self.rebuilds = 0
        self.frames_in = 0
        # Counters of the pipelines discarded before this one: the figures stay monotonic.
        self._totals = dict.fromkeys(_TOTALLED, 0)
        self._lock = threading.Lock()
        self._forwarder: threading.Thread | None = None
        self._thread: threading.Thread | None = None
        self._last_frames = -1
        self._last_progress = time.monotonic()
        self.behind = False
        self.detections_per_s = 0.0  # over the last rate window
        self._window: _Window | None = None  # the rate window under way

    def build(self) -> None:
        from edgecam.media.pipeline import Pipeline

        batcher = self.worker.batcher
        detectors: list[Detector] = (
            [batcher.attach(self.camera)]
            if batcher is not None and self.settings.vision.detect_fps > 0
            else []
        )
        try:
            pipeline = Pipeline(
                self.settings, self.camera, mode="live", rtp=True, detectors=detectors
            )
        except BaseException:
            for d in detectors:
                d.close()
            raise
        frames = pipeline.meta_bus.subscribe(maxsize=256)
        forwarder = threading.Thread(
            target=self._forward, args=(frames,), name=f"frame-events-{self.camera}", daemon=True
        )
        forwarder.start()
        with self._lock:
            self.pipeline, self.detectors, self._forwarder = pipeline, detectors, forwarder
        log.info(
            "camera %s: %s -> H.264 RTP to 127.0.0.1 ports %s (profile %s, <= %.1f detections/s)",
            self.camera,
            redact_url(self.cam.source),
            ",".join(map(str, self.settings.rtp_ports(pipeline.camera_index))),
            self.settings.vision.profile,
            self.settings.vision.detect_fps,
        )

    def _forward(self, frames: queue.Queue[Any]) -> None:
        """Off the streaming thread: each frame's summary to the event channel."""
        while True:
            meta = frames.get()
            if meta is None:
                return
            self.frames_in += 1
            self.worker.ctx.events.send(_frame_summary(self.worker.name, self.camera, meta))

    def discard(self) -> None:
        """Close the pipeline (its figures kept in the totals) and detach its detectors."""
        with self._lock:
            pipeline, self.pipeline = self.pipeline, None
            detectors, self.detectors = self.detectors, []
            forwarder, self._forwarder = self._forwarder, None
        if pipeline is not None:
            pipeline.close()  # publishes the end to the forwarder
            for name in _TOTALLED:
                self._totals[name] += getattr(pipeline.stats, name)
        for d in detectors:
            d.close()
        if forwarder is not None:
            forwarder.join(timeout=5)

    def start(self, stop: threading.Event) -> None:
        self._thread = threading.Thread(
            target=self._run, args=(stop,), name=f"camera-{self.camera}", daemon=True
        )
        self._thread.start()

    def _run(self, stop: threading.Event) -> None:
        backoff = self.cam.reconnect_min_s
        while not stop.is_set():
            try:
                if self.pipeline is None:
                    self.build()
                pipeline = self.pipeline
                assert pipeline is not None
                pipeline.start()
                if stop.is_set():
                    pipeline.stop()
                pipeline.run()
            except EdgecamError as exc:
                if stop.is_set():
                    break
                self.error = str(exc)
                self.rebuilds += 1
                log.warning("camera %s: %s; starting again in %.1f s", self.camera, exc, backoff)
                self.discard()
                if stop.wait(backoff):
                    break
                backoff = min(backoff * 2, self.cam.reconnect_max_s)
                continue
            if not stop.is_set():
                log.info("camera %s: the source ended", self.camera)
                self.finished = True
            break

    def stop(self) -> None:
        with self._lock:
            pipeline = self.pipeline
        if pipeline is not None:
            pipeline.stop()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def healthy(self, now: float) -> bool:
        """Frames flow, or the camera is away (reconnecting) or being rebuilt, or done."""
        pipeline = self.pipeline
        if pipeline is None or self.finished:
            self._last_progress = now
            return True
        if pipeline.stats.frames != self._last_frames or pipeline.waiting_for_source:
            self._last_frames = pipeline.stats.frames
            self._last_progress = now
        return now - self._last_progress < _STUCK_S

    def keeps_up(self, now: float) -> bool | None:
        """At the end of each rate window, whether the detector made the detections this
        camera asked for in it; None meanwhile, when it asked for none, and when its video
        did not flow throughout (it was lost, not up yet, rebuilt or ended): what it asked
        for while away is not known, and counting it made the camera look behind."""
        if self._window is not None and now - self._window.start < _RATE_WINDOW_S:
            return None
        figures = self.figures()
        end = _Window(
            now,
            figures["frames_out"],
            figures["detections"],
            figures["source_restarts"] + figures["pipeline_rebuilds"],
            flowing=not (self.finished or figures["waiting_for_source"]),
        )
        begin, self._window = self._window, end
        if begin is None or not (begin.flowing and end.flowing) or begin.breaks != end.breaks:
            return None
        seconds = end.start - begin.start
        asked = min(self.settings.vision.detect_fps * seconds, end.frames - begin.frames)
        if asked <= 0:
            return None
        made = end.detections - begin.detections
        self.detections_per_s = made / seconds
        return made >= _BEHIND_FRACTION * asked

    def figures(self) -> dict[str, float]:
        pipeline = self.pipeline
        now = {
            name: self._totals[name] + (getattr(pipeline.stats, name) if pipeline else 0)
            for name in _TOTALLED
        }
        return {
            "frames_in": float(self.frames_in),
            "frames_out": float(now["frames"]),
            "detections": float(now["detections"]),
            "source_restarts": float(now["restarts"]),
            "waiting_for_source": float(pipeline is None or pipeline.waiting_for_source),
            "pipeline_rebuilds": float(self.rebuilds),
            "events_dropped": float(pipeline.meta_bus.dropped if pipeline is not None else 0),
        }


class InferenceWorker(Worker):
    """Every camera's live pipeline in one process (``--camera C``: that camera's alone),
    each with its own tracker and analytics, all sharing one batched detector; every
    frame's counted tracks go to the orchestrator with their camera's name."""

    name = "inference"
    per_camera = False
    camera_optional = True

    def __init__(self, ctx: WorkerContext) -> None:
        super().__init__(ctx)
        settings = self.settings
        if self.camera is None:
            names = [c.name for c in settings.cameras if c.enabled]
        else:
            names = [settings.camera(self.camera)[1].name]
        self.batcher: DetectorBatcher | None = None
        self._branches = [_CameraBranch(self, n) for n in names]

    @classmethod
    def enabled(cls, settings: Settings) -> bool:
        return any(c.enabled for c in settings.cameras)

    def start(self) -> None:
        from edgecam.media.backends import resolve_backend
        from edgecam.vision.batching import DetectorBatcher
        from edgecam.vision.detectors import build_detector

        limit_malloc_arenas()
        settings = self.settings
        # A media backend that cannot run here fails the worker before the model loads, and
        # its restart probes afresh (a GPU driver loaded late, say): a camera retrying in
        # this process would meet the same answer, kept for the process's life.
        resolve_backend(settings)
        detecting = sum(b.settings.vision.detect_fps > 0 for b in self._branches)
        if detecting:
            vision = settings.vision
            faces = any(c.privacy.faces != "off" for c in settings.cameras)
            workers = vision.detector_workers or max(1, min(detecting, vision.threads))
            shared = vision.model_copy(update={"threads": max(1, vision.threads // workers)})
            self.batcher = DetectorBatcher(
                build_detector(shared, privacy_faces=faces),
                max_batch=vision.max_batch,
                deadline_s=vision.batch_deadline_ms / 1000,
                workers=workers,
            )
            self.batcher.start()
        failed: list[str] = []
        for branch in self._branches:
            try:
                branch.build()
            except EdgecamError as exc:  # this camera tries again on its own thread
                failed.append(f"camera {branch.camera}: {exc}")
                branch.error = str(exc)
                log.error("camera %s: %s", branch.camera, exc)
        if len(failed) == len(self._branches):
            raise EdgecamError("; ".join(failed))

    def serve(self, stop: threading.Event) -> None:
        for branch in self._branches:
            branch.start(stop)
        while not stop.wait(0.2):
            if not any(b.alive for b in self._branches):
                break  # every source ended
            self._say_who_is_behind(time.monotonic())
        self._stop_branches()

    def _say_who_is_behind(self, now: float) -> None:
        """Log a camera that falls behind (and that catches up again) once, not each window."""
        for branch in self._branches:
            keeps_up = branch.keeps_up(now)
            if keeps_up is None or branch.behind == (not keeps_up):
                continue
            branch.behind = not keeps_up
            asked = branch.settings.vision.detect_fps
            if branch.behind:
                log.warning(
                    "camera %s: the detector cannot keep up: %.1f detections a second of the "
                    "%g asked for (%d cameras share it); lower detect_fps or run fewer cameras",
                    branch.camera,
                    branch.detections_per_s,
                    asked,
                    len(self._branches),
                )
            else:
                log.info(
                    "camera %s: the detector keeps up again (%.1f detections a second)",
                    branch.camera,
                    branch.detections_per_s,
                )

    def close(self) -> None:
        self._stop_branches()
        for branch in self._branches:
            branch.discard()
        if self.batcher is not None:
            self.batcher.stop()

    def _stop_branches(self) -> None:
        for branch in self._branches:
            branch.stop()
        deadline = time.monotonic() + _STOP_ALL_S
        for branch in self._branches:
            branch.join(timeout=max(0.0, deadline - time.monotonic()))

    def status(self) -> dict[str, Any]:
        batcher = self.batcher
        return {
            "cameras": {
                b.camera: {
                    **b.figures(),
                    "error": b.error,
                    "finished": b.finished,
                    "detect_fps": b.settings.vision.detect_fps,
                    "behind": b.behind,
                }
                for b in self._branches
            },
            "batches": batcher.stats.batches if batcher is not None else 0,
            "mean_batch": round(batcher.stats.mean_batch, 2) if batcher is not None else 0.0,
        }

    def healthy(self) -> bool:
        now = time.monotonic()
        return all([b.healthy(now) for b in self._branches])

    def figures(self) -> dict[str, float]:
        """Each camera's counters as ``CAMERA/NAME`` (camera names have no slash)."""
        return {
            f"{b.camera}/{key}": value for b in self._branches for key, value in b.figures().items()
        }


class RecorderWorker(Worker):
    """One camera's RAM ring; ``save_clip`` answers at once with a job id, and the clip is
    announced on the event channel (and kept for ``clip_status``) once on disk."""

    name = "recorder"
    per_camera = True

    def __init__(self, ctx: WorkerContext) -> None:
        super().__init__(ctx)
        from edgecam.media.recorder import Recorder

        self._recorder = Recorder(self.settings, self.camera)
        self._results: OrderedDict[str, Future[ClipReady]] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def enabled(cls, settings: Settings) -> bool:
        return settings.recorder.enabled

    def start(self) -> None:
        self._recorder.subscribe(self._on_clip)
        self._recorder.start()

    def serve(self, stop: threading.Event) -> None:
        while not stop.wait(0.5):
            if self._recorder.error is not None:
                raise EdgecamError(f"recorder {self.camera}: {self._recorder.error}")

    def close(self) -> None:
        self._recorder.stop()

    def _on_clip(self, ready: ClipReady) -> None:
        self.ctx.events.send(ClipEvent(worker=self.name, camera=self.camera, clip=ready))

    def _save_clip(self, raw: dict[str, Any]) -> dict[str, Any]:
        args = SaveClipArgs.model_validate(raw)
        if args.camera not in (None, self.camera):
            raise ValueError(f"this recorder records {self.camera!r}, not {args.camera!r}")
        request_id = args.job or uuid.uuid4().hex
        future = self._recorder.request_clip(
            reason=args.reason,
            pre=args.pre,
            post=args.post,
            key=args.key,
            counts=args.counts,
            at=args.at,
            request_id=request_id,
        )
        with self._lock:
            self._results[request_id] = future
            while len(self._results) > _KEEP_CLIP_RESULTS:
                self._results.popitem(last=False)

        def on_done(f: Future[ClipReady]) -> None:
            exc = f.exception()
            if exc is not None:
                self.ctx.events.send(
                    ClipFailed(
                        worker=self.name, camera=self.camera, request_id=request_id, error=str(exc)
                    )
                )

        future.add_done_callback(on_done)
        return {"job": request_id, "camera": self.camera, "accepted": True}

    def _clip_status(self, raw: dict[str, Any]) -> dict[str, Any]:
        job = str(raw.get("job", ""))
        with self._lock:
            future = self._results.get(job)
        if future is None:
            raise ValueError(f"no clip job {job!r} on this recorder")
        if not future.done():
            return {"job": job, "state": "pending"}
        exc = future.exception()
        if exc is not None:
            return {"job": job, "state": "failed", "error": str(exc)}
        return {"job": job, "state": "ready", "clip": future.result().model_dump(mode="json")}

    def commands(self) -> dict[str, Handler]:
        return {"save_clip": self._save_clip, "clip_status": self._clip_status}

    def status(self) -> dict[str, Any]:
        return self._recorder.status()

    def healthy(self) -> bool:
        return self._recorder.error is None


class StreamingWorker(Worker):
    """The device's RTSP server, a mount per camera; streaming starts and stops on command."""

    name = "streaming"
    per_camera = False

    def __init__(self, ctx: WorkerContext) -> None:
        super().__init__(ctx)
        from edgecam.media.streaming import StreamingServer

        self._server = StreamingServer.from_settings(self.settings)

    @classmethod
    def enabled(cls, settings: Settings) -> bool:
        return settings.streaming.enabled

    def start(self) -> None:
        self._server.start()

    def close(self) -> None:
        self._server.stop()

    def status(self) -> dict[str, Any]:
        return {
            "urls": {c: self._server.url_of(c) for c in self._server.cameras},
            "url": self._server.url,
            "streaming": self._server.streaming,
            "clients": self._server.client_count,
            "sessions": self._server.session_count,
        }

    def _start(self, _args: dict[str, Any]) -> dict[str, Any]:
        self._server.streaming_start()
        return self.status()

    def _stop(self, _args: dict[str, Any]) -> dict[str, Any]:
        self._server.streaming_stop()
        return self.status()

    def commands(self) -> dict[str, Handler]:
        return {"streaming_start": self._start, "streaming_stop": self._stop}

    def figures(self) -> dict[str, float]:
        return {"streaming": float(self._server.streaming)}


class FileServerWorker(Worker):
    """The device's HTTP server: every camera's clips (token or signed link, Range) and the
    live view of every camera (WebRTC / MSE, fed by the camera's third RTP port)."""

    name = "fileserver"
    per_camera = False

    def __init__(self, ctx: WorkerContext) -> None:
        super().__init__(ctx)
        from edgecam.device.fileserver import QuietServer, create_app, server_config
        from edgecam.device.liveview_http import live_routes
        from edgecam.media.clips import ClipStore
        from edgecam.media.liveview import LiveView

        cfg = self.settings.fileserver
        rec = self.settings.recorder
        self._store = ClipStore(
            rec.clips_dir,
            max_bytes=rec.max_clips_bytes,
            max_age_s=rec.max_clip_age_days * 86400,
            min_free_bytes=rec.min_free_bytes,
        )
        self._views: dict[str, LiveView] = {}
        if self.settings.live.enabled:
            self._views = {
                c.name: LiveView.from_settings(self.settings, c.name)
                for c in self.settings.cameras
                if c.enabled
            }
        self._counts: dict[str, dict[str, int]] = {}
        app = create_app(self.settings)
        app.router.routes.extend(
            live_routes(
                self.settings,
                self._views,
                self._counts.get,
                self._save_clip,
                guard=app.state.token_guard,
            )
        )
        self._server = QuietServer(server_config(app, cfg))
        self._thread: threading.Thread | None = None

    @classmethod
    def enabled(cls, settings: Settings) -> bool:
        return settings.fileserver.enabled

    @classmethod
    def check(cls, settings: Settings) -> None:
        token = settings.fileserver.token
        if token is None or not token.get_secret_value():
            raise ConfigError(
                "the file server needs a token: set fileserver.token in the config file (or "
                "EDGECAM_FILESERVER__TOKEN), or turn it off with fileserver.enabled: false"
            )

    def start(self) -> None:
        cfg = self.settings.fileserver
        if self.settings.streaming.enabled:
            self._live(True)
        self._thread = threading.Thread(target=self._server.run, name="http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + _LISTEN_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise EdgecamError(
                    f"the file server cannot listen on {cfg.host}:{cfg.port} (port in use? "
                    "change fileserver.port / EDGECAM_FILESERVER__PORT)"
                )
            time.sleep(0.05)
        log.info(
            "file server on http://%s:%d serving %s%s",
            cfg.host,
            cfg.port,
            self.settings.recorder.clips_dir,
            f", live view of {sorted(self._views)} at /live" if self._views else "",
        )

    def serve(self, stop: threading.Event) -> None:
        self._store.apply_retention()
        next_retention = time.monotonic() + _RETENTION_EVERY_S
        while not stop.wait(_COUNTS_EVERY_S):
            if self._views:
                self._refresh_counts()
            if time.monotonic() >= next_retention:
                next_retention += _RETENTION_EVERY_S
                try:
                    self._store.apply_retention()
                except OSError as exc:
                    log.warning("clip retention failed: %s", exc)

    def close(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._live(False)

    def _live(self, on: bool) -> None:
        for view in self._views.values():
            if on and not view.running:
                view.start()
            elif not on and view.running:
                view.stop()

    def _refresh_counts(self) -> None:
        """The live page shows the device's current counts, which the orchestrator has."""
        from edgecam.device.control import DEVICE, send_command, socket_path
        from edgecam.protocol import Command

        try:
            result = send_command(
                socket_path(self.settings, DEVICE), Command(name="counts"), timeout=2
            )
        except (EdgecamError, OSError):
            self._counts.clear()  # run alone, or the device is restarting: no counts
            return
        if result.ok:
            self._counts.clear()
            self._counts.update(result.data.get("counts", {}))

    def _save_clip(self, camera: str) -> dict[str, Any]:
        """The live page's button: a clip from the camera's recorder."""
        from edgecam.device.control import send_command, socket_path
        from edgecam.protocol import Command

        args = SaveClipArgs(camera=camera, reason="live view")
        result = send_command(
            socket_path(self.settings, "recorder", camera),
            Command(name="save_clip", args=args.model_dump(exclude_none=True)),
            timeout=5,
        )
        if not result.ok:
            raise EdgecamError(result.error or "the recorder refused the clip")
        return {"name": f"job {result.data['job']}", **result.data}

    def _streaming(self, on: bool) -> dict[str, Any]:
        self._live(on)
        return self.status()

    def commands(self) -> dict[str, Handler]:
        return {
            "streaming_start": lambda _args: self._streaming(True),
            "streaming_stop": lambda _args: self._streaming(False),
        }

    def status(self) -> dict[str, Any]:
        cfg = self.settings.fileserver
        return {
            "url": cfg.base_url(),
            "clips": len(self._store.clips()),
            "live": {name: {"running": v.running, **v.counts()} for name, v in self._views.items()},
        }


WORKERS: dict[str, type[Worker]] = {
    w.name: w for w in (InferenceWorker, RecorderWorker, StreamingWorker, FileServerWorker)
}

# Start order; shutdown goes the other way, so the pipeline ends (EOS) before the
# recorder and the RTSP server that take its video.
START_ORDER: tuple[str, ...] = ("fileserver", "streaming", "recorder", "inference")
