"""The overlay renderers: what runs once a video frame to draw tracks, counts, zones and
privacy into the video.

Each renderer is driven by one element of the pipeline (named ``overlay``) and steps the
frame's analytics (:class:`~edgecam.media.detection.FrameAnalysis`) before it draws:

* :class:`DirectRenderer` (``overlay.element: direct``): a small in-place element made here
  hands each I420 frame to Python, which has all box outlines (opaque) and cached label
  images written straight into it by one call of the C drawing core (:mod:`edgecam.native`),
  and blends the few translucent images (counts, zones, masks) with numpy. The cheapest by
  far: ``overlaycomposition`` blends every row a layer covers across the frame's whole width.
  Its colours are converted with the frames' own matrix and range, from their caps.
* :class:`CompositionRenderer` (``overlaycomposition``): ARGB layers of each box, blended in
  C by ``overlaycomposition``.
* :class:`CairoRenderer` (``cairooverlay``): cairo draws on a BGRx copy of the frame.
* :class:`HandoffRenderer`: nothing to draw (overlay off): the analytics step only.
"""

from __future__ import annotations

import functools
import logging
import math
import string
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
import numpy.typing as npt

from edgecam import native
from edgecam.config import CameraConfig, Settings
from edgecam.media.detection import FrameAnalysis, VideoFormat
from edgecam.media.frames import I420Frame, MappedFrame, colour_matrix
from edgecam.media.gst import Gst, GstVideo
from edgecam.native import (
    BoxBatch,
    Glyph,
    Label,
    Translucent,
    compose_text,
    draw_boxes,
    label_image,
    text_images,
)
from edgecam.vision.analytics import FrameMeta
from edgecam.vision.colour import BT601, BT709, YuvMatrix
from edgecam.vision.drawing import (
    GLYPH_PAD,
    DrawBox,
    DrawList,
    DrawText,
    Rendered,
    build_draw_list,
    draw_on_context,
    paint_on_context,
    region_label_positions,
    render_box,
    render_glyph,
    render_masks,
    render_regions,
    render_text,
)
from edgecam.vision.privacy import face_patch, fill_patch

__all__ = [
    "CairoRenderer",
    "CompositionRenderer",
    "DirectRenderer",
    "HandoffRenderer",
    "LruCache",
    "Renderer",
    "make_renderer",
]

log = logging.getLogger(__name__)

_TEXT_CACHE = 64  # text images kept (counts change a few times a second)
_LABEL_CACHE = 256  # box label images kept (a label per track id and class)
_FAILURES_LOGGED = 300  # after the first, a drawing failure is logged once in so many frames
_NEW_LABELS_A_FRAME = 4  # label images made on one frame at most (~0.1 ms each)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LruCache(Generic[K, V]):
    """At most ``size`` values, the least recently used dropped first; ``hits`` and
    ``misses`` count lookups."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self._size = size
        self._items: OrderedDict[K, V] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def peek(self, key: K) -> V | None:
        """The value under ``key`` (a hit), or None (not counted: :meth:`get` may follow)."""
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
            self.hits += 1
        return value

    def get(self, key: K, make: Callable[[], V]) -> V:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
            self.hits += 1
            return value
        self.misses += 1
        value = self._items[key] = make()
        if len(self._items) > self._size:
            self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        """Drop every value (the counts stay)."""
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


class _Drawing:
    """What every drawing renderer shares: the frame step, and per frame size the static
    layers (privacy masks; zones and lines) and where the regions' counts go."""

    def __init__(self, settings: Settings, camera: CameraConfig, analysis: FrameAnalysis,
                 video: VideoFormat) -> None:  # fmt: skip
        self.settings = settings
        self.camera = camera
        self.analysis = analysis
        self.video = video
        self._static_size: tuple[int, int] | None = None
        self._static: tuple[list[Rendered], list[Rendered]] = ([], [])
        self._label_positions: dict[str, tuple[int, int]] = {}
        self._failures = 0

    def failed(self) -> bool:
        """Log a frame that could not be drawn (the first failure with its traceback, then a
        line every ``_FAILURES_LOGGED`` frames); whether the frame must then be hidden whole:
        a camera with privacy masks or hidden faces never shows a frame unmasked."""
        self._failures += 1
        if self._failures == 1:
            log.exception("drawing failed")
        elif self._failures % _FAILURES_LOGGED == 0:
            log.error("drawing has failed on %d frames", self._failures)
        privacy = self.camera.privacy
        return bool(privacy.masks) or privacy.faces != "off"

    def static_layers(self, size: tuple[int, int]) -> tuple[list[Rendered], list[Rendered]]:
        """(privacy masks, zones and lines) for this frame size, drawn once."""
        if size != self._static_size:
            cam = self.camera
            self._static = (
                render_masks(cam.privacy, size),
                render_regions(cam, self.settings.overlay, size),
            )
            self._label_positions = region_label_positions(cam, size)
            self._static_size = size
        return self._static

    def draw_list(self, meta: FrameMeta, size: tuple[int, int]) -> DrawList | None:
        self.static_layers(size)
        draws = build_draw_list(meta, self.settings.overlay, *size, self._label_positions)
        return draws if draws.boxes or draws.texts else None


