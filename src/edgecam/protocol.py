"""Messages between edgecam processes and between a device and the fleet server.

Every payload is a versioned pydantic model with a unique ``id`` (uuid4 hex) and a
timestamp ``ts`` (Unix seconds), so a receiver stores each exactly once however often it
is redelivered. Receivers ignore fields they do not know: a fleet runs mixed versions, and a
newer device must not break an older server.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt

__all__ = [
    "CLIP_NAME",
    "COMMAND_NAMES",
    "DEFAULT_PREFIX",
    "DEVICE_NAME",
    "MAX_PAYLOAD_BYTES",
    "PROTOCOL_VERSION",
    "TOPIC_KINDS",
    "Alert",
    "ClipReady",
    "Command",
    "CommandResult",
    "Payload",
    "SaveClipArgs",
    "SetRuleArgs",
    "Stats",
    "Status",
    "WorkerArgs",
    "WorkerState",
    "ZoneStats",
    "parse_topic",
    "topic",
]

PROTOCOL_VERSION = 1
DEFAULT_PREFIX = "edgecam"
# A message larger than this is refused unread, whichever side receives it.
MAX_PAYLOAD_BYTES = 64 * 1024

# Per-device MQTT topics: PREFIX/DEVICE/KIND.
TopicKind = Literal["status", "stats", "alerts", "clips", "cmd", "cmd/result"]
TOPIC_KINDS: tuple[TopicKind, ...] = ("status", "stats", "alerts", "clips", "cmd", "cmd/result")

COMMAND_NAMES = (
    "save_clip",
    "streaming_start",
    "streaming_stop",
    "worker_restart",
    "worker_enable",
    "worker_disable",
    "status",
    "set_rule",
)

DEVICE_NAME = r"^[A-Za-z0-9_-]{1,64}$"
_NAME = DEVICE_NAME
# A clip's file name, as the device's recorder makes them (and nothing else: names go into
# paths and links).
CLIP_NAME = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}\.mp4$"
# The latest wall time a message may carry (9999-12-31T23:59:59Z): a date can show it.
_LAST_TIME = 253402300799.0
UnixTime = Annotated[float, Field(ge=0, le=_LAST_TIME, allow_inf_nan=False)]
# Non-negative counts by label or direction.
Counts = dict[str, NonNegativeInt]
# Where a device's signed download links may point: http(s) only.
Link = Annotated[str, Field(max_length=2048, pattern=r"^https?://")]


def topic(prefix: str, device: str, kind: TopicKind) -> str:
    """The MQTT topic of one kind of message of one device."""
    return f"{prefix}/{device}/{kind}"


def parse_topic(prefix: str, name: str) -> tuple[str, TopicKind] | None:
    """(device, kind) of a topic under ``prefix``, or None when it is not one of ours."""
    head = f"{prefix}/"
    if not name.startswith(head):
        return None
    device, _, kind = name[len(head) :].partition("/")
    if not device or kind not in TOPIC_KINDS:
        return None
    return device, kind  # type: ignore[return-value]


def _new_id() -> str:
    return uuid.uuid4().hex


class Payload(BaseModel):
    """Fields every message carries."""

    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)

    v: int = Field(PROTOCOL_VERSION, ge=1, description="Protocol version of the sender.")
    id: str = Field(
        default_factory=_new_id, pattern=r"^[0-9a-f]{32}$", description="Unique message id."
    )
    ts: UnixTime = Field(default_factory=time.time, description="When it was made (Unix s).")


class Command(Payload):
    """A request to a device (or to one of its workers): ``name`` and its ``args``."""

    name: str = Field(pattern=r"^[a-z_]{1,32}$", description="Command name, e.g. save_clip.")
    args: dict[str, Any] = Field(default_factory=dict, description="Command arguments.")


class CommandResult(Payload):
    """The answer to one :class:`Command`."""

    command_id: str = Field(description="The id of the command answered.")
    ok: bool = Field(description="Whether the command succeeded.")
    error: str | None = Field(None, description="What went wrong when not ok.")
    data: dict[str, Any] = Field(default_factory=dict, description="Command-specific result.")


class SaveClipArgs(BaseModel):
    """Arguments of the ``save_clip`` command."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    camera: str | None = Field(None, description="Camera name; None: the first.")
    reason: str = Field("manual", max_length=200, description="Why the clip is saved.")
    pre: float | None = Field(None, ge=0, le=3600, description="Seconds before the trigger.")
    post: float | None = Field(None, ge=0, le=3600, description="Seconds after the trigger.")
    key: str | None = Field(
        None,
        max_length=200,
        description="Identity of the triggering alert: a request with the same key extends "
        "the clip still being recorded instead of starting another.",
    )
    at: float | None = Field(
        None, allow_inf_nan=False, description="Trigger wall time (Unix s); None: now."
    )
    counts: Counts = Field(
        default_factory=dict, description="Live counts at the trigger, kept in the sidecar."
    )
    job: str | None = Field(
        None, pattern=r"^[0-9a-f]{32}$", description="Request id to use (default: a new one)."
    )


