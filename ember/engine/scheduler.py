"""Continuous batching: which requests run in the next step, as a plain-data `SchedulePlan`.

Policy: every step decodes one token of each running request and, in the same forward pass,
prefills prompt chunks while the step's token budget (`max_num_batched_tokens`, decodes counted
first) lasts: first the next chunk of requests whose prompt is partly prefilled, then waiting
requests admitted FIFO (while sequence slots and free KV blocks last). A new request so costs its
running neighbours no step of their own, and a long prompt is prefilled over several steps
(chunked prefill) instead of stalling every decode for one long step. When a request lacks a
block for its next tokens, the most recently admitted running request is preempted by recompute:
its blocks are freed and it goes back to the front of the queue, to be prefilled again later
over its prompt and generated tokens.

A request is mid-prefill while more than one of its tokens has no K/V in the cache
(`num_tokens - num_cached_tokens > 1`); a chunk that ends before the last token samples
nothing. A chunk that stops one token short leaves the request in the decode state: its next
step runs the prompt's last token as a decode and samples the first output token.

A held request (the target's copy during a live migration, `Request.held`) is prefilled up to
its last token, as its tokens arrive, and then skipped: it neither decodes nor counts against
the decode budget until it is released.

`postprocess` applies a step's results: records the prefilled chunks, appends the sampled tokens,
checks the token-level stop conditions (EOS, stop token ids, max_tokens, max_model_len) and
frees finished requests' blocks. Stop strings are text-level and decided by the engine's output
processing (`finish`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from ember.engine.block_manager import BlockManager
from ember.engine.request import Request, RequestStatus


@dataclass(frozen=True, slots=True)
class ScheduledSeq:
    """One request's share of a step: run `token_ids` at positions `start_position...`, write
    their K/V into the slots given by `block_table`, and (if `sample`) sample one token after
    the last. Positions before `start_position` are already in the cache."""

    request_id: str
    token_ids: tuple[int, ...]
    start_position: int
    block_table: tuple[int, ...]
    sample: bool = True  # False: a prompt chunk that ends before the request's last token


@dataclass(frozen=True, slots=True)
class SchedulePlan:
    """The step's requests: the first `num_prefills` are prefill chunks (a new request's from
    position 0; a later chunk attends to the request's cached tokens too; after a preemption the
    prompt and output are prefilled again), the others decode one token each."""

    seqs: tuple[ScheduledSeq, ...]
    num_prefills: int
    preempted: tuple[str, ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        eos_token_ids: Sequence[int],
    ) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Request] = deque()
        self.running: deque[Request] = deque()
        self._unsampled: list[tuple[Request, int]] = []

    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def add_running(self, request: Request) -> bool:
        """Admit a request whose KV is already in its blocks; False when no sequence slot."""
        if len(self.running) >= self.max_num_seqs:
            return False
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        return True

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def schedule(self) -> SchedulePlan:
        chunks, decodes, preempted, budget = self._grow_running()
        # Blocks ran short: admitting now would take back what the preemption freed.
        if not preempted:
            chunks += self._admit(budget)
        # Chunks that end before their request's last token: `postprocess` records them.
        self._unsampled = [(r, n) for r, n in chunks if r.num_cached_tokens + n < r.num_tokens]
        seqs = (
            *(_chunk(r, n) for r, n in chunks),
            *(_decode(r) for r in decodes),
        )
        return SchedulePlan(seqs, len(chunks), tuple(preempted))

    def _grow_running(self) -> tuple[list[tuple[Request, int]], list[Request], list[str], int]:
        """Slots for the next token of every decoding request and the next chunk of every
        request mid-prefill (in admission order, while the token budget left after the decodes
        lasts), preempting the most recently admitted requests while blocks run short. Returns
        (chunks as (request, tokens), decodes, preempted ids, token budget left)."""
        chunks: list[tuple[Request, int]] = []
        decodes: list[Request] = []
        kept: list[Request] = []  # running requests in order, scheduled this step or not
        preempted: list[str] = []
        budget = self.max_num_batched_tokens - sum(
            1 for r in self.running if r.num_tokens - r.num_cached_tokens == 1 and not r.held
        )
        while self.running:
            request = self.running.popleft()
            remaining = request.num_tokens - request.num_cached_tokens
            if request.held:  # prefill up to its last token, never decode (`Request.held`)
                remaining -= 1
                n = min(remaining, budget)
            else:
                n = 1 if remaining == 1 else min(remaining, budget)
            if n <= 0:  # mid-prefill and no budget left, or held: it waits for a later step
                kept.append(request)
                continue
            target = request.num_cached_tokens + n
            while not self.block_manager.can_grow(request, target):
                victim = self.running.pop() if self.running else request
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is request:
                    break
            else:
                self.block_manager.grow(request, target)
                kept.append(request)
                if remaining == 1 and not request.held:
                    decodes.append(request)
                else:
                    chunks.append((request, n))
                    budget -= n
        self.running.extend(kept)
        return chunks, decodes, preempted, max(budget, 0)

    def _admit(self, budget: int) -> list[tuple[Request, int]]:
        """Waiting requests that start this step, FIFO, each with its first chunk: the whole
        prompt while the token budget lasts, else the part that fits (the rest follows in
        later steps)."""
        scheduled: list[tuple[Request, int]] = []
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            request = self.waiting[0]
            n = min(request.num_tokens - request.num_cached_tokens - request.held, budget)
            if not self.block_manager.can_grow(request, request.num_cached_tokens + n):
                break
            self.block_manager.grow(request, request.num_cached_tokens + n)
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            if n > 0:  # (a held request of one token has nothing to prefill yet)
                budget -= n
                scheduled.append((request, n))
        return scheduled

    def _preempt(self, request: Request) -> None:
        self.block_manager.free(request)
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.waiting.appendleft(request)

    def postprocess(
        self,
        requests: Sequence[Request],
        token_ids: Sequence[int],
        logprobs: Sequence[dict[int, float] | None],
    ) -> None:
        """Record the last plan's chunks that sample nothing (their K/V are now cached), then
        append each sampling request's token (`requests`: those of the plan's seqs with
        `sample`, in order) and finish those that hit a token-level stop."""
        for request, n in self._unsampled:
            request.num_cached_tokens += n
        self._unsampled = []
        for request, token, lp in zip(requests, token_ids, logprobs, strict=True):
            request.num_cached_tokens = request.num_tokens
            request.output_token_ids.append(token)
            request.new_token_ids.append(token)
            if lp is not None:
                request.output_logprobs.append(lp)
            params = request.params
            if (not params.ignore_eos and token in self.eos_token_ids) or (
                token in params.stop_token_ids
            ):
                self.finish(request, "stop")
            elif (
                len(request.output_token_ids) >= params.max_tokens
                or request.num_tokens >= self.max_model_len
            ):
                self.finish(request, "length")

    def finish(self, request: Request, reason: str) -> None:
        """Mark `request` finished (or aborted) and give its blocks back."""
        if request.status is RequestStatus.FINISHED:
            return
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self.block_manager.free(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason


def _chunk(request: Request, n: int) -> ScheduledSeq:
    """The next `n` uncached tokens of `request` (a prefill chunk)."""
    start = request.num_cached_tokens
    end = start + n
    return ScheduledSeq(
        request_id=request.request_id,
        token_ids=tuple(request.token_ids_from(start, end)),
        start_position=start,
        block_table=tuple(request.block_table),
        sample=end == request.num_tokens,
    )


def _decode(request: Request) -> ScheduledSeq:
    """The request's last token (the one sampled last, or the prompt's last when a chunk
    stopped one short of it), run at its position to sample the next."""
    out = request.output_token_ids
    return ScheduledSeq(
        request_id=request.request_id,
        token_ids=(out[-1] if out else request.prompt_token_ids[-1],),
        start_position=request.num_tokens - 1,
        block_table=tuple(request.block_table),
    )