# -- overlaycomposition ------------------------------------------------------------------------


@dataclass(frozen=True)
class _GiCalls:
    """The GObject-introspection calls made for every rectangle or frame, looked up once
    (each attribute access through introspection costs microseconds). Only after
    ``Gst.init``."""

    new_wrapped: Any
    add_video_meta: Any
    new_rectangle: Any
    new_composition: Any
    read_write: Gst.MapFlags


@functools.cache
def _gi() -> _GiCalls:
    return _GiCalls(
        Gst.Buffer.new_wrapped,
        GstVideo.buffer_add_video_meta,
        GstVideo.VideoOverlayRectangle.new_raw,
        GstVideo.VideoOverlayComposition.new,
        Gst.MapFlags.READ | Gst.MapFlags.WRITE,
    )


def _rectangle(
    pixels: bytes,
    x: int,
    y: int,
    width: int,
    height: int,
    image_width: int | None = None,
    image_height: int | None = None,
) -> Any:
    """An overlay rectangle of a premultiplied BGRA image placed at (x, y), scaled to
    ``width`` x ``height`` when the image's own size differs."""
    gi = _gi()
    buf = gi.new_wrapped(pixels)
    gi.add_video_meta(
        buf,
        GstVideo.VideoFrameFlags.NONE,
        GstVideo.VideoFormat.BGRA,
        image_width or width,
        image_height or height,
    )
    return gi.new_rectangle(
        buf, x, y, width, height, GstVideo.VideoOverlayFormatFlags.PREMULTIPLIED_ALPHA
    )


def _compose(composition: Any, rectangles: list[Any]) -> Any:
    """``composition`` (a new one when None) with ``rectangles`` added, in order."""
    for rect in rectangles:
        if composition is None:
            composition = _gi().new_composition(rect)
        else:
            composition.add_rectangle(rect)
    return composition


# overlaycomposition turns its RGB layers into the frame's YUV with BT.709 limited-range
# coefficients whatever the caps say (GStreamer 1.22, video-blend.c; measured: magenta came
# out (78, 213, 229) on BT.601, BT.709 and full-range frames alike). What it draws is left
# to it, off on SD and full-range video; a hidden face's pixels go to RGB by its matrix, so
# that they come back as they were.
_COMPOSITION_MATRIX = BT709