class ClipReady(Payload):
    """A clip was saved: where it is and what it holds."""

    kind: Literal["clip_ready"] = "clip_ready"
    device: str = Field(pattern=_NAME, description="Device name.")
    camera: str = Field(description="Camera name.")
    name: str = Field(pattern=CLIP_NAME, description="File name of the clip in the clips folder.")
    path: str = Field(description="Absolute path of the clip on the device.")
    size: int = Field(ge=0, description="Bytes.")
    duration: float = Field(ge=0, description="Seconds of video.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the file.")
    start: UnixTime = Field(description="Wall time of the first frame (Unix s).")
    end: UnixTime = Field(description="Wall time just after the last frame (Unix s).")
    trigger: UnixTime = Field(description="Wall time of the first request (Unix s).")
    reason: str = Field(description="Reason of the first request.")
    reasons: list[str] = Field(default_factory=list, description="Reasons of all merged requests.")
    counts: Counts = Field(default_factory=dict, description="Counts at the trigger.")
    requests: int = Field(1, ge=1, description="How many requests this clip answers.")
    request_ids: list[str] = Field(
        default_factory=list, description="Ids of the save_clip requests this clip answers."
    )
    url: Link | None = Field(None, description="Signed, expiring download link, when known.")
    alert_id: str | None = Field(None, description="The alert this clip was saved for.")


WorkerStateName = Literal[
    "starting", "running", "stopping", "stopped", "disabled", "restarting", "crash_loop"
]


class WorkerState(BaseModel):
    """One worker process as the orchestrator sees it."""

    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)

    name: str = Field(description="Worker name: inference, streaming, recorder, fileserver.")
    camera: str | None = Field(None, description="Camera of a per-camera worker.")
    state: WorkerStateName = Field(description="Where the worker is in its life.")
    pid: int | None = Field(None, description="Process id while it runs.")
    restarts: int = Field(0, ge=0, description="Restarts since the device started.")
    since: UnixTime = Field(description="When it entered this state (Unix s).")
    cpu: float | None = Field(None, ge=0, description="CPU cores used lately.")
    rss_mb: float | None = Field(None, ge=0, description="Resident memory (MB).")
    error: str | None = Field(None, description="Why it last stopped, when it failed.")

    @property
    def key(self) -> str:
        """``name`` or ``name/camera``: how commands name the worker."""
        return self.name if self.camera is None else f"{self.name}/{self.camera}"


class Status(Payload):
    """The device's state, retained on ``status``; ``offline`` is the MQTT last will."""

    kind: Literal["status"] = "status"
    device: str = Field(pattern=_NAME, description="Device name.")
    state: Literal["online", "offline"] = Field(description="Whether the device is up.")
    version: str | None = Field(None, description="edgecam version of the device.")
    profile: str | None = Field(None, description="Vision profile (mask or people).")
    cameras: list[str] = Field(default_factory=list, description="Camera names.")
    workers: list[WorkerState] = Field(default_factory=list, description="Worker states.")
    started: UnixTime | None = Field(None, description="When the device started (Unix s).")
    seq: int | None = Field(
        None,
        ge=1,
        le=2**63 - 1,
        description="This status's number in the device's run, from 1: orders a run's statuses "
        "when the device's clock is set back.",
    )
    rules: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Alert rules and their parameters."
    )
    outbox: int | None = Field(None, ge=0, le=2**31 - 1, description="Messages waiting to be sent.")
    uploads: int | None = Field(
        None, ge=0, le=2**31 - 1, description="Clips waiting to be uploaded to the fleet server."
    )
    outbox_dropped: int | None = Field(
        None, ge=0, description="Messages dropped (oldest first) because the outbox was full."
    )
    broker: Literal["connected", "disconnected"] | None = Field(
        None, description="The device's link to its MQTT broker; None: no broker configured."
    )


