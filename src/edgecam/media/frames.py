"""Video frames as numpy arrays: an I420 buffer mapped for a ``with`` block, and the
detector's frame made from one (letterboxed to the model's size, in RGB).

The detector's frame is made here, on the detector's thread, rather than by ``videoscale !
videoconvert`` in the pipeline: GStreamer's generic converter took 1.5-1.7 ms a 720p frame
on this project's 2-core machines, OpenCV's resize and an affine colour transform take
0.4 ms (0.55 ms inside a busy pipeline), without the GIL. The picture is the one
``videoscale add-borders`` made: the same letterbox (:func:`edgecam.vision.letterbox.letterbox`),
black borders, the caps' colour matrix and range; and it lies exactly where
:func:`from_model_frame` maps boxes back from (videoscale, writing I420, moved an odd left
border a pixel left: 6 px instead of 7 for 1280x720 into 640x352).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, cast

import cv2
import numpy as np
import numpy.typing as npt

from edgecam.errors import PipelineError
from edgecam.media.gst import Gst, GstVideo
from edgecam.vision.colour import BT601, BT709, YuvMatrix
from edgecam.vision.letterbox import Letterbox, letterbox

__all__ = [
    "I420Frame",
    "MappedFrame",
    "ModelFit",
    "colour_matrix",
    "from_model_frame",
]

U8 = npt.NDArray[np.uint8]

# OpenCV would otherwise split each resize over a pool of threads as large as the machine:
# on two cores beside the decoder and the encoder, that only adds switching.
cv2.setNumThreads(1)


@dataclass(frozen=True)
class I420Frame:
    """An I420 frame's luma plane, and its two chroma planes as one (2, h/2, w/2) view."""

    y: U8
    uv: U8


class MappedFrame:
    """An I420 buffer mapped as numpy views for the ``with`` block (a decoder's buffers may
    be laid out with padding: their video meta says how)."""

    def __init__(self, buf: Gst.Buffer, info: Any, flags: Gst.MapFlags) -> None:
        self._buf = buf
        self._info = info
        self._flags = flags
        self._map: Any = None

    def __enter__(self) -> I420Frame:
        buf, info = self._buf, self._info
        layout = _get_video_meta()(buf) or info
        offset, stride = layout.offset, layout.stride
        if stride[1] != stride[2] or offset[2] <= offset[1]:
            raise PipelineError(f"unexpected I420 layout: offsets {offset}, strides {stride}")
        ok, self._map = buf.map(self._flags)
        if not ok:
            raise PipelineError("cannot map a video frame")
        w, h = info.width, info.height
        data = self._map.data
        y: U8 = np.ndarray((h, w), np.uint8, data, offset[0], (stride[0], 1))
        uv: U8 = np.ndarray(
            (2, (h + 1) // 2, (w + 1) // 2),
            np.uint8,
            data,
            offset[1],
            (offset[2] - offset[1], stride[1], 1),
        )
        return I420Frame(y, uv)

    def __exit__(self, *exc: object) -> None:
        self._buf.unmap(self._map)


@functools.cache
def _get_video_meta() -> Any:
    return GstVideo.buffer_get_video_meta  # looked up once: introspection is slow


def _caps_geometry(source: Gst.Structure) -> tuple[tuple[int, int], tuple[int, int]]:
    size = (source.get_value("width"), source.get_value("height"))
    ok, par_n, par_d = source.get_fraction("pixel-aspect-ratio")
    return size, ((par_n, par_d) if ok else (1, 1))


def _to_source(size: tuple[int, int], box: Letterbox) -> tuple[float, float, float, float]:
    sx, sy = size[0] / box.width, size[1] / box.height
    return sx, sy, -box.x * sx, -box.y * sy


def from_model_frame(
    source: Gst.Structure, model: tuple[int, int]
) -> tuple[float, float, float, float]:
    """(sx, sy, dx, dy) taking pixels of the model's frame (width, height ``model``) back
    to the source's (x * sx + dx), through the letterbox's borders."""
    size, par = _caps_geometry(source)
    return _to_source(size, letterbox(size, par, model))


def colour_matrix(info: Any) -> YuvMatrix:
    """The Y'CbCr matrix and range of the frames ``info`` (a ``GstVideo.VideoInfo``)
    describes, as their caps give them."""
    colorimetry = info.colorimetry
    ok, kr, kb = GstVideo.VideoColorMatrix.get_Kr_Kb(colorimetry.matrix)
    if not ok:  # unknown: GStreamer's own default for YUV of this height (HD: BT.709)
        kr, kb = (BT709.kr, BT709.kb) if info.height > 576 else (BT601.kr, BT601.kb)
    full = colorimetry.range == getattr(GstVideo.VideoColorRange, "0_255")
    return YuvMatrix(round(kr, 6), round(kb, 6), full)


def _resize(plane: U8, size: tuple[int, int]) -> U8:
    """``plane`` scaled to ``size`` (width, height), averaged where it shrinks.

    A shrink by an integer factor k >= 2 that divides the plane is OpenCV's fast area
    average; the rest (a factor under 2, or growing) is bilinear, which then loses nothing.
    A shrink by k >= 2 that does not divide the plane takes OpenCV's general area average
    (slower, and as right).
    """
    h, w = plane.shape
    if (w, h) == size:
        return plane
    k = min(w // size[0], h // size[1])
    if k >= 2:
        if w % k or h % k:
            return cast(U8, cv2.resize(plane, size, interpolation=cv2.INTER_AREA))
        plane = cast(U8, cv2.resize(plane, (w // k, h // k), interpolation=cv2.INTER_AREA))
        if plane.shape == (size[1], size[0]):
            return plane
    return cast(U8, cv2.resize(plane, size, interpolation=cv2.INTER_LINEAR))


class ModelFit:
    """How the frames of one video format are fitted to a model's size: worked out once,
    then used for every frame (``info``: the frames' video info)."""

    def __init__(self, info: Any, model: tuple[int, int]) -> None:
        size, par = (info.width, info.height), (info.par_n, info.par_d)
        self._model = model
        self._box = letterbox(size, par, model)
        self._matrix = colour_matrix(info).yuv_to_rgb
        self.to_source = _to_source(size, self._box)  # as :func:`from_model_frame`

    def __call__(self, frame: I420Frame) -> U8:
        """The detector's (height, width, 3) RGB frame: ``frame`` letterboxed between black
        borders."""
        box, (w, h) = self._box, self._model
        size = (box.width, box.height)
        yuv = cv2.merge([_resize(frame.y, size), _resize(frame.uv[0], size),
                         _resize(frame.uv[1], size)])  # fmt: skip
        out = np.zeros((h, w, 3), dtype=np.uint8)
        out[box.y : box.y + box.height, box.x : box.x + box.width] = cv2.transform(
            yuv, self._matrix
        )
        return out
