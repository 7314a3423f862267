"""The model factory writes folders that transformers loads as the real architectures."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ember.cli.main import main
from ember.errors import ConfigError
from ember.store.factory import (
    ARCHS,
    LLAMA3_ROPE_SCALING,
    SIZES,
    make_model,
    model_config,
    tensor_specs,
)

transformers = pytest.importorskip("transformers")


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _file_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_1b_llama_has_tinyllama_shape() -> None:
    cfg = model_config("llama", "1b")
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    shape = {k: cfg[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers")}
    assert shape == {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22}
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]) == (
        32,
        4,
        32000,
    )
    params = sum(torch.Size(s.shape).numel() for s in tensor_specs(cfg))
    assert params == 1_100_048_384  # TinyLlama-1.1B's parameter count


def test_125m_llama_is_the_134m_shape_and_opt_125m_is_opt() -> None:
    llama = sum(torch.Size(s.shape).numel() for s in tensor_specs(model_config("llama", "125m")))
    assert llama == 134_105_856
    opt = model_config("opt", "125m")
    assert (opt["ffn_dim"], opt["word_embed_proj_dim"], opt["vocab_size"]) == (3072, 768, 50272)
    assert opt["do_layer_norm_before"] is True and opt["enable_bias"] is True


def test_config_records_dtype_and_overrides() -> None:
    cfg = model_config("qwen2", "tiny", "fp16", {"num_hidden_layers": 3})
    assert cfg["torch_dtype"] == "float16" and cfg["num_hidden_layers"] == 3
    assert cfg["model_type"] == "qwen2" and cfg["tie_word_embeddings"] is True
    assert "rope_scaling" not in model_config("llama", "tiny")


@pytest.mark.parametrize(
    "bad", [("gpt2", "tiny", "bf16"), ("llama", "7b", "bf16"), ("llama", "tiny", "int4")]
)
def test_unknown_arch_size_or_dtype_is_a_config_error(
    bad: tuple[str, str, str], tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=bad[0] if bad[0] == "gpt2" else "is not one of"):
        make_model(tmp_path, *bad)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("size", SIZES)
def test_tensor_names_and_shapes_match_transformers(arch: str, size: str) -> None:
    cfg = model_config(arch, size)
    hf_config = transformers.AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg["tie_word_embeddings"]:
        del expected["lm_head.weight"]  # real tied checkpoints store the embedding only
    assert {s.name: s.shape for s in tensor_specs(cfg)} == expected


@pytest.mark.parametrize(
    ("arch", "overrides"),
    [
        ("llama", {}),
        ("llama", {"tie_word_embeddings": True, "rope_scaling": LLAMA3_ROPE_SCALING}),
        ("qwen2", {}),
        ("mistral", {}),
        ("opt", {}),
    ],
)
def test_transformers_loads_every_weight_from_the_file(
    arch: str, overrides: dict[str, object], model_factory
) -> None:
    folder = model_factory(arch, **overrides)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        folder, output_loading_info=True, dtype=torch.float32
    )
    assert all(not v for v in info.values()), info
    assert type(model).__name__ == model_config(arch, "tiny")["architectures"][0]
    state = model.state_dict()
    for name, t in _file_tensors(folder).items():
        assert torch.equal(state[name], t), name
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    if "rope_scaling" in overrides:
        assert model.config.rope_parameters["rope_type"] == "llama3"


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_greedy_decoding_is_varied_with_well_separated_logits(arch: str, model_factory) -> None:
    folder = model_factory(arch)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    ids = tok("The man said that the water was", return_tensors="pt")
    out = model.generate(
        **ids, max_new_tokens=64, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    new = out.sequences[0, ids["input_ids"].shape[1] :].tolist()
    top2 = torch.stack(out.logits).topk(2, dim=-1).values
    gaps = (top2[..., 0] - top2[..., 1]).flatten()
    assert len(new) == 64 and len(set(new)) >= 24  # not a token repeated forever
    assert gaps.median() > 0.3 and gaps.min() > 1e-4  # far above fp32 rounding of logits ~10


def test_tokenizer_round_trips_through_autotokenizer(model_factory) -> None:
    folder = model_factory("llama")
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    text = "Hello world, the man said 42 times! Über naïve 🙂"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id == 1 and tok.eos_token_id == 2
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert len(tok) == model_config("llama", "tiny")["vocab_size"]
    # ids above the trained merges (padding of the vocabulary) still decode to text
    assert tok.decode([len(tok) - 1]).strip() != ""
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|user|>\nhi</s>\n<|assistant|>\n"


def test_tokenizer_matches_each_models_vocab_size(tmp_path: Path) -> None:
    folder = make_model(tmp_path, "llama", "tiny", overrides={"vocab_size": 512})
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert len(tok) == 512
    text = "The man said that the water was long."
    ids = tok(text)["input_ids"]
    assert max(ids) < 512 and tok.decode(ids, skip_special_tokens=True) == text


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(tmp_path: Path) -> None:
    a = make_model(tmp_path / "a", "qwen2", "tiny", "bf16", seed=7)
    b = make_model(tmp_path / "b", "qwen2", "tiny", "bf16", seed=7)
    c = make_model(tmp_path / "c", "qwen2", "tiny", "bf16", seed=8)
    assert _digests(a) == _digests(b)
    assert _digests(a)["model.safetensors"] != _digests(c)["model.safetensors"]
    assert _digests(a)["tokenizer.json"] == _digests(c)["tokenizer.json"]


def test_weights_above_the_shard_threshold_are_sharded_with_an_index(tmp_path: Path) -> None:
    single = make_model(tmp_path / "one", "mistral", "tiny", "fp32")
    sharded = make_model(tmp_path / "many", "mistral", "tiny", "fp32", shard_bytes=200_000)
    files = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    tensors = _file_tensors(sharded)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in tensors.values()
    )
    reference = _file_tensors(single)
    assert tensors.keys() == reference.keys()
    assert all(torch.equal(tensors[k], reference[k]) for k in tensors)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        sharded, output_loading_info=True
    )
    assert all(not v for v in info.values()), info


def test_make_model_command_writes_a_loadable_folder(tmp_path: Path) -> None:
    rc = main(
        ["make-model", "--arch", "opt", "--dtype", "fp16", "--seed", "3", str(tmp_path / "m")]
    )
    assert rc == 0
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["model_type"] == "opt" and cfg["torch_dtype"] == "float16"
    assert all(t.dtype == torch.float16 for t in _file_tensors(tmp_path / "m").values())
    assert _digests(tmp_path / "m") == _digests(
        make_model(tmp_path / "n", "opt", "tiny", "fp16", 3)
    )
