"""The CUDA load path: disk -> pinned staging buffer -> device, overlapped.

Each reader thread owns `staging_buffers` pinned host buffers of `chunk_bytes` and one CUDA
stream. For each of its chunks it waits until the buffer it is about to reuse has finished its
previous host-to-device copy (an event), reads the chunk into it (O_DIRECT or buffered, as on
the CPU path; checksums checked here when asked), then queues the copy into the one device
allocation on its stream and moves on: while one buffer is copying, the next is being read.
Pinned buffers are kept per process and reused by later loads, since pinning costs more than
the copies it speeds up.

With `register_cached`, a chunk already in memory (the page cache, or the node store's DRAM
tier on a tmpfs) skips the staging copy: its pages are mapped read-only, registered with the
driver (cudaHostRegister) and copied to the device by DMA straight from where they are;
unregistered and unmapped once the copy is done. The host's memory-copy bandwidth (a staging
copy reads and writes every byte) no longer bounds the load; pinning the pages costs instead.
If the driver refuses the registration, the load goes on through staging (logged once).

`pin_checkpoint(path)` does the registration once, ahead of the loads, and keeps it: every
partition file of the checkpoint is mapped whole and registered, and later loads of those files
copy straight from the registered pages by DMA, on a few streams, with no reader threads and no
staging copy, so they run near the pinned host-to-device bandwidth. This is what a process that
expects to load a checkpoint does before it is asked to (a pre-started GPU worker pins the
node store's DRAM tier: ServerlessLLM keeps its DRAM pool pinned the same way). A pin holds the
file's pages (the page cache's or the tmpfs's) in memory until `unpin_checkpoint`; a file that
was replaced or deleted since it was pinned is not used and its pin is dropped by the next
load or pin (`release_stale_pins`) once no load is copying from it.

This path is only exercised where CUDA exists (tests marked `gpu`).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ember.errors import ConfigError
from ember.store.format import CheckpointIndex, read_index
from ember.store.loader import (
    Chunk,
    LoaderConfig,
    PartitionFiles,
    chunk_size,
    mostly_on_disk,
    plan_chunks,
    read_chunk,
    verify_blocks,
)
from ember.store.pagecache import map_range, unmap_range

logger = logging.getLogger(__name__)

_staging_lock = threading.Lock()
_staging_free: dict[int, list[torch.Tensor]] = {}  # chunk_bytes -> idle pinned buffers


def _take_staging(nbytes: int, count: int) -> list[torch.Tensor]:
    with _staging_lock:
        free = _staging_free.setdefault(nbytes, [])
        got = [free.pop() for _ in range(min(count, len(free)))]
    while len(got) < count:
        got.append(torch.empty(nbytes, dtype=torch.uint8, pin_memory=True))
    return got


def _give_staging(nbytes: int, bufs: list[torch.Tensor]) -> None:
    with _staging_lock:
        _staging_free.setdefault(nbytes, []).extend(bufs)


def reserve_staging(cfg: LoaderConfig) -> None:
    """Pin the staging buffers a load with `cfg` uses, ahead of time (a pre-started worker does
    this, so a cold start does not pay for pinning)."""
    count = cfg.reader_threads("cuda") * cfg.staging_buffers
    _give_staging(cfg.chunk_bytes, _take_staging(cfg.chunk_bytes, count))


def load_cuda(
    index: CheckpointIndex, rank: int, device: torch.device, cfg: LoaderConfig
) -> tuple[torch.Tensor, int]:
    """Read `rank`'s partitions into one uint8 allocation on `device`; returns it and the number
    of chunks read with O_DIRECT."""
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    release_stale_pins()
    chunks = plan_chunks(index, rank, cfg.chunk_bytes, cfg.verify_checksums)
    total = index.rank_nbytes(rank)
    base = torch.empty(total, dtype=torch.uint8, device=device)
    if not chunks:
        return base, 0
    with PartitionFiles(index, rank, cfg.io_mode) as files:
        pins = _take_pins(files)
        try:
            pinned = [c for c in chunks if c.partition.file in pins]
            rest = [c for c in chunks if c.partition.file not in pins]
            if pinned:
                _copy_pinned(base, pinned, pins, files, cfg)
            direct = _load_staged(base, rest, index, files, device, cfg) if rest else 0
        finally:
            _give_pins(pins.values())
    return base, direct


def _load_staged(
    base: torch.Tensor,
    chunks: list[Chunk],
    index: CheckpointIndex,
    files: PartitionFiles,
    device: torch.device,
    cfg: LoaderConfig,
) -> int:
    """`chunks` read by reader threads into pinned staging buffers and copied on their streams;
    returns the number read with O_DIRECT."""
    # One chunk per buffer, sized by the config rather than by this checkpoint's partitions, so
    # every load with the same config reuses the same pinned buffers.
    chunk_bytes = chunk_size(index, cfg.chunk_bytes, cfg.verify_checksums)
    workers = min(cfg.reader_threads("cuda"), len(chunks))
    lanes: list[list[Chunk]] = [chunks[i::workers] for i in range(workers)]
    direct_count = [0] * workers

    def lane(i: int) -> None:
        with torch.cuda.device(device):
            stream = torch.cuda.Stream(device)
            bufs = _take_staging(chunk_bytes, cfg.staging_buffers)
            events: list[torch.cuda.Event | None] = [None] * len(bufs)
            in_flight: list[_Registered] = []  # mapped chunks whose copy may still run
            try:
                n = 0
                for c in lanes[i]:
                    dst = base[c.dest_offset : c.dest_offset + c.nbytes]
                    reg = _register(c, files, cfg) if cfg.register_cached else None
                    if reg is not None:
                        with torch.cuda.stream(stream):
                            dst.copy_(reg.host, non_blocking=True)
                            reg.done.record(stream)
                        in_flight.append(reg)
                        if len(in_flight) > cfg.staging_buffers:
                            in_flight.pop(0).release()
                        continue
                    j = n % len(bufs)
                    n += 1
                    ev = events[j]
                    if ev is not None:
                        ev.synchronize()  # the buffer's previous copy is done
                    host = bufs[j][: c.nbytes]
                    view = host.numpy().data
                    direct_count[i] += read_chunk(c, view, files, cfg.io_mode, cfg.verify_checksums)
                    with torch.cuda.stream(stream):
                        dst.copy_(host, non_blocking=True)
                        done = torch.cuda.Event()
                        done.record(stream)
                    events[j] = done
            finally:
                stream.synchronize()
                for reg in in_flight:
                    reg.release()
                _give_staging(chunk_bytes, bufs)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for f in [pool.submit(lane, i) for i in range(workers)]:
            f.result()  # re-raises the first reader error
    return sum(direct_count)


# --- chunks copied from their own pages (register_cached) ---------------------------------------

_HOST_REGISTER_READ_ONLY = 0x08  # cudaHostRegisterReadOnly: the device only reads the pages
_register_error: str | None = None  # set once registration failed here: staging from then on


@dataclass(slots=True)
class _Registered:
    """A chunk's file pages mapped, registered with the driver, and viewed as a CPU tensor."""

    addr: int
    length: int
    host: torch.Tensor
    done: torch.cuda.Event

    def release(self) -> None:
        """After the copy: unregister and unmap."""
        self.done.synchronize()
        torch.cuda.cudart().cudaHostUnregister(self.addr)
        unmap_range(self.addr, self.length)


