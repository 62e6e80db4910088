"""Where a picture lies when it is fitted into the model's frame keeping its shape."""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["Letterbox", "letterbox"]


class Letterbox(NamedTuple):
    """Where a source picture lies in the model's frame: its scaled size and offset."""

    width: int
    height: int
    x: int
    y: int


def letterbox(source: tuple[int, int], par: tuple[int, int], model: tuple[int, int]) -> Letterbox:
    """The picture of ``source`` (width, height; pixel aspect ratio ``par``) fitted into
    ``model`` (width, height) keeping its shape, centred, as ``videoscale add-borders``
    computes it (integer pixels, the pixel aspect ratio included)."""
    src_w, src_h = source
    par_n, par_d = par if par[0] > 0 and par[1] > 0 else (1, 1)
    dar_n, dar_d = src_w * par_n, src_h * par_d  # display aspect ratio of the source
    model_w, model_h = model
    content_w, content_h = model_w, model_h
    to_h = model_w * dar_d // dar_n
    if to_h <= model_h:
        content_h = to_h
    else:
        content_w = model_h * dar_n // dar_d
    return Letterbox(content_w, content_h, (model_w - content_w) // 2, (model_h - content_h) // 2)
