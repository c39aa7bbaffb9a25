"""The model's lock, which also measures how busy the model is.

The joint policy weighs delay by alpha / (1 - rho) (kvcli.serve.manager), rho the share of
recent time the model was held. Every holder of the model takes this lock (requests,
placement work, idle profiling), so the time it is held is the model's busy time.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable

DEFAULT_WINDOW = 120.0  # seconds of history behind the utilization: a few minutes of arrivals


class BusyLock:
    """A lock (acquire / release / `with`) that keeps the intervals it was held."""

    def __init__(self, window: float = DEFAULT_WINDOW, clock: Callable[[], float] = time.monotonic):
        self._lock = threading.Lock()
        self._meter = threading.Lock()  # guards the intervals (read from other threads)
        self.window, self.clock = window, clock
        self.started = clock()
        self._held_since: float | None = None
        self._intervals: deque[tuple[float, float]] = deque()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        got = self._lock.acquire(blocking, timeout)
        if got:
            with self._meter:
                self._held_since = self.clock()
        return got

    def release(self) -> None:
        with self._meter:
            now = self.clock()
            if self._held_since is not None:
                self._intervals.append((self._held_since, now))
            self._held_since = None
            while self._intervals and self._intervals[0][1] < now - self.window:
                self._intervals.popleft()
        self._lock.release()

    __enter__ = acquire

    def __exit__(self, *exc) -> None:
        self.release()

    def utilization(self) -> float:
        """The share of the last `window` seconds (or of the time since it was made, if
        shorter) the lock was held, the current holding included."""
        with self._meter:
            now = self.clock()
            start = max(self.started, now - self.window)
            if now <= start:
                return 0.0
            held = sum(max(0.0, b - max(a, start)) for a, b in self._intervals)
            if self._held_since is not None:
                held += now - max(self._held_since, start)
            return min(1.0, held / (now - start))
