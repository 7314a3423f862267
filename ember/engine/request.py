"""A request's life inside the engine, and the two plain-data views of it that leave the engine.

- `Request`: the one mutable object per request (nano-vllm's `Sequence`), owned by the
  scheduler; tokens, KV block table, status, sampling generator, detokenizer state.
- `RequestOutput`: what `Engine.step()` returns per request per step (incremental and
  cumulative tokens and text).
- `RequestState`: a frozen snapshot for migration and recovery (`Engine.export_request`):
  prompt and generated ids, sampling params, the generator state, optionally the KV cache.

Invariant: `num_cached_tokens <= num_tokens - 1` once a request has a sampled token pending, and
`len(block_table) * block_size >= num_cached_tokens`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from ember.engine.sampling import SamplingParams
from ember.engine.tokenizer import IncrementalDetokenizer


class RequestStatus(str, enum.Enum):
    WAITING = "waiting"  # needs a prefill (new, preempted, or imported without KV)
    RUNNING = "running"  # has its KV in the cache; decodes one token per step
    FINISHED = "finished"


@dataclass(slots=True)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    detokenizer: IncrementalDetokenizer
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[dict[int, float]] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0  # tokens whose K/V are in the cache
    finish_reason: str | None = None
    num_preemptions: int = 0
    # Tokens appended since the last output was emitted (the streaming increment).
    new_token_ids: list[int] = field(default_factory=list)
    emitted_text_len: int = 0  # characters of text already returned in outputs
    # A migration target's copy (`Engine.resume_request(hold=True)`): its tokens are prefilled
    # as they arrive (`extend_request`) but nothing is sampled until it is released.
    held: bool = False
    acked_tokens: int = -1  # a held request's length when `step()` last acknowledged it

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_ids_from(self, start: int, end: int | None = None) -> list[int]:
        """Prompt + output tokens at positions [start, end) (end: all of them): a copy of that
        range only, not of the whole context (the detokenizer needs its last few tokens, a
        prefill chunk its next `n`)."""
        prompt, out = self.prompt_token_ids, self.output_token_ids
        n = len(prompt)
        if end is None:
            end = n + len(out)
        if start >= n:
            return out[start - n : end - n]
        if end <= n:
            return prompt[start:end]
        return prompt[start:] + out[: end - n]

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """One request's progress after a step. `new_*` is the increment since the previous output
    for the request; `token_ids`/`text` are cumulative. `logprobs` (cumulative) and
    `new_logprobs` are None unless the request asked for them.

    An output costs the same however long its request: `prompt_token_ids` is the request's own
    list (read it, do not change it), and `token_ids` / `logprobs` are read on access from the
    request's append-only lists, up to the lengths they had at this step. Copying them for every
    request at every step cost O(context) each (three lists of a 2,000-token context, 64
    requests: ~0.6 ms a step).
    """

    request_id: str
    prompt_token_ids: list[int]
    text: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" once finished
    new_logprobs: list[dict[int, float]] | None = None
    _tokens: list[int] = field(default_factory=list, repr=False)
    _num_tokens: int = 0
    _logprobs: list[dict[int, float]] | None = field(default=None, repr=False)
    _num_logprobs: int = 0

    @property
    def token_ids(self) -> list[int]:
        return self._tokens[: self._num_tokens]

    @property
    def logprobs(self) -> list[dict[int, float]] | None:
        return None if self._logprobs is None else self._logprobs[: self._num_logprobs]


@dataclass(frozen=True, slots=True)
class RequestState:
    """Everything needed to continue a request elsewhere with the same tokens.

    `kv` (optional) holds the K and V of the first `kv.shape[2]` tokens of
    `prompt_token_ids + output_token_ids` as one CPU tensor
    `[layers, 2, tokens, kv_heads, head_dim]` (full heads, in the model's dtype); without it,
    the importing engine recomputes them in a prefill. `rng_state` is the request's
    `torch.Generator` state.
    """

    request_id: str
    prompt_token_ids: tuple[int, ...]
    output_token_ids: tuple[int, ...]
    params: SamplingParams
    rng_state: bytes
    text: str = ""  # decoded text so far (before any stop-string hold-back)
    text_emitted: int = 0  # characters of `text` already streamed to the client
    output_logprobs: tuple[dict[int, float], ...] = ()
    kv: torch.Tensor | None = None
