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


RTP_PORTS_PER_CAMERA = 3  # streaming, recorder, live view


def free_udp_pair() -> int:
    """An even UDP port p such that p .. p + 2 are all free (a camera's three RTP ports)."""
    for _ in range(50):
        base = free_port(socket.SOCK_DGRAM) & ~1
        socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
        try:
            for i, s in enumerate(socks):
                s.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise EdgecamError("no free run of UDP ports on 127.0.0.1")
