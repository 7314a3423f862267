"""Tier bookkeeping (capacity, LRU order, pins, atomic commit) on plain directories, with a fake
clock; the S3 and Ray paths are in tests/integration/test_node_store_*.py."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from ember.errors import CheckpointCorruptError, StoreCapacityError
from ember.store.node_store import checkpoint_key
from ember.store.tiers import Tier


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def add(tier: Tier, key: str, nbytes: int) -> None:
    """What a fetch does: reserve, write into .fetching/<key>, commit."""
    tier.reserve(key, nbytes)
    d = tier.partial_path(key)
    d.mkdir(parents=True)
    (d / "index.json").write_text("{}")
    (d / "rank0-part0000.bin").write_bytes(bytes(nbytes - 2))
    tier.commit(key)


def test_least_recently_used_unpinned_checkpoint_is_evicted_first(tmp_path: Path) -> None:
    tier = Tier("dram", tmp_path, capacity_bytes=300, clock=Clock())
    for key in ("a", "b", "c"):
        add(tier, key, 100)
    tier.touch("a")  # b is now the least recently used
    assert tier.reserve("d", 100) == ["b"]
    assert not tier.path("b").exists() and tier.has("a") and tier.has("c")


def test_pinned_checkpoint_is_never_evicted_and_the_error_names_it(tmp_path: Path) -> None:
    tier = Tier("dram", tmp_path, capacity_bytes=200, clock=Clock())
    add(tier, "a", 100)
    add(tier, "b", 100)
    tier.pin("a")
    tier.pin("b")
    with pytest.raises(StoreCapacityError, match=r"pinned \(in use or loading\): \['a', 'b'\]"):
        tier.reserve("c", 100)
    with pytest.raises(StoreCapacityError, match="in use or loading"):
        tier.evict("a")
    tier.unpin("b")
    assert tier.reserve("c", 100) == ["b"]
    assert tier.has("a")


def test_a_retired_copy_keeps_its_owners_bytes_and_mapping_until_they_unpin(
    tmp_path: Path,
) -> None:
    """A newer version takes the name of a pinned copy: the old one leaves the tier (its files
    unlinked; a process that mapped them still reads them) but its bytes stay counted, and each
    owner's unpin goes to the copy that owner pinned."""
    import mmap

    tier = Tier("dram", tmp_path, capacity_bytes=300, clock=Clock())
    add(tier, "m", 100)
    tier.pin("m", owner=7)
    tier.pin("m", owner=8)
    with open(tier.path("m") / "rank0-part0000.bin", "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    assert tier.retire("m") == 2
    assert not tier.has("m") and not tier.path("m").exists()
    assert mapped[:98] == bytes(98)  # unlinked, still readable through the mapping
    mapped.close()
    assert tier.used_bytes() == 100
    with pytest.raises(StoreCapacityError, match="no room"):
        tier.reserve("x", 250)  # the retired bytes still count
    add(tier, "m", 100)  # the new version, under the same name
    tier.pin("m", owner=9)
    tier.unpin("m", owner=7)  # an old owner: the retired copy's pin, not the new one's
    assert tier.pins("m") == 1 and [r.owners for r in tier.retired()] == [[8]]
    tier.unpin("m", owner=8)
    assert tier.retired() == [] and tier.used_bytes() == 100
    tier.unpin("m", owner=9)
    assert tier.pins("m") == 0
    assert tier.retire("absent") == 0


def test_a_checkpoint_larger_than_the_tier_names_the_knob(tmp_path: Path) -> None:
    tier = Tier("ssd", tmp_path, capacity_bytes=50)
    with pytest.raises(StoreCapacityError, match="ssd_capacity_bytes"):
        tier.reserve("big", 51)


def test_only_committed_checkpoints_survive_a_restart(tmp_path: Path) -> None:
    tier = Tier("ssd", tmp_path, capacity_bytes=1000)
    add(tier, "done", 100)
    tier.reserve("half", 100)
    tier.partial_path("half").mkdir()
    (tier.partial_path("half") / "index.json").write_text("{}")
    restarted = Tier("ssd", tmp_path, capacity_bytes=1000)
    assert [i.key for i in restarted.items()] == ["done"]
    assert restarted.used_bytes() == 100
    assert not restarted.has("half")


def test_a_restarted_dram_tier_drops_interrupted_fetches_and_ssd_keeps_them_to_resume(
    tmp_path: Path,
) -> None:
    for name, resumable in (("dram", False), ("ssd", True)):
        root = tmp_path / name
        tier = Tier(name, root, capacity_bytes=1000, resumable=resumable)
        add(tier, "done", 100)
        tier.reserve("half", 100)
        tier.partial_path("half").mkdir()
        (tier.partial_path("half") / "rank0-part0000.bin").write_bytes(bytes(40))
        trash = root / ".fetching" / "old.evicting-123"  # an eviction cut off mid-delete
        trash.mkdir()
        restarted = Tier(name, root, capacity_bytes=1000, resumable=resumable)
        assert [i.key for i in restarted.items()] == ["done"]
        assert restarted.partial_path("half").exists() == resumable
        assert not trash.exists()


def test_stores_on_one_machine_get_distinct_slots_and_a_restart_gets_the_free_one(
    tmp_path: Path,
) -> None:
    """A slot is held by an open lock file: a store that ends (here: its lock closed) frees
    its slot for the next store, which finds the same DRAM and SSD directories."""
    import socket

    from ember.store.node_store import NodeStoreConfig, claim_slot

    base = NodeStoreConfig(dram_dir=str(tmp_path / "dram"), ssd_dir=str(tmp_path / "ssd"))
    first, first_lock = claim_slot(base)
    second, second_lock = claim_slot(base)
    host = socket.gethostname()
    assert Path(first.dram_dir) == tmp_path / "dram" / "slot-0"
    assert Path(first.ssd_dir) == tmp_path / "ssd" / host / "slot-0"
    assert Path(second.dram_dir) == tmp_path / "dram" / "slot-1"
    first_lock.close()  # the first store's process ended
    again, again_lock = claim_slot(base)
    assert (again.dram_dir, again.ssd_dir) == (first.dram_dir, first.ssd_dir)
    second_lock.close()
    again_lock.close()


def test_abort_keeps_partial_files_only_when_asked(tmp_path: Path) -> None:
    tier = Tier("ssd", tmp_path, capacity_bytes=1000)
    for key, keep in (("kept", True), ("dropped", False)):
        tier.reserve(key, 100)
        tier.partial_path(key).mkdir()
        tier.abort(key, keep_partial=keep)
        assert tier.partial_path(key).exists() == keep
        assert tier.pins(key) == 0
    assert tier.used_bytes() == 0


def test_checkpoint_keys_are_stable_readable_and_distinct() -> None:
    a = checkpoint_key("s3://bucket/models/llama")
    assert a == checkpoint_key("s3://bucket/models/llama/")
    assert a.startswith("s3-bucket-models-llama-")
    assert a != checkpoint_key("s3://bucket/models/llama2")
    assert "/" not in checkpoint_key("/some/local/dir")


def test_checkpoint_errors_survive_pickling_with_path_and_reason() -> None:
    err = pickle.loads(pickle.dumps(CheckpointCorruptError("s3://b/p/f.bin", "checksum")))
    assert isinstance(err, CheckpointCorruptError)
    assert (err.path, err.reason, str(err)) == (
        "s3://b/p/f.bin",
        "checksum",
        "s3://b/p/f.bin: checksum",
    )


def test_in_progress_path_keeps_leading_to_the_files_after_commit_until_eviction(
    tmp_path: Path,
) -> None:
    tier = Tier("dram", tmp_path, capacity_bytes=1000)
    add(tier, "a", 100)
    assert tier.partial_path("a").resolve() == tier.path("a").resolve()
    assert (tier.partial_path("a") / "index.json").read_text() == "{}"
    assert tier.evict("a")
    assert not tier.partial_path("a").is_symlink() and not tier.path("a").exists()


def test_wait_fetched_returns_the_complete_copy_once_committed(tmp_path: Path) -> None:
    import threading

    from ember.store.shm import wait_fetched

    tier = Tier("dram", tmp_path, capacity_bytes=1000)
    tier.reserve("a", 100)
    tier.partial_path("a").mkdir()
    timer = threading.Timer(0.2, tier.commit, args=("a",))
    timer.start()
    assert wait_fetched(tier.partial_path("a"), timeout_s=10) == tier.path("a")
    timer.join()
    assert wait_fetched(tier.path("a")) == tier.path("a")


def test_settled_path_leads_through_the_commit_even_between_its_two_steps(tmp_path: Path) -> None:
    """A commit renames `.fetching/<key>` to `<key>` and then links the old name to it: a
    reader given the in-progress path that looks between the two found neither (an instance
    failed with "no such directory"). `settled_path` gives the complete copy from the rename
    on, the in-progress path before it."""
    import os

    from ember.store.shm import settled_path

    tier = Tier("dram", tmp_path, capacity_bytes=1000)
    tier.reserve("a", 100)
    partial = tier.partial_path("a")
    partial.mkdir()
    assert settled_path(partial) == partial  # in progress
    os.rename(partial, tier.path("a"))  # the commit's first step alone: the gap
    assert not partial.exists()
    assert settled_path(partial) == tier.path("a")
    os.rename(tier.path("a"), partial)
    tier.commit("a")  # both steps
    assert settled_path(partial) == tier.path("a")
    assert settled_path(tier.path("a")) == tier.path("a")  # not an in-progress path
    gone = tier.partial_path("aborted")
    assert settled_path(gone, wait_s=0.01) == gone  # nothing to lead to: the reader names it
