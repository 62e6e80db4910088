"""Media backends: where a camera's video is decoded, converted, scaled and encoded.

One table entry per backend (``media.backend`` in config): the launch-description fragments
it puts around the pipeline's fixed parts (the tee, the detector's appsink, the drawing
element, the muxers), the memory its frames are in, its own H.264 encoder and the elements
it needs. ``cpu`` is GStreamer's software elements; ``nvidia`` decodes with NVDEC, converts
and scales with CUDA and encodes with NVENC on CUDA memory; ``nvdec`` decodes with NVDEC
and does the rest on the CPU (for GStreamers without the CUDA converter: before 1.22, or
1.22 with a CUDA 13 NVRTC); ``vaapi`` decodes, converts and encodes through VA-API.
Drawing (Python, or cairo) always works on system-memory I420: a hardware backend downloads
frames for it and uploads them again for its encoder.

``auto`` takes the first of ``nvidia``, ``vaapi``, ``nvdec`` that *works* (its elements exist
and a tiny pipeline through them reaches PLAYING and runs to its end: a plugin that loads on
a machine without the device fails there), else ``cpu``; the probe runs once a process, and
the reason a backend was passed over is logged. A hardware encoder is probed the same way,
apart: NVIDIA's data-centre GPUs (A100, H100, H200) decode but have no NVENC, and there
``encoder.element: auto`` falls back to x264 on the ``nvidia`` backend, saying so.
"""

from __future__ import annotations

import dataclasses
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
    "encoder_problem",
    "prefer_decoders",
    "probe_backend",
    "resolve_backend",
    "resolve_encoder",
]

log = logging.getLogger(__name__)

