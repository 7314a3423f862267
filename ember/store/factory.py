"""The model factory: random-weight Hugging Face model folders for tests, benchmarks and the demo.

`make_model(out_dir, arch, size, dtype, seed)` writes what a real checkpoint holds: config.json
with the architecture's own fields, generation_config.json, weights in safetensors under the
exact names transformers expects (sharded with model.safetensors.index.json above
`shard_bytes`, 2 GB by default), and a locally trained byte-level BPE tokenizer
(see `ember.store.factory_tokenizer`). Shapes follow real models (`1b` is TinyLlama-1.1B's).

Weights are written one tensor at a time straight into the safetensors files (header first,
computed from the shapes), so peak memory is about one fp32 tensor, not the model. Each tensor
is drawn from its own generator seeded by (seed, name): the same seed gives byte-identical files.

Initialisation keeps greedy decoding well defined (see docs/factory.md for measurements): the
residual stream, embeddings and lm_head have std `LOGIT_STD / sqrt(d)` so that logits have std
about `LOGIT_STD` (top-2 gaps around 1, far above fp32 rounding); the other projections keep
their outputs at unit scale (`1/sqrt(fan_in)`, queries and keys a little sharper) and write
back into the residual stream at its scale; norm weights are 1 + N(0, 0.1) and biases small
but non-zero, so a loader that drops a norm or bias produces visibly different logits.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ember.errors import ConfigError
from ember.store import factory_tokenizer as ftok

logger = logging.getLogger(__name__)

ARCHS = ("llama", "qwen2", "mistral", "opt")
SIZES = ("tiny", "125m", "0.5b", "1b")
DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
}
_ST_DTYPE = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
_CONFIG_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
DEFAULT_SHARD_BYTES = 2_000_000_000
LOGIT_STD = 4.0
QK_GAIN = 1.5
NORM_NOISE = 0.1
BIAS_STD = 0.1

# Llama 3.1's rope scaling, for tests of that code path: make_model(..., overrides={"rope_scaling":
# LLAMA3_ROPE_SCALING}). With head_dim 16 and theta 1e4 it rescales part of the tiny model's bands.
LLAMA3_ROPE_SCALING: dict[str, Any] = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

# hidden, intermediate, layers, heads, kv heads, vocab, max positions, tied
_LLAMA_FAMILY: dict[tuple[str, str], tuple[int, int, int, int, int, int, int, bool]] = {
    # tiny: GQA (4 query heads share 2 kv heads), a few MB
    ("llama", "tiny"): (64, 176, 2, 4, 2, 1024, 2048, False),
    ("llama", "125m"): (768, 2048, 12, 12, 12, 32000, 2048, False),  # "Llama 134M"
    ("llama", "0.5b"): (896, 4864, 24, 14, 2, 32000, 32768, False),  # Qwen2-0.5B's body
    ("llama", "1b"): (2048, 5632, 22, 32, 4, 32000, 2048, False),  # TinyLlama-1.1B
    ("qwen2", "tiny"): (64, 176, 2, 4, 2, 1024, 4096, True),
    ("qwen2", "125m"): (768, 2048, 12, 12, 4, 32000, 4096, True),
    ("qwen2", "0.5b"): (896, 4864, 24, 14, 2, 151936, 32768, True),  # Qwen2-0.5B
    ("qwen2", "1b"): (1536, 8960, 28, 12, 2, 151936, 32768, True),  # Qwen2-1.5B
    # tiny: multi-query attention (one kv head)
    ("mistral", "tiny"): (64, 176, 2, 4, 1, 1024, 4096, False),
    ("mistral", "125m"): (768, 2048, 12, 12, 4, 32768, 32768, False),
    ("mistral", "0.5b"): (896, 4864, 24, 14, 2, 32768, 32768, False),
    ("mistral", "1b"): (2048, 5632, 22, 32, 8, 32768, 32768, False),
}
# hidden, ffn, layers, heads, vocab, word_embed_proj_dim, do_layer_norm_before
_OPT: dict[str, tuple[int, int, int, int, int, int, bool]] = {
    "tiny": (64, 256, 2, 4, 1024, 64, True),
    "125m": (768, 3072, 12, 12, 50272, 768, True),  # OPT-125m
    "0.5b": (1024, 4096, 24, 16, 50272, 512, False),  # OPT-350m: post-LN, project_in/out
    "1b": (2048, 8192, 24, 32, 50272, 2048, True),  # OPT-1.3b
}


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One weight: its HF name, shape, and how to draw it."""

    name: str
    shape: tuple[int, ...]
    kind: str  # "normal" (std), "norm" (1 + noise), "bias" (std)
    std: float


