"""The node store against a real S3-compatible server (moto, server mode, on 127.0.0.1):
remote -> SSD -> DRAM fetches, zero-copy maps of the DRAM tier, LRU eviction with pins, a
fetch cut off mid-transfer and resumed, and a flipped byte in the remote object."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from s3_support import Relay, moto_server, remote_config

from ember.errors import CheckpointCorruptError, RemoteStoreError, StoreCapacityError
from ember.store import convert, load, read_index
from ember.store.node_store import NodeStore, NodeStoreConfig, checkpoint_key
from ember.store.remote import RemoteStore, parse_s3_url
from ember.store.shm import is_dram_checkpoint, is_dram_path, map_checkpoint, map_dram

pytestmark = pytest.mark.s3

BLOCK = 4 << 20


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    with moto_server() as url:
        yield url


@pytest.fixture(scope="module")
def checkpoints(
    model_factory: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """Two small Llama checkpoints of ~17 MiB each (5 checksum blocks: several chunks)."""
    root = tmp_path_factory.mktemp("ck")
    out = {}
    for name, seed in (("a", 0), ("b", 1)):
        hf = model_factory("llama", "tiny", "fp32", seed=seed, vocab_size=32768)
        out[name] = convert(hf, root / name, progress=False)
    return out


@pytest.fixture(scope="module")
def pushed(endpoint: str, checkpoints: dict[str, Path]) -> dict[str, str]:
    remote = models_bucket(endpoint)
    urls = {}
    for name, ck in checkpoints.items():
        urls[name] = f"s3://models/ckpt/{name}"
        remote.upload_checkpoint(ck, parse_s3_url(urls[name]))
    return urls


def models_bucket(endpoint: str) -> RemoteStore:
    """The S3 server's "models" bucket (made if missing), through a client of its own."""
    remote = RemoteStore(remote_config(endpoint))
    remote.ensure_bucket("models")
    return remote


def make_store(tmp_path: Path, endpoint: str, **kw: Any) -> NodeStore:
    remote_kw = {k: kw.pop(k) for k in ("max_attempts", "backoff_s") if k in kw}
    peers = kw.pop("peers", None)
    args: dict[str, object] = {
        "dram_dir": str(Path("/dev/shm") / f"ember-test-{os.getpid()}-{tmp_path.name}"),
        "ssd_dir": str(tmp_path / "ssd"),
        "chunk_bytes": BLOCK,
        "range_bytes": 2 * BLOCK,
        "fetch_threads": 3,
        "remote": remote_config(endpoint, **remote_kw),
    }
    return NodeStore(NodeStoreConfig(**{**args, **kw}), peers=peers)  # type: ignore[arg-type]


@pytest.fixture
def dram_cleanup() -> Iterator[list[NodeStore]]:
    stores: list[NodeStore] = []
    yield stores
    import shutil

    for s in stores:
        shutil.rmtree(s.dram.root.parent if s.dram.root.name == "dram" else s.dram.root, True)


def assert_same_tensors(got: dict[str, torch.Tensor], ck: Path) -> None:
    want = load(ck)
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


def test_cold_fetch_goes_remote_to_ssd_and_dram_in_one_pass(
    tmp_path: Path, endpoint: str, pushed: dict[str, str], checkpoints: dict[str, Path],
    dram_cleanup: list[NodeStore],
) -> None:  # fmt: skip
    store = make_store(tmp_path, endpoint)
    dram_cleanup.append(store)
    url = pushed["a"]
    assert store.locate(url) is None
    first = store.ensure(url)
    assert first.served_from == "remote"
    assert first.stats is not None
    assert first.stats.from_source_bytes == read_index(checkpoints["a"]).rank_nbytes(0)
    assert store.locate(url) == "dram"
    assert store.ssd.has(checkpoint_key(url)) and store.dram.has(checkpoint_key(url))
    assert is_dram_checkpoint(first.path)
    assert_same_tensors(map_checkpoint(first.path), checkpoints["a"])
    assert_same_tensors(load(store.ssd.path(checkpoint_key(url))), checkpoints["a"])
    # Nothing left mid-fetch: only the link from the in-progress path to the complete copy.
    fetching = store.dram.partial_path("x").parent
    assert [p.is_symlink() for p in fetching.iterdir()] == [True]
    again = store.ensure(url)
    assert (again.served_from, again.stats) == ("dram", None)
    assert store.evict(url, "dram")
    from_ssd = store.ensure(url)
    assert from_ssd.served_from == "ssd"
    assert_same_tensors(map_checkpoint(from_ssd.path), checkpoints["a"])
    assert {(r.tier, r.key) for r in store.status()} == {("dram", url), ("ssd", url)}


