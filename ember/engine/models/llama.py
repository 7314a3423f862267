"""LlamaForCausalLM, Qwen2ForCausalLM and MistralForCausalLM: one decoder written for the paged
engine (grouped-query attention, rotary embeddings with linear / Llama 3 scaling, optional qkv
bias, tied embeddings, optional sliding window, applied through the attention mask).

Parameters keep the Hugging Face names and are built on the meta device, then the loaded
tensors are assigned to them as they are (no copy, no random init). With tensor parallelism
each rank holds `heads / tp` query and `kv_heads / tp` key/value heads and `intermediate / tp`
MLP columns (`ember.store.sharding`); o_proj and down_proj outputs are all-reduced.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ember.engine.config import ModelConfig
from ember.engine.models.layers import (
    AttentionMetadata,
    Embedding,
    Linear,
    ParallelContext,
    apply_rope,
    paged_attention,
    rms_norm,
    rope_cos_sin,
    rope_inv_freq,
)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size, device="meta"), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, par: ParallelContext) -> None:
        super().__init__()
        self.par = par
        self.heads = cfg.num_heads // par.world_size
        self.kv_heads = cfg.num_kv_heads // par.world_size
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = Linear(d, self.heads * hd, bias=cfg.qkv_bias)
        self.k_proj = Linear(d, self.kv_heads * hd, bias=cfg.qkv_bias)
        self.v_proj = Linear(d, self.kv_heads * hd, bias=cfg.qkv_bias)
        self.o_proj = Linear(self.heads * hd, d, bias=cfg.o_bias, reduce=par)
        self.kv_cache = torch.empty(0)  # [2, blocks, block_size, KVH, D], set by the runner

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        cos: torch.Tensor,  # [T, D]
        sin: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.heads, self.head_dim)
        k = self.k_proj(x).view(t, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(t, self.kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = paged_attention(q, k, v, self.kv_cache, meta, self.scale)  # [T, H * D]
        return self.o_proj(out)  # type: ignore[no-any-return]


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, par: ParallelContext) -> None:
        super().__init__()
        self.par = par
        d, inter = cfg.hidden_size, cfg.intermediate_size // par.world_size
        self.gate_proj = Linear(d, inter, bias=cfg.mlp_bias)
        self.up_proj = Linear(d, inter, bias=cfg.mlp_bias)
        self.down_proj = Linear(inter, d, bias=cfg.mlp_bias, reduce=par)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(h)  # type: ignore[no-any-return]


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, par: ParallelContext) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, par)
        self.mlp = LlamaMLP(cfg, par)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)

    def forward(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, meta)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, par: ParallelContext) -> None:
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, par) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)


class LlamaForCausalLM(nn.Module):
    """Also serves Qwen2ForCausalLM and MistralForCausalLM (same layout, config-driven)."""

    def __init__(self, cfg: ModelConfig, par: ParallelContext) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = LlamaModel(cfg, par)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        assert cfg.rope is not None
        self.inv_freq = torch.empty(0)  # set by `post_load` on the weights' device

    def post_load(self, tie: bool) -> None:
        """Tie the head to the embeddings if the config says so; build rotary tables."""
        if tie:
            self.lm_head.weight = self.model.embed_tokens.weight
        assert self.cfg.rope is not None
        device = self.model.embed_tokens.weight.device
        self.inv_freq = rope_inv_freq(self.cfg.rope, self.cfg.head_dim).to(device)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, hidden]
        h = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(self.inv_freq, positions, h.dtype)
        for layer in self.model.layers:
            h = layer(h, cos, sin, meta)
        return h

    def compute_logits(self, h: torch.Tensor) -> torch.Tensor:  # [rows, hidden] -> [rows, vocab]
        return self.lm_head(self.model.norm(h))
