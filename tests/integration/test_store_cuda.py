"""The CUDA load path: pinned staging buffers and overlapped copies give the same tensors as the
CPU path, in one device allocation. Runs only where CUDA exists."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from ember.store import LoaderConfig, convert, load

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize(
    "config",
    [
        LoaderConfig(),
        LoaderConfig(threads=1, chunk_bytes=1 << 20, staging_buffers=1, verify_checksums=True),
        LoaderConfig(register_cached=True),
        LoaderConfig(register_cached=True, threads=1, chunk_bytes=1 << 20, verify_checksums=True),
    ],
    ids=["default", "one-lane-verify", "registered", "registered-one-lane-verify"],
)
def test_cuda_load_matches_cpu_load(
    model_factory: Callable[..., Path], tmp_path: Path, config: LoaderConfig
) -> None:
    ck = convert(model_factory("qwen2", "tiny", "bf16"), tmp_path / "ck", tp=2, progress=False)
    for rank in range(2):
        cpu = load(ck, rank=rank)
        gpu = load(ck, device="cuda", rank=rank, config=config)
        assert set(gpu) == set(cpu)
        assert len({t.untyped_storage().data_ptr() for t in gpu.values()}) == 1
        for name, t in gpu.items():
            assert t.device.type == "cuda"
            assert torch.equal(t.cpu(), cpu[name]), name


def test_warm_worker_pins_the_staging_buffers_a_load_then_reuses(
    model_factory: Callable[..., Path], tmp_path: Path
) -> None:
    from ember.store import cuda_loader
    from ember.store.warmup import warm_engine_process

    warm_engine_process("cuda")
    cfg = LoaderConfig()
    idle = cuda_loader._staging_free[cfg.chunk_bytes]
    assert len(idle) >= cfg.reader_threads("cuda") * cfg.staging_buffers
    assert all(b.is_pinned() for b in idle)
    before = {b.data_ptr() for b in idle}
    ck = convert(model_factory("llama", "tiny", "bf16"), tmp_path / "ck", progress=False)
    load(ck, device="cuda", config=cfg)
    assert {b.data_ptr() for b in cuda_loader._staging_free[cfg.chunk_bytes]} == before


def test_cuda_engine_loads_from_the_node_stores_dram_tier(
    model_factory: Callable[..., Path], tmp_path: Path
) -> None:
    """An instance on a GPU reads the DRAM tier's copy (shared memory) through the pinned
    staging path, and generates what a CPU engine mapping the same copy generates."""
    import os
    import shutil

    from ember.engine import Engine, EngineConfig, SamplingParams
    from ember.store.node_store import NodeStore, NodeStoreConfig
    from ember.store.shm import is_dram_checkpoint

    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    root = shm / f"ember-test-cuda-{os.getpid()}"
    try:
        store = NodeStore(
            NodeStoreConfig(dram_dir=str(root / "dram"), ssd_dir=str(tmp_path / "ssd"))
        )
        ck = convert(model_factory("llama", "tiny", "fp32"), tmp_path / "ck", progress=False)
        path = store.ensure(str(ck)).path
        assert is_dram_checkpoint(path)
        params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
        tokens = {}
        for device in ("cpu", "cuda"):
            engine = Engine(EngineConfig(model=str(path), max_model_len=128, device=device))
            assert engine.load_s is not None and engine.load_s > 0
            engine.add_request("r", [5, 9, 13, 21], params)
            while engine.has_unfinished():
                for out in engine.step():
                    if out.finished:
                        tokens[device] = out.token_ids
        assert tokens["cuda"] == tokens["cpu"]
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_cached_pages_are_registered_and_a_flipped_byte_is_named(
    model_factory: Callable[..., Path], tmp_path: Path
) -> None:
    """The driver accepts the page cache's pages for DMA here (no silent fall back to staging),
    and checksums are checked on those pages before they are copied."""
    from ember.errors import CheckpointCorruptError
    from ember.store import cuda_loader

    ck = convert(model_factory("llama", "tiny", "bf16"), tmp_path / "ck", progress=False)
    cfg = LoaderConfig(register_cached=True, verify_checksums=True)
    cpu = load(ck)
    gpu = load(ck, device="cuda", config=cfg)
    assert cuda_loader._register_error is None
    assert all(torch.equal(t.cpu(), cpu[name]) for name, t in gpu.items())
    part = next(ck.glob("rank0-part*.bin"))
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0x10
    part.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError, match=part.name):
        load(ck, device="cuda", config=cfg)


def test_pinned_checkpoint_loads_by_dma_bit_equal_and_drops_replaced_files(
    model_factory: Callable[..., Path], tmp_path: Path
) -> None:
    """`pin_checkpoint` registers every rank's partition files once; loads then copy from them
    (counted), give the CPU loader's tensors, and stop using a file once it is replaced."""
    import os
    import shutil

    from ember.store import cuda_loader

    ck = convert(model_factory("qwen2", "tiny", "bf16"), tmp_path / "ck", tp=2, progress=False)
    total = sum(p.stat().st_size for p in ck.glob("rank*-part*.bin"))
    try:
        assert cuda_loader.pin_checkpoint(ck) == total
        assert cuda_loader.pin_checkpoint(ck) == 0  # already pinned
        assert cuda_loader.pinned_bytes() == total
        for rank in range(2):
            cpu = load(ck, rank=rank)
            before = cuda_loader.pinned_bytes_copied
            gpu = load(ck, device="cuda", rank=rank)
            assert cuda_loader.pinned_bytes_copied - before == sum(t.nbytes for t in cpu.values())
            assert len({t.untyped_storage().data_ptr() for t in gpu.values()}) == 1
            assert all(torch.equal(t.cpu(), cpu[name]) for name, t in gpu.items())
        # Replaced the way the node store writes a file (a new inode renamed over): not used.
        part = next(ck.glob("rank0-part*.bin"))
        shutil.copyfile(part, part.with_suffix(".new"))
        os.replace(part.with_suffix(".new"), part)
        before = cuda_loader.pinned_bytes_copied
        gpu = load(ck, device="cuda", rank=0)
        assert cuda_loader.pinned_bytes_copied == before
        assert cuda_loader.pinned_bytes() == total - part.stat().st_size
        cpu = load(ck, rank=0)
        assert all(torch.equal(t.cpu(), cpu[name]) for name, t in gpu.items())
    finally:
        cuda_loader.unpin_checkpoint(ck)
    assert cuda_loader.pinned_bytes() == 0


