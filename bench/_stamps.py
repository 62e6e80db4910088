"""Stamped test frames for the latency benchmarks: each raw frame carries the time it was
sent as a barcode, read back where it is decoded (``read_stamp`` here, or the live page's
script in the browser).

Not part of the library; the scripts import it by path (``bench/`` is on ``sys.path``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import numpy as np

BITS = 40
BLOCK = 16
STAMP_MASK = (1 << BITS) - 1


def write_stamp(y: np.ndarray, stamp: int) -> None:
    """Draw ``stamp`` into the luma plane ``y``: row 0 the bits, row 1 their inverse."""
    for i in range(BITS):
        bit = (stamp >> i) & 1
        x = i * BLOCK
        y[0:BLOCK, x : x + BLOCK] = 235 if bit else 16
        y[BLOCK : 2 * BLOCK, x : x + BLOCK] = 16 if bit else 235


def read_stamp(y: np.ndarray) -> int | None:
    """The stamp in luma plane ``y``, or None when the check row disagrees."""
    c = BLOCK // 4
    rows = y[c : BLOCK - c, : BITS * BLOCK].reshape(BLOCK - 2 * c, BITS, BLOCK)
    inv = y[BLOCK + c : 2 * BLOCK - c, : BITS * BLOCK].reshape(BLOCK - 2 * c, BITS, BLOCK)
    bits = rows[:, :, c : BLOCK - c].mean(axis=(0, 2)) > 128
    check = inv[:, :, c : BLOCK - c].mean(axis=(0, 2)) > 128
    if np.any(bits == check):
        return None
    return int(sum(1 << i for i, b in enumerate(bits) if b))


def stamped_frames(
    width: int,
    height: int,
    fps: int,
    stop: threading.Event,
    clock: Callable[[], int],
    *,
    bottom: bool = False,
) -> Iterator[bytes]:
    """Raw I420 frames at ``fps`` until ``stop`` is set: diagonal stripes that move
    (P-frames with real content, like a camera), each stamped with ``clock()`` just before
    it is yielded, in the top rows (or the bottom ones, clear of the overlay's counts)."""
    yy, xx = np.mgrid[0:height, 0 : width + 2 * fps * 4]
    pattern = (((xx + yy) // 24) % 2 * 120 + 60).astype(np.uint8)
    frame = np.full(width * height * 3 // 2, 128, dtype=np.uint8)
    y = frame[: width * height].reshape(height, width)
    stamp_rows = y[height - 2 * BLOCK :] if bottom else y
    period = 1.0 / fps
    t0 = time.monotonic()
    k = 0
    while not stop.is_set():
        delay = t0 + k * period - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        shift = (k * 4) % (2 * fps * 4)
        y[:] = pattern[:, shift : shift + width]
        write_stamp(stamp_rows, clock() & STAMP_MASK)
        yield frame.tobytes()
        k += 1
