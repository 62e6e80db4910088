"""The local event channel: workers tell the orchestrator what happens.

One Unix datagram socket, ``events.sock`` in the device's runtime folder, bound by the
orchestrator; each worker sends small typed JSON messages to it. Datagrams keep message
boundaries and never block the sender: a worker run alone (no orchestrator listening), or
one whose orchestrator is busy, loses events rather than video. No frame ever crosses.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from edgecam.protocol import ClipReady

__all__ = [
    "EVENTS_SOCKET",
    "ClipEvent",
    "ClipFailed",
    "Event",
    "EventReceiver",
    "EventSender",
    "FrameSummary",
    "Heartbeat",
    "Lifecycle",
    "LineFrame",
    "ZoneFrame",
    "parse_event",
]

log = logging.getLogger(__name__)

EVENTS_SOCKET = "events.sock"
_MAX_DATAGRAM = 60 * 1024
_RECV_BUFFER = 4 * 1024 * 1024


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    worker: str = Field(description="Worker name.")
    camera: str | None = Field(None, description="Camera of a per-camera worker.")
    pid: int = Field(default_factory=os.getpid, description="Sender's process id.")
    ts: float = Field(default_factory=time.time, description="When it was sent (Unix s).")


class Lifecycle(_Event):
    """A worker became ready, began stopping, or failed."""

    kind: Literal["lifecycle"] = "lifecycle"
    state: Literal["ready", "stopping", "failed"]
    error: str | None = None


class Heartbeat(_Event):
    """Sent every second by a worker that is alive; ``healthy`` False when it is not doing
    its job (a pipeline with no frames while not waiting for its camera)."""

    kind: Literal["heartbeat"] = "heartbeat"
    healthy: bool = True
    figures: dict[str, float] = Field(default_factory=dict)


class ZoneFrame(BaseModel):
    """One zone on one frame, as the orchestrator needs it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    occupancy: int = Field(0, ge=0, description="Tracks in the zone now.")
    entered: int = Field(0, ge=0, description="Tracks that entered on this frame.")
    dwell_s: list[float] = Field(
        default_factory=list, description="Dwell of each stay that ended on this frame."
    )
    longest_s: float = Field(0.0, ge=0, description="The longest stay going on now.")


class LineFrame(BaseModel):
    """One counting line on one frame: its crossings on that frame."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    crossed_in: int = Field(0, ge=0, description="Crossings into the in side on this frame.")
    crossed_out: int = Field(0, ge=0, description="Crossings out of it on this frame.")


class FrameSummary(_Event):
    """One video frame of one camera: the counted tracks and their labels, and its zones and
    lines."""

    kind: Literal["frame"] = "frame"
    frame: int
    wall_time: float
    tracks: list[tuple[int, str]] = Field(default_factory=list)
    detected: bool = False
    zones: dict[str, ZoneFrame] = Field(default_factory=dict)
    lines: dict[str, LineFrame] = Field(default_factory=dict)


class ClipEvent(_Event):
    """A clip is on disk."""

    kind: Literal["clip_ready"] = "clip_ready"
    clip: ClipReady


class ClipFailed(_Event):
    """A requested clip could not be saved."""

    kind: Literal["clip_failed"] = "clip_failed"
    request_id: str
    error: str


Event = Annotated[
    Lifecycle | Heartbeat | FrameSummary | ClipEvent | ClipFailed, Field(discriminator="kind")
]
_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)


def parse_event(data: bytes) -> Event:
    """One event from its JSON bytes; raises ``ValidationError`` when it is not one."""
    return _ADAPTER.validate_json(data)


class EventSender:
    """Sends events to the orchestrator's socket; never blocks, never raises."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.dropped = 0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        self._lock = threading.Lock()

    def send(self, event: _Event) -> bool:
        data = event.model_dump_json().encode()
        if len(data) > _MAX_DATAGRAM:
            log.warning("event %s too large (%d bytes); not sent", type(event).__name__, len(data))
            self.dropped += 1
            return False
        try:
            with self._lock:
                self._sock.sendto(data, str(self.path))
        except OSError:  # nobody listens, or the orchestrator is behind: lose the event
            self.dropped += 1
            return False
        return True

    def close(self) -> None:
        self._sock.close()


class EventReceiver:
    """The orchestrator's end: bound at ``path`` (0600), read with :meth:`receive`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rejected = 0
        path.unlink(missing_ok=True)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        with contextlib.suppress(OSError):
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RECV_BUFFER)
        self._sock.bind(str(path))
        os.chmod(path, 0o600)

    def receive(self, timeout: float) -> Event | None:
        """The next event, or None after ``timeout`` seconds (or for a malformed one)."""
        self._sock.settimeout(timeout)
        try:
            data = self._sock.recv(_MAX_DATAGRAM + 1)
        except (TimeoutError, BlockingIOError):
            return None
        try:
            return parse_event(data)
        except ValidationError:
            self.rejected += 1
            log.warning("malformed event on %s (%d bytes) ignored", self.path, len(data))
            return None

    def close(self) -> None:
        self._sock.close()
        self.path.unlink(missing_ok=True)
