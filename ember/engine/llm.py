"""`LLM`: the offline batch API (`from ember import LLM, SamplingParams`), a loop over `Engine`.

`generate` adds every prompt as a request, steps the engine until all finish, and returns the
final `RequestOutput` of each, in prompt order.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from ember.engine.config import EngineConfig
from ember.engine.engine import Engine
from ember.engine.request import RequestOutput
from ember.engine.sampling import SamplingParams
from ember.errors import RequestError

Prompt = str | Sequence[int]


class LLM:
    def __init__(
        self,
        model: str,
        dtype: str = "auto",
        tensor_parallel_size: int = 1,
        max_model_len: int | None = None,
        max_num_seqs: int = 64,
        kv_cache_bytes: int | None = None,
        seed: int = 0,
        device: str = "cpu",
        **engine_options: Any,
    ) -> None:
        """`engine_options`: any other `EngineConfig` field (e.g. `pack_weights=False`)."""
        self.engine = Engine(
            EngineConfig(
                model=str(model),
                dtype=dtype,
                tensor_parallel_size=tensor_parallel_size,
                max_model_len=max_model_len,
                max_num_seqs=max_num_seqs,
                kv_cache_bytes=kv_cache_bytes,
                seed=seed,
                device=device,
                **engine_options,
            )
        )
        self._ids = itertools.count()

    @property
    def tokenizer(self):  # type: ignore[no-untyped-def]
        return self.engine.tokenizer

    def get_tokenizer(self):  # type: ignore[no-untyped-def]
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        batch = _as_batch(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = (
            [sampling_params] * len(batch)
            if isinstance(sampling_params, SamplingParams)
            else list(sampling_params)
        )
        if len(params) != len(batch):
            raise RequestError(
                f"sampling_params has {len(params)} entries for {len(batch)} prompts"
            )
        ids = [f"gen-{next(self._ids)}" for _ in batch]
        added: list[str] = []
        try:
            for rid, prompt, p in zip(ids, batch, params, strict=True):
                self.engine.add_request(rid, prompt, p)
                added.append(rid)
        except BaseException:
            for rid in added:
                self.engine.abort(rid)
            self.engine.step()  # drain the abort outputs
            raise
        final: dict[str, RequestOutput] = {}
        wanted = set(ids)
        while len(final) < len(ids):
            for out in self.engine.step():
                if out.finished and out.request_id in wanted:
                    final[out.request_id] = out
        return [final[rid] for rid in ids]

    def close(self) -> None:
        self.engine.close()


def _as_batch(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, Sequence) and prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # type: ignore[list-item]
    return list(prompts)  # type: ignore[arg-type]
