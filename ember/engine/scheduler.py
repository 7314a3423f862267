"""Continuous batching: which requests run in the next step, as a plain-data `SchedulePlan`.

Policy (nano-vllm's): a step is either a prefill of waiting requests (FIFO, while sequence
slots, the prefill token budget and free KV blocks last) or, when nothing can be prefilled, a
decode step of every running request. When a decode step lacks a block, the most recently
admitted running request is preempted by recompute: its blocks are freed and it goes back to
the front of the queue, to be prefilled again later over its prompt and generated tokens.

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
    seqs: tuple[ScheduledSeq, ...]
    is_prefill: bool
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
        scheduled: list[Request] = []
        num_batched = 0
        while self.waiting and len(self.running) + len(scheduled) < self.max_num_seqs:
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
        if scheduled:
            self.running.extend(scheduled)
            return SchedulePlan(tuple(_seq(r, r.num_cached_tokens) for r in scheduled), True)

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
        seqs = tuple(_seq(r, r.num_tokens - 1) for r in scheduled)
        return SchedulePlan(seqs, False, tuple(preempted))

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
