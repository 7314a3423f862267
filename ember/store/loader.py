"""The loader: one rank's partition files into one allocation, handed out as named tensor views.

How a CPU load goes, and why:
- One allocation per device, an anonymous mapping advised `MADV_HUGEPAGE`: filling fresh 4 KiB
  pages costs a page fault each and caps a warm load near 4 GB/s on the reference machine;
  with 2 MiB pages the fill runs near 12 GB/s (the kernel still zeroes each page first). With
  `reuse_host_memory` (the default) the mapping comes from a pool of freed, still-mapped
  buffers (hostmem), so a process's second and later loads copy at memory speed (~19 GB/s).
- Reads go straight into that allocation (no staging copy) in `chunk_bytes` pieces from a pool
  of `threads` threads (`preadv` releases the GIL).
- `io_mode="auto"` chooses per chunk: a chunk whose pages are already in the page cache
  (mincore) is read buffered, a chunk on disk with O_DIRECT (no copy through the cache). On a
  file system without O_DIRECT (tmpfs) every chunk is read buffered.
- Sizes are always checked against the index before reading; with `verify_checksums` each
  chunk's 4 MiB blocks are hashed (xxh3-64) by the thread that read them, right after the read.

The CUDA path (ember.store.cuda_loader) reads the same chunks into pinned staging buffers and
copies them to one device allocation on side streams, overlapping reads with copies.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import xxhash

from ember.errors import CheckpointCorruptError, ConfigError
from ember.store.dtypes import BY_NAME
from ember.store.format import CheckpointIndex, PartitionEntry, open_partition, read_index
from ember.store.hostmem import HOST_POOL, alloc_host
from ember.store.pagecache import resident_pages

logger = logging.getLogger(__name__)

_IO_MODES = ("auto", "direct", "buffered")


@dataclass(frozen=True, slots=True)
class LoaderConfig:
    """How the loader reads. Defaults were measured on 2-core VMs with a virtio SSD, and on a
    16-core H200 host for CUDA (docs/store.md, docs/gpu.md)."""

    # Reader threads (O_DIRECT needs several requests in flight); None: 4 for a CPU load, 16
    # for CUDA, where each thread also copies into pinned memory (on a 16-core H200 host warm
    # loads to the GPU ran at 13.7 GB/s with 4 threads, 21.1 with 8, 27.4 with 16).
    threads: int | None = None
    chunk_bytes: int = 32 << 20  # bytes per read; rounded up to the checksum block when verifying
    # "auto" (per chunk: in the page cache -> buffered, else O_DIRECT), "direct", "buffered"
    io_mode: str = "auto"
    verify_checksums: bool = False  # hash every block as it is read (21-35% slower warm; see docs)
    # Advise 2 MiB pages for the host allocation (EMBER_HUGE_PAGES=0 turns it off by default):
    # fresh 2 MiB pages filled 2.7x faster than 4 KiB ones on one VM, but 4x slower on a VM that
    # hands free memory back to its host, where each new 2 MiB block is faulted in again (see
    # docs/store.md).
    huge_pages: bool = field(default_factory=lambda: os.environ.get("EMBER_HUGE_PAGES") != "0")
    reuse_host_memory: bool = True  # take the host allocation from hostmem.HOST_POOL
    staging_buffers: int = 2  # CUDA: pinned staging buffers (chunks in flight) per reader thread
    # CUDA: copy chunks already in memory (page cache, the node store's DRAM tier) straight from
    # their own pages, registered with the driver, instead of through a staging buffer. Off:
    # on the H200 host (a VM) registering cost more than the copy it saves (warm 18.2 GB/s vs
    # 30.3 through staging; from /dev/shm 10.1 vs 27.2).
    register_cached: bool = False

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"LoaderConfig.threads must be >= 1, got {self.threads}")
        if self.chunk_bytes < 4096 or self.chunk_bytes % 4096:
            raise ConfigError(
                f"LoaderConfig.chunk_bytes must be a positive multiple of 4096, got {self.chunk_bytes}"
            )
        if self.io_mode not in _IO_MODES:
            raise ConfigError(
                f"LoaderConfig.io_mode must be one of {_IO_MODES}, got {self.io_mode!r}"
            )
        if self.staging_buffers < 1:
            raise ConfigError(
                f"LoaderConfig.staging_buffers must be >= 1, got {self.staging_buffers}"
            )

    def reader_threads(self, device_type: str) -> int:
        if self.threads is not None:
            return self.threads
        return 16 if device_type == "cuda" else 4


@dataclass(frozen=True, slots=True)
class Chunk:
    partition: PartitionEntry
    file_offset: int
    nbytes: int
    dest_offset: int  # offset in the rank's allocation
    block_bytes: int  # the index's checksum block size


class PartitionFiles:
    """Open descriptors for one rank's partition files (buffered and, where possible, O_DIRECT),
    checked against the index sizes on open."""

    def __init__(self, index: CheckpointIndex, rank: int, io_mode: str) -> None:
        assert index.path is not None
        self.directory = index.path
        self.buffered: dict[str, int] = {}
        self.direct: dict[str, int] = {}
        try:
            for p in index.partitions_for(rank):
                path = self.directory / p.file
                self.buffered[p.file] = open_partition(path, p.nbytes)
                if io_mode != "buffered":
                    self.direct[p.file] = _open_direct(path, required=io_mode == "direct")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for fd in [*self.buffered.values(), *self.direct.values()]:
            if fd >= 0:
                os.close(fd)
        self.buffered.clear()
        self.direct.clear()

    def __enter__(self) -> PartitionFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_direct(path: Path, required: bool) -> int:
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        if required:
            raise ConfigError("io_mode='direct' but this platform has no O_DIRECT")
        return -1
    try:
        return os.open(path, os.O_RDONLY | flag)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        if required:
            raise ConfigError(
                f"{path}: the file system refuses O_DIRECT; use io_mode='auto'"
            ) from e
        return -1


def chunk_size(index: CheckpointIndex, chunk_bytes: int, verify: bool) -> int:
    """Bytes per chunk: `chunk_bytes`, rounded up to whole checksum blocks when verifying."""
    if verify:
        return -(-chunk_bytes // index.block_bytes) * index.block_bytes
    return chunk_bytes


def plan_chunks(index: CheckpointIndex, rank: int, chunk_bytes: int, verify: bool) -> list[Chunk]:
    """Every partition of `rank` cut into chunks, in file order; dest offsets concatenate the
    partitions in index order."""
    chunk_bytes = chunk_size(index, chunk_bytes, verify)
    out = []
    base = 0
    for p in index.partitions_for(rank):
        for off in range(0, p.nbytes, chunk_bytes):
            out.append(
                Chunk(p, off, min(chunk_bytes, p.nbytes - off), base + off, index.block_bytes)
            )
        base += p.nbytes
    return out


def read_chunk(
    chunk: Chunk, out: memoryview, files: PartitionFiles, io_mode: str, verify: bool
) -> bool:
    """Read `chunk` into `out` (exactly chunk.nbytes long); returns True if O_DIRECT was used."""
    name = chunk.partition.file
    fd = files.buffered[name]
    dfd = files.direct.get(name, -1)
    use_direct = dfd >= 0 and (
        io_mode == "direct" or mostly_on_disk(fd, chunk.file_offset, chunk.nbytes)
    )
    done = 0
    while done < chunk.nbytes:
        try:
            n = os.preadv(dfd if use_direct else fd, [out[done:]], chunk.file_offset + done)
        except OSError as e:
            if not use_direct or e.errno != errno.EINVAL or io_mode == "direct":
                raise
            use_direct = False  # e.g. an unaligned destination: finish buffered
            continue
        if n == 0:
            raise CheckpointCorruptError(
                files.directory / name,
                f"partition truncated while reading: ends at byte {chunk.file_offset + done}",
            )
        done += n
    if verify:
        verify_blocks(chunk, out, files.directory)
    return use_direct


def mostly_on_disk(fd: int, offset: int, nbytes: int) -> bool:
    resident, total = resident_pages(fd, offset, nbytes)
    return resident * 2 < total


def verify_blocks(chunk: Chunk, data: memoryview, directory: Path) -> None:
    """Compare each checksum block inside `chunk` (which starts on a block) with the index."""
    sums = chunk.partition.block_checksums
    block = chunk.block_bytes
    for start in range(0, chunk.nbytes, block):
        number = (chunk.file_offset + start) // block
        got = xxhash.xxh3_64_hexdigest(data[start : start + block])
        if got != sums[number]:
            end = min(chunk.file_offset + start + block, chunk.partition.nbytes)
            raise CheckpointCorruptError(
                directory / chunk.partition.file,
                f"checksum mismatch in bytes [{chunk.file_offset + start}, {end}): "
                f"xxh3_64 {got}, index says {sums[number]}",
            )


def tensors_from_buffer(
    index: CheckpointIndex, rank: int, base: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Name -> view into `base`, a uint8 tensor (any device) holding `rank`'s partitions back to
    back in index order. Tied names get views of the same bytes."""
    starts: dict[str, int] = {}
    pos = 0
    for p in index.partitions_for(rank):
        starts[p.file] = pos
        pos += p.nbytes
    if base.numel() < pos:
        raise ConfigError(f"buffer of {base.numel()} bytes is smaller than rank {rank}'s {pos}")
    out: dict[str, torch.Tensor] = {}
    for t in index.tensors_for(rank):
        start = starts[t.partition] + t.offset
        raw = base[start : start + t.nbytes]
        out[t.name] = raw.view(BY_NAME[t.dtype].torch_dtype).view(t.shape)
    return out


