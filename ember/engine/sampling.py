"""Sampling parameters and the sampler that turns a step's logits into one token per request.

Every request owns a CPU `torch.Generator` (seeded from `SamplingParams.seed`, or from the
engine's seed when the request names none). Each sampled token consumes exactly one uniform draw
from the request's own generator, so the same seed gives the same tokens whatever else is in the
batch, and the generator state (exported with the request) resumes the stream exactly.
Greedy requests (temperature 0) take the argmax and draw nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ember.errors import RequestError


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick tokens for one request (vLLM's names and meanings).

    `top_k` of -1 or 0 means off; `stop` holds strings that end generation (not included in the
    text); `logprobs=N` returns, per generated token, the log-probabilities of the N most likely
    tokens plus the chosen one (of the model's raw distribution).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default=())
    stop_token_ids: tuple[int, ...] = field(default=())
    ignore_eos: bool = False
    logprobs: int | None = None

    def __post_init__(self) -> None:
        # Accept a single string or any sequence for the tuple fields, as vLLM does.
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        _check_int("max_tokens", self.max_tokens, minimum=1)
        if not isinstance(self.temperature, (int, float)) or not self.temperature >= 0:
            raise RequestError(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        _check_int("top_k", self.top_k, minimum=-1)
        if not isinstance(self.min_p, (int, float)) or not 0 <= self.min_p <= 1:
            raise RequestError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=0)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, minimum=0)
        if any(not isinstance(s, str) or not s for s in stop):
            raise RequestError(f"stop must hold non-empty strings, got {stop!r}")
        for t in self.stop_token_ids:
            _check_int("stop_token_ids", t, minimum=0)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _check_int(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise RequestError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True, slots=True)
class SampleResult:
    """One step's choices: token ids in row order, and per row the logprobs dict (or None)."""

    token_ids: list[int]
    logprobs: list[dict[int, float] | None]


def sample(
    logits: torch.Tensor,  # [rows, vocab], any float dtype, any device
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator],
) -> SampleResult:
    """Pick one token per row: argmax for greedy rows, else temperature, top-k, top-p and min-p
    filtering followed by inverse-CDF sampling with one uniform draw from the row's generator."""
    logits = logits.float()
    rows = logits.shape[0]
    chosen = torch.argmax(logits, dim=-1)  # [rows]
    sampled_rows = [i for i in range(rows) if not params[i].greedy]
    if sampled_rows:
        idx = torch.tensor(sampled_rows, device=logits.device)
        chosen[idx] = _sample_rows(
            logits[idx], [params[i] for i in sampled_rows], [generators[i] for i in sampled_rows]
        )
    token_ids: list[int] = chosen.tolist()
    logprobs: list[dict[int, float] | None] = [None] * rows
    want = [i for i in range(rows) if params[i].logprobs is not None]
    if want:
        lp = torch.log_softmax(logits[want], dim=-1)  # [len(want), vocab]
        n = max(params[i].logprobs or 0 for i in want)
        top_vals, top_ids = lp.topk(n, dim=-1) if n else (lp[:, :0], lp[:, :0].long())
        for j, i in enumerate(want):
            k = params[i].logprobs or 0
            entry = dict(zip(top_ids[j, :k].tolist(), top_vals[j, :k].tolist(), strict=True))
            entry[token_ids[i]] = float(lp[j, token_ids[i]])
            logprobs[i] = entry
    return SampleResult(token_ids, logprobs)


def _sample_rows(
    logits: torch.Tensor,  # [rows, vocab] float32
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator],
) -> torch.Tensor:
    device = logits.device
    temps = torch.tensor([p.temperature for p in params], device=device)
    logits = logits / temps[:, None]
    # Sort once; top-k, top-p and min-p are all masks over the sorted order.
    sorted_logits, sorted_ids = torch.sort(logits, dim=-1, descending=True)  # [rows, vocab]
    probs = torch.softmax(sorted_logits, dim=-1)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=device)[None, :]
    top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=device)
    keep = ranks < top_k[:, None]
    top_p = torch.tensor([p.top_p for p in params], device=device)
    # Keep a token if the mass strictly before it is below top_p (the first is always kept).
    mass_before = torch.cumsum(probs, dim=-1) - probs
    keep &= mass_before < top_p[:, None]
    min_p = torch.tensor([p.min_p for p in params], device=device)
    keep &= probs >= min_p[:, None] * probs[:, :1]
    keep[:, 0] = True
    probs = torch.where(keep, probs, torch.zeros_like(probs))
    cdf = torch.cumsum(probs, dim=-1)  # [rows, vocab]
    # One uniform per row from the row's own generator: the draw count never depends on batch.
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])
    target = (u.to(device) * cdf[:, -1].double()).float()[:, None]
    pos = torch.searchsorted(cdf, target, right=True).clamp_(max=vocab - 1)  # [rows, 1]
    # Never land on a filtered (zero-probability) token through rounding.
    pos = torch.minimum(pos, keep.sum(dim=-1, keepdim=True) - 1)
    return sorted_ids.gather(1, pos).squeeze(1)
