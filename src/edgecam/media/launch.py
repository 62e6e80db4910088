"""The launch description of one camera's pipeline, built in one function from config.

source -> decode -> fit to the first frame's size -> tee -> (detector appsink | drawing ->
H.264 -> RTP and/or MP4). The media backend (:mod:`edgecam.media.backends`) gives the
decode, convert, scale and encode fragments; the element names the pipeline's code looks
up are defined once, in :class:`Names`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from edgecam.config import CameraConfig, Settings
from edgecam.errors import SourceError
from edgecam.media.backends import Backend, resolve_backend, resolve_encoder

__all__ = ["Layout", "Mode", "Names", "OverlayKind", "describe", "overlay_kind"]

Mode = Literal["offline", "live"]
# What runs Python once a video frame: a drawing element, or (nothing to draw) a handoff.
OverlayKind = Literal["direct", "overlaycomposition", "cairooverlay", "handoff"]


class Names:
    """Names of the elements the pipeline's code finds by name, for :func:`describe` and
    the code that drives the pipeline alike."""

    SRC: Final = "src"
    DECODER: Final = "dec"
    CONVERT: Final = "conv"  # the first element after the decoder: EOS and caps go in here
    FIT_CAPS: Final = "fit_caps"  # pinned to the first frame's size
    TEE: Final = "t"
    INFER_QUEUE: Final = "infer_q"
    INFER_SINK: Final = "infer_sink"
    VIDEO_QUEUE: Final = "video_q"
    OVERLAY: Final = "overlay"
    ENCODER: Final = "enc"
    ENCODED_TEE: Final = "et"
    RTP_SINK: Final = "rtp_sink"
    FILE_SINK: Final = "file_sink"


# The profile every browser decodes, in MSE and in WebRTC (x264 left alone picks High 4:4:4
# Predictive for I420 at ultrafast, which WebRTC peers may refuse): the encoder follows caps.
_H264_PROFILE_CAPS = "video/x-h264,profile=constrained-baseline"


@dataclass(frozen=True)
class _ModeParams:
    sync: str  # the sinks: live plays to the clock, offline as fast as it can
    infer_queue: str
    infer_sink: str
    # Offline the queue lets decoding run ahead while a frame waits for its detection; live,
    # frames come in real time and every queued raw frame is only latency and memory.
    video_queue: int


_MODES: dict[Mode, _ModeParams] = {
    "live": _ModeParams(
        sync="true",
        infer_queue="leaky=downstream max-size-buffers=1 max-size-bytes=0 max-size-time=0",
        infer_sink="sync=false async=false max-buffers=1 drop=true",
        video_queue=8,
    ),
    "offline": _ModeParams(
        sync="false",
        infer_queue="max-size-buffers=8 max-size-bytes=0 max-size-time=0",
        infer_sink="sync=false async=false max-buffers=4 drop=false",
        video_queue=30,
    ),
}

# The direct drawing element is made in Python and takes this placeholder's place once the
# description is parsed (an element of a Python class made by a factory is not floating,
# which GStreamer reports as a bug and leaks).
_DIRECT_PLACEHOLDER = f"identity name={Names.OVERLAY}"
_OVERLAYS: dict[OverlayKind, tuple[str, tuple[str, ...]]] = {
    "direct": (f"{_DIRECT_PLACEHOLDER} ! ", ()),
    "overlaycomposition": (f"overlaycomposition name={Names.OVERLAY} ! ", ("overlaycomposition",)),
    "cairooverlay": (
        f"videoconvert ! cairooverlay name={Names.OVERLAY} ! videoconvert ! "
        "video/x-raw,format=I420 ! ",
        ("cairooverlay",),
    ),
    "handoff": (f"identity name={Names.OVERLAY} signal-handoffs=true ! ", ()),
}


@dataclass(frozen=True)
class Layout:
    """What :func:`describe` built, for the pipeline to wire up."""

    description: str
    source_props: dict[str, object]
    is_live: bool
    elements: tuple[str, ...]
    backend: Backend
    overlay: OverlayKind | None  # None: no Python per video frame


def overlay_kind(settings: Settings, camera: CameraConfig, analytics: bool) -> OverlayKind | None:
    """Which element runs the per-frame Python (None when nothing needs it)."""
    if not analytics:
        return None
    # Privacy needs a drawing element even where nothing else is drawn.
    if not settings.overlay.enabled and not camera.privacy.active:
        return "handoff"
    return settings.overlay.element


def _source_description(cam: CameraConfig) -> tuple[str, dict[str, object], bool]:
    """(description, properties of the element named ``src``, is_live) for one camera.

    Sources with dynamic pads end in ``decodebin name=dec`` (or leave ``src`` unlinked):
    the pipeline links those pads itself, every time they appear, so that a source that is
    restarted after a reconnect is linked again.
    """
    uri = cam.source
    src, dec = Names.SRC, Names.DECODER
    if uri.startswith("rtsp://") or uri.startswith("rtsps://"):
        desc = (
            f"rtspsrc name={src} latency={cam.rtsp_latency_ms} protocols={cam.rtsp_transport} "
            f"decodebin name={dec}"
        )
        return desc, {"location": uri}, True
    if uri.startswith("v4l2://"):
        device = uri[len("v4l2://") :] or "/dev/video0"
        if not Path(device).exists():
            raise SourceError(f"camera {cam.name!r}: V4L2 device {device} does not exist")
        # Ask the camera for the configured mode, raw or MJPEG, whichever it offers.
        mode = f"width={cam.width},height={cam.height},framerate={cam.fps}/1"
        caps = f"video/x-raw,{mode};image/jpeg,{mode}"
        return (
            f'v4l2src name={src} ! capsfilter caps="{caps}" ! decodebin name={dec}',
            {"device": device},
            True,
        )
    if uri.startswith("test://"):
        desc = (
            f"videotestsrc name={src} is-live=true pattern=ball ! "
            f"video/x-raw,width={cam.width},height={cam.height},framerate={cam.fps}/1 !"
        )
        return desc, {}, True
    path = Path(uri[len("file://") :] if uri.startswith("file://") else uri)
    if not path.is_file():
        raise SourceError(f"camera {cam.name!r}: video file {path} does not exist")
    return f"filesrc name={src} ! decodebin name={dec}", {"location": str(path)}, False


def describe(
    settings: Settings,
    camera_index: int,
    mode: Mode,
    *,
    infer_size: tuple[int, int] | None,
    analytics: bool,
    out_file: Path | None,
    rtp_ports: tuple[int, ...] = (),
    backend: Backend | None = None,
) -> Layout:
    """The GStreamer description of one camera's pipeline, built from config (``backend``:
    this media backend instead of the one config picks)."""
    cam = settings.cameras[camera_index]
    backend = backend or resolve_backend(settings)
    encoder = resolve_encoder(settings.encoder, backend)
    params = _MODES[mode]
    src, src_props, is_live = _source_description(cam)
    elements = ["videoconvert", "videoscale", "capsfilter", "tee", "queue", "h264parse"]
    elements += backend.elements
    # ``fit`` holds every frame to the first frame's size (even, as the encoders need): the
    # pipeline pins its caps when the first caps arrive, so a source that changes size
    # mid-stream (joined files, a camera set to another resolution) is scaled to fit, and
    # the encoder, the muxer and the RTP clients never see a caps change.
    parts = [f"{src} {backend.fit} ! tee name={Names.TEE}"]

    if infer_size is not None:
        # Letterboxed (the picture keeps its shape for the model); the detections are
        # mapped back through the borders (see ``frames.from_model_frame``). A backend with
        # no scaling of its own hands the frames over as they are, for the detector's
        # thread to fit.
        scale = ""
        if backend.infer_scale:
            w, h = infer_size
            scale = (
                f"{backend.infer_scale.format(w=w, h=h)}"
                f"video/x-raw,format=RGB,width={w},height={h},pixel-aspect-ratio=1/1 ! "
            )
        parts.append(
            f"{Names.TEE}. ! queue name={Names.INFER_QUEUE} {params.infer_queue} ! {scale}"
            f"appsink name={Names.INFER_SINK} {params.infer_sink}"
        )
        elements.append("appsink")

    kind = overlay_kind(settings, cam, analytics)
    overlay, needs = _OVERLAYS[kind] if kind is not None else ("", ())
    elements += needs
    draws = kind in ("direct", "overlaycomposition", "cairooverlay")
    props = encoder.props.format(
        preset=settings.encoder.preset,
        kbps=settings.encoder.bitrate_kbps,
        bps=settings.encoder.bitrate_kbps * 1000,
    )
    elements.append(encoder.factory)
    parts.append(
        f"{Names.TEE}. ! queue name={Names.VIDEO_QUEUE} max-size-buffers={params.video_queue} "
        "max-size-bytes=0 max-size-time=0 ! "
        f"{backend.video_in(draws)}{overlay}{backend.encoder_in(encoder, draws)}"
        f"{encoder.factory} name={Names.ENCODER} {props} ! {_H264_PROFILE_CAPS} ! "
        f"h264parse config-interval=-1 ! tee name={Names.ENCODED_TEE}"
    )
    et = Names.ENCODED_TEE
    if rtp_ports:
        clients = ",".join(f"127.0.0.1:{p}" for p in rtp_ports)
        parts.append(
            f"{et}. ! queue ! rtph264pay config-interval=0 pt=96 ! "
            f"multiudpsink name={Names.RTP_SINK} clients={clients} sync={params.sync} "
            "async=false"
        )
        elements += ["rtph264pay", "multiudpsink"]
    if out_file is not None:
        parts.append(
            f"{et}. ! queue ! mp4mux faststart=true ! filesink name={Names.FILE_SINK} "
            f"sync={params.sync} async=false"
        )
        elements += ["mp4mux", "filesink"]
    if not rtp_ports and out_file is None:
        parts.append(f"{et}. ! queue ! fakesink sync={params.sync} async=false")
    return Layout(
        " ".join(parts), src_props, is_live, tuple(dict.fromkeys(elements)), backend, kind
    )