def test_each_fetch_measures_its_link_and_a_restarted_store_remembers(
    tmp_path: Path, endpoint: str, pushed: dict[str, str], checkpoints: dict[str, Path],
    dram_cleanup: list[NodeStore],
) -> None:  # fmt: skip
    """The rates placement uses: bytes over seconds of each fetch, by where from, through a
    throttled link; kept next to the SSD tier for the next store on the node."""
    relay = Relay(int(endpoint.rsplit(":", 1)[1]))
    relay.delay_s = 0.005  # per 64 KiB relayed
    try:
        store = make_store(tmp_path, relay.endpoint, rate_min_bytes=1 << 20)
        dram_cleanup.append(store)
        url = pushed["a"]
        t0 = time.perf_counter()
        first = store.ensure(url)
        wall = time.perf_counter() - t0
        assert first.stats is not None and first.stats.from_source_bytes > 1 << 20
        remote = first.stats.from_source_bytes / first.stats.seconds
        assert store.rates.rates() == {"remote": pytest.approx(remote)}
        assert remote >= first.stats.from_source_bytes / wall  # the fetch, not the whole call
        assert store.evict(url, "dram")
        again = store.ensure(url)
        assert again.served_from == "ssd" and again.stats is not None
        ssd = again.stats.from_source_bytes / again.stats.seconds
        assert store.rates.rates() == {"remote": pytest.approx(remote), "ssd": pytest.approx(ssd)}
        assert make_store(tmp_path, relay.endpoint).rates.rates() == store.rates.rates()
        small = make_store(tmp_path / "other", relay.endpoint)  # the default: >= 64 MiB
        dram_cleanup.append(small)
        small.ensure(pushed["b"])
        assert small.rates.rates() == {}  # a 17 MiB fetch is mostly latency: not counted
    finally:
        relay.close()


def test_dram_map_is_a_view_of_the_shared_memory_not_a_copy(
    tmp_path: Path, endpoint: str, pushed: dict[str, str], dram_cleanup: list[NodeStore]
) -> None:
    store = make_store(tmp_path, endpoint)
    dram_cleanup.append(store)
    path = store.ensure(pushed["a"]).path
    index = read_index(path)
    entry = next(t for t in index.tensors if t.name == "model.embed_tokens.weight")
    tensors = map_checkpoint(path)
    emb = tensors[entry.name]
    before = emb.flatten()[0].item()
    # Rewrite the first element in the tmpfs file: a view of the mapping sees the change.
    fd = os.open(path / entry.partition, os.O_RDWR)
    try:
        old = os.pread(fd, 4, entry.offset)
        os.pwrite(fd, torch.tensor([1234.5], dtype=torch.float32).numpy().tobytes(), entry.offset)
        assert emb.flatten()[0].item() == 1234.5
        os.pwrite(fd, old, entry.offset)
    finally:
        os.close(fd)
    assert emb.flatten()[0].item() == before


def test_streaming_map_returns_tensors_of_a_fetch_still_in_progress(
    tmp_path: Path, endpoint: str, pushed: dict[str, str], checkpoints: dict[str, Path],
    dram_cleanup: list[NodeStore],
) -> None:  # fmt: skip
    relay = Relay(int(endpoint.rsplit(":", 1)[1]))
    relay.delay_s = 0.002  # ~30 MB/s: the fetch takes about half a second
    try:
        store = make_store(tmp_path, relay.endpoint)
        dram_cleanup.append(store)
        url = pushed["b"]
        path, complete = store.acquire_streaming(url)
        assert not complete and path == store.dram.partial_path(checkpoint_key(url))
        assert is_dram_path(path)
        tensors = map_dram(path, timeout_s=60)
        assert_same_tensors(tensors, checkpoints["b"])
        assert store.ensure(url).path == store.dram.path(checkpoint_key(url))  # committed
        assert store.locate(url) == "dram"
        assert [(r.tier, r.pins) for r in store.status()] == [("dram", 1), ("ssd", 0)]
        store.release(url)
        assert [r.pins for r in store.status()] == [0, 0]
    finally:
        relay.close()


def test_lru_eviction_under_small_dram_never_evicts_a_pinned_checkpoint(
    tmp_path: Path, endpoint: str, pushed: dict[str, str], checkpoints: dict[str, Path],
    dram_cleanup: list[NodeStore],
) -> None:  # fmt: skip
    one = read_index(checkpoints["a"]).rank_nbytes(0) + (64 << 10)
    store = make_store(tmp_path, endpoint, dram_capacity_bytes=one + (1 << 20))
    dram_cleanup.append(store)
    a, b = pushed["a"], pushed["b"]
    store.ensure(a)
    store.ensure(b)  # no room for both: a, least recently used, leaves DRAM (stays on SSD)
    assert (store.locate(a), store.locate(b)) == ("ssd", "dram")
    store.acquire(b)  # an instance uses b
    with pytest.raises(StoreCapacityError, match="pinned"):
        store.ensure(a)
    assert store.locate(b) == "dram"
    assert not store.dram.partial_path(checkpoint_key(a)).exists()
    store.release(b)
    assert store.ensure(a).served_from == "ssd"
    assert (store.locate(a), store.locate(b)) == ("dram", "ssd")


