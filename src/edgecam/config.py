"""One strict configuration tree, loaded once at start.

Sources, weakest first: built-in defaults, a YAML file (``--config`` or ``EDGECAM_CONFIG``),
``EDGECAM_SECTION__KEY`` environment variables (list items by index:
``EDGECAM_CAMERAS__0__SOURCE``), then command-line flags. Every model forbids unknown keys,
and an unknown ``EDGECAM_*__*`` variable is refused, so a misspelt key is an error that names
it. Error messages never hold a secret: whole-section inputs are not echoed, and every
password, token and URL credential found in the raw config is scrubbed from the text.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import re
import socket
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from edgecam.errors import ConfigError

__all__ = [
    "AlertsConfig",
    "CameraConfig",
    "EncoderConfig",
    "FileServerConfig",
    "LineConfig",
    "LiveViewConfig",
    "MediaConfig",
    "MqttConfig",
    "OverlayConfig",
    "PrivacyConfig",
    "RecorderConfig",
    "RuntimeConfig",
    "ServerConfig",
    "Settings",
    "StatsConfig",
    "StreamingConfig",
    "SupervisorConfig",
    "TrackerConfig",
    "UploadConfig",
    "VisionConfig",
    "VotingConfig",
    "along_frame_edge",
    "check_polygon",
    "load_settings",
    "redact_url",
    "zone_depth_limit",
]

MODELS_DIR = Path(__file__).parent / "models"
CONFIG_ENV = "EDGECAM_CONFIG"
# More cameras than this on one device is a mistake (or a YAML alias bomb), not a setup.
MAX_CAMERAS = 64


def _not_blank(value: Any) -> Any:
    if isinstance(value, str) and not value.strip():
        raise ValueError("must not be empty (an empty path would mean the current folder)")
    return value


_FilePath = Annotated[Path, BeforeValidator(_not_blank)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# Zones, lines and privacy masks are drawn in shares of the frame (0..1), so that they survive
# a change of resolution.
Point = tuple[Annotated[float, Field(ge=0, le=1)], Annotated[float, Field(ge=0, le=1)]]
# Bounds on what is checked at every config load (a polygon's check takes the square of its
# points: 2000 points took seconds) and tested on every frame: a polygon traced point by
# point from an image is to be simplified first.
MAX_POLYGON_POINTS = 100
MAX_REGIONS = 32  # zones, lines or privacy masks of one camera
Polygon = Annotated[list[Point], Field(max_length=MAX_POLYGON_POINTS)]
Anchor = Literal["bottom_centre", "centre", "top_centre"]
_REGION_NAME = r"^[A-Za-z0-9_-]{1,32}$"


def _ip_address_text(value: object) -> object:
    """An IP address or network ("10.0.0.0/8"), written as Python writes it (a clear error
    otherwise)."""
    if isinstance(value, str):
        text = value.strip()
        try:
            if "/" in text:
                return str(ipaddress.ip_network(text, strict=False))
            return str(ipaddress.ip_address(text))
        except ValueError as exc:
            raise ValueError(f"{value!r} is not an IP address or network") from exc
    return value


# A host name or address, or a shell pattern of them ("*.cams.lan", "10.0.0.*", "fd00::*").
_HOST_PATTERN = r"^[A-Za-z0-9.*?:-]{1,255}$"
_MIN_LINE_LENGTH = 1e-3


def _segments_cross(a: Point, b: Point, c: Point, d: Point) -> bool:
    """Whether segments ab and cd share a point (touching counts)."""

    def orient(p: Point, q: Point, r: Point) -> float:
        return (q[0] - p[0]) * (r[1] - p[1]) - (q[1] - p[1]) * (r[0] - p[0])

    def on(p: Point, q: Point, r: Point) -> bool:  # r on segment pq, given collinear
        return min(p[0], q[0]) <= r[0] <= max(p[0], q[0]) and min(p[1], q[1]) <= r[1] <= max(
            p[1], q[1]
        )

    o1, o2, o3, o4 = orient(a, b, c), orient(a, b, d), orient(c, d, a), orient(c, d, b)
    if ((o1 > 0) != (o2 > 0)) and ((o3 > 0) != (o4 > 0)) and o1 and o2 and o3 and o4:
        return True
    return (
        (o1 == 0 and on(a, b, c))
        or (o2 == 0 and on(a, b, d))
        or (o3 == 0 and on(c, d, a))
        or (o4 == 0 and on(c, d, b))
    )


def check_polygon(points: Polygon) -> None:
    """Raise ValueError unless ``points`` is a simple polygon (>= 3 points, some area, no
    edge crossing another)."""
    n = len(points)
    if n < 3:
        raise ValueError(f"a polygon needs at least 3 points, got {n}")
    edges = [(points[i], points[(i + 1) % n]) for i in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            if j == i + 1 or (i == 0 and j == n - 1):
                continue  # neighbours share a corner
            if _segments_cross(*edges[i], *edges[j]):
                raise ValueError(
                    f"the polygon crosses itself (edge {i}-{i + 1} meets edge {j}-{(j + 1) % n})"
                )
    area = sum(
        points[i][0] * points[(i + 1) % n][1] - points[(i + 1) % n][0] * points[i][1]
        for i in range(n)
    )
    if abs(area) / 2 < 1e-6:
        raise ValueError("the polygon has no area (its points are on one line)")


def along_frame_edge(p: Point, q: Point) -> bool:
    """Whether the side pq of a zone runs along the frame's edge (both ends on x = 0, x = 1,
    y = 0 or y = 1): no border, as nobody is seen beyond it."""
    return any(p[i] == q[i] and p[i] in (0, 1) for i in (0, 1))


def zone_depth_limit(points: Polygon) -> float:
    """How far inside its border (the sides not along the frame's edge) a point of the zone
    can lie, in shares of the frame height, on a frame of any shape (infinite where the
    frame's shape decides).

    The wider the frame, the farther apart points at different x are, and never nearer; so no
    frame lets a point be deeper than an endlessly wide one, where the only border near a
    point is straight above or below it: the depth is then half the zone's height at that x
    (its height where one of the two sides is the frame's edge). The height changes linearly
    between the x of two corners: its greatest is at one of them.
    """
    n = len(points)
    sides = [(points[i], points[(i + 1) % n]) for i in range(n)]
    border = [not along_frame_edge(p, q) for p, q in sides]

    def y_at(side: tuple[Point, Point], x: float) -> float:
        (x0, y0), (x1, y1) = side
        return y0 + (y1 - y0) * (x - x0) / (x1 - x0)

    deepest = 0.0
    xs = sorted({p[0] for p in points})
    for left, right in itertools.pairwise(xs):
        middle = (left + right) / 2
        over = sorted(
            (y_at(side, middle), k)
            for k, side in enumerate(sides)
            if min(side[0][0], side[1][0]) <= left and max(side[0][0], side[1][0]) >= right
        )
        # A simple polygon: going down at one x, its sides go in, out, in, out...
        for (_, top), (_, bottom) in zip(over[::2], over[1::2], strict=True):
            edges = border[top] + border[bottom]
            if edges == 0:
                return float("inf")
            for x in (left, right):
                height = y_at(sides[bottom], x) - y_at(sides[top], x)
                deepest = max(deepest, height / edges)
    return deepest


class LineConfig(_Section):
    """A counting line: tracks that cross it from one side to the other are counted."""

    start: Point = Field(description="One end [x, y], in shares of the frame (0..1).")
    end: Point = Field(description="The other end [x, y], in shares of the frame (0..1).")
    in_side: Literal["left", "right"] = Field(
        "left",
        description="The side that is 'in', as seen on screen walking from start to end; a "
        "crossing into it counts as in, out of it as out.",
    )
    anchor: Anchor = Field("bottom_centre", description="The point of a box that crosses.")
    band: float = Field(
        0.03,
        ge=0,
        le=0.5,
        description="Half-width of the band around the line, in shares of the frame height: a "
        "track counts once it has gone from beyond the band on one side to beyond it on the "
        "other, so one standing on the line is not counted again and again.",
    )

    @model_validator(mode="after")
    def _check_length(self) -> LineConfig:
        dx, dy = self.end[0] - self.start[0], self.end[1] - self.start[1]
        if (dx * dx + dy * dy) ** 0.5 < _MIN_LINE_LENGTH:
            raise ValueError("the line has zero length (start and end are the same point)")
        return self


class PrivacyConfig(_Section):
    faces: Literal["off", "blur", "pixelate", "fill"] = Field(
        "off", description="Hide faces in every output: off, blur, pixelate or fill."
    )
    masks: list[Polygon] = Field(
        default_factory=list,
        max_length=MAX_REGIONS,
        description="Polygons of [x, y] (0..1) painted opaque in every output.",
    )
    colour: tuple[int, int, int] = Field(
        (0, 0, 0), description="RGB of privacy masks and of filled faces."
    )
    margin: float = Field(
        0.25, ge=0, le=2, description="Face box enlargement on each side, as a share of its size."
    )
    hold_s: float = Field(
        1.0,
        ge=0,
        le=30,
        description="A face no longer detected or tracked stays hidden where it was this long.",
    )
    blocks: int = Field(
        6,
        ge=2,
        le=64,
        description="Pixelate: blocks across a face; blur: half as many samples. Fewer hide "
        "more: at 8 or 10 a face detector still found 3-5 of 150 pixelated faces.",
    )
    blind_after_s: float = Field(
        2.0,
        gt=0,
        le=60,
        description="With faces hidden: before the detector's first look, and when it has not "
        "looked for this long, the whole picture is hidden (privacy fails closed).",
    )

    @field_validator("masks")
    @classmethod
    def _check_masks(cls, masks: list[Polygon]) -> list[Polygon]:
        for i, polygon in enumerate(masks):
            try:
                check_polygon(polygon)
            except ValueError as exc:
                raise ValueError(f"mask {i}: {exc}") from None
        return masks

    @property
    def active(self) -> bool:
        return self.faces != "off" or bool(self.masks)


class CameraConfig(_Section):
    name: str = Field(
        "main",
        pattern=r"^[A-Za-z0-9_-]{1,32}$",
        description="Camera name, used in topics, clip names and the RTSP path.",
    )
    source: str = Field(
        "test://",
        description="A video file path, rtsp://..., v4l2:///dev/videoN or test:// (a pattern).",
    )
    enabled: bool = Field(
        True, description="Run this camera's workers (inference and recorder) in `edgecam run`."
    )
    loop: bool = Field(False, description="Play a file source again from the start at its end.")
    detect_fps: float | None = Field(
        None,
        ge=0,
        le=240,
        description="Detections a second for this camera (0 = off); default vision.detect_fps.",
    )
    width: int = Field(1280, ge=16, le=7680, description="Frame width for test:// and v4l2://.")
    height: int = Field(720, ge=16, le=4320, description="Frame height for test:// and v4l2://.")
    fps: int = Field(30, ge=1, le=240, description="Frame rate for test:// and v4l2://.")
    rtsp_latency_ms: int = Field(200, ge=0, le=10000, description="rtspsrc jitter buffer.")
    rtsp_transport: Literal["tcp", "udp"] = Field("tcp", description="RTSP transport.")
    reconnect_min_s: float = Field(1.0, gt=0, le=60, description="First reconnect delay.")
    reconnect_max_s: float = Field(
        2.0,
        gt=0,
        le=3600,
        description="Longest reconnect delay: a camera that comes back streams again within "
        "about this long (a probe of a camera that is away costs one refused connection).",
    )
    stall_timeout_s: float = Field(
        10.0, gt=0, le=600, description="No frame for this long from a live source: reconnect."
    )
    rtp_port: int | None = Field(
        None,
        ge=1024,
        le=65532,
        description="First of this camera's three loopback RTP ports (streaming, recorder, "
        "live view); default 5400 + 10 * camera index.",
    )
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)  # type: ignore[arg-type]
    zones: dict[Annotated[str, Field(pattern=_REGION_NAME)], Polygon] = Field(
        default_factory=dict,
        max_length=MAX_REGIONS,
        description="Named zones: polygons of [x, y] (0..1); occupancy, entries, exits, dwell.",
    )
    lines: dict[Annotated[str, Field(pattern=_REGION_NAME)], LineConfig] = Field(
        default_factory=dict,
        max_length=MAX_REGIONS,
        description="Named counting lines: in and out counts.",
    )
    zone_anchor: Anchor = Field(
        "bottom_centre", description="The point of a box that must be in a zone."
    )
    zone_band: float = Field(
        0.02,
        ge=0,
        le=0.5,
        description="A track enters a zone when this far inside it and leaves when this far "
        "outside (shares of the frame height), so jitter on the border counts nothing.",
    )

    @model_validator(mode="after")
    def _check_source(self) -> CameraConfig:
        if not self.source.strip():
            raise ValueError("source is empty: give a file, rtsp://..., v4l2://... or test://")
        scheme, sep, rest = self.source.partition("://")
        if sep and scheme in ("rtsp", "rtsps"):
            host = rest.partition("/")[0].rpartition("@")[2]
            if not host or host.startswith(":"):
                raise ValueError(f"source {redact_url(self.source)!r} names no host")
        return self

    @model_validator(mode="after")
    def _check_backoff(self) -> CameraConfig:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")
        return self

    @field_validator("zones")
    @classmethod
    def _check_zones(cls, zones: dict[str, Polygon]) -> dict[str, Polygon]:
        for name, polygon in zones.items():
            try:
                check_polygon(polygon)
            except ValueError as exc:
                raise ValueError(f"zone {name!r}: {exc}") from None
        return zones

    @model_validator(mode="after")
    def _check_zone_depth(self) -> CameraConfig:
        for name, polygon in self.zones.items():
            depth = zone_depth_limit(polygon)
            if depth <= self.zone_band:
                raise ValueError(
                    f"camera {self.name!r}: zone {name!r} can never hold anyone: a track enters "
                    f"a zone when zone_band ({self.zone_band:g} of the frame height) inside "
                    f"its edges, and no point of {name!r} is more than {depth:.3g} inside them "
                    "on any frame. Make the zone taller (more than twice zone_band between "
                    "its edges, or more than zone_band from a side along the frame's edge) "
                    "or lower zone_band"
                )
        return self


# Frames a call of the shared detector by default: on the CPU one (a batch of N costs N frames
# and holds more memory: docs/benchmarks.md, "Several cameras"), on a GPU a batch pays.
_CPU_BATCH = 1
_GPU_BATCH = 8
_VENDORED_FACE_MODELS = {"centerface": "centerface.onnx", "blazeface": "blazeface_full.onnx"}
# Model inputs past this many pixels a side are a typo, not a choice (and would exhaust memory).
_MAX_MODEL_INPUT = 4096
_MAX_TILES = 4


class VisionConfig(_Section):
    profile: Literal["mask", "people"] = Field(
        "mask", description="mask: faces + mask classifier; people: person detector."
    )
    detect_fps: float = Field(
        10.0,
        ge=0,
        le=240,
        description="Detections a second of video (0 = off). Offline exact; live an upper "
        "bound: the detector takes the newest frame whenever it is free.",
    )
    backend: Literal["onnxruntime", "torch"] = Field(
        "onnxruntime",
        description="Inference engine: onnxruntime (the default), or torch: the same ONNX "
        "models converted by onnx2torch and run by PyTorch, for NVIDIA GPUs without "
        "onnxruntime-gpu (pip install 'edgecam[gpu]').",
    )
    provider: Literal["cpu", "cuda"] = Field(
        "cpu",
        description="Where the models run: cpu, or cuda (an NVIDIA GPU, through ONNX Runtime's "
        "CUDA provider or PyTorch, by vision.backend).",
    )
    half: bool = Field(
        False, description="Run the models in fp16 (vision.backend torch, provider cuda only)."
    )
    threads: int = Field(
        2,
        ge=1,
        le=64,
        description="Inference engine's CPU threads (the mask classifier takes 1 while it runs "
        "one crop a call).",
    )
    offline_workers: int = Field(
        2,
        ge=1,
        le=16,
        description="Detectors running side by side in `edgecam process`, sharing `threads` "
        "(two one-thread detectors beat one two-thread detector next to decode and x264).",
    )
    batch_size: int | None = Field(
        None,
        ge=1,
        le=64,
        description="Most frames, from all cameras, that the shared detector takes in one "
        "call; default 1 on the CPU (a batch costs as much a frame there, and more memory), "
        "8 on a GPU.",
    )
    detector_workers: int | None = Field(
        None,
        ge=1,
        le=16,
        description="Calls the shared detector of the live cameras makes at once, sharing "
        "vision.threads (offline: vision.offline_workers). Unset: one per camera, at most "
        "vision.threads (two face-rich cameras held 10 detections/s each only so).",
    )
    batch_deadline_ms: float = Field(
        15.0,
        ge=0,
        le=1000,
        description="A batch of the shared detector runs this long after its first frame "
        "came, full or not (so a slow or lost camera never holds the others back).",
    )
    face_detector: Literal["centerface", "blazeface"] = Field(
        "centerface",
        description="Face detector family: centerface (any input size, the default), or "
        "blazeface (MediaPipe BlazeFace full range, a fixed 192x192 input, faster).",
    )
    face_model: _FilePath | None = Field(
        None,
        description="Face detector ONNX of the vision.face_detector family; default: the "
        "one vendored in edgecam/models.",
    )
    face_input: tuple[int, int] = Field(
        (640, 352),
        description="CenterFace input (width, height), multiples of 32 (BlazeFace: 192x192). "
        "480x256 costs less but finds fewer faces of 24-64 px (0.60 against 0.86 recall).",
    )
    face_model_precision: Literal["int8", "fp32"] = Field(
        "fp32",
        description="The vendored CenterFace model: fp32, or int8 (quantized, about 1.5x "
        "faster; calibrated for face_input 480x256: at 640x352 its boxes jitter enough to "
        "unsettle mask votes). BlazeFace, vision.face_model: as given.",
    )
    face_threshold: float = Field(0.5, gt=0, lt=1, description="Face score threshold.")
    face_threads: int = Field(
        1,
        ge=1,
        le=64,
        description="Most CPU threads a face detector call takes (at most vision.threads). "
        "On a 2-core VM a second thread made CenterFace at 640x352 1.2-1.8x faster for "
        "1.1-1.7x the CPU: one thread is never dearer, and a camera has the time for it.",
    )
    mask_model: _FilePath = Field(
        MODELS_DIR / "mask_classifier.onnx", description="Mask classifier ONNX (224x224 NHWC)."
    )
    mask_crop_margin: float = Field(
        0.3, ge=0, le=1, description="Face box enlargement before classification."
    )
    mask_batch: int = Field(
        1,
        ge=1,
        le=256,
        description="Face crops per classifier run. On a CPU one is as fast per crop as more "
        "and keeps ONNX Runtime's memory at one crop's (a GPU wants more).",
    )
    person_detector: Literal["nanodet", "centernet", "movenet", "ssdlite"] = Field(
        "nanodet",
        description="Person detector family: nanodet (NanoDet-g, vendored); centernet, "
        "movenet or ssdlite (built by scripts/candidate_models.sh, see docs/benchmarks.md).",
    )
    person_model: _FilePath | None = Field(
        None,
        description="Person detector ONNX of the vision.person_detector family; default: "
        "the vendored NanoDet-g, or the built candidate of that family.",
    )
    person_input: tuple[int, int] = Field(
        (416, 416),
        description="Person detector input (width, height), multiples of 32; with "
        "person_tiles, the size of one tile.",
    )
    person_tiles: tuple[int, int] = Field(
        (1, 1),
        description="(columns, rows) of overlapping person_input tiles the frame is cut into; "
        "(1, 1): the whole frame scaled into one input. (2, 1) with person_threshold 0.45: "
        "two 416 tiles of a 736x416 frame, the more accurate choice for small people, at "
        "about twice the detector time (a GPU, or a CPU faster than two cores).",
    )
    person_tile_overlap: int = Field(
        96, ge=0, le=1024, description="Pixels two neighbouring tiles share (detector input)."
    )
    person_tile_whole: bool = Field(
        False,
        description="With person_tiles, also run the whole frame scaled into one tile (finds "
        "people too large for one tile; one more detector run a frame).",
    )
    person_threshold: float = Field(
        0.45,
        gt=0,
        lt=1,
        description="Person score threshold (0.45: the lowest of the measured precision/"
        "recall curve that keeps precision >= 0.95; docs/benchmarks.md, issue 11).",
    )

    @model_validator(mode="after")
    def _check_half(self) -> VisionConfig:
        if self.half and (self.backend, self.provider) != ("torch", "cuda"):
            raise ValueError(
                "half: fp16 needs backend 'torch' and provider 'cuda', got backend "
                f"{self.backend!r} and provider {self.provider!r}"
            )
        return self

    @model_validator(mode="after")
    def _check_sizes(self) -> VisionConfig:
        for key in ("face_input", "person_input"):
            w, h = getattr(self, key)
            if (
                w % 32
                or h % 32
                or not 32 <= w <= _MAX_MODEL_INPUT
                or not 32 <= h <= _MAX_MODEL_INPUT
            ):
                raise ValueError(
                    f"{key} {getattr(self, key)} must be multiples of 32 from 32 to "
                    f"{_MAX_MODEL_INPUT}"
                )
        cols, rows = self.person_tiles
        if not (1 <= cols <= _MAX_TILES and 1 <= rows <= _MAX_TILES):
            raise ValueError(f"person_tiles {self.person_tiles} must be 1..{_MAX_TILES} each")
        if self.person_tiles != (1, 1) and (
            self.person_tile_overlap % 32 or self.person_tile_overlap >= min(self.person_input)
        ):
            raise ValueError(
                f"person_tile_overlap {self.person_tile_overlap} must be a multiple of 32 "
                f"smaller than person_input {self.person_input}"
            )
        return self

    @property
    def person_frame(self) -> tuple[int, int]:
        """(width, height) the frame is scaled to for the person detector (all tiles)."""
        (w, h), (cols, rows) = self.person_input, self.person_tiles
        ov = self.person_tile_overlap
        return (cols * w - (cols - 1) * ov, rows * h - (rows - 1) * ov)

    @property
    def face_model_path(self) -> Path:
        """The face model file: ``face_model``, or the vendored one of ``face_detector`` (and
        ``face_model_precision``)."""
        if self.face_model is not None:
            return self.face_model
        if self.face_detector == "centerface" and self.face_model_precision == "int8":
            return MODELS_DIR / "centerface_int8.onnx"
        return MODELS_DIR / _VENDORED_FACE_MODELS[self.face_detector]

    @property
    def max_batch(self) -> int:
        """``batch_size``, or its default for the provider."""
        if self.batch_size is not None:
            return self.batch_size
        return _CPU_BATCH if self.provider == "cpu" else _GPU_BATCH


class TrackerConfig(_Section):
    backend: Literal["norfair", "numpy"] = Field(
        "numpy",
        description="numpy: Norfair's tracker (same Kalman filter, hit counters and greedy "
        "IoU matching, same tracks) compiled, one C call a frame for all tracks (named after "
        "its first, numpy version); norfair: the Norfair library itself.",
    )
    distance_threshold: float = Field(
        0.8, gt=0, le=1, description="Max IoU distance (1 - IoU) to match a detection."
    )
    hit_counter_max: int = Field(
        15, ge=1, le=1000, description="Frames a track survives without detections."
    )
    initialization_delay: int = Field(
        2, ge=0, le=100, description="Detections before a track is shown at all."
    )
    min_age_frames: int = Field(
        5, ge=0, le=10000, description="Frames a track must live before it is counted."
    )


class VotingConfig(_Section):
    window: int = Field(15, ge=1, le=1000, description="Classifier votes kept per track.")
    min_votes: int = Field(3, ge=1, le=1000, description="Votes before a track leaves undecided.")
    mask_threshold: float = Field(
        0.5, gt=0, lt=1, description="P(mask) above which one vote says mask."
    )
    enter: float = Field(0.7, gt=0.5, le=1, description="Share of votes needed to take a label.")
    leave: float = Field(
        0.5, ge=0, lt=1, description="Share below which a track drops its label (hysteresis)."
    )
    settle_votes: int = Field(
        5,
        ge=0,
        le=1000,
        description="A labelled track whose last N votes all agree is settled: live, its faces "
        "skip the classifier and keep the label (0 = classify every face).",
    )
    recheck_frames: int = Field(
        30,
        ge=1,
        le=100_000,
        description="Frames without a vote after which a settled track is classified again "
        "(so its label can still change).",
    )

    @model_validator(mode="after")
    def _check_hysteresis(self) -> VotingConfig:
        if self.leave >= self.enter:
            raise ValueError("leave must be < enter")
        if self.min_votes > self.window:
            raise ValueError("min_votes must be <= window")
        if self.settle_votes > self.window:
            raise ValueError(
                f"settle_votes ({self.settle_votes}) must be <= window ({self.window})"
            )
        return self


_Channel = Annotated[int, Field(ge=0, le=255)]
_Colour = tuple[_Channel, _Channel, _Channel]


class OverlayConfig(_Section):
    enabled: bool = Field(True, description="Draw boxes and counts into the video.")
    element: Literal["direct", "overlaycomposition", "cairooverlay"] = Field(
        "direct",
        description="What draws: direct (boxes and cached labels written into the frame, "
        "the cheapest), overlaycomposition (blended ARGB layers) or cairooverlay (cairo on "
        "a BGRx copy of every frame).",
    )
    colours: dict[str, _Colour] = Field(
        default_factory=lambda: {
            "mask": (0, 200, 0),
            "no_mask": (230, 30, 30),
            "undecided": (240, 200, 0),
            "person": (0, 160, 255),
        },
        description="RGB colour per label.",
    )
    draw_ids: bool = Field(True, description="Draw track ids.")
    draw_labels: bool = Field(True, description="Draw track labels.")
    draw_counts: bool = Field(True, description="Draw live counts in the corner.")
    draw_zones: bool = Field(True, description="Draw the camera's zones.")
    draw_lines: bool = Field(True, description="Draw the camera's counting lines.")
    draw_zone_counts: bool = Field(
        True, description="Draw each zone's occupancy and each line's in/out counts."
    )
    line_width: int = Field(3, ge=1, le=20, description="Box line width in pixels.")
    font_size: int = Field(18, ge=6, le=96, description="Text size in pixels.")


class MediaConfig(_Section):
    backend: Literal["auto", "cpu", "nvidia", "nvdec", "vaapi"] = Field(
        "auto",
        description="Where video is decoded, converted, scaled and encoded: cpu, nvidia "
        "(NVDEC, CUDA, NVENC where the GPU has it, else x264), nvdec (NVDEC, then the CPU), "
        "vaapi; auto takes the first of nvidia, vaapi, nvdec that works here, else cpu.",
    )


class EncoderConfig(_Section):
    element: Literal["auto", "x264", "openh264", "nvh264", "vaapih264"] = Field(
        "auto",
        description="H.264 encoder; auto: the media backend's own (x264 on cpu). nvh264 needs "
        "media.backend nvidia and vaapih264 media.backend vaapi (or auto where it works).",
    )
    bitrate_kbps: int = Field(2500, ge=100, le=100000, description="Target bitrate.")
    keyframe_s: float = Field(1.0, gt=0, le=10, description="Seconds between keyframes.")
    preset: Literal[
        "ultrafast",
        "superfast",
        "veryfast",
        "faster",
        "fast",
        "medium",
        "slow",
        "slower",
        "veryslow",
    ] = Field("ultrafast", description="x264 speed preset.")


class StreamingConfig(_Section):
    enabled: bool = Field(True, description="Run the RTSP streaming worker.")
    host: str = Field(
        "127.0.0.1",
        min_length=1,
        description="RTSP listen address; 0.0.0.0 to serve the network (needs user/password).",
    )
    port: int = Field(8554, ge=1, le=65535, description="RTSP port.")
    user: str | None = Field(None, description="RTSP user (authentication when set).")
    password: SecretStr | None = Field(None, min_length=1, description="RTSP password.")
    allow_anonymous: bool = Field(
        False, description="Serve a non-loopback address without a password (not advised)."
    )
    basic_auth: bool = Field(
        False,
        description="Also accept Basic authentication, which sends the password in the clear "
        "(Digest is always offered); only for clients that know no Digest.",
    )
    session_timeout_s: int = Field(
        60,
        ge=2,
        le=3600,
        description="Drop a client's RTSP session after this long without a keep-alive.",
    )

    @model_validator(mode="after")
    def _check_auth(self) -> StreamingConfig:
        if (self.user is None) != (self.password is None):
            raise ValueError("user and password must be set together")
        loopback = self.host == "localhost" or self.host.startswith("127.") or self.host == "::1"
        if not loopback and self.user is None and not self.allow_anonymous:
            raise ValueError(
                f"serving RTSP on {self.host} needs user and password "
                "(or allow_anonymous: true to let anyone on the network watch)"
            )
        return self


class RecorderConfig(_Section):
    enabled: bool = Field(True, description="Run the recorder worker.")
    ring_dir: _FilePath = Field(
        Path("/dev/shm/edgecam"), description="RAM-backed folder of recent segments."
    )
    ring_seconds: float = Field(60, ge=4, le=3600, description="Recent video kept in RAM.")
    ring_max_bytes: int = Field(
        256 * 1024 * 1024, ge=1024 * 1024, description="Byte cap of the RAM ring."
    )
    segment_s: float = Field(2.0, ge=0.5, le=30, description="Target segment length.")
    clips_dir: _FilePath = Field(Path("clips"), description="Folder of saved clips.")
    pre_s: float = Field(10, ge=0, le=600, description="Seconds before the trigger.")
    post_s: float = Field(10, ge=0, le=600, description="Seconds after the trigger.")
    max_clip_s: float = Field(120, ge=1, le=3600, description="Longest clip.")
    max_clips_bytes: int = Field(
        2 * 1024**3, ge=1024 * 1024, description="Total size cap of saved clips."
    )
    max_clip_age_days: float = Field(30, gt=0, description="Clips older than this go.")
    min_free_bytes: int = Field(
        512 * 1024 * 1024, ge=0, description="Never write clips below this free space."
    )

    @model_validator(mode="after")
    def _check_ring(self) -> RecorderConfig:
        if self.ring_seconds < 2 * self.segment_s:
            raise ValueError(
                f"ring_seconds ({self.ring_seconds:g}) must hold at least two segments "
                f"(segment_s {self.segment_s:g})"
            )
        if self.pre_s > self.ring_seconds:
            raise ValueError(
                f"pre_s ({self.pre_s:g}) must be <= ring_seconds ({self.ring_seconds:g}): "
                "the video before a trigger comes from the ring"
            )
        return self


class FileServerConfig(_Section):
    enabled: bool = Field(True, description="Run the clip file server.")
    host: str = Field(
        "127.0.0.1",
        min_length=1,
        description="HTTP listen address (0.0.0.0 for every interface: say it, not '').",
    )
    port: int = Field(8081, ge=1, le=65535, description="HTTP port.")
    token: SecretStr | None = Field(
        None, min_length=1, description="Bearer token; the server refuses to start without one."
    )
    link_secret: SecretStr | None = Field(
        None,
        min_length=1,
        description="HMAC key for signed download links (defaults to the token).",
    )
    link_ttl_s: int = Field(3600, ge=10, le=7 * 86400, description="Signed link lifetime.")
    max_auth_failures: int = Field(
        20,
        ge=1,
        le=100000,
        description="Wrong tokens from one address within auth_lockout_s before that "
        "address is refused (429) until the window has passed.",
    )
    auth_lockout_s: float = Field(60, ge=1, le=86400, description="That window, in seconds.")
    allowed_hosts: list[Annotated[str, Field(pattern=_HOST_PATTERN)]] = Field(
        default_factory=list,
        description="Names besides local ones under which browsers reach this server (shell "
        "patterns matched label by label, e.g. 'cams.example.com', '*.cams.example.com'). IP "
        "addresses, local names (one label, .local, .lan, .home.arpa, .internal) and the "
        "hosts of the device's links (public_url or host, live.public_url) are always taken; "
        "a request naming any other host gets 400, "
        "which stops DNS rebinding (another site's page resolving its own name to this "
        "device). '*' takes every name.",
    )
    public_url: str | None = Field(
        None,
        pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$",
        description="Base URL under which others reach this server, for the links in alerts "
        "(default: http://HOST:PORT).",
    )

    def base_url(self) -> str:
        """The base URL of this server's links."""
        if self.public_url:
            return self.public_url.rstrip("/")
        host = socket.gethostname() if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"


class RuntimeConfig(_Section):
    dir: Path = Field(
        Path("/dev/shm/edgecam-run"),
        description="Private folder (0700) of the running device: worker locks, control "
        "sockets and the event channel.",
    )
    log_dir: Path | None = Field(
        None,
        description="Folder of one log file per worker; none: the workers log to the "
        "device's own output.",
    )
    log_max_bytes: int = Field(
        10 * 2**20,
        ge=64 * 2**10,
        le=2**40,
        description="Size at which a worker's log file in log_dir is moved to NAME.log.1 "
        "(replacing the one before) and started afresh: at most twice this a worker.",
    )


class SupervisorConfig(_Section):
    restart_min_s: float = Field(
        0.1, gt=0, le=60, description="First delay before restarting a dead worker."
    )
    restart_max_s: float = Field(
        30.0, gt=0, le=3600, description="Longest delay between restarts (doubling)."
    )
    stable_s: float = Field(
        30.0, gt=0, le=86400, description="A worker up this long starts its backoff afresh."
    )
    crash_loop_restarts: int = Field(
        5, ge=1, le=1000, description="Restarts within crash_loop_window_s that are a crash loop."
    )
    crash_loop_window_s: float = Field(
        60.0, gt=0, le=86400, description="Window in which restarts are counted."
    )
    heartbeat_timeout_s: float = Field(
        15.0, ge=2, le=3600, description="A ready worker silent (or unhealthy) this long is hung."
    )
    start_timeout_s: float = Field(
        60.0, ge=2, le=3600, description="A worker not ready this long after start is hung."
    )
    stop_timeout_s: float = Field(
        10.0, gt=0, le=600, description="Wait this long for a worker to stop before killing it."
    )
    max_worker_rss_mb: int | None = Field(
        4096,
        ge=64,
        le=2**20,
        description="A worker whose resident memory passes this many MiB is killed and "
        "restarted: a leak, or a client feeding it, must not take the machine. None: no bound.",
    )

    @model_validator(mode="after")
    def _check_backoff(self) -> SupervisorConfig:
        if self.restart_max_s < self.restart_min_s:
            raise ValueError("restart_max_s must be >= restart_min_s")
        return self


class StatsConfig(_Section):
    interval_s: float = Field(
        15.0, ge=1, le=3600, description="Seconds between statistics messages per camera."
    )


class NoMaskRule(_Section):
    enabled: bool = Field(True, description="Alert when too many people wear no mask.")
    threshold: float = Field(
        0.5, ge=0, le=1, description="Share of people without a mask above which it trips."
    )
    min_people: int = Field(
        3, ge=1, le=10000, description="People with a decided label needed in the window."
    )
    window_s: float = Field(30.0, ge=1, le=3600, description="Sliding window of tracks seen.")
    cooldown_s: float = Field(
        60.0, ge=0, le=86400, description="No new alert of this rule for this long after one."
    )


class OccupancyRule(_Section):
    enabled: bool = Field(True, description="Alert when too many people are seen at once.")
    max_people: int = Field(
        10, ge=0, le=10000, description="Trips when more counted people than this are on a frame."
    )
    hold_s: float = Field(
        1.0, ge=0, le=3600, description="The count must stay over max_people this long."
    )
    clear_s: float = Field(
        5.0, ge=0, le=3600, description="The alert ends after this long at or under the limit."
    )
    cooldown_s: float = Field(60.0, ge=0, le=86400, description="Quiet time after an alert.")


class CameraOfflineRule(_Section):
    enabled: bool = Field(True, description="Alert when a camera delivers no frames.")
    after_s: float = Field(
        20.0, ge=1, le=86400, description="No frame for this long: the camera is offline."
    )
    cooldown_s: float = Field(60.0, ge=0, le=86400, description="Quiet time after an alert.")


class WorkerDownRule(_Section):
    enabled: bool = Field(True, description="Alert when a worker is down or crash-looping.")
    after_s: float = Field(
        10.0, ge=0, le=86400, description="Down this long (or crash-looping): alert."
    )
    cooldown_s: float = Field(60.0, ge=0, le=86400, description="Quiet time after an alert.")


class ZoneOccupancyRule(_Section):
    enabled: bool = Field(True, description="Alert when a zone holds too many people.")
    max_people: int = Field(
        10, ge=0, le=10000, description="Trips when more tracks than this are in one zone."
    )
    zones: list[str] = Field(
        default_factory=list, description="Zones watched (of any camera); empty: every zone."
    )
    hold_s: float = Field(1.0, ge=0, le=3600, description="Over the limit this long to trip.")
    clear_s: float = Field(5.0, ge=0, le=3600, description="Ends after this long at or under.")
    cooldown_s: float = Field(60.0, ge=0, le=86400, description="Quiet time after an alert.")


class DwellRule(_Section):
    enabled: bool = Field(True, description="Alert when someone stays in a zone too long.")
    max_s: float = Field(
        300.0, gt=0, le=86400, description="Trips when a track has been in a zone this long."
    )
    zones: list[str] = Field(
        default_factory=list, description="Zones watched (of any camera); empty: every zone."
    )
    cooldown_s: float = Field(60.0, ge=0, le=86400, description="Quiet time after an alert.")


class LineCrossingRule(_Section):
    enabled: bool = Field(True, description="Alert on a crossing in a forbidden direction.")
    forbidden: dict[str, Literal["in", "out"]] = Field(
        default_factory=dict,
        description="Line name -> the direction that must not be crossed (in or out).",
    )
    clear_s: float = Field(
        5.0, ge=0, le=3600, description="The alert ends after this long without such a crossing."
    )
    cooldown_s: float = Field(60.0, ge=0, le=86400, description="Quiet time after an alert.")


class AlertsConfig(_Section):
    clip: bool = Field(True, description="Save a clip for every alert (extended while it lasts).")
    no_mask: NoMaskRule = Field(default_factory=NoMaskRule)  # type: ignore[arg-type]
    occupancy: OccupancyRule = Field(default_factory=OccupancyRule)  # type: ignore[arg-type]
    camera_offline: CameraOfflineRule = Field(
        default_factory=CameraOfflineRule  # type: ignore[arg-type]
    )
    worker_down: WorkerDownRule = Field(default_factory=WorkerDownRule)  # type: ignore[arg-type]
    zone_occupancy: ZoneOccupancyRule = Field(
        default_factory=ZoneOccupancyRule  # type: ignore[arg-type]
    )
    dwell: DwellRule = Field(default_factory=DwellRule)  # type: ignore[arg-type]
    line_crossing: LineCrossingRule = Field(
        default_factory=LineCrossingRule  # type: ignore[arg-type]
    )


def check_rule_regions(alerts: AlertsConfig, cameras: list[CameraConfig]) -> None:
    """Raise ValueError where a rule names a zone or line no camera has (a misspelt name
    would make the rule never fire, unsaid)."""
    zones = sorted({z for cam in cameras for z in cam.zones})
    lines = sorted({ln for cam in cameras for ln in cam.lines})
    named = [
        ("zone_occupancy.zones", alerts.zone_occupancy.zones, "zone", zones),
        ("dwell.zones", alerts.dwell.zones, "zone", zones),
        ("line_crossing.forbidden", list(alerts.line_crossing.forbidden), "line", lines),
    ]
    for key, names, kind, known in named:
        for name in names:
            if name not in known:
                raise ValueError(
                    f"alerts.{key}: {name!r} is no camera's {kind} "
                    f"(the cameras' {kind}s: {', '.join(known) or 'none'})"
                )


class MqttConfig(_Section):
    host: str | None = Field(None, description="Broker host name; None: no broker (MQTT off).")
    port: int = Field(1883, ge=1, le=65535, description="Broker port (8883 is usual with TLS).")
    username: str | None = Field(None, description="Broker user name.")
    password: SecretStr | None = Field(None, description="Broker password.")
    tls: bool = Field(False, description="Connect with TLS.")
    ca_file: Path | None = Field(
        None, description="CA certificate file for TLS; None: the system's CAs."
    )
    prefix: str = Field(
        "edgecam",
        pattern=r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$",
        description="Topic prefix: PREFIX/DEVICE/status|stats|alerts|clips|cmd|cmd/result.",
    )
    client_id: str | None = Field(
        None, max_length=128, description="MQTT client id; None: derived from the name."
    )
    keepalive_s: int = Field(30, ge=5, le=3600, description="MQTT keep-alive interval.")
    reconnect_min_s: float = Field(0.5, gt=0, le=60, description="First reconnect delay.")
    reconnect_max_s: float = Field(30.0, gt=0, le=3600, description="Longest reconnect delay.")
    outbox: Path = Field(
        Path("state/outbox.sqlite"),
        description="The device's SQLite file holding outgoing messages until the broker has them.",
    )
    outbox_max_messages: int = Field(
        100_000, ge=10, le=10_000_000, description="Oldest messages dropped beyond this."
    )
    outbox_max_bytes: int = Field(
        64 * 1024 * 1024, ge=64 * 1024, description="Oldest messages dropped beyond this size."
    )
    discovery: bool | None = Field(
        None, description="Home Assistant MQTT discovery (default: on when a broker is set)."
    )
    discovery_prefix: str = Field(
        "homeassistant", pattern=r"^[A-Za-z0-9_-]{1,64}$", description="Discovery prefix."
    )

    @model_validator(mode="after")
    def _check_auth(self) -> MqttConfig:
        if self.password is not None and self.username is None:
            raise ValueError("password needs username")
        return self


class UploadConfig(_Section):
    url: str | None = Field(
        None,
        pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$",
        description="Fleet server base URL to upload every clip to; none: clips stay here.",
    )
    token: SecretStr | None = Field(
        None, description="This device's upload token (edgecam server create-token --device)."
    )
    attempts: int = Field(
        5,
        ge=1,
        le=100,
        description="Tries for each clip in a row; after them it waits in the queue and is "
        "tried again later (after 30 s, doubling up to 15 min).",
    )
    queue: _FilePath = Field(
        Path("state/uploads"),
        description="Private folder (0700) of the clips still to upload, kept across "
        "restarts and server outages until the server has them.",
    )

    @model_validator(mode="after")
    def _check_token(self) -> UploadConfig:
        if self.url is not None and self.token is None:
            raise ValueError("an upload url needs a token")
        return self


class ServerConfig(_Section):
    host: str = Field("127.0.0.1", description="HTTP listen address of the fleet server.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the fleet server.")
    database_url: str = Field(
        "sqlite:///edgecam-server.db",
        description="SQLAlchemy URL: sqlite:///FILE (default) or postgresql+psycopg://...",
    )
    clips_dir: Path = Field(Path("server-clips"), description="Folder of uploaded clips.")
    clips_max_age_days: float = Field(30, gt=0, description="Uploaded clips older than this go.")
    clips_max_bytes: int = Field(
        20 * 1024**3, ge=1024 * 1024, description="Total size cap of uploaded clips."
    )
    clip_max_bytes: int = Field(
        512 * 1024 * 1024, ge=1024, description="Largest clip a device may upload."
    )
    stats_retention_days: float = Field(
        30,
        gt=0,
        description="Raw stats messages, status messages and commands with their results "
        "older than this are deleted.",
    )
    history_retention_days: float = Field(
        400, gt=0, description="Hourly downsampled stats and alerts older than this are deleted."
    )
    retention_interval_s: float = Field(
        600, ge=1, le=86400, description="How often retention and downsampling run."
    )
    ingest: bool = Field(True, description="Run MQTT ingest in this server (needs mqtt.host).")
    ingest_processes: int = Field(
        1, ge=1, le=64, description="Ingest processes sharing the subscription ($share)."
    )
    ingest_group: str = Field(
        "edgecam-ingest",
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="MQTT 5 shared subscription group of the ingest processes.",
    )
    batch_size: int = Field(500, ge=1, le=100000, description="Most messages in one write.")
    batch_interval_s: float = Field(
        0.2, gt=0, le=10, description="Longest wait before a partial batch is written."
    )
    session_hours: float = Field(12, gt=0, le=24 * 90, description="Login session lifetime.")
    secure_cookies: bool | None = Field(
        None,
        description="Mark cookies Secure (sent over HTTPS only); None: when the request came "
        "over HTTPS. Set true behind a TLS proxy that forwards plain HTTP.",
    )
    allowed_hosts: list[Annotated[str, Field(pattern=_HOST_PATTERN)]] = Field(
        default_factory=list,
        description="Names besides local ones under which browsers and devices reach the server "
        "(shell patterns matched label by label, e.g. 'fleet.example.com'). IP addresses, "
        "local names (one label, .local, .lan, .home.arpa, .internal) and this machine's "
        "name are always taken; a request naming any other host gets 400, which stops DNS "
        "rebinding (another site's page resolving its own name to this server, to guess "
        "passwords from inside the network). '*' takes every name.",
    )
    trusted_proxies: list[Annotated[str, BeforeValidator(_ip_address_text)]] = Field(
        default_factory=list,
        description="IP addresses (or networks) of reverse proxies in front of the server, whose "
        "X-Forwarded-For and X-Forwarded-Proto are believed: the login limits then count the "
        "real clients, not the proxy. Empty: those headers are ignored.",
    )
    login_max_failures: int = Field(
        5,
        ge=1,
        le=1000,
        description="Failed logins of one user name from one address before that name is "
        "locked out there; an address is locked out after four times as many, and a name, "
        "for browsers it never logged in from, after ten times as many from anywhere.",
    )
    login_lockout_s: float = Field(300, ge=1, le=86400, description="Lockout length.")
    device_offline_s: float = Field(
        120, ge=5, description="No message for this long: shown offline even without a will."
    )
    link_secret: SecretStr | None = Field(
        None, description="HMAC key of signed links to device clips (the devices' link_secret)."
    )
    link_ttl_s: int = Field(3600, ge=10, le=7 * 86400, description="Signed link lifetime.")
    device_clips_url: str | None = Field(
        None,
        description="Device file server URL template, e.g. http://{device}.lan:8081; "
        "None: only uploaded clips play.",
    )
    device_link_hosts: list[Annotated[str, Field(pattern=_HOST_PATTERN)]] = Field(
        default_factory=list,
        description="Hosts the clip links that devices announce may point to (shell patterns "
        "matched label by label, e.g. 'cams.example.com', '*.cams.example.com', '10.0.0.*'); "
        "empty: private addresses and local names (one label, .local, .lan, .home.arpa, "
        ".internal). Either way a link is followed only to that clip's own /clips/ path, "
        "signed.",
    )


class LiveViewConfig(_Section):
    enabled: bool = Field(True, description="Serve the live view pages (/live) on the HTTP server.")
    webrtc: bool = Field(
        True, description="Offer WebRTC (lowest latency); off: every page uses the fallback."
    )
    stun_server: str | None = Field(
        None,
        pattern=r"^stuns?://[A-Za-z0-9.:\[\]-]+$",
        description="STUN server for WebRTC beyond the local network (none: host candidates).",
    )
    max_viewers: int = Field(
        8, ge=1, le=256, description="Viewers of one camera at once, WebRTC and fallback together."
    )
    max_viewers_per_client: int = Field(
        4,
        ge=1,
        le=256,
        description="Viewers of one camera from one client address at once, so that one "
        "holder of a link cannot take every place of max_viewers.",
    )
    viewer_timeout_s: float = Field(
        15, ge=1, le=600, description="Drop a viewer that sent no keep-alive for this long."
    )
    # At least 10: longer than the page's own WebRTC attempt (8 s), so that a page whose
    # WebRTC cannot connect falls back to MSE before the device drops it.
    connect_timeout_s: float = Field(
        30,
        ge=10,
        le=600,
        description="Drop a WebRTC viewer not connected this long after the offer, or that "
        "has sent nothing over its connection for this long since.",
    )
    link_ttl_s: int = Field(
        3600, ge=10, le=7 * 86400, description="Lifetime of a signed live-page link."
    )
    session_ttl_s: int = Field(
        12 * 3600,
        ge=60,
        le=7 * 86400,
        description="Lifetime of the login cookie a signed link or token leaves in the browser.",
    )
    public_url: str | None = Field(
        None,
        pattern=r"^https?://[^/?#]+$",
        description="Base URL (scheme://host:port) that `edgecam live-url` prints; default the "
        "file server's address.",
    )


def _default_cameras() -> list[CameraConfig]:
    return [CameraConfig()]


class Settings(BaseSettings):
    """The whole configuration of one edgecam device."""

    model_config = SettingsConfigDict(
        env_prefix="EDGECAM_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_assignment=True,
    )

    device: str = Field(
        default_factory=lambda: _safe_hostname(),
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="Device name, used in MQTT topics and clip metadata.",
    )
    cameras: list[CameraConfig] = Field(
        default_factory=_default_cameras,
        min_length=1,
        max_length=MAX_CAMERAS,
        description="Video sources.",
    )
    vision: VisionConfig = Field(default_factory=VisionConfig)  # type: ignore[arg-type]
    tracker: TrackerConfig = Field(default_factory=TrackerConfig)  # type: ignore[arg-type]
    voting: VotingConfig = Field(default_factory=VotingConfig)  # type: ignore[arg-type]
    overlay: OverlayConfig = Field(default_factory=OverlayConfig)  # type: ignore[arg-type]
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)  # type: ignore[arg-type]
    media: MediaConfig = Field(default_factory=MediaConfig)  # type: ignore[arg-type]
    streaming: StreamingConfig = Field(default_factory=StreamingConfig)  # type: ignore[arg-type]
    recorder: RecorderConfig = Field(default_factory=RecorderConfig)  # type: ignore[arg-type]
    fileserver: FileServerConfig = Field(default_factory=FileServerConfig)  # type: ignore[arg-type]
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)  # type: ignore[arg-type]
    supervisor: SupervisorConfig = Field(default_factory=SupervisorConfig)  # type: ignore[arg-type]
    stats: StatsConfig = Field(default_factory=StatsConfig)  # type: ignore[arg-type]
    alerts: AlertsConfig = Field(default_factory=AlertsConfig)  # type: ignore[arg-type]
    mqtt: MqttConfig = Field(default_factory=MqttConfig)  # type: ignore[arg-type]
    server: ServerConfig = Field(default_factory=ServerConfig)  # type: ignore[arg-type]
    upload: UploadConfig = Field(default_factory=UploadConfig)  # type: ignore[arg-type]
    live: LiveViewConfig = Field(default_factory=LiveViewConfig)  # type: ignore[arg-type]

    @model_validator(mode="after")
    def _unique_cameras(self) -> Settings:
        names = [c.name for c in self.cameras]
        if len(set(names)) != len(names):
            raise ValueError(f"camera names must be unique, got {names}")
        ports = [self.rtp_ports(i) for i in range(len(self.cameras))]
        flat = [p for pair in ports for p in pair]
        if len(set(flat)) != len(flat):
            raise ValueError("cameras' RTP ports overlap; set distinct rtp_port values")
        return self

    @model_validator(mode="after")
    def _privacy_needs_pixels(self) -> Settings:
        for i, cam in enumerate(self.cameras):
            if self.detect_fps(i) == 0 and cam.privacy.faces != "off":
                raise ValueError(
                    f"camera {cam.name}: privacy.faces needs the detector "
                    "(vision.detect_fps or cameras[].detect_fps > 0)"
                )
        if self.overlay.element == "cairooverlay":
            for cam in self.cameras:
                if cam.privacy.faces in ("blur", "pixelate"):
                    raise ValueError(
                        f"camera {cam.name}: privacy.faces {cam.privacy.faces} needs "
                        "overlay.element direct or overlaycomposition (or privacy.faces fill)"
                    )
        return self

    @model_validator(mode="after")
    def _rules_name_regions(self) -> Settings:
        check_rule_regions(self.alerts, self.cameras)
        return self

    @model_validator(mode="after")
    def _encoder_on_its_backend(self) -> Settings:
        needs = {"nvh264": "nvidia", "vaapih264": "vaapi"}.get(self.encoder.element)
        if needs is not None and self.media.backend not in ("auto", needs):
            raise ValueError(
                f"encoder.element {self.encoder.element} needs media.backend {needs} "
                f"(or auto), not {self.media.backend}"
            )
        return self

    def rtp_ports(self, index: int) -> tuple[int, int, int]:
        """Loopback UDP ports (streaming, recorder, live view) that camera ``index`` sends
        RTP to."""
        base = self.cameras[index].rtp_port or 5400 + 10 * index
        return base, base + 1, base + 2

    def detect_fps(self, index: int) -> float:
        """Detections a second for camera ``index``: its own, else ``vision.detect_fps``."""
        own = self.cameras[index].detect_fps
        return self.vision.detect_fps if own is None else own

    def for_camera(self, name: str) -> Settings:
        """These settings as camera ``name``'s pipeline reads them (``vision.detect_fps``
        is that camera's rate)."""
        index, _ = self.camera(name)
        vision = self.vision.model_copy(update={"detect_fps": self.detect_fps(index)})
        return self.model_copy(update={"vision": vision})

    def camera(self, name: str | None = None) -> tuple[int, CameraConfig]:
        """The camera called ``name`` (the first when None) and its index."""
        for i, cam in enumerate(self.cameras):
            if name is None or cam.name == name:
                return i, cam
        raise ConfigError(f"no camera named {name!r}; known: {[c.name for c in self.cameras]}")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # load_settings merges file, environment and command line in that order and passes
        # the result in; reading the environment here again would put it above the flags.
        return (init_settings,)


_SECRET_KEYS = frozenset({"password", "token", "link_secret"})
# URL query parameters whose values are credentials (``?token=...``, ``&api_key=...``).
_SECRET_QUERY = re.compile(r"(token|pass|pwd|secret|key|auth|sig|cred)", re.IGNORECASE)
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
# A config file holds a few hundred values; one that expands to more is an alias bomb.
_MAX_CONFIG_VALUES = 100_000
# Environment variables under the prefix that are not config keys.
# EDGECAM_* variables that are not config keys: the config file, and the pid of the
# orchestrator that started a worker (set by the supervisor for its children).
SUPERVISOR_ENV = "EDGECAM_SUPERVISOR_PID"
_NOT_CONFIG_ENV = frozenset({CONFIG_ENV, SUPERVISOR_ENV})
_ENV_PREFIX = "EDGECAM_"
# A secret shorter than this is not searched for in messages: it would mangle them.
_MIN_SCRUB_LEN = 4


def _redact_one(url: str) -> str:
    scheme, _, rest = url.partition("://")
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        authority = "***@" + authority.rpartition("@")[2]
    path, qmark, query = path.partition("?")
    if not qmark and "?" in authority:  # rtsp://host?token=... (no path)
        authority, qmark, query = authority.partition("?")
    if qmark:
        params = []
        for param in query.split("&"):
            name, eq, _value = param.partition("=")
            params.append(f"{name}=***" if eq and _SECRET_QUERY.search(name) else param)
        query = "&".join(params)
    return f"{scheme}://{authority}{slash}{path}{qmark}{query}"


# A secret query parameter in a path without a scheme (uvicorn logs a WebSocket's path and
# query: "WebSocket /live/main/ws?expires=...&sig=..."), its value to mask.
_PATH_SECRET = re.compile(
    r"(?<=[?&])([A-Za-z0-9_.-]*(?:token|pass|pwd|secret|key|auth|sig|cred)[A-Za-z0-9_.-]*)"
    r"=[^&\s'\"<>#]+",
    re.IGNORECASE,
)


def redact_url(text: str) -> str:
    """``text`` with every URL's user:password part and secret query values (``?token=``,
    also of a path without a scheme) replaced by ``***``. Safe on any text: only the URLs
    and query strings in it change."""
    return _PATH_SECRET.sub(r"\1=***", _URL.sub(lambda m: _redact_one(m.group(0)), text))


def _secrets_in(data: Any, seen: set[int] | None = None) -> set[str]:
    """Every secret value in raw config data: secret keys, URL passwords, URL tokens.

    Each container is visited once: YAML aliases can make a small file a huge tree.
    """
    seen = set() if seen is None else seen
    found: set[str] = set()
    if isinstance(data, dict | list | tuple):
        if id(data) in seen:
            return found
        seen.add(id(data))
    if isinstance(data, dict):
        for key, value in data.items():
            if key in _SECRET_KEYS and isinstance(value, str | int) and not isinstance(value, bool):
                found.add(str(value))
            else:
                found |= _secrets_in(value, seen)
    elif isinstance(data, list | tuple):
        for item in data:
            found |= _secrets_in(item, seen)
    elif isinstance(data, str):
        for match in _URL.finditer(data):
            url = match.group(0)
            authority = url.partition("://")[2].partition("/")[0]
            if "@" in authority:
                userinfo = authority.rpartition("@")[0]
                found.add(userinfo.partition(":")[2] or userinfo)
            for param in url.partition("?")[2].split("&"):
                name, eq, value = param.partition("=")
                if eq and _SECRET_QUERY.search(name):
                    found.add(value)
    return found


def _scrub(text: str, secrets: set[str]) -> str:
    text = redact_url(text)
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= _MIN_SCRUB_LEN:
            text = text.replace(secret, "***")
    return text


def _safe_hostname() -> str:
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())
    return name[:64] or "edgecam"


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {path} is not UTF-8 text (bad byte at offset {exc.start}); "
            "save it as UTF-8"
        ) from exc
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {_one_line(str(exc))}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    if _expanded_size(data, {}) > _MAX_CONFIG_VALUES:
        raise ConfigError(
            f"config file {path} expands to more than {_MAX_CONFIG_VALUES} values "
            "(YAML aliases repeating aliases?); write it out plainly"
        )
    # An empty section (``vision:`` with nothing under it) means its defaults.
    return {key: value for key, value in data.items() if value is not None}


