"""``edgecam run``: the device as one supervised system.

The orchestrator is the parent process. It starts every enabled worker as its own process
and supervises them (:mod:`edgecam.device.supervisor`); reads their events (frame
summaries, heartbeats, clips) from the local event channel; turns frames into statistics
and alerts; asks the recorder for a clip for every alert (extended while the alert lasts);
and is the device's only MQTT client (status, stats, alerts, clips out through the durable
outbox; commands in). The same command table answers MQTT and the local ``device.sock``
that ``edgecam status`` uses.

Threads: the main loop owns all state (supervisor, statistics, rules); the MQTT and control
socket threads hand it work through :meth:`Orchestrator.call` and wait for the answer.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import signal
import sqlite3
import threading
import time
import urllib.parse
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

import edgecam
from edgecam.config import Settings
from edgecam.device import homeassistant
from edgecam.device.control import (
    DEVICE,
    ControlServer,
    Handler,
    send_command,
    socket_path,
)
from edgecam.device.events import (
    EVENTS_SOCKET,
    ClipEvent,
    ClipFailed,
    Event,
    EventReceiver,
    FrameSummary,
    Heartbeat,
    Lifecycle,
)
from edgecam.device.fileserver import signed_url
from edgecam.device.mqtt import MqttLink
from edgecam.device.outbox import Outbox
from edgecam.device.rules import ActiveAlert, AlertChange, RuleEngine
from edgecam.device.runner import ProcessLock
from edgecam.device.stats import CameraFigures, IntervalStats
from edgecam.device.supervisor import Supervisor
from edgecam.device.upload import Uploads
from edgecam.device.workers import WORKERS
from edgecam.errors import EdgecamError
from edgecam.hostnames import beyond_local_network
from edgecam.paths import secure_folder
from edgecam.protocol import (
    Alert,
    ClipReady,
    Command,
    CommandResult,
    SaveClipArgs,
    SetRuleArgs,
    Stats,
    Status,
    TopicKind,
    WorkerArgs,
    topic,
)
from edgecam.vision.votes import PERSON

__all__ = ["Orchestrator", "run_device"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_POLL_S = 0.05  # reaping a dead worker is a waitpid per child: cheap
_RULES_EVERY_S = 1.0
_STATUS_MIN_GAP_S = 0.25
_CALL_TIMEOUT_S = 30.0
_RECORDER_TIMEOUT_S = 5.0
_SEEN_COMMANDS = 1024
_SIGNAL_BURST_S = 0.5
_EVENTS_PER_TURN = 500
_MASK_LABELS = ("mask", "no_mask", "undecided")
_ID_RE = re.compile(r"[0-9a-f]{32}")
# Wall and monotonic time disagreeing by more than this: the wall clock was stepped.
_CLOCK_STEP_S = 5.0


class Orchestrator:
    """The device: workers, statistics, alerts, MQTT. ``run()`` until SIGTERM/SIGINT."""

    def __init__(self, settings: Settings, config_file: Path | None = None) -> None:
        self.settings = settings
        self.config_file = config_file.resolve() if config_file is not None else None
        self.cameras = [c.name for c in settings.cameras]
        self.labels: tuple[str, ...] = (
            _MASK_LABELS if settings.vision.profile == "mask" else (PERSON,)
        )
        self.supervisor = Supervisor(settings, self.config_file, settings.runtime.log_dir)
        self.rules = RuleEngine(settings.alerts, settings.cameras)
        self.started = time.time()
        self._actions: queue.Queue[tuple[Callable[[], Any], Future[Any]]] = queue.Queue()
        self._stop = threading.Event()
        self._signals = 0
        self._first_signal = 0.0
        now = time.time()
        self._intervals = {c: IntervalStats(now, time.monotonic()) for c in self.cameras}
        self._figures = {c: CameraFigures() for c in self.cameras}
        self._figures_at_start = {c: CameraFigures() for c in self.cameras}
        # Monotonic, like every duration the rules measure: the wall clock may be stepped.
        self._last_frame: dict[str, float] = dict.fromkeys(self.cameras, time.monotonic())
        self._current_counts: dict[str, dict[str, int]] = {c: {} for c in self.cameras}
        self._alert_jobs: dict[str, ActiveAlert] = {}
        self._last_stats: dict[str, Stats] = {}
        self._outbox_errors = 0
        self._uploads: Uploads | None = None
        self._alerts_extended: dict[str, float] = {}  # alert id -> monotonic time
        self._clips_announced: OrderedDict[str, None] = OrderedDict()
        self._seen_commands: OrderedDict[str, None] = OrderedDict()
        self._last_status_key: object = None
        self._last_status_at = 0.0
        self._status_seq = 0
        self._status_dirty = True
        self.outbox: Outbox | None = None
        self.mqtt: MqttLink | None = None
        self.control: ControlServer | None = None
        self._commands_in: queue.Queue[tuple[str, bytes] | None] = queue.Queue(maxsize=256)

    # -- the command table -----------------------------------------------------------------

    def handlers(self) -> dict[str, Handler]:
        return {
            "save_clip": self._cmd_save_clip,
            "streaming_start": lambda args: self._cmd_streaming("streaming_start", args),
            "streaming_stop": lambda args: self._cmd_streaming("streaming_stop", args),
            "worker_restart": lambda args: self._cmd_worker("restart", args),
            "worker_enable": lambda args: self._cmd_worker("enable", args),
            "worker_disable": lambda args: self._cmd_worker("disable", args),
            "status": lambda _args: self.call(lambda: self.status().model_dump(mode="json")),
            "set_rule": self._cmd_set_rule,
            "counts": lambda _args: self.call(lambda: {"counts": dict(self._current_counts)}),
        }

    def call(self, func: Callable[[], _T], timeout: float = _CALL_TIMEOUT_S) -> _T:
        """Run ``func`` in the main loop and return its result (from any other thread)."""
        future: Future[_T] = Future()
        self._actions.put((func, future))
        return future.result(timeout=timeout)

    def _cmd_save_clip(self, raw: dict[str, Any]) -> dict[str, Any]:
        args = SaveClipArgs.model_validate(raw)
        _, cam = self.settings.camera(args.camera)
        return self._request_clip(cam.name, args.model_copy(update={"camera": cam.name}))

    def _request_clip(self, camera: str, args: SaveClipArgs) -> dict[str, Any]:
        if not self.settings.recorder.enabled:
            raise EdgecamError("the recorder is disabled (recorder.enabled): no clips")
        job = args.job or uuid.uuid4().hex
        command = Command(name="save_clip", args=args.model_dump(exclude_none=True) | {"job": job})
        result = send_command(
            socket_path(self.settings, "recorder", camera), command, timeout=_RECORDER_TIMEOUT_S
        )
        if not result.ok:
            raise EdgecamError(result.error or "the recorder refused the clip")
        return result.data

    def _cmd_streaming(self, name: str, raw: dict[str, Any]) -> dict[str, Any]:
        """RTSP and the live view in the browser start and stop together."""
        if raw:
            raise ValueError(f"{name} takes no arguments (it applies to every camera)")
        if not self.settings.streaming.enabled:
            raise EdgecamError("streaming is disabled in the configuration (streaming.enabled)")
        result = send_command(
            socket_path(self.settings, "streaming"), Command(name=name), timeout=_CALL_TIMEOUT_S
        )
        if not result.ok:
            raise EdgecamError(result.error or f"the streaming worker refused {name}")
        data = dict(result.data)
        if self.settings.fileserver.enabled and self.settings.live.enabled:
            live = send_command(
                socket_path(self.settings, "fileserver"),
                Command(name=name),
                timeout=_CALL_TIMEOUT_S,
            )
            if not live.ok:
                raise EdgecamError(live.error or f"the live view refused {name}")
            data["live"] = live.data.get("live", {})
        self._status_dirty = True
        return data

    def _cmd_worker(self, action: str, raw: dict[str, Any]) -> dict[str, Any]:
        args = WorkerArgs.model_validate(raw)

        def run() -> dict[str, Any]:
            children = self.supervisor.select(args.worker, args.camera)
            getattr(self.supervisor, action)(children)
            self._status_dirty = True
            return {"workers": [c.snapshot().model_dump(mode="json") for c in children]}

        return self.call(run, timeout=_CALL_TIMEOUT_S + self.settings.supervisor.stop_timeout_s)

    def _cmd_set_rule(self, raw: dict[str, Any]) -> dict[str, Any]:
        args = SetRuleArgs.model_validate(raw)

        def run() -> dict[str, Any]:
            params = self.rules.set_rule(args.rule, args.params)
            self._status_dirty = True
            log.info("rule %s set to %s", args.rule, params)
            return {"rule": args.rule, "params": params}

        return self.call(run)

    # -- life ------------------------------------------------------------------------------

    def check(self) -> None:
        """Refuse a configuration that no restart would mend, before anything starts."""
        for child in self.supervisor.children.values():
            if child.enabled:
                WORKERS[child.name].check(self.settings)

    def run(self) -> int:
        """Run the device until SIGTERM/SIGINT; 0 after an orderly stop."""
        self.check()
        folder = self.settings.runtime.dir
        secure_folder(folder, "runtime.dir")
        lock = ProcessLock(folder, DEVICE)
        lock.acquire()  # before anything is touched: a second device changes nothing
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        receiver = EventReceiver(folder / EVENTS_SOCKET)
        command_thread: threading.Thread | None = None
        try:
            self._start_mqtt()
            self.control = ControlServer(
                socket_path(self.settings, DEVICE), self.handlers(), DEVICE
            )
            self.control.start()
            command_thread = threading.Thread(
                target=self._command_loop, name="commands", daemon=True
            )
            command_thread.start()
            self._start_uploads()
            log.info(
                "device %s: %d camera(s) %s, profile %s",
                self.settings.device,
                len(self.cameras),
                self.cameras,
                self.settings.vision.profile,
            )
            self.supervisor.start_all()
            self._loop(receiver)
        finally:
            log.info("device %s: stopping", self.settings.device)
            codes = self.supervisor.stop_all()
            for key, code in codes.items():
                log.info("worker %s stopped (exit %s)", key, code)
            self._commands_in.put(None)
            if self._uploads is not None:
                self._uploads.stop()
            if self.control is not None:
                self.control.stop()
            self._fail_pending_calls()
            if self.mqtt is not None:
                self.mqtt.stop(final_status=self.status(state="offline"))
            if self.outbox is not None:
                self.outbox.close()
            receiver.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
            lock.release()
        return 0

    def stop(self) -> None:
        """Ask :meth:`run` to end (from any thread)."""
        self._stop.set()

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        now = time.monotonic()
        if now - self._first_signal < _SIGNAL_BURST_S:
            return  # the same signal again at once (sent to the process and its group)
        self._signals += 1
        self._first_signal = self._first_signal or now
        if self._signals > 1:
            log.warning("second %s: killing every worker now", signal.Signals(signum).name)
            for child in self.supervisor.children.values():
                if child.proc is not None and child.proc.poll() is None:
                    child.proc.kill()
            os._exit(1)
        log.info("%s: orderly shutdown (a second signal forces it)", signal.Signals(signum).name)
        self._stop.set()

    def _fail_pending_calls(self) -> None:
        while True:
            try:
                _func, future = self._actions.get_nowait()
            except queue.Empty:
                return
            future.set_exception(EdgecamError("the device is stopping"))

    # -- main loop -------------------------------------------------------------------------

    def _loop(self, receiver: EventReceiver) -> None:
        next_poll = next_rules = 0.0
        next_stats = time.monotonic() + self.settings.stats.interval_s
        self.supervisor.measure()
        while not self._stop.is_set():
            event = receiver.receive(0.05)
            handled = 0
            while event is not None and handled < _EVENTS_PER_TURN:
                self._guarded(self._on_event, event)
                handled += 1
                event = receiver.receive(0)
            self._run_actions()
            now = time.monotonic()
            if now >= next_poll:
                next_poll = now + _POLL_S
                self._guarded(self.supervisor.poll)
            if now >= next_rules:
                next_rules = now + _RULES_EVERY_S
                self._guarded(self._tick_rules)
            if now >= next_stats:
                next_stats += self.settings.stats.interval_s
                self._guarded(self._emit_stats)
            self._guarded(self._maybe_publish_status)

    def _guarded(self, func: Callable[..., object], *args: object) -> None:
        """The device runs for months: a bug in handling one event or one tick is logged,
        and the device goes on (the workers are not taken down with it)."""
        try:
            func(*args)
        except Exception:
            log.exception("orchestrator: %s failed; going on", getattr(func, "__name__", func))

    def _run_actions(self) -> None:
        while True:
            try:
                func, future = self._actions.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(func())
            except BaseException as exc:
                future.set_exception(exc)

    def _on_event(self, event: Event) -> None:
        key = event.worker if event.camera is None else f"{event.worker}/{event.camera}"
        if isinstance(event, FrameSummary):
            self._on_frame(event)
        elif isinstance(event, Heartbeat):
            self.supervisor.on_heartbeat(key, event.pid, event.healthy, event.figures)
            if event.worker == "inference":
                self._camera_figures(event.figures)
        elif isinstance(event, Lifecycle):
            if event.state == "ready":
                self.supervisor.on_ready(key, event.pid)
            else:
                self.supervisor.on_failed(key, event.pid, event.error)
            self._status_dirty = True
        elif isinstance(event, ClipEvent):
            self._on_clip(event.clip)
        elif isinstance(event, ClipFailed):
            log.error("clip %s of %s failed: %s", event.request_id, event.camera, event.error)
            self._alert_jobs.pop(event.request_id, None)

    def _camera_figures(self, figures: dict[str, float]) -> None:
        """The inference worker reports each camera's counters as ``CAMERA/NAME``."""
        for camera in self._figures:
            if f"{camera}/frames_out" in figures:
                self._figures[camera] = CameraFigures(
                    figures.get(f"{camera}/frames_in", 0.0),
                    figures.get(f"{camera}/frames_out", 0.0),
                    figures.get(f"{camera}/detections", 0.0),
                )

    def _on_frame(self, event: FrameSummary) -> None:
        camera = event.camera
        if camera not in self._intervals:
            return
        self._intervals[camera].add_frame(event.pid, event.tracks, event.zones, event.lines)
        self._last_frame[camera] = time.monotonic()
        counts = dict.fromkeys(self.labels, 0)
        for _tid, label in event.tracks:
            counts[label] = counts.get(label, 0) + 1
        self._current_counts[camera] = counts
        self._on_alerts(
            self.rules.on_frame(
                camera,
                self._last_frame[camera],
                event.pid,
                event.tracks,
                event.zones,
                event.lines,
                wall=event.wall_time,
            )
        )

    def _tick_rules(self) -> None:
        now, wall = time.monotonic(), time.time()
        inference = self.supervisor.children["inference"].enabled
        watched = {
            c: self._last_frame[c]
            for c in self.cameras
            if inference and self.settings.camera(c)[1].enabled
        }
        self._on_alerts(self.rules.tick(now, watched, self.supervisor.states(), wall=wall))
        # While an alert lasts, its clip is extended (same key): one incident, one clip.
        every = max(1.0, self.settings.recorder.post_s / 2)
        for alert in self.rules.active.values():
            last = self._alerts_extended.get(alert.alert_id)
            if last is not None and now - last >= every:
                self._clip_for(alert)

    # -- alerts ----------------------------------------------------------------------------

    def _on_alerts(self, changes: list[AlertChange]) -> None:
        for change in changes:
            alert = change.alert
            if change.change == "raised":
                log.warning("ALERT %s: %s", alert.rule, alert.message)
                self._publish_alert(alert, "raised")
                self._clip_for(alert)
            else:
                log.info("alert %s ended: %s", alert.rule, alert.message)
                self._alerts_extended.pop(alert.alert_id, None)
                self._publish_alert(alert, "ended")

    def _clip_for(self, alert: ActiveAlert) -> None:
        camera = alert.camera
        recorder = self.supervisor.children.get(f"recorder/{camera}")
        if not self.settings.alerts.clip or recorder is None or recorder.state != "running":
            return
        assert camera is not None
        self._alerts_extended[alert.alert_id] = time.monotonic()
        job = uuid.uuid4().hex
        self._alert_jobs[job] = alert
        args = SaveClipArgs(
            camera=camera,
            reason=f"alert:{alert.rule}",
            key=alert.alert_id,
            job=job,
            counts=self._current_counts.get(camera, {}),
        )
        try:
            self._request_clip(camera, args)
        except EdgecamError as exc:
            self._alert_jobs.pop(job, None)
            log.error("no clip for alert %s: %s", alert.rule, exc)

    def _publish_alert(self, alert: ActiveAlert, state: str) -> None:
        url = self._clip_url(alert.clip) if alert.clip else None
        payload = Alert(
            device=self.settings.device,
            camera=alert.camera,
            alert_id=alert.alert_id,
            rule=alert.rule,
            state=state,  # type: ignore[arg-type]
            message=alert.message,
            value=alert.value,
            threshold=alert.threshold,
            started=alert.started,
            ended=alert.ended,
            clip=alert.clip,
            clip_url=url,
        )
        self._send("alerts", payload)
        if alert.camera is not None:
            self._publish_homeassistant_state(alert.camera)

    def _clip_url(self, name: str) -> str | None:
        cfg = self.settings.fileserver
        if not cfg.enabled or cfg.token is None:
            return None
        return cfg.base_url() + signed_url(self.settings, name)

    def _on_clip(self, clip: ClipReady) -> None:
        alerts = [self._alert_jobs.pop(r) for r in clip.request_ids if r in self._alert_jobs]
        alert = alerts[0] if alerts else None
        if clip.name not in self._clips_announced:
            self._clips_announced[clip.name] = None
            while len(self._clips_announced) > _SEEN_COMMANDS:
                self._clips_announced.popitem(last=False)
            public = clip.model_copy(
                update={
                    "url": self._clip_url(clip.name),
                    "alert_id": alert.alert_id if alert else None,
                }
            )
            log.info("clip ready: %s (%.1f s) %s", clip.name, clip.duration, clip.reason)
            self._send("clips", public)
            if self._uploads is not None:
                self._uploads.add(clip)
        for a in {id(x): x for x in alerts}.values():
            if a.clip != clip.name:
                a.clip = clip.name
                self._publish_alert(a, "clip")

    # -- statistics and status -------------------------------------------------------------

    def _emit_stats(self) -> None:
        self.supervisor.measure()
        now, steady = time.time(), time.monotonic()
        interval = self.settings.stats.interval_s
        states = self.supervisor.states()
        for camera in self.cameras:
            current = self._intervals[camera]
            self._intervals[camera] = IntervalStats(now, steady)
            figures = self._figures[camera]
            delta = figures.minus(self._figures_at_start[camera])
            self._figures_at_start[camera] = figures
            # Rates over the monotonic length; the interval is placed by the wall clock as
            # it reads now, so that a step of that clock does not make it years long, or
            # end before it starts.
            span = current.span(steady)
            if abs((now - current.start) - span) > _CLOCK_STEP_S:
                log.warning(
                    "stats %s: the wall clock moved %+.0f s during the interval; its start is "
                    "reported as %.0f s before now",
                    camera,
                    (now - current.start) - span,
                    span,
                )
            counts = current.counts(self.labels)
            stats = Stats(
                device=self.settings.device,
                camera=camera,
                seq=self.outbox.next_seq() if self.outbox is not None else 0,
                start=max(0.0, now - span),
                end=now,
                counts=counts,
                people=sum(counts.values()),
                peak=current.peak,
                fps_in=round(delta.frames_in / span, 2),
                fps_out=round(delta.frames_out / span, 2),
                detections_per_s=round(delta.detections / span, 2),
                frames_dropped=max(0, int(delta.frames_in - delta.frames_out)),
                zones=current.zone_figures(),
                lines=current.line_figures(),
                workers=[w for w in states if w.camera in (None, camera)],
            )
            log.info(
                "stats %s: %s people (%s), peak %d, %.1f fps, %.1f detections/s over %.0f s",
                camera,
                stats.people,
                counts,
                stats.peak,
                stats.fps_out,
                stats.detections_per_s,
                interval,
            )
            self._send("stats", stats)
            self._publish_homeassistant_state(camera, stats)

    def status(self, state: str = "online") -> Status:
        self._status_seq += 1
        return Status(
            seq=self._status_seq,
            device=self.settings.device,
            state=state,  # type: ignore[arg-type]
            version=edgecam.__version__,
            profile=self.settings.vision.profile,
            cameras=self.cameras,
            workers=self.supervisor.states(),
            started=self.started,
            rules=self.rules.describe(),
            outbox=len(self.outbox) if self.outbox is not None else None,
            outbox_dropped=self.outbox.dropped if self.outbox is not None else None,
            uploads=self._uploads.waiting() if self._uploads is not None else None,
            broker=None
            if self.mqtt is None
            else ("connected" if self.mqtt.connected else "disconnected"),
        )

    def _maybe_publish_status(self) -> None:
        # Rule changes set _status_dirty themselves.
        key = (
            tuple((c.key, c.state, c.restarts) for c in self.supervisor.children.values()),
            self._uploads.waiting() if self._uploads is not None else None,
        )
        now = time.monotonic()
        if key == self._last_status_key and not self._status_dirty:
            return
        if now - self._last_status_at < _STATUS_MIN_GAP_S:
            return
        self._last_status_key = key
        self._last_status_at = now
        self._status_dirty = False
        if self.mqtt is not None:
            self.mqtt.publish_now(
                self._topic("status"), self.status().model_dump_json().encode(), True
            )

    # -- MQTT ----------------------------------------------------------------------------

    def _topic(self, kind: TopicKind) -> str:
        return topic(self.settings.mqtt.prefix, self.settings.device, kind)

    def _send(self, kind: TopicKind, payload: BaseModel) -> None:
        if self.outbox is None:
            if kind != "stats":
                log.info("%s: %s", kind, payload.model_dump_json())
            return
        try:
            self.outbox.put(self._topic(kind), payload.model_dump_json().encode())
        except (sqlite3.Error, OSError) as exc:  # e.g. its disk is full: lose this one
            self._outbox_errors += 1
            if self._outbox_errors == 1 or self._outbox_errors % 100 == 0:
                log.error(
                    "cannot store a %s message in the outbox %s (%d lost so far): %s",
                    kind,
                    self.settings.mqtt.outbox,
                    self._outbox_errors,
                    exc,
                )

    def _start_mqtt(self) -> None:
        for warning in sent_in_clear(self.settings):
            log.warning("%s", warning)
        cfg = self.settings.mqtt
        if cfg.host is None:
            log.info(
                "no MQTT broker configured (mqtt.host): the device runs alone; "
                "statistics and alerts go to this log"
            )
            return
        self.outbox = Outbox(cfg.outbox, cfg.outbox_max_messages, cfg.outbox_max_bytes)
        if len(self.outbox):
            log.info("outbox: %d message(s) from an earlier run to send", len(self.outbox))
        discovery = cfg.discovery if cfg.discovery is not None else True
        extra = homeassistant.command_topics(self.settings) if discovery else ()
        self.mqtt = MqttLink(
            cfg,
            self.settings.device,
            self.outbox,
            self._on_mqtt_message,
            offline=lambda: self.status(state="offline"),
            extra_topics=extra,
        )

        def on_connect() -> None:
            assert self.mqtt is not None
            self.mqtt.publish_now(
                self._topic("status"), self.status().model_dump_json().encode(), retain=True
            )
            if discovery:
                for name, payload in homeassistant.discovery_messages(self.settings):
                    self.mqtt.publish_now(name, payload, retain=True)

        self.mqtt.on_connect(on_connect)
        self.mqtt.start()

    def _on_mqtt_message(self, name: str, payload: bytes) -> None:
        try:
            self._commands_in.put_nowait((name, payload))
        except queue.Full:
            log.warning("commands arrive faster than they are handled; one on %s dropped", name)

    def _command_loop(self) -> None:
        """Commands from MQTT, one at a time, each answered on ``cmd/result``."""
        assert self.control is not None
        while (item := self._commands_in.get()) is not None:
            name, payload = item
            if name != self._topic("cmd"):
                command = homeassistant.command_for(self.settings, name, payload)
                if command is None:
                    continue
                payload = command.model_dump_json().encode()
            command_id = _peek_id(payload)
            if command_id is not None:
                if command_id in self._seen_commands:
                    log.info("command %s replayed; answered already", command_id)
                    continue
                self._seen_commands[command_id] = None
                while len(self._seen_commands) > _SEEN_COMMANDS:
                    self._seen_commands.popitem(last=False)
            result = self.control.handle_line(payload)
            if not result.ok:
                log.warning("command %s refused: %s", command_id or "?", result.error)
            if result.command_id == "" and command_id is not None:
                result = result.model_copy(update={"command_id": command_id})
            self._send_result(result)

    def _start_uploads(self) -> None:
        """Every clip to the fleet server, off the main loop, through a queue on disk."""
        cfg = self.settings.upload
        if cfg.url is None or cfg.token is None:
            return
        self._uploads = Uploads(
            cfg.queue,
            self.settings.recorder.clips_dir,
            cfg.url,
            self.settings.device,
            cfg.token.get_secret_value(),
            attempts=cfg.attempts,
        )
        self._uploads.start()

    def _send_result(self, result: CommandResult) -> None:
        self._send("cmd/result", result)

    def _publish_homeassistant_state(self, camera: str, stats: Stats | None = None) -> None:
        if self.mqtt is None or self.settings.mqtt.discovery is False:
            return
        if stats is not None:
            self._last_stats[camera] = stats
        alert = any(a.camera == camera for a in self.rules.active.values())
        streaming = self.supervisor.children["streaming"].figures.get("streaming")
        name, payload = homeassistant.state_message(
            self.settings, camera, self._last_stats.get(camera), alert, bool(streaming)
        )
        self.mqtt.publish_now(name, payload, retain=True)


