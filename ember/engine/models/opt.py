"""OPTForCausalLM for the paged engine: learned positional embeddings (offset 2), LayerNorm
before (or, for opt-350m style configs, after) each block, ReLU MLP, biases everywhere,
optional project_in/out when the embedding width differs from the hidden size, head tied to the
token embeddings. Parameters keep the Hugging Face names (see llama.py for how they are loaded
and split across tensor-parallel ranks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ember.engine.config import ModelConfig
from ember.engine.models.layers import (
    AttentionMetadata,
    Embedding,
    LayerNorm,
    Linear,
    ParallelContext,
)
from ember.engine.models.layers import paged_attention as _paged_attention

_POSITION_OFFSET = 2  # OPT's learned position table starts at index 2


class OPTAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, par: ParallelContext) -> None:
        super().__init__()
        self.par = par
        self.heads = cfg.num_heads // par.world_size
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        d, local = cfg.hidden_size, self.heads * cfg.head_dim
        self.q_proj = Linear(d, local, bias=cfg.qkv_bias)
        self.k_proj = Linear(d, local, bias=cfg.qkv_bias)
        self.v_proj = Linear(d, local, bias=cfg.qkv_bias)
        self.out_proj = Linear(local, d, bias=cfg.o_bias, reduce=par)
        self.kv_cache = torch.empty(0)  # [2, blocks, block_size, H, D], set by the runner

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.heads, self.head_dim)
        k = self.k_proj(x).view(t, self.heads, self.head_dim)
        v = self.v_proj(x).view(t, self.heads, self.head_dim)
        out = _paged_attention(q, k, v, self.kv_cache, meta, self.scale)
        return self.out_proj(out)  # type: ignore[no-any-return]


class OPTDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, par: ParallelContext) -> None:
        super().__init__()
        self.par = par
        self.pre_norm = cfg.do_layer_norm_before
        self.act = F.relu if cfg.hidden_act == "relu" else F.gelu
        inter = cfg.intermediate_size // par.world_size
        self.self_attn = OPTAttention(cfg, par)
        self.self_attn_layer_norm = LayerNorm(cfg.hidden_size)
        self.fc1 = Linear(cfg.hidden_size, inter, bias=cfg.mlp_bias)
        self.fc2 = Linear(inter, cfg.hidden_size, bias=cfg.mlp_bias, reduce=par)
        self.final_layer_norm = LayerNorm(cfg.hidden_size)

    def forward(self, h: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.self_attn_layer_norm(h) if self.pre_norm else h
        h = h + self.self_attn(x, meta)
        if not self.pre_norm:
            h = self.self_attn_layer_norm(h)
        x = self.final_layer_norm(h) if self.pre_norm else h
        h = h + self.fc2(self.act(self.fc1(x)))
        return h if self.pre_norm else self.final_layer_norm(h)


class OPTDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig, par: ParallelContext) -> None:
        super().__init__()
        d, e = cfg.hidden_size, cfg.word_embed_proj_dim
        self.embed_tokens = Embedding(cfg.vocab_size, e)
        self.embed_positions = Embedding(cfg.max_position_embeddings + _POSITION_OFFSET, d)
        self.project_in = Linear(e, d, bias=False) if e != d else None
        self.project_out = Linear(d, e, bias=False) if e != d else None
        has_final = cfg.do_layer_norm_before and cfg.final_layer_norm
        self.final_layer_norm = LayerNorm(d) if has_final else None
        self.layers = nn.ModuleList(OPTDecoderLayer(cfg, par) for _ in range(cfg.num_layers))


class _OPTModel(nn.Module):
    def __init__(self, cfg: ModelConfig, par: ParallelContext) -> None:
        super().__init__()
        self.decoder = OPTDecoder(cfg, par)


class OPTForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, par: ParallelContext) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = _OPTModel(cfg, par)
        self.lm_head = Linear(cfg.word_embed_proj_dim, cfg.vocab_size, bias=False)

    def post_load(self, tie: bool) -> None:
        if tie:
            self.lm_head.weight = self.model.decoder.embed_tokens.weight

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        dec = self.model.decoder
        h = dec.embed_tokens(input_ids)
        if dec.project_in is not None:
            h = dec.project_in(h)
        h = h + dec.embed_positions(positions + _POSITION_OFFSET)
        for layer in dec.layers:
            h = layer(h, meta)
        return h

    def compute_logits(self, h: torch.Tensor) -> torch.Tensor:
        dec = self.model.decoder
        if dec.final_layer_norm is not None:
            h = dec.final_layer_norm(h)
        if dec.project_out is not None:
            h = dec.project_out(h)
        return self.lm_head(h)