def load(
    path: str | Path,
    device: str | torch.device = "cpu",
    rank: int = 0,
    *,
    config: LoaderConfig | None = None,
) -> dict[str, torch.Tensor]:
    """Load tensor-parallel rank `rank` of the checkpoint at `path` onto `device`.

    Returns the original HF names mapped to views into one allocation on `device`. A weight
    stored once under several names (tied embeddings) comes back under each of them, as views
    of the same bytes. Raises a CheckpointError subclass naming the file for any bad input.
    """
    cfg = config or LoaderConfig()
    index = read_index(path)
    if not 0 <= rank < index.tp:
        raise ConfigError(f"rank {rank} is outside this checkpoint's tp={index.tp} ranks")
    dev = torch.device(device)
    t0 = time.perf_counter()
    if dev.type == "cuda":
        from ember.store.cuda_loader import load_cuda

        base, direct = load_cuda(index, rank, dev, cfg)
    elif dev.type == "cpu":
        base, direct = _load_cpu(index, rank, cfg)
    else:
        raise ConfigError(f"device {dev} is not supported by the loader; use cpu or cuda")
    out = tensors_from_buffer(index, rank, base)
    dt = time.perf_counter() - t0
    nbytes = base.numel()
    logger.info(
        "loaded path=%s rank=%d device=%s bytes=%d seconds=%.3f gbps=%.2f direct_chunks=%d",
        path, rank, dev, nbytes, dt, nbytes / max(dt, 1e-9) / 1e9, direct,
    )  # fmt: skip
    return out


