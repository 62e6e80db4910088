"""Messages between edgecam processes and between a device and the fleet server.

Every payload is a versioned pydantic model with a unique ``id`` (uuid4 hex) and a
timestamp ``ts`` (Unix seconds), so a receiver stores each exactly once however often it
is redelivered. Receivers ignore fields they do not know: a fleet runs mixed versions, and a
newer device must not break an older server.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "PROTOCOL_VERSION",
    "ClipReady",
    "Command",
    "CommandResult",
    "Payload",
    "SaveClipArgs",
]

PROTOCOL_VERSION = 1


def _new_id() -> str:
    return uuid.uuid4().hex


class Payload(BaseModel):
    """Fields every message carries."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    v: int = Field(PROTOCOL_VERSION, ge=1, description="Protocol version of the sender.")
    id: str = Field(
        default_factory=_new_id, pattern=r"^[0-9a-f]{32}$", description="Unique message id."
    )
    ts: float = Field(default_factory=time.time, description="When it was made (Unix s).")


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
    counts: dict[str, int] = Field(
        default_factory=dict, description="Live counts at the trigger, kept in the sidecar."
    )


class ClipReady(Payload):
    """A clip was saved: where it is and what it holds."""

    kind: Literal["clip_ready"] = "clip_ready"
    device: str = Field(description="Device name.")
    camera: str = Field(description="Camera name.")
    name: str = Field(description="File name of the clip in the clips folder.")
    path: str = Field(description="Absolute path of the clip on the device.")
    size: int = Field(ge=0, description="Bytes.")
    duration: float = Field(ge=0, description="Seconds of video.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the file.")
    start: float = Field(description="Wall time of the first frame (Unix s).")
    end: float = Field(description="Wall time just after the last frame (Unix s).")
    trigger: float = Field(description="Wall time of the first request (Unix s).")
    reason: str = Field(description="Reason of the first request.")
    reasons: list[str] = Field(default_factory=list, description="Reasons of all merged requests.")
    counts: dict[str, int] = Field(default_factory=dict, description="Counts at the trigger.")
    requests: int = Field(1, ge=1, description="How many requests this clip answers.")