def sent_in_clear(settings: Settings) -> list[str]:
    """What this config sends unencrypted to a host beyond the local network: a warning
    each (a secret read on the way is a device taken over)."""
    warnings = []
    mqtt = settings.mqtt
    if mqtt.host and not mqtt.tls and mqtt.password and beyond_local_network(mqtt.host):
        warnings.append(
            f"MQTT to {mqtt.host} without TLS: the broker password, the commands and every "
            "message cross the network unencrypted; set mqtt.tls: true"
        )
    url = urllib.parse.urlsplit(settings.upload.url or "")
    if url.scheme == "http" and url.hostname and beyond_local_network(url.hostname):
        warnings.append(
            f"upload.url is plain HTTP to {url.hostname}: the device's upload token and its "
            "clips cross the network unencrypted; use https://"
        )
    return warnings


def _peek_id(payload: bytes) -> str | None:
    """The ``id`` of a command payload, when it has a well-formed one."""
    try:
        return Command.model_validate_json(payload).id
    except ValidationError:
        pass
    try:
        raw = json.loads(payload)
    except ValueError:
        return None
    value = raw.get("id") if isinstance(raw, dict) else None
    return value if isinstance(value, str) and _ID_RE.fullmatch(value) else None


def run_device(settings: Settings, config_file: Path | None = None) -> int:
    """``edgecam run``."""
    return Orchestrator(settings, config_file).run()
