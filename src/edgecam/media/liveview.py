"""The live view of one camera: its H.264 RTP fanned out to browsers, never re-encoded.

One pipeline per camera, while started::

    udpsrc (the camera's live-view RTP port) ! rtph264depay ! h264parse ! tee
      |-> queue ! h264parse (AVC) ! appsink -> one fMP4 fragment a frame -> every MSE viewer
      |-> queue ! rtph264pay ! webrtcbin       one branch per WebRTC viewer, added and
                                               removed while the pipeline runs

Nothing is decoded or encoded: a viewer costs a queue and a payloader (WebRTC) or a socket
write (MSE). The HTTP layer connects each browser through a :class:`ViewerLink` (how the
view sends to it) and gets a :class:`Viewer` back (how the browser's messages reach the
view). A viewer that sends nothing for ``live.viewer_timeout_s`` is dropped, and so is a
WebRTC viewer whose connection is not up ``live.connect_timeout_s`` after the offer, or
from which nothing has come over it for that long since: keep-alives alone hold no place
(nor a webrtcbin and its threads).

The pipeline's clock runs on whether or not the camera's pipeline sends: when the inference
worker restarts, its new stream continues the same timeline and viewers resume at its first
keyframe.
"""

from __future__ import annotations

import functools
import ipaddress
import itertools
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Literal, Protocol, TypeVar

import gi

from edgecam.config import LiveViewConfig, Settings
from edgecam.errors import LiveViewError, PipelineError
from edgecam.media.fmp4 import TIMESCALE, Fmp4Writer
from edgecam.media.gst import (
    RTP_CAPS,
    UDP_BUFFER_BYTES,
    GLib,
    Gst,
    LoopThread,
    init,
    require_elements,
)
from edgecam.ratelimit import Every

gi.require_version("GstSdp", "1.0")
gi.require_version("GstWebRTC", "1.0")
from gi.repository import GstSdp, GstWebRTC

__all__ = ["LiveView", "Viewer", "ViewerKind", "ViewerLink", "refuse_candidate"]

log = logging.getLogger(__name__)

ViewerKind = Literal["webrtc", "mse"]

_ELEMENTS = ("udpsrc", "rtph264depay", "h264parse", "tee", "queue", "appsink")
_ICE_SOURCE = "nicesrc"  # webrtcbin's: what the browser sends comes out of it
_WEBRTC_ELEMENTS = ("rtph264pay", "webrtcbin", _ICE_SOURCE)
_CALL_TIMEOUT_S = 10.0
_REAP_INTERVAL_S = 1
_RECOVER_INTERVAL_S = 2.0  # after an error, the view starts afresh at most this often
# WebRTC viewers dropped for not connecting (or for going silent) are warned of at most this
# often: a script that keeps trying is one line a minute, not one a viewer.
_DEAD_WEBRTC_LOG_S = 60.0
# Frames queued towards one WebRTC viewer before the oldest are dropped (about 2 s).
_BRANCH_QUEUE_BUFFERS = 60
# Until two frames give a real one: 30 fps.
_DEFAULT_FRAME_TICKS = TIMESCALE // 30
_NS_PER_TICK = Gst.SECOND / TIMESCALE
_PAYLOAD_TYPE = 96
# Remote ICE candidates taken from one viewer (trickled and in its answer): a browser gives
# a handful, one per interface and kind.
_MAX_REMOTE_CANDIDATES = 32
# A line of SDP that GstSdp might read as a candidate (it skips blanks after "a="); only the
# plain form, "a=candidate:...", can pass refuse_candidate.
_CANDIDATE_LINE = re.compile(r"a=\s*candidate", re.IGNORECASE)
# A candidate's text as libnice reads it: printable ASCII words, one space apart.
_CANDIDATE_TEXT = re.compile(r"[\x21-\x7e]+(?: [\x21-\x7e]+)*")

_T = TypeVar("_T")


