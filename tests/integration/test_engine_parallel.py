"""Tensor parallelism (two rank processes over gloo) and the bf16 CPU fast path, each checked
against the plain engine: same greedy tokens, and a request's KV exported from the TP group
resumes unchanged on a single-rank engine."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from ember.engine import Engine, EngineConfig, SamplingParams
from ember.engine.models.layers import can_pack_linears

PROMPTS = [[5, 9, 13], list(range(20, 57)), [7] * 11, list(range(300, 320))]
PARAMS = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EMBER_CACHE_DIR", str(tmp_path_factory.mktemp("ember-cache")))
        yield


def _generate(engine: Engine, prompts: list[list[int]]) -> dict[str, list[int]]:
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, PARAMS)
    out: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                out[o.request_id] = o.token_ids
    assert engine.block_manager.num_free == engine.block_manager.num_blocks
    return out


def test_tensor_parallel_two_ranks_give_the_same_greedy_tokens(
    model_factory: Callable[..., Path],
) -> None:
    path = model_factory("llama")
    cfg = {"model": str(path), "dtype": "fp32", "max_model_len": 128}
    reference = _generate(Engine(EngineConfig(**cfg)), PROMPTS)  # type: ignore[arg-type]
    # The TP engine also prefills in chunks (a 9-token budget: the 37-token prompt takes 5+
    # steps), each rank attending over its own KV heads read back from its cache.
    tp_cfg = {**cfg, "tensor_parallel_size": 2, "max_num_batched_tokens": 9}
    with Engine(EngineConfig(**tp_cfg)) as tp:  # type: ignore[arg-type]
        assert _generate(tp, PROMPTS) == reference
        # Export mid-way with KV (gathered from both ranks), resume on a single rank.
        tp.add_request("m", PROMPTS[1], PARAMS)
        head: list[int] = []
        for _ in range(9):
            head += [t for o in tp.step() for t in o.new_token_ids]
        state = tp.export_request("m", include_kv=True)
        assert state.kv is not None and state.kv.shape[3] == 2  # both ranks' kv heads
        tp.abort("m")
        tp.step()
        # A request whose (single-rank) instance died resumes on the TP group from its ids.
        tp.resume_request("lost", PROMPTS[2], PARAMS, reference["2"][:5])
        assert reference["2"][:5] + _generate_rest(tp) == reference["2"]
        assert tp.block_manager.num_free == tp.block_manager.num_blocks
    single = Engine(EngineConfig(**cfg))  # type: ignore[arg-type]
    single.import_request(state)
    tail = _generate_rest(single)
    assert head + tail == reference["1"]


def _generate_rest(engine: Engine) -> list[int]:
    tokens: list[int] = []
    while engine.has_unfinished():
        tokens += [t for o in engine.step() for t in o.new_token_ids]
    return tokens


class _Recorder:
    """Keeps each step's logits; otherwise the executor it wraps, unchanged."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.rows: list[torch.Tensor] = []

    def execute(self, plan: Any) -> torch.Tensor:
        out = self.inner.execute(plan)
        self.rows.append(out.clone())
        return out  # type: ignore[no-any-return]


def test_bf16_packed_weights_match_plain_weights(model_factory: Callable[..., Path]) -> None:
    path = model_factory("llama", dtype="bf16")
    logits: dict[bool, list[torch.Tensor]] = {}
    tokens: dict[bool, dict[str, list[int]]] = {}
    for pack in (True, False):
        engine = Engine(
            EngineConfig(
                model=str(path), max_model_len=128, pack_weights=pack, pack_in_background=False
            )
        )
        assert engine.dtype == torch.bfloat16
        inner = engine._executor
        recorder = _Recorder(inner)
        engine._executor = recorder
        tokens[pack] = _generate(engine, PROMPTS)
        logits[pack] = recorder.rows
        assert inner.packed == (pack and can_pack_linears(torch.device("cpu"), torch.bfloat16))
    first = logits[True][0], logits[False][0]  # the prefill step: same inputs for both
    scale = first[1].abs().max()
    assert ((first[0] - first[1]).abs().max() / scale).item() < 2e-2
    assert tokens[True] == tokens[False]
    # Packing on a thread while serving: the swap happens between steps, tokens are unchanged.
    background = Engine(EngineConfig(model=str(path), max_model_len=128, pack_in_background=True))
    assert _generate(background, PROMPTS) == tokens[False]
    background._executor.wait_packed()
    assert background._executor.packed == can_pack_linears(torch.device("cpu"), torch.bfloat16)
    assert _generate(background, PROMPTS) == tokens[False]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_engine_gives_the_cpu_greedy_tokens(model_factory: Callable[..., Path]) -> None:
    path = model_factory("llama")
    cfg = {"model": str(path), "dtype": "fp32", "max_model_len": 128}
    cpu = _generate(Engine(EngineConfig(**cfg)), PROMPTS)  # type: ignore[arg-type]
    gpu = Engine(EngineConfig(**cfg, device="cuda"))  # type: ignore[arg-type]
    assert _generate(gpu, PROMPTS) == cpu


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("source,target", [("cuda", "cpu"), ("cpu", "cuda")])
def test_request_moves_between_a_gpu_and_a_cpu_engine_with_its_kv(
    model_factory: Callable[..., Path], source: str, target: str, temperature: float
) -> None:
    """Exported mid-way with its KV blocks on one device, resumed on the other: the tokens
    are those the request gets unmoved (greedy, and seeded sampling from the same RNG state)."""
    path = model_factory("llama")
    cfg = {"model": str(path), "dtype": "fp32", "max_model_len": 128}
    params = SamplingParams(max_tokens=32, temperature=temperature, seed=7, ignore_eos=True)
    first = Engine(EngineConfig(**cfg, device=source))  # type: ignore[arg-type]
    first.add_request("m", PROMPTS[1], params)
    unmoved = _generate_rest(first)
    first.add_request("m", PROMPTS[1], params)
    head: list[int] = []
    for _ in range(9):
        head += [t for o in first.step() for t in o.new_token_ids]
    state = first.export_request("m", include_kv=True)
    assert state.kv is not None and state.kv.device.type == "cpu"
    first.abort("m")
    first.step()
    assert first.block_manager.num_free == first.block_manager.num_blocks
    second = Engine(EngineConfig(**cfg, device=target))  # type: ignore[arg-type]
    second.import_request(state)
    assert head + _generate_rest(second) == unmoved
    assert second.block_manager.num_free == second.block_manager.num_blocks
