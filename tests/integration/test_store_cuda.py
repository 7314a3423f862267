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
    ],
    ids=["default", "one-lane-verify"],
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