def refuse_candidate(candidate: str) -> str | None:
    """Why a browser's ICE candidate is not given to webrtcbin, or None to take it.

    A candidate makes the device send packets to the address in it, so a viewer could aim
    the device at anything it can reach: only UDP to an unprivileged port (1024-65535) of a
    unicast IP address that is not loopback, link-local, multicast, reserved or "this
    network" is taken. Not TCP (the device would open connections), and no names: a DNS
    name is a lookup of the viewer's choosing, and an mDNS name can be answered by anyone on
    the network with any address. The device learns a browser that hides its address behind
    an mDNS name from the browser's own connectivity checks. The text must read the same to
    libnice, which splits on single spaces: printable ASCII words, one space apart.
    """
    text = candidate.removeprefix("a=")
    if not _CANDIDATE_TEXT.fullmatch(text):
        return "not a candidate (printable words, one space apart)"
    fields = text.split(" ")
    # candidate:FOUNDATION COMPONENT TRANSPORT PRIORITY ADDRESS PORT typ TYPE ...
    if len(fields) < 8 or not fields[0].startswith("candidate:") or fields[6] != "typ":
        return "not a candidate"
    transport, address, port = fields[2].lower(), fields[4], fields[5]
    if transport != "udp":
        return f"transport {fields[2]!r} (UDP only)"
    if not re.fullmatch(r"[0-9]{1,5}", port) or not 1024 <= int(port) <= 65535:
        return f"port {port!r} (1024-65535 only)"
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return "not an IP address (names, mDNS ones too, are not resolved)"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id is not None:
            return f"address {address} (no zone)"
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
    if (
        ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_unspecified
        or ip.is_reserved  # 240.0.0.0/4 with the broadcast address; ::/8
        or (ip.version == 4 and ip.packed[0] == 0)  # 0.0.0.0/8, "this network"
    ):
        return f"address {address} (unicast, not loopback or link-local, only)"
    return None


def _elements_made_by(bin_: Gst.Bin, factory: str) -> list[Gst.Element]:
    """The elements in ``bin_``, at any depth, that ``factory`` made."""
    for _attempt in range(3):
        try:
            return [
                element
                for element in bin_.iterate_recurse()
                if (made_by := element.get_factory()) is not None and made_by.get_name() == factory
            ]
        except Gst.IteratorError:
            continue  # the bin changed while it was looked through: again
    return []


class ViewerLink(Protocol):
    """How a live view reaches one browser; implemented by the HTTP layer.

    Both methods are called from GStreamer threads and must not block.
    """

    def send(self, message: bytes | str) -> bool:
        """Queue a message for the browser: ``str`` is a JSON text message, ``bytes``
        media (fMP4). False when the browser's queue is full: the view drops this viewer's
        frames until the next keyframe."""

    def closed(self, reason: str) -> None:
        """The view dropped this viewer (timeout, stop, connection failed)."""


class Viewer:
    """One browser watching; the handle the HTTP layer holds. Thread-safe."""

    def __init__(self, view: LiveView, viewer_id: int, kind: ViewerKind, link: ViewerLink):
        self.id = viewer_id
        self.kind: ViewerKind = kind
        self.link = link
        self._view = view
        self.last_seen = view._clock()
        # MSE: wait for a keyframe (and send the init segment) before the next fragment.
        self._waiting = True
        self._init_sent: Fmp4Writer | None = None
        self._branch: _WebRtcBranch | None = None

    def touch(self) -> None:
        """The browser is still there (any message from it counts)."""
        self.last_seen = self._view._clock()

    def receive(self, message: dict[str, Any]) -> None:
        """A signalling message from the browser: ``{"type": "answer", "sdp": ...}`` or
        ``{"type": "ice", "candidate": ..., "sdpMLineIndex": ...}``; others only count as
        a keep-alive."""
        self.touch()
        if self._branch is not None:
            self._branch.receive(message)

    def close(self) -> None:
        """The browser left: release everything it used. Idempotent."""
        self._view._drop(self, None)


