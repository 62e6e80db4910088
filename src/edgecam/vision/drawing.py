"""Draw commands built from a frame's metadata, and the cairo code that renders them.

Python never touches the video frame: it renders small ARGB images of the boxes and labels,
and a GStreamer element (overlaycomposition or cairooverlay) blends them in C.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import NamedTuple

import cairo

from edgecam.config import CameraConfig, OverlayConfig, PrivacyConfig
from edgecam.vision.analytics import FrameMeta

__all__ = [
    "DrawBox",
    "DrawList",
    "DrawText",
    "Rendered",
    "build_draw_list",
    "draw_on_context",
    "paint_on_context",
    "region_label_positions",
    "render_box",
    "render_glyph",
    "render_masks",
    "render_regions",
]

RGB = tuple[int, int, int]
# A premultiplied ARGB image and where it goes: (pixels, x, y, width, height).
Rendered = tuple[bytes, int, int, int, int]
_ZONE_COLOUR: RGB = (255, 220, 0)
_LINE_COLOUR: RGB = (255, 60, 200)
_PIECE_PX = 48
_ARROW_PX = 28


# Named tuples, not frozen dataclasses: a frame makes one a track, and a frozen dataclass
# costs several times as much to make.
class DrawBox(NamedTuple):
    x1: int
    y1: int
    x2: int
    y2: int
    colour: RGB
    text: str


class DrawText(NamedTuple):
    x: int
    y: int
    text: str
    colour: RGB


@dataclass(frozen=True, slots=True)
class DrawList:
    boxes: tuple[DrawBox, ...]
    texts: tuple[DrawText, ...]


_FALLBACK: RGB = (255, 255, 255)


def build_draw_list(
    meta: FrameMeta,
    cfg: OverlayConfig,
    width: int,
    height: int,
    label_positions: dict[str, tuple[int, int]] | None = None,
) -> DrawList:
    """What to draw on this frame, clipped to a ``width`` x ``height`` picture;
    ``label_positions``: where each zone's and line's live counts go."""
    boxes = []
    if not cfg.enabled:
        return DrawList((), ())
    colours, ids, labels = cfg.colours, cfg.draw_ids, cfg.draw_labels
    right, bottom = width - 1, height - 1
    for t in meta.tracks:
        x1, y1, x2, y2 = t.box
        x1i, y1i = max(0, int(x1)), max(0, int(y1))
        x2i, y2i = min(right, int(x2)), min(bottom, int(y2))
        if x2i - x1i < 2 or y2i - y1i < 2:
            continue
        if ids and labels:
            text = f"{t.id} {t.label}"
        else:
            text = str(t.id) if ids else (t.label if labels else "")
        boxes.append(DrawBox(x1i, y1i, x2i, y2i, colours.get(t.label, _FALLBACK), text))
    texts = []
    if cfg.draw_counts and meta.counts:
        line = "  ".join(f"{label}: {n}" for label, n in meta.counts.items())
        texts.append(DrawText(8, 8, line, (255, 255, 255)))
    if cfg.draw_zone_counts and label_positions:
        for z in meta.zones:
            if z.name in label_positions:
                x, y = label_positions[z.name]
                texts.append(DrawText(x, y, f"{z.name}: {z.occupancy}", _ZONE_COLOUR))
        for ln in meta.lines:
            if ln.name in label_positions:
                x, y = label_positions[ln.name]
                text = f"{ln.name} in {ln.total_in} out {ln.total_out}"
                texts.append(DrawText(x, y, text, _LINE_COLOUR))
    return DrawList(tuple(boxes), tuple(texts))


def _pixels(points: list[tuple[float, float]], size: tuple[int, int]) -> list[tuple[float, float]]:
    w, h = size
    return [(x * w, y * h) for x, y in points]


def _line_normal(
    start: tuple[float, float], end: tuple[float, float], in_side: str
) -> tuple[float, float]:
    dx, dy = end[0] - start[0], end[1] - start[1]
    length = math.hypot(dx, dy)
    # Screen coordinates (y down): the left of a walk from start to end is (dy, -dx).
    nx, ny = dy / length, -dx / length
    return (nx, ny) if in_side == "left" else (-nx, -ny)


def region_label_positions(cam: CameraConfig, size: tuple[int, int]) -> dict[str, tuple[int, int]]:
    """Where each zone's (its top-left corner) and line's (its middle) counts are drawn."""
    w, h = size
    out = {}
    for name, polygon in cam.zones.items():
        pts = _pixels(polygon, size)
        x, y = min(p[0] for p in pts), min(p[1] for p in pts)
        out[name] = (int(min(max(x + 4, 0), w - 40)), int(min(max(y + 4, 0), h - 30)))
    for name, line in cam.lines.items():
        (x1, y1), (x2, y2) = _pixels([line.start, line.end], size)
        out[name] = (
            int(min(max((x1 + x2) / 2 + 8, 0), w - 40)),
            int(min(max((y1 + y2) / 2 + 8, 0), h - 30)),
        )
    return out


def _surface(
    x1: float, y1: float, x2: float, y2: float, pad: float, size: tuple[int, int]
) -> tuple[cairo.ImageSurface, cairo.Context, int, int]:
    """A transparent surface over the box (padded, clipped to the frame), drawn on in frame
    coordinates; and its place in the frame."""
    w, h = size
    x = max(0, math.floor(x1 - pad))
    y = max(0, math.floor(y1 - pad))
    right = min(w, math.ceil(x2 + pad))
    bottom = min(h, math.ceil(y2 + pad))
    surface = cairo.ImageSurface(cairo.FORMAT_ARGB32, max(1, right - x), max(1, bottom - y))
    ctx = cairo.Context(surface)
    ctx.translate(-x, -y)
    return surface, ctx, x, y


def _done(surface: cairo.ImageSurface, x: int, y: int) -> Rendered:
    surface.flush()
    return bytes(surface.get_data()), x, y, surface.get_width(), surface.get_height()


def _stroke(
    points: list[tuple[float, float]], colour: RGB, width: int, size: tuple[int, int]
) -> list[Rendered]:
    """A polyline as small images along it, each piece at most ``_PIECE_PX`` long: the
    overlay blends every image's whole area on every frame, so a long diagonal edge must not
    become one big, mostly transparent image."""
    out: list[Rendered] = []
    rgb = tuple(c / 255 for c in colour)
    for (x1, y1), (x2, y2) in itertools.pairwise(points):
        n = max(1, math.ceil(math.hypot(x2 - x1, y2 - y1) / _PIECE_PX))
        for k in range(n):
            ax, ay = x1 + (x2 - x1) * k / n, y1 + (y2 - y1) * k / n
            bx, by = x1 + (x2 - x1) * (k + 1) / n, y1 + (y2 - y1) * (k + 1) / n
            surface, ctx, x, y = _surface(
                min(ax, bx), min(ay, by), max(ax, bx), max(ay, by), width, size
            )
            ctx.set_source_rgb(*rgb)
            ctx.set_line_width(width)
            ctx.set_line_cap(cairo.LINE_CAP_ROUND)
            ctx.move_to(ax, ay)
            ctx.line_to(bx, by)
            ctx.stroke()
            out.append(_done(surface, x, y))
    return out


def render_regions(cam: CameraConfig, cfg: OverlayConfig, size: tuple[int, int]) -> list[Rendered]:
    """The camera's zones (outlines) and lines (with an arrow to the "in" side), as small
    images along their strokes: drawn once per frame size, blended on every frame."""
    out: list[Rendered] = []
    lw = cfg.line_width
    if cfg.enabled and cfg.draw_zones:
        for polygon in cam.zones.values():
            pts = _pixels(polygon, size)
            out += _stroke([*pts, pts[0]], _ZONE_COLOUR, lw, size)
    if cfg.enabled and cfg.draw_lines:
        for line in cam.lines.values():
            start, end = _pixels([line.start, line.end], size)
            nx, ny = _line_normal(line.start, line.end, line.in_side)
            mx, my = (start[0] + end[0]) / 2, (start[1] + end[1]) / 2
            tip = (mx + nx * _ARROW_PX, my + ny * _ARROW_PX)
            out += _stroke([start, end], _LINE_COLOUR, lw, size)
            out += _stroke([(mx, my), tip], _LINE_COLOUR, lw, size)
            for turn in (0.5, -0.5):  # the arrow head: two short strokes back from the tip
                ax = nx * math.cos(turn) - ny * math.sin(turn)
                ay = nx * math.sin(turn) + ny * math.cos(turn)
                out += _stroke([tip, (tip[0] - ax * 10, tip[1] - ay * 10)], _LINE_COLOUR, lw, size)
    return out


def render_masks(privacy: PrivacyConfig, size: tuple[int, int]) -> list[Rendered]:
    """The static privacy masks: each polygon filled opaque (no anti-aliasing, so every
    pixel inside is exactly the mask colour)."""
    out: list[Rendered] = []
    for polygon in privacy.masks:
        pts = _pixels(polygon, size)
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        surface, ctx, x, y = _surface(min(xs), min(ys), max(xs), max(ys), 1, size)
        ctx.set_antialias(cairo.ANTIALIAS_NONE)
        ctx.move_to(*pts[0])
        for p in pts[1:]:
            ctx.line_to(*p)
        ctx.close_path()
        ctx.set_source_rgb(*(c / 255 for c in privacy.colour))
        ctx.fill()
        out.append(_done(surface, x, y))
    return out


def _set_font(ctx: cairo.Context, size: int) -> None:
    ctx.select_font_face("DejaVu Sans", cairo.FONT_SLANT_NORMAL, cairo.FONT_WEIGHT_BOLD)
    ctx.set_font_size(size)


@functools.lru_cache(maxsize=512)
def _text_width(text: str, size: int) -> int:
    probe = cairo.Context(cairo.ImageSurface(cairo.FORMAT_ARGB32, 1, 1))
    _set_font(probe, size)
    return math.ceil(probe.text_extents(text).x_advance)


def render_box(
    box: DrawBox, cfg: OverlayConfig, frame_width: int
) -> tuple[bytes, int, int, int, int]:
    """Render one box and its label as a premultiplied ARGB image.

    Returns (pixels, x, y, width, height): where the image goes in the frame. The label sits
    above the box (inside it when the box touches the top edge).
    """
    lw = cfg.line_width
    text_h = cfg.font_size + 4 if box.text else 0
    text_w = _text_width(box.text, cfg.font_size) + 8 if box.text else 0
    label_above = box.y1 >= text_h
    x = box.x1
    y = box.y1 - text_h if label_above else box.y1
    box_w = box.x2 - box.x1 + 1
    w = max(box_w, min(text_w, frame_width - box.x1))
    h = box.y2 - y + 1
    surface = cairo.ImageSurface(cairo.FORMAT_ARGB32, w, h)
    ctx = cairo.Context(surface)
    r, g, b = (c / 255.0 for c in box.colour)
    ctx.set_source_rgb(r, g, b)
    ctx.set_line_width(lw)
    top = box.y1 - y
    ctx.rectangle(lw / 2, top + lw / 2, box_w - lw, box.y2 - box.y1 + 1 - lw)
    ctx.stroke()
    if box.text:
        _set_font(ctx, cfg.font_size)
        ty = 0 if label_above else top
        ctx.rectangle(0, ty, text_w, text_h)
        ctx.fill()
        ctx.set_source_rgb(0, 0, 0)
        ctx.move_to(4, ty + cfg.font_size)
        ctx.show_text(box.text)
    surface.flush()
    return bytes(surface.get_data()), x, y, w, h


GLYPH_PAD = 2  # pixels left of a glyph's origin in its image


def render_glyph(char: str, size: int) -> tuple[bytes, int, int, int, float]:
    """One character's coverage (8-bit alpha) in the overlay's font, placed as
    ``render_text`` places text: origin ``GLYPH_PAD`` pixels in, baseline ``size + 3`` down
    an image ``size + 10`` high. Returns (pixels, width, height, stride, advance)."""
    w, h = math.ceil(_text_width(char, size)) + 2 * GLYPH_PAD + 2, size + 10
    surface = cairo.ImageSurface(cairo.FORMAT_A8, w, h)
    ctx = cairo.Context(surface)
    _set_font(ctx, size)
    ctx.move_to(GLYPH_PAD, size + 3)
    ctx.show_text(char)
    advance = ctx.text_extents(char).x_advance
    surface.flush()
    return bytes(surface.get_data()), w, h, surface.get_stride(), advance


def render_text(text: DrawText, cfg: OverlayConfig) -> tuple[bytes, int, int, int, int]:
    """Render a text line on a dark translucent band, as premultiplied ARGB."""
    w, h = _text_width(text.text, cfg.font_size) + 12, cfg.font_size + 10
    surface = cairo.ImageSurface(cairo.FORMAT_ARGB32, w, h)
    ctx = cairo.Context(surface)
    ctx.set_source_rgba(0, 0, 0, 0.6)
    ctx.paint()
    _set_font(ctx, cfg.font_size)
    ctx.set_source_rgb(*(c / 255.0 for c in text.colour))
    ctx.move_to(6, cfg.font_size + 3)
    ctx.show_text(text.text)
    surface.flush()
    return bytes(surface.get_data()), text.x, text.y, w, h


def draw_on_context(ctx: cairo.Context, draws: DrawList, cfg: OverlayConfig) -> None:
    """Draw everything straight onto a frame's cairo context (the cairooverlay backend)."""
    ctx.set_line_width(cfg.line_width)
    _set_font(ctx, cfg.font_size)  # type: ignore[arg-type]
    for box in draws.boxes:
        ctx.set_source_rgb(*(c / 255.0 for c in box.colour))
        ctx.rectangle(box.x1, box.y1, box.x2 - box.x1, box.y2 - box.y1)
        ctx.stroke()
        if box.text:
            ext = ctx.text_extents(box.text)
            ty = box.y1 - cfg.font_size - 4 if box.y1 >= cfg.font_size + 4 else box.y1
            ctx.rectangle(box.x1, ty, ext.x_advance + 8, cfg.font_size + 4)
            ctx.fill()
            ctx.set_source_rgb(0, 0, 0)
            ctx.move_to(box.x1 + 4, ty + cfg.font_size)
            ctx.show_text(box.text)
    for text in draws.texts:
        ext = ctx.text_extents(text.text)
        ctx.set_source_rgba(0, 0, 0, 0.6)
        ctx.rectangle(text.x, text.y, ext.x_advance + 12, cfg.font_size + 10)
        ctx.fill()
        ctx.set_source_rgb(*(c / 255.0 for c in text.colour))
        ctx.move_to(text.x + 6, text.y + cfg.font_size + 3)
        ctx.show_text(text.text)


def paint_on_context(
    ctx: cairo.Context,
    hidden: tuple[tuple[int, int, int, int], ...],
    colour: RGB,
    images: list[Rendered],
) -> None:
    """The cairooverlay backend's privacy and regions: the ``hidden`` rectangles filled with
    ``colour``, then pre-rendered images (zones and lines, or privacy masks)."""
    if hidden:
        ctx.set_source_rgb(*(c / 255.0 for c in colour))
        for x1, y1, x2, y2 in hidden:
            ctx.rectangle(x1, y1, x2 - x1, y2 - y1)
        ctx.fill()
    for pixels, x, y, w, h in images:
        _paint_image(ctx, pixels, x, y, w, h)


def _paint_image(ctx: cairo.Context, pixels: bytes, x: int, y: int, w: int, h: int) -> None:
    image = cairo.ImageSurface.create_for_data(
        memoryview(bytearray(pixels)),
        cairo.FORMAT_ARGB32,
        w,
        h,
        cairo.ImageSurface.format_stride_for_width(cairo.FORMAT_ARGB32, w),
    )
    ctx.set_source_surface(image, x, y)
    ctx.paint()
