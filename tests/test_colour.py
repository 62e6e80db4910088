"""The RGB <-> Y'CbCr coefficients every conversion shares."""

from __future__ import annotations

import numpy as np
import pytest

from edgecam.vision.colour import BT601, BT709, YuvMatrix

BT2020 = YuvMatrix(0.2627, 0.0593)
MATRICES = [BT601, BT709, BT2020, YuvMatrix(0.299, 0.114, True), YuvMatrix(0.2126, 0.0722, True)]


def test_bt601_is_the_table_drawn_with_before() -> None:
    # SD frames must come out as they always did: the same coefficients, to the bit.
    assert BT601.rgb_to_yuv == (
        (65.481, 128.553, 24.966),
        (-37.797, -74.203, 112.0),
        (112.0, -93.786, -18.214),
    )
    assert BT601.black == 16 and YuvMatrix(0.299, 0.114, True).black == 0


@pytest.mark.parametrize(
    ("matrix", "colour", "yuv"),
    [
        (BT601, (255, 0, 255), (106, 202, 222)),
        (BT709, (255, 0, 255), (78, 214, 230)),  # HD video
        (BT709, (0, 0, 0), (16, 128, 128)),
        (BT709, (255, 255, 255), (235, 128, 128)),
        (YuvMatrix(0.2126, 0.0722, True), (0, 0, 0), (0, 128, 128)),
        (YuvMatrix(0.2126, 0.0722, True), (255, 255, 255), (255, 128, 128)),
        (YuvMatrix(0.2126, 0.0722, True), (255, 0, 0), (54, 99, 255)),  # V 255.5, kept 8-bit
    ],
)
def test_colours_by_matrix_and_range(
    matrix: YuvMatrix, colour: tuple[int, int, int], yuv: tuple[int, int, int]
) -> None:
    assert matrix.yuv(colour) == yuv


@pytest.mark.parametrize("matrix", MATRICES)
def test_yuv_to_rgb_undoes_rgb_to_yuv(matrix: YuvMatrix) -> None:
    rng = np.random.default_rng(0)
    for colour in rng.integers(0, 256, (200, 3)).tolist():
        y, u, v = matrix.yuv(colour)
        back = matrix.yuv_to_rgb @ np.array([y, u, v, 1.0])
        # 8-bit Y'CbCr holds fewer colours than 8-bit RGB: a level or two either way.
        assert np.abs(back - colour).max() <= 2.5, (matrix, colour)


def test_equal_matrices_are_one_key_and_bad_weights_are_refused() -> None:
    assert YuvMatrix(0.2126, 0.0722) == BT709 and hash(YuvMatrix(0.2126, 0.0722)) == hash(BT709)
    assert YuvMatrix(0.2126, 0.0722, True) != BT709
    assert not BT709.yuv_to_rgb.flags.writeable
    for kr, kb in ((0.0, 0.1), (0.7, 0.4), (-0.2, 0.1)):
        with pytest.raises(ValueError, match="kr and kb"):
            YuvMatrix(kr, kb)
