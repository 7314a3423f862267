"""How many KV blocks an engine gets.

With `kv_cache_bytes` set, that many bytes per rank. Otherwise: room for `max_num_seqs`
requests of `max_model_len` tokens, capped on CPU at a quarter of the host's available memory
(it is shared with the weights and other processes) and on CUDA at 90% of the free device
memory (measured before the weights load, minus their size). Either way the cache must hold at
least one full-length request, or `OutOfKVCacheError` names the knobs to change.
"""

from __future__ import annotations

import logging

import torch

from ember.engine.config import EngineConfig, ModelConfig
from ember.errors import OutOfKVCacheError

logger = logging.getLogger(__name__)


def bytes_per_block(cfg: ModelConfig, tp: int, block_size: int, dtype: torch.dtype) -> int:
    elt = torch.empty(0, dtype=dtype).element_size()
    return 2 * cfg.num_layers * block_size * (cfg.num_kv_heads // tp) * cfg.head_dim * elt


def _host_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def _weight_bytes(cfg: ModelConfig, tp: int, dtype: torch.dtype) -> int:
    elt = torch.empty(0, dtype=dtype).element_size()
    d, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    per_layer = 4 * d * d + 3 * d * inter
    return elt * (layers * per_layer // tp + 2 * cfg.vocab_size * d)


def kv_cache_blocks(
    config: EngineConfig,
    cfg: ModelConfig,
    dtype: torch.dtype,
    max_model_len: int,
    device: torch.device,
) -> int:
    tp, block = config.tensor_parallel_size, config.block_size_tokens
    per_block = bytes_per_block(cfg, tp, block, dtype)
    need_one = -(-max_model_len // block)
    if config.kv_cache_bytes is not None:
        blocks = config.kv_cache_bytes // per_block
    else:
        wanted = config.max_num_seqs * need_one
        if device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(device)
            budget = int(free * 0.9) - _weight_bytes(cfg, tp, dtype)
        else:
            budget = _host_available_bytes() // 4
        blocks = min(wanted, max(budget, 0) // per_block)
    if blocks < need_one:
        raise OutOfKVCacheError(
            f"KV cache of {blocks} blocks ({blocks * per_block} bytes) cannot hold one request of "
            f"max_model_len={max_model_len} tokens ({need_one * per_block} bytes needed); raise "
            "kv_cache_bytes or lower max_model_len"
        )
    logger.info("kv_cache blocks=%d block_bytes=%d", blocks, per_block)
    return int(blocks)