class LiveView:
    """The live view of one camera, with an explicit life: ``start()`` / ``stop()``.

    Started, it listens on the camera's live-view RTP port and serves any number of
    viewers (up to ``max_viewers``); stopped, the port is closed and every viewer is
    dropped. It can be started again after a stop: streaming on/off commands map to
    ``start()`` / ``stop()``. Also a context manager.
    """

    def __init__(
        self,
        config: LiveViewConfig,
        *,
        camera: str,
        rtp_port: int,
        rtp_host: str = "127.0.0.1",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 1 <= rtp_port <= 65535:
            raise ValueError(f"rtp_port must be in 1..65535, got {rtp_port}")
        if not camera or "/" in camera:
            raise ValueError(f"camera must be a non-empty name without '/', got {camera!r}")
        self.camera = camera
        self._config = config
        self._rtp_port = rtp_port
        self._rtp_host = rtp_host
        self._clock = clock
        self._lock = threading.Lock()
        self._viewers: dict[int, Viewer] = {}
        self._ids = itertools.count(1)
        self._loop = LoopThread(f"live-{camera}", "the live view's main loop", _CALL_TIMEOUT_S)
        self._pipeline: Gst.Pipeline | None = None
        self._tee: Gst.Element | None = None
        self._reaper: GLib.Source | None = None
        self._recovery: GLib.Source | None = None  # a fresh start after an error, pending
        self._recovered_at = -_RECOVER_INTERVAL_S
        self._dead_webrtc_log = Every(_DEAD_WEBRTC_LOG_S)
        self._dead_webrtc_unsaid = 0  # dropped since the last warning said so (main loop)
        # Stream state, written by the appsink thread only.
        self._writer: Fmp4Writer | None = None
        self._caps: Gst.Caps | None = None
        self._last_dts: int | None = None
        self._frame_ticks = _DEFAULT_FRAME_TICKS
        self.frames = 0

    @classmethod
    def from_settings(cls, settings: Settings, camera: str | None = None) -> LiveView:
        """The live view of camera ``camera`` (the first when None) of ``settings``."""
        index, cam = settings.camera(camera)
        return cls(settings.live, camera=cam.name, rtp_port=settings.rtp_ports(index)[2])

    # -- public state -------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True between ``start()`` and ``stop()``."""
        return self._pipeline is not None

    @property
    def webrtc_enabled(self) -> bool:
        return self._config.webrtc

    @property
    def codec(self) -> str | None:
        """The stream's codec (``avc1.42c01f``) once a frame arrived, else None."""
        writer = self._writer
        return writer.codec if writer is not None else None

    def counts(self) -> dict[str, int]:
        """Viewers right now, by kind."""
        with self._lock:
            viewers = list(self._viewers.values())
        return {kind: sum(v.kind == kind for v in viewers) for kind in ("webrtc", "mse")}

    # -- life -----------------------------------------------------------------------------

    def start(self) -> None:
        """Listen for the camera's RTP and accept viewers; raise if the port is taken."""
        if self._pipeline is not None:
            return
        init()
        require_elements(_ELEMENTS + (_WEBRTC_ELEMENTS if self._config.webrtc else ()))
        self._loop.start()
        try:
            self._call(self._open)
        except BaseException:
            self.stop()
            raise
        log.info("live view of %s on udp://%s:%d", self.camera, self._rtp_host, self._rtp_port)

    def stop(self) -> None:
        """Drop every viewer, close the port and end the thread. Safe to call twice."""
        if not self._loop.running:
            return
        with self._lock:
            viewers = list(self._viewers.values())
        for viewer in viewers:
            self._drop(viewer, "live view stopped")
        try:
            self._call(self._close)
        finally:
            self._loop.stop()

    def __enter__(self) -> LiveView:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- viewers --------------------------------------------------------------------------

    def add_viewer(self, kind: ViewerKind, link: ViewerLink) -> Viewer:
        """A new viewer of ``kind``. WebRTC: the view sends the SDP offer and its ICE
        candidates through ``link`` (once the stream has given its first keyframe); MSE: a
        ``{"type": "codec"}`` message, the init segment, then fragments from a keyframe on.

        Raises LiveViewError when stopped, full, or asked for WebRTC while it is off.
        """
        if self._pipeline is None:
            raise LiveViewError(f"the live view of {self.camera} is off")
        if kind == "webrtc" and not self._config.webrtc:
            raise LiveViewError("WebRTC is off (live.webrtc); use the fallback")
        with self._lock:
            if len(self._viewers) >= self._config.max_viewers:
                raise LiveViewError(
                    f"{self.camera} has {len(self._viewers)} viewers, the most "
                    "live.max_viewers allows"
                )
            viewer = Viewer(self, next(self._ids), kind, link)
            self._viewers[viewer.id] = viewer
        if kind == "webrtc":
            viewer._branch = _WebRtcBranch(self, viewer)
            self._call(self._attach_ready_branches)
        log.info("%s viewer %d of %s joined", kind, viewer.id, self.camera)
        return viewer

    def _drop(self, viewer: Viewer, reason: str | None) -> None:
        """Forget ``viewer``; tell its link when the view (not the browser) ends it."""
        with self._lock:
            if self._viewers.pop(viewer.id, None) is None:
                return
        if viewer._branch is not None and self._loop.running:
            branch = viewer._branch
            self._call(branch.detach)
        if reason is not None:
            viewer.link.closed(reason)
        log.info(
            "%s viewer %d of %s left (%s)", viewer.kind, viewer.id, self.camera, reason or "gone"
        )

    # -- main loop thread -----------------------------------------------------------------

    def _call(self, func: Callable[[], _T]) -> _T:
        return self._loop.call(func)

    def _later(self, func: Callable[[], object]) -> None:
        self._loop.later(func)

    def _open(self) -> None:
        pipeline = Gst.parse_launch(
            f"udpsrc name=src address={self._rtp_host} port={self._rtp_port} "
            f'buffer-size={UDP_BUFFER_BYTES} caps="{RTP_CAPS}" '
            # config-interval=-1: SPS/PPS in-band before every keyframe, for viewers that
            # join between keyframes.
            "! rtph264depay ! h264parse config-interval=-1 "
            "! video/x-h264,stream-format=byte-stream,alignment=au "
            "! tee name=t allow-not-linked=true "
            "t. ! queue leaky=downstream max-size-buffers=30 max-size-bytes=0 max-size-time=0 "
            "! h264parse ! video/x-h264,stream-format=avc,alignment=au "
            "! appsink name=mse emit-signals=true sync=false max-buffers=30 drop=true"
        )
        assert isinstance(pipeline, Gst.Pipeline)
        sink = pipeline.get_by_name("mse")
        sink.connect("new-sample", self._on_sample)
        bus = pipeline.get_bus()
        # Runs in this thread's default context, the view's own (see LoopThread).
        bus.add_signal_watch()
        bus.connect("message", self._on_bus_message)
        if pipeline.set_state(Gst.State.PLAYING) == Gst.StateChangeReturn.FAILURE:
            message = bus.pop_filtered(Gst.MessageType.ERROR)
            detail = message.parse_error()[0].message if message is not None else "unknown"
            pipeline.set_state(Gst.State.NULL)
            bus.remove_signal_watch()
            raise PipelineError(
                f"live view of {self.camera}: cannot listen on udp://{self._rtp_host}:"
                f"{self._rtp_port}: {detail} (is another live view running?)"
            )
        reaper = GLib.timeout_source_new_seconds(_REAP_INTERVAL_S)
        reaper.set_callback(lambda *_: self._reap())
        reaper.attach(self._loop.context)
        self._pipeline, self._tee = pipeline, pipeline.get_by_name("t")
        self._reaper = reaper

    def _close(self) -> None:
        pipeline = self._pipeline
        self._pipeline = self._tee = None
        if pipeline is None:
            return
        if self._reaper is not None:
            self._reaper.destroy()
            self._reaper = None
        if self._recovery is not None:
            self._recovery.destroy()
            self._recovery = None
        # A branch whose teardown has not run yet may hold a streaming thread inside its
        # webrtcbin: flushing releases it, so that NULL cannot hang.
        for element in pipeline.iterate_elements():
            if element.get_factory().get_name() == "webrtcbin":
                for pad in element.sinkpads:
                    pad.send_event(Gst.Event.new_flush_start())
        pipeline.set_state(Gst.State.NULL)
        pipeline.get_bus().remove_signal_watch()
        self._writer = self._caps = self._last_dts = None
        self._frame_ticks = _DEFAULT_FRAME_TICKS

    def _on_bus_message(self, _bus: Gst.Bus, message: Gst.Message) -> None:
        if message.type == Gst.MessageType.ERROR:
            err, debug = message.parse_error()
            log.error("live view of %s: %s (%s); starting afresh", self.camera, err.message, debug)
            self._schedule_recovery()
        elif message.type == Gst.MessageType.WARNING:
            err, _debug = message.parse_warning()
            log.warning("live view of %s: %s", self.camera, err.message)

    def _schedule_recovery(self) -> None:
        """An error stops the pipeline for good (a WebRTC branch that cannot take the
        camera's new stream, say: every viewer, MSE too, got nothing more until a restart).
        The view starts afresh instead: its viewers are dropped (their pages reconnect) and
        it listens again; at most once in ``_RECOVER_INTERVAL_S``, however many errors."""
        if self._recovery is not None:
            return
        wait = self._recovered_at + _RECOVER_INTERVAL_S - time.monotonic()
        source = GLib.timeout_source_new(max(0, int(wait * 1000)))
        source.set_callback(lambda *_: self._recover())
        source.attach(self._loop.context)
        self._recovery = source

    def _recover(self) -> bool:
        self._recovery = None
        if self._pipeline is None:
            return False  # stopped meanwhile
        self._recovered_at = time.monotonic()
        with self._lock:
            viewers = list(self._viewers.values())
        for viewer in viewers:
            self._drop(viewer, "the live view starts afresh after an error")
        self._close()
        try:
            self._open()
        except PipelineError:
            log.exception("live view of %s cannot start afresh; it is off", self.camera)
        return False

    def _reap(self) -> bool:
        now = self._clock()
        deadline = now - self._config.viewer_timeout_s
        with self._lock:
            viewers = list(self._viewers.values())
        for viewer in viewers:
            branch = viewer._branch
            if viewer.last_seen < deadline:
                self._drop(viewer, "no keep-alive from the browser")
            elif branch is not None and branch.silent_s(now) > self._config.connect_timeout_s:
                self._drop_dead_webrtc(viewer, branch.connected_once)
        return True

    def _drop_dead_webrtc(self, viewer: Viewer, connected_once: bool) -> None:
        """Drop a WebRTC viewer past ``live.connect_timeout_s``, and warn of it once in a
        while (main loop)."""
        timeout = self._config.connect_timeout_s
        if connected_once:
            why = f"nothing over its WebRTC connection for {timeout:g} s"
        else:
            why = f"WebRTC not connected {timeout:g} s after the offer"
        self._drop(viewer, why)
        self._dead_webrtc_unsaid += 1
        if self._dead_webrtc_log.due():
            more = self._dead_webrtc_unsaid - 1
            log.warning(
                "live view of %s: webrtc viewer %d dropped, %s (live.connect_timeout_s)%s",
                self.camera,
                viewer.id,
                why,
                f"; {more} more such since the last line" if more else "",
            )
            self._dead_webrtc_unsaid = 0

    # -- the stream (appsink thread) ------------------------------------------------------

    def _on_sample(self, sink: Gst.Element) -> Gst.FlowReturn:
        sample = sink.emit("pull-sample")
        if sample is None:
            return Gst.FlowReturn.EOS
        caps = sample.get_caps()
        if self._caps is None or not caps.is_equal(self._caps):
            self._new_caps(caps)
        writer = self._writer
        if writer is None:
            return Gst.FlowReturn.OK
        buf = sample.get_buffer()
        ts = buf.dts if buf.dts != Gst.CLOCK_TIME_NONE else buf.pts
        if ts == Gst.CLOCK_TIME_NONE:
            return Gst.FlowReturn.OK
        dts = int(ts / _NS_PER_TICK)
        if self._last_dts is not None:
            delta = dts - self._last_dts
            if delta <= 0:
                dts = self._last_dts + 1
            elif delta < TIMESCALE:  # not across a gap (a restarted source)
                self._frame_ticks = delta
        self._last_dts = dts
        self.frames += 1
        keyframe = not buf.has_flags(Gst.BufferFlags.DELTA_UNIT)
        with self._lock:
            viewers = [v for v in self._viewers.values() if v.kind == "mse"]
        if not viewers:
            return Gst.FlowReturn.OK
        ok, info = buf.map(Gst.MapFlags.READ)
        if not ok:
            return Gst.FlowReturn.OK
        try:
            fragment = writer.fragment(bytes(info.data), dts, self._frame_ticks, keyframe)
        finally:
            buf.unmap(info)
        for viewer in viewers:
            if viewer._waiting:
                if not keyframe:
                    continue
                if viewer._init_sent is not writer:
                    viewer.link.send(json.dumps({"type": "codec", "codec": writer.codec}))
                    viewer.link.send(writer.init_segment)
                    viewer._init_sent = writer
                viewer._waiting = False
            if not viewer.link.send(fragment):
                viewer._waiting = True
        return Gst.FlowReturn.OK

    def _new_caps(self, caps: Gst.Caps) -> None:
        self._caps = caps
        s = caps.get_structure(0)
        ok_w, width = s.get_int("width")
        ok_h, height = s.get_int("height")
        codec_data = s.get_value("codec_data") if s.has_field("codec_data") else None
        if not (ok_w and ok_h) or codec_data is None:
            log.warning("live view of %s: stream caps without size or codec_data", self.camera)
            self._writer = None
            return
        _ok, info = codec_data.map(Gst.MapFlags.READ)
        try:
            avcc = bytes(info.data)
        finally:
            codec_data.unmap(info)
        self._writer = Fmp4Writer(avcc, width, height)
        log.info("live view of %s: %dx%d %s", self.camera, width, height, self._writer.codec)
        with self._lock:
            for viewer in self._viewers.values():
                viewer._waiting = True
        self._later(self._attach_ready_branches)

    def _attach_ready_branches(self) -> None:
        """Build the WebRTC branches waiting for the stream's first caps (main loop)."""
        writer, pipeline, tee = self._writer, self._pipeline, self._tee
        if writer is None or pipeline is None or tee is None:
            return
        with self._lock:
            waiting = [
                v._branch
                for v in self._viewers.values()
                if v._branch is not None and not v._branch.attached
            ]
        for branch in waiting:
            try:
                branch.attach(pipeline, tee, writer.codec.removeprefix("avc1."))
            except Exception:
                log.exception("live view of %s: cannot start a WebRTC viewer", self.camera)
                viewer = branch.viewer
                self._later(functools.partial(self._drop, viewer, "WebRTC setup failed"))


class _WebRtcBranch:
    """``queue ! rtph264pay ! webrtcbin`` for one viewer, on the shared tee.

    The device makes the offer (send-only H.264 with the stream's own profile-level-id);
    the browser answers. The branch joins the tee only once the answer is applied: webrtcbin
    holds data back until it is negotiated, and a streaming thread held inside it would
    block the branch's teardown. Built and torn down in the view's main loop thread.

    Whether the browser is at the other end is told by what comes from it, not by
    webrtcbin's connection state alone, which (1.22, with libnice) still said "connected"
    40 s after the browser had closed its end: see :meth:`silent_s`.
    """

    def __init__(self, view: LiveView, viewer: Viewer) -> None:
        self.view = view
        self.viewer = viewer
        self.attached = False
        self._queue: Gst.Element | None = None
        self._elements: list[Gst.Element] = []
        self._tee_pad: Gst.Pad | None = None
        self._webrtc: Gst.Element | None = None
        self._pipeline: Gst.Pipeline | None = None
        self._tee: Gst.Element | None = None
        self._remote_candidates = 0
        # The last time the browser was known to be there: the offer, the connection's
        # going up or down, then each packet from it while connected (its RTCP reports keep
        # coming, about one a second, whether or not the camera sends). Written by
        # GStreamer threads, read by the reaper.
        self._alive_at = 0.0
        self._connected = False
        self._listening = False  # a probe sees the packets from the browser
        self.connected_once = False

    def silent_s(self, now: float) -> float:
        """How long the browser has not been known to be there: since the offer while the
        connection is not up; since the last packet from it once it is (or, where its
        packets cannot be watched, 0 while webrtcbin calls it connected). 0 before the
        offer (the stream has not started)."""
        if not self.attached or (self._connected and not self._listening):
            return 0.0
        return now - self._alive_at

    def attach(self, pipeline: Gst.Pipeline, tee: Gst.Element, profile_level_id: str) -> None:
        self.attached = True
        self._alive_at = self.view._clock()
        queue = Gst.ElementFactory.make("queue")
        queue.set_property("leaky", 2)  # downstream: drop the oldest
        queue.set_property("max-size-buffers", _BRANCH_QUEUE_BUFFERS)
        queue.set_property("max-size-bytes", 0)
        queue.set_property("max-size-time", 0)
        pay = Gst.ElementFactory.make("rtph264pay")
        pay.set_property("config-interval", -1)
        pay.set_property("pt", _PAYLOAD_TYPE)
        pay.set_property("aggregate-mode", "zero-latency")
        webrtc = Gst.ElementFactory.make("webrtcbin")
        webrtc.set_property("bundle-policy", GstWebRTC.WebRTCBundlePolicy.MAX_BUNDLE)
        if self.view._config.stun_server:
            webrtc.set_property("stun-server", self.view._config.stun_server)
        webrtc.connect("on-negotiation-needed", self._on_negotiation_needed)
        webrtc.connect("on-ice-candidate", self._on_ice_candidate)
        webrtc.connect("notify::connection-state", self._on_connection_state)
        # Downstream first: the order they are stopped in.
        self._elements = [webrtc, pay, queue]
        for element in self._elements:
            pipeline.add(element)
        queue.link(pay)
        caps = Gst.Caps.from_string(
            f"application/x-rtp,media=video,encoding-name=H264,payload={_PAYLOAD_TYPE},"
            "clock-rate=90000,packetization-mode=(string)1,"
            f"profile-level-id=(string){profile_level_id}"
        )
        sink = webrtc.request_pad_simple("sink_%u")
        transceiver = sink.get_property("transceiver")
        transceiver.set_property("direction", GstWebRTC.WebRTCRTPTransceiverDirection.SENDONLY)
        transceiver.set_property("codec-preferences", caps)
        pay.get_static_pad("src").link(sink)
        self._queue, self._webrtc, self._pipeline, self._tee = queue, webrtc, pipeline, tee
        for element in self._elements:
            element.sync_state_with_parent()

    def _join_tee(self) -> None:
        """Feed the branch (main loop, once the answer is applied)."""
        if self._tee is None or self._queue is None or self._tee_pad is not None:
            return
        tee_pad = self._tee.request_pad_simple("src_%u")
        tee_pad.link(self._queue.get_static_pad("sink"))
        self._tee_pad = tee_pad

    def detach(self) -> None:
        """Leave the tee when no buffer is passing, then free the elements (main loop)."""
        tee_pad, pipeline, tee, queue = self._tee_pad, self._pipeline, self._tee, self._queue
        self._tee_pad = self._webrtc = self._pipeline = self._tee = self._queue = None
        elements, self._elements = self._elements, []
        if pipeline is None or queue is None or tee is None:
            return
        queue_sink = queue.get_static_pad("sink")

        def free() -> None:
            # Flushing wakes a streaming thread held inside webrtcbin; then NULL cannot hang.
            queue_sink.send_event(Gst.Event.new_flush_start())
            for element in elements:
                element.set_state(Gst.State.NULL)
                pipeline.remove(element)
            if tee_pad is not None:
                tee.release_request_pad(tee_pad)

        if tee_pad is None:
            free()
            return

        def unlink(pad: Gst.Pad, _info: Gst.PadProbeInfo) -> Gst.PadProbeReturn:
            pad.unlink(queue_sink)
            self.view._later(free)
            return Gst.PadProbeReturn.REMOVE

        tee_pad.add_probe(Gst.PadProbeType.IDLE, unlink)

    # -- signalling -----------------------------------------------------------------------

    def receive(self, message: dict[str, Any]) -> None:
        webrtc = self._webrtc
        if webrtc is None:
            return
        kind = message.get("type")
        if kind == "answer" and isinstance(message.get("sdp"), str):
            result, sdp = GstSdp.SDPMessage.new_from_text(self._answer_text(message["sdp"]))
            if result != GstSdp.SDPResult.OK:
                log.warning("viewer %d sent an unreadable SDP answer", self.viewer.id)
                return
            answer = GstWebRTC.WebRTCSessionDescription.new(GstWebRTC.WebRTCSDPType.ANSWER, sdp)
            view = self.view
            promise = Gst.Promise.new_with_change_func(lambda *_: view._later(self._join_tee))
            webrtc.emit("set-remote-description", answer, promise)
        elif kind == "ice":
            candidate = message.get("candidate")
            if isinstance(candidate, str) and candidate and self._take_candidate(candidate):
                mline = message.get("sdpMLineIndex")
                webrtc.emit("add-ice-candidate", mline if isinstance(mline, int) else 0, candidate)

    def _take_candidate(self, candidate: str) -> bool:
        """Whether a remote candidate may go to webrtcbin: see :func:`refuse_candidate`; of
        one viewer's, only the first ``_MAX_REMOTE_CANDIDATES`` are looked at."""
        self._remote_candidates += 1
        if self._remote_candidates > _MAX_REMOTE_CANDIDATES:
            if self._remote_candidates == _MAX_REMOTE_CANDIDATES + 1:
                log.info(
                    "viewer %d: more than %d ICE candidates, the rest left out",
                    self.viewer.id,
                    _MAX_REMOTE_CANDIDATES,
                )
            return False
        why = refuse_candidate(candidate)
        if why is not None:
            log.info("viewer %d: ICE candidate left out: %s", self.viewer.id, why)
        return why is None

    def _answer_text(self, sdp: str) -> str:
        """The browser's answer, each line trimmed as GstSdp would read it (so that what is
        checked is what webrtcbin gets), without the candidates it may not give."""
        lines = (line.strip() for line in sdp.split("\n"))
        return "".join(
            f"{line}\r\n"
            for line in lines
            if line and (not _CANDIDATE_LINE.match(line) or self._take_candidate(line))
        )

    def _on_negotiation_needed(self, webrtc: Gst.Element) -> None:
        promise = Gst.Promise.new_with_change_func(self._on_offer_created, webrtc)
        webrtc.emit("create-offer", None, promise)

    def _on_offer_created(self, promise: Gst.Promise, webrtc: Gst.Element) -> None:
        reply = promise.get_reply()
        offer = reply.get_value("offer") if reply is not None else None
        if offer is None:
            log.warning("viewer %d: webrtcbin made no offer", self.viewer.id)
            return
        webrtc.emit("set-local-description", offer, Gst.Promise.new())
        self.viewer.link.send(json.dumps({"type": "offer", "sdp": offer.sdp.as_text()}))

    def _on_ice_candidate(self, _webrtc: Gst.Element, mline: int, candidate: str) -> None:
        self.viewer.link.send(
            json.dumps({"type": "ice", "candidate": candidate, "sdpMLineIndex": mline})
        )

    def _on_connection_state(self, webrtc: Gst.Element, _pspec: object) -> None:
        state = webrtc.get_property("connection-state")
        view, viewer = self.view, self.viewer
        connected = state == GstWebRTC.WebRTCPeerConnectionState.CONNECTED
        if connected != self._connected:
            self._alive_at = view._clock()  # up, or down: a silence counts from here
            self._connected = connected
        if connected and not self.connected_once:
            self.connected_once = True
            view._later(self._listen)
        if state == GstWebRTC.WebRTCPeerConnectionState.FAILED:
            view._later(lambda: view._drop(viewer, "WebRTC connection failed"))

    def _listen(self) -> None:
        """Watch for packets from the browser (main loop, once connected): a probe on
        webrtcbin's ICE source, which passes on all that the browser sends but ICE's own
        checks (DTLS, SRTP, SRTCP)."""
        webrtc = self._webrtc
        if webrtc is None:
            return  # dropped meanwhile
        for source in _elements_made_by(webrtc, _ICE_SOURCE):
            probe = Gst.PadProbeType.BUFFER | Gst.PadProbeType.BUFFER_LIST
            source.get_static_pad("src").add_probe(probe, self._heard)
            self._listening = True
        if not self._listening:
            log.warning(
                "viewer %d: no ICE source found in webrtcbin; its connection counts as alive "
                "for as long as webrtcbin calls it connected",
                self.viewer.id,
            )

    def _heard(self, _pad: Gst.Pad, _info: Gst.PadProbeInfo) -> Gst.PadProbeReturn:
        """A packet from the browser (a streaming thread: only its time is kept)."""
        if self._connected:
            self._alive_at = self.view._clock()
        return Gst.PadProbeReturn.OK