def test_fetch_cut_off_midway_leaves_nothing_trusted_and_resumes(
    tmp_path: Path, endpoint: str, pushed: dict[str, str], checkpoints: dict[str, Path],
    dram_cleanup: list[NodeStore],
) -> None:  # fmt: skip
    relay = Relay(int(endpoint.rsplit(":", 1)[1]))
    try:
        # One range at a time, so the chunks before the cut are complete and verified.
        store = make_store(
            tmp_path, relay.endpoint, max_attempts=2, backoff_s=0.01, fetch_threads=1
        )
        dram_cleanup.append(store)
        url, key = pushed["a"], checkpoint_key(pushed["a"])
        total = read_index(checkpoints["a"]).rank_nbytes(0)
        relay.budget_bytes = total // 2  # the server "dies" halfway through the bytes
        with pytest.raises(RemoteStoreError):
            store.ensure(url)
        assert store.locate(url) is None
        assert not store.dram.path(key).exists() and not store.dram.partial_path(key).exists()
        assert not store.ssd.path(key).exists()
        # A new store process on the same directories finds nothing complete...
        restarted = make_store(tmp_path, relay.endpoint)
        assert restarted.locate(url) is None
        relay.heal()
        result = restarted.ensure(url)
        # ...and resumes: verified chunks on SSD are reused, only the rest comes over the wire.
        assert result.stats is not None
        assert result.stats.reused_bytes >= BLOCK
        assert result.stats.from_source_bytes + result.stats.reused_bytes == total
        assert_same_tensors(map_checkpoint(result.path), checkpoints["a"])
        assert_same_tensors(load(restarted.ssd.path(key)), checkpoints["a"])
        again = make_store(tmp_path, relay.endpoint)  # a third process: finds both copies
        assert {(r.tier, r.key) for r in again.status()} == {("dram", url), ("ssd", url)}
    finally:
        relay.close()


def test_connection_cut_mid_body_is_reopened_where_it_stopped(
    tmp_path: Path, endpoint: str, pushed: dict[str, str], checkpoints: dict[str, Path],
    dram_cleanup: list[NodeStore],
) -> None:  # fmt: skip
    relay = Relay(int(endpoint.rsplit(":", 1)[1]))
    try:
        store = make_store(tmp_path, relay.endpoint, backoff_s=0.01)
        dram_cleanup.append(store)
        total = read_index(checkpoints["b"]).rank_nbytes(0)
        relay.cut_once_at = total // 3
        result = store.ensure(pushed["b"])
        assert store.remote.retries >= 1
        assert result.stats is not None and result.stats.from_source_bytes == total
        assert relay.sent < total + total // 4  # reopened at the cut, not from the start
        assert_same_tensors(map_checkpoint(result.path), checkpoints["b"])
    finally:
        relay.close()


def test_flipped_byte_in_remote_object_is_detected_and_named(
    tmp_path: Path, endpoint: str, checkpoints: dict[str, Path], dram_cleanup: list[NodeStore]
) -> None:
    remote = models_bucket(endpoint)
    url = parse_s3_url("s3://models/corrupt/a")
    remote.upload_checkpoint(checkpoints["a"], url)
    part = read_index(checkpoints["a"]).partitions[0]
    data = bytearray((checkpoints["a"] / part.file).read_bytes())
    where = BLOCK * 2 + 12345
    data[where] ^= 0x01
    remote._client.put_object(Bucket="models", Key=url.key(part.file), Body=bytes(data))
    store = make_store(tmp_path, endpoint)
    dram_cleanup.append(store)
    with pytest.raises(CheckpointCorruptError) as err:
        store.ensure(str(url))
    assert err.value.path == f"s3://models/corrupt/a/{part.file}"
    assert f"[{BLOCK * 2}, {BLOCK * 3})" in err.value.reason
    assert store.locate(str(url)) is None
    assert not store.dram.partial_path(checkpoint_key(str(url))).exists()


def test_pushed_hf_folder_serves_from_dram_with_the_same_tokens(
    tmp_path: Path, endpoint: str, model_factory: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch, dram_cleanup: list[NodeStore],
) -> None:  # fmt: skip
    from ember import LLM, SamplingParams
    from ember.cli.main import main

    hf = model_factory("llama", "tiny", "fp32", seed=3)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    url = "s3://pushed/models/tiny"
    argv = ["push", str(hf), url, "--endpoint-url", endpoint, "--create-bucket"]
    assert main(argv) == 0
    store = make_store(tmp_path, endpoint)
    dram_cleanup.append(store)
    path = store.acquire(url)  # what an instance does on a node: fetch, then pin while in use
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    want = LLM(str(hf), max_model_len=64).generate([1, 2, 3, 4], params)[0].token_ids
    llm = LLM(str(path), max_model_len=64)
    try:
        assert llm.generate([1, 2, 3, 4], params)[0].token_ids == want
    finally:
        llm.close()
        store.release(url)
    assert [r.pins for r in store.status() if r.tier == "dram"] == [0]


