"""Where the engine's weights come from: resolve `model` to an ember checkpoint (converting a
Hugging Face folder once into the cache) and load one rank's tensors through `ember.store`.

The conversion cache lives in `$EMBER_CACHE_DIR` (default `~/.cache/ember/checkpoints`), one
directory per (source path, source files' sizes and mtimes, tp, dtype), so a changed source or
another tensor degree converts again and a second engine start loads straight away. Each entry
records its source in `ember-source.json`, whose mtime is the entry's last use. A conversion
removes the entries of its source folder that are stale (converted from older files, for any
tp and dtype), so editing a model folder does not grow the cache; `ember cache ls` and
`ember cache prune` (`entries` and `prune` here) handle the rest. Deleting an entry is safe
while engines run: they keep the files they mapped, and a later start converts again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ember.errors import CheckpointNotFoundError

if TYPE_CHECKING:  # light at import: `ember cache` lists and prunes without loading torch
    import torch

logger = logging.getLogger(__name__)

INDEX_FILE = "index.json"
SOURCE_FILE = "ember-source.json"
# Work directories of ember.store.convert (converting, replaced) and of `_remove` (removing).
_WORK_DIR = re.compile(r"^\..+\.(?:converting|replaced|removing)-(\d+)-")


def cache_dir() -> Path:
    root = os.environ.get("EMBER_CACHE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "ember"
    return base / "checkpoints"


def is_checkpoint(path: Path) -> bool:
    return (path / INDEX_FILE).is_file()


def resolve(model: str | os.PathLike[str], tp: int, dtype: str | None) -> Path:
    """An ember checkpoint directory for `model` with shard sets for `tp` ranks.

    `dtype` (canonical torch name or None) is applied at conversion, so the loaded tensors are
    already in the dtype the engine runs in.
    """
    path = Path(model).expanduser()
    if not path.is_dir():
        raise CheckpointNotFoundError(path, "model: no such directory")
    if is_checkpoint(path):
        return path
    if not (path / "config.json").is_file():
        raise CheckpointNotFoundError(
            path, "model: neither an ember checkpoint (index.json) nor a Hugging Face folder "
            "(config.json)"
        )  # fmt: skip
    from ember.store import convert

    dst = cache_dir() / _source_key(path, tp, dtype)
    if is_checkpoint(dst):
        with contextlib.suppress(OSError):  # last use, for `ember cache prune --unused-days`
            os.utime(dst / SOURCE_FILE)
        return dst
    logger.info("converting src=%s dst=%s tp=%d dtype=%s", path, dst, tp, dtype)
    convert(path, dst, tp=tp, dtype=dtype, progress=False, overwrite=True)
    record = {"source": str(path.resolve()), "tp": tp, "dtype": dtype}
    tmp = dst / f".{SOURCE_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps(record, sort_keys=True) + "\n")
    os.replace(tmp, dst / SOURCE_FILE)
    for old in entries(dst.parent):  # conversions of this folder's older files, any tp/dtype
        if old.source == record["source"] and old.status == "stale":
            logger.info("removing superseded conversion path=%s", old.path)
            _remove(old.path)
    return dst


def _source_key(path: Path, tp: int, dtype: str | None) -> str:
    h = hashlib.sha256(str(path.resolve()).encode())
    h.update(folder_fingerprint(path).encode())
    h.update(f"tp={tp}:dtype={dtype}".encode())
    return f"{path.name}-{h.hexdigest()[:16]}"


def folder_fingerprint(path: Path) -> str:
    """What says a model folder's contents changed: its files' names, sizes and mtimes (the
    conversion cache's key is made of it, and so is a deployment's version)."""
    parts = []
    for f in sorted(path.iterdir()):
        if f.is_file():
            st = f.stat()
            parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return "".join(parts)


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """One directory of a conversion cache.

    status: "current" (its source is unchanged), "stale" (the source folder changed or is
    gone), "unknown" (converted before entries recorded their source), "partial" (the work
    directory of a conversion, replacement or removal, running or interrupted:
    `.<key>.converting-<pid>-<hex>`, `.replaced-`, `.removing-`).
    """

    path: Path
    nbytes: int
    last_used: float  # epoch seconds
    status: str
    record: dict[str, Any] | None  # ember-source.json: source, tp, dtype

    @property
    def source(self) -> str | None:
        return None if self.record is None else str(self.record["source"])


def cache_dirs(root: Path | None = None) -> list[Path]:
    """Every conversion cache under `root` (default `$EMBER_CACHE_DIR` or `~/.cache/ember`):
    the engine's own (`checkpoints/`) and the serving nodes' (`nodes/<host>/checkpoints/`)."""
    base = root if root is not None else cache_dir().parent
    dirs = [base / "checkpoints", *sorted(base.glob("nodes/*/checkpoints"))]
    return [d for d in dirs if d.is_dir()]


def entries(directory: Path) -> list[CacheEntry]:
    """The entries of one conversion cache directory, oldest use first."""
    out = []
    for d in directory.iterdir():
        if not d.is_dir():
            continue
        files = [f for f in d.rglob("*") if f.is_file()]
        nbytes = sum(f.stat().st_size for f in files)
        if d.name.startswith("."):
            if _WORK_DIR.match(d.name):
                out.append(CacheEntry(d, nbytes, d.stat().st_mtime, "partial", None))
            continue
        if not is_checkpoint(d):
            continue
        record = _read_record(d / SOURCE_FILE)
        if record is None:
            out.append(CacheEntry(d, nbytes, d.stat().st_mtime, "unknown", None))
            continue
        src = Path(record["source"])
        fresh = src.is_dir() and d.name == _source_key(src, record["tp"], record["dtype"])
        used = (d / SOURCE_FILE).stat().st_mtime
        out.append(CacheEntry(d, nbytes, used, "current" if fresh else "stale", record))
    return sorted(out, key=lambda e: e.last_used)


def prune(
    root: Path | None = None,
    *,
    unused_days: float | None = None,
    everything: bool = False,
    dry_run: bool = False,
) -> list[CacheEntry]:
    """Remove stale entries, and interrupted conversions whose process is gone; with
    `unused_days` also every entry not used for that long; with `everything` all of them
    (except conversions still running). Returns what was (or, dry run, would be) removed."""
    now = time.time()
    removed = []
    for directory in cache_dirs(root):
        for e in entries(directory):
            if e.status == "partial":
                drop = not _owner_alive(e.path.name)
            else:
                drop = (
                    everything
                    or e.status == "stale"
                    or (unused_days is not None and now - e.last_used > unused_days * 86400)
                )
            if drop:
                removed.append(e)
                if not dry_run:
                    _remove(e.path)
    return removed


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not {"source", "tp", "dtype"} <= record.keys():
        return None
    return record


def _owner_alive(name: str) -> bool:
    """Whether the process working in `.<key>.<work>-<pid>-<hex>` still runs."""
    m = _WORK_DIR.match(name)
    if m is None:
        return False
    try:
        os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _remove(path: Path) -> None:
    """Rename aside first, so no reader finds a half-deleted checkpoint under the key."""
    trash = path.parent / f".{path.name}.removing-{os.getpid()}-{time.monotonic_ns()}"
    try:
        os.rename(path, trash)
    except OSError:
        return  # already gone (another prune, a concurrent superseding conversion)
    shutil.rmtree(trash, ignore_errors=True)


def read_config(checkpoint: Path) -> dict[str, Any]:
    """The HF config dict stored with the checkpoint."""
    from ember.store import read_index

    config = read_index(checkpoint).config
    if not config and (checkpoint / "config.json").is_file():
        config = json.loads((checkpoint / "config.json").read_text())
    return dict(config)


def checkpoint_tp(checkpoint: Path) -> int:
    from ember.store import read_index

    return int(read_index(checkpoint).tp)


def load_rank(
    checkpoint: Path, device: torch.device, rank: int, *, map_cpu: bool = True
) -> dict[str, torch.Tensor]:
    """This rank's tensors (HF names, local shards) on `device`.

    On CPU (with `map_cpu`) the partition files are mapped copy-on-write and their pages
    faulted in up front on several threads: the weights are the page cache's own pages, with
    no copy, no fresh memory to fault in, and one copy shared by every engine on the node that
    maps the same checkpoint; bytes not yet cached are read in through the mapping. On the
    2-core dev VM a 2.2 GB checkpoint mapped in 0.01 s from the page cache and 0.65-0.71 s from
    disk, against 0.3-0.9 s and 1.65-2.2 s for `ember.store.load` into memory of its own
    (docs/engine.md). A node store's DRAM-tier checkpoint is mapped the same way (it lives on
    a tmpfs). Otherwise the store's loader reads the bytes (CUDA: pinned staging, overlapped
    copies).
    """
    from ember.store import load
    from ember.store.shm import is_dram_path, map_checkpoint, map_dram, wait_fetched

    if is_dram_path(checkpoint):  # the node store's DRAM tier
        if device.type == "cpu":
            return map_dram(checkpoint, rank)  # views of the shared memory, no copy
        checkpoint = wait_fetched(checkpoint)  # a device read needs the complete files
    if device.type == "cpu" and map_cpu:
        t0 = time.perf_counter()
        weights = map_checkpoint(checkpoint, rank, populate=True)
        logger.info(
            "mapped path=%s rank=%d seconds=%.3f", checkpoint, rank, time.perf_counter() - t0
        )
        return weights
    return dict(load(checkpoint, device=str(device), rank=rank))
