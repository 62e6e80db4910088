"""The source side of a running pipeline: its bus, reconnects with backoff, stalls, loops.

:class:`SourceSupervisor` runs the bus loop of one pipeline. Each kind of bus message has
its handler (a table keyed by message type); between messages it watches the clock: the
caller's deadline, a stop that does not drain, a live source that sends nothing. A live
source that fails, ends or stalls is restarted after a :class:`Backoff` delay; a file that
ends ends the run, or (a looping camera) plays again through segment seeks.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from edgecam.config import CameraConfig, redact_url
from edgecam.errors import PipelineError
from edgecam.media.detection import PipelineStats
from edgecam.media.gst import GLib, Gst

__all__ = ["Backoff", "SourceSupervisor", "guarded"]

log = logging.getLogger(__name__)

_LOOP_START = "edgecam-loop-start"
_POLL_NS = 100 * Gst.MSECOND  # how often the loop looks at the clock between messages
# Frames a restarted source must deliver before its next failure counts as a new one.
_SETTLED_FRAMES = 100

_Probe = Callable[..., Gst.PadProbeReturn]


def guarded(fallback: Gst.PadProbeReturn) -> Callable[[_Probe], _Probe]:
    """Keep video flowing when a probe's Python raises: PyGObject would return 0 (DROP) and
    every later buffer would vanish without a word. Log it and return ``fallback``."""

    def wrap(probe: _Probe) -> _Probe:
        @functools.wraps(probe)
        def safe(*args: Any) -> Gst.PadProbeReturn:
            try:
                return probe(*args)
            except Exception:
                log.exception("pad probe %s failed; the frame passes unchanged", probe.__name__)
                return fallback

        return safe

    return wrap


class Backoff:
    """Delays between reconnects: ``first_s``, doubling after each failure up to
    ``max_s``, back to ``first_s`` once the source has worked again."""

    def __init__(self, first_s: float, max_s: float) -> None:
        if first_s <= 0:
            raise ValueError(f"first_s must be > 0, got {first_s}")
        if max_s < first_s:
            raise ValueError(f"max_s must be >= first_s ({first_s}), got {max_s}")
        self._first = first_s
        self._max = max_s
        self.delay = first_s

    def failed(self) -> float:
        """The delay to wait now; the next one is twice as long (at most ``max_s``)."""
        delay = self.delay
        self.delay = min(delay * 2, self._max)
        return delay

    def reset(self) -> None:
        self.delay = self._first


class SourceSupervisor:
    """Runs one pipeline's bus until end of stream, stop, failure or a deadline.

    ``live``: played to the clock. ``reconnect``: the source is a live one played live,
    restarted when it fails, ends or stalls. ``loops``: a file played live that starts
    again at its end. ``entry`` is the sink pad of the first element after the source: end
    of stream is sent in there on stop, and a looping file's first frame is held there
    until the loop is set up.
    """

    def __init__(
        self,
        pipeline: Gst.Pipeline,
        camera: CameraConfig,
        *,
        entry: Gst.Pad,
        live: bool,
        reconnect: bool,
        loops: bool,
        stats: PipelineStats,
    ) -> None:
        self._pipeline = pipeline
        self._camera = camera
        self._entry = entry
        self._live = live
        self._reconnect = reconnect
        self._loops = loops
        self._stats = stats
        self._backoff = Backoff(camera.reconnect_min_s, camera.reconnect_max_s)
        self.error: str | None = None  # the first failure, the cause of the others
        self.last_frame_time = 0.0
        # Until a live camera delivers its first frame there is nothing to drain on stop.
        self.outage = reconnect
        self._restart_frames = 0
        self._loop_armed = False
        self._stop_event = threading.Event()
        self._stop_requested_at: float | None = None
        self._stop_timeout = 10.0
        self._handlers: dict[Gst.MessageType, Callable[[Gst.Message], bool]] = {
            Gst.MessageType.APPLICATION: self._on_application,
            Gst.MessageType.SEGMENT_DONE: self._on_segment_done,
            Gst.MessageType.WARNING: self._on_warning,
            Gst.MessageType.EOS: self._on_eos,
            Gst.MessageType.ERROR: self._on_error,
        }
        self._mask = Gst.MessageType(0)
        for kind in self._handlers:
            self._mask |= kind
        if loops:
            entry.add_probe(
                Gst.PadProbeType.BLOCK_DOWNSTREAM | Gst.PadProbeType.BUFFER, self._on_loop_block
            )

    # -- called from other threads -----------------------------------------------------------

    def arm(self) -> None:
        """Ready for a (re)start."""
        self._stop_event.clear()
        self._stop_requested_at = None
        self.outage = self._reconnect

    def frame_seen(self) -> None:
        """A frame went through (from a streaming thread): the source is up."""
        self.last_frame_time = time.monotonic()
        self.outage = False

    def fail(self, message: str) -> None:
        """Stop the run with ``message`` as its error (the first one given wins)."""
        if self.error is not None:
            return
        self.error = message
        err = GLib.Error.new_literal(Gst.CoreError.quark(), message, Gst.CoreError.FAILED)
        self._pipeline.post_message(Gst.Message.new_error(self._pipeline, err, message))

    def stop(self, timeout: float) -> None:
        """Ask for end of stream through every element; :meth:`run` returns once drained
        (or after ``timeout`` seconds). Safe from any thread or a signal handler."""
        self._stop_timeout = timeout
        self._stop_requested_at = time.monotonic()
        self._stop_event.set()
        # EOS enters right after the source: it reaches every sink whatever the source is
        # doing (a demuxer pulling in a segment loop, an RTSP source waiting on the network).
        self._entry.send_event(Gst.Event.new_eos())

    @property
    def stopping(self) -> bool:
        return self._stop_requested_at is not None

    # -- the bus loop -------------------------------------------------------------------------

    def run(self, timeout: float | None, on_tick: Callable[[], None] | None) -> None:
        bus = self._pipeline.get_bus()
        deadline = time.monotonic() + timeout if timeout else None
        self.last_frame_time = time.monotonic()
        self._restart_frames = 0
        while True:
            msg = bus.timed_pop_filtered(_POLL_NS, self._mask)
            if on_tick is not None:
                on_tick()
            if self._tick(time.monotonic(), deadline, idle=msg is None):
                return
            if msg is not None and self._handlers[msg.type](msg):
                return

    def _tick(self, now: float, deadline: float | None, *, idle: bool) -> bool:
        """The clock's part of one loop turn; True: the run is over."""
        if deadline is not None and now > deadline and not self.stopping:
            self.stop(self._stop_timeout)
        if self.stopping:
            if self.outage:
                return True  # nothing flows during a camera outage: nothing to drain
            if now - (self._stop_requested_at or now) > self._stop_timeout:
                log.warning(
                    "pipeline did not drain within %.0f s; forcing stop", self._stop_timeout
                )
                return True
        if self._stats.frames - self._restart_frames > _SETTLED_FRAMES:
            self._backoff.reset()
        if (
            idle
            and self._reconnectable
            and now - self.last_frame_time > self._camera.stall_timeout_s
        ):
            log.warning(
                "camera %s: no frame for %.0f s; reconnecting",
                self._camera.name,
                self._camera.stall_timeout_s,
            )
            self._restart()
        return False

    @property
    def _reconnectable(self) -> bool:
        return self._reconnect and not self.stopping

    def _on_application(self, msg: Gst.Message) -> bool:
        if msg.get_structure().get_name() == _LOOP_START:
            self._loop_armed = True  # the probe lets data through from now on
            self._loop_seek(flush=True)
        return False

    def _on_segment_done(self, _msg: Gst.Message) -> bool:
        self._loop_seek(flush=False)
        return False

    def _on_warning(self, msg: Gst.Message) -> bool:
        warn, _ = msg.parse_warning()
        log.warning("%s: %s", msg.src.get_name(), warn.message)
        return False

    def _on_eos(self, _msg: Gst.Message) -> bool:
        if self._reconnectable:
            log.warning("camera %s: stream ended; reconnecting", self._camera.name)
            self._restart()
            return False
        return True

    def _on_error(self, msg: Gst.Message) -> bool:
        err, debug = msg.parse_error()
        text = f"{err.message} ({msg.src.get_name()})"
        log.debug("pipeline error debug: %s", debug)
        if self.stopping and self._live:
            log.info("camera %s: error while stopping: %s", self._camera.name, text)
            return True
        if self._reconnectable and self.error is None:
            log.warning(
                "camera %s: %s; reconnecting in %.1f s",
                self._camera.name,
                text,
                self._backoff.delay,
            )
            self._restart()
            return False
        raise PipelineError(self.error or f"camera {self._camera.name!r}: {text}")

    def _restart(self) -> None:
        """Take the pipeline down, wait the backoff delay, bring it up again."""
        self._pipeline.set_state(Gst.State.NULL)
        self._stats.restarts += 1
        self._restart_frames = self._stats.frames
        self.outage = True
        if self._stop_event.wait(self._backoff.failed()):
            return
        self._pipeline.set_state(Gst.State.PLAYING)
        self.last_frame_time = time.monotonic()

    # -- a file that loops -------------------------------------------------------------------

    @guarded(Gst.PadProbeReturn.REMOVE)
    def _on_loop_block(self, pad: Gst.Pad, _info: Gst.PadProbeInfo) -> Gst.PadProbeReturn:
        # A file that loops must be in a segment seek before its first frame goes on, or
        # that frame and its followers would play twice. Hold the first frame here until
        # the bus thread has made the (flushing) segment seek, which releases it.
        if self._loop_armed:
            return Gst.PadProbeReturn.REMOVE
        element = pad.get_parent_element()
        element.post_message(
            Gst.Message.new_application(element, Gst.Structure.new_empty(_LOOP_START))
        )
        return Gst.PadProbeReturn.OK

    def _loop_seek(self, *, flush: bool) -> None:
        # Segment seeks loop a file without EOS and with running time going on, so the
        # RTP timestamps downstream keep increasing across the loop.
        flags = Gst.SeekFlags.SEGMENT | (Gst.SeekFlags.FLUSH if flush else Gst.SeekFlags.NONE)
        ok = self._pipeline.seek(
            1.0, Gst.Format.TIME, flags, Gst.SeekType.SET, 0, Gst.SeekType.NONE, -1
        )
        if not ok:
            log.warning(
                "camera %s: cannot seek %s to loop it",
                self._camera.name,
                redact_url(self._camera.source),
            )
