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

This path is only exercised where CUDA exists (tests marked `gpu`).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ember.store.format import CheckpointIndex
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
    chunks = plan_chunks(index, rank, cfg.chunk_bytes, cfg.verify_checksums)
    total = index.rank_nbytes(rank)
    base = torch.empty(total, dtype=torch.uint8, device=device)
    if not chunks:
        return base, 0
    # One chunk per buffer, sized by the config rather than by this checkpoint's partitions, so
    # every load with the same config reuses the same pinned buffers.
    chunk_bytes = chunk_size(index, cfg.chunk_bytes, cfg.verify_checksums)
    workers = min(cfg.reader_threads("cuda"), len(chunks))
    lanes: list[list[Chunk]] = [chunks[i::workers] for i in range(workers)]
    direct_count = [0] * workers

    with PartitionFiles(index, rank, cfg.io_mode) as files:

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
                        direct_count[i] += read_chunk(
                            c, view, files, cfg.io_mode, cfg.verify_checksums
                        )
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
    return base, sum(direct_count)


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
