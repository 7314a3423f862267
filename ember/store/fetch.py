"""The fetch pipeline: one checkpoint streamed chunk by chunk from a source (S3 or a local
directory) into one or more tier directories at once, every chunk verified before it counts.

Each chunk (a whole number of the index's 4 MiB checksum blocks) is read by one of `threads`
workers, hashed against the index's block checksums, then written to every sink (e.g. the SSD
tier's and the DRAM tier's `.fetching/<key>/` files) before its blocks are marked done in the
progress file. So remote -> SSD -> DRAM is one pass, not one tier after another, and a reader
mapping the DRAM files can use a tensor as soon as the blocks under it are marked.

Progress file (`.progress` in the first sink): one byte per checksum block, partitions in index
order; 1 means "written and verified". It is only ever trusted by readers of a fetch still in
progress; a finished fetch is an atomic rename of the whole directory (see `tiers`).

Resume: before fetching a chunk from the source, a `resume` directory (the SSD tier's partial
copy left by an interrupted fetch) is read and hashed; blocks whose checksums match are reused,
so an interrupted fetch costs only what it had not yet received, and nothing unverified counts.
"""

from __future__ import annotations

import logging
import mmap
import os
import shutil
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import xxhash

from ember.errors import CheckpointCorruptError, ConfigError
from ember.store.format import INDEX_FILE, CheckpointIndex, PartitionEntry
from ember.store.remote import RemoteStore, S3Url

logger = logging.getLogger(__name__)

PROGRESS_FILE = ".progress"


class ChunkSource(Protocol):
    """Where a checkpoint's bytes come from."""

    name: str  # shown in errors: "s3://bucket/prefix" or a directory

    def extra_files(self) -> list[str]: ...
    def read_file(self, name: str) -> bytes: ...
    def read(self, file: str, offset: int, nbytes: int, out: memoryview) -> None: ...


class RemoteSource:
    def __init__(self, store: RemoteStore, url: S3Url) -> None:
        self.store, self.url, self.name = store, url, str(url)

    def extra_files(self) -> list[str]:
        return sorted(n for n in self.store.list_names(self.url) if not _is_partition(n))

    def read_file(self, name: str) -> bytes:
        return self.store.get_bytes(self.url, name)

    def read(self, file: str, offset: int, nbytes: int, out: memoryview) -> None:
        self.store.get_range(self.url, file, offset, nbytes, out)


class LocalSource:
    def __init__(self, directory: Path) -> None:
        self.directory, self.name = directory, str(directory)

    def extra_files(self) -> list[str]:
        return sorted(
            p.name for p in self.directory.iterdir() if p.is_file() and not _is_partition(p.name)
        )

    def read_file(self, name: str) -> bytes:
        return (self.directory / name).read_bytes()

    def read(self, file: str, offset: int, nbytes: int, out: memoryview) -> None:
        with open(self.directory / file, "rb", buffering=0) as f:
            done = 0
            while done < nbytes:
                n = os.preadv(f.fileno(), [out[done:nbytes]], offset + done)
                if n == 0:
                    raise CheckpointCorruptError(
                        self.directory / file, f"truncated: ends at byte {offset + done}"
                    )
                done += n


def _is_partition(name: str) -> bool:
    return name.startswith("rank") and name.endswith(".bin")


@dataclass(frozen=True, slots=True)
class ChunkTask:
    partition: PartitionEntry
    offset: int
    nbytes: int
    first_block: int  # index of its first block in the progress file


@dataclass(frozen=True, slots=True)
class FetchStats:
    nbytes: int
    from_source_bytes: int
    reused_bytes: int
    seconds: float


def progress_layout(index: CheckpointIndex) -> dict[str, int]:
    """Partition file -> index of its first block in the progress file."""
    out, pos = {}, 0
    for p in index.partitions:
        out[p.file] = pos
        pos += len(p.block_checksums)
    return out


def plan(index: CheckpointIndex, chunk_bytes: int) -> list[ChunkTask]:
    if chunk_bytes % index.block_bytes:
        raise ConfigError(
            f"chunk_bytes {chunk_bytes} must be a multiple of the index block {index.block_bytes}"
        )
    first = progress_layout(index)
    return [
        ChunkTask(
            p, off, min(chunk_bytes, p.nbytes - off), first[p.file] + off // index.block_bytes
        )
        for p in index.partitions
        for off in range(0, p.nbytes, chunk_bytes)
    ]


