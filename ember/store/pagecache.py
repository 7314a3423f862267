"""The kernel page cache seen from user space: which bytes of a file are resident (mincore), and
dropping a file from it (posix_fadvise DONTNEED).

The loader asks `resident_fraction` before each chunk to choose its read path: bytes already in
the page cache are copied with a buffered read (memory speed), bytes on disk are read with
O_DIRECT (no double copy, no cache pollution). Benchmarks use `evict` and check it worked with
`resident_fraction`, since DONTNEED is only advice (dirty or mapped pages stay).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
from pathlib import Path

_PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MAP_FAILED = ctypes.c_void_p(-1).value
_MADV_POPULATE_READ = 22  # Linux 5.14+; EINVAL before


def map_range(fd: int, offset: int, length: int) -> int:
    """Map `length` bytes of `fd` from `offset` (a multiple of the page size) read-only and
    shared: the page cache's own pages, no copy. Returns the address; see `unmap_range`."""
    addr = _libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, offset)
    if addr is None or addr == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap failed: {os.strerror(err)}")
    return int(addr)


def unmap_range(addr: int, length: int) -> None:
    _libc.munmap(addr, length)


def prefer_huge_pages(addr: int, length: int) -> None:
    """MADV_HUGEPAGE on the mapping [addr, addr+length) of a file: bytes it reads from disk
    enter the page cache as 2 MiB folios, read ahead 4 MiB per fault, and are mapped one
    page-table entry per 2 MiB, now and by every later mapping of the file (a 1.1B checkpoint:
    0.02 s to map from the page cache instead of 0.15 s). Bytes already cached keep the folios
    they have. A no-op where THP is off (the call's error is ignored)."""
    _libc.madvise(addr, length, getattr(mmap, "MADV_HUGEPAGE", 14))


def resident_pages(fd: int, offset: int, length: int) -> tuple[int, int]:
    """(resident, total) 4 KiB pages of `fd` in [offset, offset+length); (0, 0) if empty."""
    start = offset - offset % _PAGE
    length += offset - start
    if length <= 0:
        return (0, 0)
    addr = map_range(fd, start, length)
    try:
        pages = (length + _PAGE - 1) // _PAGE
        vec = ctypes.create_string_buffer(pages)
        if _libc.mincore(addr, length, vec) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mincore failed: {os.strerror(err)}")
        resident = pages - vec.raw[:pages].count(b"\x00")
        # mincore sets bit 0 for a resident page; other bits are reserved and cleared today.
        return (resident, pages)
    finally:
        _libc.munmap(addr, length)


def populate(addr: int, length: int, threads: int = 8, piece: int = 32 << 20) -> bool:
    """Fault in the pages of the mapping [addr, addr+length) for reading, `threads` pieces at a
    time (ctypes drops the GIL): bytes in the page cache are mapped, bytes on disk are read in
    with the kernel's readahead. Done ahead, this spares the first use of the mapping a page
    fault per page. Eight threads: on a mapping advised MADV_HUGEPAGE whose file is on disk,
    each fault waits for a 4 MiB read, and eight keep a 2-core machine's disk at 4.0 GB/s where
    four reached 2.1 (1 GB partition, evicted). False (and nothing done) on a kernel without
    MADV_POPULATE_READ."""
    from concurrent.futures import ThreadPoolExecutor

    start = addr - addr % _PAGE
    length += addr - start
    pieces = [(a, min(piece, start + length - a)) for a in range(start, start + length, piece)]

    def one(p: tuple[int, int]) -> int:
        return 0 if _libc.madvise(p[0], p[1], _MADV_POPULATE_READ) == 0 else ctypes.get_errno()

    if not pieces:
        return True
    if one(pieces[0]) == errno.EINVAL:
        return False
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        errs = [e for e in pool.map(one, pieces[1:]) if e]
    if errs:
        raise OSError(errs[0], f"madvise(MADV_POPULATE_READ) failed: {os.strerror(errs[0])}")
    return True


def resident_fraction(path: str | Path, offset: int = 0, length: int | None = None) -> float:
    """Share of the file's pages in [offset, offset+length) held in the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if length is None:
            length = os.fstat(fd).st_size - offset
        resident, total = resident_pages(fd, offset, length)
        return resident / total if total else 1.0
    finally:
        os.close(fd)


def evict(path: str | Path) -> float:
    """Ask the kernel to drop the file from the page cache; returns the share still resident."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)  # dirty pages cannot be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        size = os.fstat(fd).st_size
        resident, total = resident_pages(fd, 0, size)
        return resident / total if total else 0.0
    finally:
        os.close(fd)
