"""The compiled core against plain numpy: the drawing of the same boxes, the blending of
translucent images, and the tracker's matching against the numpy version it replaced."""

from __future__ import annotations

import importlib.machinery
import math
import string

import numpy as np
import numpy.typing as npt
import pytest

import edgecam.media.overlay as overlay
import edgecam.native as native
from edgecam.config import TrackerConfig
from edgecam.errors import EdgecamError
from edgecam.native import BoxBatch, Label, Translucent, draw_boxes
from edgecam.native import match_iou as match_arrays
from edgecam.vision.colour import BT601, BT709, YuvMatrix
from edgecam.vision.drawing import GLYPH_PAD
from edgecam.vision.tracking import NumpyTracker

U8 = npt.NDArray[np.uint8]


def match_iou(
    candidates: npt.NDArray[np.float64], objects: npt.NDArray[np.float64], threshold: float
) -> list[tuple[int, int]]:
    """The compiled matching's pairs as a list, as the reference gives them."""
    rows, cols = match_arrays(candidates, objects, threshold)
    assert rows.dtype == cols.dtype == np.int64 and len(rows) == len(cols)
    return list(zip(rows.tolist(), cols.tolist(), strict=True))


SENTINEL = 7


def _frame(width: int, height: int, pad: int, rng: np.random.Generator) -> tuple[U8, U8, U8]:
    """Random I420 planes inside one buffer whose rows are ``pad`` bytes longer than the
    picture and with a guard row after each plane: (buffer, luma view, chroma view)."""
    cw, ch = (width + 1) // 2, (height + 1) // 2
    ys, cs = width + pad, cw + pad
    buf = np.full((height + 1) * ys + 2 * (ch + 1) * cs, SENTINEL, np.uint8)
    y = np.ndarray((height, width), np.uint8, buf, 0, (ys, 1))
    uv = np.ndarray((2, ch, cw), np.uint8, buf, (height + 1) * ys, ((ch + 1) * cs, cs, 1))
    y[...] = rng.integers(20, 235, y.shape)
    uv[...] = rng.integers(20, 235, uv.shape)
    return buf, y, uv


