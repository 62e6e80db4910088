"""Worker processes watched and restarted one by one.

Each worker is a child process, ``edgecam worker NAME [--camera C]``, so ``ps`` shows which is
which. A child that exits or falls silent (no heartbeat, or unhealthy ones) is restarted
after a delay that doubles on each consecutive failure and starts afresh once it has run
``stable_s``; too many restarts in a window is a crash loop, reported in its state (and so
in status, stats and the ``worker_down`` alert) while the restarts go on at the longest
delay. Nothing a child does touches the others.

All methods are for one thread (the orchestrator's main loop): children started from one
thread die with it (``PR_SET_PDEATHSIG`` is per thread).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import stat
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from edgecam.config import Settings, SupervisorConfig
from edgecam.device.runner import EXIT_CONFIG, SUPERVISOR_ENV
from edgecam.device.workers import START_ORDER, WORKERS
from edgecam.protocol import WorkerState, WorkerStateName

__all__ = ["Child", "Supervisor", "open_worker_log", "trim_log", "worker_command"]

log = logging.getLogger(__name__)

_EXIT_FINISHED = 0  # a worker that exits 0 on its own has finished (a file source ended)
_LOG_CHECK_S = 10.0  # how often the workers' log files are measured
_MEMORY_CHECK_S = 2.0  # how often the workers' resident memory is read
_PAGE = os.sysconf("SC_PAGE_SIZE")
_NEW_LOG = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_COPY_CHUNK = 2**20


def worker_command(name: str, camera: str | None, config: Path | None) -> list[str]:
    """The command line of one worker, as ``ps`` will show it."""
    script = Path(sys.executable).with_name("edgecam")
    head = [sys.executable, str(script)] if script.exists() else [sys.executable, "-m", "edgecam"]
    cmd = [*head, "worker", name]
    if camera is not None:
        cmd += ["--camera", camera]
    if config is not None:
        cmd += ["--config", str(config)]
    return cmd


def open_worker_log(path: Path) -> int | None:
    """A descriptor appending to a worker's log file (made 0600), or None where ``path`` is
    a link or cannot be opened: the worker then logs to the device's own output. A link
    planted in the folder is not followed (the worker's output would go to its target)."""
    try:
        return os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
    except OSError as exc:
        log.error("cannot open log %s (%s): that worker logs to the device's output", path, exc)
        return None


def trim_log(path: Path, max_bytes: int) -> None:
    """``path`` copied to ``path.1`` (replacing it) and emptied, if it has grown past
    ``max_bytes``. Emptied even where the copy fails (a full disk): the bound holds.

    Only a regular file is trimmed, and no link is followed, to it or to the copy: whoever
    can write in the folder must not have another file emptied or overwritten, nor the
    supervisor wait on a FIFO. The bytes there when it was measured are copied, no more: a
    worker writing as fast as the copy would make it endless."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError as exc:
        log.warning("cannot look at log %s: %s", path, exc)
        return
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size <= max_bytes:
            return
        old = path.with_name(f"{path.name}.1")
        try:
            _copy_log(fd, info.st_size, old)
            kept = True
        except OSError as exc:
            kept = False
            log.warning("log %s emptied without keeping it: cannot write %s: %s", path, old, exc)
        try:
            os.ftruncate(fd, 0)
        except OSError as exc:
            log.warning("cannot empty log %s: %s", path, exc)
            return
    finally:
        os.close(fd)
    if kept:
        log.info("log %s passed %d bytes: moved to %s", path, max_bytes, old.name)


def _copy_log(fd: int, size: int, old: Path) -> None:
    """The first ``size`` bytes of ``fd`` to ``old``, through a new file beside it."""
    part = old.with_name(f"{old.name}.part")
    part.unlink(missing_ok=True)  # one left by a crash, or planted: made anew, 0600
    try:
        with open(os.open(part, _NEW_LOG, 0o600), "wb") as dst:
            done = 0
            while done < size and (chunk := os.pread(fd, min(_COPY_CHUNK, size - done), done)):
                dst.write(chunk)
                done += len(chunk)
        os.replace(part, old)
    except OSError:
        with contextlib.suppress(OSError):
            part.unlink(missing_ok=True)
        raise


@dataclass
class Child:
    """One supervised worker."""

    name: str
    camera: str | None
    enabled: bool
    state: WorkerStateName = "stopped"
    since: float = field(default_factory=time.monotonic)  # of the state
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    backoff: float = 0.0
    next_start: float = 0.0
    started_at: float = 0.0  # monotonic
    ready: bool = False
    last_heartbeat: float = 0.0  # monotonic
    last_healthy: float = 0.0  # monotonic
    failures: deque[float] = field(default_factory=deque)
    error: str | None = None
    figures: dict[str, float] = field(default_factory=dict)
    cpu: float | None = None
    rss_mb: float | None = None
    _ps: psutil.Process | None = None
    _stop_requested: float | None = None
    # Of the run now going: the error the worker reported, and why the supervisor killed it.
    _reported: str | None = None
    _killed_for: str | None = None

    @property
    def key(self) -> str:
        return self.name if self.camera is None else f"{self.name}/{self.camera}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def set_state(self, state: WorkerStateName, error: str | None = None) -> None:
        if state != self.state:
            self.state = state
            self.since = time.monotonic()
        if error is not None:
            self.error = error

    def snapshot(self) -> WorkerState:
        return WorkerState(
            name=self.name,
            camera=self.camera,
            state=self.state,
            pid=self.pid,
            restarts=self.restarts,
            # The wall clock may have been stepped since: the state's start as it reads now.
            since=max(0.0, time.time() - (time.monotonic() - self.since)),
            cpu=self.cpu,
            rss_mb=self.rss_mb,
            error=self.error,
        )


def _kill(child: Child, reason: str) -> None:
    """Kill ``child``'s running process for ``reason``, which its death is then put down to."""
    assert child.proc is not None
    child.error = child._killed_for = reason
    child.proc.kill()


class Supervisor:
    """Starts, watches, restarts and stops the device's workers."""

    def __init__(self, settings: Settings, config_file: Path | None, log_dir: Path | None) -> None:
        self.settings = settings
        self.config: SupervisorConfig = settings.supervisor
        self._config_file = config_file
        self._log_dir = log_dir
        self._log_max = settings.runtime.log_max_bytes
        self._next_log_check = self._next_memory_check = 0.0
        self.children: dict[str, Child] = {}
        for name in START_ORDER:
            cls = WORKERS[name]
            cameras: list[str | None] = (
                [c.name for c in settings.cameras] if cls.per_camera else [None]
            )
            for camera in cameras:
                enabled = cls.enabled(settings) and (
                    camera is None or settings.camera(camera)[1].enabled
                )
                child = Child(name, camera, enabled=enabled)
                if not child.enabled:
                    child.set_state("disabled")
                self.children[child.key] = child

    # -- selection -----------------------------------------------------------------------

    def select(self, worker: str, camera: str | None) -> list[Child]:
        """The children a command names: ``worker`` (all cameras when ``camera`` is None)."""
        if worker not in WORKERS:
            raise ValueError(f"unknown worker {worker!r}; known: {sorted(WORKERS)}")
        found = [
            c
            for c in self.children.values()
            if c.name == worker and (camera is None or c.camera == camera)
        ]
        if not found and not WORKERS[worker].per_camera:
            raise ValueError(f"the {worker} worker serves every camera: name no camera")
        if not found:
            raise ValueError(f"no {worker} worker for camera {camera!r}")
        return found

    def states(self) -> list[WorkerState]:
        return [c.snapshot() for c in self.children.values()]

    # -- life ----------------------------------------------------------------------------

    def start_all(self) -> None:
        for child in self.children.values():
            if child.enabled:
                self._spawn(child)

    def _spawn(self, child: Child) -> None:
        env = dict(os.environ)
        env[SUPERVISOR_ENV] = str(os.getpid())
        cmd = worker_command(child.name, child.camera, self._config_file)
        out: int | None = None
        if self._log_dir is not None:
            self._log_dir.mkdir(parents=True, exist_ok=True)
            out = open_worker_log(self._log_path(child))
        try:
            # A process group of its own: a Ctrl-C in the terminal reaches the orchestrator
            # alone, which stops the workers in order (they die with it in any case).
            child.proc = subprocess.Popen(
                cmd,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT if out is not None else None,
                process_group=0,
            )
        except OSError as exc:
            log.error("cannot start worker %s: %s", child.key, exc)
            child.set_state("restarting", str(exc))
            self._schedule_restart(child, time.monotonic())
            return
        finally:
            if out is not None:
                os.close(out)
        now = time.monotonic()
        child.started_at = now
        child.ready = False
        child.last_heartbeat = child.last_healthy = now
        child._stop_requested = None
        child._ps = None
        child._reported = child._killed_for = None
        child.set_state("starting")
        log.info("worker %s started (pid %d)", child.key, child.proc.pid)

    def _log_path(self, child: Child) -> Path:
        assert self._log_dir is not None
        return self._log_dir / f"{child.key.replace('/', '.')}.log"

    def _trim_logs(self, now: float) -> None:
        """Each worker's log file past ``runtime.log_max_bytes`` copied to NAME.log.1 and
        emptied (as logrotate's copytruncate): the worker writes on through its descriptor,
        opened O_APPEND, at the new end. What it writes between the copy and the emptying
        is lost; a device left for months must not fill its disk with logs."""
        if self._log_dir is None or now < self._next_log_check:
            return
        self._next_log_check = now + _LOG_CHECK_S
        for child in self.children.values():
            trim_log(self._log_path(child), self._log_max)

    def _check_memory(self, now: float) -> None:
        """Kill a worker past ``supervisor.max_worker_rss_mb``; it is restarted as one that
        died. Read from /proc: cheap enough for every couple of seconds."""
        limit = self.config.max_worker_rss_mb
        if limit is None or now < self._next_memory_check:
            return
        self._next_memory_check = now + _MEMORY_CHECK_S
        for child in self.children.values():
            proc = child.proc
            if proc is None or child._stop_requested is not None or proc.poll() is not None:
                continue
            try:
                with open(f"/proc/{proc.pid}/statm", "rb") as f:
                    rss_mb = int(f.read().split()[1]) * _PAGE / 2**20
            except (OSError, ValueError, IndexError):
                continue
            if rss_mb > limit:
                log.error(
                    "worker %s uses %.0f MiB, over supervisor.max_worker_rss_mb (%d); killing it",
                    child.key,
                    rss_mb,
                    limit,
                )
                _kill(child, f"used {rss_mb:.0f} MiB, over supervisor.max_worker_rss_mb ({limit})")

    def on_ready(self, key: str, pid: int) -> None:
        child = self.children.get(key)
        if child is None or child.pid != pid or child.state in ("stopping", "stopped"):
            return
        child.ready = True
        child.last_heartbeat = child.last_healthy = time.monotonic()
        child.set_state("running")
        child.error = None
        log.info("worker %s ready %.2f s after start", key, time.monotonic() - child.started_at)

    def on_heartbeat(self, key: str, pid: int, healthy: bool, figures: dict[str, float]) -> None:
        child = self.children.get(key)
        if child is None or child.pid != pid:
            return
        now = time.monotonic()
        child.last_heartbeat = now
        if healthy:
            child.last_healthy = now
        child.figures = figures

    def on_failed(self, key: str, pid: int, error: str | None) -> None:
        child = self.children.get(key)
        if child is not None and child.pid == pid and error:
            child.error = child._reported = error

    def poll(self) -> None:
        """Reap dead children, kill hung ones, start the ones whose delay is over; keep
        their log files within bounds."""
        now = time.monotonic()
        self._trim_logs(now)
        self._check_memory(now)
        for child in self.children.values():
            proc = child.proc
            if proc is not None:
                code = proc.poll()
                if code is not None:
                    self._reaped(child, code, now)
                elif child._stop_requested is not None:
                    if now - child._stop_requested > self.config.stop_timeout_s:
                        log.warning("worker %s did not stop in time; killing it", child.key)
                        proc.kill()
                elif child.ready and now - child.last_healthy > self.config.heartbeat_timeout_s:
                    why = (
                        "no heartbeat"
                        if now - child.last_heartbeat > self.config.heartbeat_timeout_s
                        else "unhealthy"
                    )
                    log.error("worker %s is hung (%s); killing it", child.key, why)
                    _kill(child, f"hung ({why} for {self.config.heartbeat_timeout_s:.0f} s)")
                elif not child.ready and now - child.started_at > self.config.start_timeout_s:
                    log.error(
                        "worker %s not ready after %.0f s; killing it",
                        child.key,
                        now - child.started_at,
                    )
                    _kill(child, "not ready in time")
            elif (
                child.enabled
                and child.state in ("restarting", "crash_loop")
                and now >= child.next_start
            ):
                child.restarts += 1
                self._spawn(child)

    def _reaped(self, child: Child, code: int, now: float) -> None:
        child.proc = None
        child.ready = False
        if child._stop_requested is not None or not child.enabled:
            child.set_state("disabled" if not child.enabled else "stopped")
            return
        if code == _EXIT_FINISHED:
            log.info("worker %s finished (exit 0)", child.key)
            child.set_state("stopped")
            return
        if code == EXIT_CONFIG:
            log.error("worker %s refused its configuration; not restarted", child.key)
            child.set_state("stopped", child._reported or "configuration error (see its log)")
            return
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
        # Of this death alone: an earlier one's reason, kept, would blame this one on it.
        child.error = f"{how}; {child._killed_for}" if child._killed_for else child._reported or how
        log.error("worker %s died (%s); restarting", child.key, how)
        self._schedule_restart(child, now)

    def _schedule_restart(self, child: Child, now: float) -> None:
        cfg = self.config
        if child.started_at and now - child.started_at >= cfg.stable_s:
            child.backoff = 0.0
        child.backoff = (
            cfg.restart_min_s if child.backoff == 0 else min(child.backoff * 2, cfg.restart_max_s)
        )
        child.failures.append(now)
        while child.failures and now - child.failures[0] > cfg.crash_loop_window_s:
            child.failures.popleft()
        if len(child.failures) > cfg.crash_loop_restarts:
            child.backoff = cfg.restart_max_s
            if child.state != "crash_loop":
                log.error(
                    "worker %s is crash-looping (%d failures in %.0f s); next try in %.0f s",
                    child.key,
                    len(child.failures),
                    cfg.crash_loop_window_s,
                    child.backoff,
                )
            child.set_state("crash_loop")
        else:
            child.set_state("restarting")
        child.next_start = now + child.backoff

    def restart(self, children: Iterable[Child]) -> None:
        """Stop (SIGTERM) and start again at once, without counting it as a failure."""
        for child in children:
            if not child.enabled:
                raise ValueError(f"worker {child.key} is disabled; enable it first")
            self._terminate(child)
            child.failures.clear()
            child.backoff = 0.0
            child.set_state("restarting")
            child.next_start = time.monotonic()
            child._stop_requested = None

    def enable(self, children: Iterable[Child]) -> None:
        for child in children:
            if not child.enabled:
                child.enabled = True
                child.failures.clear()
                child.backoff = 0.0
                self._spawn(child)

    def disable(self, children: Iterable[Child]) -> None:
        for child in children:
            child.enabled = False
            if child.proc is not None and child.proc.poll() is None:
                child.set_state("stopping")
                child._stop_requested = time.monotonic()
                child.proc.terminate()
            else:
                child.proc = None
                child.set_state("disabled")

    def _terminate(self, child: Child) -> None:
        """SIGTERM, wait up to stop_timeout_s, SIGKILL; blocks."""
        proc = child.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(self.config.stop_timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("worker %s did not stop in time; killing it", child.key)
                proc.kill()
                proc.wait()
        child.proc = None
        child.ready = False

    def stop_all(self, force: bool = False) -> dict[str, int | None]:
        """Ordered shutdown: inference first (its EOS ends the video), the file server last.
        ``force``: SIGKILL everything now. Returns each child's exit code."""
        codes: dict[str, int | None] = {}
        for name in reversed(START_ORDER):
            group = [c for c in self.children.values() if c.name == name and c.proc is not None]
            for child in group:
                assert child.proc is not None
                child.set_state("stopping")
                child._stop_requested = time.monotonic()
                if force:
                    child.proc.kill()
                elif child.proc.poll() is None:
                    child.proc.terminate()
            for child in group:
                assert child.proc is not None
                try:
                    codes[child.key] = child.proc.wait(0.1 if force else self.config.stop_timeout_s)
                except subprocess.TimeoutExpired:
                    log.warning("worker %s did not stop in time; killing it", child.key)
                    child.proc.kill()
                    codes[child.key] = child.proc.wait()
                child.proc = None
                child.set_state("stopped")
        return codes

    def measure(self) -> None:
        """CPU (cores, since the last call) and RSS of every running child."""
        for child in self.children.values():
            pid = child.pid
            if pid is None:
                child.cpu = child.rss_mb = None
                child._ps = None
                continue
            try:
                if child._ps is None or child._ps.pid != pid:
                    child._ps = psutil.Process(pid)
                    child._ps.cpu_percent(None)
                    child.cpu = None
                else:
                    child.cpu = round(child._ps.cpu_percent(None) / 100, 3)
                child.rss_mb = round(child._ps.memory_info().rss / 2**20, 1)
            except psutil.Error:
                child.cpu = child.rss_mb = None