BackendName = Literal["cpu", "nvidia", "nvdec", "vaapi"]
Memory = Literal["system", "cuda"]
_AUTO_ORDER: tuple[BackendName, ...] = ("nvidia", "vaapi", "nvdec")
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
    probe: str | None = None  # a short launch line that must run to its end here


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
        # Registered wherever nvcodec finds a GPU, NVENC or not (an H200 has none).
        probe=(
            "videotestsrc num-buffers=3 ! video/x-raw,format=NV12,width=64,height=64 ! "
            "nvh264enc ! h264parse ! fakesink"
        ),
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
    and its thread fits them to the model (:class:`edgecam.media.frames.ModelFit`, several
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
    missing_hint: str = ""  # said after the missing elements, where some are present

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


# A few frames of H.264 for a decoder's probe (x264 is the cpu backend's own encoder).
_H264_SAMPLE = (
    "videotestsrc num-buffers=3 ! video/x-raw,format=I420,width=64,height=64 ! x264enc ! h264parse"
)

_CPU = Backend(
    name="cpu",
    fit=(
        "videoconvert name=conv ! videoscale name=fit add-borders=true ! "
        "capsfilter name=fit_caps caps=video/x-raw,format=I420"
    ),
    infer_scale="",
    memory="system",
    encoder="x264",
)

BACKENDS: dict[BackendName, Backend] = {
    "cpu": _CPU,
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
        # nvh264enc is probed apart (see ENCODERS): without NVENC, x264 encodes.
        elements=("cudaupload", "cudadownload", "cudaconvertscale", "nvh264dec"),
        # What the pipeline asks of these elements, letterboxing included: a GStreamer
        # whose cudaconvertscale lacks add-borders fails here, not in the camera's run.
        probe=(
            f"{_H264_SAMPLE} ! nvh264dec ! cudaupload ! cudaconvertscale add-borders=true ! "
            "video/x-raw(memory:CUDAMemory),format=I420,width=96,height=64 ! cudadownload ! "
            "fakesink"
        ),
        missing_hint=(
            "nvcodec registers cudaconvertscale from GStreamer 1.22, with an NVRTC library it "
            "can use (GST_CUDA_NVRTC_LIBNAME names one; 1.22 cannot use CUDA 13's): "
            "media.backend nvdec decodes on the GPU without it"
        ),
    ),
    # The cpu backend with NVDEC preferred by decodebin: the decoder hands system-memory NV12
    # on, and the CPU converts, scales and encodes.
    "nvdec": dataclasses.replace(
        _CPU,
        name="nvdec",
        decoders=("nvh264dec", "nvh265dec"),
        elements=("nvh264dec",),
        probe=f"{_H264_SAMPLE} ! nvh264dec ! videoconvert ! video/x-raw,format=I420 ! fakesink",
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


@functools.cache
def encoder_problem(name: str) -> str | None:
    """Why encoder ``name`` cannot run here (None when it can); probed once a process."""
    encoder = ENCODERS[name]
    init()
    if Gst.ElementFactory.find(encoder.factory) is None:
        return f"{_NOT_INSTALLED} {encoder.factory} not installed"
    return _run_probe(encoder.probe)


def probe_backend(backend: Backend) -> str | None:
    """Why ``backend`` cannot run here (None when it can): an element it needs is missing,
    or its test pipeline does not run to its end."""
    init()
    missing = [e for e in backend.elements if Gst.ElementFactory.find(e) is None]
    if missing:
        problem = f"{_NOT_INSTALLED} {', '.join(missing)} not installed"
        if backend.missing_hint and len(missing) < len(backend.elements):
            problem += f" ({backend.missing_hint})"
        return problem
    return _run_probe(backend.probe)


def _run_probe(description: str | None) -> str | None:
    """Why the test pipeline ``description`` does not run to its end here (None: it does)."""
    if description is None:
        return None
    try:
        pipeline = Gst.parse_launch(description)
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
    cannot run here, or the hardware encoder asked for cannot."""
    wanted = settings.media.backend
    needed_by = ENCODERS.get(settings.encoder.element)
    if wanted == "auto" and needed_by is not None and needed_by.backend is not None:
        wanted = needed_by.backend  # encoder.element nvh264 or vaapih264: that backend only
    if wanted != "auto":
        problem = None
        if needed_by is not None and needed_by.probe is not None:
            problem = encoder_problem(settings.encoder.element)  # NVENC asked for, and absent
        problem = problem or backend_problem(wanted)
        if problem is not None:
            raise MissingPluginError(
                f"media backend {wanted} (media.backend {settings.media.backend}, "
                f"encoder.element {settings.encoder.element}) cannot run here: {problem}"
            )
        return BACKENDS[wanted]
    return _auto_backend()


@functools.cache
def _auto_backend() -> Backend:
    """What ``auto`` finds here: worked out (and said) once a process, as the probes are,
    not at every camera's pipeline start."""
    for name in _AUTO_ORDER:
        problem = backend_problem(name)
        if problem is None:
            log.info("media backend auto: %s", name)
            return BACKENDS[name]
        # Said out loud only when the backend is installed but does not work here (no
        # device, no driver, some of its elements): a machine without the plugins is the
        # common case.
        level = logging.DEBUG if problem.endswith(" not installed") else logging.INFO
        log.log(level, "media backend auto: not %s: %s", name, problem)
    return BACKENDS["cpu"]


def resolve_encoder(cfg: EncoderConfig, backend: Backend) -> Encoder:
    """The encoder config asks for on ``backend``. ``auto``: the backend's own, or x264
    where that one does not run here (a GPU without NVENC)."""
    name = backend.encoder if cfg.element == "auto" else cfg.element
    encoder = ENCODERS[name]
    if encoder.backend not in (None, backend.name):
        # Config validation refuses this; a hand-built Settings may still get here.
        raise MissingPluginError(
            f"encoder.element {name} needs media.backend {encoder.backend}, not {backend.name}"
        )
    if cfg.element == "auto" and encoder.probe is not None:
        problem = encoder_problem(name)
        if problem is not None:
            _say_fallback(backend.name, encoder.factory, problem)
            return ENCODERS["x264"]
    return encoder


@functools.cache
def _say_fallback(backend: BackendName, factory: str, problem: str) -> None:
    # Once a process, not at every (re)start of every camera's pipeline.
    log.info("encoder auto on media backend %s: not %s: %s; x264 encodes", backend, factory,
             problem)  # fmt: skip


def prefer_decoders(backend: Backend) -> None:
    """Have decodebin pick ``backend``'s hardware decoders over software ones (in this
    process's registry)."""
    for name in backend.decoders:
        factory = Gst.ElementFactory.find(name)
        if factory is not None and factory.get_rank() <= Gst.Rank.PRIMARY:
            factory.set_rank(Gst.Rank.PRIMARY + 10)
