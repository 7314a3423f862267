"""Model code for the engine, by HF architecture name, and the loader that puts weights in it.

`build_model` constructs the module tree on the meta device (no memory, no random init) and
assigns the loaded tensors as its parameters (`load_state_dict(assign=True)`: the tensors are
used as they are, so the weights exist once). Missing or unexpected names raise
`CheckpointFormatError` naming them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ember.engine.config import ModelConfig
from ember.engine.models.layers import ParallelContext
from ember.engine.models.llama import LlamaForCausalLM
from ember.engine.models.opt import OPTForCausalLM
from ember.errors import CheckpointFormatError, UnsupportedArchitectureError

HEAD = "lm_head.weight"

_MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "OPTForCausalLM": OPTForCausalLM,
}


def build_model(
    cfg: ModelConfig,
    weights: Mapping[str, torch.Tensor],
    par: ParallelContext,
    source: str = "checkpoint",
) -> nn.Module:
    """The model for `cfg` with `weights` (HF names, this rank's shards) as its parameters."""
    cls = _MODELS.get(cfg.architecture)
    if cls is None:
        raise UnsupportedArchitectureError(f"architecture {cfg.architecture!r} has no model code")
    model = cls(cfg, par)  # parameters on the meta device
    expected = set(model.state_dict().keys())
    given = set(weights.keys())
    # A tied head is usually absent from the checkpoint; when stored, it is used as stored.
    tie = cfg.tie_word_embeddings and HEAD not in given
    missing = sorted(expected - given - ({HEAD} if tie else set()))
    unexpected = sorted(given - expected)
    if missing or unexpected:
        raise CheckpointFormatError(
            source,
            f"weights do not match {cfg.architecture}: missing={missing[:8]} "
            f"unexpected={unexpected[:8]}",
        )
    model.load_state_dict(dict(weights), strict=False, assign=True)
    model.post_load(tie)  # type: ignore[operator]
    for name, param in model.named_parameters():
        assert not param.is_meta, f"{name} left on the meta device"
        param.requires_grad_(False)
    model.eval()
    return model