class CompositionRenderer(_Drawing):
    """Draws through ``overlaycomposition``: each box an ARGB layer, blended in C (in
    GStreamer's colours: see ``_COMPOSITION_MATRIX``)."""

    def __init__(self, settings: Settings, camera: CameraConfig, analysis: FrameAnalysis,
                 video: VideoFormat) -> None:  # fmt: skip
        super().__init__(settings, camera, analysis, video)
        self._static_rects_size: tuple[int, int] | None = None
        self._static_rects: tuple[list[Any], list[Any]] = ([], [])
        self._texts: LruCache[tuple[str, tuple[int, int, int], int, int], Any] = LruCache(
            _TEXT_CACHE
        )
        self._video_info: tuple[Any, Any] | None = None  # (caps, GstVideo.VideoInfo)

    def attach(self, element: Gst.Element) -> None:
        element.connect("draw", self._on_draw)

    def _static_rectangles(self, size: tuple[int, int]) -> tuple[list[Any], list[Any]]:
        if size != self._static_rects_size:
            masks, regions = self.static_layers(size)
            self._static_rects = (
                [_rectangle(*m) for m in masks],
                [_rectangle(*r) for r in regions],
            )
            self._static_rects_size = size
        return self._static_rects

    def _text_rectangle(self, text: DrawText) -> Any:
        def make() -> Any:
            pixels, _x, _y, w, h = render_text(text, self.settings.overlay)
            return _rectangle(pixels, text.x, text.y, w, h)

        return self._texts.get((text.text, text.colour, text.x, text.y), make)

    def _on_draw(self, _overlay: Gst.Element, sample: Gst.Sample) -> Any:
        try:
            return self._draw(sample)
        except Exception:  # a drawing bug must not stop the video, nor unmask it
            size = self.video.size
            if not self.failed() or size is None:
                return None
            fill = fill_patch(self.camera.privacy.colour).tobytes()
            return _compose(None, [_rectangle(fill, 0, 0, *size, 2, 2)])

    def _draw(self, sample: Gst.Sample) -> Any:
        buf = sample.get_buffer()
        meta = self.analysis.step(buf.pts, buf.duration)
        size = self.video.size
        if size is None:
            return None
        masks, regions = self._static_rectangles(size)
        composition = None
        # Blended in this order: faces hidden first (their boxes are drawn over them), the
        # drawings, then the privacy masks over everything (nothing drawn shows inside one).
        if meta.blind:
            fill = fill_patch(self.camera.privacy.colour).tobytes()
            composition = _compose(None, [_rectangle(fill, 0, 0, *size, 2, 2)])
        elif meta.hidden:
            composition = self._hide_faces(sample, meta, composition)
        rects = list(regions)
        draws = self.draw_list(meta, size)
        if draws is not None:
            cfg = self.settings.overlay
            rects += [_rectangle(*render_box(b, cfg, size[0])) for b in draws.boxes]
            rects += [self._text_rectangle(t) for t in draws.texts]
        return _compose(composition, [*rects, *masks])

    def _hide_faces(self, sample: Gst.Sample, meta: FrameMeta, composition: Any) -> Any:
        """Add to ``composition`` the images that hide this frame's face regions: made from
        those regions' pixels only (a few block means, or a fill), scaled up by the overlay."""
        privacy = self.camera.privacy
        caps = sample.get_caps()
        if self._video_info is None or self._video_info[0] != caps:
            self._video_info = (caps, GstVideo.VideoInfo.new_from_caps(caps))
        info = self._video_info[1]
        buf = sample.get_buffer()
        with MappedFrame(buf, info, Gst.MapFlags.READ) as frame:
            planes = (frame.y, frame.uv[0], frame.uv[1])
            for face in meta.hidden:
                image = face_patch(planes, face, privacy.faces, privacy.blocks, privacy.colour,
                                   _COMPOSITION_MATRIX)  # fmt: skip
                x1, y1, x2, y2 = face
                ih, iw = image.shape[:2]
                patch = _rectangle(image.tobytes(), x1, y1, x2 - x1, y2 - y1, iw, ih)
                composition = _compose(composition, [patch])
        return composition


# -- cairooverlay ----------------------------------------------------------------------------


class CairoRenderer(_Drawing):
    """Draws through ``cairooverlay`` on a BGRx copy of each frame. Its colours come out
    right: the videoconverts on either side convert by the caps on their side (measured;
    the frames leave tagged with GStreamer's default colorimetry for their height)."""

    def attach(self, element: Gst.Element) -> None:
        element.connect("draw", self._on_draw)

    def _on_draw(self, _overlay: Gst.Element, ctx: Any, pts: int, dur: int) -> None:
        try:
            self._draw(ctx, pts, dur)
        except Exception:  # a drawing bug must not stop the video, nor unmask it
            size = self.video.size
            if self.failed() and size is not None:
                paint_on_context(ctx, ((0, 0, *size),), self.camera.privacy.colour, [])

    def _draw(self, ctx: Any, pts: int, dur: int) -> None:
        meta = self.analysis.step(pts, dur)
        size = self.video.size
        if size is None:
            return
        masks, regions = self.static_layers(size)
        privacy = self.camera.privacy
        hidden = meta.hidden if privacy.faces == "fill" else ()
        if meta.blind:
            hidden = ((0, 0, *size),)
        paint_on_context(ctx, hidden, privacy.colour, regions)
        draws = self.draw_list(meta, size)
        if draws is not None:
            draw_on_context(ctx, draws, self.settings.overlay)
        paint_on_context(ctx, (), privacy.colour, masks)


