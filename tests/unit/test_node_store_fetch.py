"""The fetch pipeline from a local directory (what an SSD -> DRAM fill runs): every byte
arrives verified, concurrent ranges go to different files, and a read from disk does not leave a
second copy of the checkpoint in the page cache (it reads uncached files with O_DIRECT)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ember.store import convert, read_index
from ember.store.fetch import LocalSource, interleave, plan, prepare_sinks, run_fetch
from ember.store.format import INDEX_FILE
from ember.store.pagecache import evict, resident_fraction

MIB = 1 << 20


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 20 MB in 3 partitions of at most 8 MiB."""
    root = tmp_path_factory.mktemp("fetch")
    g = torch.Generator().manual_seed(3)
    src = {f"w{i}": torch.randn(1024, 1024, generator=g) for i in range(5)}
    (root / "hf").mkdir()
    save_file(src, str(root / "hf" / "model.safetensors"))
    (root / "hf" / "config.json").write_text(json.dumps({}))
    return convert(root / "hf", root / "ck", progress=False, partition_bytes=8 * MIB)


def fetch(ck: Path, sink: Path, threads: int) -> None:
    index = read_index(ck)
    source = LocalSource(ck, range_bytes=4 * MIB)
    prepare_sinks((ck / INDEX_FILE).read_bytes(), index, source, [sink])
    run_fetch(index, source, [sink], resume=None, chunk_bytes=4 * MIB, threads=threads)


def test_ranges_alternate_between_files_and_keep_each_files_order(checkpoint: Path) -> None:
    index = read_index(checkpoint)
    ranges = plan(index, 4 * MIB, 4 * MIB)
    order = [(r[0].partition.file, r[0].offset) for r in interleave(ranges)]
    files = sorted({f for f, _ in order})
    assert len(files) == 3 and sorted(order) == sorted(
        (r[0].partition.file, r[0].offset) for r in ranges
    )
    assert [f for f, _ in order[:3]] == files  # one range of each file before any second one
    for f in files:
        offsets = [o for g, o in order if g == f]
        assert offsets == sorted(offsets)


@pytest.mark.parametrize("threads", [1, 3])
def test_local_fetch_copies_every_partition_byte_for_byte(
    checkpoint: Path, tmp_path: Path, threads: int
) -> None:
    fetch(checkpoint, tmp_path / "sink", threads)
    for p in read_index(checkpoint).partitions:
        assert (tmp_path / "sink" / p.file).read_bytes() == (checkpoint / p.file).read_bytes()


def test_fetch_from_disk_leaves_no_copy_in_the_page_cache(checkpoint: Path, tmp_path: Path) -> None:
    files = [checkpoint / p.file for p in read_index(checkpoint).partitions]
    if max(evict(f) for f in files) > 0.0:
        pytest.skip("this file system keeps the files cached (tmpfs?)")
    fetch(checkpoint, tmp_path / "sink", threads=1)
    left = max(resident_fraction(f) for f in files)
    assert left < 0.5  # read with O_DIRECT; buffered reads would leave 1.0


def test_fetch_of_a_cached_source_leaves_it_cached(checkpoint: Path, tmp_path: Path) -> None:
    files = [checkpoint / p.file for p in read_index(checkpoint).partitions]
    for f in files:
        with open(f, "rb") as h:
            os.posix_fadvise(h.fileno(), 0, 0, os.POSIX_FADV_WILLNEED)
            h.read()
    fetch(checkpoint, tmp_path / "sink", threads=1)
    assert min(resident_fraction(f) for f in files) == 1.0


def test_missing_s3_credentials_fail_at_once_saying_what_to_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not transient: no retries, and the message says what to set (a deploy of an s3://
    source checks it at once)."""
    from ember.errors import RemoteStoreError
    from ember.store.node_store import NodeStore, NodeStoreConfig
    from ember.store.remote import RemoteConfig

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    store = NodeStore(
        NodeStoreConfig(
            dram_dir=str(tmp_path / "dram"), ssd_dir=str(tmp_path / "ssd"),
            remote=RemoteConfig(endpoint_url="http://127.0.0.1:9"),
        )
    )  # fmt: skip
    with pytest.raises(RemoteStoreError, match="m/index.json: no S3 credentials .*AWS_ACCESS"):
        store.check("s3://b/m")
    assert store.remote.retries == 0
