"""How each weight splits across tensor-parallel ranks: the one place both the converter and the
engine read.

Megatron-style tensor parallelism for the architectures ember serves (LlamaForCausalLM,
Qwen2ForCausalLM, MistralForCausalLM, OPTForCausalLM):

- column-parallel (`COLUMN`, dim 0 of the HF `[out, in]` weight): q/k/v projections, gate/up
  projections, OPT fc1, and their biases. Each rank holds a contiguous block of output rows, so
  for attention a rank holds `num_attention_heads / tp` query heads and
  `num_key_value_heads / tp` key/value heads (GQA: both must divide by tp).
- row-parallel (`ROW`, dim 1): o_proj, down_proj, OPT out_proj and fc2 weights. Each rank holds
  a block of input columns; their partial outputs are summed (all-reduce). The biases of these
  layers are replicated and must be added once, after the all-reduce.
- replicated (`REPLICATED`): norms, biases of row-parallel layers, token and position
  embeddings, lm_head, and anything this module does not recognise. ember replicates the
  embeddings and lm_head rather than splitting the vocabulary: vocab sizes of real checkpoints
  are often not divisible by tp (OPT 50272, odd tokenizer additions), the tables are a small
  share of the bytes for the models ember serves, and it keeps sampling free of a gather.

Invariant: `unshard([shard(t, r, i, tp) for i in range(tp)], r)` is bit-equal to `t`.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ember.errors import ConfigError


class ShardKind(str, enum.Enum):
    REPLICATED = "replicated"
    COLUMN = "column"  # split the output dim (dim 0 of an HF weight, the only dim of a bias)
    ROW = "row"  # split the input dim (dim 1 of an HF weight)


@dataclass(frozen=True, slots=True)
class ShardRule:
    """How one tensor splits: `kind`, and the tensor dim split (None when replicated)."""

    kind: ShardKind
    dim: int | None

    @property
    def is_split(self) -> bool:
        return self.kind is not ShardKind.REPLICATED


REPLICATED = ShardRule(ShardKind.REPLICATED, None)
COLUMN = ShardRule(ShardKind.COLUMN, 0)
ROW = ShardRule(ShardKind.ROW, 1)

# (module leaf name, parameter) -> rule. Names are matched on the last two dotted components,
# which are the same for Llama, Qwen2 and Mistral (`model.layers.N.self_attn.q_proj.weight`)
# and OPT (`model.decoder.layers.N.self_attn.q_proj.weight`, `...fc1.weight`).
_RULES: dict[tuple[str, str], ShardRule] = {}
for _m in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "fc1"):
    _RULES[(_m, "weight")] = COLUMN
    _RULES[(_m, "bias")] = COLUMN
for _m in ("o_proj", "down_proj", "out_proj", "fc2"):
    _RULES[(_m, "weight")] = ROW
    _RULES[(_m, "bias")] = REPLICATED

_LAYER_RE = re.compile(r"\.layers\.\d+\.")


def shard_rule(name: str) -> ShardRule:
    """The rule for an HF tensor name. Only names inside a decoder layer (`.layers.N.`) split;
    everything else (embeddings, lm_head, final norms, OPT project_in/out) is replicated."""
    parts = name.rsplit(".", 2)
    if len(parts) < 3 or _LAYER_RE.search(name) is None:
        return REPLICATED
    return _RULES.get((parts[-2], parts[-1]), REPLICATED)


def shard_shape(shape: Sequence[int], rule: ShardRule, tp: int) -> tuple[int, ...]:
    """The shape of one rank's shard of a tensor of `shape`."""
    out = list(shape)
    if rule.is_split and tp > 1:
        assert rule.dim is not None
        dim = _effective_dim(len(out), rule)
        if out[dim] % tp:
            raise ConfigError(
                f"dimension {dim} of size {out[dim]} does not divide by tp={tp}; choose a tp "
                "that divides it (--tp)"
            )
        out[dim] //= tp
    return tuple(out)


def _effective_dim(ndim: int, rule: ShardRule) -> int:
    # A 1-D tensor under a column rule is a bias: its only dim is the output dim.
    assert rule.dim is not None
    if rule.dim >= ndim:
        raise ConfigError(
            f"a {rule.kind.value}-parallel rule splits dim {rule.dim} of a {ndim}-D tensor"
        )
    return rule.dim


def shard(tensor: torch.Tensor, rule: ShardRule, rank: int, tp: int) -> torch.Tensor:
    """Rank `rank`'s shard of `tensor` (a contiguous copy when split, `tensor` itself when not)."""
    if not 0 <= rank < tp:
        raise ConfigError(f"rank {rank} is outside 0..{tp - 1} for tp={tp}")
    if not rule.is_split or tp == 1:
        return tensor
    dim = _effective_dim(tensor.dim(), rule)
    size = shard_shape(tensor.shape, rule, tp)[dim]
    return tensor.narrow(dim, rank * size, size).contiguous()


def unshard(shards: Sequence[torch.Tensor], rule: ShardRule) -> torch.Tensor:
    """The full tensor from every rank's shard, in rank order (the first shard if replicated)."""
    if not shards:
        raise ConfigError("unshard needs at least one shard")
    if not rule.is_split or len(shards) == 1:
        return shards[0]
    return torch.cat(list(shards), dim=_effective_dim(shards[0].dim(), rule))


def check_tp(config: Mapping[str, Any], tp: int) -> None:
    """Raise `ConfigError` unless a model with this HF `config` can run with tensor degree `tp`.

    Checks the head counts (query and, for GQA, key/value heads) and the MLP width; the error
    names the config field and the knob to change.
    """
    if tp < 1:
        raise ConfigError(f"tp must be at least 1, got {tp} (--tp)")
    if tp == 1:
        return
    heads = config.get("num_attention_heads")
    kv_heads = config.get("num_key_value_heads", heads)
    ffn = config.get("intermediate_size", config.get("ffn_dim"))
    for field, value in (
        ("num_attention_heads", heads),
        ("num_key_value_heads", kv_heads),
        ("intermediate_size" if "intermediate_size" in config else "ffn_dim", ffn),
    ):
        if isinstance(value, int) and value % tp:
            raise ConfigError(
                f"config.json {field}={value} is not divisible by tp={tp}: each rank must hold "
                f"whole heads and equal slices; pick a tp that divides {value} (--tp)"
            )
