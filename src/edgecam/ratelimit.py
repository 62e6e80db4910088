"""Failed attempts counted by key in a sliding window: the guard against guessing of the
fleet server's logins and of the device's token, links and cookies."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Hashable

__all__ = ["Failures"]

#: Keys kept at most before those with no recent failure are forgotten (keys sprayed at a
#: form must not grow memory without bound).
MAX_TRACKED = 10_000


class Failures:
    """How many times each key failed in the last ``window_s`` seconds. Thread-safe.

    Asking about a key that never failed keeps nothing, so a client trying new names costs
    no memory; keys past ``MAX_TRACKED`` with no recent failure are forgotten.
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

    def add(self, *keys: Hashable) -> None:
        """One more failure of each of ``keys``."""
        now = self._clock()
        with self._lock:
            if len(self._times) > MAX_TRACKED:
                for k in [k for k in self._times if not self._recent(k, now)]:
                    del self._times[k]
            for k in keys:
                self._recent(k, now)
                self._times.setdefault(k, deque()).append(now)

    def forget(self, key: Hashable) -> None:
        with self._lock:
            self._times.pop(key, None)

    def __len__(self) -> int:
        """Keys tracked."""
        return len(self._times)
