"""The loader: one allocation per load, every read path gives the same bytes, and every kind of
damaged checkpoint raises a CheckpointError subclass naming the file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ember.cli.main import main as ember_main
from ember.engine.checkpoint import load_rank
from ember.errors import (
    CheckpointCorruptError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    ConfigError,
)
from ember.store import LoaderConfig, convert, load, read_index, verify
from ember.store.hostmem import HOST_POOL, HostPool, alloc_host
from ember.store.pagecache import evict, map_range, populate, resident_fraction, unmap_range
from ember.store.shm import map_checkpoint

BLOCK = 4 << 20


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """About 10 MB in 2 partitions: several checksum blocks and loader chunks per file."""
    root = tmp_path_factory.mktemp("ck")
    g = torch.Generator().manual_seed(1)
    src = {
        f"model.layers.{i}.mlp.up_proj.weight": torch.randn(1280, 1024, generator=g).bfloat16()
        for i in range(4)
    }
    src["model.norm.weight"] = torch.randn(1024, generator=g)
    (root / "hf").mkdir()
    save_file(src, str(root / "hf" / "model.safetensors"))
    (root / "hf" / "config.json").write_text(json.dumps({"num_attention_heads": 4}))
    ck = convert(root / "hf", root / "ck", progress=False, partition_bytes=6 << 20)
    return ck, src


def copy_checkpoint(ck: Path, to: Path) -> Path:
    to.mkdir()
    for f in ck.iterdir():
        (to / f.name).write_bytes(f.read_bytes())
    return to


@pytest.mark.parametrize(
    "config",
    [
        LoaderConfig(),
        LoaderConfig(threads=1, chunk_bytes=4096 * 3, io_mode="buffered"),
        LoaderConfig(threads=3, chunk_bytes=1 << 20, io_mode="direct", verify_checksums=True),
        LoaderConfig(huge_pages=False, verify_checksums=True),
    ],
    ids=["default", "buffered-small-chunks", "direct-verify", "small-pages"],
)
def test_every_read_path_gives_the_source_tensors(
    checkpoint: tuple[Path, dict], config: LoaderConfig
) -> None:
    ck, src = checkpoint
    out = load(ck, config=config)
    assert list(out) == list(read_index(ck).tensors_for(0)[i].name for i in range(len(out)))
    assert set(out) == set(src)
    for name, want in src.items():
        assert torch.equal(out[name], want), name


def test_tensors_are_views_into_one_allocation(checkpoint: tuple[Path, dict]) -> None:
    ck, _ = checkpoint
    out = load(ck)
    index = read_index(ck)
    storages = {t.untyped_storage().data_ptr() for t in out.values()}
    assert len(storages) == 1
    base = storages.pop()
    assert all(t.data_ptr() - base < index.rank_nbytes(0) for t in out.values())


def test_loaded_tensors_outlive_the_loader_and_are_writable(checkpoint: tuple[Path, dict]) -> None:
    ck, src = checkpoint
    norm = load(ck)["model.norm.weight"]  # the dict and every other view are gone
    norm.add_(1)
    assert torch.equal(norm, src["model.norm.weight"] + 1)


def test_tmpfs_checkpoint_loads_in_every_io_mode(checkpoint: tuple[Path, dict]) -> None:
    # Kernels before 6.6 refuse O_DIRECT on tmpfs (EINVAL): "auto" then reads buffered and
    # "direct" raises ConfigError. Newer kernels accept it; either way the bytes must match.
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm")
    ck, src = checkpoint
    shm = Path("/dev/shm") / f"ember-test-{os.getpid()}"
    try:
        copy_checkpoint(ck, shm)
        for mode in ("auto", "buffered", "direct"):
            try:
                out = load(shm, config=LoaderConfig(io_mode=mode, verify_checksums=True))
            except ConfigError as e:
                assert mode == "direct" and "refuses O_DIRECT" in str(e)
                continue
            assert all(torch.equal(out[k], v) for k, v in src.items())
    finally:
        for f in shm.glob("*"):
            f.unlink()
        shm.rmdir()


def test_evicted_file_is_read_with_o_direct_and_cached_file_buffered(
    checkpoint: tuple[Path, dict], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ck = copy_checkpoint(checkpoint[0], tmp_path / "ck")
    parts = sorted(ck.glob("*.bin"))
    for p in parts:
        assert evict(p) < 0.05
    caplog.set_level("INFO", logger="ember.store.loader")
    load(ck, config=LoaderConfig(chunk_bytes=1 << 20))
    chunks = sum(-(-p.nbytes // (1 << 20)) for p in read_index(ck).partitions)
    assert f"direct_chunks={chunks}" in caplog.text  # all on disk: all read around the cache
    for p in parts:
        (ck / p).read_bytes()
        assert resident_fraction(p) == 1.0
    caplog.clear()
    load(ck, config=LoaderConfig(chunk_bytes=1 << 20))
    assert "direct_chunks=0" in caplog.text


def test_missing_partition_raises_not_found_naming_it(
    checkpoint: tuple[Path, dict], tmp_path: Path
) -> None:
    ck = copy_checkpoint(checkpoint[0], tmp_path / "ck")
    (ck / "rank0-part0001.bin").unlink()
    with pytest.raises(
        CheckpointNotFoundError, match="rank0-part0001.bin: partition file is missing"
    ):
        load(ck)


def truncated_copy(src: Path, dst: Path) -> Path:
    """A copy of the checkpoint whose first partition is cut to 5 pages (TRUNCATED says so)."""
    ck = copy_checkpoint(src, dst)
    with open(ck / "rank0-part0000.bin", "r+b") as f:
        f.truncate(4096 * 5)
    return ck


TRUNCATED = r"rank0-part0000.bin: partition truncated: 20480 bytes"


def test_truncated_partition_raises_corrupt(checkpoint: tuple[Path, dict], tmp_path: Path) -> None:
    ck = truncated_copy(checkpoint[0], tmp_path / "ck")
    with pytest.raises(CheckpointCorruptError, match=TRUNCATED):
        load(ck)
    with pytest.raises(CheckpointCorruptError, match="truncated"):
        verify(ck)


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x10]))


def test_flipped_byte_is_caught_by_verifying_load_and_by_verify(
    checkpoint: tuple[Path, dict], tmp_path: Path
) -> None:
    ck = copy_checkpoint(checkpoint[0], tmp_path / "ck")
    flip_byte(ck / "rank0-part0001.bin", BLOCK + 12345)
    with pytest.raises(
        CheckpointCorruptError, match=r"rank0-part0001.bin: checksum mismatch in bytes \[4194304, "
    ):
        load(ck, config=LoaderConfig(verify_checksums=True))
    with pytest.raises(CheckpointCorruptError, match="rank0-part0001.bin: checksum mismatch"):
        verify(ck)
    assert ember_main(["verify", str(ck)]) == 1


def test_verify_accepts_an_intact_checkpoint(
    checkpoint: tuple[Path, dict], capsys: pytest.CaptureFixture[str]
) -> None:
    ck, _ = checkpoint
    report = verify(ck)
    assert report.nbytes == read_index(ck).rank_nbytes(0) and report.partitions == 2
    assert ember_main(["verify", str(ck)]) == 0
    assert ": ok, 5 tensor entries in 2 partition files" in capsys.readouterr().out


def edit_index(ck: Path, fn: object) -> None:
    doc = json.loads((ck / "index.json").read_text())
    assert callable(fn)
    fn(doc)
    (ck / "index.json").write_text(json.dumps(doc))


def test_unknown_format_version_is_refused(checkpoint: tuple[Path, dict], tmp_path: Path) -> None:
    ck = copy_checkpoint(checkpoint[0], tmp_path / "ck")
    edit_index(ck, lambda d: d.update(format_version=99))
    with pytest.raises(CheckpointFormatError, match="index.json: unknown format version 99"):
        load(ck)


def test_index_pointing_past_a_file_end_is_corrupt(
    checkpoint: tuple[Path, dict], tmp_path: Path
) -> None:
    ck = copy_checkpoint(checkpoint[0], tmp_path / "ck")
    edit_index(ck, lambda d: d["tensors"][-1].update(offset=d["partitions"][-1]["nbytes"]))
    with pytest.raises(CheckpointCorruptError, match="points past the end of rank0-part0001.bin"):
        read_index(ck)


def test_index_that_is_not_json_is_a_format_error(tmp_path: Path) -> None:
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(CheckpointFormatError, match="not valid JSON"):
        load(tmp_path)


def test_missing_checkpoint_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="no such checkpoint directory"):
        load(tmp_path / "absent")


def test_rank_outside_tp_is_a_config_error(checkpoint: tuple[Path, dict]) -> None:
    with pytest.raises(ConfigError, match="rank 1 is outside this checkpoint's tp=1"):
        load(checkpoint[0], rank=1)


def test_bad_loader_settings_name_the_field() -> None:
    with pytest.raises(ConfigError, match="chunk_bytes"):
        LoaderConfig(chunk_bytes=1000)
    with pytest.raises(ConfigError, match="io_mode"):
        LoaderConfig(io_mode="mmap")


def test_reused_host_memory_serves_the_next_load_without_new_mapping(
    checkpoint: tuple[Path, dict],
) -> None:
    ck, src = checkpoint
    pool = HostPool(max_idle_bytes=64 << 20)
    first = alloc_host(read_index(ck).rank_nbytes(0), pool=pool)
    address = first.data_ptr()
    first.fill_(7)
    view = first[4096:8192]
    del first
    assert (pool.idle_bytes, pool.hits) == (0, 0)  # a view still holds the mapping
    del view
    assert pool.idle_bytes >= read_index(ck).rank_nbytes(0)
    again = alloc_host(read_index(ck).rank_nbytes(0), pool=pool)
    assert (again.data_ptr(), pool.hits, pool.idle_bytes) == (address, 1, 0)
    del again
    pool.clear()


def test_pooled_loads_give_the_source_tensors_every_time(checkpoint: tuple[Path, dict]) -> None:
    ck, src = checkpoint
    config = LoaderConfig(reuse_host_memory=True)
    for _ in range(2):
        out = load(ck, config=config)
        assert all(torch.equal(out[k], v) for k, v in src.items())
        del out


def test_default_load_reuses_freed_memory_but_never_memory_still_referenced(
    checkpoint: tuple[Path, dict],
) -> None:
    ck, src = checkpoint
    name = next(iter(src))
    HOST_POOL.clear()  # what earlier tests freed
    first = load(ck)  # defaults: host memory from the process-wide pool
    first_ptr = first[name].data_ptr()
    kept = first[name][:2]  # one small view keeps the whole allocation alive
    del first
    second = load(ck)
    assert second[name].data_ptr() != first_ptr  # the live view's memory was not handed out
    second[name].zero_()
    assert torch.equal(kept, src[name][:2])  # and nothing wrote into it
    del kept
    second_ptr = second[name].data_ptr()
    del second
    third = load(ck)
    assert third[name].data_ptr() in (first_ptr, second_ptr)  # a freed allocation came back
    assert all(torch.equal(third[k], v) for k, v in src.items())  # overwritten, not stale


def test_idle_pooled_memory_is_released_after_idle_s() -> None:
    now = [100.0]
    pool = HostPool(max_idle_bytes=64 << 20, idle_s=30.0, clock=lambda: now[0])
    buf = alloc_host(1 << 20, pool=pool)
    del buf
    now[0] += 29.0
    assert (pool.expire(), pool.idle_bytes) == (1, 2 << 20)  # one 2 MiB-rounded mapping kept
    now[0] += 1.0
    assert (pool.expire(), pool.idle_bytes) == (0, 0)
    again = alloc_host(1 << 20, pool=pool)
    assert (pool.hits, pool.misses) == (0, 2)  # the expired mapping was not reused
    del again
    pool.clear()


def test_a_lease_freed_at_interpreter_exit_does_not_hang_the_exit() -> None:
    """The last garbage collection frees a pooled buffer held in a reference cycle; giving it
    back must not start the expiry timer's thread then (Thread.start would never return)."""
    import subprocess
    import sys

    code = (
        "from ember.store.hostmem import HOST_POOL\n"
        "class Holder: pass\n"
        "h = Holder(); h.self = h; h.buf = HOST_POOL.take(4 << 20)\n"
        "del h\n"
    )
    done = subprocess.run([sys.executable, "-c", code], timeout=60, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-2000:]


