"""Failed attempts counted by key in a sliding window: the guard against guessing of the
fleet server's logins and of the device's token; and :class:`Every`, which lets a warning
be said once in a while, not at every event of a flood."""

from __future__ import annotations

import ipaddress
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable

__all__ = ["Every", "Failures", "client_key"]

#: Keys kept at most: past it, those with no recent failure are forgotten, then those with
#: the fewest (keys sprayed at a form must not grow memory without bound).
MAX_TRACKED = 10_000


class Every:
    """``due()`` is true at most once every ``seconds`` (the first time at once): for a
    warning said once in a while during a flood of what it warns of."""

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._last = -math.inf

    def due(self) -> bool:
        now = time.monotonic()
        if now - self._last < self._seconds:
            return False
        self._last = now
        return True


def client_key(address: str, v6_prefix: int = 64) -> str:
    """The key a client address is counted under: an IPv6 address by its first
    ``v6_prefix`` bits (on the internet a host holds a whole /64 and can change address at
    will; on a home network the whole household shares one, so the device counts them
    whole, 128), an IPv4-mapped one as IPv4, anything else (IPv4, a name, "") as it is."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        network = int(ip) >> (128 - v6_prefix) << (128 - v6_prefix)
        return str(ipaddress.IPv6Network((network, v6_prefix)))
    return str(ip)


class Failures:
    """How many times each key failed in the last ``window_s`` seconds. Thread-safe.

    Asking about a key that never failed keeps nothing, so a client trying new names costs
    no memory.
    """

    def __init__(self, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._window = window_s
        self._clock = clock
        self._times: dict[Hashable, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: Hashable, now: float) -> deque[float]:
        times = self._times.get(key)
        if times is None:
            return deque()  # not kept
        while times and times[0] <= now - self._window:
            times.popleft()
        return times

    def count(self, key: Hashable) -> int:
        with self._lock:
            return len(self._recent(key, self._clock()))

    def add_within(self, limits: dict[Hashable, int]) -> bool:
        """In one step: when every key has failed fewer times than its limit, one more
        failure of each, and True; else nothing, and False."""
        now = self._clock()
        with self._lock:
            if any(len(self._recent(k, now)) >= limit for k, limit in limits.items()):
                return False
            self._prune(now)
            for k in limits:
                self._times.setdefault(k, deque()).append(now)
            return True

    def undo(self, key: Hashable) -> None:
        """Take back the last failure of ``key`` (an attempt counted before it was known to
        be a failure, that turned out right)."""
        with self._lock:
            times = self._times.get(key)
            if times:
                times.pop()
                if not times:
                    del self._times[key]

    def forget(self, key: Hashable) -> None:
        with self._lock:
            self._times.pop(key, None)

    def _prune(self, now: float) -> None:
        if len(self._times) < MAX_TRACKED:
            return
        for k in [k for k in self._times if not self._recent(k, now)]:
            del self._times[k]
        # Still full of recent ones: those with the fewest failures go (keys sprayed to make
        # room have one each; a key at its limit stays), down to nine tenths, so that the
        # next prune is a tenth of the table's additions away.
        excess = len(self._times) - MAX_TRACKED * 9 // 10
        if excess > 0:
            fewest = sorted(self._times, key=lambda k: len(self._times[k]))[:excess]
            for k in fewest:
                del self._times[k]

    def __len__(self) -> int:
        """Keys tracked."""
        return len(self._times)