class HandoffRenderer:
    """Nothing to draw: the analytics step of each frame, from ``identity``'s handoff."""

    def __init__(self, analysis: FrameAnalysis) -> None:
        self.analysis = analysis

    def attach(self, element: Gst.Element) -> None:
        element.connect("handoff", self._on_handoff)

    def _on_handoff(self, _identity: Gst.Element, buf: Gst.Buffer) -> None:
        self.analysis.step(buf.pts, buf.duration)


# -- direct: written into the I420 frame in place ----------------------------------------------

U8 = npt.NDArray[np.uint8]
F32 = npt.NDArray[np.float32]
_BAND_ALPHA = 0.6  # the dark band under a line of text, as ``render_text`` paints it


def _premultiplied_yuv(bgra: F32, matrix: YuvMatrix) -> tuple[F32, F32, F32, F32]:
    """Y, U, V of a premultiplied BGRA image (float, 0..255), each weighted by its alpha,
    and that alpha (0..1)."""
    b, g, r, a = bgra[..., 0], bgra[..., 1], bgra[..., 2], bgra[..., 3] / 255
    (yr, yg, yb), (ur, ug, ub), (vr, vg, vb) = matrix.rgb_to_yuv
    y_p = matrix.black * a + (yr * r + yg * g + yb * b) / 255
    u_p = 128 * a + (ur * r + ug * g + ub * b) / 255
    v_p = 128 * a + (vr * r + vg * g + vb * b) / 255
    if matrix.full_range:  # full-range chroma reaches 255.5: kept to 255 (as ``yuv``)
        top = 255 * a
        np.minimum(u_p, top, out=u_p)
        np.minimum(v_p, top, out=v_p)
    return y_p, u_p, v_p, a


class _Stamp:
    """A translucent image in I420 terms, put at an even (x, y): its luma and its chroma
    planes, each premultiplied (``add``: the colour weighted by alpha; ``keep``: what is left
    of the frame under it) and blended by the compiled core. Opaque ones (the box labels)
    are :class:`~edgecam.native.Label`."""

    __slots__ = ("chroma", "luma")

    def __init__(self, luma: Translucent, chroma: Translucent) -> None:
        self.luma = luma
        self.chroma = chroma

    @classmethod
    def from_bgra(cls, pixels: bytes, width: int, height: int, matrix: YuvMatrix, *,
                  dx: int = 0, dy: int = 0) -> _Stamp:  # fmt: skip
        """From a premultiplied BGRA image, in the frames' ``matrix``; ``dx``/``dy`` (0 or
        1): transparent columns and rows put before it, so that it starts on the chroma
        grid."""
        image = np.frombuffer(pixels, dtype=np.uint8).reshape(height, width, 4)
        h2, w2 = (height + dy + 1) // 2 * 2, (width + dx + 1) // 2 * 2
        full = np.zeros((h2, w2, 4), dtype=np.float32)
        full[dy : dy + height, dx : dx + width] = image
        y_p, u_p, v_p, a = _premultiplied_yuv(full, matrix)
        uv_p = np.stack([_half(u_p), _half(v_p)])
        return cls(Translucent(y_p, 1 - a), Translucent(uv_p, 1 - _half(a)))

    def put(self, frame: I420Frame, x: int, y: int) -> None:
        """Onto the frame with its top-left at (x, y), both even; clipped to the frame."""
        self.luma.put(frame.y, x, y)
        self.chroma.put(frame.uv, x // 2, y // 2)


def _half(x: F32) -> F32:
    """2x2 means (the chroma grid) of an even-sized array."""
    h, w = x.shape
    return np.asarray(x.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3)), np.float32)