def model_config(
    arch: str, size: str, dtype: str = "bf16", overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """config.json contents for an (arch, size), with `overrides` applied on top."""
    if arch not in ARCHS:
        raise ConfigError(f"arch={arch!r} is not one of {', '.join(ARCHS)}")
    if size not in SIZES:
        raise ConfigError(f"size={size!r} is not one of {', '.join(SIZES)}")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    cfg = _opt_config(size) if arch == "opt" else _llama_family_config(arch, size)
    cfg["torch_dtype"] = _CONFIG_DTYPE[dtype]
    cfg.update(overrides or {})
    if cfg.get("rope_scaling") is None:
        cfg.pop("rope_scaling", None)
    return cfg


def _llama_family_config(arch: str, size: str) -> dict[str, Any]:
    hidden, inter, layers, heads, kv, vocab, max_pos, tied = _LLAMA_FAMILY[(arch, size)]
    cls = {
        "llama": "LlamaForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
        "mistral": "MistralForCausalLM",
    }
    cfg: dict[str, Any] = {
        "architectures": [cls[arch]],
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": hidden // heads,
        "hidden_act": "silu",
        "max_position_embeddings": max_pos,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "bos_token_id": ftok.BOS_ID,
        "eos_token_id": ftok.EOS_ID,
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "use_cache": True,
    }
    if arch == "llama":
        cfg.update(rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None, attention_bias=False)
        cfg.update(mlp_bias=False, pretraining_tp=1)
    elif arch == "qwen2":  # q/k/v carry biases in every Qwen2 (no config switch)
        cfg.update(rms_norm_eps=1e-6, rope_theta=1000000.0, rope_scaling=None)
        cfg.update(use_sliding_window=False, sliding_window=max_pos, max_window_layers=layers)
    else:  # mistral v0.2+: no sliding window
        cfg.update(rms_norm_eps=1e-5, rope_theta=1000000.0, sliding_window=None)
    return cfg


def _opt_config(size: str) -> dict[str, Any]:
    hidden, ffn, layers, heads, vocab, proj, ln_before = _OPT[size]
    return {
        "architectures": ["OPTForCausalLM"],
        "model_type": "opt",
        "hidden_size": hidden,
        "ffn_dim": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "vocab_size": vocab,
        "word_embed_proj_dim": proj,
        "max_position_embeddings": 2048,
        "do_layer_norm_before": ln_before,
        "_remove_final_layer_norm": False,
        "activation_function": "relu",
        "enable_bias": True,
        "layer_norm_elementwise_affine": True,
        "tie_word_embeddings": True,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
        "layerdrop": 0.0,
        "init_std": 0.02,
        "bos_token_id": ftok.BOS_ID,
        "eos_token_id": ftok.EOS_ID,
        "pad_token_id": ftok.PAD_ID,
        "prefix": ftok.EOS,
        "use_cache": True,
    }


def _write_gain(d: int) -> float:
    """How much larger block outputs are than token embeddings in the residual stream.

    With tied embeddings the final hidden state still holds the current token's embedding,
    whose dot product with itself (d * std**2) beats every other token's by ~sqrt(d): greedy
    decoding then repeats the last token forever. Blocks that write sqrt(d)/2 times louder
    drown that echo, so the next token depends on the context through attention and MLPs.
    """
    return max(1.0, math.sqrt(d) / 2)


def tensor_specs(cfg: Mapping[str, Any]) -> list[TensorSpec]:
    """Every tensor the checkpoint stores, in file order (tied lm_head omitted, as HF does)."""
    if cfg["model_type"] == "opt":
        return _opt_specs(cfg)
    d, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or d // heads
    r = LOGIT_STD / math.sqrt(d)  # embedding (and untied lm_head) scale
    w = r * _write_gain(d)  # what each attention / MLP block adds to the residual stream
    qkv_bias = cfg["model_type"] == "qwen2" or bool(cfg.get("attention_bias"))
    specs = [TensorSpec("model.embed_tokens.weight", (cfg["vocab_size"], d), "normal", r)]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        specs += [
            TensorSpec(p + "self_attn.q_proj.weight", (heads * hd, d), "normal", QK_GAIN / d**0.5),
            TensorSpec(p + "self_attn.k_proj.weight", (kv * hd, d), "normal", QK_GAIN / d**0.5),
            TensorSpec(p + "self_attn.v_proj.weight", (kv * hd, d), "normal", 1 / d**0.5),
        ]
        if qkv_bias:
            for proj, n in (("q", heads), ("k", kv), ("v", kv)):
                specs.append(
                    TensorSpec(p + f"self_attn.{proj}_proj.bias", (n * hd,), "bias", BIAS_STD)
                )
        specs += [
            TensorSpec(
                p + "self_attn.o_proj.weight", (d, heads * hd), "normal", w / (heads * hd) ** 0.5
            ),
            TensorSpec(p + "mlp.gate_proj.weight", (inter, d), "normal", 1 / d**0.5),
            TensorSpec(p + "mlp.up_proj.weight", (inter, d), "normal", 1 / d**0.5),
            TensorSpec(p + "mlp.down_proj.weight", (d, inter), "normal", 2 * w / inter**0.5),
            TensorSpec(p + "input_layernorm.weight", (d,), "norm", NORM_NOISE),
            TensorSpec(p + "post_attention_layernorm.weight", (d,), "norm", NORM_NOISE),
        ]
    specs.append(TensorSpec("model.norm.weight", (d,), "norm", NORM_NOISE))
    if not cfg["tie_word_embeddings"]:
        specs.append(TensorSpec("lm_head.weight", (cfg["vocab_size"], d), "normal", r))
    return specs


def _opt_specs(cfg: Mapping[str, Any]) -> list[TensorSpec]:
    d, ffn, proj = cfg["hidden_size"], cfg["ffn_dim"], cfg["word_embed_proj_dim"]
    pre_ln = cfg["do_layer_norm_before"]
    r = LOGIT_STD / math.sqrt(proj)  # embedding scale: tied lm_head gives logits of std LOGIT_STD
    # post-LN layers see a unit-scale stream; pre-LN layers write at the embedding's scale
    out_std = 1.0 if not pre_ln else LOGIT_STD / math.sqrt(d) * _write_gain(d)
    p = "model.decoder."
    specs = [
        TensorSpec(p + "embed_tokens.weight", (cfg["vocab_size"], proj), "normal", r),
        # OPT's learned positions are offset by 2 (a fairseq legacy)
        TensorSpec(
            p + "embed_positions.weight", (cfg["max_position_embeddings"] + 2, d), "normal", out_std
        ),
    ]
    if proj != d:
        specs.append(
            TensorSpec(p + "project_in.weight", (d, proj), "normal", 1 / proj**0.5 * out_std / r)
        )
        specs.append(TensorSpec(p + "project_out.weight", (proj, d), "normal", 1 / d**0.5))
    for i in range(cfg["num_hidden_layers"]):
        q = f"{p}layers.{i}."
        for name, std in (("q", QK_GAIN / d**0.5), ("k", QK_GAIN / d**0.5), ("v", 1 / d**0.5)):
            specs.append(TensorSpec(q + f"self_attn.{name}_proj.weight", (d, d), "normal", std))
            specs.append(TensorSpec(q + f"self_attn.{name}_proj.bias", (d,), "bias", BIAS_STD))
        specs += [
            TensorSpec(q + "self_attn.out_proj.weight", (d, d), "normal", out_std / d**0.5),
            TensorSpec(q + "self_attn.out_proj.bias", (d,), "bias", BIAS_STD * out_std),
            TensorSpec(q + "self_attn_layer_norm.weight", (d,), "norm", NORM_NOISE),
            TensorSpec(q + "self_attn_layer_norm.bias", (d,), "bias", BIAS_STD),
            TensorSpec(q + "fc1.weight", (ffn, d), "normal", 1 / d**0.5),
            TensorSpec(q + "fc1.bias", (ffn,), "bias", BIAS_STD),
            TensorSpec(q + "fc2.weight", (d, ffn), "normal", 2 * out_std / ffn**0.5),
            TensorSpec(q + "fc2.bias", (d,), "bias", BIAS_STD * out_std),
            TensorSpec(q + "final_layer_norm.weight", (d,), "norm", NORM_NOISE),
            TensorSpec(q + "final_layer_norm.bias", (d,), "bias", BIAS_STD),
        ]
    if pre_ln and not cfg.get("_remove_final_layer_norm"):
        specs.append(TensorSpec(p + "final_layer_norm.weight", (d,), "norm", NORM_NOISE))
        specs.append(TensorSpec(p + "final_layer_norm.bias", (d,), "bias", BIAS_STD))
    if not cfg["tie_word_embeddings"]:
        specs.append(TensorSpec("lm_head.weight", (cfg["vocab_size"], proj), "normal", r))
    return specs


def draw_tensor(spec: TensorSpec, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """The tensor for `spec`: a pure function of (seed, name, shape, dtype)."""
    digest = hashlib.sha256(f"{seed}:{spec.name}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    t = torch.randn(spec.shape, generator=gen, dtype=torch.float32).mul_(spec.std)
    if spec.kind == "norm":
        t.add_(1.0)
    return t.to(dtype)


def _shard_plan(sizes: list[int], shard_bytes: int) -> list[list[int]]:
    """Greedy split of tensors (by index, in order) into shards of at most shard_bytes each."""
    shards: list[list[int]] = [[]]
    used = 0
    for i, n in enumerate(sizes):
        if shards[-1] and used + n > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(i)
        used += n
    return shards


def _write_safetensors(
    path: Path, specs: list[TensorSpec], seed: int, dtype: torch.dtype
) -> Iterator[str]:
    """Write one safetensors file tensor by tensor; yields each tensor name as it is written."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for s in specs:
        n = math.prod(s.shape) * itemsize
        header[s.name] = {
            "dtype": _ST_DTYPE[dtype],
            "shape": list(s.shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # tensor data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for s in specs:
            t = draw_tensor(s, seed, dtype)
            f.write(t.contiguous().view(torch.uint8).numpy().data)  # no copy
            del t
            yield s.name


def _dump_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def make_model(
    out_dir: str | Path,
    arch: str = "llama",
    size: str = "tiny",
    dtype: str = "bf16",
    seed: int = 0,
    *,
    overrides: Mapping[str, Any] | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write a random-weight HF model folder to `out_dir` and return its path.

    `overrides` replaces config.json fields before the weights are shaped (for instance
    `{"tie_word_embeddings": True}`, `{"rope_scaling": LLAMA3_ROPE_SCALING}`,
    `{"num_hidden_layers": 1}`). Weights go in one `model.safetensors` unless they exceed
    `shard_bytes`, then in `model-0000i-of-0000n.safetensors` with an index.
    """
    cfg = model_config(arch, size, dtype, overrides)
    if shard_bytes < 1:
        raise ConfigError(f"shard_bytes={shard_bytes} must be positive")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch_dtype = DTYPES[dtype]
    specs = tensor_specs(cfg)
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    sizes = [math.prod(s.shape) * itemsize for s in specs]
    plan = _shard_plan(sizes, shard_bytes)
    for stale in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    if len(plan) == 1:
        for _ in _write_safetensors(out / "model.safetensors", specs, seed, torch_dtype):
            pass
    else:
        weight_map: dict[str, str] = {}
        for k, idxs in enumerate(plan):
            fname = f"model-{k + 1:05d}-of-{len(plan):05d}.safetensors"
            for name in _write_safetensors(
                out / fname, [specs[i] for i in idxs], seed, torch_dtype
            ):
                weight_map[name] = fname
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        _dump_json(out / "model.safetensors.index.json", index)
    _dump_json(out / "config.json", cfg)
    gen_cfg = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}
    if "pad_token_id" in cfg:
        gen_cfg["pad_token_id"] = cfg["pad_token_id"]
    _dump_json(out / "generation_config.json", gen_cfg)
    (out / "tokenizer.json").write_text(ftok.tokenizer_json(cfg["vocab_size"]))
    _dump_json(out / "tokenizer_config.json", ftok.tokenizer_config(cfg["max_position_embeddings"]))
    _dump_json(out / "special_tokens_map.json", ftok.special_tokens_map())
    n_params = sum(math.prod(s.shape) for s in specs)
    logger.info(
        "event=make_model arch=%s size=%s dtype=%s seed=%d params=%d bytes=%d shards=%d path=%s",
        arch, size, dtype, seed, n_params, sum(sizes), len(plan), out,
    )  # fmt: skip
    return out