def bad_block(task: ChunkTask, data: memoryview, block_bytes: int) -> tuple[int, str] | None:
    """(offset, checksum) of the first block in `data` that does not match the index."""
    sums = task.partition.block_checksums
    for start in range(0, task.nbytes, block_bytes):
        got = xxhash.xxh3_64_hexdigest(data[start : start + block_bytes])
        if got != sums[(task.offset + start) // block_bytes]:
            return task.offset + start, got
    return None


def prepare_sinks(
    index_bytes: bytes, index: CheckpointIndex, source: ChunkSource, sinks: Sequence[Path]
) -> None:
    """Create each sink directory with the index, the small files and zero-length-then-sized
    partition files, plus the progress file in the first sink. A sink already holding the same
    index (an interrupted fetch) keeps its partition bytes for resume."""
    extras = {n: source.read_file(n) for n in source.extra_files() if n != INDEX_FILE}
    blocks = sum(len(p.block_checksums) for p in index.partitions)
    for i, d in enumerate(sinks):
        old = d / INDEX_FILE
        if d.exists() and (not old.is_file() or old.read_bytes() != index_bytes):
            shutil.rmtree(d)  # another checkpoint's leftovers: restart cleanly
        d.mkdir(parents=True, exist_ok=True)
        for name, data in extras.items():
            (d / name).write_bytes(data)
        for p in index.partitions:
            with open(d / p.file, "ab") as f:
                f.truncate(p.nbytes)
        if i == 0:
            (d / PROGRESS_FILE).write_bytes(bytes(blocks))
        (d / INDEX_FILE).write_bytes(index_bytes)


def run_fetch(
    index: CheckpointIndex,
    source: ChunkSource,
    sinks: Sequence[Path],
    *,
    resume: Path | None,
    chunk_bytes: int,
    threads: int,
) -> FetchStats:
    """Stream every partition from `source` into every sink directory (prepared by
    `prepare_sinks`), verifying each chunk; raises CheckpointCorruptError naming the source
    object on the first mismatch. The sinks' files are fsynced before returning."""
    t0 = time.perf_counter()
    tasks = plan(index, chunk_bytes)
    fds = [{p.file: os.open(d / p.file, os.O_RDWR) for p in index.partitions} for d in sinks]
    resume_fds = (
        {p.file: os.open(resume / p.file, os.O_RDONLY) for p in index.partitions}
        if resume is not None and (resume / INDEX_FILE).is_file()
        else {}
    )
    progress_fd = os.open(sinks[0] / PROGRESS_FILE, os.O_RDWR)
    progress = mmap.mmap(progress_fd, 0)
    counts = {"source": 0, "reused": 0}
    lock = threading.Lock()
    local = threading.local()

    def one(task: ChunkTask) -> None:
        buf = getattr(local, "buf", None)
        if buf is None or len(buf) < task.nbytes:
            buf = local.buf = bytearray(chunk_bytes)
        view = memoryview(buf)[: task.nbytes]
        reused = False
        if task.partition.file in resume_fds:
            _pread_all(resume_fds[task.partition.file], view, task.offset)
            reused = bad_block(task, view, index.block_bytes) is None
        if not reused:
            source.read(task.partition.file, task.offset, task.nbytes, view)
            bad = bad_block(task, view, index.block_bytes)
            if bad is not None:
                off, got = bad
                end = min(off + index.block_bytes, task.partition.nbytes)
                raise CheckpointCorruptError(
                    f"{source.name}/{task.partition.file}",
                    f"checksum mismatch in bytes [{off}, {end}): xxh3_64 {got}, index says "
                    f"{task.partition.block_checksums[off // index.block_bytes]}",
                )
        for i, sink in enumerate(fds):
            if reused and resume is not None and sinks[i] == resume:
                continue  # already there
            _pwrite_all(sink[task.partition.file], view, task.offset)
        nblocks = -(-task.nbytes // index.block_bytes)
        progress[task.first_block : task.first_block + nblocks] = b"\x01" * nblocks
        with lock:
            counts["reused" if reused else "source"] += task.nbytes

    try:
        if threads <= 1 or len(tasks) <= 1:
            for t in tasks:
                one(t)
        else:
            with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ember-fetch") as pool:
                futures = [pool.submit(one, t) for t in tasks]  # file order: early tensors first
                try:
                    for f in futures:
                        f.result()
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
        for sink in fds:
            for fd in sink.values():
                os.fsync(fd)
    finally:
        progress.close()
        os.close(progress_fd)
        for fd in [*resume_fds.values(), *(fd for s in fds for fd in s.values())]:
            os.close(fd)
    total = sum(p.nbytes for p in index.partitions)
    return FetchStats(total, counts["source"], counts["reused"], time.perf_counter() - t0)


def _pread_all(fd: int, out: memoryview, offset: int) -> None:
    done = 0
    while done < len(out):
        n = os.preadv(fd, [out[done:]], offset + done)
        if n == 0:
            out[done:] = bytes(len(out) - done)
            return
        done += n


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)
