"""GStreamer bootstrap: one place that imports Gst, checks plugins and builds elements."""

from __future__ import annotations

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