def test_huge_pages_default_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert LoaderConfig().huge_pages
    monkeypatch.setenv("EMBER_HUGE_PAGES", "0")
    assert not LoaderConfig().huge_pages
    assert LoaderConfig(huge_pages=True).huge_pages


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error a CPU-only host gets")
def test_pinning_for_gpu_loads_without_cuda_is_a_clear_error(checkpoint: tuple[Path, dict]) -> None:
    from ember.errors import ConfigError
    from ember.store import cuda_loader
    from ember.store.warmup import warm_engine_process

    with pytest.raises(ConfigError, match="needs CUDA"):
        cuda_loader.pin_checkpoint(checkpoint[0])
    assert cuda_loader.pinned_bytes() == 0
    warm_engine_process("cpu", pin=[checkpoint[0]])  # pinning is for GPU workers: ignored on CPU
    assert cuda_loader.pinned_bytes() == 0


def test_mapped_checkpoint_gives_the_source_tensors_without_touching_the_files(
    checkpoint: tuple[Path, dict], tmp_path: Path
) -> None:
    ck = copy_checkpoint(checkpoint[0], tmp_path / "ck")
    src = checkpoint[1]
    parts = sorted(ck.glob("*.bin"))
    before = [p.read_bytes() for p in parts]
    for p in parts:
        assert evict(p) < 0.05
    out = map_checkpoint(ck, populate=True)
    assert set(out) == set(src)
    assert all(torch.equal(out[k], v) for k, v in src.items())
    out["model.norm.weight"].add_(1)  # copy-on-write: the process's page, not the file's
    assert torch.equal(out["model.norm.weight"], src["model.norm.weight"] + 1)
    assert [p.read_bytes() for p in parts] == before
    assert torch.equal(map_checkpoint(ck)["model.norm.weight"], src["model.norm.weight"])