class ZoneStats(BaseModel):
    """One zone over a stats interval."""

    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)

    occupancy_peak: int = Field(0, ge=0, description="Most tracks in the zone at once.")
    entries: int = Field(0, ge=0, description="Tracks that entered in the interval.")
    exits: int = Field(0, ge=0, description="Tracks that left (or ended) in the interval.")
    dwell_median_s: float | None = Field(
        None, description="Median dwell of the stays that ended in the interval (None: none)."
    )
    dwell_max_s: float | None = Field(
        None,
        description="Longest dwell: of the stays that ended and of those still going on at the "
        "interval's end (None: nobody was in the zone).",
    )


class Stats(Payload):
    """One camera's statistics over one interval ``[start, end)``."""

    kind: Literal["stats"] = "stats"
    device: str = Field(pattern=_NAME, description="Device name.")
    camera: str = Field(description="Camera name.")
    seq: int = Field(ge=0, description="Per device, +1 for each stats message made.")
    start: UnixTime = Field(description="Interval start (Unix s).")
    end: UnixTime = Field(description="Interval end (Unix s).")
    counts: Counts = Field(
        default_factory=dict,
        description="Tracks seen in the interval, each once, by label (person, or "
        "mask/no_mask/undecided): a track's label is its last one in the interval.",
    )
    people: int = Field(0, ge=0, description="Tracks seen in the interval (sum of counts).")
    peak: int = Field(0, ge=0, description="Most counted tracks on one frame.")
    fps_in: float = Field(0.0, ge=0, description="Frames a second decoded.")
    fps_out: float = Field(0.0, ge=0, description="Frames a second encoded.")
    detections_per_s: float = Field(0.0, ge=0, description="Detector runs a second.")
    frames_dropped: int = Field(0, ge=0, description="Frames lost in the interval.")
    zones: dict[str, ZoneStats] = Field(
        default_factory=dict, description="Per zone of the camera (none: no zones)."
    )
    lines: dict[str, dict[Literal["in", "out"], NonNegativeInt]] = Field(
        default_factory=dict,
        description="Per counting line: crossings in and out in the interval.",
    )
    workers: list[WorkerState] = Field(
        default_factory=list, description="This camera's workers and the device-wide ones."
    )


class Alert(Payload):
    """An alert changed: raised, its clip is ready, or it ended. ``alert_id`` names the
    incident across its messages."""

    kind: Literal["alert"] = "alert"
    device: str = Field(pattern=_NAME, description="Device name.")
    camera: str | None = Field(None, description="Camera, when the rule is per camera.")
    alert_id: str = Field(pattern=r"^[0-9a-f]{32}$", description="Incident id.")
    rule: str = Field(description="Rule name, e.g. no_mask, occupancy, camera_offline.")
    state: Literal["raised", "clip", "ended"] = Field(description="What changed.")
    message: str = Field(description="What happened, for people.")
    value: float | None = Field(None, description="The measured value that tripped it.")
    threshold: float | None = Field(None, description="The rule's threshold.")
    started: UnixTime = Field(description="When the incident started (Unix s).")
    ended: UnixTime | None = Field(None, description="When it ended (Unix s).")
    clip: str | None = Field(None, pattern=CLIP_NAME, description="Name of the incident's clip.")
    clip_url: Link | None = Field(None, description="Signed, expiring download link.")


class WorkerArgs(BaseModel):
    """Arguments of ``worker_restart``, ``worker_enable``, ``worker_disable``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    worker: str = Field(max_length=64, description="Worker name (inference, recorder, ...).")
    camera: str | None = Field(None, max_length=64, description="Camera; None: all cameras.")


class SetRuleArgs(BaseModel):
    """Arguments of ``set_rule``: one rule's parameters to change (others unchanged)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rule: str = Field(max_length=64, description="Rule name.")
    params: dict[str, Any] = Field(default_factory=dict, description="Parameters to set.")
