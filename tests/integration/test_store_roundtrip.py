"""Factory models through the real converter and loader: for every architecture, tp 1/2/4 and
every dtype the factory writes, shards concatenate back to the source bit for bit."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ember.store import convert, load, read_index
from ember.store.sharding import shard_rule, unshard

ARCHS = ("llama", "qwen2", "mistral", "opt")


def source_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def kv_override(arch: str, tp: int) -> dict[str, int]:
    # The tiny shapes use GQA with 2 kv heads (mistral: 1); kv heads must divide by tp.
    return {} if arch == "opt" or tp == 1 else {"num_key_value_heads": 4}


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("arch", ARCHS)
def test_factory_model_round_trips_bit_equal(
    model_factory: Callable[..., Path], tmp_path: Path, arch: str, tp: int
) -> None:
    hf = model_factory(arch, "tiny", "bf16", **kv_override(arch, tp))
    ck = convert(hf, tmp_path / "ck", tp=tp, progress=False)
    src = source_tensors(hf)
    ranks = [load(ck, rank=r) for r in range(tp)]
    assert all(set(r) == set(src) for r in ranks)
    for name, want in src.items():
        got = unshard([r[name] for r in ranks], shard_rule(name))
        assert got.dtype == want.dtype and torch.equal(got, want), name
    split = {t.name for t in read_index(ck).tensors if t.split != "replicated"}
    assert (len(split) > 0) == (tp > 1)
    assert json.loads((ck / "config.json").read_text()) == read_index(ck).config
    assert (ck / "tokenizer.json").is_file()


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_factory_dtypes_round_trip(
    model_factory: Callable[..., Path], tmp_path: Path, dtype: str
) -> None:
    hf = model_factory("qwen2", "tiny", dtype)
    ck = convert(hf, tmp_path / "ck", tp=2, progress=False)
    src = source_tensors(hf)
    ranks = [load(ck, rank=r) for r in range(2)]
    for name, want in src.items():
        assert torch.equal(unshard([r[name] for r in ranks], shard_rule(name)), want), name


def test_converted_checkpoint_loads_into_transformers(
    model_factory: Callable[..., Path], tmp_path: Path
) -> None:
    transformers = pytest.importorskip("transformers")
    hf = model_factory("llama", "tiny", "fp32")
    ck = convert(hf, tmp_path / "ck", progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf))
    for p in model.parameters():
        p.data.zero_()
    model.load_state_dict(load(ck), strict=True)
    ids = torch.tensor([[1, 2, 3]])
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(hf))(ids).logits
    assert torch.equal(model(ids).logits, reference)


_RSS_SCRIPT = """
import resource, sys
from ember.store import convert
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
convert(sys.argv[1], sys.argv[2], tp=int(sys.argv[3]), progress=False)
print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_conversion_memory_stays_near_the_largest_tensor(tmp_path: Path, tp: int) -> None:
    # 24 tensors of 8 MiB (192 MiB of weights): peak growth must stay well under the model size.
    hf = tmp_path / "hf"
    hf.mkdir()
    g = torch.Generator().manual_seed(0)
    tensors = {
        f"model.layers.{i}.mlp.up_proj.weight": torch.randn(2048, 1024, generator=g)
        for i in range(24)
    }
    save_file(tensors, str(hf / "model.safetensors"))
    del tensors
    (hf / "config.json").write_text(json.dumps({"intermediate_size": 2048}))
    out = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(hf), str(tmp_path / "ck"), str(tp)],
        check=True,
        capture_output=True,
        text=True,
    )
    before_kib, after_kib = map(int, out.stdout.split())
    growth_mib = (after_kib - before_kib) / 1024
    assert growth_mib < 64, f"conversion grew the peak RSS by {growth_mib:.0f} MiB"
