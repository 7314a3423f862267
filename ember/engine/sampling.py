"""Sampling parameters and the sampler that turns a step's logits into one token per request.

Every request owns a CPU `torch.Generator` (seeded from `SamplingParams.seed`, or from the
engine's seed when the request names none). A sampled token is the Gumbel-max race: the argmax
of `logits / temperature + Gumbel noise` over the tokens that top-k, top-p and min-p keep, which
draws from exactly the filtered softmax. The noise takes `vocab` uniform draws (float32) from
the request's own generator per token, whatever else is in the batch, so the same seed gives the
same tokens in any batch, and the generator state (exported with the request, or replayed by
`advance`) resumes the stream exactly. Greedy requests (temperature 0) take the argmax and draw
nothing.

Why a race and not inverse-CDF sampling with one uniform: the same logits computed another way
(a prefill instead of decode steps, after a request moved or was preempted) differ in their
last bits. Inverse-CDF sampling flips a token whenever the draw lands that close to any of the
vocabulary's CDF boundaries (measured: about one token in a thousand on a 1,024-token
vocabulary); the race flips one only when its two best scores are that close. It needs no sort
either (only top-k and top-p do), which makes it several times faster on a large vocabulary.
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
    filtering and the Gumbel-max race with `vocab` draws from the row's generator."""
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


def advance(generator: torch.Generator, tokens: int, vocab: int) -> None:
    """Move a sampled request's generator past `tokens` tokens, as sampling them would have
    (`vocab` float32 draws each: the CPU generator's stream does not depend on how the draws
    are split into calls)."""
    left = tokens * vocab
    chunk = max(vocab, (1 << 22) // vocab * vocab)
    while left > 0:
        n = min(left, chunk)
        torch.rand(n, generator=generator)
        left -= n


def _sample_rows(
    logits: torch.Tensor,  # [rows, vocab] float32
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator],
) -> torch.Tensor:
    device = logits.device
    rows, vocab = logits.shape
    temps = torch.tensor([p.temperature for p in params], device=device)
    logits = logits / temps[:, None]
    keep = _kept(logits, params)  # None: every token of every row
    # The noise of each row from its own generator, on the CPU (the same draws on any device).
    u = torch.stack([torch.rand(vocab, generator=g) for g in generators]).to(device)
    scores = logits - torch.log(-torch.log(u))  # + Gumbel(0, 1); u == 0 gives -inf: never wins
    if keep is not None:
        scores = scores.masked_fill_(~keep, float("-inf"))
    return scores.argmax(dim=-1)


def _kept(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor | None:
    """[rows, vocab] mask of the tokens top-k, top-p and min-p keep (the most likely always
    is), or None when no row filters."""
    device = logits.device
    vocab = logits.shape[-1]
    ranked = any(0 < p.top_k < vocab or p.top_p < 1 for p in params)
    if not ranked and not any(p.min_p > 0 for p in params):
        return None
    probs = torch.softmax(logits, dim=-1)
    keep = torch.ones_like(logits, dtype=torch.bool)
    if ranked:  # top-k and top-p are masks over the descending order
        sorted_probs, sorted_ids = torch.sort(probs, dim=-1, descending=True)
        ranks = torch.arange(vocab, device=device)[None, :]
        top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=device)
        keep_sorted = ranks < top_k[:, None]
        top_p = torch.tensor([p.top_p for p in params], device=device)
        # Keep a token if the mass strictly before it is below top_p (the first is always kept).
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        keep_sorted &= mass_before < top_p[:, None]
        keep_sorted[:, 0] = True
        keep = torch.zeros_like(keep).scatter_(1, sorted_ids, keep_sorted)
    min_p = torch.tensor([p.min_p for p in params], device=device)
    top = probs.max(dim=-1, keepdim=True).values
    keep &= (probs >= min_p[:, None] * top) | (probs == top)
    return keep