def _load_cpu(index: CheckpointIndex, rank: int, cfg: LoaderConfig) -> tuple[torch.Tensor, int]:
    chunks = plan_chunks(index, rank, cfg.chunk_bytes, cfg.verify_checksums)
    with PartitionFiles(index, rank, cfg.io_mode) as files:
        pool = HOST_POOL if cfg.reuse_host_memory else None
        base = alloc_host(index.rank_nbytes(rank), cfg.huge_pages, pool)
        if not chunks:
            return base, 0
        mv = base.numpy().data

        def one(c: Chunk) -> bool:
            view = mv[c.dest_offset : c.dest_offset + c.nbytes]
            return read_chunk(c, view, files, cfg.io_mode, cfg.verify_checksums)

        direct = sum(run_all(one, chunks, cfg.reader_threads("cpu")))
    return base, direct


def run_all(fn: Callable[[Chunk], bool], chunks: list[Chunk], threads: int) -> Iterator[bool]:
    """Run fn over chunks on `threads` threads; the first error cancels the rest and is raised."""
    if threads == 1 or len(chunks) == 1:
        return iter([fn(c) for c in chunks])
    with ThreadPoolExecutor(max_workers=min(threads, len(chunks))) as pool:
        futures = [pool.submit(fn, c) for c in chunks]
        try:
            return iter([f.result() for f in futures])
        except BaseException:
            for f in futures:
                f.cancel()
            raise
