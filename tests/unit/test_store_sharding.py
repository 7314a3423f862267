"""Tensor-parallel split rules: which weights split on which dim, and that shards rejoin exactly."""

from __future__ import annotations

import pytest
import torch

from ember.errors import ConfigError
from ember.store.sharding import (
    COLUMN,
    REPLICATED,
    ROW,
    ShardKind,
    check_tp,
    shard,
    shard_rule,
    shard_shape,
    unshard,
)


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        ("model.layers.0.self_attn.q_proj.weight", COLUMN),
        ("model.layers.3.self_attn.k_proj.bias", COLUMN),
        ("model.layers.11.self_attn.v_proj.weight", COLUMN),
        ("model.layers.0.mlp.gate_proj.weight", COLUMN),
        ("model.layers.0.mlp.up_proj.weight", COLUMN),
        ("model.layers.0.self_attn.o_proj.weight", ROW),
        ("model.layers.0.mlp.down_proj.weight", ROW),
        ("model.decoder.layers.2.self_attn.out_proj.weight", ROW),
        ("model.decoder.layers.2.self_attn.out_proj.bias", REPLICATED),
        ("model.decoder.layers.2.fc1.weight", COLUMN),
        ("model.decoder.layers.2.fc1.bias", COLUMN),
        ("model.decoder.layers.2.fc2.weight", ROW),
        ("model.decoder.layers.2.fc2.bias", REPLICATED),
        ("model.decoder.layers.2.self_attn_layer_norm.weight", REPLICATED),
        ("model.layers.0.input_layernorm.weight", REPLICATED),
        ("model.norm.weight", REPLICATED),
        ("model.embed_tokens.weight", REPLICATED),
        ("model.decoder.embed_positions.weight", REPLICATED),
        ("lm_head.weight", REPLICATED),
    ],
)
def test_each_hf_weight_has_its_megatron_rule(name: str, rule: object) -> None:
    assert shard_rule(name) == rule


def test_column_shards_split_output_rows_and_rejoin_bit_equal() -> None:
    w = torch.arange(8 * 3, dtype=torch.float32).reshape(8, 3)
    shards = [shard(w, COLUMN, r, 4) for r in range(4)]
    assert [s.shape for s in shards] == [torch.Size([2, 3])] * 4
    assert torch.equal(shards[1], w[2:4])
    assert torch.equal(unshard(shards, COLUMN), w)


def test_row_shards_split_input_columns_and_rejoin_bit_equal() -> None:
    w = torch.randn(3, 8).to(torch.bfloat16)
    shards = [shard(w, ROW, r, 2) for r in range(2)]
    assert torch.equal(shards[1], w[:, 4:])
    assert shards[1].is_contiguous()
    assert torch.equal(unshard(shards, ROW), w)


def test_column_bias_splits_its_only_dim() -> None:
    b = torch.arange(6, dtype=torch.int64)
    assert torch.equal(shard(b, COLUMN, 2, 3), torch.tensor([4, 5]))


def test_replicated_tensor_is_the_same_on_every_rank() -> None:
    t = torch.ones(5)
    assert shard(t, REPLICATED, 1, 2) is t
    assert shard_shape((5,), REPLICATED, 4) == (5,)
    assert REPLICATED.kind is ShardKind.REPLICATED


def test_indivisible_dim_raises_config_error_naming_tp() -> None:
    with pytest.raises(ConfigError, match="tp=4"):
        shard(torch.zeros(6, 2), COLUMN, 0, 4)


def test_gqa_kv_heads_must_divide_by_tp() -> None:
    config = {"num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 64}
    check_tp(config, 2)
    with pytest.raises(ConfigError, match="num_key_value_heads=2 is not divisible by tp=4"):
        check_tp(config, 4)


def test_rank_outside_tp_is_rejected() -> None:
    with pytest.raises(ConfigError, match="rank 2"):
        shard(torch.zeros(4), COLUMN, 2, 2)
