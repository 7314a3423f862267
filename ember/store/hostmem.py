"""Host memory for loads: anonymous mappings with 2 MiB pages advised, optionally recycled.

Why: copying into memory that is already mapped runs at memory speed (15-18 GB/s on the
reference VM), while the first touch of fresh 4 KiB pages costs a page fault each and caps a
load near 4 GB/s. Two remedies, both here:

- `MADV_HUGEPAGE` on every mapping: one fault per 2 MiB instead of per 4 KiB. Costs nothing when
  transparent huge pages are off (the advice is ignored); can stall on compaction when memory
  is fragmented.
- a process-wide pool (`HostPool`): when every tensor viewing a mapping is freed, the mapping
  (still mapped, pages still present) goes back to the pool instead of to the kernel, and the
  next load of a similar size reuses it with no fault at all. Opt-in with
  `LoaderConfig(reuse_host_memory=True)`; idle mappings are capped by `max_idle_bytes` (the
  oldest go back to the kernel first).

The tensor handed out keeps its mapping alive; a mapping is returned to the pool only from the
finalizer of the lease object the tensor holds, i.e. when no view can reach it any more.
"""

from __future__ import annotations

import logging
import mmap
import threading
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


class HostPool:
    """Recycles host mappings between loads. Thread-safe."""

    def __init__(self, max_idle_bytes: int = 16 << 30) -> None:
        self.max_idle_bytes = max_idle_bytes
        self._idle: list[mmap.mmap] = []  # oldest first
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def idle_bytes(self) -> int:
        with self._lock:
            return sum(len(m) for m in self._idle)

    def take(self, nbytes: int, huge_pages: bool = True) -> torch.Tensor:
        """A uint8 tensor of exactly `nbytes` over a recycled mapping (at most 1.5x the size
        needed) or a new one. Recycled memory holds the previous load's bytes, not zeros."""
        mapping = None
        with self._lock:
            fits = [
                m for m in self._idle if nbytes <= len(m) <= max(nbytes * 3 // 2, HUGE_PAGE_BYTES)
            ]
            if fits:
                mapping = min(fits, key=len)
                self._idle.remove(mapping)
                self.hits += 1
            else:
                self.misses += 1
        if mapping is None:
            mapping = map_anonymous(nbytes, huge_pages)
        lease = np.frombuffer(mapping, dtype=np.uint8, count=nbytes).view(_Lease)
        lease._pool, lease._mapping = self, mapping
        return torch.from_numpy(lease)

    def _give_back(self, mapping: mmap.mmap) -> None:
        with self._lock:
            self._idle.append(mapping)
            while self._idle and sum(len(m) for m in self._idle) > self.max_idle_bytes:
                self._idle.pop(0)  # unmapped once the last buffer export is released

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
