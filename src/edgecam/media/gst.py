"""GStreamer bootstrap: one place that imports Gst, checks plugins and builds elements."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import gi

# ONNX Runtime first: libgstreamer pulls in libunwind, and once that library is ahead of
# libgcc_s in the process, a C++ exception thrown inside ONNX Runtime (a bad model file, a
# shape error) aborts the whole process instead of reaching Python as an error.
import onnxruntime  # noqa: F401  (load order matters, see above)

gi.require_version("Gst", "1.0")
gi.require_version("GstApp", "1.0")
gi.require_version("GstPbutils", "1.0")
gi.require_version("GstVideo", "1.0")
from gi.repository import GLib, Gst, GstApp, GstPbutils, GstVideo

from edgecam.errors import MissingPluginError, PipelineError

__all__ = [
    "RTP_CAPS",
    "UDP_BUFFER_BYTES",
    "GLib",
    "Gst",
    "GstApp",
    "GstPbutils",
    "GstVideo",
    "LoopThread",
    "call_in_context",
    "init",
    "make_element",
    "require_elements",
]

# The one video format between processes: H.264 RTP over loopback UDP, from the inference
# pipeline to the streaming and recorder workers.
RTP_CAPS = "application/x-rtp,media=video,clock-rate=90000,encoding-name=H264,payload=96"
# Receive buffer of the RTP consumers: a keyframe is a burst of ~100 packets, and a busy
# 2-core box may not schedule the reader in time (the kernel caps it at net.core.rmem_max).
UDP_BUFFER_BYTES = 4 * 1024 * 1024

# Which Debian package brings an element, for the error message.
_PACKAGES = {
    "x264enc": "gstreamer1.0-plugins-ugly",
    "openh264enc": "gstreamer1.0-plugins-bad",
    "avdec_h264": "gstreamer1.0-libav",
    "rtspsrc": "gstreamer1.0-plugins-good",
    "cairooverlay": "gstreamer1.0-plugins-good",
    "mp4mux": "gstreamer1.0-plugins-good",
    "mpegtsmux": "gstreamer1.0-plugins-bad",
    "h264parse": "gstreamer1.0-plugins-bad",
    "overlaycomposition": "gstreamer1.0-plugins-base",
    "v4l2src": "gstreamer1.0-plugins-good",
}


def init() -> None:
    """Initialise GStreamer once; safe to call from anywhere."""
    if not Gst.is_initialized():
        Gst.init(None)


def require_elements(names: Iterable[str]) -> None:
    """Raise :class:`MissingPluginError` naming every element in ``names`` that is missing."""
    init()
    missing = [n for n in names if Gst.ElementFactory.find(n) is None]
    if missing:
        pkgs = sorted({_PACKAGES.get(n, "a GStreamer plugin package") for n in missing})
        raise MissingPluginError(
            f"GStreamer element(s) {', '.join(missing)} not installed; install "
            f"{', '.join(pkgs)} (scripts/setup.sh does this)"
        )


def make_element(factory: str, name: str | None = None, **props: object) -> Gst.Element:
    """Create an element, set its properties, and fail clearly when its plugin is missing."""
    require_elements([factory])
    element = Gst.ElementFactory.make(factory, name)
    if element is None:
        raise MissingPluginError(f"GStreamer could not create element {factory!r}")
    for key, value in props.items():
        element.set_property(key.replace("_", "-"), value)
    return element


_T = TypeVar("_T")


def call_in_context(
    context: GLib.MainContext,
    owner: threading.Thread | None,
    func: Callable[[], _T],
    *,
    timeout: float,
    what: str,
) -> _T:
    """Run ``func`` in the thread that runs ``context``'s main loop (``owner``) and return
    its result, or raise its error there. ``what`` names the loop in the timeout error."""
    if threading.current_thread() is owner:
        return func()
    done = threading.Event()
    box: dict[str, Any] = {}

    def invoke() -> bool:
        try:
            box["result"] = func()
        except BaseException as exc:
            box["error"] = exc
        finally:
            done.set()
        return False

    source = GLib.idle_source_new()
    source.set_callback(lambda *_: invoke())
    source.attach(context)
    if not done.wait(timeout):
        raise PipelineError(f"{what} did not answer within {timeout:.0f} s")
    if "error" in box:
        raise box["error"]
    result: _T = box.get("result")  # type: ignore[assignment]
    return result


class LoopThread:
    """A private GLib main context run by a thread of its own, with an explicit life: the
    RTSP server and the live view each do their GStreamer work in one, apart from the
    process's default context. ``call`` runs a function there and waits for it; ``later``
    runs one there soon; ``context`` is the one to attach sources and bus watches to."""

    def __init__(self, name: str, what: str, timeout: float = 10.0) -> None:
        self.name = name
        self.what = what
        self.timeout = timeout
        self.context: GLib.MainContext | None = None
        self._loop: GLib.MainLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError(f"{self.what} already started")
        context = self.context = GLib.MainContext.new()
        loop = self._loop = GLib.MainLoop.new(context, False)
        ready = threading.Event()

        def run() -> None:
            context.push_thread_default()  # bus watches made here attach to this context
            try:
                ready.set()
                loop.run()
            finally:
                context.pop_thread_default()

        self._thread = threading.Thread(target=run, name=self.name, daemon=True)
        self._thread.start()
        ready.wait(self.timeout)

    def call(self, func: Callable[[], _T]) -> _T:
        """Run ``func`` in the loop's thread and return its result (or raise its error)."""
        assert self.context is not None, f"{self.what} is not running"
        return call_in_context(self.context, self._thread, func, timeout=self.timeout,
                               what=self.what)  # fmt: skip

    def later(self, func: Callable[[], object]) -> None:
        """Run ``func`` in the loop's thread soon, without waiting for it."""
        context = self.context
        if context is None:
            return
        source = GLib.idle_source_new()
        source.set_callback(lambda *_: bool(func()) and False)
        source.attach(context)

    def stop(self) -> None:
        """End the loop and join its thread. Safe to call twice."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        try:
            self.call(loop.quit)
        finally:
            thread.join(self.timeout)
            if thread.is_alive():
                logging.getLogger(__name__).warning(
                    "%s thread did not end within %.0f s", self.what, self.timeout
                )
            self._thread = self._loop = self.context = None
