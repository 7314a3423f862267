"""The node store: the checkpoints one server keeps hot, in DRAM (shared memory), on SSD and in
a remote object store, and the one place that moves them between tiers.

`ensure(source)` returns a complete checkpoint directory in the DRAM tier, fetching it from the
best tier that has it: DRAM (nothing to do), SSD (SSD -> DRAM), remote `s3://...` (remote ->
SSD -> DRAM in one chunk pipeline, see `ember.store.fetch`) or a local checkpoint directory
(-> DRAM). Concurrent calls for one checkpoint share one fetch. `start_fetch` returns at once
with the in-progress directory a streaming reader can map (`ember.store.shm.map_streaming`).

Pins: `acquire(source, owner)` marks a DRAM copy in use by a local instance (never evicted
until `release`); a fetch in progress pins its reservation. A copy pinned when its source
changes (a new version pushed to the same place) is retired, not evicted, so the new version
can be fetched beside it (`drop_stale`). `acquire_ssd(source)` lets an instance
map a checkpoint that is on SSD (with its files in the page cache) but not in DRAM straight
from the SSD tier's files (checked block by block first), pinning the SSD copy instead, and
brings it into DRAM behind it: copying into the DRAM tier's tmpfs runs at the rate tmpfs
allocates 4 KiB pages (2.3-2.6 GB/s on the dev VM, whatever the thread count), so the
instance no longer waits for that copy. Eviction is LRU per tier, on demand when a fetch
needs room, or explicit with `evict(source, tier)`.

Thread-safe: one lock guards the tiers' bookkeeping; the bytes move outside it.

Where the tiers live: a node store started by a node store actor claims a slot
(`claim_slot`): `<dram_dir>/slot-<n>` and `<ssd_dir>/<host>/slot-<n>`, the lowest `n` that no
live process holds the lock of. A store restarted on the same machine (`ember serve` run
again: a new Ray node id) gets its predecessor's slot, with the checkpoints still in DRAM and
on SSD; two Ray nodes on one machine get two slots.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import math
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO

from ember.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    RemoteStoreError,
    RequestTimeoutError,
    StoreCapacityError,
)
from ember.store.fetch import (
    PROGRESS_FILE,
    ChunkSource,
    FetchStats,
    LocalSource,
    RemoteSource,
    prepare_sinks,
    run_fetch,
)
from ember.store.format import INDEX_FILE, parse_index, read_index
from ember.store.peer import PeerError, PeerOffer, PeerSource
from ember.store.rates import RATES_FILE, LinkRates
from ember.store.remote import RemoteConfig, RemoteStore, is_s3_url, parse_s3_url
from ember.store.tiers import Tier, TierItem, host_dir_name

logger = logging.getLogger(__name__)

TIERS = ("dram", "ssd")
SOURCE_FILE = ".ember-source"  # in each tier copy: the source it was fetched from
# How long a remote index a freshness check read stands for the peer choice of the fetch (s).
INDEX_REUSE_S = 5.0


def _default_dram_dir() -> str:
    return f"/dev/shm/ember-{os.getuid()}/dram"


@dataclass(frozen=True, slots=True)
class NodeStoreConfig:
    """One node's store. Capacities are bytes of checkpoint files; the DRAM tier must be on a
    tmpfs (the default `/dev/shm`) for zero-copy loads."""

    dram_dir: str = field(default_factory=_default_dram_dir)
    dram_capacity_bytes: int = 8 << 30
    ssd_dir: str = "~/.cache/ember/ssd"
    ssd_capacity_bytes: int = 100 << 30
    chunk_bytes: int = 16 << 20  # unit of verify/write/progress: a multiple of the 4 MiB block
    range_bytes: int = 64 << 20  # bytes per ranged GET, streamed chunk by chunk
    fetch_threads: int = 8  # ranged GETs / reads in flight (8: measured, see docs/node-store.md)
    rate_min_bytes: int = 64 << 20  # smaller fetches are not counted in the measured link rates
    remote: RemoteConfig = field(default_factory=RemoteConfig)
    # Fetch a remote checkpoint from another node's complete copy when one has it (and the
    # measured peer link is not slower than the remote store), and serve this node's copies to
    # the others on `peer_port` (0: any free port). See `ember.store.peer`.
    peer_fetch: bool = True
    peer_port: int = 0
    # A node that measured its peers slower than the remote store still tries them on every
    # n-th fetch, so one slow moment is not remembered for good (the rate is only measured on
    # peer fetches).
    peer_retry_every: int = 8

    def __post_init__(self) -> None:
        for name in (
            "dram_capacity_bytes", "ssd_capacity_bytes", "chunk_bytes", "fetch_threads",
            "peer_retry_every",
        ):  # fmt: skip
            if getattr(self, name) < 1:
                raise ConfigError(f"NodeStoreConfig.{name} must be positive")
        if not 0 <= self.peer_port < 65536:
            raise ConfigError(
                f"NodeStoreConfig.peer_port must be in [0, 65535], got {self.peer_port}"
            )
        if self.range_bytes < self.chunk_bytes or self.range_bytes % self.chunk_bytes:
            raise ConfigError(
                f"NodeStoreConfig.range_bytes ({self.range_bytes}) must be a multiple of "
                f"chunk_bytes ({self.chunk_bytes})"
            )


MAX_SLOTS = 256


def fit_capacity(root: Path, capacity_bytes: int, name: str) -> int:
    """`capacity_bytes`, or the size of the file system under `root` where that is smaller
    (logged): a tier cannot hold more than its file system. A container's /dev/shm is 64 MiB
    unless it was started with a larger --shm-size: with the 8 GiB default, a 250 MB model
    reserved its room, filled the tmpfs and failed halfway ("fetch abandoned")."""
    st = os.statvfs(root)
    size = st.f_blocks * st.f_frsize
    if 0 < size < capacity_bytes:
        logger.warning(
            "%s tier: %s is a %d-byte file system, less than its capacity %d: using %d "
            "(in a container, a larger --shm-size gives the DRAM tier more room)",
            name, root, size, capacity_bytes, size,
        )  # fmt: skip
        return size
    return capacity_bytes


def claim_slot(config: NodeStoreConfig) -> tuple[NodeStoreConfig, IO[str]]:
    """`config` with its tier directories narrowed to this store's slot, and the open lock file
    that holds the slot (keep it open for as long as the store runs; the slot is free again
    once the process ends, however it ends).

    The slot is `slot-<n>` with the lowest `n` whose lock (`<dram_dir>/slot-<n>.lock`, an
    exclusive `flock`) no live process holds: the DRAM directory is on this machine (a tmpfs),
    so the lock is too. The SSD slot sits under this machine's host name, since the SSD
    directory may be on a file system several machines share (a home directory on NFS).
    Before slots, each Ray node id had its own directories, so every restart left the DRAM
    tier behind in /dev/shm (memory no one freed) and started with an empty SSD tier."""
    dram_root = Path(config.dram_dir).expanduser()
    dram_root.mkdir(parents=True, exist_ok=True)
    host = host_dir_name()
    for n in range(MAX_SLOTS):
        lock = open(dram_root / f"slot-{n}.lock", "a")  # noqa: SIM115 - held by the caller
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a live store holds it
            lock.close()
            continue
        slot = f"slot-{n}"
        claimed = replace(
            config,
            dram_dir=str(dram_root / slot),
            ssd_dir=str(Path(config.ssd_dir).expanduser() / host / slot),
        )
        return claimed, lock
    raise StoreCapacityError(
        dram_root, f"all {MAX_SLOTS} node store slots are held by live processes"
    )


@dataclass(frozen=True, slots=True)
class CachedCheckpoint:
    """One row of `status()`: where a checkpoint is on this node. `fetched` is the share of its
    blocks already verified and written while a fetch into that tier is still running (None
    for a complete copy). `retired`: an older version's copy, out of the tier but still mapped
    by `pins` instances (its memory is freed when they stop)."""

    key: str
    tier: str
    nbytes: int
    pins: int
    last_used: float
    fetched: float | None = None
    retired: bool = False


@dataclass(frozen=True, slots=True)
class EnsureResult:
    path: Path  # the complete DRAM-tier directory
    served_from: str  # "dram", "ssd", "peer", "remote" or "local"
    stats: FetchStats | None


def _in_page_cache(directory: Path, at_least: float = 0.99) -> bool:
    """Whether (nearly) every page of the checkpoint's partition files is in the page cache."""
    from ember.store.pagecache import resident_fraction

    index = read_index(directory)
    return all(
        resident_fraction(directory / p.file) >= at_least for p in index.partitions if p.nbytes
    )