def test_pinned_checkpoint_checksums_name_a_flipped_byte(
    model_factory: Callable[..., Path], tmp_path: Path
) -> None:
    from ember.errors import CheckpointCorruptError
    from ember.store import cuda_loader

    ck = convert(model_factory("llama", "tiny", "bf16"), tmp_path / "ck", progress=False)
    part = next(ck.glob("rank0-part*.bin"))
    data = bytearray(part.read_bytes())
    data[len(data) // 3] ^= 0x01
    part.write_bytes(bytes(data))
    cuda_loader.pin_checkpoint(ck)
    try:
        before = cuda_loader.pinned_bytes_copied
        with pytest.raises(CheckpointCorruptError, match=part.name):
            load(ck, device="cuda", config=LoaderConfig(verify_checksums=True))
        assert cuda_loader.pinned_bytes_copied == before  # caught before its copy was queued
    finally:
        cuda_loader.unpin_checkpoint(ck)


def test_worker_pins_the_dram_tier_and_its_engine_loads_from_the_pins(
    model_factory: Callable[..., Path], tmp_path: Path
) -> None:
    """A pre-started GPU worker pins the node store's DRAM-tier copy during its warm-up; the
    engine it then builds copies its weights from the pins and generates the CPU engine's
    tokens. Evicting the copy from the tier drops the pin at the next load."""
    import os
    import shutil

    from ember.engine import Engine, EngineConfig, SamplingParams
    from ember.store import cuda_loader
    from ember.store.node_store import NodeStore, NodeStoreConfig
    from ember.store.warmup import warm_engine_process

    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    root = shm / f"ember-test-cuda-pin-{os.getpid()}"
    try:
        store = NodeStore(
            NodeStoreConfig(dram_dir=str(root / "dram"), ssd_dir=str(tmp_path / "ssd"))
        )
        ck = convert(model_factory("llama", "tiny", "fp32"), tmp_path / "ck", progress=False)
        path = store.ensure(str(ck)).path
        warm_engine_process("cuda", pin=[path])
        assert cuda_loader.pinned_bytes() > 0
        params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
        tokens = {}
        for device in ("cpu", "cuda"):
            before = cuda_loader.pinned_bytes_copied
            engine = Engine(EngineConfig(model=str(path), max_model_len=128, device=device))
            copied = cuda_loader.pinned_bytes_copied - before
            assert copied == (0 if device == "cpu" else cuda_loader.pinned_bytes())
            engine.add_request("r", [5, 9, 13, 21], params)
            while engine.has_unfinished():
                for out in engine.step():
                    if out.finished:
                        tokens[device] = out.token_ids
            del engine
        assert tokens["cuda"] == tokens["cpu"]
        assert store.evict(str(ck), "dram")
        assert cuda_loader.release_stale_pins() == len(list(Path(path).glob("rank*-part*.bin")))
        assert cuda_loader.pinned_bytes() == 0
    finally:
        cuda_loader.unpin_checkpoint()
        shutil.rmtree(root, ignore_errors=True)
