"""Full integrity check of a checkpoint: every partition's size, every block checksum and every
tensor checksum, read once, sequentially, through a small buffer (`ember verify`).

The loader checks sizes on every load but hashes only when asked (`verify_checksums`), because
hashing costs about a third of a warm load's speed. This is the check to run when bytes arrive
from somewhere that could have damaged them: after copying or downloading a checkpoint, before
publishing one, or when a load gave suspicious results.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import xxhash

from ember.errors import CheckpointCorruptError
from ember.store.format import CheckpointIndex, TensorEntry, read_index
from ember.store.loader import Chunk, PartitionFiles, verify_blocks

logger = logging.getLogger(__name__)

_BUFFER_BYTES = 16 << 20


@dataclass(frozen=True, slots=True)
class VerifyReport:
    path: Path
    partitions: int
    tensors: int
    nbytes: int
    seconds: float


def verify(path: str | Path) -> VerifyReport:
    """Check every byte of the checkpoint at `path`; raises CheckpointCorruptError (naming the
    file and byte range or tensor) at the first mismatch."""
    index = read_index(path)
    assert index.path is not None
    t0 = time.perf_counter()
    nbytes = 0
    buf = bytearray(max(_BUFFER_BYTES, index.block_bytes))
    step = len(buf) // index.block_bytes * index.block_bytes
    for rank in range(index.tp):
        with PartitionFiles(index, rank, "buffered") as files:
            tensors = [t for t in index.tensors_for(rank) if t.tied_to is None]
            for p in index.partitions_for(rank):
                mine = sorted((t for t in tensors if t.partition == p.file), key=lambda t: t.offset)
                hashers = [xxhash.xxh3_64() for _ in mine]
                for off in range(0, p.nbytes, step):
                    n = min(step, p.nbytes - off)
                    view = memoryview(buf)[:n]
                    _read_exact(files.buffered[p.file], view, off, index.path / p.file)
                    verify_blocks(Chunk(p, off, n, 0, index.block_bytes), view, index.path)
                    _feed(mine, hashers, view, off)
                    nbytes += n
                for t, h in zip(mine, hashers, strict=True):
                    if h.hexdigest() != t.checksum:
                        raise CheckpointCorruptError(
                            index.path / p.file,
                            f"tensor {t.name}: xxh3_64 {h.hexdigest()}, index says {t.checksum}",
                        )
    _check_ties(index)
    report = VerifyReport(
        index.path, len(index.partitions), len(index.tensors), nbytes, time.perf_counter() - t0
    )
    logger.info("verified path=%s bytes=%d seconds=%.2f", index.path, nbytes, report.seconds)
    return report


def verify_mapped(path: str | Path) -> int:
    """Every block checksum of every partition (all ranks) of the checkpoint at `path`, read
    through read-only shared mappings: bytes in the page cache are hashed where they lie (no
    copy), bytes on disk are read in first by `pagecache.populate`'s threads, in 2 MiB folios,
    so an engine that maps the files next finds them cached. For a local tier's copy about to
    be mapped by an engine. Returns the bytes checked; raises `CheckpointCorruptError` naming the
    file and byte range (or the size) at the first mismatch."""
    import ctypes

    from ember.store.format import open_partition
    from ember.store.pagecache import map_range, populate, prefer_huge_pages, unmap_range

    index = read_index(path)
    assert index.path is not None
    nbytes = 0
    for p in index.partitions:
        fd = open_partition(index.path / p.file, p.nbytes)  # size checked
        try:
            if p.nbytes == 0:
                continue
            addr = map_range(fd, 0, p.nbytes)
        finally:
            os.close(fd)
        try:
            prefer_huge_pages(addr, p.nbytes)
            populate(addr, p.nbytes)
            with memoryview((ctypes.c_char * p.nbytes).from_address(addr)).cast("B") as view:
                verify_blocks(Chunk(p, 0, p.nbytes, 0, index.block_bytes), view, index.path)
        finally:
            unmap_range(addr, p.nbytes)
        nbytes += p.nbytes
    return nbytes


def _read_exact(fd: int, view: memoryview, offset: int, path: Path) -> None:
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise CheckpointCorruptError(path, f"partition truncated at byte {offset + done}")
        done += got


def _feed(
    tensors: list[TensorEntry], hashers: list[xxhash.xxh3_64], view: memoryview, at: int
) -> None:
    end = at + len(view)
    for t, h in zip(tensors, hashers, strict=True):
        lo, hi = max(t.offset, at), min(t.offset + t.nbytes, end)
        if lo < hi:
            h.update(view[lo - at : hi - at])


def _check_ties(index: CheckpointIndex) -> None:
    stored = {(t.name, t.rank): t for t in index.tensors if t.tied_to is None}
    for t in index.tensors:
        if t.tied_to is None:
            continue
        target = stored.get((t.tied_to, t.rank))
        if target is None or (target.partition, target.offset, target.nbytes) != (
            t.partition,
            t.offset,
            t.nbytes,
        ):
            raise CheckpointCorruptError(
                index.path or "", f"tensor {t.name} is tied to {t.tied_to}, which does not match"
            )