def checkpoint_key(source: str) -> str:
    """A stable directory name for a source: readable prefix plus a short hash."""
    if is_s3_url(source):
        url = parse_s3_url(source)
        readable, ident = f"s3-{url.bucket}-{url.prefix}", f"s3://{url.bucket}/{url.prefix}"
    else:
        p = Path(source).expanduser().resolve()
        readable, ident = f"local-{p.name}", str(p)
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", readable).strip("-.")[:80]
    return f"{readable}-{hashlib.sha256(ident.encode()).hexdigest()[:10]}"


def _progress(path: Path) -> float:
    """The share of blocks a fetch's progress file marks done (0.0 before it exists)."""
    try:
        marks = path.read_bytes()
    except OSError:
        return 0.0
    return marks.count(1) / len(marks) if marks else 0.0


class _Fetch:
    """One fetch in flight; waiters block on `done`. `prepared` is set once the DRAM partial
    copy holds the index, the small files and the progress file (a streaming reader may map it
    from then on), or when the fetch ended."""

    def __init__(self, partial: Path, threads: int) -> None:
        self.partial = partial
        self.threads = threads  # reads in flight
        self.prepared = threading.Event()
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.result: EnsureResult | None = None
        self.index: bytes | None = None  # the index.json it fetches by, once read