@dataclass(frozen=True)
class _Sparse:
    """Many small translucent images (the zones' and lines' strokes) merged once into the
    pixels they touch: one gather, blend and scatter a plane on every frame, whatever the
    number of pieces."""

    rows: npt.NDArray[np.intp]
    cols: npt.NDArray[np.intp]
    y_p: F32
    y_k: F32
    c_rows: npt.NDArray[np.intp]
    c_cols: npt.NDArray[np.intp]
    uv_p: F32  # (2, n)
    c_k: F32

    @classmethod
    def merge(cls, images: list[Rendered], size: tuple[int, int], matrix: YuvMatrix
              ) -> _Sparse | None:  # fmt: skip
        if not images:
            return None
        w, h = size
        w2, h2 = (w + 1) // 2 * 2, (h + 1) // 2 * 2
        canvas = np.zeros((h2, w2, 4), dtype=np.float32)  # premultiplied BGRA, 0..255
        for pixels, x, y, iw, ih in images:  # "over", in order
            piece = np.frombuffer(pixels, np.uint8).reshape(ih, iw, 4).astype(np.float32)
            region = canvas[y : y + ih, x : x + iw]
            piece = piece[: region.shape[0], : region.shape[1]]
            region[...] = piece + region * (1 - piece[..., 3:] / 255)
        y_p, u_p, v_p, a = _premultiplied_yuv(canvas, matrix)
        rows, cols = np.nonzero(a[:h, :w] > 0)
        c_a = _half(a)
        uv = np.stack([_half(u_p), _half(v_p)])
        c_rows, c_cols = np.nonzero(c_a > 0)
        return cls(
            rows=rows,
            cols=cols,
            y_p=y_p[rows, cols],
            y_k=1 - a[rows, cols],
            c_rows=c_rows,
            c_cols=c_cols,
            uv_p=uv[:, c_rows, c_cols],
            c_k=1 - c_a[c_rows, c_cols],
        )

    def put(self, frame: I420Frame) -> None:
        luma = frame.y
        luma[self.rows, self.cols] = luma[self.rows, self.cols] * self.y_k + self.y_p + 0.5
        chroma = frame.uv
        idx = (slice(None), self.c_rows, self.c_cols)
        chroma[idx] = chroma[idx] * self.c_k + self.uv_p + 0.5


def _chroma(yuv: tuple[int, int, int]) -> U8:
    return np.array([[[yuv[1]]], [[yuv[2]]]], dtype=np.uint8)


