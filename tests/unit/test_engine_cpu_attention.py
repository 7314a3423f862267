"""The CPU paged decode-attention kernel against torch's SDPA over the same gathered K/V."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ember.engine.models import cpu_attention


@pytest.fixture(autouse=True)
def _kernel() -> None:
    """Built on first use, into this session's cache (a skipif mark would build it while tests
    are collected, before the session's cache is set: into the user's ~/.cache/ember)."""
    if cpu_attention.load() is None:
        pytest.skip("no C compiler")


def _reference(
    q: torch.Tensor,
    cache: torch.Tensor,
    tables: list[list[int]],
    ctx: list[int],
    starts: list[int],
    scale: float,
) -> torch.Tensor:
    _, _, bs, kv_heads, head_dim = cache.shape
    heads = q.shape[1]
    out = []
    for b, (table, n, s0) in enumerate(zip(tables, ctx, starts, strict=True)):
        idx = torch.tensor(table[: -(-n // bs)])
        k = cache[0][idx].reshape(-1, kv_heads, head_dim)[s0:n].double().transpose(0, 1)
        v = cache[1][idx].reshape(-1, kv_heads, head_dim)[s0:n].double().transpose(0, 1)
        rep = heads // kv_heads  # query head h reads KV head h // rep, as transformers' repeat_kv
        k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)  # [H, n, D]
        o = F.scaled_dot_product_attention(q[b].double()[:, None], k, v, scale=scale)
        out.append(o[:, 0])
    return torch.stack(out)  # [B, H, D]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (8, 2), (6, 3)])  # 6: a partial group
@pytest.mark.parametrize("batch", [1, 7, 40])  # 40 x up to 300 keys: work for two threads
@pytest.mark.parametrize("head_dim", [32, 64, 128])  # 64 and 128 have code of their own
def test_kernel_matches_sdpa_over_scattered_blocks(
    dtype: torch.dtype, heads: int, kv_heads: int, batch: int, head_dim: int
) -> None:
    _check_against_sdpa(dtype, heads, kv_heads, batch, head_dim)


def _check_against_sdpa(
    dtype: torch.dtype, heads: int, kv_heads: int, batch: int, head_dim: int
) -> None:
    torch.manual_seed(0)
    rng = random.Random(batch * 100 + heads)
    bs = 4
    ctx = [rng.randint(1, 45 if batch < 40 else 300) for _ in range(batch)]
    starts = [max(n - 9, 0) if b % 2 else 0 for b, n in enumerate(ctx)]  # some with a window
    need = [-(-n // bs) for n in ctx]
    num_blocks = sum(need) + 5
    free = list(range(num_blocks))
    rng.shuffle(free)  # blocks in no order, as after many allocations and frees
    tables = [[free.pop() for _ in range(n)] for n in need]
    width = max(need) + 2
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    cache = torch.randn(2, num_blocks, bs, kv_heads, head_dim).to(dtype)
    q = torch.randn(batch, heads, head_dim).to(dtype)
    scale = head_dim**-0.5
    out = cpu_attention.paged_decode_attention(
        q,
        cache,
        padded,
        torch.tensor(ctx, dtype=torch.int32),
        torch.tensor(starts, dtype=torch.int32),
        max(n - s for n, s in zip(ctx, starts, strict=True)),
        scale,
    )
    ref = _reference(q, cache, tables, ctx, starts, scale)
    assert out.dtype == torch.float32 and out.shape == (batch, heads, head_dim)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-6)


def test_kernel_library_does_not_flush_denormals_in_the_process() -> None:
    assert cpu_attention.load() is not None
    tiny = torch.tensor([1e-40], dtype=torch.float32)
    assert (tiny * 1.0).item() != 0.0


def test_kernel_runs_on_torchs_openmp_runtime_not_a_second_one() -> None:
    """Where torch uses GNU OpenMP the kernel library links that very runtime (one libgomp
    mapped in the process) and runs on its pool."""
    assert cpu_attention.load() is not None
    with open("/proc/self/maps") as maps:
        gomps = {ln.split()[-1] for ln in maps if "/libgomp" in ln}
    assert len(gomps) <= 1
    assert cpu_attention._openmp == bool(gomps)


def test_kernel_built_with_its_own_threads_matches_sdpa(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The build for a torch without GNU OpenMP (threads started per call) gives the same."""
    import ctypes

    assert cpu_attention.load() is not None  # the process's own build is loaded first
    target = tmp_path / "pthreads.so"
    cpu_attention._build(target, None)
    lib = ctypes.CDLL(str(target))
    cpu_attention._bind(lib)
    monkeypatch.setattr(cpu_attention, "_lib", lib)
    monkeypatch.setattr(cpu_attention, "_openmp", False)
    for dtype in (torch.float32, torch.bfloat16):
        _check_against_sdpa(dtype, 8, 2, 40, 64)
        _check_against_sdpa(dtype, 6, 3, 7, 128)
