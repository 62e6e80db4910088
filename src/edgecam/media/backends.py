"""Media backends: where a camera's video is decoded, converted, scaled and encoded.

One table entry per backend (``media.backend`` in config): the launch-description fragments
it puts around the pipeline's fixed parts (the tee, the detector's appsink, the drawing
element, the muxers), the memory its frames are in, its own H.264 encoder and the elements
it needs. ``cpu`` is GStreamer's software elements; ``nvidia`` decodes with NVDEC, converts
and scales with CUDA and encodes with NVENC on CUDA memory; ``vaapi`` decodes, converts and
encodes through VA-API. Drawing (Python, or cairo) always works on system-memory I420: a
hardware backend downloads frames for it and uploads them again for its encoder.

``auto`` takes the first of ``nvidia``, ``vaapi`` that *works* (its elements exist and a tiny
pipeline through them reaches PLAYING and runs to its end: a plugin that loads on a machine
without the device fails there), else ``cpu``; the probe runs once a process, and the reason
a backend was passed over is logged.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Literal

from edgecam.config import EncoderConfig, Settings
from edgecam.errors import MissingPluginError
from edgecam.media.gst import Gst, init

__all__ = [
    "BACKENDS",
    "ENCODERS",
    "Backend",
    "BackendName",
    "Encoder",
    "Memory",
    "backend_problem",
    "prefer_decoders",
    "probe_backend",
    "resolve_backend",
    "resolve_encoder",
]

log = logging.getLogger(__name__)

BackendName = Literal["cpu", "nvidia", "vaapi"]
Memory = Literal["system", "cuda"]
_AUTO_ORDER: tuple[BackendName, ...] = ("nvidia", "vaapi")
_PROBE_TIMEOUT_NS = 5 * Gst.SECOND
_NOT_INSTALLED = "GStreamer element(s)"


@dataclass(frozen=True)
class Encoder:
    """An H.264 encoder: its element, its properties (``{preset}``, ``{kbps}``, ``{bps}``
    filled from config) and the memory it takes its frames in."""

    factory: str
    props: str
    memory: Memory = "system"
    backend: BackendName | None = None  # only on this backend (a hardware encoder)


# Keyframes are forced by time from a pad probe; the encoders' own interval is only a long
# backstop. No access unit delimiters: rtph264pay sends one as an RTP packet of its own with
# the frame's timestamp, and RTSP clients that copy the stream (ffmpeg -c copy) take it for a
# second frame.
ENCODERS: dict[str, Encoder] = {
    "x264": Encoder(
        "x264enc",
        "tune=zerolatency speed-preset={preset} bitrate={kbps} key-int-max=600 aud=false",
    ),
    "openh264": Encoder("openh264enc", "bitrate={bps} complexity=low gop-size=600"),
    "nvh264": Encoder(
        "nvh264enc",
        "bitrate={kbps} preset=low-latency-hq zerolatency=true gop-size=600",
        memory="cuda",
        backend="nvidia",
    ),
    # vaapih264enc uploads system-memory frames itself.
    "vaapih264": Encoder("vaapih264enc", "bitrate={kbps} keyframe-period=600", backend="vaapi"),
}


@dataclass(frozen=True)
class Backend:
    """One media backend's fragments of the launch description.

    ``fit``: after the decoder, up to the tee: convert and scale to the pinned size; its
    first element is named ``conv`` and it ends in ``capsfilter name=fit_caps``, whose caps
    the pipeline pins at the first frame's size (``caps_feature`` goes into those caps).
    ``infer_scale``: from the tee to the detector's RGB caps, scaled to ``{w}`` x ``{h}``;
    empty: the detector's appsink takes the video frames as they are (system-memory I420)
    and its thread fits them to the model (:func:`edgecam.media.frames.model_frame`, several
    times cheaper than ``videoscale ! videoconvert``).
    ``download``/``upload``: between the frames' memory and system memory (empty on cpu).
    """

    name: BackendName
    fit: str
    infer_scale: str
    memory: Memory
    encoder: str  # the encoder ``encoder.element: auto`` means here
    download: str = ""
    upload: str = ""
    caps_feature: str = ""
    decoders: tuple[str, ...] = ()  # preferred by decodebin over software decoders
    elements: tuple[str, ...] = ()  # what it needs besides the common elements
    probe: str | None = None  # a short launch line that must run to its end here

    def video_in(self, draws: bool) -> str:
        """From the video queue to the drawing element (or straight to the encoder)."""
        return self.download if draws and self.memory != "system" else ""

    def encoder_in(self, encoder: Encoder, draws: bool) -> str:
        """What goes in front of ``encoder``: the memory it takes, whatever came before."""
        in_system = self.memory == "system" or draws
        if encoder.memory == "cuda":
            return self.upload
        if not in_system:
            return self.download
        return ""


BACKENDS: dict[BackendName, Backend] = {
    "cpu": Backend(
        name="cpu",
        fit=(
            "videoconvert name=conv ! videoscale name=fit add-borders=true ! "
            "capsfilter name=fit_caps caps=video/x-raw,format=I420"
        ),
        infer_scale="",
        memory="system",
        encoder="x264",
    ),
    "nvidia": Backend(
        name="nvidia",
        fit=(
            "cudaupload name=conv ! cudaconvertscale name=fit add-borders=true ! "
            "capsfilter name=fit_caps caps=video/x-raw(memory:CUDAMemory),format=I420"
        ),
        infer_scale=(
            "cudaconvertscale add-borders=true ! "
            "video/x-raw(memory:CUDAMemory),format=RGB,width={w},height={h},"
            "pixel-aspect-ratio=1/1 ! cudadownload ! "
        ),
        memory="cuda",
        encoder="nvh264",
        download="cudadownload ! ",
        # NVENC takes NV12 in CUDA memory; cudaupload passes CUDA memory through.
        upload="cudaupload ! cudaconvertscale ! video/x-raw(memory:CUDAMemory),format=NV12 ! ",
        caps_feature="(memory:CUDAMemory)",
        decoders=("nvh264dec", "nvh265dec"),
        elements=("cudaupload", "cudadownload", "cudaconvertscale", "nvh264enc", "nvh264dec"),
        probe=(
            # What the pipeline asks of these elements, letterboxing included: a GStreamer
            # whose cudaconvertscale lacks add-borders fails here, not in the camera's run.
            "videotestsrc num-buffers=3 ! video/x-raw,format=I420,width=64,height=64 ! "
            "cudaupload ! cudaconvertscale add-borders=true ! "
            "video/x-raw(memory:CUDAMemory),format=NV12,width=96,height=64 ! "
            "nvh264enc ! h264parse ! nvh264dec ! cudadownload ! fakesink"
        ),
    ),
    "vaapi": Backend(
        name="vaapi",
        # vaapipostproc converts (and deinterlaces) the decoder's surfaces, and hands
        # system-memory I420 on: the detector branch and the drawing read it there.
        fit=(
            "vaapipostproc name=conv ! videoscale name=fit add-borders=true ! "
            "capsfilter name=fit_caps caps=video/x-raw,format=I420"
        ),
        infer_scale="",
        memory="system",
        encoder="vaapih264",
        decoders=("vaapih264dec", "vaapih265dec"),
        elements=("vaapipostproc", "vaapih264enc", "vaapih264dec"),
        probe=(
            "videotestsrc num-buffers=3 ! video/x-raw,format=NV12,width=64,height=64 ! "
            "vaapih264enc ! h264parse ! vaapih264dec ! vaapipostproc ! "
            "video/x-raw,format=I420 ! fakesink"
        ),
    ),
}


@functools.cache
def backend_problem(name: BackendName) -> str | None:
    """Why backend ``name`` cannot run here (None when it can); probed once a process."""
    return probe_backend(BACKENDS[name])


def probe_backend(backend: Backend) -> str | None:
    """Why ``backend`` cannot run here (None when it can): an element it needs is missing,
    or its test pipeline does not run to its end."""
    init()
    missing = [e for e in backend.elements if Gst.ElementFactory.find(e) is None]
    if missing:
        return f"{_NOT_INSTALLED} {', '.join(missing)} not installed"
    if backend.probe is None:
        return None
    try:
        pipeline = Gst.parse_launch(backend.probe)
    except Exception as exc:  # GLib.Error: an element refused its properties
        return f"its test pipeline does not build: {exc}"
    try:
        if pipeline.set_state(Gst.State.PLAYING) == Gst.StateChangeReturn.FAILURE:
            return "its test pipeline does not start (no device, or no driver)"
        msg = pipeline.get_bus().timed_pop_filtered(
            _PROBE_TIMEOUT_NS, Gst.MessageType.EOS | Gst.MessageType.ERROR
        )
        if msg is None:
            return "its test pipeline did not finish in time"
        if msg.type == Gst.MessageType.ERROR:
            err, _debug = msg.parse_error()
            return f"its test pipeline failed: {err.message}"
        return None
    finally:
        pipeline.set_state(Gst.State.NULL)


def resolve_backend(settings: Settings) -> Backend:
    """The backend config asks for, ``auto`` resolved; raises :class:`MissingPluginError`
    naming what is missing when an explicit one (or the one a hardware encoder needs)
    cannot run here."""
    wanted = settings.media.backend
    needed_by = ENCODERS.get(settings.encoder.element)
    if wanted == "auto" and needed_by is not None and needed_by.backend is not None:
        wanted = needed_by.backend  # encoder.element nvh264 or vaapih264: that backend only
    if wanted != "auto":
        problem = backend_problem(wanted)
        if problem is not None:
            raise MissingPluginError(
                f"media backend {wanted} (media.backend {settings.media.backend}, "
                f"encoder.element {settings.encoder.element}) cannot run here: {problem}"
            )
        return BACKENDS[wanted]
    for name in _AUTO_ORDER:
        problem = backend_problem(name)
        if problem is None:
            log.info("media backend auto: %s", name)
            return BACKENDS[name]
        # Said out loud only when the backend is installed but does not work here (no
        # device, no driver): a machine without the plugins is the common case.
        level = logging.DEBUG if problem.startswith(_NOT_INSTALLED) else logging.INFO
        log.log(level, "media backend auto: not %s: %s", name, problem)
    return BACKENDS["cpu"]


def resolve_encoder(cfg: EncoderConfig, backend: Backend) -> Encoder:
    """The encoder config asks for on ``backend`` (``auto``: the backend's own)."""
    name = backend.encoder if cfg.element == "auto" else cfg.element
    encoder = ENCODERS[name]
    if encoder.backend not in (None, backend.name):
        # Config validation refuses this; a hand-built Settings may still get here.
        raise MissingPluginError(
            f"encoder.element {name} needs media.backend {encoder.backend}, not {backend.name}"
        )
    return encoder


def prefer_decoders(backend: Backend) -> None:
    """Have decodebin pick ``backend``'s hardware decoders over software ones (in this
    process's registry)."""
    for name in backend.decoders:
        factory = Gst.ElementFactory.find(name)
        if factory is not None and factory.get_rank() <= Gst.Rank.PRIMARY:
            factory.set_rank(Gst.Rank.PRIMARY + 10)
