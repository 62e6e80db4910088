"""edgecam's compiled helpers: plain C built when the package is installed (see
setup.py), called through ctypes, which lets go of the GIL for each call: the drawing core
(``draw.c``) and the tracker's matching (``match.c``)."""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
from array import array
from pathlib import Path

import numpy as np
import numpy.typing as npt

from edgecam.errors import EdgecamError

__all__ = ["BoxBatch", "Label", "check", "draw_boxes", "match_iou"]

_PER_BOX = 13


@functools.cache
def _library() -> ctypes.CDLL:
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_core{suffix}"
        if path.is_file():
            lib = ctypes.CDLL(str(path))
            vp, i32, f64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_double
            lib.edgecam_draw_boxes.argtypes = [vp, vp, vp, i32, i32, i32, i32, i32, vp, i32]
            lib.edgecam_draw_boxes.restype = None
            lib.edgecam_match_iou.argtypes = [vp, i32, vp, i32, f64, vp, vp, vp]
            lib.edgecam_match_iou.restype = i32
            return lib
    raise EdgecamError(
        f"edgecam's compiled core is not built in {here}: reinstall edgecam "
        "(bash scripts/setup.sh, or pip install -e . with a C compiler present)"
    )


def check() -> None:
    """Raise :class:`EdgecamError` now if the library cannot be loaded."""
    _library()


class BoxBatch:
    """A frame's boxes, each an outline and an optional opaque label image, gathered for one
    call of :func:`draw_boxes`."""

    __slots__ = ("items", "keep")

    def __init__(self) -> None:
        self.items: list[int] = []  # 13 a box: see edgecam_draw_boxes in draw.c
        self.keep: list[Label] = []  # the label images, alive until the call is done

    def __len__(self) -> int:
        return len(self.items) // _PER_BOX

    def add(self, box: tuple[int, int, int, int], yuv: tuple[int, int, int],
            label: Label | None = None, x: int = 0, y: int = 0) -> None:  # fmt: skip
        """``box``: (x1, y1, x2, y2), ends exclusive; ``label`` put with its top-left at
        (x, y), both even."""
        if label is None:
            self.items += (*box, *yuv, 0, 0, 0, 0, 0, 0)
        else:
            self.keep.append(label)
            self.items += (*box, *yuv, *label.address, x, y, label.width, label.height)


class Label:
    """An opaque I420 image: a (height, width) luma plane and a (2, height/2, width/2)
    chroma one, both even-sized; kept C-contiguous, with their addresses, for the C side."""

    __slots__ = ("address", "height", "uv8", "width", "y8")

    def __init__(self, y8: npt.NDArray[np.uint8], uv8: npt.NDArray[np.uint8]) -> None:
        h, w = y8.shape
        if h % 2 or w % 2 or uv8.shape != (2, h // 2, w // 2):
            raise ValueError(f"not an even-sized I420 image: {y8.shape}, {uv8.shape}")
        self.y8 = np.ascontiguousarray(y8, dtype=np.uint8)
        self.uv8 = np.ascontiguousarray(uv8, dtype=np.uint8)
        self.width, self.height = w, h
        self.address = (self.y8.ctypes.data, self.uv8.ctypes.data)


def draw_boxes(y: npt.NDArray[np.uint8], uv: npt.NDArray[np.uint8], batch: BoxBatch,
               line_width: int) -> None:  # fmt: skip
    """Draw ``batch`` in order, each box's outline (``line_width`` luma pixels inside its
    corners) then its label, into an I420 frame: ``y`` its (height, width) luma plane, ``uv``
    its chroma planes as one (2, height/2, width/2) view; rows may be padded, pixels not."""
    n = len(batch)
    if not n:
        return
    if not (y.flags.writeable and uv.flags.writeable):
        raise ValueError("the planes are read-only")
    if y.strides[1] != 1 or uv.strides[2] != 1:
        raise ValueError("the planes' pixels must be contiguous along a row")
    h, w = y.shape
    if uv.shape[1:] != ((h + 1) // 2, (w + 1) // 2):
        raise ValueError(f"chroma planes {uv.shape[1:]} do not match a {w}x{h} frame")
    base = uv.ctypes.data
    items = array("q", batch.items)
    _library().edgecam_draw_boxes(
        y.ctypes.data, base, base + uv.strides[0], y.strides[0], uv.strides[1], w, h, n,
        items.buffer_info()[0], line_width,
    )  # fmt: skip


def match_iou(
    candidates: npt.NDArray[np.float64], objects: npt.NDArray[np.float64], threshold: float
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Norfair's greedy IoU matching: the (candidate, object) index pairs, closest first,
    while ``1 - IoU < threshold``; each box in one pair at most. Returned as two index arrays
    of the pairs' candidates and objects. Both inputs are (n, 4) boxes (x1, y1, x2, y2); a
    pair whose distance is NaN (an empty union) never matches."""
    a = np.ascontiguousarray(candidates, dtype=np.float64)
    b = np.ascontiguousarray(objects, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != 4 or b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"boxes must be (n, 4) arrays, got {a.shape} and {b.shape}")
    n, k = len(a), len(b)
    if not n or not k:
        return _NO_PAIRS
    work = np.empty(n * k, dtype=np.float64)
    rows = np.empty(min(n, k), dtype=np.int32)
    cols = np.empty(min(n, k), dtype=np.int32)
    found = _library().edgecam_match_iou(
        a.ctypes.data, n, b.ctypes.data, k, threshold, work.ctypes.data, rows.ctypes.data,
        cols.ctypes.data,
    )  # fmt: skip
    return rows[:found].astype(np.int64), cols[:found].astype(np.int64)


_NO_PAIRS = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
_NO_PAIRS[0].flags.writeable = _NO_PAIRS[1].flags.writeable = False