def test_api_side_files_of_an_s3_model_tokenize_like_the_folder(
    tmp_path: Path, endpoint: str, pushed: dict[str, str], checkpoints: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from ember.engine.tokenizer import Tokenizer
    from ember.store.remote import side_files_dir

    monkeypatch.setenv("EMBER_S3_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    local = Path(side_files_dir(pushed["a"], tmp_path))
    assert side_files_dir(pushed["a"], tmp_path) == str(local)  # downloaded once
    assert not list(local.glob("*.bin"))
    text = "hello node store"
    assert Tokenizer(local).encode(text) == Tokenizer(checkpoints["a"]).encode(text)
    assert side_files_dir("/some/folder", tmp_path) == "/some/folder"


def test_engine_built_on_a_fetch_in_progress_serves_the_same_tokens(
    tmp_path: Path, endpoint: str, model_factory: Callable[..., Path],
    dram_cleanup: list[NodeStore],
) -> None:  # fmt: skip
    from ember import LLM, SamplingParams

    hf = model_factory("llama", "tiny", "fp32", seed=3)
    remote = models_bucket(endpoint)
    url = "s3://models/streamed/tiny"
    remote.upload_checkpoint(convert(hf, tmp_path / "ck", progress=False), parse_s3_url(url))
    relay = Relay(int(endpoint.rsplit(":", 1)[1]))
    relay.delay_s = 0.05  # slow enough that the engine starts before the last chunk lands
    try:
        store = make_store(tmp_path, relay.endpoint)
        dram_cleanup.append(store)
        path, complete = store.acquire_streaming(url)
        assert not complete and ".fetching" in str(path)
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        llm = LLM(str(path), max_model_len=64)  # tokenizer, config, weights mapped as they land
        got = llm.generate([1, 2, 3, 4], params)[0].token_ids
        llm.close()
        want = LLM(str(hf), max_model_len=64).generate([1, 2, 3, 4], params)[0].token_ids
        assert got == want
        store.release(url)
    finally:
        relay.close()


def test_an_instance_maps_an_ssd_copy_checked_while_dram_gets_it_behind(
    tmp_path: Path, endpoint: str, pushed: dict[str, str], checkpoints: dict[str, Path],
    dram_cleanup: list[NodeStore],
) -> None:  # fmt: skip
    """A checkpoint on SSD only, in the page cache: `acquire_ssd` pins the SSD copy and hands
    its directory out (same tensors), DRAM gets a copy in the background, and the pin holds the
    SSD copy. Not in the page cache: None, for the usual fetch. The background copy, one
    thread at the lowest priority, is not a measure of the disk: it leaves the rates alone."""

    store = make_store(tmp_path, endpoint, rate_min_bytes=1)
    dram_cleanup.append(store)
    url = pushed["a"]
    assert store.acquire_ssd(url) is None  # nowhere local yet: the usual fetch
    store.ensure(url)
    assert store.acquire_ssd(url) is None  # in DRAM: map that
    assert store.evict(url, "dram")
    from ember.store.pagecache import evict as drop_from_page_cache

    ssd_files = [f for f in store.ssd.path(checkpoint_key(url)).iterdir() if f.suffix == ".bin"]
    assert max(drop_from_page_cache(f) for f in ssd_files) < 0.01
    assert store.acquire_ssd(url) is None  # on disk only: the O_DIRECT fetch is faster
    assert [r.pins for r in store.status()] == [0]
    for f in ssd_files:  # back into the page cache
        f.read_bytes()
    path = store.acquire_ssd(url)
    assert path == store.ssd.path(checkpoint_key(url)) and not is_dram_path(path)
    assert_same_tensors(map_checkpoint(path), checkpoints["a"])
    with pytest.raises(StoreCapacityError, match="in use"):
        store.evict(url, "ssd")
    deadline = time.monotonic() + 30
    while store.locate(url) != "dram":  # promoted behind the instance
        assert time.monotonic() < deadline
        time.sleep(0.02)
    store.ensure(url)  # the promotion has committed
    assert sorted((r.tier, r.pins) for r in store.status()) == [("dram", 0), ("ssd", 1)]
    assert set(store.rates.rates()) == {"remote"}  # the first fetch's; not the promotion's
    store.release(url, "ssd")
    assert [r.pins for r in store.status()] == [0, 0]


def test_a_damaged_ssd_copy_is_never_mapped_and_is_fetched_again(
    tmp_path: Path, endpoint: str, pushed: dict[str, str], checkpoints: dict[str, Path],
    dram_cleanup: list[NodeStore], caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    store = make_store(tmp_path, endpoint)
    dram_cleanup.append(store)
    url = pushed["b"]
    store.ensure(url)
    assert store.evict(url, "dram")
    ssd_dir = store.ssd.path(checkpoint_key(url))
    part = sorted(ssd_dir.glob("*.bin"))[0]
    with open(part, "r+b") as f:  # one flipped byte in the second checksum block
        f.seek(BLOCK + 123)
        byte = f.read(1)
        f.seek(BLOCK + 123)
        f.write(bytes([byte[0] ^ 0xFF]))
    with caplog.at_level("ERROR", logger="ember.store.node_store"):
        assert store.acquire_ssd(url) is None
    assert part.name in caplog.text and "checksum mismatch" in caplog.text
    assert not store.ssd.has(checkpoint_key(url))  # evicted, so nothing maps it later
    again = store.ensure(url)
    assert again.served_from == "remote"
    assert_same_tensors(map_checkpoint(again.path), checkpoints["b"])


def test_a_checkpoint_the_dram_tier_cannot_hold_is_mapped_from_disk(
    tmp_path: Path, endpoint: str, pushed: dict[str, str], checkpoints: dict[str, Path],
) -> None:  # fmt: skip
    """A DRAM tier smaller than the checkpoint (a container's 64 MiB /dev/shm): the store
    actor hands the instance a copy on disk instead of failing its start. From S3: fetched to
    SSD alone, pinned there; a local checkpoint: its own directory, nothing pinned."""
    import asyncio
    import shutil

    from ember.cluster.node_store_actor import NodeStoreActor

    shm = Path("/dev/shm") / f"ember-test-small-{os.getpid()}-{tmp_path.name}"
    config = NodeStoreConfig(
        dram_dir=str(shm), dram_capacity_bytes=1 << 20, ssd_dir=str(tmp_path / "ssd"),
        chunk_bytes=BLOCK, range_bytes=2 * BLOCK, remote=remote_config(endpoint),
    )  # fmt: skip
    actor = NodeStoreActor(config)
    try:
        url = pushed["a"]
        report = asyncio.run(actor.acquire(url, os.getpid(), streaming=True))
        assert report.served_from == "remote" and not is_dram_path(report.path)
        assert_same_tensors(map_checkpoint(report.path), checkpoints["a"])
        rows = asyncio.run(actor.status())
        assert [(r.tier, r.key, r.pins) for r in rows] == [("ssd", url, 1)]  # nothing in DRAM
        asyncio.run(actor.release(url, os.getpid()))
        assert [r.pins for r in asyncio.run(actor.status())] == [0]

        local = str(checkpoints["b"])
        report = asyncio.run(actor.acquire(local, os.getpid(), streaming=True))
        assert (report.path, report.served_from) == (local, "disk")
        assert [r.key for r in asyncio.run(actor.status())] == [url]
    finally:
        actor._slot_lock.close()
        shutil.rmtree(shm, ignore_errors=True)


def test_a_tier_never_claims_more_than_its_file_system(tmp_path: Path) -> None:
    from ember.store.node_store import fit_capacity

    st = os.statvfs(tmp_path)
    size = st.f_blocks * st.f_frsize
    assert fit_capacity(tmp_path, 1 << 60, "ssd") == size
    assert fit_capacity(tmp_path, 1 << 20, "ssd") == 1 << 20


def test_a_start_during_a_prefetch_to_ssd_leaves_both_tiers_whole(
    tmp_path: Path, endpoint: str, pushed: dict[str, str], checkpoints: dict[str, Path],
    dram_cleanup: list[NodeStore],
) -> None:  # fmt: skip
    """A deployment is prefetched to SSD when it is created; a request may wake it while that
    fetch runs. The instance's DRAM fetch must not write the SSD copy the prefetch is writing
    (two writers, two reservations): it waits for the prefetch and copies from SSD, so the
    bytes come from S3 once; a second prefetch waits for the first."""

    from ember.store import verify

    relay = Relay(int(endpoint.rsplit(":", 1)[1]))
    try:
        relay.delay_s = 0.002  # ~30 MB/s: the prefetch is still running when the start comes
        store = make_store(tmp_path, relay.endpoint)
        dram_cleanup.append(store)
        url, key = pushed["a"], checkpoint_key(pushed["a"])
        store.prefetch(url, "ssd")
        store.prefetch(url, "ssd")
        deadline = time.monotonic() + 30
        while relay.sent < (1 << 20):  # the prefetch is under way
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert not store.ssd.has(key)
        while not [r for r in store.status() if r.fetched]:  # progress shows in status
            assert time.monotonic() < deadline
            time.sleep(0.01)
        [row] = store.status()
        assert (row.tier, row.key) == ("ssd", url) and 0 < row.fetched < 1  # type: ignore[operator]
        assert row.nbytes == store.ssd.reserved()[key]
        result = store.ensure(url)  # what an instance's start does
        assert result.served_from == "ssd"  # it waited for the prefetch and read its copy
        assert_same_tensors(map_checkpoint(result.path), checkpoints["a"])
        total = read_index(checkpoints["a"]).rank_nbytes(0)
        assert relay.sent < total * 1.2  # the bytes came from S3 once
        while not store.ssd.has(key):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.2)  # the second prefetch finds the copy and returns
        assert sorted((r.tier, r.key, r.pins) for r in store.status()) == [
            ("dram", url, 0), ("ssd", url, 0),
        ]  # fmt: skip
        verify(store.ssd.path(key))  # every checksum of the SSD copy
        assert store.ssd.used_bytes() == store.ssd.items()[0].nbytes  # reserved once
    finally:
        relay.close()


def test_a_model_pushed_again_to_the_same_place_replaces_the_cached_copies(
    tmp_path: Path, endpoint: str, checkpoints: dict[str, Path], dram_cleanup: list[NodeStore]
) -> None:
    """An update in place (`ember push` of a new version to the same prefix): the next start
    gets the new weights, not this node's copies of the old ones. An instance still mapping the
    old copy keeps reading the old bytes (the copy is retired: unlinked, counted until its
    owner releases it), so old and new run side by side during a rolling update."""
    remote = models_bucket(endpoint)
    url = "s3://models/updated-in-place"
    key = checkpoint_key(url)
    remote.upload_checkpoint(checkpoints["a"], parse_s3_url(url))
    store = make_store(tmp_path, endpoint)
    dram_cleanup.append(store)
    old = map_checkpoint(store.acquire(url, owner=101))  # an instance runs version a
    assert_same_tensors(old, checkpoints["a"])
    size = store.dram.used_bytes()
    remote.upload_checkpoint(checkpoints["b"], parse_s3_url(url))  # version b, same place
    fresh = store.acquire(url, owner=102)  # the new revision's instance
    assert_same_tensors(map_checkpoint(fresh), checkpoints["b"])
    assert_same_tensors(old, checkpoints["a"])  # the old instance's mapping is untouched
    assert (
        read_index(store.ssd.path(key)).partitions == read_index(checkpoints["b"]).partitions
    )  # the SSD copy was replaced too
    assert [(r.key, r.owners) for r in store.dram.retired()] == [(key, [101])]
    assert store.dram.used_bytes() >= 2 * size - 4096  # both versions' memory is counted
    dram = [(r.key, r.pins, r.retired) for r in store.status() if r.tier == "dram"]
    assert dram == [(url, 1, False), (url, 1, True)]  # status shows where the memory is
    store.release(url, owner=101)  # the old instance stopped: its memory is accounted free
    assert store.dram.retired() == [] and store.dram.used_bytes() <= size + 4096
    assert [r.retired for r in store.status() if r.tier == "dram"] == [False]
    assert store.dram.pins(key) == 1  # the new instance's pin was not the one released
    store.release(url, owner=102)
    assert store.dram.pins(key) == 0


def test_a_cached_copy_handed_out_unchecked_is_confirmed_against_the_source(
    tmp_path: Path, endpoint: str, checkpoints: dict[str, Path], dram_cleanup: list[NodeStore]
) -> None:
    """`acquire_cached` pins a DRAM copy without asking S3; `is_current` asks afterwards (the
    pooled worker overlaps it with building its engine), about the index it handed out: true
    until a new version is pushed, and still false once the new version, fetched for another
    start, has taken the copy's directory name."""
    remote = models_bucket(endpoint)
    url = "s3://models/confirmed"
    remote.upload_checkpoint(checkpoints["a"], parse_s3_url(url))
    store = make_store(tmp_path, endpoint)
    dram_cleanup.append(store)
    assert store.acquire_cached(url, owner=1) is None  # nothing in DRAM: nothing pinned
    assert store.dram.pins(checkpoint_key(url)) == 0
    store.ensure(url)
    cached = store.acquire_cached(url, owner=1)
    assert cached is not None and store.dram.pins(checkpoint_key(url)) == 1
    path, index = cached
    assert store.is_current(url, index)
    remote.upload_checkpoint(checkpoints["b"], parse_s3_url(url))
    fresh = store.acquire(url, owner=2)  # another start meanwhile: a retired, b fetched
    assert fresh == path  # the same directory name, now version b
    assert not store.is_current(url, index)  # owner 1 mapped a: it must fetch again
    assert store.is_current(url, (fresh / "index.json").read_bytes())
    store.release(url, owner=1)
    store.release(url, owner=2)


def test_a_start_after_an_update_does_not_join_a_fetch_of_the_old_version(
    tmp_path: Path, endpoint: str, checkpoints: dict[str, Path], dram_cleanup: list[NodeStore]
) -> None:
    """A fetch of version a still running (a slow link) when version b is pushed to the same
    prefix: a start then must not take a's bytes as the current checkpoint. It waits for that
    fetch, then fetches b."""
    remote = models_bucket(endpoint)
    url = "s3://models/updated-mid-fetch"
    remote.upload_checkpoint(checkpoints["a"], parse_s3_url(url))
    relay = Relay(int(endpoint.rsplit(":", 1)[1]))
    relay.delay_s = 0.01  # per 64 KiB: a couple of seconds for the checkpoint
    try:
        store = make_store(tmp_path, relay.endpoint)
        dram_cleanup.append(store)
        old = store.start_fetch(url)  # e.g. a prefetch of version a
        assert old.prepared.wait(30) and not old.done.is_set()
        remote.upload_checkpoint(checkpoints["b"], parse_s3_url(url))  # version b, same place
        relay.delay_s = 0.0
        fresh = store.ensure(url)
        assert old.done.is_set()
        assert_same_tensors(map_checkpoint(fresh.path), checkpoints["b"])
    finally:
        relay.close()


def test_a_local_checkpoint_converted_again_in_place_is_not_served_from_an_old_copy(
    tmp_path: Path, endpoint: str, checkpoints: dict[str, Path], dram_cleanup: list[NodeStore]
) -> None:
    import shutil

    local = tmp_path / "model"
    shutil.copytree(checkpoints["a"], local)
    store = make_store(tmp_path, endpoint)
    dram_cleanup.append(store)
    assert_same_tensors(map_checkpoint(store.ensure(str(local)).path), checkpoints["a"])
    shutil.rmtree(local)
    shutil.copytree(checkpoints["b"], local)
    assert_same_tensors(map_checkpoint(store.ensure(str(local)).path), checkpoints["b"])


def test_an_unreachable_remote_leaves_the_cached_copy_serving(
    tmp_path: Path, endpoint: str, pushed: dict[str, str], checkpoints: dict[str, Path],
    dram_cleanup: list[NodeStore],
) -> None:  # fmt: skip
    relay = Relay(int(endpoint.rsplit(":", 1)[1]))
    try:
        store = make_store(tmp_path, relay.endpoint, backoff_s=0.01, max_attempts=2)
        dram_cleanup.append(store)
        store.ensure(pushed["a"])
        relay.down = True
        relay._cut_all()
        result = store.ensure(pushed["a"])  # the freshness check fails: the copy is trusted
        assert result.served_from == "dram"
        assert_same_tensors(map_checkpoint(result.path), checkpoints["a"])
    finally:
        relay.close()


def test_a_restarted_store_drops_dram_copies_of_local_checkpoints_that_are_gone(
    tmp_path: Path, endpoint: str, pushed: dict[str, str], checkpoints: dict[str, Path],
    dram_cleanup: list[NodeStore],
) -> None:  # fmt: skip
    import shutil

    kept, gone = tmp_path / "kept", tmp_path / "gone"
    shutil.copytree(checkpoints["a"], kept)
    shutil.copytree(checkpoints["b"], gone)
    store = make_store(tmp_path, endpoint)
    dram_cleanup.append(store)
    for source in (str(kept), str(gone), pushed["a"]):
        store.ensure(source)
    shutil.rmtree(gone)  # e.g. `ember cache prune` removed that conversion
    again = make_store(tmp_path, endpoint)  # the store restarts
    assert sorted(r.key for r in again.status() if r.tier == "dram") == sorted(
        [str(kept), pushed["a"]]
    )


# --- peers: a checkpoint another node holds comes from that node --------------------------------


class Peer:
    """Node A's store serving its copies over `ember.store.peer`, and the finder node B's store
    asks (what `NodeStoreActor._find_peers` does over Ray)."""

    def __init__(self, store: NodeStore) -> None:
        from ember.store.peer import PeerServer

        self.store = store
        self.server = PeerServer(self._resolve, "127.0.0.1")

    def _resolve(self, key: str) -> Path | None:
        copy = self.store.servable_copy(key)
        return None if copy is None else copy[0]

    def find(self, key: str) -> list[Any]:
        copy = self.store.servable_copy(key)
        return [] if copy is None else [self.server.offer("node-a", copy[1])]

    def close(self) -> None:
        self.server.close()


def test_a_checkpoint_a_peer_holds_comes_from_the_peer_not_the_remote_store(
    tmp_path: Path, endpoint: str, pushed: dict[str, str], checkpoints: dict[str, Path],
    dram_cleanup: list[NodeStore],
) -> None:  # fmt: skip
    relay = Relay(int(endpoint.rsplit(":", 1)[1]))
    a = make_store(tmp_path / "a", relay.endpoint)
    dram_cleanup.append(a)
    peer = Peer(a)
    try:
        url, key = pushed["a"], checkpoint_key(pushed["a"])
        assert a.ensure(url).served_from == "remote"
        b = make_store(tmp_path / "b", relay.endpoint, rate_min_bytes=1, peers=peer.find)
        dram_cleanup.append(b)
        before = relay.sent
        result = b.ensure(url)
        assert result.served_from == "peer"
        total = read_index(checkpoints["a"]).rank_nbytes(0)
        assert result.stats is not None and result.stats.from_source_bytes == total
        index_bytes = (checkpoints["a"] / "index.json").stat().st_size
        # From the remote store only its index, once (drop_stale's read serves the peer choice
        # too), with the response's headers: no partition byte.
        assert index_bytes > 4096 and relay.sent - before < index_bytes + 4096
        assert_same_tensors(map_checkpoint(result.path), checkpoints["a"])
        assert_same_tensors(load(b.ssd.path(key)), checkpoints["a"])  # on B's SSD too
        assert sorted(p.name for p in b.dram.path(key).iterdir()) == sorted(
            p.name for p in a.dram.path(key).iterdir()
        )
        assert "peer" in b.rates.rates()
        # A prefetch to SSD alone takes the peer too.
        assert b.evict(url, "ssd") and b.evict(url, "dram")
        assert b.ensure(url, "ssd").served_from == "peer"
        assert_same_tensors(load(b.ssd.path(key)), checkpoints["a"])
    finally:
        peer.close()
        relay.close()


def test_a_corrupt_or_vanishing_peer_copy_is_named_and_the_rest_comes_from_the_remote_store(
    tmp_path: Path, endpoint: str, pushed: dict[str, str], checkpoints: dict[str, Path],
    dram_cleanup: list[NodeStore], caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    url, key = pushed["b"], checkpoint_key(pushed["b"])
    a = make_store(tmp_path / "a", endpoint)
    dram_cleanup.append(a)
    a.ensure(url)
    part = read_index(checkpoints["b"]).partitions[0]
    total = read_index(checkpoints["b"]).rank_nbytes(0)
    with open(a.dram.path(key) / part.file, "r+b") as f:  # one flipped byte in block 3
        f.seek(BLOCK * 2 + 777)
        byte = f.read(1)
        f.seek(BLOCK * 2 + 777)
        f.write(bytes([byte[0] ^ 0x10]))
    peer = Peer(a)
    try:
        b = make_store(tmp_path / "b", endpoint, fetch_threads=1, peers=peer.find)
        dram_cleanup.append(b)
        with caplog.at_level("WARNING", logger="ember.store.fetch"):
            result = b.ensure(url)
        assert result.served_from == "remote"  # finished from the remote store
        assert result.stats is not None
        assert result.stats.from_source_bytes >= 2 * BLOCK  # the ranges before the bad block
        assert result.stats.from_source_bytes + result.stats.fallback_bytes == total
        failed = [r.getMessage() for r in caplog.records if "going on from s3://" in r.message]
        assert len(failed) == 1, caplog.text
        assert "peer node-a" in failed[0] and f"[{BLOCK * 2}, {BLOCK * 3})" in failed[0]
        assert_same_tensors(map_checkpoint(result.path), checkpoints["b"])
        assert_same_tensors(load(b.ssd.path(key)), checkpoints["b"])
        assert "peer" not in b.rates.rates()  # a split fetch measures neither link
    finally:
        peer.close()
    # A peer that dies halfway through (its connections cut, new ones refused).
    peer = Peer(a)
    with open(a.dram.path(key) / part.file, "r+b") as f:  # A's copy is whole again
        f.seek(BLOCK * 2 + 777)
        f.write(byte)
    relay = Relay(peer.server.port)
    relay.budget_bytes = total // 2
    try:
        offer = dataclasses.replace(peer.find(key)[0], port=relay.port)
        c = make_store(tmp_path / "c", endpoint, fetch_threads=1, peers=lambda k: [offer])
        dram_cleanup.append(c)
        result = c.ensure(url)
        assert result.served_from == "remote" and result.stats is not None
        assert result.stats.from_source_bytes > 0 and result.stats.fallback_bytes > 0
        assert_same_tensors(map_checkpoint(result.path), checkpoints["b"])
    finally:
        relay.close()
        peer.close()


def test_a_peer_with_another_version_or_unreachable_is_not_used(
    tmp_path: Path, endpoint: str, checkpoints: dict[str, Path], dram_cleanup: list[NodeStore]
) -> None:
    from ember.store.peer import PeerOffer

    remote = models_bucket(endpoint)
    url = "s3://models/peer-versions"
    remote.upload_checkpoint(checkpoints["a"], parse_s3_url(url))
    a = make_store(tmp_path / "a", endpoint)
    dram_cleanup.append(a)
    a.ensure(url)
    remote.upload_checkpoint(checkpoints["b"], parse_s3_url(url))  # a new version, same place
    peer = Peer(a)
    try:
        b = make_store(tmp_path / "b", endpoint, peers=peer.find)
        dram_cleanup.append(b)
        result = b.ensure(url)
        assert result.served_from == "remote"  # A holds the old version: not taken
        assert_same_tensors(map_checkpoint(result.path), checkpoints["b"])
    finally:
        peer.close()
    gone = PeerOffer("node-x", "dram", "127.0.0.1", peer.server.port, "t")  # closed: refused
    c = make_store(tmp_path / "c", endpoint, peers=lambda key: [gone])
    dram_cleanup.append(c)
    assert c.ensure(url).served_from == "remote"
    d = make_store(tmp_path / "d", endpoint, peer_fetch=False, peers=peer.find)
    dram_cleanup.append(d)
    assert d.peers is None  # peer_fetch=False: the store never asks


def test_a_node_that_measured_its_peers_slower_than_s3_tries_them_now_and_then(
    tmp_path: Path, endpoint: str, pushed: dict[str, str], dram_cleanup: list[NodeStore]
) -> None:
    url = pushed["a"]
    a = make_store(tmp_path / "a", endpoint)
    dram_cleanup.append(a)
    a.ensure(url)
    peer = Peer(a)
    try:
        b = make_store(tmp_path / "b", endpoint, peers=peer.find, peer_retry_every=2)
        dram_cleanup.append(b)
        b.rates.observe("peer", 1 << 30, 10.0)  # 0.1 GB/s
        b.rates.observe("remote", 1 << 30, 1.0)  # 1 GB/s
        froms = []
        for _ in range(4):
            froms.append(b.ensure(url).served_from)
            assert b.evict(url, "dram") and b.evict(url, "ssd")
        assert froms == ["remote", "peer", "remote", "peer"]
    finally:
        peer.close()


def test_nodes_waking_one_model_at_once_read_it_from_s3_once(
    tmp_path: Path, endpoint: str, pushed: dict[str, str], checkpoints: dict[str, Path],
    dram_cleanup: list[NodeStore],
) -> None:  # fmt: skip
    """A's fetch from a slow S3 is still running when B needs the same checkpoint: A offers its
    fetch in progress and B reads each block from A once A has verified it, so S3 sends the
    bytes once. If A's fetch then fails, B goes on from S3."""
    url, key = pushed["b"], checkpoint_key(pushed["b"])
    total = read_index(checkpoints["b"]).rank_nbytes(0)
    port = int(endpoint.rsplit(":", 1)[1])
    relay = Relay(port)
    relay.delay_s = 0.01  # per 64 KiB: ~2.7 s for the checkpoint
    a = make_store(tmp_path / "a", relay.endpoint)
    dram_cleanup.append(a)
    peer = Peer(a)
    try:
        fetch = a.start_fetch(url)
        assert fetch.prepared.wait(30)
        assert peer.find(key)[0].tier == "fetching"
        b = make_store(tmp_path / "b", relay.endpoint, peers=peer.find, rate_min_bytes=1)
        dram_cleanup.append(b)
        result = b.ensure(url)
        assert result.served_from == "peer"
        assert result.stats is not None and result.stats.from_source_bytes == total
        assert not fetch.done.is_set() or fetch.error is None
        fetch.done.wait(60)
        assert relay.sent < total + total // 5  # once (plus indexes, small files, headers)
        assert_same_tensors(map_checkpoint(result.path), checkpoints["b"])
        assert_same_tensors(map_checkpoint(a.dram.path(key)), checkpoints["b"])
        assert "peer" not in b.rates.rates()  # paced by A's S3 fetch: measures no link
    finally:
        peer.close()
        relay.close()
    # A's fetch dies halfway: B, waiting on its blocks, is refused and finishes from S3.
    relay_a = Relay(port)
    relay_a.delay_s = 0.01
    relay_a.budget_bytes = total // 2
    c = make_store(tmp_path / "c", relay_a.endpoint, max_attempts=1, backoff_s=0.01)
    dram_cleanup.append(c)
    peer = Peer(c)
    try:
        fetch = c.start_fetch(url)
        assert fetch.prepared.wait(30)
        d = make_store(tmp_path / "d", endpoint, peers=peer.find)
        dram_cleanup.append(d)
        result = d.ensure(url)
        fetch.done.wait(60)
        assert fetch.error is not None  # A's fetch did fail
        assert result.served_from == "remote" and result.stats is not None
        assert result.stats.fallback_bytes > 0
        assert_same_tensors(map_checkpoint(result.path), checkpoints["b"])
    finally:
        peer.close()
        relay_a.close()