def _register(c: Chunk, files: PartitionFiles, cfg: LoaderConfig) -> _Registered | None:
    """Map chunk `c` from the page cache (or a tmpfs) and register its pages for DMA; None when
    the chunk is mostly on disk (O_DIRECT into staging is the better read) or registration is
    refused here (logged once; staging from then on)."""
    global _register_error
    if _register_error is not None:
        return None
    fd = files.buffered[c.partition.file]
    if mostly_on_disk(fd, c.file_offset, c.nbytes):
        return None
    length = -(-c.nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
    addr = map_range(fd, c.file_offset, length)
    pages = (ctypes.c_uint8 * c.nbytes).from_address(addr)
    try:
        if cfg.verify_checksums:
            verify_blocks(c, memoryview(pages), files.directory)
        ret = torch.cuda.cudart().cudaHostRegister(addr, length, _HOST_REGISTER_READ_ONLY)
    except BaseException:
        unmap_range(addr, length)
        raise
    if int(ret) != 0:
        unmap_range(addr, length)
        try:
            _register_error = f"{int(ret)} {torch.cuda.cudart().cudaGetErrorString(ret)}"
        except (TypeError, RuntimeError):
            _register_error = f"cudaError {int(ret)}"
        _clear_last_cuda_error()
        logger.warning(
            "cuda_host_register refused (%s): loading through pinned staging buffers",
            _register_error,
        )
        return None
    return _Registered(addr, length, torch.frombuffer(pages, dtype=torch.uint8), torch.cuda.Event())


def _clear_last_cuda_error() -> None:
    """A refused cudaHostRegister leaves this thread's last-error set, which the next kernel
    launch check would report as its own: reset it through the runtime torch loaded."""
    try:
        with open("/proc/self/maps") as maps:
            path = next(ln.split()[-1] for ln in maps if "libcudart.so" in ln)
        ctypes.CDLL(path).cudaGetLastError()
    except (OSError, StopIteration):
        logger.warning("could not reset the CUDA runtime's last error after a refused register")


# --- checkpoints pinned ahead (pin_checkpoint) --------------------------------------------------

_PIN_STREAMS = 4  # copies from pinned files in flight at once
_PIN_COPY_BYTES = 256 << 20  # bytes per copy from a pinned file


@dataclass(slots=True)
class _Pin:
    """One partition file mapped whole, registered with the driver, viewed as a CPU tensor."""

    ident: tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns when pinned
    addr: int
    length: int
    host: torch.Tensor
    users: int = 0  # loads copying from it now
    stale: bool = False  # out of `_pins` (replaced, deleted, unpinned): released at users 0

    def release(self) -> None:
        torch.cuda.cudart().cudaHostUnregister(self.addr)
        unmap_range(self.addr, self.length)


_pins_lock = threading.Lock()
_pins: dict[str, _Pin] = {}  # real path of a partition file -> its pin
pinned_bytes_copied = 0  # bytes this process copied from pinned files (what tests check)


def _ident(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def pin_checkpoint(path: str | Path, rank: int | None = None) -> int:
    """Register the partition files of the checkpoint at `path` (every rank's, or `rank`'s) with
    the CUDA driver and keep them registered, so this process's later loads of them to a GPU
    copy by DMA straight from their pages. Returns the bytes newly pinned (files pinned already
    are skipped). Raises `ConfigError` if the driver refuses the registration."""
    if not torch.cuda.is_available():
        raise ConfigError("pinning a checkpoint for GPU loads needs CUDA, and none is available")
    release_stale_pins()
    index = read_index(path)
    assert index.path is not None
    added = 0
    for part in index.partitions:
        if rank is not None and part.rank != rank:
            continue
        real = os.path.realpath(index.path / part.file)
        fd = os.open(real, os.O_RDONLY)
        try:
            ident = _ident(os.fstat(fd))
            with _pins_lock:
                old = _pins.get(real)
                if old is not None and old.ident == ident:
                    continue
            length = -(-ident[2] // mmap.PAGESIZE) * mmap.PAGESIZE
            if length == 0:
                continue
            addr = map_range(fd, 0, length)
        finally:
            os.close(fd)
        ret = int(torch.cuda.cudart().cudaHostRegister(addr, length, _HOST_REGISTER_READ_ONLY))
        if ret != 0:
            unmap_range(addr, length)
            _clear_last_cuda_error()
            raise ConfigError(f"{real}: the CUDA driver refused to pin the file (cudaError {ret})")
        pages = (ctypes.c_uint8 * ident[2]).from_address(addr)
        pin = _Pin(ident, addr, length, torch.frombuffer(pages, dtype=torch.uint8))
        with _pins_lock:
            old = _pins.pop(real, None)
            _pins[real] = pin
        if old is not None:
            _retire(old)
        added += ident[2]
    logger.info("pinned %s: %.2f GB newly registered", path, added / 1e9)
    return added


def unpin_checkpoint(path: str | Path | None = None) -> int:
    """Drop the pins of the checkpoint at `path` (every pin if None); returns how many. A pin a
    load is copying from is released when that load ends."""
    prefix = None if path is None else os.path.realpath(path) + os.sep
    with _pins_lock:
        gone = [k for k in _pins if prefix is None or k.startswith(prefix)]
        retired = [_pins.pop(k) for k in gone]
    for pin in retired:
        _retire(pin)
    return len(retired)


def pinned_bytes() -> int:
    """Bytes of partition files this process holds pinned."""
    with _pins_lock:
        return sum(p.ident[2] for p in _pins.values())


def release_stale_pins() -> int:
    """Drop pins whose file was deleted or replaced since it was pinned (the node store evicted
    or re-fetched it); returns how many."""
    with _pins_lock:
        paths = list(_pins)
    stale = []
    for real in paths:
        try:
            ident = _ident(os.stat(real))
        except FileNotFoundError:
            ident = None
        with _pins_lock:
            pin = _pins.get(real)
            if pin is not None and pin.ident != ident:
                stale.append(_pins.pop(real))
    for pin in stale:
        _retire(pin)
    return len(stale)


def _retire(pin: _Pin) -> None:
    with _pins_lock:
        pin.stale = True
        if pin.users:
            return  # the last load using it releases it
    pin.release()


def _take_pins(files: PartitionFiles) -> dict[str, _Pin]:
    """The pins this load can copy from, by partition file name: the file it opened is the one
    that was pinned (same inode, size and modification time)."""
    if not _pins:
        return {}
    got = {}
    for name, fd in files.buffered.items():
        real = os.path.realpath(files.directory / name)
        ident = _ident(os.fstat(fd))
        with _pins_lock:
            pin = _pins.get(real)
            if pin is not None and pin.ident == ident:
                pin.users += 1
                got[name] = pin
    return got


def _give_pins(pins: Iterable[_Pin]) -> None:
    done = []
    with _pins_lock:
        for pin in pins:
            pin.users -= 1
            if pin.stale and pin.users == 0:
                done.append(pin)
    for pin in done:
        pin.release()


def _copy_pinned(
    base: torch.Tensor,
    chunks: list[Chunk],
    pins: dict[str, _Pin],
    files: PartitionFiles,
    cfg: LoaderConfig,
) -> None:
    """DMA `chunks` from their pinned files into `base` on a few streams, in pieces of up to
    `_PIN_COPY_BYTES` (adjacent chunks merged); with checksums on, each chunk's blocks are
    hashed from the pinned pages before its copy is queued (earlier copies run meanwhile).
    Returns once every copy is done."""
    pieces: list[tuple[_Pin, int, int, int, Chunk]] = []  # pin, file offset, dest, bytes, first
    for c in chunks:
        pin = pins[c.partition.file]
        if pieces and not cfg.verify_checksums:
            p, off, dest, n, first = pieces[-1]
            if (
                p is pin
                and off + n == c.file_offset
                and dest + n == c.dest_offset
                and n + c.nbytes <= _PIN_COPY_BYTES
            ):
                pieces[-1] = (pin, off, dest, n + c.nbytes, first)
                continue
        pieces.append((pin, c.file_offset, c.dest_offset, c.nbytes, c))
    device = base.device
    with torch.cuda.device(device):
        streams = [torch.cuda.Stream(device) for _ in range(min(_PIN_STREAMS, len(pieces)))]
        try:
            for k, (pin, off, dest, n, c) in enumerate(pieces):
                if cfg.verify_checksums:  # then each piece is one chunk
                    view = (ctypes.c_uint8 * n).from_address(pin.addr + off)
                    verify_blocks(c, memoryview(view), files.directory)
                with torch.cuda.stream(streams[k % len(streams)]):
                    base[dest : dest + n].copy_(pin.host[off : off + n], non_blocking=True)
        finally:
            for st in streams:
                st.synchronize()
    global pinned_bytes_copied
    with _pins_lock:
        pinned_bytes_copied += sum(n for _, _, _, n, _ in pieces)
