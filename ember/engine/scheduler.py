"""Continuous batching: which requests run in the next step, as a plain-data `SchedulePlan`.

Policy: every step decodes one token of each running request and, in the same forward pass,
prefills the waiting requests it can admit (FIFO, while sequence slots, the token budget and
free KV blocks last). A new request so costs its running neighbours no step of their own: with
requests arriving one by one (a server's clients), prefill-only steps would stall every
decode once per arrival. When a decode lacks a block, the most recently admitted running
request is preempted by recompute: its blocks are freed and it goes back to the front of the
queue, to be prefilled again later over its prompt and generated tokens.

`postprocess` applies a step's sampled tokens: appends them, checks the token-level stop
conditions (EOS, stop token ids, max_tokens, max_model_len) and frees finished requests' blocks.
Stop strings are text-level and decided by the engine's output processing (`finish`).
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
    their K/V into the slots given by `block_table`, and sample one token after the last."""

    request_id: str
    token_ids: tuple[int, ...]
    start_position: int
    block_table: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class SchedulePlan:
    """The step's requests: the first `num_prefills` are prefilled from position 0 (their whole
    prompt, or prompt and output after a preemption), the others decode one token each."""

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
        decodes, preempted = self._grow_running()
        # Blocks ran short: admitting now would take back what the preemption freed.
        prefills = [] if preempted else self._admit(num_batched=len(decodes))
        seqs = (
            *(_seq(r, r.num_cached_tokens) for r in prefills),
            *(_seq(r, r.num_tokens - 1) for r in decodes),
        )
        return SchedulePlan(seqs, len(prefills), tuple(preempted))

    def _grow_running(self) -> tuple[list[Request], list[str]]:
        """A slot for the next token of every running request, preempting the most recently
        admitted ones while blocks run short."""
        scheduled: list[Request] = []
        preempted: list[str] = []
        while self.running and len(scheduled) < self.max_num_seqs:
            request = self.running.popleft()
            while not self.block_manager.can_grow(request, request.num_tokens):
                victim = self.running.pop() if self.running else request
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is request:
                    break
            else:
                self.block_manager.grow(request, request.num_tokens)
                scheduled.append(request)
        self.running.extendleft(reversed(scheduled))
        return scheduled, preempted

    def _admit(self, num_batched: int) -> list[Request]:
        """Waiting requests that start this step, FIFO. The first one comes in whatever its
        length (a prompt longer than the token budget still runs, in a step of its own tokens
        and the decodes); later ones while the budget lasts."""
        scheduled: list[Request] = []
        while self.waiting and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            num_new = request.num_tokens - request.num_cached_tokens
            if scheduled and num_batched + num_new > self.max_num_batched_tokens:
                break
            if not self.block_manager.can_grow(request, request.num_tokens):
                break
            self.block_manager.grow(request, request.num_tokens)
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            num_batched += num_new
            scheduled.append(request)
            self.running.append(request)
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
        """Append each request's sampled token; finish those that hit a token-level stop."""
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


def _seq(request: Request, start: int) -> ScheduledSeq:
    out = request.output_token_ids
    if start == request.num_tokens - 1:  # decode: just the last token, without a list copy
        tokens: tuple[int, ...] = (out[-1] if out else request.prompt_token_ids[-1],)
    else:
        tokens = tuple(request.all_token_ids[start:])
    return ScheduledSeq(
        request_id=request.request_id,
        token_ids=tokens,
        start_position=start,
        block_table=tuple(request.block_table),
    )
