"""Shared fixtures: real media, free loopback ports, a real H.264 RTP sender."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgecam.ports import free_port, free_udp_pair

__all__ = ["MEDIA", "ROOT", "free_port", "free_udp_pair"]

# The fleet server's fixtures: a real Mosquitto, SQLite and PostgreSQL databases.
pytest_plugins = ["server_support"]

ROOT = Path(__file__).resolve().parents[1]
MEDIA = ROOT / "media"


@pytest.fixture
def media() -> Path:
    return MEDIA


@pytest.fixture
def rtp_sender() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start a real H.264 RTP stream (the inference pipeline's output format) to a port.

    Same contract as the pipeline: payload 96, SPS/PPS with every keyframe, one keyframe a
    second, timestamps from a live clock. ``pattern="snow"`` with ``bitrate`` (kbit/s) makes
    a stream that fills what it is given, for tests that need bytes flowing fast.
    """
    procs: list[subprocess.Popen[bytes]] = []

    def start(
        port: int,
        width: int = 640,
        height: int = 360,
        fps: int = 30,
        pattern: str = "ball",
        bitrate: int = 2048,
    ) -> subprocess.Popen[bytes]:
        args = [
            "gst-launch-1.0",
            "-q",
            "-e",
            "videotestsrc",
            "is-live=true",
            f"pattern={pattern}",
            "!",
            f"video/x-raw,width={width},height={height},framerate={fps}/1",
            "!",
            "timeoverlay",
            "!",
            "x264enc",
            "tune=zerolatency",
            "speed-preset=ultrafast",
            f"bitrate={bitrate}",
            f"key-int-max={fps}",
            "!",
            "video/x-h264,profile=constrained-baseline",  # as the pipeline pins it
            "!",
            "h264parse",  # SPS/PPS once before each keyframe, as the pipeline sends them
            "config-interval=-1",
            "!",
            "rtph264pay",
            "config-interval=0",
            "pt=96",
            "!",
            "udpsink",
            "host=127.0.0.1",
            f"port={port}",
            "sync=true",
        ]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


def closed_at_once(sock: socket.socket) -> bool:
    """Whether the server closes ``sock`` within half a second (it answered nothing)."""
    sock.settimeout(0.5)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
