"""The engine against transformers on random-weight factory models (fp32): logits of every
step within 1e-4 relative of transformers' teacher-forced logits, and greedy tokens identical
for 64 new tokens, alone (batch 1) and in a batch of 8 prompts of mixed lengths.

A greedy divergence is accepted only where transformers' own top-2 logit gap at that position
is below the numeric tolerance (a near-tie); the comparison stops there.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from ember.engine import Engine, EngineConfig, SamplingParams
from ember.engine.models import cpu_attention
from ember.store.factory import LLAMA3_ROPE_SCALING

transformers = pytest.importorskip("transformers")

NEW_TOKENS = 64
PROMPT_LENS = (5, 17, 33, 8, 40, 12, 3, 25)
REL_TOL = 1e-4

CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),
    "llama-tied-rope-llama3": (
        "llama",
        {
            "tie_word_embeddings": True,
            "rope_scaling": {**LLAMA3_ROPE_SCALING, "original_max_position_embeddings": 64},
        },
    ),
    "qwen2": ("qwen2", {}),
    "mistral": ("mistral", {}),
    "mistral-sliding-window": ("mistral", {"sliding_window": 24}),
    "opt": ("opt", {}),
}


@pytest.fixture(scope="module", autouse=True)
def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EMBER_CACHE_DIR", str(tmp_path_factory.mktemp("ember-cache")))
        yield


class LogitRecorder:
    """Wraps the engine's executor to keep each step's logits (behaviour unchanged)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.rows: dict[str, list[torch.Tensor]] = {}

    def execute(self, plan: Any) -> torch.Tensor:
        logits = self.inner.execute(plan)
        for seq, row in zip(plan.seqs, logits, strict=True):
            if seq.sample:  # a prompt chunk that ends early yields no token
                self.rows.setdefault(seq.request_id, []).append(row.to("cpu", copy=True))
        return logits

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def KERNEL_IN_USE() -> bool:  # noqa: N802 - reads like the constant it is within one test
    """Whether engines started now attend decode steps with the CPU kernel."""
    return cpu_attention.load() is not None and os.environ.get("EMBER_CPU_KERNELS", "1") != "0"


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(4, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


def _run_engine(
    path: Path, prompts: list[list[int]], device: str, budget: int = 2048
) -> tuple[dict[str, list[int]], LogitRecorder]:
    engine = Engine(
        EngineConfig(
            model=str(path), dtype="fp32", max_model_len=256, device=device,
            max_num_batched_tokens=budget,
        )
    )  # fmt: skip
    kernel = KERNEL_IN_USE() and device == "cpu"
    assert engine._executor.use_kernel == kernel  # type: ignore[attr-defined]
    recorder = LogitRecorder(engine._executor)
    engine._executor = recorder
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                tokens[out.request_id] = out.token_ids
        engine.block_manager.check()
    assert engine.block_manager.num_free == engine.block_manager.num_blocks
    return tokens, recorder


def _compare(hf: Any, prompt: list[int], tokens: list[int], logits: list[torch.Tensor]) -> None:
    """The engine's logits at every generated position against transformers' teacher-forced
    logits for the same tokens, and each greedy token against transformers' argmax there."""
    assert len(tokens) == NEW_TOKENS and len(logits) == NEW_TOKENS
    with torch.no_grad():
        ref = hf(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1]  # [N, vocab]
    ours = torch.stack(logits)
    scale = ref.abs().max().item()
    err = (ours - ref).abs().max(dim=-1).values / scale  # [N]
    assert err.max().item() < REL_TOL, f"logits differ by {err.max().item():.2e} relative"
    for t, token in enumerate(tokens):
        best = int(ref[t].argmax())
        if token != best:
            gap = (ref[t, best] - ref[t, token]).item()
            assert gap < 2 * REL_TOL * scale, f"token {t}: {token} != {best}, logit gap {gap:.3g}"
            break  # a near-tie; what follows legitimately differs


def _hf_greedy(hf: Any, prompt: list[int]) -> list[int]:
    # No EOS: the engine runs with ignore_eos (min_new_tokens would mask EOS instead).
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
            eos_token_id=None, pad_token_id=0,
        )  # fmt: skip
    return list(out[0, len(prompt) :].tolist())


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_tokens_and_logits_match_transformers(
    case: str, model_factory: Callable[..., Path]
) -> None:
    _check_case(case, model_factory)


@pytest.mark.parametrize("case", ["llama", "mistral-sliding-window"])
def test_torch_attention_fallback_matches_transformers(
    case: str, model_factory: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the CPU kernel cannot be built (or on CUDA), decode attention runs on torch ops."""
    monkeypatch.setenv("EMBER_CPU_KERNELS", "0")
    _check_case(case, model_factory)


@pytest.mark.parametrize("case", ["llama", "mistral-sliding-window", "opt"])
def test_chunked_prefill_matches_transformers(
    case: str, model_factory: Callable[..., Path]
) -> None:
    """A token budget of 13 per step: prompts of up to 40 tokens are prefilled in chunks of
    whatever the decodes leave, each later chunk attending to the cached ones (past a sliding
    window of 24 too); logits and tokens as without chunks."""
    _check_case(case, model_factory, budget=13)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_engine_matches_transformers(case: str, model_factory: Callable[..., Path]) -> None:
    """The same checks with the engine on the GPU (fp32; transformers on CPU is the reference)."""
    _check_case(case, model_factory, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", ["llama", "mistral-sliding-window"])
def test_cuda_chunked_prefill_matches_transformers(
    case: str, model_factory: Callable[..., Path]
) -> None:
    _check_case(case, model_factory, device="cuda", budget=13)


def _check_case(
    case: str, model_factory: Callable[..., Path], device: str = "cpu", budget: int = 2048
) -> None:
    arch, overrides = CASES[case]
    path = model_factory(arch, **overrides)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    prompts = _prompts(hf.config.vocab_size)
    batch_tokens, batch_rec = _run_engine(path, prompts, device, budget)
    single_tokens, single_rec = _run_engine(path, prompts[4:5], device, budget)
    for i, prompt in enumerate(prompts):
        _compare(hf, prompt, batch_tokens[str(i)], batch_rec.rows[str(i)])
    _compare(hf, prompts[4], single_tokens["0"], single_rec.rows["0"])
    assert single_tokens["0"] == batch_tokens["4"]
    assert single_tokens["0"] == _hf_greedy(hf, prompts[4])
