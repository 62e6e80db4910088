"""Colours between RGB and the frames' 8-bit Y'CbCr, by the matrix and range their caps
give: the one place for the coefficients of every conversion (the detector's frame, the
drawing, the hidden faces).

HD video is mostly BT.709, SD BT.601: a colour converted with the wrong one is visibly off
(magenta drawn with BT.601 into BT.709 video shows as (255, 36, 255)).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["BT601", "BT709", "YuvMatrix"]

Rows = tuple[tuple[float, float, float], tuple[float, float, float], tuple[float, float, float]]

# Limited range: luma from 16 over 219 levels, chroma around 128 over 224; full: 0..255.
_LIMITED = (16, 219.0, 224.0)
_FULL = (0, 255.0, 255.0)
# The forward coefficients are kept to the three decimals the standards print them with:
# BT.601's are then exactly the ones this project always drew with (SD frames unchanged).
_DECIMALS = 3


@dataclass(frozen=True)
class YuvMatrix:
    """A Y'CbCr matrix by its luma weights of red and blue (``kr``, ``kb``; green's is what
    is left), and its range: full (0..255) or limited (luma 16..235, chroma 16..240).
    Equal matrices compare and hash equal: a cache of converted colours can be keyed by
    one."""

    kr: float
    kb: float
    full_range: bool = False

    def __post_init__(self) -> None:
        if not (0 < self.kr < 1 and 0 < self.kb < 1 and self.kr + self.kb < 1):
            raise ValueError(
                f"kr and kb must be in (0, 1) with kr + kb < 1, got {self.kr}, {self.kb}"
            )

    @property
    def black(self) -> int:
        """The luma of black (that of white is ``black + 219``, or 255 at full range)."""
        return _FULL[0] if self.full_range else _LIMITED[0]

    @property
    def rgb_to_yuv(self) -> Rows:
        """Per output (Y, U, V) the weights of 0..255 R, G, B, times 255: Y is
        ``black + (weights . rgb) / 255``, U and V ``128 + (weights . rgb) / 255``."""
        return _rgb_to_yuv(self.kr, self.kb, self.full_range)

    @property
    def yuv_to_rgb(self) -> npt.NDArray[np.float32]:
        """The 3x4 affine matrix taking 8-bit (Y, U, V, 1) to 0..255 (R, G, B) (read-only,
        for ``cv2.transform``)."""
        return _yuv_to_rgb(self.kr, self.kb, self.full_range)

    def yuv(self, colour: tuple[int, int, int]) -> tuple[int, int, int]:
        """The 8-bit Y, U, V of an RGB colour (at full range, the chroma of pure blue and
        red, 255.5, is 255)."""
        r, g, b = colour
        (yr, yg, yb), (ur, ug, ub), (vr, vg, vb) = self.rgb_to_yuv
        y = self.black + (yr * r + yg * g + yb * b) / 255
        u = 128 + (ur * r + ug * g + ub * b) / 255
        v = 128 + (vr * r + vg * g + vb * b) / 255
        return round(y), min(round(u), 255), min(round(v), 255)


def _scales(full_range: bool) -> tuple[int, float, float]:
    return _FULL if full_range else _LIMITED


@functools.lru_cache(maxsize=16)
def _rgb_to_yuv(kr: float, kb: float, full_range: bool) -> Rows:
    _black, ys, cs = _scales(full_range)
    kg = 1 - kr - kb
    cb, cr = cs / (2 * (1 - kb)), cs / (2 * (1 - kr))  # B - Y' and R - Y' to U and V

    def row(r: float, g: float, b: float) -> tuple[float, float, float]:
        return round(r, _DECIMALS), round(g, _DECIMALS), round(b, _DECIMALS)

    return (
        row(ys * kr, ys * kg, ys * kb),
        row(-cb * kr, -cb * kg, cb * (1 - kb)),
        row(cr * (1 - kr), -cr * kg, -cr * kb),
    )


@functools.lru_cache(maxsize=16)
def _yuv_to_rgb(kr: float, kb: float, full_range: bool) -> npt.NDArray[np.float32]:
    black, ys, cs = _scales(full_range)
    y_scale, c_scale = 255 / ys, 255 / cs
    kg = 1 - kr - kb
    rv, bu = 2 * (1 - kr), 2 * (1 - kb)
    gu, gv = -kb * bu / kg, -kr * rv / kg
    rows = [
        (y_scale, 0.0, c_scale * rv),
        (y_scale, c_scale * gu, c_scale * gv),
        (y_scale, c_scale * bu, 0.0),
    ]
    matrix = np.array([[a, b, c, -a * black - (b + c) * 128] for a, b, c in rows], dtype=np.float32)
    matrix.flags.writeable = False
    return matrix


BT601 = YuvMatrix(0.299, 0.114)  # SD video (GStreamer's default up to 576 lines)
BT709 = YuvMatrix(0.2126, 0.0722)  # HD video (GStreamer's default above)
