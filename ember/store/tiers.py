"""One local tier of the node store (DRAM in shared memory, or SSD): a directory of complete
checkpoints with a byte capacity, LRU eviction and pins.

Layout under the tier's root:
- `<key>/`: a complete, verified checkpoint (index.json + partition files + tokenizer files).
  It only ever appears by `rename` from `.fetching/<key>/`, so its existence means complete.
- `.fetching/<key>/`: a fetch in progress, or one that was interrupted. Nothing loads from it
  except the streaming reader, which trusts only chunks the fetcher marked done in `.progress`.
- `.ember-tier`: marks the root (the engine recognises a DRAM-tier checkpoint by it).

Invariants (the caller, `NodeStore`, holds its lock around every call): bytes of complete
entries plus reservations plus retired copies never exceed `capacity_bytes`; a pinned entry (in
use by a local instance, or being fetched) is never evicted; eviction takes the least recently
used first. Not thread-safe by itself.

A pin may name its owner (an instance's process id). `retire(key)` takes a pinned entry out
of the tier (a newer version of the checkpoint is about to take its name): its files are
unlinked, which the processes mapping them do not notice (the kernel keeps the pages until
they unmap), and its pins and bytes move to a retired record until those owners `unpin`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ember.errors import StoreCapacityError
from ember.store.format import INDEX_FILE

logger = logging.getLogger(__name__)

FETCHING_DIR = ".fetching"
TIER_MARKER = ".ember-tier"


@dataclass(slots=True)
class TierEntry:
    key: str
    nbytes: int
    last_used: float  # clock seconds


@dataclass(slots=True)
class RetiredCopy:
    """A copy taken out of the tier while still pinned: its bytes stay counted (the memory is
    held by the processes that map it) until its last owner unpins."""

    key: str
    nbytes: int
    owners: list[int | None]


@dataclass(frozen=True, slots=True)
class TierItem:
    """A read-only row of `Tier.items()` (status)."""

    key: str
    nbytes: int
    last_used: float
    pins: int


class Tier:
    def __init__(
        self,
        name: str,
        root: str | Path,
        capacity_bytes: int,
        clock: Callable[[], float] = time.time,
        *,
        resumable: bool = False,
    ) -> None:
        """`resumable`: an interrupted fetch's `.fetching/<key>` stays for the next fetch to
        resume (SSD); otherwise (DRAM) it is dropped here, as is the trash an interrupted
        eviction left: this tier's owner is starting, so no fetch of its own is running."""
        self.name = name
        self.root = Path(root).expanduser()
        self.capacity_bytes = capacity_bytes
        self._clock = clock
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / FETCHING_DIR).mkdir(exist_ok=True)
        (self.root / TIER_MARKER).write_text(name + "\n")
        for entry in (self.root / FETCHING_DIR).iterdir():
            if entry.is_symlink():
                entry.unlink()
            elif not resumable or ".evicting-" in entry.name:
                shutil.rmtree(entry, ignore_errors=True)
        self._entries: dict[str, TierEntry] = {}
        self._reserved: dict[str, int] = {}
        self._pins: dict[str, list[int | None]] = {}  # key -> the owner of each pin
        self._retired: list[RetiredCopy] = []
        for d in sorted(self.root.iterdir()):
            if d.is_dir() and not d.name.startswith(".") and (d / INDEX_FILE).is_file():
                st = d.stat()
                self._entries[d.name] = TierEntry(d.name, _dir_bytes(d), st.st_mtime)

    # --- queries ---------------------------------------------------------------------------

    def path(self, key: str) -> Path:
        return self.root / key

    def partial_path(self, key: str) -> Path:
        return self.root / FETCHING_DIR / key

    def has(self, key: str) -> bool:
        return key in self._entries

    def reserved(self) -> dict[str, int]:
        """Keys being fetched into this tier, with the bytes reserved for each."""
        return dict(self._reserved)

    def used_bytes(self) -> int:
        return (
            sum(e.nbytes for e in self._entries.values())
            + sum(self._reserved.values())
            + sum(r.nbytes for r in self._retired)
        )

    def pins(self, key: str) -> int:
        return len(self._pins.get(key, ()))

    def retired(self) -> list[RetiredCopy]:
        return list(self._retired)

    def items(self) -> list[TierItem]:
        return [
            TierItem(e.key, e.nbytes, e.last_used, self.pins(e.key))
            for e in sorted(self._entries.values(), key=lambda e: -e.last_used)
        ]

    # --- use and pins ----------------------------------------------------------------------

    def touch(self, key: str) -> None:
        entry = self._entries.get(key)
        if entry is not None:
            entry.last_used = self._clock()

    def pin(self, key: str, owner: int | None = None) -> None:
        self._pins.setdefault(key, []).append(owner)
        self.touch(key)

    def unpin(self, key: str, owner: int | None = None) -> None:
        """Drop one pin of `owner` on `key`: on the current copy if it holds one, else on a
        retired copy of that key (freed with its last pin); an anonymous unpin takes the
        current copy's first."""
        pins = self._pins.get(key, [])
        if owner in pins or (owner is None and pins):
            pins.remove(owner if owner in pins else pins[0])
            if not pins:
                self._pins.pop(key, None)
            return
        for r in self._retired:
            if r.key == key and owner in r.owners:
                r.owners.remove(owner)
                if not r.owners:
                    self._retired.remove(r)
                    logger.info("retired copy freed tier=%s key=%s", self.name, key)
                return

    def retire(self, key: str) -> int:
        """Take `key`'s complete copy out of the tier though pinned (a newer version takes its
        name); returns how many pins it held. Its owners keep the files they mapped."""
        entry = self._entries.get(key)
        if entry is None:
            return 0
        owners = self._pins.pop(key, [])
        self._remove(key)
        if owners:
            self._retired.append(RetiredCopy(key, entry.nbytes, owners))
        logger.info("retired tier=%s key=%s pins=%d", self.name, key, len(owners))
        return len(owners)

    # --- capacity --------------------------------------------------------------------------

    def reserve(self, key: str, nbytes: int) -> list[str]:
        """Make room for `nbytes` of a checkpoint about to be fetched into this tier, evicting
        unpinned entries least recently used first. Returns the evicted keys."""
        self._unlink(key)
        if nbytes > self.capacity_bytes:
            raise StoreCapacityError(
                self.root,
                f"checkpoint {key} needs {nbytes} bytes but the {self.name} tier holds "
                f"{self.capacity_bytes}; raise {self.name}_capacity_bytes",
            )
        evicted: list[str] = []
        free = self.capacity_bytes - self.used_bytes()
        for entry in sorted(self._entries.values(), key=lambda e: e.last_used):
            if free >= nbytes:
                break
            if self.pins(entry.key) or entry.key == key:
                continue
            self._remove(entry.key)
            free += entry.nbytes
            evicted.append(entry.key)
        if free < nbytes:
            pinned = sorted(k for k in self._entries if self.pins(k))
            raise StoreCapacityError(
                self.root,
                f"no room for {key} ({nbytes} bytes) in the {self.name} tier: {free} bytes free "
                f"of {self.capacity_bytes}, pinned (in use or loading): {pinned}",
            )
        self._reserved[key] = nbytes
        self.pin(key)
        for k in evicted:
            logger.info("evicted tier=%s key=%s reason=lru", self.name, k)
        return evicted

    def commit(self, key: str) -> Path:
        """Move `.fetching/<key>` into place (atomic rename); ends the reservation's pin.

        `.fetching/<key>` then becomes a symlink to `<key>`: a streaming reader handed the
        in-progress path before the commit (an engine reading its tokenizer from it) finds the
        same files there after it. The link goes when the entry is evicted or fetched again."""
        src, dst = self.partial_path(key), self.path(key)
        if dst.exists():
            shutil.rmtree(dst)
        os.rename(src, dst)
        os.symlink(Path("..") / key, src)
        _fsync_dir(self.root)
        self._entries[key] = TierEntry(key, self._reserved.pop(key, 0) or _dir_bytes(dst), 0.0)
        self.unpin(key)
        self.touch(key)
        return dst

    def abort(self, key: str, keep_partial: bool) -> None:
        """Drop a reservation after a failed fetch; the partial files stay only if asked
        (the SSD tier keeps them so the next fetch can resume)."""
        if self._reserved.pop(key, None) is not None:
            self.unpin(key)
        if not keep_partial:
            shutil.rmtree(self.partial_path(key), ignore_errors=True)

    def evict(self, key: str) -> bool:
        """Remove a complete entry; False if absent. Raises if it is pinned."""
        if key not in self._entries:
            return False
        if self.pins(key):
            raise StoreCapacityError(
                self.path(key), f"cannot evict from {self.name}: in use or loading"
            )
        self._remove(key)
        logger.info("evicted tier=%s key=%s reason=request", self.name, key)
        return True

    def _unlink(self, key: str) -> None:
        link = self.partial_path(key)
        if link.is_symlink():
            link.unlink()

    def _remove(self, key: str) -> None:
        del self._entries[key]
        self._unlink(key)
        # Rename first so a half-deleted directory is never mistaken for a checkpoint.
        trash = self.root / FETCHING_DIR / f"{key}.evicting-{os.getpid()}"
        os.rename(self.path(key), trash)
        shutil.rmtree(trash, ignore_errors=True)


def host_dir_name() -> str:
    """This machine's host name as a directory name: per-machine directories under a root that
    machines may share (the SSD tier, converted checkpoints)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "host"


def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.iterdir() if f.is_file())


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
