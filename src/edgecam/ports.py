"""Free loopback ports, for the demo and the tests."""

from __future__ import annotations

import socket

from edgecam.errors import EdgecamError

__all__ = ["free_port", "free_udp_pair"]


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port on 127.0.0.1 that nothing is bound to right now."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_udp_pair() -> int:
    """An even UDP port p such that p and p + 1 are both free (a camera's two RTP ports)."""
    for _ in range(50):
        base = free_port(socket.SOCK_DGRAM) & ~1
        try:
            with (
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as a,
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as b,
            ):
                a.bind(("127.0.0.1", base))
                b.bind(("127.0.0.1", base + 1))
                return base
        except OSError:
            continue
    raise EdgecamError("no free pair of UDP ports on 127.0.0.1")
