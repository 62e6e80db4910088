"""The one worker runner: what makes a worker a well-behaved process.

Every worker (``edgecam worker NAME``) runs through :func:`run_worker`, in this order:

1. take the worker's exclusive lock in the runtime folder (``<key>.lock``, ``flock``) --
   before touching anything shared, so a second copy is refused and changes nothing;
2. when supervised, die with the orchestrator (``PR_SET_PDEATHSIG``);
3. SIGTERM/SIGINT ask for an orderly stop, a second one forces the exit;
4. start the worker's resources, open its control socket (``<key>.sock``: its commands plus
   ``status``), tell the orchestrator it is ready, and send a heartbeat every second;
5. on stop: close the socket, then the resources, and exit 0 (1 when the worker failed).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, ClassVar, TextIO

from edgecam.config import SUPERVISOR_ENV, Settings
from edgecam.device.control import ControlServer, Handler, process_key, socket_path
from edgecam.device.events import EVENTS_SOCKET, EventSender, Heartbeat, Lifecycle
from edgecam.errors import ConfigError, EdgecamError
from edgecam.paths import secure_folder

__all__ = [
    "EXIT_CONFIG",
    "SUPERVISOR_ENV",
    "ProcessLock",
    "Worker",
    "WorkerContext",
    "run_worker",
]

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0
# sysexits' EX_CONFIG: the worker refused its configuration, which no restart would mend.
EXIT_CONFIG = 78
_PR_SET_PDEATHSIG = 1
# After a stop was asked for, a worker that has not exited by then is ended regardless.
_FORCED_EXIT_GRACE_S = 30.0


class ProcessLock:
    """An exclusive ``flock`` on ``<folder>/<key>.lock`` holding the owner's pid.

    The kernel drops the lock when the process dies, however it dies, so a lock is never
    stale; the pid inside is only for the message that names the holder.
    """

    def __init__(self, folder: Path, key: str) -> None:
        self.path = folder / f"{key}.lock"
        self._file: TextIO | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        f = os.fdopen(fd, "r+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = f.read().strip() or "?"
            f.close()
            raise EdgecamError(
                f"another {self.path.stem} is already running (pid {holder}); "
                "stop it first (nothing was changed)"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock; the file stays, harmlessly
            self._file = None


@dataclass(frozen=True)
class WorkerContext:
    """What a worker gets from the runner."""

    settings: Settings
    camera: str | None
    events: EventSender


class Worker:
    """Base of every worker: resources with an explicit life, run by :func:`run_worker`.

    ``start()`` brings the resources up (raise :class:`EdgecamError` to refuse);
    ``serve(stop)`` blocks until ``stop`` is set (or raises when the work failed);
    ``close()`` releases everything and is safe to call after a failed start.
    """

    name: ClassVar[str]
    per_camera: ClassVar[bool]
    # A device-wide worker that can also run for one camera alone (``--camera C``).
    camera_optional: ClassVar[bool] = False

    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.camera = ctx.camera

    @classmethod
    def enabled(cls, settings: Settings) -> bool:
        """Whether the configuration runs this worker at all."""
        return True

    @classmethod
    def check(cls, settings: Settings) -> None:
        """Raise :class:`ConfigError` when the configuration cannot run this worker (what
        no restart would mend); called before anything starts."""

    def start(self) -> None:
        raise NotImplementedError

    def serve(self, stop: threading.Event) -> None:
        stop.wait()

    def close(self) -> None:
        raise NotImplementedError

    def commands(self) -> dict[str, Handler]:
        """Commands of this worker's control socket, besides ``status``."""
        return {}

    def status(self) -> dict[str, Any]:
        return {}

    def healthy(self) -> bool:
        """False when the worker is alive but not doing its job (it will be restarted)."""
        return True

    def figures(self) -> dict[str, float]:
        """Counters sent with each heartbeat (frames, detections, ...)."""
        return {}


def _die_with_supervisor() -> None:
    """When an orchestrator started this worker, end with it (even after its kill -9)."""
    parent = os.environ.get(SUPERVISOR_ENV)
    if not parent:
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if str(os.getppid()) != parent:  # it died before the line above took effect
        raise EdgecamError("the orchestrator that started this worker is gone")


class _Heartbeat(threading.Thread):
    def __init__(self, worker: Worker, events: EventSender, stop: threading.Event) -> None:
        super().__init__(name=f"{worker.name}-heartbeat", daemon=True)
        self._worker = worker
        self._events = events
        self._stop = stop

    def run(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                healthy, figures = self._worker.healthy(), self._worker.figures()
            except Exception:
                log.exception("%s: health check failed", self._worker.name)
                healthy, figures = False, {}
            self._events.send(
                Heartbeat(
                    worker=self._worker.name,
                    camera=self._worker.camera,
                    healthy=healthy,
                    figures=figures,
                )
            )


def run_worker(worker_cls: type[Worker], settings: Settings, camera: str | None = None) -> int:
    """Run one worker until SIGTERM/SIGINT; 0 after a clean stop, :data:`EXIT_CONFIG` when
    it refused its configuration; raises when it failed (the command exits 1)."""
    name = worker_cls.name
    if worker_cls.per_camera or (worker_cls.camera_optional and camera is not None):
        _, cam = settings.camera(camera)
        camera = cam.name
    else:
        camera = None
    if not worker_cls.enabled(settings):
        log.info("the %s worker is disabled in the configuration; exiting", name)
        return 0
    try:
        worker_cls.check(settings)
    except ConfigError as exc:
        log.error("%s: %s", name, exc)
        print(f"edgecam worker {name}: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    _die_with_supervisor()
    folder = settings.runtime.dir
    secure_folder(folder, "runtime.dir")
    key = process_key(name, camera)
    lock = ProcessLock(folder, key)
    lock.acquire()
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():
            log.warning("%s: second %s; exiting now", key, signal.Signals(signum).name)
            os._exit(1)
        log.info("%s: %s, stopping", key, signal.Signals(signum).name)
        stop.set()
        timer = threading.Timer(_FORCED_EXIT_GRACE_S, _forced_exit, args=(key,))
        timer.daemon = True
        timer.start()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    events = EventSender(folder / EVENTS_SOCKET)
    worker = worker_cls(WorkerContext(settings, camera, events))
    control: ControlServer | None = None
    failed: str | None = None
    try:
        worker.start()
        handlers = {"status": lambda _args: worker.status(), **worker.commands()}
        control = ControlServer(socket_path(settings, name, camera), handlers, key)
        control.start()
        _Heartbeat(worker, events, stop).start()
        events.send(Lifecycle(worker=name, camera=camera, state="ready"))
        log.info("%s: ready", key)
        worker.serve(stop)
    except EdgecamError as exc:
        failed = str(exc) if not isinstance(exc, ConfigError) else f"configuration: {exc}"
        raise
    except Exception as exc:
        failed = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        stop.set()
        events.send(
            Lifecycle(
                worker=name,
                camera=camera,
                state="failed" if failed else "stopping",
                error=failed,
            )
        )
        if control is not None:
            control.stop()
        try:
            worker.close()
        finally:
            events.close()
            lock.release()
            for s, handler in previous.items():
                signal.signal(s, handler)
    return 0


def _forced_exit(key: str) -> None:
    log.error("%s: did not stop within %.0f s; exiting", key, _FORCED_EXIT_GRACE_S)
    logging.shutdown()
    time.sleep(0.1)
    os._exit(1)
