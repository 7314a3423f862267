"""Building blocks shared by the model code: paged attention, rotary embeddings, RMSNorm, and the
tensor-parallel reduction.

Attention works on a flat batch of `T` new tokens from `B` requests: their K/V are written into
the paged cache at `slot_mapping`. The step's prefill chunks come first, one
`scaled_dot_product_attention` call each: a request's first chunk attends causally over its own
new tokens (no padding, no gather), a later chunk of a long prompt over its request's keys read
back from the cache. Then one token per decoding request: on CPU (bf16 or fp32 cache) a small
C kernel (`cpu_attention`) reads each request's
K/V from its blocks in place; elsewhere each request's context is gathered from its blocks (or
read as one slice when a lone request's blocks are consecutive) and attended in batched calls
under a mask built once per step (context length, optional sliding window); the query heads of a
KV group are stacked as rows so GQA needs no K/V expansion.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ember.engine.config import RopeConfig
from ember.engine.models import cpu_attention


@dataclass(frozen=True, slots=True)
class ParallelContext:
    """This rank's place in its tensor-parallel group (the default process group when > 1)."""

    rank: int = 0
    world_size: int = 1


def all_reduce(x: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """Sum the partial outputs of a row-parallel layer over the tensor-parallel ranks."""
    if ctx.world_size > 1:
        dist.all_reduce(x)
    return x


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    """Per-step inputs of every attention layer (built once by the model runner).

    A step's first `num_prefill_tokens` tokens are prefill chunks: a request's first chunk starts
    at position 0 and attends causally to itself; a later chunk of a long prompt attends to its
    request's cached tokens and causally to itself. The tokens after them are decodes, one per
    request, each attending to its request's cached context.
    """

    slot_mapping: torch.Tensor  # [T] cache slot of each new token
    num_prefill_tokens: int
    upcast: bool = False  # attend in fp32 (CPU bf16/fp16 SDPA kernels are several times slower)
    # prefill: tokens [0, num_prefill_tokens)
    seq_bounds: tuple[tuple[int, int], ...] = ()  # each request's [start, end) in the flat batch
    prefill_masks: tuple[torch.Tensor | None, ...] = ()  # [n, keys] mask; None: causal, keys = n
    # per chunk: None (it starts at position 0: its keys are its own tokens) or the cache slots
    # of its request's positions 0..end (a later chunk of a long prompt)
    prefill_contexts: tuple[torch.Tensor | None, ...] = ()
    # decode: tokens [num_prefill_tokens, T)
    decode_groups: tuple[DecodeGroup, ...] = ()
    decode_kernel: KernelDecode | None = None  # set: the CPU kernel attends over the blocks


@dataclass(frozen=True, slots=True)
class KernelDecode:
    """A decode step's inputs for the CPU paged-attention kernel (`cpu_attention`), which reads
    each request's K/V from its blocks in place: no gather, no padding, no upcast copy."""

    block_tables: torch.Tensor  # [B, max_blocks] int32 (padded with 0)
    context_lens: torch.Tensor  # [B] int32: keys 0..len-1, this step's token included
    window_starts: torch.Tensor  # [B] int32: the first key visible (sliding window), else 0
    max_len: int  # the largest context_len - window_start


@dataclass(frozen=True, slots=True)
class DecodeGroup:
    """Decode requests attended in one call: requests of similar context length, so that
    padding every context to the group's longest wastes little."""

    rows: torch.Tensor | None  # [G] the requests' rows in the step's batch; None: all, in order
    block_tables: torch.Tensor | None  # [G, blocks] block ids (padded with 0); None if contiguous
    context_len: int  # Lk: the group's longest context, this step's token included
    attn_mask: torch.Tensor | None  # [G, 1, 1, Lk] bool (True = attend); None: attend to all
    contiguous_start: int | None = None  # one request with consecutive blocks: its first slot


def paged_attention(
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor,  # [T, KVH, D]
    v: torch.Tensor,  # [T, KVH, D]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, KVH, D]
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [T, H * D]
    num_tokens, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    k_flat = kv_cache[0].view(-1, kv_heads, head_dim)  # [slots, KVH, D]
    v_flat = kv_cache[1].view(-1, kv_heads, head_dim)
    k_flat.index_copy_(0, meta.slot_mapping, k)
    v_flat.index_copy_(0, meta.slot_mapping, v)
    up: Callable[[torch.Tensor], torch.Tensor] = (
        (lambda t: t.float()) if meta.upcast else (lambda t: t)
    )
    p = meta.num_prefill_tokens
    if p == 0:
        return _decode_attention(q, kv_cache, meta, up, scale)
    out = q.new_empty(num_tokens, heads * head_dim)
    # One call per prefill chunk: a request's first chunk attends over its own tokens (no
    # padding, no gather); a later chunk gathers its request's keys from the cache.
    chunks = zip(meta.seq_bounds, meta.prefill_masks, meta.prefill_contexts, strict=True)
    for (s, e), mask, context in chunks:
        if context is None:
            kk, vv = k[s:e], v[s:e]
        else:
            kk, vv = k_flat.index_select(0, context), v_flat.index_select(0, context)
        o = F.scaled_dot_product_attention(
            up(q[s:e]).transpose(0, 1)[None],  # [1, H, n, D]
            up(kk).transpose(0, 1)[None],  # [1, KVH, keys, D]
            up(vv).transpose(0, 1)[None],
            attn_mask=mask,
            is_causal=mask is None,
            scale=scale,
            enable_gqa=heads != kv_heads,
        )  # [1, H, n, D]
        out[s:e] = o[0].transpose(0, 1).reshape(e - s, heads * head_dim)
    if p < num_tokens:
        out[p:] = _decode_attention(q[p:], kv_cache, meta, up, scale)
    return out


def _decode_attention(
    q: torch.Tensor,  # [B, H, D]: one token per request
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    up: Callable[[torch.Tensor], torch.Tensor],
    scale: float,
) -> torch.Tensor:  # [B, H * D]
    b, heads, head_dim = q.shape
    kv_heads = kv_cache.shape[3]
    dtype = q.dtype
    # The H / KVH query heads sharing a KV head become rows of one query matrix (GQA without
    # expanding K/V).
    group = heads // kv_heads
    kd = meta.decode_kernel
    if kd is not None:
        out = cpu_attention.paged_decode_attention(
            q, kv_cache, kd.block_tables, kd.context_lens, kd.window_starts, kd.max_len, scale
        )  # [B, H, D] float32
        return out.view(b, heads * head_dim).to(dtype)
    qd = up(q.reshape(b, kv_heads, group, head_dim))  # [B, KVH, G, D]
    if len(meta.decode_groups) == 1 and meta.decode_groups[0].rows is None:
        out = _decode_group(qd, kv_cache, meta.decode_groups[0], up, scale)
    else:
        out = torch.empty_like(qd)
        for g in meta.decode_groups:
            assert g.rows is not None
            out.index_copy_(0, g.rows, _decode_group(qd[g.rows], kv_cache, g, up, scale))
    return out.reshape(b, heads * head_dim).to(dtype)  # [B, H * D]


def _decode_group(
    qd: torch.Tensor,  # [G, KVH, group, D]
    kv_cache: torch.Tensor,
    g: DecodeGroup,
    up: Callable[[torch.Tensor], torch.Tensor],
    scale: float,
) -> torch.Tensor:  # [G, KVH, group, D]
    n, kv_heads, _, head_dim = qd.shape
    lk = g.context_len
    if g.contiguous_start is not None:
        s0 = g.contiguous_start
        keys = kv_cache[0].view(-1, kv_heads, head_dim)[s0 : s0 + lk][None]  # [1, Lk, KVH, D]
        values = kv_cache[1].view(-1, kv_heads, head_dim)[s0 : s0 + lk][None]
    else:
        assert g.block_tables is not None
        blocks = g.block_tables.view(-1)
        keys = kv_cache[0].index_select(0, blocks).view(n, -1, kv_heads, head_dim)[:, :lk]
        values = kv_cache[1].index_select(0, blocks).view(n, -1, kv_heads, head_dim)[:, :lk]
    # Upcast before the transpose: converting a strided view is several times slower.
    keys, values = up(keys).transpose(1, 2), up(values).transpose(1, 2)  # [G, KVH, Lk, D]
    return F.scaled_dot_product_attention(qd, keys, values, attn_mask=g.attn_mask, scale=scale)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm exactly as transformers computes it (fp32 statistics)."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] (fp32), with linear or Llama 3 scaling applied."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.rope_type == "llama3":
        old_len = rope.original_max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(
    inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [T, head_dim] for `positions`, computed in fp32 and cast like transformers."""
    freqs = positions.float()[:, None] * inv_freq[None, :]  # [T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` [T, heads, D] (rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def _meta(*shape: int) -> nn.Parameter:
    # Shapes only: the loaded tensors replace these (no memory, no random init).
    return nn.Parameter(torch.empty(*shape, device="meta"), requires_grad=False)


class Linear(nn.Module):
    """`y = x W^T + b` with HF's parameter names, created without initialisation.

    With `reduce` (a row-parallel layer under tensor parallelism) the partial products are
    summed over the ranks before the (replicated) bias is added once. After `install_packed` the
    weight is held in oneDNN's blocked layout and multiplied by its kernel, which on CPU runs
    bf16 matrix-vector products 2-3x faster than `F.linear` on the plain layout.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool, reduce: ParallelContext | None = None
    ) -> None:
        super().__init__()
        self.weight = _meta(out_features, in_features)
        self.bias = _meta(out_features) if bias else None
        self.reduce = reduce if reduce is not None and reduce.world_size > 1 else None
        self.packed = False

    def packed_weight(self) -> torch.Tensor:
        """The weight re-laid out for oneDNN (a new tensor; safe to compute on another thread
        while this layer keeps serving with the plain weight)."""
        return torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 1)  # type: ignore[no-any-return]

    def install_packed(self, packed: torch.Tensor) -> None:
        """Serve from `packed` from now on; the plain weight is dropped."""
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.packed = True

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, bias, "none", [], "")  # type: ignore[no-any-return]
        return F.linear(x, self.weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reduce is None:
            return self._matmul(x, self.bias)
        out = all_reduce(self._matmul(x, None), self.reduce)
        return out + self.bias if self.bias is not None else out


def can_pack_linears(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN packing pays off for bf16 on CPUs with native bf16 (AVX512-BF16 / AMX)."""
    if device.type != "cpu" or dtype != torch.bfloat16:
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    try:
        return bool(ops._is_mkldnn_bf16_supported()) and hasattr(ops, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


class Embedding(nn.Module):
    def __init__(self, num: int, dim: int) -> None:
        super().__init__()
        self.weight = _meta(num, dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = _meta(dim)
        self.bias = _meta(dim)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