# Asks the other nodes which of them holds a checkpoint (by key) completely: their offers, best
# first (the cluster layer implements it over Ray: `ember.cluster.node_store_actor`).
PeerFinder = Callable[[str], "list[PeerOffer]"]


class NodeStore:
    def __init__(
        self, config: NodeStoreConfig | None = None, peers: PeerFinder | None = None
    ) -> None:
        self.config = cfg = config or NodeStoreConfig()
        self.peers = peers if cfg.peer_fetch else None
        self.dram = Tier("dram", cfg.dram_dir, cfg.dram_capacity_bytes)
        self.ssd = Tier("ssd", cfg.ssd_dir, cfg.ssd_capacity_bytes, resumable=True)
        for tier in (self.dram, self.ssd):
            tier.capacity_bytes = fit_capacity(tier.root, tier.capacity_bytes, tier.name)
        self._remote: RemoteStore | None = None
        self._lock = threading.Lock()
        self._fetches: dict[str, _Fetch] = {}
        # SSD-only fetches (prefetches) running, by key: set when they end. One writer per
        # tier copy: a DRAM fetch that starts meanwhile leaves the SSD copy to it.
        self._ssd_fetches: dict[str, threading.Event] = {}
        self._ssd_fetch_index: dict[str, bytes] = {}  # key -> the index a prefetch fetches by
        self._sources: dict[str, str] = {}  # key -> source, for status
        self._fetched_from: dict[str, str] = {}  # key -> where its latest fetch reads
        self._peer_skips = 0  # fetches that passed peers over as slower than the remote store
        # The remote index a freshness check just read (`_source_index`), per source, with when
        # (time.monotonic): the peer choice of the fetch that follows uses it, not a second GET.
        self._index_read: dict[str, tuple[bytes, float]] = {}
        # Measured fetch rates into this node, by where from (placement's start-up estimate).
        self.rates = LinkRates(self.ssd.root / RATES_FILE, min_bytes=cfg.rate_min_bytes)
        self._drop_orphans()

    def adopt_mappings(self) -> list[tuple[int, str, str]]:
        """At start: pin again what running processes map from the tiers (a store that crashed
        and was restarted lost the pins of the instances still running). Scans
        /proc/<pid>/maps; returns (pid, tier, source) for each pin taken, which the caller
        releases when that process exits."""
        roots = {str(t.root.resolve()) + os.sep: t for t in (self.dram, self.ssd)}
        found: set[tuple[int, str, str]] = set()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                lines = (entry / "maps").read_text().splitlines()
            except OSError:  # gone, or another user's
                continue
            for line in lines:
                fields = line.split(maxsplit=5)  # address perms offset dev inode [path]
                path = fields[5] if len(fields) == 6 else ""
                for root, tier in roots.items():
                    if path.startswith(root) and not path.endswith("(deleted)"):
                        key = path[len(root) :].split(os.sep, 1)[0]
                        if tier.has(key):  # a complete copy (not a fetch's work directory)
                            found.add((int(entry.name), tier.name, key))
        out = []
        with self._lock:
            for pid, tier_name, key in sorted(found):
                self._tier(tier_name).pin(key, pid)
                out.append((pid, tier_name, self._source_of(tier_name, key)))
        if out:
            logger.info("pins adopted from running processes: %d", len(out))
        return out

    def _drop_orphans(self) -> None:
        """At start: drop the DRAM copies of local checkpoints whose directory is gone (a
        conversion pruned from the cache, a test's temporary model). Nothing asks for them
        again, and they hold memory until the LRU needs the room."""
        dropped = 0
        for item in self.dram.items():
            source = self._source_of("dram", item.key)
            if source == item.key or is_s3_url(source) or item.pins:
                continue  # no record of its source, a remote one, or in use
            if not Path(source).expanduser().is_dir():
                self.dram.evict(item.key)
                dropped += 1
        if dropped:
            logger.info("dropped %d dram copies of local checkpoints that no longer exist", dropped)

    @property
    def remote(self) -> RemoteStore:
        if self._remote is None:
            self._remote = RemoteStore(self.config.remote)
        return self._remote

    def _tier(self, name: str) -> Tier:
        if name not in TIERS:
            raise ConfigError(f"tier must be one of {TIERS}, got {name!r}")
        return self.dram if name == "dram" else self.ssd

    # --- queries ---------------------------------------------------------------------------

    def locate(self, source: str) -> str | None:
        """The fastest local tier holding `source` completely, or None."""
        key = checkpoint_key(source)
        with self._lock:
            if self.dram.has(key):
                return "dram"
            if self.ssd.has(key):
                return "ssd"
        return None

    def servable_copy(self, key: str, wait_s: float = 0.0) -> tuple[Path, str] | None:
        """A copy of checkpoint `key` to serve a peer from: (its directory, "dram" or "ssd")
        for a complete one, DRAM first; else ("fetching") the DRAM copy of a fetch from the
        remote store still running here, whose blocks a peer server hands out as they are
        verified (its `.progress`; a fetch that has chosen the remote store but not yet written
        its index is waited for up to `wait_s`); None if there is none. A fetch from a peer is
        not offered: no two nodes can wait on each other."""
        with self._lock:
            for tier in (self.dram, self.ssd):
                if tier.has(key):
                    return tier.path(key), tier.name
            fetch = self._fetches.get(key)
            if fetch is None or self._fetched_from.get(key) != "remote":
                return None
        partial = fetch.partial
        fetch.prepared.wait(wait_s)
        if fetch.prepared.is_set() and not fetch.done.is_set() and (partial / INDEX_FILE).is_file():
            return partial, "fetching"
        return None

    def status(self) -> list[CachedCheckpoint]:
        """Complete copies in each tier, then the fetches in flight with their progress."""
        with self._lock:
            rows: list[tuple[str, TierItem]] = [("dram", i) for i in self.dram.items()]
            rows += [("ssd", i) for i in self.ssd.items()]
            out = [
                CachedCheckpoint(self._source_of(tier, i.key), tier, i.nbytes, i.pins, i.last_used)
                for tier, i in rows
            ]
            fetching = [
                (tier, key, nbytes, self._sources.get(key, key))
                for tier in (self.dram, self.ssd)
                for key, nbytes in tier.reserved().items()
            ]
            dram_fetches = set(self._fetches)
            out += [
                CachedCheckpoint(
                    self._source_of(tier.name, r.key), tier.name, r.nbytes, len(r.owners), 0.0,
                    retired=True,
                )
                for tier in (self.dram, self.ssd)
                for r in tier.retired()
            ]  # fmt: skip
        for tier, key, nbytes, source in fetching:
            # A DRAM fetch keeps its progress in the DRAM copy and writes the SSD one alongside.
            where = self.dram if tier is self.ssd and key in dram_fetches else tier
            done = _progress(where.partial_path(key) / PROGRESS_FILE)
            out.append(CachedCheckpoint(source, tier.name, nbytes, 0, 0.0, done))
        return out

    def _source_of(self, tier: str, key: str) -> str:
        known = self._sources.get(key)
        if known is None:
            f = self._tier(tier).path(key) / SOURCE_FILE
            known = f.read_text() if f.is_file() else key
            self._sources[key] = known
        return known

    # --- freshness -------------------------------------------------------------------------

    def drop_stale(self, source: str) -> None:
        """Make sure this node's copies are of `source`'s current checkpoint: one read of the
        source's `index.json` (a GET for S3), compared with each tier's copy. A copy of an
        older version (the model was pushed or converted again at the same place) is evicted;
        if instances still use it, it is retired (`Tier.retire`): out of the tier, so the new
        version can be fetched under its name, while those instances keep the old files they
        mapped (a rolling update runs both side by side); its bytes are counted until they
        release it. If the source cannot be read (S3 unreachable), the copies are trusted,
        with a warning."""
        key = checkpoint_key(source)
        try:
            current = self._source_index(source)
        except (RemoteStoreError, OSError) as e:
            logger.warning("cannot read the source's index, trusting cached copies: %s", e)
            return
        except CheckpointNotFoundError:
            return  # gone at the source: the next fetch says so; a cached copy still serves
        # A fetch of an older version still running would hand its copy out as current: let
        # it end (its copy is then stale like any other; its error is not this caller's).
        with self._lock:
            dram_fetch = self._fetches.get(key)
            busy = (
                [dram_fetch.done] if dram_fetch and dram_fetch.index not in (None, current) else []
            )
            if self._ssd_fetch_index.get(key, current) != current and key in self._ssd_fetches:
                busy.append(self._ssd_fetches[key])
        for done in busy:
            logger.warning("waiting for a fetch of an older version to end source=%s", source)
            done.wait()
        with self._lock:
            for tier in (self.dram, self.ssd):
                if not tier.has(key):
                    continue
                try:
                    cached = (tier.path(key) / INDEX_FILE).read_bytes()
                except OSError:
                    cached = b""
                if cached == current:
                    continue
                if tier.pins(key):
                    n = tier.retire(key)
                    logger.warning(
                        "stale copy retired tier=%s source=%s: %d pin(s) keep its files "
                        "until released", tier.name, source, n,
                    )  # fmt: skip
                    continue
                tier.evict(key)
                logger.warning("stale copy evicted tier=%s source=%s", tier.name, source)

    # --- pins ------------------------------------------------------------------------------

    def acquire(self, source: str, owner: int | None = None, *, checked: bool = False) -> Path:
        """Pin the DRAM copy (fetching it first if needed) for a local instance; `owner` (its
        process id) names the pin for `release`."""
        key = checkpoint_key(source)
        while True:
            result = self.ensure(source, checked=checked)
            with self._lock:
                if self.dram.has(key):  # else evicted since ensure returned: fetch again
                    self.dram.pin(key, owner)
                    return result.path

    def acquire_cached(self, source: str, owner: int | None = None) -> tuple[Path, bytes] | None:
        """Pin the DRAM copy if there is one, without asking the source whether it is still
        current: (its directory, its index.json's bytes), or None (nothing pinned). For a start
        that overlaps that question with building its engine: it must ask
        `is_current(source, index)` with those bytes before serving. (Not with the directory:
        a newer version fetched meanwhile takes the same name.)"""
        key = checkpoint_key(source)
        with self._lock:
            if not self.dram.has(key):
                return None
            path = self.dram.path(key)
            index = (path / INDEX_FILE).read_bytes()
            self.dram.pin(key, owner)
            return path, index

    def is_current(self, source: str, index: bytes) -> bool:
        """Whether a copy with this `index.json` (from `acquire_cached`) is `source`'s current
        checkpoint: one read of the source's index, as `drop_stale` does. A source that cannot
        be read trusts the copy."""
        try:
            current = self._source_index(source)
        except (RemoteStoreError, OSError, CheckpointNotFoundError) as e:
            logger.warning("cannot read the source's index, trusting the cached copy: %s", e)
            return True
        return index == current

    def _source_index(self, source: str) -> bytes:
        """`source`'s `index.json` as it is now (a GET for S3, kept a moment for the peer
        choice of the fetch that may follow: `_peer_source`)."""
        if not is_s3_url(source):
            return (Path(source).expanduser() / INDEX_FILE).read_bytes()
        current = self.remote.get_bytes(parse_s3_url(source), INDEX_FILE)
        with self._lock:
            self._index_read[source] = (current, time.monotonic())
        return current

    def acquire_on_disk(self, source: str, owner: int | None = None) -> tuple[Path, str | None]:
        """For a checkpoint the DRAM tier cannot hold (larger than the tier, or the tier full
        of checkpoints in use): a copy on disk for the engine to map, and the tier pinned for
        it (`release(source, tier)`), or None. An S3 checkpoint is fetched to the SSD tier
        alone and pinned there; a local checkpoint directory is used where it is."""
        key = checkpoint_key(source)
        if not is_s3_url(source):
            path = Path(source).expanduser()
            if not (path / INDEX_FILE).is_file():
                raise CheckpointNotFoundError(path, "not an ember checkpoint directory (no index)")
            return path, None
        while True:
            self._ensure_ssd(source)
            with self._lock:
                if self.ssd.has(key):  # else evicted since: fetch again
                    self.ssd.pin(key, owner)
                    return self.ssd.path(key), "ssd"

    def acquire_streaming(
        self,
        source: str,
        timeout_s: float = 600.0,
        *,
        checked: bool = False,
        owner: int | None = None,
    ) -> tuple[Path, bool]:
        """Pin `source` in DRAM and return as soon as it can be mapped: (the complete
        directory, True) if it is there, else (the in-progress `.fetching/<key>` directory,
        False) for `ember.store.shm.map_dram`, which waits for each tensor's chunks. The pin
        holds across the fetch's commit; `release` it as for `acquire`. `checked`: the caller
        has just run `drop_stale` (`acquire_ssd` does)."""
        if not checked:
            self.drop_stale(source)
        key = checkpoint_key(source)
        with self._lock:
            self.dram.pin(key, owner)
        try:
            fetch = self.start_fetch(source)
            if not fetch.prepared.wait(timeout_s):
                raise RequestTimeoutError(f"{source}: fetch did not start in {timeout_s} s")
            if fetch.error is not None:
                raise fetch.error
            if fetch.done.is_set():
                assert fetch.result is not None
                return fetch.result.path, True
            return fetch.partial, False
        except BaseException:
            self.release(source, owner=owner)
            raise

    def acquire_ssd(
        self, source: str, owner: int | None = None, *, checked: bool = False
    ) -> Path | None:
        """For a checkpoint on SSD, in the page cache, and neither in DRAM nor being fetched
        there: pin the SSD copy, check every block of it (`verify_mapped`, at memory speed),
        start copying it into DRAM in the background (one thread, lowest CPU priority) and
        return its directory for an engine to map; `release(source, "ssd")` when done. None
        (nothing pinned) otherwise, and when the SSD copy fails its check: that copy is then
        evicted (the error is logged) and the caller fetches as usual."""
        from ember.store.verify import verify_mapped

        if not checked:
            self.drop_stale(source)
        key = checkpoint_key(source)
        with self._lock:
            if self.dram.has(key) or key in self._fetches or not self.ssd.has(key):
                return None
            self._sources[key] = source
            self.ssd.pin(key, owner)
        path = self.ssd.path(key)
        try:
            if not _in_page_cache(path):
                # From the disk, the SSD -> DRAM fetch (O_DIRECT reads, 8 in flight) is faster
                # than faulting the files in through a mapping (whose 2 MiB folios may need the
                # kernel to compact memory first: 1.1-3.7 s against 0.78 s for 2.2 GB here).
                with self._lock:
                    self.ssd.unpin(key, owner)
                return None
            verify_mapped(path)
        except CheckpointError as e:
            logger.error("ssd copy failed its check, evicting it: %s", e)
            with self._lock:
                self.ssd.unpin(key, owner)
                if not self.ssd.pins(key):  # else an instance maps it: evicted on a later try
                    self.ssd.evict(key)
            return None
        except BaseException:
            with self._lock:
                self.ssd.unpin(key, owner)
            raise
        threading.Thread(
            target=self._promote, args=(source,), name="ember-promote", daemon=True
        ).start()
        return path

    def _promote(self, source: str) -> None:
        """SSD -> DRAM behind an instance that maps the SSD copy: at the lowest CPU priority
        (this thread's and the fetch threads it starts), so the instance's first token runs
        first on a busy node."""
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        try:
            fetch = self.start_fetch(source, threads=1)  # one core's worth: tmpfs's own pace
            fetch.done.wait()
            if fetch.error is not None:
                raise fetch.error
        except Exception:
            logger.exception("promotion to dram failed source=%s", source)

    def check(self, source: str) -> tuple[int, str]:
        """That an `s3://` source holds a checkpoint this ember reads (its index is there and
        valid): its bytes and version (a digest of its index). Raises CheckpointNotFoundError,
        CheckpointFormatError or RemoteStoreError naming the object."""
        if not is_s3_url(source):
            raise ConfigError(f"source: {source!r} is not an s3:// URL")
        data = self.remote.get_bytes(parse_s3_url(source), INDEX_FILE)
        index = parse_index(data, f"{source.rstrip('/')}/{INDEX_FILE}")
        return sum(p.nbytes for p in index.partitions), hashlib.sha256(data).hexdigest()[:16]

    def release(self, source: str, tier: str = "dram", owner: int | None = None) -> None:
        """Drop a pin `acquire`/`acquire_streaming` ("dram") or `acquire_ssd` ("ssd") took for
        `owner`: on the current copy, or on the retired copy of an older version it holds."""
        with self._lock:
            self._tier(tier).unpin(checkpoint_key(source), owner)

    def evict(self, source: str, tier: str = "dram") -> bool:
        key = checkpoint_key(source)
        with self._lock:
            return self._tier(tier).evict(key)

    # --- fetching --------------------------------------------------------------------------

    def ensure(self, source: str, tier: str = "dram", *, checked: bool = False) -> EnsureResult:
        """A complete copy of `source` in `tier` ("dram" by default, or "ssd" to prefetch only
        to disk), fetched from the best tier that has it. Blocks until done. `checked`: the
        caller has just run `drop_stale`."""
        if not checked:
            self.drop_stale(source)
        if tier == "ssd":
            return self._ensure_ssd(source)
        fetch = self.start_fetch(source)
        fetch.done.wait()
        if fetch.error is not None:
            raise fetch.error
        assert fetch.result is not None
        return fetch.result

    def prefetch(self, source: str, tier: str = "dram") -> None:
        """Start bringing `source` into `tier` in the background (controller's prefetch)."""
        threading.Thread(
            target=self._quiet_ensure, args=(source, tier), name="ember-prefetch", daemon=True
        ).start()

    def _quiet_ensure(self, source: str, tier: str) -> None:
        try:
            self.ensure(source, tier)
        except Exception:
            logger.exception("prefetch failed source=%s tier=%s", source, tier)

    def start_fetch(self, source: str, threads: int | None = None) -> _Fetch:
        """Begin (or join) bringing `source` into DRAM; returns at once. `.partial` is the
        directory a streaming reader may map while `.done` is unset."""
        key = checkpoint_key(source)
        with self._lock:
            self._sources[key] = source
            running = self._fetches.get(key)
            if running is not None:
                return running
            fetch = _Fetch(self.dram.partial_path(key), threads or self.config.fetch_threads)
            if self.dram.has(key):
                self.dram.touch(key)
                fetch.result = EnsureResult(self.dram.path(key), "dram", None)
                fetch.done.set()
                fetch.prepared.set()
                return fetch
            self._fetches[key] = fetch
        threading.Thread(
            target=self._run_fetch, args=(source, key, fetch), name="ember-fetch", daemon=True
        ).start()
        return fetch

    def _run_fetch(self, source: str, key: str, fetch: _Fetch) -> None:
        try:
            fetch.result = self._fetch_to_dram(source, key, fetch)
        except BaseException as e:
            fetch.error = e
        finally:
            with self._lock:
                self._fetches.pop(key, None)
            fetch.done.set()
            fetch.prepared.set()

    def _source_for(
        self, source: str, key: str
    ) -> tuple[ChunkSource, str, bool, ChunkSource | None]:
        """(chunk source, where from, whether SSD is a sink too, fallback). While a prefetch
        writes the SSD copy, wait for it and read that copy: the bytes come from the remote
        store once, and sooner than through a second download sharing the link. A remote
        checkpoint another node holds whole comes from that peer, the remote store behind it
        as the fallback."""
        with self._lock:
            prefetch = self._ssd_fetches.get(key)
        if prefetch is not None:
            prefetch.wait()
        with self._lock:
            on_ssd = self.ssd.has(key)
            if on_ssd:
                self.ssd.pin(key)
            ssd_busy = key in self._ssd_fetches  # another prefetch writes the SSD copy
        if on_ssd:
            return LocalSource(self.ssd.path(key), self.config.range_bytes), "ssd", False, None
        if is_s3_url(source):
            src, where, fallback = self._remote_source(source, key)
            return src, where, not ssd_busy, fallback
        path = Path(source).expanduser()
        if not (path / INDEX_FILE).is_file():
            raise CheckpointNotFoundError(path, "not an ember checkpoint directory (no index)")
        return LocalSource(path, self.config.range_bytes), "local", False, None

    def _remote_source(self, source: str, key: str) -> tuple[ChunkSource, str, ChunkSource | None]:
        """Where an `s3://` checkpoint's bytes come from: (source, "peer" or "remote",
        fallback): another node's copy with the remote store behind it, else the remote store."""
        remote = RemoteSource(self.remote, parse_s3_url(source), self.config.range_bytes)
        peer = self._peer_source(source, key)
        if peer is not None:
            return peer, "peer", remote
        return remote, "remote", None

    def _accounted(self, src: ChunkSource, where: str, stats: FetchStats, measured: bool) -> str:
        """Where a finished fetch's bytes came from in the end ("remote" when a peer failed
        partway), its rate counted as that link's when it measures one (`measured`; not a
        split fetch, nor one paced by a peer's own fetch from the remote store)."""
        if stats.fallback_bytes:
            return "remote"
        if measured and not (isinstance(src, PeerSource) and src.offer.tier == "fetching"):
            self.rates.observe(where, stats.from_source_bytes, stats.seconds)
        return where

    def _peer_source(self, source: str, key: str) -> PeerSource | None:
        """Another node's complete copy of `source`'s current version, or None: no peer has
        one, the peers could not be asked, or this node measured its peers slower than the
        remote store (but on every `peer_retry_every`-th such fetch). Uses the source's index
        (the authority on the version) as the freshness check just read it, else reads it."""
        if self.peers is None:
            return None
        rates = self.rates.rates()
        if rates.get("peer", math.inf) < rates.get("remote", 0.0):
            with self._lock:
                self._peer_skips += 1
                skip = self._peer_skips % self.config.peer_retry_every != 0
            if skip:
                return None
        try:
            offers = self.peers(key)
        except Exception as e:  # the cluster could not be asked: the remote store serves
            logger.warning("could not ask peers for %s: %s", source, e)
            return None
        if not offers:
            return None
        index: bytes | None
        with self._lock:
            read, at = self._index_read.pop(source, (b"", -math.inf))
        if time.monotonic() - at <= INDEX_REUSE_S:
            index = read  # the freshness check read it for this fetch a moment ago
        else:
            try:
                index = self.remote.get_bytes(parse_s3_url(source), INDEX_FILE)
            except RemoteStoreError as e:  # as `drop_stale` trusts cached copies then
                logger.warning("cannot read the source's index, trusting a peer's copy: %s", e)
                index = None
        for offer in offers:
            try:
                return PeerSource.connect(offer, key, index, self.config.range_bytes)
            except PeerError as e:
                logger.warning("peer copy not used source=%s: %s", source, e)
        return None

    def fetched_from(self, source: str) -> str | None:
        """Where the latest fetch of `source` (into DRAM, or SSD alone) reads from (or read
        from): "ssd", "peer", "remote" or "local"; None if it was never fetched here."""
        with self._lock:
            return self._fetched_from.get(checkpoint_key(source))

    def _fetch_to_dram(self, source: str, key: str, fetch: _Fetch) -> EnsureResult:
        src, where, to_ssd, fallback = self._source_for(source, key)
        with self._lock:
            self._fetched_from[key] = where
        try:
            return self._pipeline(src, key, where, to_ssd, fetch, fallback)
        finally:
            if where == "ssd":
                with self._lock:
                    self.ssd.unpin(key)

    def _pipeline(
        self,
        src: ChunkSource,
        key: str,
        where: str,
        to_ssd: bool,
        fetch: _Fetch | None,
        fallback: ChunkSource | None = None,
    ) -> EnsureResult:
        index_bytes = src.read_file(INDEX_FILE)
        if fetch is not None:
            fetch.index = index_bytes
        dram_partial = self.dram.partial_path(key)
        ssd_partial = self.ssd.partial_path(key)
        sinks = [dram_partial, *([ssd_partial] if to_ssd else [])]
        # Parse the index from a scratch copy first: the sizes decide the reservations.
        dram_partial.mkdir(parents=True, exist_ok=True)
        (dram_partial / INDEX_FILE).write_bytes(index_bytes)
        index = read_index(dram_partial)
        nbytes = sum(p.nbytes for p in index.partitions) + len(index_bytes)
        with self._lock:
            try:
                self.dram.reserve(key, nbytes)
            except BaseException:
                shutil.rmtree(dram_partial, ignore_errors=True)
                raise
            if to_ssd:
                try:
                    self.ssd.reserve(key, nbytes)
                except BaseException:
                    self.dram.abort(key, keep_partial=False)
                    raise
        logger.info(
            "fetch start key=%s from=%s bytes=%d to=%s", key, where, nbytes,
            "ssd+dram" if to_ssd else "dram",
        )  # fmt: skip
        try:
            prepare_sinks(index_bytes, index, src, sinks)
            for d in sinks:  # so status names the source after a restart too
                (d / SOURCE_FILE).write_text(self._sources.get(key, key))
            if fetch is not None:
                fetch.prepared.set()
            stats = run_fetch(
                index, src, sinks,
                resume=ssd_partial if to_ssd else None,
                chunk_bytes=self.config.chunk_bytes,
                threads=fetch.threads if fetch is not None else self.config.fetch_threads,
                fallback=fallback,
            )  # fmt: skip
        except BaseException:
            with self._lock:
                self.dram.abort(key, keep_partial=False)
                if to_ssd:
                    self.ssd.abort(key, keep_partial=True)  # the next fetch resumes from it
            raise
        with self._lock:
            if to_ssd:
                self.ssd.commit(key)
            path = self.dram.commit(key)
        logger.info(
            "fetch done key=%s from=%s bytes=%d source_bytes=%d fallback_bytes=%d "
            "reused_bytes=%d seconds=%.3f gbps=%.2f", key, where, stats.nbytes,
            stats.from_source_bytes, stats.fallback_bytes, stats.reused_bytes, stats.seconds,
            stats.nbytes / max(stats.seconds, 1e-9) / 1e9,
        )  # fmt: skip
        # (`_promote`'s background copy, one thread at the lowest priority, measures nothing)
        measured = fetch is None or fetch.threads == self.config.fetch_threads
        return EnsureResult(path, self._accounted(src, where, stats, measured), stats)

    def _ensure_ssd(self, source: str) -> EnsureResult:
        """Remote -> SSD only (no DRAM copy): prefetch to disk. Waits for a fetch of the same
        checkpoint already writing the SSD copy (a DRAM fetch from remote, another prefetch)
        instead of writing it twice."""
        key = checkpoint_key(source)
        if not is_s3_url(source):
            raise ConfigError(f"only s3:// sources are cached on SSD, got {source!r}")
        while True:
            with self._lock:
                self._sources[key] = source
                if self.ssd.has(key):
                    self.ssd.touch(key)
                    return EnsureResult(self.ssd.path(key), "ssd", None)
                running = self._fetches.get(key)
                busy = running.done if running is not None else self._ssd_fetches.get(key)
                if busy is None:
                    mine = self._ssd_fetches[key] = threading.Event()
                    break
            busy.wait()  # then look again: it may have failed, or not written SSD
        try:
            return self._fetch_to_ssd(source, key)
        finally:
            with self._lock:
                del self._ssd_fetches[key]
                self._ssd_fetch_index.pop(key, None)
            mine.set()

    def _fetch_to_ssd(self, source: str, key: str) -> EnsureResult:
        src, where, fallback = self._remote_source(source, key)
        index_bytes = src.read_file(INDEX_FILE)
        with self._lock:
            self._ssd_fetch_index[key] = index_bytes
            self._fetched_from[key] = where
        partial = self.ssd.partial_path(key)
        partial.mkdir(parents=True, exist_ok=True)
        scratch = partial.parent / f"{key}.index-{threading.get_ident()}"
        scratch.mkdir(exist_ok=True)
        (scratch / INDEX_FILE).write_bytes(index_bytes)
        index = read_index(scratch)
        (scratch / INDEX_FILE).unlink()
        scratch.rmdir()
        nbytes = sum(p.nbytes for p in index.partitions) + len(index_bytes)
        with self._lock:
            self.ssd.reserve(key, nbytes)
        try:
            prepare_sinks(index_bytes, index, src, [partial])
            (partial / SOURCE_FILE).write_text(source)
            stats = run_fetch(
                index, src, [partial], resume=partial,
                chunk_bytes=self.config.chunk_bytes, threads=self.config.fetch_threads,
                fallback=fallback,
            )  # fmt: skip
        except BaseException:
            with self._lock:
                self.ssd.abort(key, keep_partial=True)
            raise
        with self._lock:
            path = self.ssd.commit(key)
        return EnsureResult(path, self._accounted(src, where, stats, True), stats)
