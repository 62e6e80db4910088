"""edgecam's compiled helpers: plain C built when the package is installed (see
setup.py), called through ctypes, which lets go of the GIL for each call: the drawing core
(``draw.c``), the tracker's step (``track.c``) and its matching (``match.c``)."""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
from array import array
from pathlib import Path
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from edgecam.errors import EdgecamError

__all__ = [
    "BoxBatch",
    "Glyph",
    "Label",
    "TrackStep",
    "TrackTable",
    "Translucent",
    "check",
    "compose_text",
    "draw_boxes",
    "label_image",
    "match_iou",
    "text_images",
]

# draw.c's edgecam_abi(): the calls' signatures this module passes its arguments by.
_ABI = 2
_PER_BOX = 13
# Positions handed to the C side are kept within +-_FAR: far enough to be off any picture,
# near enough that its clipping arithmetic (in int) cannot overflow.
_FAR = 1 << 28


def _clamp(v: int) -> int:
    return -_FAR if v < -_FAR else (_FAR if v > _FAR else v)


@functools.cache
def _library() -> ctypes.CDLL:
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_core{suffix}"
        if path.is_file():
            lib = ctypes.CDLL(str(path))
            abi = getattr(lib, "edgecam_abi", None)
            if abi is not None:
                abi.argtypes, abi.restype = [], ctypes.c_int32
            if abi is None or abi() != _ABI:
                raise EdgecamError(
                    f"edgecam's compiled core {path} was built from other sources than this "
                    "code: rebuild it (bash scripts/setup.sh, or pip install -e .)"
                )
            vp, i32, f64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_double
            lib.edgecam_draw_boxes.argtypes = [vp, vp, vp, i32, i32, i32, i32, i32, vp, i32]
            lib.edgecam_draw_boxes.restype = None
            lib.edgecam_match_iou.argtypes = [vp, i32, vp, i32, f64, vp, vp, vp]
            lib.edgecam_match_iou.restype = i32
            i64 = ctypes.c_int64
            lib.edgecam_blend.argtypes = [vp, i64, i32, i32, i32, i32, vp, vp, i32, i32, i32, i32]
            lib.edgecam_blend.restype = None
            lib.edgecam_coverage.argtypes = [vp, i32, vp, i32, i32]
            lib.edgecam_coverage.restype = None
            lib.edgecam_label.argtypes = [vp, i32, i32, i32, i32, i32, i32, i32, vp, vp]
            lib.edgecam_label.restype = None
            f32 = ctypes.c_float
            lib.edgecam_text.argtypes = [
                vp, i32, i32, i32, i32, i32, i32, i32, f32, vp, vp, vp, vp
            ]  # fmt: skip
            lib.edgecam_text.restype = None
            lib.edgecam_track_step.argtypes = [ctypes.POINTER(_Tracks), vp, vp, vp, i64, i64]
            lib.edgecam_track_step.restype = i64
            return lib
    raise EdgecamError(
        f"edgecam's compiled core is not built in {here}: reinstall edgecam "
        "(bash scripts/setup.sh, or pip install -e . with a C compiler present)"
    )


# track.c's TrackTable: its arrays (each cap rows) in order, with their row shape and type.
_TRACK_ARRAYS: dict[str, tuple[tuple[int, ...], type]] = {
    **{name: ((4,), np.float64) for name in ("pos", "vel", "pv", "pvc", "vv")},
    "hits": ((), np.int64),
    "ids": ((), np.int64),
    "conf": ((), np.float32),
    "out_xyxy": ((4,), np.float32),
    "out_conf": ((), np.float32),
    "out_attr": ((), np.float32),
    "out_ids": ((), np.int64),
    "out_matched": ((), np.bool_),
}


