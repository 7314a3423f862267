"""Zero-copy CPU loads from the DRAM tier: tensors that are views into the tier's shared memory.

The DRAM tier keeps each checkpoint as ordinary files on a tmpfs (`/dev/shm`), so its bytes
already live in RAM. `map_checkpoint` maps each partition file (private, copy-on-write: no page
is copied unless someone writes to it, and nobody does) and returns the rank's tensors as views
into those mappings, so N instances of one model on a node share one copy of the weights and a
load costs page-table work, not a memory copy. A mapping stays valid after the tier evicts or
renames the files (the pages live until the last mapping goes), but the node store never evicts
a checkpoint an instance has pinned.

`map_streaming` does the same on a fetch still in progress (`.fetching/<key>/`), waiting for
each tensor's blocks to be marked done in the progress file, so loading overlaps the fetch.
"""

from __future__ import annotations

import mmap
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from ember.errors import CheckpointCorruptError, ConfigError, RequestTimeoutError
from ember.store.dtypes import BY_NAME
from ember.store.fetch import PROGRESS_FILE, progress_layout
from ember.store.format import CheckpointIndex, TensorEntry, open_partition, read_index
from ember.store.pagecache import prefer_huge_pages
from ember.store.tiers import FETCHING_DIR, TIER_MARKER


def is_dram_checkpoint(path: str | Path) -> bool:
    """True for a complete checkpoint directory inside a DRAM tier on a tmpfs."""
    p = Path(path)
    return (p.parent / TIER_MARKER).is_file() and _on_tmpfs(p)


def is_dram_path(path: str | Path) -> bool:
    """A DRAM-tier checkpoint, complete or still being fetched (`.fetching/<key>`)."""
    p = Path(path)
    if p.parent.name == FETCHING_DIR:
        return (p.parent.parent / TIER_MARKER).is_file() and _on_tmpfs(p.parent)
    return is_dram_checkpoint(p)


def map_dram(
    path: str | Path, rank: int = 0, *, timeout_s: float = 600.0
) -> dict[str, torch.Tensor]:
    """Zero-copy tensors of a DRAM-tier checkpoint: `map_checkpoint` for a complete one,
    `map_streaming` (waits for each tensor's chunks) for one still being fetched."""
    p = Path(path)
    if p.parent.name == FETCHING_DIR:
        return map_streaming(p, rank, timeout_s=timeout_s)
    return map_checkpoint(p, rank)


def _on_tmpfs(p: Path) -> bool:
    try:
        best = ""
        fstype = ""
        target = str(p.resolve())
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                mnt = parts[1]
                if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(
                    best
                ):
                    best, fstype = mnt, parts[2]
        return fstype == "tmpfs"
    except OSError:
        return False


def _map_partitions(index: CheckpointIndex, rank: int) -> dict[str, torch.Tensor]:
    assert index.path is not None
    out = {}
    for p in index.partitions_for(rank):
        fd = open_partition(index.path / p.file, p.nbytes)
        try:
            if p.nbytes == 0:
                out[p.file] = torch.empty(0, dtype=torch.uint8)
                continue
            m = mmap.mmap(fd, p.nbytes, access=mmap.ACCESS_COPY)
        finally:
            os.close(fd)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            base = torch.frombuffer(m, dtype=torch.uint8)  # keeps `m` alive
        prefer_huge_pages(base.data_ptr(), p.nbytes)
        out[p.file] = base
    return out


def _view(t: TensorEntry, bases: dict[str, torch.Tensor]) -> torch.Tensor:
    raw = bases[t.partition][t.offset : t.offset + t.nbytes]
    return raw.view(BY_NAME[t.dtype].torch_dtype).view(t.shape)


def map_checkpoint(
    path: str | Path, rank: int = 0, *, populate: bool = False
) -> dict[str, torch.Tensor]:
    """Rank `rank`'s tensors (HF names) as views into the mapped partition files; no copy.
    `populate`: fault every page in now, on several threads (see `pagecache.populate`)."""
    index = read_index(path)
    if not 0 <= rank < index.tp:
        raise ConfigError(f"rank {rank} is outside this checkpoint's tp={index.tp} ranks")
    bases = _map_partitions(index, rank)
    if populate:
        from ember.store.pagecache import populate as fault_in

        for base in bases.values():
            if base.numel():
                fault_in(base.data_ptr(), base.numel())
    return {t.name: _view(t, bases) for t in index.tensors_for(rank)}


