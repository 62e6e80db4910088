"""Draw commands built from a frame's metadata, and the cairo code that renders them.

Python never touches the video frame: it renders small ARGB images of the boxes and labels,
and a GStreamer element (overlaycomposition or cairooverlay) blends them in C.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import cairo

from edgecam.config import OverlayConfig
from edgecam.vision.analytics import FrameMeta

__all__ = ["DrawBox", "DrawList", "DrawText", "build_draw_list", "draw_on_context", "render_box"]

RGB = tuple[int, int, int]


@dataclass(frozen=True, slots=True)
class DrawBox:
    x1: int
    y1: int
    x2: int
    y2: int
    colour: RGB
    text: str


@dataclass(frozen=True, slots=True)
class DrawText:
    x: int
    y: int
    text: str
    colour: RGB


@dataclass(frozen=True, slots=True)
class DrawList:
    boxes: tuple[DrawBox, ...]
    texts: tuple[DrawText, ...]


_FALLBACK: RGB = (255, 255, 255)


def build_draw_list(meta: FrameMeta, cfg: OverlayConfig, width: int, height: int) -> DrawList:
    """What to draw on this frame, clipped to a ``width`` x ``height`` picture."""
    boxes = []
    for t in meta.tracks:
        x1, y1, x2, y2 = t.box
        x1i, y1i = max(0, int(x1)), max(0, int(y1))
        x2i, y2i = min(width - 1, int(x2)), min(height - 1, int(y2))
        if x2i - x1i < 2 or y2i - y1i < 2:
            continue
        parts = []
        if cfg.draw_ids:
            parts.append(str(t.id))
        if cfg.draw_labels:
            parts.append(t.label)
        boxes.append(
            DrawBox(x1i, y1i, x2i, y2i, cfg.colours.get(t.label, _FALLBACK), " ".join(parts))
        )
    texts = []
    if cfg.draw_counts and meta.counts:
        line = "  ".join(f"{label}: {n}" for label, n in meta.counts.items())
        texts.append(DrawText(8, 8, line, (255, 255, 255)))
    return DrawList(tuple(boxes), tuple(texts))


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
