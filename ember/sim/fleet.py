"""The simulated fleet's mutable state: requests, replicas and their batches, batch timing.

Serving follows SpotServe's engine: a replica (D index of a (P, M) pipeline) runs one batch of
up to B requests at a time: a prefill of every request that needs one, then decode steps until
the longest request is done (static batching). Times come from the policy's cost model
(`ember.policy.estimate`), prefill scaled linearly by the longest context over the profile's
512-token prompts. A request's progress at any instant is computed from the batch's start time,
so no per-token event is ever scheduled: a batch costs one event.

Invariants: a request is in at most one batch; `Requests.gen[i] <= output[i]`; a replica's
`batch` is empty exactly when it is idle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ember.policy import LatencyProfile, ParallelConfig, estimate


class Requests:
    """Per-request arrays (struct of lists: one million requests stay cheap)."""

    __slots__ = (
        "arrival",
        "prompt",
        "output",
        "model",
        "gen",
        "first_token",
        "finish",
        "restarts",
        "recomputed",
    )

    def __init__(
        self,
        arrival: tuple[float, ...],
        prompt: tuple[int, ...],
        output: tuple[int, ...],
        model: tuple[int, ...],
    ) -> None:
        n = len(arrival)
        self.arrival = arrival
        self.prompt = prompt
        self.output = output
        self.model = model
        self.gen = [0] * n  # tokens generated and committed (survive a recompute resume)
        self.first_token = [math.nan] * n
        self.finish = [math.nan] * n
        self.restarts = [0] * n
        self.recomputed = [0] * n  # tokens re-prefilled after an interruption


@dataclass(frozen=True, slots=True)
class BatchTimes:
    """Seconds for a batch of b requests under one configuration (fix factor applied)."""

    prefill_s: tuple[float, ...]  # [b]: prefill of b prompts of the profile's prompt length
    step_s: tuple[float, ...]  # [b]: one decode step
    embed_s: tuple[float, ...]  # [b]: embedding + LM head, twice per request
    prompt_tokens: int

    @classmethod
    def of(cls, profile: LatencyProfile, config: ParallelConfig) -> BatchTimes:
        pre, step, emb = [0.0], [0.0], [0.0]
        for b in range(1, config.batch + 1):
            bp = 1 << (b - 1).bit_length()  # profiled sizes are powers of two
            cfg = ParallelConfig(
                config.dp,
                config.tp,
                config.pp,
                bp,
                min(config.micro_prefill, bp),
                min(config.micro_decode, bp),
            )
            lat, t1, t2 = estimate(profile, cfg, output_tokens=0)
            pre.append(t1)
            step.append(t2)
            emb.append(max(0.0, lat - t1))
        return cls(tuple(pre), tuple(step), tuple(emb), profile.prompt_tokens)


class Replica:
    """One serving pipeline: its GPUs, and the batch it runs (if any)."""

    __slots__ = (
        "index",
        "gpus",
        "nodes",
        "ready_s",
        "accepting",
        "batch",
        "kv",
        "_times",
        "t0",
        "t1",
        "t2",
        "emb",
        "end_s",
        "epoch",
        "held",
        "stop_s",
        "times_batch",
    )

    def __init__(self, index: int, gpus: list[str], nodes: set[str], times: BatchTimes) -> None:
        self.index = index
        self.gpus = gpus
        self.nodes = nodes
        self._times = times
        self.ready_s = 0.0
        self.accepting = True
        self.batch: list[int] = []
        self.kv: list[int] = []  # requests of `held` waiting on this replica with KV in place
        self.held = False  # a resumed batch waits here for the replica to be ready
        self.t0 = self.t1 = self.t2 = self.emb = self.end_s = 0.0
        self.epoch = 0  # bumps on every batch start/stop: stale events are ignored
        self.stop_s = math.inf  # a grace budget may stop the running batch before its end
        self.times_batch = len(times.step_s) - 1  # B: the most requests in one batch

    @property
    def times(self) -> BatchTimes:
        return self._times

    @times.setter
    def times(self, value: BatchTimes) -> None:
        self._times = value
        self.times_batch = len(value.step_s) - 1

    @property
    def busy(self) -> bool:
        return bool(self.batch)

    def start(self, now: float, batch: list[int], reqs: Requests, with_kv: set[int]) -> float:
        """Start `batch` at `now`; returns when the batch ends. Records first tokens lazily."""
        b = len(batch)
        tm = self.times
        ctx = 0
        for i in batch:
            if i not in with_kv:
                c = reqs.prompt[i] + reqs.gen[i]
                if reqs.gen[i]:
                    reqs.recomputed[i] += c
                ctx = max(ctx, c)
        self.t1 = tm.prefill_s[b] * ctx / tm.prompt_tokens
        self.t2 = tm.step_s[b]
        self.emb = tm.embed_s[b]
        longest = max(reqs.output[i] - reqs.gen[i] for i in batch)
        self.t0 = now
        self.batch = batch
        self.epoch += 1
        self.end_s = now + self.t1 + longest * self.t2 + self.emb
        return self.end_s

    def finish_time(self, i: int, reqs: Requests) -> float:
        return self.t0 + self.t1 + (reqs.output[i] - reqs.gen[i]) * self.t2 + self.emb

    def steps_done(self, now: float) -> int:
        """Decode steps the running batch has completed by `now`."""
        if now < self.t0 + self.t1 or self.t2 <= 0:
            return 0
        return int((now - self.t0 - self.t1) / self.t2 + 1e-9)

    def settle(self, now: float, reqs: Requests, done: list[int]) -> list[int]:
        """Stop the batch at `now`: finished requests go to `done` (their finish time set),
        the others get their committed progress; returns the unfinished ones."""
        steps = self.steps_done(now)
        left: list[int] = []
        first = self.t0 + self.t1 + self.emb / 2
        for i in self.batch:
            if reqs.gen[i] == 0 and now >= first and math.isnan(reqs.first_token[i]):
                reqs.first_token[i] = first
            remaining = reqs.output[i] - reqs.gen[i]
            if steps >= remaining:
                reqs.finish[i] = self.finish_time(i, reqs)
                reqs.gen[i] = reqs.output[i]
                done.append(i)
            else:
                reqs.gen[i] += min(steps, remaining)
                left.append(i)
        self.batch = []
        self.epoch += 1
        return left
