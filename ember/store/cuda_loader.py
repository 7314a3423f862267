"""The CUDA load path: disk -> pinned staging buffer -> device, overlapped.

Each reader thread owns `staging_buffers` pinned host buffers of `chunk_bytes` and one CUDA
stream. For each of its chunks it waits until the buffer it is about to reuse has finished its
previous host-to-device copy (an event), reads the chunk into it (O_DIRECT or buffered, as on
the CPU path; checksums checked here when asked), then queues the copy into the one device
allocation on its stream and moves on: while one buffer is copying, the next is being read.
Pinned buffers are kept per process and reused by later loads, since pinning costs more than
the copies it speeds up.

This path is only exercised where CUDA exists (tests marked `gpu`).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from ember.store.format import CheckpointIndex
from ember.store.loader import (
    Chunk,
    LoaderConfig,
    PartitionFiles,
    chunk_size,
    plan_chunks,
    read_chunk,
)

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
    count = cfg.threads * cfg.staging_buffers
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
    workers = min(cfg.threads, len(chunks))
    lanes: list[list[Chunk]] = [chunks[i::workers] for i in range(workers)]
    direct_count = [0] * workers

    with PartitionFiles(index, rank, cfg.io_mode) as files:

        def lane(i: int) -> None:
            with torch.cuda.device(device):
                stream = torch.cuda.Stream(device)
                bufs = _take_staging(chunk_bytes, cfg.staging_buffers)
                events: list[torch.cuda.Event | None] = [None] * len(bufs)
                try:
                    for n, c in enumerate(lanes[i]):
                        j = n % len(bufs)
                        ev = events[j]
                        if ev is not None:
                            ev.synchronize()  # the buffer's previous copy is done
                        host = bufs[j][: c.nbytes]
                        view = host.numpy().data
                        direct_count[i] += read_chunk(
                            c, view, files, cfg.io_mode, cfg.verify_checksums
                        )
                        with torch.cuda.stream(stream):
                            base[c.dest_offset : c.dest_offset + c.nbytes].copy_(
                                host, non_blocking=True
                            )
                            done = torch.cuda.Event()
                            done.record(stream)
                        events[j] = done
                    stream.synchronize()
                finally:
                    stream.synchronize()
                    _give_staging(chunk_bytes, bufs)

        with ThreadPoolExecutor(max_workers=workers) as pool:
            for f in [pool.submit(lane, i) for i in range(workers)]:
                f.result()  # re-raises the first reader error
    return base, sum(direct_count)
