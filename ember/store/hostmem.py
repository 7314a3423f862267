"""Host memory for loads: anonymous mappings with 2 MiB pages advised, optionally recycled.

Why: copying into memory that is already mapped runs at memory speed (15-18 GB/s on the
reference VM), while the first touch of fresh 4 KiB pages costs a page fault each and caps a
load near 4 GB/s. Two remedies, both here:

- `MADV_HUGEPAGE` on every mapping: one fault per 2 MiB instead of per 4 KiB. Costs nothing when
  transparent huge pages are off (the advice is ignored); can stall on compaction when memory
  is fragmented.
- a process-wide pool (`HostPool`): when every tensor viewing a mapping is freed, the mapping
  (still mapped, pages still present) goes back to the pool instead of to the kernel, and the
  next load of a similar size reuses it with no fault at all. On by default
  (`LoaderConfig.reuse_host_memory`): even with 2 MiB pages a fresh buffer costs the kernel
  zeroing every page before the copy (half again the memory traffic: 12 GB/s against 19.5 GB/s
  into a recycled buffer, measured on 2.2 GB); the second and later loads of a process skip it.

What the pool costs: idle mappings stay resident (there is no swap to push them to). They are
capped by `max_idle_bytes` (a quarter of physical memory, at most 16 GiB; the oldest go back to
the kernel first) and released `idle_s` (30 s) after they were freed.

Why it is safe: the tensor handed out keeps its mapping alive; a mapping is returned to the pool
only from the finalizer of the lease object the tensor holds, i.e. when no view, storage or
numpy array can reach it any more, so a later load never writes into memory a live tensor sees.
"""

from __future__ import annotations

import logging
import mmap
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

HUGE_PAGE_BYTES = 2 << 20


def map_anonymous(nbytes: int, huge_pages: bool) -> mmap.mmap:
    size = max(-(-nbytes // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES, HUGE_PAGE_BYTES)
    mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge_pages and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mm.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # THP compiled out: 4 KiB pages still work
            logger.debug("MADV_HUGEPAGE refused; using 4 KiB pages")
    return mm


class _Lease(np.ndarray):
    """A uint8 array over a pooled mapping; its finalizer hands the mapping back."""

    _pool: HostPool | None
    _mapping: mmap.mmap | None

    def __del__(self) -> None:
        pool, mapping = getattr(self, "_pool", None), getattr(self, "_mapping", None)
        if pool is not None and mapping is not None:
            pool._give_back(mapping)


def _default_max_idle_bytes() -> int:
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        physical = 16 << 30
    return min(16 << 30, physical // 4)


class HostPool:
    """Recycles host mappings between loads. Thread-safe.

    `max_idle_bytes` caps the memory held while idle; `idle_s` is how long a freed mapping is
    kept (None: until pushed out by the cap); `clock` (monotonic seconds) is injectable for tests.
    """

    def __init__(
        self,
        max_idle_bytes: int | None = None,
        idle_s: float | None = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_idle_bytes = (
            _default_max_idle_bytes() if max_idle_bytes is None else max_idle_bytes
        )
        self.idle_s = idle_s
        self._clock = clock
        self._idle: list[tuple[float, mmap.mmap]] = []  # (freed at, mapping), oldest first
        # Re-entrant: a lease finalizer (give back) can run from a garbage collection triggered
        # inside take() on the same thread.
        self._lock = threading.RLock()
        self._timer: threading.Timer | None = None
        self.hits = 0
        self.misses = 0

    @property
    def idle_bytes(self) -> int:
        with self._lock:
            return sum(len(m) for _, m in self._idle)

    def take(self, nbytes: int, huge_pages: bool = True) -> torch.Tensor:
        """A uint8 tensor of exactly `nbytes` over a recycled mapping (at most 1.5x the size
        needed) or a new one. Recycled memory holds the previous load's bytes, not zeros."""
        mapping = None
        with self._lock:
            self._expire_locked()
            fits = [
                item
                for item in self._idle
                if nbytes <= len(item[1]) <= max(nbytes * 3 // 2, HUGE_PAGE_BYTES)
            ]
            if fits:
                item = min(fits, key=lambda i: len(i[1]))
                self._idle.remove(item)
                mapping = item[1]
                self.hits += 1
            else:
                self.misses += 1
        if mapping is None:
            mapping = map_anonymous(nbytes, huge_pages)
        lease = np.frombuffer(mapping, dtype=np.uint8, count=nbytes).view(_Lease)
        lease._pool, lease._mapping = self, mapping
        return torch.from_numpy(lease)

    def _give_back(self, mapping: mmap.mmap) -> None:
        if sys.is_finalizing():
            # A lease freed by the interpreter's last garbage collection: nothing will reuse the
            # mapping, and the expiry timer's thread could not start (Thread.start would wait
            # forever and the process would never exit).
            return
        with self._lock:
            self._idle.append((self._clock(), mapping))
            while self._idle and sum(len(m) for _, m in self._idle) > self.max_idle_bytes:
                self._idle.pop(0)  # unmapped once the last buffer export is released
            self._expire_locked()
            if self._idle and self.idle_s is not None and self._timer is None:
                self._timer = threading.Timer(self.idle_s, self._on_timer)
                self._timer.daemon = True
                self._timer.start()

    def expire(self) -> int:
        """Release mappings idle for `idle_s` or longer; returns how many are left idle."""
        with self._lock:
            self._expire_locked()
            return len(self._idle)

    def _expire_locked(self) -> None:
        if self.idle_s is not None:
            now = self._clock()
            self._idle = [(t, m) for t, m in self._idle if now - t < self.idle_s]

    def _on_timer(self) -> None:
        with self._lock:
            self._timer = None
            self._expire_locked()
            if self._idle and self.idle_s is not None:  # the next one to expire
                wait = max(0.0, self._idle[0][0] + self.idle_s - self._clock())
                self._timer = threading.Timer(wait + 0.01, self._on_timer)
                self._timer.daemon = True
                self._timer.start()

    def clear(self) -> None:
        with self._lock:
            self._idle.clear()


HOST_POOL = HostPool()


def alloc_host(nbytes: int, huge_pages: bool = True, pool: HostPool | None = None) -> torch.Tensor:
    """A uint8 tensor of `nbytes` over an anonymous mapping (2 MiB pages advised), from `pool`
    when given. The tensor keeps the mapping alive."""
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    if pool is not None:
        return pool.take(nbytes, huge_pages)
    mapping: Any = map_anonymous(nbytes, huge_pages)
    return torch.frombuffer(mapping, dtype=torch.uint8, count=nbytes)
