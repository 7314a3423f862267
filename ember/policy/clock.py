"""Clocks for decision code: every time-dependent choice in ember reads one of these.

`Clock` is the protocol (`now() -> float`, seconds on a monotonic scale). `SystemClock` reads
`time.monotonic()`; `FakeClock` is moved only by `advance()`/`set()`, for tests and the simulator.
Policy functions themselves take plain `now_s` values; the clock lives with their callers.
"""

from __future__ import annotations

import math
import time
from typing import Protocol, runtime_checkable

from ember.errors import ConfigError


@runtime_checkable
class Clock(Protocol):
    """A source of monotonic time in seconds."""

    def now(self) -> float: ...


class SystemClock:
    """The real monotonic clock (`time.monotonic`)."""

    __slots__ = ()

    def now(self) -> float:
        return time.monotonic()


class FakeClock:
    """A clock that moves only when told to; never goes backwards."""

    __slots__ = ("_now_s",)

    def __init__(self, start_s: float = 0.0) -> None:
        if not math.isfinite(start_s):
            raise ConfigError(f"start_s must be finite, got {start_s!r}")
        self._now_s = float(start_s)

    def now(self) -> float:
        return self._now_s

    def advance(self, seconds: float) -> float:
        """Move forward by `seconds` (>= 0) and return the new time."""
        if not (seconds >= 0.0 and math.isfinite(seconds)):
            raise ConfigError(f"seconds must be a finite value >= 0, got {seconds!r}")
        self._now_s += seconds
        return self._now_s

    def set(self, now_s: float) -> None:
        """Jump to `now_s`, which must not be earlier than the current time."""
        if not (math.isfinite(now_s) and now_s >= self._now_s):
            raise ConfigError(f"now_s must be finite and >= {self._now_s}, got {now_s!r}")
        self._now_s = float(now_s)

    def __repr__(self) -> str:
        return f"FakeClock(now_s={self._now_s})"
