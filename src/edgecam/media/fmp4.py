"""Fragmented MP4 for Media Source Extensions: an init segment and one fragment a frame.

A browser's ``SourceBuffer`` takes an init segment (``ftyp`` + ``moov`` with the ``avcC``
decoder configuration) and then ``moof`` + ``mdat`` fragments. One frame a fragment adds no
muxing delay (mp4mux waits for a fragment's duration), and a viewer that joins late starts
at any keyframe fragment after the init segment. Samples are H.264 access units in AVC form
(4-byte NAL lengths), exactly what ``h264parse`` gives with ``stream-format=avc``.
"""

from __future__ import annotations

import struct

__all__ = ["TIMESCALE", "Fmp4Writer", "codec_string"]

TIMESCALE = 90_000
_TRACK_ID = 1
_MATRIX = struct.pack(">9I", 0x00010000, 0, 0, 0, 0x00010000, 0, 0, 0, 0x40000000)
# ISO/IEC 14496-12 sample flags: a sync sample depends on nothing (sample_depends_on=2);
# any other depends on others (1) and is a non-sync sample.
_SYNC_FLAGS = 0x02000000
_DELTA_FLAGS = 0x01010000
# trun: data offset, and per sample duration, size and flags present.
_TRUN_FLAGS = 0x000001 | 0x000100 | 0x000200 | 0x000400
_TFHD_DEFAULT_BASE_IS_MOOF = 0x020000


def _box(kind: bytes, *payload: bytes) -> bytes:
    body = b"".join(payload)
    return struct.pack(">I", 8 + len(body)) + kind + body


def _full_box(kind: bytes, version: int, flags: int, *payload: bytes) -> bytes:
    return _box(kind, struct.pack(">I", (version << 24) | flags), *payload)


def codec_string(avcc: bytes) -> str:
    """The RFC 6381 codec of an ``avcC`` record, e.g. ``avc1.42c01f``, for MSE."""
    if len(avcc) < 4 or avcc[0] != 1:
        raise ValueError("not an AVCDecoderConfigurationRecord (avcC)")
    return f"avc1.{avcc[1:4].hex()}"


class Fmp4Writer:
    """Boxes for one H.264 video track; ``fragment()`` numbers fragments in order."""

    def __init__(self, avcc: bytes, width: int, height: int) -> None:
        self.codec = codec_string(avcc)
        if not (0 < width < 65536 and 0 < height < 65536):
            raise ValueError(f"width and height must be in 1..65535, got {width}x{height}")
        self._avcc = avcc
        self._width = width
        self._height = height
        self._sequence = 0
        self.init_segment = self._init_segment()

    def _init_segment(self) -> bytes:
        ftyp = _box(b"ftyp", b"isom", struct.pack(">I", 0x200), b"isomiso6avc1mp41")
        mvhd = _full_box(
            b"mvhd", 0, 0,
            struct.pack(">IIII", 0, 0, 1000, 0),
            struct.pack(">IH", 0x00010000, 0x0100), bytes(10), _MATRIX, bytes(24),
            struct.pack(">I", _TRACK_ID + 1),
        )  # fmt: skip
        tkhd = _full_box(
            b"tkhd", 0, 3,  # enabled, in movie
            struct.pack(">IIIII", 0, 0, _TRACK_ID, 0, 0), bytes(8),
            struct.pack(">hhhH", 0, 0, 0, 0), _MATRIX,
            struct.pack(">II", self._width << 16, self._height << 16),
        )  # fmt: skip
        mdhd = _full_box(b"mdhd", 0, 0, struct.pack(">IIIIHH", 0, 0, TIMESCALE, 0, 0x55C4, 0))
        hdlr = _full_box(b"hdlr", 0, 0, bytes(4), b"vide", bytes(12), b"edgecam\0")
        avc1 = _box(
            b"avc1",
            bytes(6), struct.pack(">H", 1), bytes(16),
            struct.pack(">HHIIIH", self._width, self._height, 0x00480000, 0x00480000, 0, 1),
            bytes(32), struct.pack(">Hh", 0x0018, -1),
            _box(b"avcC", self._avcc),
        )  # fmt: skip
        stbl = _box(
            b"stbl",
            _full_box(b"stsd", 0, 0, struct.pack(">I", 1), avc1),
            _full_box(b"stts", 0, 0, struct.pack(">I", 0)),
            _full_box(b"stsc", 0, 0, struct.pack(">I", 0)),
            _full_box(b"stsz", 0, 0, struct.pack(">II", 0, 0)),
            _full_box(b"stco", 0, 0, struct.pack(">I", 0)),
        )
        dinf = _box(
            b"dinf", _full_box(b"dref", 0, 0, struct.pack(">I", 1), _full_box(b"url ", 0, 1))
        )
        minf = _box(b"minf", _full_box(b"vmhd", 0, 1, bytes(8)), dinf, stbl)
        trak = _box(b"trak", tkhd, _box(b"mdia", mdhd, hdlr, minf))
        trex = _full_box(b"trex", 0, 0, struct.pack(">IIIII", _TRACK_ID, 1, 0, 0, 0))
        return ftyp + _box(b"moov", mvhd, trak, _box(b"mvex", trex))

    def fragment(self, sample: bytes, decode_time: int, duration: int, keyframe: bool) -> bytes:
        """``moof`` + ``mdat`` holding one sample; times in :data:`TIMESCALE` units."""
        self._sequence += 1
        flags = _SYNC_FLAGS if keyframe else _DELTA_FLAGS

        def moof(data_offset: int) -> bytes:
            return _box(
                b"moof",
                _full_box(b"mfhd", 0, 0, struct.pack(">I", self._sequence)),
                _box(
                    b"traf",
                    _full_box(b"tfhd", 0, _TFHD_DEFAULT_BASE_IS_MOOF, struct.pack(">I", _TRACK_ID)),
                    _full_box(b"tfdt", 1, 0, struct.pack(">Q", decode_time)),
                    _full_box(
                        b"trun",
                        0,
                        _TRUN_FLAGS,
                        struct.pack(">IiIII", 1, data_offset, duration, len(sample), flags),
                    ),
                ),
            )

        size = len(moof(0))
        return moof(size + 8) + _box(b"mdat", sample)
