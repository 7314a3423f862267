"""Engine and model configuration: what the user sets (`EngineConfig`) and what the model's
config.json says (`ModelConfig`), both validated once, up front, with errors naming the field.

`ModelConfig.from_hf` reads the Hugging Face config dict of the four architectures the engine has
model code for, accepting both the transformers 4 (`rope_theta`, `rope_scaling`) and the
transformers 5 (`rope_parameters`) spellings.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ember.errors import ConfigError, UnsupportedArchitectureError

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "MistralForCausalLM",
    "OPTForCausalLM",
)
_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """One engine replica.

    - `model`: an ember checkpoint directory (has `index.json`) or a Hugging Face folder, which
      is converted once into `$EMBER_CACHE_DIR` (default `~/.cache/ember/checkpoints`).
    - `dtype`: "auto" (the checkpoint's), "fp32"/"float32", "bf16"/"bfloat16", "fp16"/"float16".
    - `tensor_parallel_size`: ranks, one process each (gloo on CPU, NCCL on CUDA).
    - `max_model_len`: prompt plus generated tokens of one request; default: the model's
      `max_position_embeddings`, capped at 4096.
    - `max_num_seqs`: requests running at once (the batch size of a decode step).
    - `max_num_batched_tokens`: tokens in one step, decodes first, then prompt chunks: a
      prompt longer than what is left is prefilled over several steps (chunked prefill), so
      one long prompt never stalls the running requests' decodes for more than a step of this
      many tokens. Running decodes all run even beyond it.
    - `kv_cache_bytes`: KV cache size per rank; default: room for `max_num_seqs` full-length
      requests, capped at a quarter of available host memory (CPU) or 90% of free GPU memory.
    - `block_size_tokens`: tokens per KV block.
    - `device`: "cpu" or "cuda" / "cuda:N".
    - `seed`: seeds the per-request generators of requests that name no seed.
    - `pack_weights`: on CPU in bf16, re-lay linear weights out for oneDNN's kernels (2-3x
      faster decode; the plain copy from the store is released after packing).
    - `pack_in_background`: pack on a thread while the first requests are served with the
      plain weights, on one torch thread fewer (so the packer and the serving threads do not
      oversubscribe the cores, which made steps 10x slower on 2 cores). On by default: on the
      2-core dev VM a fresh 1.1B engine was ready to step after 0.6-0.9 s instead of 1.6-2.2 s
      (page cache warm), and its first token then cost 0.4-0.45 s instead of 0.2-0.3 s. The swap happens between steps;
      bf16 logits before and after it can differ in the last bits.
    - `map_weights`: on CPU, map the checkpoint's partition files (copy-on-write, pages
      faulted in up front on several threads) and use the page cache's own pages as the
      weights, instead of reading them into memory of the engine's own: no copy, no fresh
      memory, one copy per node whatever the number of engines. A fresh 1.1B engine reached
      its first token in 1.1 s instead of 1.8-3.6 s with the files cached, 2.0 s instead of
      2.9-3.5 s with them on disk (2-core dev VM; docs/engine.md). The page cache may drop
      pages of a mapped file under memory pressure; they are read in again when used.
    """

    model: str
    dtype: str = "auto"
    tensor_parallel_size: int = 1
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    kv_cache_bytes: int | None = None
    block_size_tokens: int = 16
    device: str = "cpu"
    seed: int = 0
    pack_weights: bool = True
    pack_in_background: bool = True
    map_weights: bool = True

    def __post_init__(self) -> None:
        positive = {
            "tensor_parallel_size": self.tensor_parallel_size,
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "block_size_tokens": self.block_size_tokens,
        }
        if self.max_model_len is not None:
            positive["max_model_len"] = self.max_model_len
        if self.kv_cache_bytes is not None:
            positive["kv_cache_bytes"] = self.kv_cache_bytes
        for field, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{field} must be a positive integer, got {value!r}")
        if self.dtype not in DTYPE_NAMES:
            raise ConfigError(f"dtype must be one of {sorted(DTYPE_NAMES)}, got {self.dtype!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")


# Names users may give for a dtype -> canonical torch dtype name ("auto": the checkpoint's).
DTYPE_NAMES = {
    "auto": "auto",
    "fp32": "float32",
    "float32": "float32",
    "float": "float32",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "half": "float16",
}


@dataclass(frozen=True, slots=True)
class RopeConfig:
    """Rotary embedding: `rope_type` is default, linear or llama3 (fields as in HF configs)."""

    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """The fields of an HF config.json the model code reads (full, unsharded sizes)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    rope: RopeConfig | None
    sliding_window: int | None
    torch_dtype: str
    eos_token_ids: tuple[int, ...]
    # OPT only
    do_layer_norm_before: bool = True
    word_embed_proj_dim: int = 0
    final_layer_norm: bool = True
    hidden_act: str = "silu"

    @property
    def is_opt(self) -> bool:
        return self.architecture == "OPTForCausalLM"

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> ModelConfig:
        archs = hf.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedArchitectureError(
                f"config.json architectures={archs!r}: the engine has model code for "
                f"{', '.join(SUPPORTED_ARCHITECTURES)} only"
            )
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        dtype = str(hf.get("torch_dtype") or hf.get("dtype") or "float32")
        heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        if arch == "OPTForCausalLM":
            return cls(
                architecture=arch,
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(hf["ffn_dim"]),
                num_layers=int(hf["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=heads,
                head_dim=hidden // heads,
                max_position_embeddings=int(hf["max_position_embeddings"]),
                norm_eps=1e-5,
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
                qkv_bias=bool(hf.get("enable_bias", True)),
                o_bias=bool(hf.get("enable_bias", True)),
                mlp_bias=bool(hf.get("enable_bias", True)),
                rope=None,
                sliding_window=None,
                torch_dtype=dtype,
                eos_token_ids=eos_ids,
                do_layer_norm_before=bool(hf.get("do_layer_norm_before", True)),
                word_embed_proj_dim=int(hf.get("word_embed_proj_dim") or hidden),
                final_layer_norm=not bool(hf.get("_remove_final_layer_norm", False)),
                hidden_act=str(hf.get("activation_function", "relu")),
            )
        act = str(hf.get("hidden_act", "silu"))
        if act != "silu":
            raise UnsupportedArchitectureError(f"config.json hidden_act={act!r}: only silu")
        is_qwen = arch == "Qwen2ForCausalLM"
        window = hf.get("sliding_window")
        if is_qwen and not hf.get("use_sliding_window", False):
            window = None
        return cls(
            architecture=arch,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hidden // heads),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=is_qwen or bool(hf.get("attention_bias", False)),
            o_bias=(not is_qwen) and bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            rope=_rope_config(hf),
            sliding_window=int(window) if window else None,
            torch_dtype=dtype,
            eos_token_ids=eos_ids,
            hidden_act=act,
        )


def _rope_config(hf: Mapping[str, Any]) -> RopeConfig:
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = str(params.get("rope_type", params.get("type", "default")))
    if rope_type not in _ROPE_TYPES:
        raise UnsupportedArchitectureError(
            f"config.json rope_type={rope_type!r}: the engine supports {', '.join(_ROPE_TYPES)}"
        )
    return RopeConfig(
        theta=theta,
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
    )