def _reference(y: U8, uv: U8, boxes: list[tuple[tuple[int, int, int, int], tuple[int, int, int],
               Label | None, int, int]], lw: int) -> None:  # fmt: skip
    """The same drawing in numpy slices: each box's outline, then its label, in order."""

    def fill(plane: U8, x1: int, y1: int, x2: int, y2: int, value: int) -> None:
        h, w = plane.shape
        x1, x2, y1, y2 = (min(max(v, 0), lim) for v, lim in ((x1, w), (x2, w), (y1, h), (y2, h)))
        plane[y1:y2, x1:x2] = value

    def copy(plane: U8, image: U8, x: int, y: int) -> None:
        h, w = plane.shape
        for r in range(image.shape[0]):
            for c in range(image.shape[1]):
                if 0 <= y + r < h and 0 <= x + c < w:
                    plane[y + r, x + c] = image[r, c]

    cl = (lw + 1) // 2
    for (x1, y1, x2, y2), (cy, cu, cv), label, lx, ly in boxes:
        for plane, (a, b, c, d), width, value in (
            (y, (x1, y1, x2, y2), lw, cy),
            (uv[0], (x1 // 2, y1 // 2, (x2 + 1) // 2, (y2 + 1) // 2), cl, cu),
            (uv[1], (x1 // 2, y1 // 2, (x2 + 1) // 2, (y2 + 1) // 2), cl, cv),
        ):
            fill(plane, a, b, c, b + width, value)
            fill(plane, a, d - width, c, d, value)
            fill(plane, a, b, a + width, d, value)
            fill(plane, c - width, b, c, d, value)
        if label is not None:
            copy(y, label.y8, lx, ly)
            copy(uv[0], label.uv8[0], lx // 2, ly // 2)
            copy(uv[1], label.uv8[1], lx // 2, ly // 2)


@pytest.mark.parametrize(
    ("width", "height", "pad", "lw"),
    [(64, 48, 0, 2), (67, 41, 5, 3), (100, 30, 12, 1), (33, 57, 1, 5)],
)
def test_the_compiled_drawing_matches_numpy_and_stays_inside_the_frame(
    width: int, height: int, pad: int, lw: int
) -> None:
    rng = np.random.default_rng(width * height + lw)
    buf, y, uv = _frame(width, height, pad, rng)
    ref_buf, ref_y, ref_uv = _frame(width, height, pad, np.random.default_rng(width * height + lw))
    boxes = []
    batch = BoxBatch()
    for k in range(30):
        x1, y1 = (int(v) for v in rng.integers(-5, (width, height)))
        x2, y2 = x1 + int(rng.integers(1, width)), y1 + int(rng.integers(1, height))
        yuv = tuple(int(v) for v in rng.integers(16, 240, 3))
        label = None
        lx = ly = 0
        if k % 3:  # labels of every size, some over the frame's edges
            lh, lw_ = 2 * int(rng.integers(1, 8)), 2 * int(rng.integers(1, 20))
            label = Label(
                rng.integers(0, 255, (lh, lw_), dtype=np.uint8),
                rng.integers(0, 255, (2, lh // 2, lw_ // 2), dtype=np.uint8),
            )
            lx, ly = (2 * int(v) for v in rng.integers(-6, (width // 2 + 3, height // 2 + 3)))
        boxes.append(((x1, y1, x2, y2), yuv, label, lx, ly))
        batch.add((x1, y1, x2, y2), yuv, label, lx, ly)  # type: ignore[arg-type]
    draw_boxes(y, uv, batch, lw)
    _reference(ref_y, ref_uv, boxes, lw)  # type: ignore[arg-type]
    assert np.array_equal(y, ref_y) and np.array_equal(uv, ref_uv)
    assert np.array_equal(buf, ref_buf)  # padding and guard rows untouched too
    assert (buf != SENTINEL).sum() == (ref_buf != SENTINEL).sum()


def _blend_reference(plane: U8, add: np.ndarray, keep: np.ndarray, x: int, y: int) -> None:
    """The blending as numpy did it before it was compiled: pixel * keep + add + 0.5."""
    h, w = keep.shape
    ph, pw = plane.shape[-2:]
    r0, c0, r1, c1 = max(0, -y), max(0, -x), min(h, ph - y), min(w, pw - x)
    if r0 >= r1 or c0 >= c1:
        return
    region = plane[..., y + r0 : y + r1, x + c0 : x + c1]
    region[...] = region * keep[r0:r1, c0:c1] + add[..., r0:r1, c0:c1] + 0.5


@pytest.mark.parametrize(("width", "height", "pad"), [(64, 48, 0), (67, 41, 5), (33, 57, 3)])
def test_translucent_images_blend_as_numpy_did_and_stay_inside_the_frame(
    width: int, height: int, pad: int
) -> None:
    rng = np.random.default_rng(width + height)
    buf, y, uv = _frame(width, height, pad, rng)
    ref_buf, ref_y, ref_uv = _frame(width, height, pad, np.random.default_rng(width + height))
    for _ in range(40):  # over every edge, partly and wholly outside
        ih, iw = (int(v) for v in rng.integers(1, 30, 2))
        alpha = rng.random((ih, iw)).astype(np.float32)
        keep = (1 - alpha).astype(np.float32)
        add = (rng.random((2, ih, iw)) * 235 * alpha).astype(np.float32)
        x, y0 = (int(v) for v in rng.integers(-35, (width + 5, height + 5)))
        Translucent(add[0], keep).put(y, x, y0)
        _blend_reference(ref_y, add[0], keep, x, y0)
        Translucent(add, keep).put(uv, x // 2, y0 // 2)
        _blend_reference(ref_uv, add, keep, x // 2, y0 // 2)
    assert np.array_equal(y, ref_y) and np.array_equal(uv, ref_uv)
    assert np.array_equal(buf, ref_buf)  # padding and guard rows untouched too
    assert (y != _frame(width, height, pad, np.random.default_rng(width + height))[1]).any()


def test_a_translucent_image_refuses_planes_it_does_not_fit() -> None:
    _buf, y, uv = _frame(64, 48, 0, np.random.default_rng(2))
    keep = np.ones((4, 6), np.float32)
    with pytest.raises(ValueError, match="does not match"):
        Translucent(np.zeros((4, 5), np.float32), keep)
    with pytest.raises(ValueError, match="cannot go onto"):
        Translucent(np.zeros((2, 4, 6), np.float32), keep).put(y, 0, 0)
    with pytest.raises(ValueError, match="cannot go onto"):
        Translucent(np.zeros((4, 6), np.float32), keep).put(uv, 0, 0)
    with pytest.raises(ValueError, match="contiguous"):
        Translucent(np.zeros((4, 6), np.float32), keep).put(y[:, ::2], 0, 0)
    y.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        Translucent(np.zeros((4, 6), np.float32), keep).put(y, 0, 0)


def _coverage_reference(glyphs: overlay._Glyphs, text: str, pad: int) -> U8:
    """A line's coverage as numpy put it together before it was compiled."""
    masks = [overlay._glyph(ch, glyphs.size) for ch in text]
    width = math.ceil(sum(g.advance for g in masks)) + 2 * pad
    width += width % 2
    canvas = np.zeros((glyphs.height, width), dtype=np.uint8)
    pen = float(pad)
    for g in masks:
        x = round(pen) - GLYPH_PAD
        c0, c1 = max(0, -x), min(g.mask.shape[1], width - x)
        rows = min(g.mask.shape[0], glyphs.height)
        if c0 < c1:
            region = canvas[:rows, x + c0 : x + c1]
            np.maximum(region, g.mask[:rows, c0:c1], out=region)
        pen += g.advance
    return canvas


def _label_reference(
    coverage: U8, colour: tuple[int, int, int], matrix: YuvMatrix
) -> tuple[U8, U8]:
    """A box label's I420 images as numpy made them before they were compiled."""
    m = coverage.astype(np.float32) / 255
    y, u, v = matrix.yuv(colour)
    luma = y + (matrix.black - y) * m
    mh = overlay._half(m)
    chroma = np.stack([u + (128 - u) * mh, v + (128 - v) * mh])
    return (luma + 0.5).astype(np.uint8), (chroma + 0.5).astype(np.uint8)


def _text_reference(
    coverage: U8, colour: tuple[int, int, int], matrix: YuvMatrix
) -> list[np.ndarray]:
    """A line of text's translucent images as numpy made them before they were compiled:
    luma add and keep, chroma add and keep."""
    m = coverage.astype(np.float32) / 255
    y, u, v = matrix.yuv(colour)
    band = 0.6 * (1 - m)
    mh, bh = overlay._half(m), overlay._half(band)
    uv_p = np.stack([mh * u + bh * 128, mh * v + bh * 128])
    return [m * y + band * matrix.black, 1 - m - band, uv_p, 1 - mh - bh]


@pytest.mark.parametrize(
    ("size", "matrix"),
    [(10, BT601), (14, BT601), (23, BT601), (14, BT709), (23, YuvMatrix(0.2126, 0.0722, True))],
)
def test_text_and_labels_equal_the_numpy_versions(size: int, matrix: YuvMatrix) -> None:
    glyphs = overlay._Glyphs(size)
    texts = [string.printable.strip(), "17 person", "no_mask: 3  mask: 12", "Wj|", "", " "]
    colours = [(0, 255, 0), (255, 0, 0), (255, 255, 255), (0, 0, 0), (17, 130, 201)]
    covered = 0
    for text in texts:
        for pad in (0, 4, 6):
            coverage = glyphs.coverage(text, pad)
            assert np.array_equal(coverage, _coverage_reference(glyphs, text, pad)), text
            covered += int(coverage.sum() > 0)
            rows = coverage[3 : 3 + size + 4 + size % 2]  # as the renderer cuts a label
            for colour in colours:
                stamp = overlay._text_stamp(coverage, colour, matrix)
                made = [stamp.luma.add, stamp.luma.keep, stamp.chroma.add, stamp.chroma.keep]
                want_text = _text_reference(coverage, colour, matrix)
                for got, want in zip(made, want_text, strict=True):
                    assert got.tobytes() == want.astype(np.float32).tobytes(), text
                label = overlay._label_stamp(rows, colour, matrix)
                y8, uv8 = _label_reference(rows, colour, matrix)
                assert np.array_equal(label.y8, y8) and np.array_equal(label.uv8, uv8), text
    assert covered >= 12  # the texts really had glyphs in them


def test_positions_far_off_the_frame_draw_nothing_and_never_wrap() -> None:
    buf, y, uv = _frame(64, 48, 3, np.random.default_rng(4))
    before = buf.copy()
    image = Translucent(np.zeros((2, 4, 6), np.float32), np.zeros((4, 6), np.float32))
    label = Label(np.zeros((4, 6), np.uint8), np.zeros((2, 2, 3), np.uint8))
    batch = BoxBatch()
    for far in (-(2**31), 2**31, -(2**63), 2**63 - 1, 10**30):
        image.put(uv, far, 0)
        image.put(uv, 0, far)
    for far in (-(2**31), 2**31, -(2**62), 2**62):  # the batch holds 64-bit integers
        batch.add((far, far, far + 5, far + 5), (1, 2, 3), label, far, far)
    draw_boxes(y, uv, batch, 2)
    assert np.array_equal(buf, before)


def test_nan_and_out_of_range_values_give_defined_pixels() -> None:
    _buf, y, _uv = _frame(16, 8, 0, np.random.default_rng(5))
    add = np.full((4, 4), np.nan, np.float32)
    add[0, 0], add[0, 1] = np.inf, -np.inf
    Translucent(add, np.zeros((4, 4), np.float32)).put(y, 0, 0)
    assert y[0, 0] == 255 and y[0, 1] == 0 and (y[1:4, 0:4] == 0).all()
    with pytest.raises(ValueError, match="8-bit colour"):
        native.label_image(np.zeros((4, 4), np.uint8), (300, -5, 128), 16)
    with pytest.raises(ValueError, match="8-bit colour"):
        native.label_image(np.zeros((4, 4), np.uint8), (16, 128, 128), -1)
    with pytest.raises(ValueError, match="8-bit colour"):
        native.text_images(np.zeros((4, 4), np.uint8), (16, 128, 128), 1.5, 16)


def test_draw_boxes_wants_both_chroma_planes() -> None:
    _buf, y, uv = _frame(64, 64, 0, np.random.default_rng(6))
    batch = BoxBatch()
    batch.add((0, 0, 64, 64), (1, 2, 3))
    with pytest.raises(ValueError, match="chroma"):
        draw_boxes(y, uv[:1], batch, 2)


def test_a_label_must_be_an_even_sized_i420_image() -> None:
    with pytest.raises(ValueError, match="even-sized"):
        Label(np.zeros((3, 4), np.uint8), np.zeros((2, 1, 2), np.uint8))
    with pytest.raises(ValueError, match="even-sized"):
        Label(np.zeros((4, 4), np.uint8), np.zeros((2, 2, 3), np.uint8))


def test_planes_that_do_not_fit_together_are_refused() -> None:
    _buf, y, uv = _frame(64, 48, 0, np.random.default_rng(1))
    batch = BoxBatch()
    batch.add((1, 1, 10, 10), (100, 100, 100))
    with pytest.raises(ValueError, match="chroma"):
        draw_boxes(y, uv[:, :10], batch, 2)
    with pytest.raises(ValueError, match="contiguous"):
        draw_boxes(y[:, ::2], uv, batch, 2)
    y.flags.writeable = False  # as a buffer mapped for reading: numpy would refuse to write
    with pytest.raises(ValueError, match="read-only"):
        draw_boxes(y, uv, batch, 2)


def test_a_missing_library_says_how_to_build_it(monkeypatch: pytest.MonkeyPatch) -> None:
    native._library.cache_clear()
    monkeypatch.setattr(importlib.machinery, "EXTENSION_SUFFIXES", [".not-built.so"])
    try:
        with pytest.raises(EdgecamError, match=r"not built.*setup\.sh"):
            native.check()
        with pytest.raises(EdgecamError, match="compiled core is not built"):
            NumpyTracker(TrackerConfig())  # the tracker's matching is compiled too
    finally:
        native._library.cache_clear()


# -- the tracker's matching ----------------------------------------------------------------


def _iou_distance(candidates: np.ndarray, objects: np.ndarray) -> np.ndarray:
    """(N, K) matrix of 1 - IoU, Norfair's ``iou`` distance (the tracker's former numpy)."""
    area_c = (candidates[:, 2] - candidates[:, 0]) * (candidates[:, 3] - candidates[:, 1])
    area_o = (objects[:, 2] - objects[:, 0]) * (objects[:, 3] - objects[:, 1])
    top_left = np.maximum(candidates[:, None, :2], objects[:, :2])
    bottom_right = np.minimum(candidates[:, None, 2:], objects[:, 2:])
    inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=2)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(1 - inter / (area_c[:, None] + area_o - inter))


def _greedy(distance: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """Norfair's matching: take the globally closest pair while it is under ``threshold``."""
    pairs: list[tuple[int, int]] = []
    if not distance.size:
        return pairs
    d = np.nan_to_num(distance.copy(), nan=threshold + 1)
    cols = d.shape[1]
    while True:
        flat = int(d.argmin())
        if not d.flat[flat] < threshold:
            return pairs
        row, col = divmod(flat, cols)
        pairs.append((row, col))
        d[row, :] = threshold + 1
        d[:, col] = threshold + 1


def _boxes(n: int, rng: np.random.Generator) -> np.ndarray:
    xy = rng.uniform(-50, 1300, (n, 2))
    wh = rng.uniform(1, 300, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1)


def _case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(candidates, objects): detections near the objects (jittered), plus some anywhere."""
    rng = np.random.default_rng(seed)
    objects = _boxes(int(rng.integers(0, 25)), rng)
    near = objects[rng.permutation(len(objects))[: int(rng.integers(0, len(objects) + 1))]]
    near = near + rng.normal(0, 8, near.shape)
    candidates = np.concatenate([near, _boxes(int(rng.integers(0, 6)), rng)])
    if seed % 5 == 0 and len(candidates) > 1:
        candidates[1] = candidates[0]  # equal distances: the first in row-major order wins
    if seed % 7 == 0 and len(candidates):
        candidates[-1] = [10, 10, 10, 10]  # empty box: 0/0 against another empty one
        objects = np.concatenate([objects, [[10, 10, 10, 10]]])
    return candidates, objects


@pytest.mark.parametrize("seed", range(40))
def test_matching_pairs_equal_the_numpy_rule(seed: int) -> None:
    candidates, objects = _case(seed)
    for threshold in (0.3, 0.8, 1.0):
        expected = _greedy(_iou_distance(candidates, objects), threshold)
        assert match_iou(candidates, objects, threshold) == expected


def test_the_random_matching_cases_are_not_all_empty() -> None:
    sizes = [len(_greedy(_iou_distance(*_case(seed)), 0.8)) for seed in range(40)]
    assert sum(n > 3 for n in sizes) >= 15 and max(sizes) >= 15, sizes


def test_matching_never_takes_a_nan_and_takes_the_closest_first() -> None:
    empty = np.array([[5.0, 5.0, 5.0, 5.0]])
    assert match_iou(empty, empty, 0.8) == []  # 0 / 0: NaN, never a match
    a = np.array([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]])
    b = np.array([[0.0, 0.0, 1.0, 1.0]])
    assert match_iou(a, b, 0.8) == _greedy(_iou_distance(a, b), 0.8) == [(1, 0)]
    assert match_iou(a, b, 0.0) == []  # nothing is nearer than 0
    assert match_iou(np.zeros((0, 4)), b, 0.8) == []
    with pytest.raises(ValueError, match=r"\(n, 4\)"):
        match_iou(np.zeros((3, 3)), b, 0.8)


def test_a_core_built_from_other_sources_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """An upgrade whose compiled core was not rebuilt would pass the changed calls their
    arguments shifted (a number where a pointer is due): it is refused, saying what to do."""
    monkeypatch.setattr(native, "_ABI", native._ABI + 1)
    native._library.cache_clear()
    try:
        with pytest.raises(EdgecamError, match=r"built from other sources.*rebuild it"):
            native._library()
    finally:
        monkeypatch.undo()
        native._library.cache_clear()
    assert native._library() is not None