def _fill(frame: I420Frame, rect: tuple[int, int, int, int], yuv: tuple[int, int, int]) -> None:
    """Fill ``rect`` (x1, y1, x2, y2 exclusive) with a colour, chroma covering it."""
    x1, y1, x2, y2 = rect
    frame.y[y1:y2, x1:x2] = yuv[0]
    frame.uv[:, y1 // 2 : (y2 + 1) // 2, x1 // 2 : (x2 + 1) // 2] = _chroma(yuv)


def _block_edges(n: int, blocks: int) -> npt.NDArray[np.intp]:
    return (np.arange(blocks + 1) * n) // blocks


def _block_means(region: U8, by: int, bx: int) -> tuple[F32, Any, Any]:
    """``by`` x ``bx`` block means of ``region``, and the blocks' row and column edges."""
    h, w = region.shape
    ys, xs = _block_edges(h, by), _block_edges(w, bx)
    sums = np.add.reduceat(np.add.reduceat(region.astype(np.uint32), ys[:-1], 0), xs[:-1], 1)
    counts = np.diff(ys)[:, None] * np.diff(xs)[None, :]
    return (sums / counts).astype(np.float32), ys, xs


def _linear(n: int, blocks: int) -> F32:
    """(n, blocks) weights that interpolate block centres linearly onto n pixels."""
    pos = np.clip((np.arange(n) + 0.5) * blocks / n - 0.5, 0, blocks - 1)
    lo = np.floor(pos).astype(np.intp)
    hi = np.minimum(lo + 1, blocks - 1)
    frac = (pos - lo).astype(np.float32)
    weights = np.zeros((n, blocks), dtype=np.float32)
    weights[np.arange(n), lo] += 1 - frac
    weights[np.arange(n), hi] += frac
    return weights


def _hide(plane: U8, rect: tuple[int, int, int, int], mode: str, blocks: int) -> None:
    """Pixelate (``blocks`` across) or blur (``blocks / 2`` means, smoothly upscaled) the
    rectangle of one plane, from that rectangle's pixels only."""
    x1, y1, x2, y2 = rect
    region = plane[y1:y2, x1:x2]
    h, w = region.shape
    if h < 1 or w < 1:
        return
    if mode == "blur":
        blocks = max(2, blocks // 2)
    bx = max(1, min(blocks, w))
    by = max(1, min(round(blocks * h / w), h))
    means, ys, xs = _block_means(region, by, bx)
    if mode == "pixelate":
        grid = np.repeat(np.repeat(means, np.diff(ys), axis=0), np.diff(xs), axis=1)
    else:
        grid = _linear(h, by) @ means @ _linear(w, bx).T
    region[...] = grid + 0.5


@functools.lru_cache(maxsize=4096)
def _glyph(char: str, size: int) -> Glyph:
    """One character's coverage mask and advance (shared by every renderer)."""
    pixels, w, h, stride, advance = render_glyph(char, size)
    return Glyph(np.frombuffer(pixels, np.uint8).reshape(h, stride)[:, :w], advance)


class _Glyphs:
    """Lines of text as coverage masks, put together from glyphs rendered once each: text
    never seen before costs a few array copies, not a cairo rendering. The printable ASCII
    glyphs are rendered when it is made (not on a streaming thread)."""

    def __init__(self, size: int) -> None:
        self.size = size
        # As ``render_text``: baseline at size + 3; made even (the chroma grid), or a line in
        # an odd font size could not be halved for the chroma planes.
        self.height = size + 10 + size % 2
        for char in string.printable.strip():
            _glyph(char, size)

    def coverage(self, text: str, pad: int) -> U8:
        """(height, width) coverage of ``text`` starting ``pad`` pixels in; the width (even)
        is the text's advance plus ``pad`` on both sides."""
        size = self.size
        placed = []
        pen = float(pad)
        for ch in text:
            glyph = _glyph(ch, size)
            placed.append((glyph, round(pen) - GLYPH_PAD))
            pen += glyph.advance
        width = math.ceil(sum(glyph.advance for glyph, _ in placed)) + 2 * pad
        return compose_text(placed, width + width % 2, self.height)


def _label_stamp(coverage: U8, colour: tuple[int, int, int], matrix: YuvMatrix) -> Label:
    """A box label: black text on the box colour, opaque."""
    return label_image(coverage, matrix.yuv(colour), matrix.black)


def _text_stamp(coverage: U8, colour: tuple[int, int, int], matrix: YuvMatrix) -> _Stamp:
    """A line of text in ``colour`` on a dark translucent band (as ``render_text``)."""
    return _Stamp(*text_images(coverage, matrix.yuv(colour), _BAND_ALPHA, matrix.black))


class DirectRenderer(_Drawing):
    """Writes the frame's drawings straight into it (see the module's docstring)."""

    def __init__(self, settings: Settings, camera: CameraConfig, analysis: FrameAnalysis,
                 video: VideoFormat) -> None:  # fmt: skip
        super().__init__(settings, camera, analysis, video)
        native.check()  # an install without the drawing core fails here, saying so
        cfg = settings.overlay
        self._lw = cfg.line_width
        self._glyphs = _Glyphs(cfg.font_size)
        label_h = cfg.font_size + 4
        self._label_h = label_h + label_h % 2
        self._colours: dict[tuple[int, int, int], tuple[int, int, int]] = {}
        self._labels: LruCache[tuple[str, tuple[int, int, int]], Label] = LruCache(_LABEL_CACHE)
        self._texts: LruCache[tuple[str, tuple[int, int, int]], _Stamp] = LruCache(_TEXT_CACHE)
        self._static_stamps_size: tuple[int, int] | None = None
        self._mask_stamps: list[tuple[_Stamp, int, int]] = []
        self._regions: _Sparse | None = None
        # Until the caps say otherwise (``set_info``): GStreamer's matrix for SD video.
        self._matrix = BT601
        self._privacy_yuv = BT601.yuv(camera.privacy.colour)
        self._info: Any = None

    def element(self) -> Gst.Element:
        """The in-place element that calls :meth:`draw` with each frame."""
        return _draw_element(self)

    def set_info(self, info: Any) -> None:
        """The frames' video info, from their caps: their size and layout, and the matrix
        and range every colour is converted with."""
        matrix = colour_matrix(info)
        if matrix != self._matrix:
            self._set_matrix(matrix)
        self._info = info

    def _set_matrix(self, matrix: YuvMatrix) -> None:
        """Convert colours with ``matrix`` from now on: everything converted with the one
        before (colours, labels, texts, masks, zones) is made again when next drawn."""
        self._matrix = matrix
        self._colours = {}
        self._labels.clear()
        self._texts.clear()
        self._static_stamps_size = None
        self._privacy_yuv = matrix.yuv(self.camera.privacy.colour)

    @property
    def label_cache(self) -> LruCache[tuple[str, tuple[int, int, int]], Label]:
        return self._labels

    def _colour(self, colour: tuple[int, int, int]) -> tuple[int, int, int]:
        yuv = self._colours.get(colour)
        if yuv is None:
            yuv = self._colours[colour] = self._matrix.yuv(colour)
        return yuv

    def _static_stamps(self, size: tuple[int, int]) -> None:
        if size == self._static_stamps_size:
            return
        masks, regions = self.static_layers(size)
        self._mask_stamps = [_stamp_at(r, self._matrix) for r in masks]
        self._regions = _Sparse.merge(regions, size, self._matrix)
        self._static_stamps_size = size

    def _new_label(self, box: DrawBox) -> Label:
        """The box's label image, made now (and cached)."""

        def make() -> Label:
            # Rows 3.. of the text's coverage: the baseline at font_size, as render_box.
            coverage = self._glyphs.coverage(box.text, 4)[3 : 3 + self._label_h]
            return _label_stamp(coverage, box.colour, self._matrix)

        return self._labels.get((box.text, box.colour), make)

    def _text(self, text: DrawText) -> _Stamp:
        return self._texts.get(
            (text.text, text.colour),
            lambda: _text_stamp(self._glyphs.coverage(text.text, 6), text.colour, self._matrix),
        )

    def draw(self, buf: Gst.Buffer) -> None:
        meta = self.analysis.step(buf.pts, buf.duration)
        size = self.video.size
        if size is None or self._info is None:
            return
        self._static_stamps(size)
        draws = self.draw_list(meta, size)
        privacy = self.camera.privacy
        if not (draws or meta.blind or meta.hidden or self._mask_stamps or self._regions):
            return  # nothing to draw: the frame is not even mapped (no copy is made)
        with MappedFrame(buf, self._info, _gi().read_write) as frame:
            # In this order: faces hidden first (their boxes are drawn over them), the
            # drawings, then the privacy masks over everything.
            if meta.blind:
                _fill(frame, (0, 0, *size), self._privacy_yuv)
            else:
                for face in meta.hidden:
                    if privacy.faces == "fill":
                        _fill(frame, face, self._privacy_yuv)
                        continue
                    x1, y1, x2, y2 = face
                    _hide(frame.y, face, privacy.faces, privacy.blocks)
                    chroma = (x1 // 2, y1 // 2, (x2 + 1) // 2, (y2 + 1) // 2)
                    _hide(frame.uv[0], chroma, privacy.faces, privacy.blocks)
                    _hide(frame.uv[1], chroma, privacy.faces, privacy.blocks)
            if self._regions is not None:
                self._regions.put(frame)
            if draws is not None:
                self._draw_list(frame, draws)
            for stamp, x, y in self._mask_stamps:
                stamp.put(frame, x, y)

    def hide(self, buf: Gst.Buffer) -> None:
        """Fill the whole frame with the privacy colour (a frame that could not be drawn)."""
        size = self.video.size
        if size is not None and self._info is not None:
            with MappedFrame(buf, self._info, _gi().read_write) as frame:
                _fill(frame, (0, 0, *size), self._privacy_yuv)

    def _draw_list(self, frame: I420Frame, draws: DrawList) -> None:
        label_h, labels, colours = self._label_h, self._labels, self._colours
        made = 0
        batch = BoxBatch()
        for box in draws.boxes:
            outline = (box.x1, box.y1, box.x2 + 1, box.y2 + 1)  # exclusive ends
            yuv = colours.get(box.colour) or self._colour(box.colour)
            label = labels.peek((box.text, box.colour)) if box.text else None
            if label is None and box.text and made < _NEW_LABELS_A_FRAME:
                # A burst of new labels (many tracks appearing or changing class at once)
                # is spread over a few frames: a label shows a frame or two late instead.
                label = self._new_label(box)
                made += 1
            if label is None:
                batch.add(outline, yuv)
            else:
                y = box.y1 - label_h if box.y1 >= label_h else box.y1
                batch.add(outline, yuv, label, box.x1 - box.x1 % 2, y - y % 2)
        # The outlines and labels in one compiled call, without the GIL.
        draw_boxes(frame.y, frame.uv, batch, self._lw)
        for text in draws.texts:
            self._text(text).put(frame, text.x - text.x % 2, text.y - text.y % 2)


def _stamp_at(rendered: Rendered, matrix: YuvMatrix) -> tuple[_Stamp, int, int]:
    pixels, x, y, w, h = rendered
    return _Stamp.from_bgra(pixels, w, h, matrix, dx=x % 2, dy=y % 2), x - x % 2, y - y % 2


# The element is defined on first use: it subclasses a GStreamer class, and GStreamer must be
# initialised (and GstBase loaded) before that.
_draw_element_class: type | None = None


def _draw_element(renderer: DirectRenderer) -> Gst.Element:
    global _draw_element_class
    if _draw_element_class is None:
        _draw_element_class = _define_draw_element()
    element: Gst.Element = _draw_element_class()
    element.renderer = renderer  # type: ignore[attr-defined]
    return element


def _define_draw_element() -> type:
    import gi

    gi.require_version("GstBase", "1.0")
    from gi.repository import GObject, GstBase

    caps = Gst.Caps.from_string("video/x-raw,format=I420")

    class EdgecamDraw(GstBase.BaseTransform):  # type: ignore[misc]
        """In place on I420 frames: hands each one, writable, to its renderer."""

        __gtype_name__ = "EdgecamDraw"
        __gstmetadata__ = (
            "edgecam drawing",
            "Filter/Effect/Video",
            "Draws edgecam's tracks, counts, zones and privacy into I420 frames",
            "edgecam",
        )
        __gsttemplates__ = (
            Gst.PadTemplate.new("sink", Gst.PadDirection.SINK, Gst.PadPresence.ALWAYS, caps),
            Gst.PadTemplate.new("src", Gst.PadDirection.SRC, Gst.PadPresence.ALWAYS, caps),
        )

        def __init__(self) -> None:
            super().__init__()
            self.renderer: DirectRenderer | None = None
            self.set_in_place(True)
            self.set_passthrough(False)

        def do_set_caps(self, incaps: Gst.Caps, _outcaps: Gst.Caps) -> bool:
            if self.renderer is not None:
                self.renderer.set_info(GstVideo.VideoInfo.new_from_caps(incaps))
            return True

        def do_transform_ip(self, buf: Gst.Buffer) -> Gst.FlowReturn:
            renderer = self.renderer
            if renderer is None:
                return Gst.FlowReturn.OK
            try:
                renderer.draw(buf)
            except Exception:  # a drawing bug must not stop the video, nor unmask it
                if renderer.failed():
                    try:
                        renderer.hide(buf)
                    except Exception:
                        log.exception("cannot hide a frame that failed to draw: dropped")
                        # GST_BASE_TRANSFORM_FLOW_DROPPED (a define introspection leaves out)
                        return Gst.FlowReturn.CUSTOM_SUCCESS
            return Gst.FlowReturn.OK

    GObject.type_register(EdgecamDraw)
    return EdgecamDraw


Renderer = DirectRenderer | CompositionRenderer | CairoRenderer | HandoffRenderer

_RENDERERS: dict[str, type[DirectRenderer | CompositionRenderer | CairoRenderer]] = {
    "direct": DirectRenderer,
    "overlaycomposition": CompositionRenderer,
    "cairooverlay": CairoRenderer,
}


def make_renderer(
    kind: str, settings: Settings, camera: CameraConfig, analysis: FrameAnalysis,
    video: VideoFormat,
) -> Renderer:  # fmt: skip
    """The renderer for overlay ``kind`` (see :func:`edgecam.media.launch.overlay_kind`)."""
    if kind == "handoff":
        return HandoffRenderer(analysis)
    return _RENDERERS[kind](settings, camera, analysis, video)