class _Tracks(ctypes.Structure):
    """track.c's TrackTable."""

    _fields_ = [
        *((name, ctypes.c_void_p) for name in _TRACK_ARRAYS),
        ("n", ctypes.c_int64),
        ("cap", ctypes.c_int64),
        ("next_id", ctypes.c_int64),
        ("threshold", ctypes.c_double),
        ("hit_max", ctypes.c_int64),
        ("delay", ctypes.c_int64),
    ]


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
    if uv.ndim != 3 or uv.shape != (2, (h + 1) // 2, (w + 1) // 2):
        raise ValueError(f"chroma planes {uv.shape} do not match a {w}x{h} frame")
    base = uv.ctypes.data
    items = array("q", batch.items)
    _library().edgecam_draw_boxes(
        y.ctypes.data, base, base + uv.strides[0], y.strides[0], uv.strides[1], w, h, n,
        items.buffer_info()[0], line_width,
    )  # fmt: skip


class Glyph:
    """One character's 8-bit coverage image (a read-only C-contiguous copy, kept with its
    address for the compiled core) and how far it moves the pen."""

    __slots__ = ("_address", "_mask", "advance")

    def __init__(self, mask: npt.NDArray[np.uint8], advance: float) -> None:
        self._mask = np.array(mask, dtype=np.uint8, order="C")
        if self._mask.ndim != 2:
            raise ValueError(f"a glyph is a 2-d coverage image, got {self._mask.shape}")
        self._mask.flags.writeable = False
        self._address = self._mask.ctypes.data
        self.advance = advance

    @property
    def mask(self) -> npt.NDArray[np.uint8]:
        return self._mask


def compose_text(glyphs: list[tuple[Glyph, int]], width: int, height: int) -> npt.NDArray[np.uint8]:
    """A (height, width) coverage image of ``glyphs``, each (glyph, x) with its top-left at
    (x, 0), the larger coverage kept where they overlap; clipped to the image."""
    canvas = np.zeros((height, width), dtype=np.uint8)
    items = array("q")
    for glyph, x in glyphs:  # ``glyphs`` keeps the images alive through the call
        h, w = glyph._mask.shape
        items.extend((glyph._address, w, h, _clamp(x)))
    if glyphs:
        _library().edgecam_coverage(
            items.buffer_info()[0], len(glyphs), canvas.ctypes.data, width, height
        )
    return canvas


def label_image(coverage: npt.NDArray[np.uint8], yuv: tuple[int, int, int], black: int
                ) -> Label:  # fmt: skip
    """An opaque box label from an even-sized coverage image: the colour ``yuv`` where the
    text does not cover it, black (luma ``black``) where it does (see ``edgecam_label`` in
    draw.c)."""
    h, w = coverage.shape
    if h % 2 or w % 2 or coverage.dtype != np.uint8:
        raise ValueError(f"not an even-sized 8-bit coverage image: {coverage.shape}")
    if not all(0 <= c <= 255 for c in (*yuv, black)):
        raise ValueError(f"not an 8-bit colour and black: {yuv}, {black}")
    y8 = np.empty((h, w), dtype=np.uint8)
    uv8 = np.empty((2, h // 2, w // 2), dtype=np.uint8)
    if not coverage.size:
        return Label(y8, uv8)
    coverage = np.ascontiguousarray(coverage)
    _library().edgecam_label(
        coverage.ctypes.data, coverage.strides[0], w, h, *yuv, black, y8.ctypes.data,
        uv8.ctypes.data,
    )  # fmt: skip
    return Label(y8, uv8)


def text_images(
    coverage: npt.NDArray[np.uint8], yuv: tuple[int, int, int], band_alpha: float, black: int
) -> tuple[Translucent, Translucent]:
    """A line of text in the colour ``yuv`` on a black band (luma ``black``) of opacity
    ``band_alpha``, from an even-sized coverage image: its luma and chroma as translucent
    images (see ``edgecam_text`` in draw.c)."""
    h, w = coverage.shape
    if h % 2 or w % 2 or coverage.dtype != np.uint8:
        raise ValueError(f"not an even-sized 8-bit coverage image: {coverage.shape}")
    if not all(0 <= c <= 255 for c in (*yuv, black)) or not 0 <= band_alpha <= 1:
        raise ValueError(
            f"not an 8-bit colour and black and an opacity: {yuv}, {black}, {band_alpha}"
        )
    y_add, y_keep = np.empty((h, w), np.float32), np.empty((h, w), np.float32)
    uv_add = np.empty((2, h // 2, w // 2), np.float32)
    c_keep = np.empty((h // 2, w // 2), np.float32)
    if coverage.size:
        coverage = np.ascontiguousarray(coverage)
        _library().edgecam_text(
            coverage.ctypes.data, coverage.strides[0], w, h, *yuv, black, band_alpha,
            y_add.ctypes.data, y_keep.ctypes.data, uv_add.ctypes.data, c_keep.ctypes.data,
        )  # fmt: skip
    return Translucent(y_add, y_keep), Translucent(uv_add, c_keep)


class Translucent:
    """A translucent image for :meth:`put`: what each pixel of a plane becomes under it,
    ``pixel * keep + add`` (float32; ``add`` a plane each, ``keep`` shared by them), so
    that putting it is one compiled call a frame. Its arrays are read-only copies."""

    __slots__ = ("_add", "_blend", "_keep", "_planes", "height", "width")

    def __init__(self, add: npt.NDArray[np.float32], keep: npt.NDArray[np.float32]) -> None:
        self._add = np.array(add, dtype=np.float32, order="C")
        self._keep = np.array(keep, dtype=np.float32, order="C")
        if self._add.shape[-2:] != self._keep.shape or self._add.ndim not in (2, 3):
            raise ValueError(f"add {add.shape} does not match keep {keep.shape}")
        self._add.flags.writeable = self._keep.flags.writeable = False
        self.height, self.width = self._keep.shape
        self._planes = 1 if self._add.ndim == 2 else len(self._add)
        # What the call needs of this image, worked out once: put runs on every frame.
        self._blend = (self._add.ctypes.data, self._keep.ctypes.data, self.width, self.height)

    @property
    def add(self) -> npt.NDArray[np.float32]:
        return self._add

    @property
    def keep(self) -> npt.NDArray[np.float32]:
        return self._keep

    def put(self, plane: npt.NDArray[np.uint8], x: int, y: int) -> None:
        """Onto ``plane`` ((height, width), or (planes, height, width) for an image of as
        many planes), its top-left at (x, y); clipped to it."""
        shape, strides = plane.shape, plane.strides
        if len(shape) != self._add.ndim or (len(shape) == 3 and shape[0] != self._planes):
            raise ValueError(f"a {self._add.shape} image cannot go onto a {shape} plane")
        if not plane.flags.writeable or strides[-1] != 1 or plane.dtype != np.uint8:
            raise ValueError("the plane must be writable 8-bit, its pixels contiguous along a row")
        step = strides[0] if len(shape) == 3 else 0
        _library().edgecam_blend(
            plane.ctypes.data, step, self._planes, strides[-2], shape[-1], shape[-2],
            *self._blend, _clamp(x), _clamp(y),
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


class TrackStep(NamedTuple):
    """The tracks shown after one :meth:`TrackTable.step`, one row each."""

    xyxy: npt.NDArray[np.float32]
    confidence: npt.NDArray[np.float32]
    attribute: npt.NDArray[np.float32]  # NaN unless a detection hit the track on this frame
    ids: npt.NDArray[np.int64]
    matched: npt.NDArray[np.bool_]  # a detection hit the track on this frame


class TrackTable:
    """The compiled tracker's state: Norfair's model (see ``track.c``), a row a track, in
    numpy arrays that grow as tracks are added; one :meth:`step` a frame."""

    def __init__(self, threshold: float, hit_max: int, delay: int) -> None:
        if not (1 <= hit_max <= _FAR and 0 <= delay <= _FAR):
            raise ValueError(f"hit_max {hit_max} and delay {delay} must be in 1 (0) .. {_FAR}")
        self._lib = _library()  # an install without the library fails here, saying so
        self._arrays: dict[str, np.ndarray] = {}
        self._table = _Tracks(n=0, cap=0, next_id=1, threshold=threshold, hit_max=hit_max,
                              delay=delay)  # fmt: skip
        self._grow(16)

    def __len__(self) -> int:
        """Rows held, expired ones included until the next step removes them."""
        return int(self._table.n)

    def _grow(self, cap: int) -> None:
        # Every array made before the table points at any (a MemoryError halfway must not
        # leave it pointing at freed ones).
        n, old = self._table.n, self._arrays
        new: dict[str, np.ndarray] = {}
        for name, (row, dtype) in _TRACK_ARRAYS.items():
            new[name] = np.zeros((cap, *row), dtype=dtype)
            if old:
                new[name][:n] = old[name][:n]
        for name, made in new.items():
            setattr(self._table, name, made.ctypes.data)
        self._arrays = new
        self._table.cap = cap

    def step(
        self,
        boxes: npt.NDArray[np.float32] | None,
        confidence: npt.NDArray[np.float32] | None = None,
        attribute: npt.NDArray[np.float32] | None = None,
        period: int = 1,
    ) -> TrackStep:
        """Advance one frame; ``boxes`` (n, 4), with their ``confidence`` and ``attribute``,
        where a detector ran on it, ``period`` frames after the previous detections."""
        if not 1 <= period <= _FAR:
            raise ValueError(f"period must be between 1 and {_FAR}, got {period}")
        table = self._table
        if boxes is None or not len(boxes):
            shown = self._lib.edgecam_track_step(table, None, None, None, 0, period)
        else:
            m = len(boxes)
            boxes = np.ascontiguousarray(boxes, dtype=np.float32)
            conf = np.ascontiguousarray(confidence, dtype=np.float32)
            attr = np.ascontiguousarray(attribute, dtype=np.float32)
            if boxes.shape != (m, 4) or conf.shape != (m,) or attr.shape != (m,):
                raise ValueError("boxes must be (n, 4), with n scores and n attributes")
            if table.n + m > table.cap:
                self._grow(max(table.n + m, 2 * table.cap))
            shown = self._lib.edgecam_track_step(
                table, boxes.ctypes.data, conf.ctypes.data, attr.ctypes.data, m, period
            )
        if shown < 0:
            raise MemoryError("the tracker's step could not allocate its scratch space")
        a = self._arrays
        return TrackStep(
            a["out_xyxy"][:shown].copy(),
            a["out_conf"][:shown].copy(),
            a["out_attr"][:shown].copy(),
            a["out_ids"][:shown].copy(),
            a["out_matched"][:shown].copy(),
        )