def test_mapped_partitions_ask_for_huge_pages(checkpoint: tuple[Path, dict]) -> None:
    """Each partition mapping carries MADV_HUGEPAGE ("hg" in /proc/self/smaps), so what it
    reads from disk is cached and mapped in 2 MiB pieces."""
    if not Path("/sys/kernel/mm/transparent_hugepage").is_dir():
        pytest.skip("kernel without transparent huge pages")
    out = map_checkpoint(checkpoint[0])
    parts = {str(p.resolve()) for p in checkpoint[0].glob("*.bin")}
    flags: dict[str, list[str]] = {}
    current = ""
    with open("/proc/self/smaps") as f:
        for line in f:
            words = line.split()
            if "-" in words[0] and not words[0].endswith(":"):
                current = words[-1] if len(words) >= 6 else ""
            elif words[0] == "VmFlags:" and current in parts:
                flags.setdefault(current, []).append(" ".join(words[1:]))
    assert set(flags) == parts
    assert all("hg" in f.split() for fs in flags.values() for f in fs), flags
    del out


def test_populate_reads_an_evicted_mapping_into_the_page_cache(
    checkpoint: tuple[Path, dict], tmp_path: Path
) -> None:
    ck = copy_checkpoint(checkpoint[0], tmp_path / "ck")
    part = sorted(ck.glob("*.bin"))[0]
    assert evict(part) < 0.05
    size = part.stat().st_size
    with open(part, "rb") as f:
        addr = map_range(f.fileno(), 0, size)
        try:
            if not populate(addr, size, threads=3, piece=1 << 20):
                pytest.skip("kernel without MADV_POPULATE_READ (Linux < 5.14)")
        finally:
            unmap_range(addr, size)
    assert resident_fraction(part) == 1.0


def test_mapping_a_damaged_checkpoint_names_the_file(
    checkpoint: tuple[Path, dict], tmp_path: Path
) -> None:
    ck = truncated_copy(checkpoint[0], tmp_path / "ck")
    with pytest.raises(CheckpointCorruptError, match=TRUNCATED):
        map_checkpoint(ck)
    ck = copy_checkpoint(checkpoint[0], tmp_path / "ck2")
    (ck / "rank0-part0001.bin").unlink()
    with pytest.raises(
        CheckpointNotFoundError, match="rank0-part0001.bin: partition file is missing"
    ):
        load_rank(ck, torch.device("cpu"), 0)
