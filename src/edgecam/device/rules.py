"""Alert rules: what the device watches for, each with a cool-down, changeable at run time.

Pure logic over a clock given by the caller, so that tests drive it frame by frame. The
device gives it monotonic time, as every rule is about durations (a hold, a window, a
cool-down) and the wall clock may be stepped by years (NTP on a board without a clock
battery); the wall time, given beside it, only stamps the alerts' start and end.

:meth:`RuleEngine.on_frame` for the per-frame rules (``no_mask``, ``occupancy``, and per
zone or line ``zone_occupancy``, ``dwell``, ``line_crossing``),
:meth:`RuleEngine.tick` for the ones about time passing (``camera_offline``,
``worker_down``). Each returns the alerts that were raised or ended.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel

from edgecam.config import AlertsConfig, CameraConfig, check_rule_regions
from edgecam.device.events import LineFrame, ZoneFrame
from edgecam.protocol import WorkerState

__all__ = ["RULES", "ActiveAlert", "AlertChange", "RuleEngine"]

RULES = (
    "no_mask",
    "occupancy",
    "camera_offline",
    "worker_down",
    "zone_occupancy",
    "dwell",
    "line_crossing",
)
_DOWN_STATES = frozenset({"restarting", "crash_loop", "starting"})


@dataclass
class ActiveAlert:
    rule: str
    camera: str | None
    subject: str
    started: float  # wall time
    value: float
    threshold: float
    message: str
    alert_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    ended: float | None = None
    clip: str | None = None


@dataclass(frozen=True)
class AlertChange:
    change: Literal["raised", "ended"]
    alert: ActiveAlert


@dataclass
class _Occupancy:
    over_since: float | None = None
    under_since: float | None = None


@dataclass
class _MaskWindow:
    # (source, track id) -> (last seen wall time, label): decided labels only.
    seen: dict[tuple[int, int], tuple[float, str]] = field(default_factory=dict)


class RuleEngine:
    """The rules of :class:`~edgecam.config.AlertsConfig` over the device's cameras."""

    def __init__(self, config: AlertsConfig, cameras: list[CameraConfig] | None = None) -> None:
        self.config = config
        self._cameras = cameras  # whose zones and lines rules may name; None: any
        self.active: dict[tuple[str, str], ActiveAlert] = {}
        self._quiet_until: dict[tuple[str, str], float] = {}
        self._occupancy: dict[str, _Occupancy] = {}
        self._masks: dict[str, _MaskWindow] = {}
        self._zone_occupancy: dict[str, _Occupancy] = {}
        self._forbidden_at: dict[str, float] = {}  # camera/line -> last forbidden crossing
        self._wall: float | None = None  # the wall time of the frame or tick being evaluated

    # -- parameters -------------------------------------------------------------------

    def describe(self) -> dict[str, dict[str, Any]]:
        """Every rule and its parameters."""
        return {name: getattr(self.config, name).model_dump(mode="json") for name in RULES}

    def set_rule(self, rule: str, params: dict[str, Any]) -> dict[str, Any]:
        """Change some of ``rule``'s parameters (validated like the config file); its new
        parameters. Raises ValueError naming what is wrong."""
        if rule not in RULES:
            raise ValueError(f"unknown rule {rule!r}; known: {list(RULES)}")
        current: BaseModel = getattr(self.config, rule)
        updated = type(current).model_validate({**current.model_dump(), **params})
        config = self.config.model_copy(update={rule: updated})
        if self._cameras is not None:
            check_rule_regions(config, self._cameras)
        self.config = config
        return updated.model_dump(mode="json")

    # -- evaluation -------------------------------------------------------------------

    def on_frame(
        self,
        camera: str,
        now: float,
        source: int,
        tracks: list[tuple[int, str]],
        zones: Mapping[str, ZoneFrame] | None = None,
        lines: Mapping[str, LineFrame] | None = None,
        *,
        wall: float | None = None,
    ) -> list[AlertChange]:
        """One frame's counted tracks (id, label) of ``camera`` at time ``now``, and its
        zones and lines; ``wall``: its wall time (default ``now``)."""
        self._wall = wall
        changes: list[AlertChange] = []
        changes += self._check_occupancy(camera, now, len(tracks))
        changes += self._check_no_mask(camera, now, source, tracks)
        for name, zone in (zones or {}).items():
            changes += self._check_zone(camera, name, now, zone)
        for name, line in (lines or {}).items():
            changes += self._check_line(camera, name, now, line)
        return changes

    def _check_zone(
        self, camera: str, zone: str, now: float, frame: ZoneFrame
    ) -> list[AlertChange]:
        subject = f"{camera}/{zone}"
        rule = self.config.zone_occupancy
        watched = not rule.zones or zone in rule.zones
        state = self._zone_occupancy.setdefault(subject, _Occupancy())
        count = frame.occupancy
        if count > rule.max_people:
            state.under_since = None
            state.over_since = state.over_since if state.over_since is not None else now
        else:
            state.over_since = None
            state.under_since = state.under_since if state.under_since is not None else now
        changes = self._update(
            "zone_occupancy",
            camera,
            subject,
            now,
            tripped=rule.enabled
            and watched
            and state.over_since is not None
            and now - state.over_since >= rule.hold_s,
            cleared=state.under_since is not None and now - state.under_since >= rule.clear_s,
            value=float(count),
            threshold=float(rule.max_people),
            message=f"camera {camera}: {count} people in zone {zone} (limit {rule.max_people})",
            cooldown=rule.cooldown_s,
        )
        dwell = self.config.dwell
        over = frame.longest_s >= dwell.max_s
        changes += self._update(
            "dwell",
            camera,
            subject,
            now,
            tripped=dwell.enabled and (not dwell.zones or zone in dwell.zones) and over,
            cleared=not over,
            value=round(frame.longest_s, 1),
            threshold=dwell.max_s,
            message=f"camera {camera}: someone in zone {zone} for {frame.longest_s:.0f} s "
            f"(limit {dwell.max_s:.0f} s)",
            cooldown=dwell.cooldown_s,
        )
        return changes

    def _check_line(
        self, camera: str, line: str, now: float, frame: LineFrame
    ) -> list[AlertChange]:
        subject = f"{camera}/{line}"
        rule = self.config.line_crossing
        direction = rule.forbidden.get(line)
        if direction is None and subject not in self.active:
            return []
        crossed = frame.crossed_in if direction == "in" else frame.crossed_out
        if direction is not None and crossed:
            self._forbidden_at[subject] = now
        last = self._forbidden_at.get(subject)
        return self._update(
            "line_crossing",
            camera,
            subject,
            now,
            tripped=rule.enabled and direction is not None and crossed > 0,
            cleared=last is None or now - last >= rule.clear_s,
            value=float(crossed),
            threshold=0.0,
            message=f"camera {camera}: {crossed} crossing(s) of line {line} in the forbidden "
            f"direction ({direction})",
            cooldown=rule.cooldown_s,
        )

    def tick(
        self,
        now: float,
        last_frame: Mapping[str, float | None],
        workers: Iterable[WorkerState],
        *,
        wall: float | None = None,
    ) -> list[AlertChange]:
        """Time passed: cameras without frames (``last_frame``: camera -> time of its last
        frame, on the clock of ``now``; None when it never had one) and workers down (their
        ``since`` is a wall time: ``wall``, default ``now``, is the wall time now)."""
        self._wall = wall
        wall = now if wall is None else wall
        changes: list[AlertChange] = []
        off = self.config.camera_offline
        for camera, last in last_frame.items():
            silent = now - last if last is not None else 0.0
            changes += self._update(
                "camera_offline",
                camera,
                camera,
                now,
                tripped=off.enabled and silent >= off.after_s,
                cleared=silent < off.after_s,
                value=silent,
                threshold=off.after_s,
                message=f"camera {camera}: no video for {silent:.0f} s",
                cooldown=off.cooldown_s,
            )
        down = self.config.worker_down
        for w in workers:
            for_s = wall - w.since if w.state in _DOWN_STATES and w.restarts > 0 else 0.0
            looping = w.state == "crash_loop"
            changes += self._update(
                "worker_down",
                w.camera,
                w.key,
                now,
                tripped=down.enabled and (looping or (for_s > 0 and for_s >= down.after_s)),
                cleared=w.state == "running",
                value=float(w.restarts),
                threshold=down.after_s,
                message=f"worker {w.key} is "
                + ("crash-looping" if looping else f"down for {for_s:.0f} s")
                + f" ({w.restarts} restarts; {w.error or 'no error given'})",
                cooldown=down.cooldown_s,
            )
        return changes

    def _check_occupancy(self, camera: str, now: float, count: int) -> list[AlertChange]:
        rule = self.config.occupancy
        state = self._occupancy.setdefault(camera, _Occupancy())
        over = count > rule.max_people
        if over:
            state.under_since = None
            state.over_since = state.over_since if state.over_since is not None else now
        else:
            state.over_since = None
            state.under_since = state.under_since if state.under_since is not None else now
        tripped = (
            rule.enabled and state.over_since is not None and now - state.over_since >= rule.hold_s
        )
        cleared = state.under_since is not None and now - state.under_since >= rule.clear_s
        return self._update(
            "occupancy",
            camera,
            camera,
            now,
            tripped=tripped,
            cleared=cleared,
            value=float(count),
            threshold=float(rule.max_people),
            message=f"camera {camera}: {count} people at once (limit {rule.max_people})",
            cooldown=rule.cooldown_s,
        )

    def _check_no_mask(
        self, camera: str, now: float, source: int, tracks: list[tuple[int, str]]
    ) -> list[AlertChange]:
        rule = self.config.no_mask
        window = self._masks.setdefault(camera, _MaskWindow())
        for track_id, label in tracks:
            if label in ("mask", "no_mask"):
                window.seen[(source, track_id)] = (now, label)
        horizon = now - rule.window_s
        window.seen = {k: v for k, v in window.seen.items() if v[0] >= horizon}
        people = len(window.seen)
        without = sum(1 for _, label in window.seen.values() if label == "no_mask")
        share = without / people if people else 0.0
        tripped = rule.enabled and people >= rule.min_people and share > rule.threshold
        return self._update(
            "no_mask",
            camera,
            camera,
            now,
            tripped=tripped,
            cleared=not (people >= rule.min_people and share > rule.threshold),
            value=round(share, 3),
            threshold=rule.threshold,
            message=f"camera {camera}: {without} of {people} people without a mask "
            f"in the last {rule.window_s:.0f} s",
            cooldown=rule.cooldown_s,
        )

    def _update(
        self,
        rule: str,
        camera: str | None,
        subject: str,
        now: float,
        *,
        tripped: bool,
        cleared: bool,
        value: float,
        threshold: float,
        message: str,
        cooldown: float,
    ) -> list[AlertChange]:
        key = (rule, subject)
        alert = self.active.get(key)
        stamp = now if self._wall is None else self._wall
        if alert is not None:
            alert.value = max(alert.value, value) if rule != "no_mask" else value
            if cleared and not tripped:
                alert.ended = stamp
                del self.active[key]
                self._quiet_until[key] = now + cooldown
                return [AlertChange("ended", alert)]
            return []
        if tripped and now >= self._quiet_until.get(key, float("-inf")):
            alert = ActiveAlert(rule, camera, subject, stamp, value, threshold, message)
            self.active[key] = alert
            return [AlertChange("raised", alert)]
        return []