def iter_streaming(
    directory: str | Path, rank: int = 0, *, timeout_s: float = 600.0, poll_s: float = 0.002
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for each of rank's tensors in file order, each yielded as soon as the
    fetch writing `directory` has verified the blocks under it. `directory` is a tier's
    `.fetching/<key>` (or, once finished, the complete `<key>` it was renamed to)."""
    d = Path(directory)
    deadline = time.monotonic() + timeout_s
    progress_path = d / PROGRESS_FILE
    while not progress_path.is_file():  # the fetcher has not prepared its files yet
        if _finished(d):
            d = d.parent.parent / d.name
            progress_path = d / PROGRESS_FILE
            break
        if time.monotonic() > deadline:
            raise RequestTimeoutError(f"{d}: fetch did not start in {timeout_s} s")
        time.sleep(poll_s)
    index = read_index(d)
    bases = _map_partitions(index, rank)
    first = progress_layout(index)
    with open(progress_path, "rb") as f:
        progress = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        order = sorted(index.tensors_for(rank), key=lambda t: (t.partition, t.offset))
        for t in order:
            lo = first[t.partition] + t.offset // index.block_bytes
            hi = first[t.partition] + -(-(t.offset + max(t.nbytes, 1)) // index.block_bytes)
            while progress[lo:hi].count(0):
                if time.monotonic() > deadline:
                    raise RequestTimeoutError(f"{d}: tensor {t.name} not fetched in {timeout_s} s")
                if not progress_path.exists() and not _finished(d):
                    raise CheckpointCorruptError(d, "fetch abandoned before it finished")
                time.sleep(poll_s)
            yield t.name, _view(t, bases)
    finally:
        progress.close()


def _finished(partial: Path) -> bool:
    """The fetch committed: `.fetching/<key>` was renamed to `<key>`."""
    return partial.parent.name == FETCHING_DIR and (partial.parent.parent / partial.name).is_dir()


def settled_path(path: str | Path, *, wait_s: float = 1.0) -> Path:
    """Where a DRAM-tier path the store handed out leads now: a `.fetching/<key>` whose fetch
    has committed becomes the complete `<key>`; one still in progress stays as it is; other
    paths are returned unchanged. The commit renames the directory and then leaves a link in
    its place, two steps: a reader that looks between them finds neither, so this waits up to
    `wait_s` for one of them (the gap lasts microseconds). It happened: two instances starting
    together, one given the in-progress path a millisecond before the commit, failed with
    "no such directory" (now tests/e2e run with the worker pool on, as `ember serve` does)."""
    p = Path(path)
    if p.parent.name != FETCHING_DIR:
        return p
    deadline = time.monotonic() + wait_s
    while True:
        if _finished(p):
            return p.parent.parent / p.name
        if p.exists() or time.monotonic() > deadline:
            return p  # in progress; or gone, which the caller's first read will name
        time.sleep(0.001)


def map_streaming(
    directory: str | Path, rank: int = 0, *, timeout_s: float = 600.0
) -> dict[str, torch.Tensor]:
    """All of rank's tensors from a fetch in progress, returned once every block is verified."""
    return dict(iter_streaming(directory, rank, timeout_s=timeout_s))


def wait_fetched(path: str | Path, *, timeout_s: float = 600.0, poll_s: float = 0.01) -> Path:
    """For a device that reads files (CUDA): a DRAM-tier `.fetching/<key>` path becomes usable
    once the fetch has committed; returns the complete directory (other paths unchanged)."""
    p = Path(path)
    if p.parent.name != FETCHING_DIR:
        return p
    deadline = time.monotonic() + timeout_s
    while not _finished(p):
        if time.monotonic() > deadline:
            raise RequestTimeoutError(f"{p}: fetch not finished in {timeout_s} s")
        if not p.exists():
            raise CheckpointCorruptError(p, "fetch abandoned before it finished")
        time.sleep(poll_s)
    return p.parent.parent / p.name