def _expanded_size(node: Any, sizes: dict[int, int]) -> int:
    """Values in ``node`` with every alias expanded, counted without expanding any."""
    if not isinstance(node, dict | list):
        return 1
    if id(node) not in sizes:
        sizes[id(node)] = 0  # a self-referencing alias counts once
        children = node.values() if isinstance(node, dict) else node
        sizes[id(node)] = 1 + sum(_expanded_size(child, sizes) for child in children)
    return sizes[id(node)]


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _describe(exc: ValidationError, origin: str) -> str:
    problems = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(root)"
        value = err.get("input")
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            problems.append(f"{key}: unknown key (check its spelling)")
        elif str(err["loc"][-1] if err["loc"] else "") in _SECRET_KEYS:
            problems.append(f"{key}: {msg} (value not shown: it is a secret)")
        elif isinstance(value, dict | list | tuple) or value is None:
            # A check over a whole section or list: its input holds every key, secrets too.
            problems.append(f"{key}: {msg}")
        else:
            problems.append(f"{key}: {msg} (got {value!r})")
    return _one_line(f"invalid configuration ({origin}): " + "; ".join(problems))


def _is_complex(annotation: Any) -> bool:
    """Whether an environment value for a field of this type is JSON (lists, tuples, maps)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return True
    origin = typing.get_origin(annotation)
    if origin in (list, tuple, dict):
        return True
    if origin is typing.Annotated:  # a zone's polygon: a list with a bound
        return _is_complex(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return any(_is_complex(a) for a in typing.get_args(annotation) if a is not type(None))
    return False


def _env_value(name: str, raw: str, annotation: Any) -> Any:
    if not _is_complex(annotation):
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        # The value is not echoed: it may hold a camera password.
        raise ConfigError(
            f"{name} must be JSON (a list or mapping, e.g. "
            f'\'[{{"name": "door", "source": "rtsp://..."}}]\'): {exc.msg} at character '
            f"{exc.pos}"
        ) from exc


def _env_path(name: str) -> tuple[list[str | int], Any]:
    """``EDGECAM_VISION__DETECT_FPS`` -> (["vision", "detect_fps"], the field's type)."""
    parts = name[len(_ENV_PREFIX) :].lower().split("__")
    unknown = ConfigError(
        f"environment variable {name} names no config key (check its spelling; keys are "
        "EDGECAM_SECTION__KEY, e.g. EDGECAM_VISION__DETECT_FPS)"
    )
    fields: dict[str, Any] = Settings.model_fields
    path: list[str | int] = []
    annotation: Any = Settings
    i = 0
    while i < len(parts):
        part = parts[i]
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            fields = annotation.model_fields
            if part not in fields:
                raise unknown
            path.append(part)
            annotation = fields[part].annotation
        elif typing.get_origin(annotation) is list:  # cameras: EDGECAM_CAMERAS__0__SOURCE
            if not part.isdigit():
                raise ConfigError(f"environment variable {name}: {part!r} is not a list index")
            path.append(int(part))
            annotation = typing.get_args(annotation)[0]
        elif typing.get_origin(annotation) is dict:  # overlay colours: __COLOURS__MASK
            path.append(part)
            annotation = typing.get_args(annotation)[1]
        else:
            raise unknown
        i += 1
    if not path:
        raise unknown
    return path, annotation


def _set_path(data: dict[str, Any], path: list[str | int], value: Any, name: str) -> None:
    node: Any = data
    for depth, part in enumerate(path):
        last = depth == len(path) - 1
        if isinstance(part, int):
            if not isinstance(node, list):
                raise ConfigError(f"environment variable {name}: the config there is not a list")
            if part > len(node):
                raise ConfigError(
                    f"environment variable {name}: camera index {part} is past the end of "
                    f"the list ({len(node)} camera(s)); add cameras in order"
                )
            if part == len(node):
                node.append({})
            if last:
                node[part] = value
                return
            if not isinstance(node[part], dict):
                raise ConfigError(f"environment variable {name}: item {part} is not a mapping")
            node = node[part]
            continue
        if last:
            node[part] = value
            return
        child = node.get(part)
        if child is None:
            nxt = path[depth + 1]
            # No cameras in the file: index 0 is the default camera.
            child = node[part] = [{}] if isinstance(nxt, int) else {}
        if isinstance(path[depth + 1], int) != isinstance(child, list) or not isinstance(
            child, dict | list
        ):
            raise ConfigError(f"environment variable {name}: config key {part!r} has another shape")
        node = child


def _names_config(name: str) -> bool:
    """Whether ``name`` is meant as a config key: ``EDGECAM_SECTION__KEY`` or a top-level
    key (``EDGECAM_DEVICE``, ``EDGECAM_CAMERAS``). A name that looks like a key written with
    one underscore (``EDGECAM_VISION_DETECT_FPS``) is an error; other names are left alone."""
    rest = name[len(_ENV_PREFIX) :].lower()
    if "__" in rest or rest in Settings.model_fields:
        return True
    section = next((f for f in Settings.model_fields if rest.startswith(f + "_")), None)
    if section is not None:
        key = rest[len(section) + 1 :].upper()
        raise ConfigError(
            f"environment variable {name} names no config key; for the key {section}.{key.lower()}"
            f" write EDGECAM_{section.upper()}__{key} (two underscores)"
        )
    return False


def _apply_environment(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    """Put every ``EDGECAM_SECTION__KEY`` variable into ``data``; unknown names are errors.
    Whole values (``EDGECAM_CAMERAS='[...]'``) go first, single keys on top of them."""
    found = []
    for name, raw in environ.items():
        if not name.upper().startswith(_ENV_PREFIX) or name.upper() in _NOT_CONFIG_ENV:
            continue
        if not _names_config(name):
            continue  # another variable of ours (EDGECAM_SUPERVISOR_PID, a test's ...)
        path, annotation = _env_path(name)
        found.append((len(path), name, path, _env_value(name, raw, annotation)))
    for _depth, name, path, value in sorted(found, key=lambda f: (f[0], f[1])):
        _set_path(data, path, value, name)


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Load the configuration: defaults < ``path`` (or ``$EDGECAM_CONFIG``) < environment <
    ``overrides`` (command-line options, as dotted keys: ``vision.detect_fps=5``)."""
    if path is None and os.environ.get(CONFIG_ENV):
        path = os.environ[CONFIG_ENV]
    data: dict[str, Any] = _read_file(Path(path)) if path is not None else {}
    _apply_environment(data, os.environ)  # its errors never echo a value
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            child = node.get(part)
            if child is None:  # absent, or an empty section (``vision:`` with nothing under)
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"config key {part!r} must be a section (a mapping)")
            node = child
        node[leaf] = value
    origin = f"file {path} and EDGECAM_* environment" if path else "EDGECAM_* environment"
    secrets = _secrets_in(data)
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_scrub(_describe(exc, origin), secrets)) from None


def settings_to_yaml(settings: Settings) -> str:
    """The effective configuration as YAML, secrets (and passwords in camera URLs) masked."""
    data = settings.model_dump(mode="json")
    for cam in data["cameras"]:
        cam["source"] = redact_url(cam["source"])
    data["server"]["database_url"] = redact_url(data["server"]["database_url"])
    return yaml.safe_dump(data, sort_keys=False)
