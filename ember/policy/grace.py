"""Grace-period arrangement (SpotServe §2d): how long running requests keep decoding after a
preemption notice, and how each one resumes on the new configuration.

Step budget: slot = deadline - now - migration estimate is the compute time left before state
must move. SpotServe runs floor(slot / (safety * t2)) - 1 more decode steps (t2 the batch's
decode-step time, safety 1.1, one step held back) and starts no new batch unless
slot > safety * (t1 + t2). ember's variant (`shrinking_batch=True`) re-prices each step with
the step time of the batch that is still running, since finished requests leave the batch.
Survivors: when the new configuration has fewer replicas than there are old replicas with
running requests, the old replicas with the most progress keep their KV cache (SpotServe: the
largest decode step reached; ember: the most prompt + generated tokens, the recompute saved).
Requests on the other replicas restart from scratch (SpotServe) or keep their generated tokens
and re-prefill them (ember, `ResumeMode.RECOMPUTE`).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from ember.errors import ConfigError
from ember.policy.optimizer import ParallelConfig, estimate
from ember.policy.profile import LatencyProfile

_EPS = 1e-9


class ResumeMode(str, enum.Enum):
    KEEP_KV = "keep_kv"  # KV cache moves with the replica; decoding resumes at the same step
    RECOMPUTE = "recompute"  # generated tokens kept; prompt + generated re-prefilled
    RESTART = "restart"  # progress lost; the request starts again from its prompt


@dataclass(frozen=True, slots=True)
class RunningRequest:
    request_id: str
    replica: int  # old replica serving it
    prompt_tokens: int
    generated_tokens: int
    max_new_tokens: int

    def __post_init__(self) -> None:
        if min(self.prompt_tokens, self.generated_tokens, self.max_new_tokens) < 0:
            raise ConfigError(f"request {self.request_id}: token counts must be >= 0")

    @property
    def remaining(self) -> int:
        return max(0, self.max_new_tokens - self.generated_tokens)


@dataclass(frozen=True, slots=True)
class GraceBudget:
    """What the running batch may still do before its state must move."""

    slot_s: float  # compute time left (may be negative: migration is already late)
    steps: int  # decode steps the batch may still take
    accept_new_batch: bool
    steps_by_request: Mapping[str, int]  # min(steps, the request's remaining tokens)
    finishing: tuple[str, ...]  # requests that complete within the budget


def step_budget(
    slot_s: float, decode_step_s: float, *, safety: float = 1.1, held_back: int = 1
) -> int:
    """Decode steps that fit in `slot_s`: floor(slot / (safety * t2)) - held_back, >= 0."""
    if not (decode_step_s > 0 and safety > 0):
        raise ConfigError(f"decode_step_s and safety must be > 0, got {decode_step_s}, {safety}")
    if slot_s <= 0:
        return 0
    return max(0, math.floor(slot_s / (safety * decode_step_s) + _EPS) - held_back)


def arrange_grace(
    requests: Sequence[RunningRequest],
    *,
    deadline_s: float,
    now_s: float,
    migration_s: float,
    prefill_s: float,
    decode_step_s: float | Mapping[int, float],
    safety: float = 1.1,
    held_back: int = 1,
    shrinking_batch: bool = False,
) -> GraceBudget:
    """The step budget of the running batch under a notice ending at `deadline_s`.

    `decode_step_s` is the batch's decode-step time, or a map batch size -> step time (the
    largest size at or below the running batch is used; with `shrinking_batch`, re-read as
    requests finish).
    """
    if migration_s < 0 or prefill_s < 0:
        raise ConfigError(f"migration_s and prefill_s must be >= 0, got {migration_s}, {prefill_s}")
    slot = deadline_s - now_s - migration_s
    active = sorted((r for r in requests if r.remaining > 0), key=lambda r: r.remaining)

    def t2(batch: int) -> float:
        if not isinstance(decode_step_s, Mapping):
            return float(decode_step_s)
        fits = [b for b in decode_step_s if b <= max(batch, 1)]
        return float(decode_step_s[max(fits)] if fits else decode_step_s[min(decode_step_s)])

    batch = max(1, len(active))
    if not shrinking_batch:
        steps = step_budget(slot, t2(batch), safety=safety, held_back=held_back)
    else:
        steps = _shrinking_steps(slot, [r.remaining for r in active], t2, safety, held_back)
    accept = slot > safety * (prefill_s + t2(batch)) + _EPS
    by_req = {r.request_id: min(steps, r.remaining) for r in requests}
    finishing = tuple(sorted(r.request_id for r in requests if r.remaining <= steps))
    return GraceBudget(slot, steps, accept, by_req, finishing)


def _shrinking_steps(
    slot: float, remaining: list[int], t2: Callable[[int], float], safety: float, held_back: int
) -> int:
    """Steps that fit when each step costs the time of the batch still running."""
    if slot <= 0:
        return 0
    used, steps, i = 0.0, 0, 0
    horizon = max(remaining, default=0)
    while steps < horizon:
        while i < len(remaining) and remaining[i] <= steps:
            i += 1
        cost = safety * t2(max(1, len(remaining) - i))
        if used + cost > slot + _EPS:
            break
        used += cost
        steps += 1
    if steps >= horizon:
        return steps  # everything finishes: holding a step back would only delay it
    return max(0, steps - held_back)


@dataclass(frozen=True, slots=True)
class Survival:
    """Which old replicas' requests keep their KV cache, and how every request resumes."""

    kv_stay: Mapping[int, int]  # new replica -> old replica whose requests it takes over
    resume: Mapping[str, ResumeMode]


def choose_survivors(
    requests: Sequence[RunningRequest],
    new_replicas: int,
    *,
    by_tokens: bool = True,
    dropped_mode: ResumeMode = ResumeMode.RECOMPUTE,
) -> Survival:
    """Keep the KV of the old replicas with the most progress, up to `new_replicas` of them.

    Progress is the summed prompt + generated tokens of a replica's requests (`by_tokens`,
    ember) or its largest generated count (SpotServe); ties go to the lower replica id. New
    replica i inherits the i-th kept replica, most progress first.
    """
    if new_replicas < 0:
        raise ConfigError(f"new_replicas must be >= 0, got {new_replicas}")
    progress: dict[int, int] = {}
    for r in requests:
        before = progress.get(r.replica, 0)
        if by_tokens:  # tokens a re-prefill would have to recompute
            progress[r.replica] = before + r.prompt_tokens + r.generated_tokens
        else:  # SpotServe: the batch's decode step
            progress[r.replica] = max(before, r.generated_tokens)
    ranked = sorted(progress, key=lambda rep: (-progress[rep], rep))[:new_replicas]
    kv_stay = {new: old for new, old in enumerate(ranked)}
    kept = set(ranked)
    resume = {
        r.request_id: ResumeMode.KEEP_KV if r.replica in kept else dropped_mode for r in requests
    }
    return Survival(kv_stay, resume)


def prefer_recompute(
    tokens: int,
    kv_bytes: int,
    *,
    transfer_Bps: float,
    prefill_tokens_per_s: float,  # noqa: N803
    overhead_s: float = 0.0,
) -> bool:
    """ember: resume by re-prefilling `tokens` when that is faster than moving `kv_bytes`
    (plus `overhead_s`, a transfer's fixed cost)."""
    if transfer_Bps <= 0 or prefill_tokens_per_s <= 0:
        raise ConfigError("transfer_Bps and prefill_tokens_per_s must be > 0")
    return tokens / prefill_tokens_per_s < overhead_s + kv_bytes / transfer_Bps


def grace_for_config(
    profile: LatencyProfile,
    config: ParallelConfig,
    requests: Sequence[RunningRequest],
    *,
    now_s: float,
    deadline_s: float,
    migration_s: float,
    output_tokens: int,
    published: bool,
) -> GraceBudget:
    """`arrange_grace` with the step times the optimizer's cost model gives `config`: SpotServe's
    budget (`published`: the full batch's step) or ember's shrinking-batch one (a step time per
    batch size that the profile has)."""
    _, t1, t2 = estimate(profile, config, output_tokens)
    steps: dict[int, float] = {}
    b = 1
    while b <= config.batch:
        m2 = min(config.micro_decode, b)
        if profile.has(config.tp, b // m2):
            cfg_b = ParallelConfig(config.dp, config.tp, config.pp, b, 1, m2)
            steps[b] = estimate(profile, cfg_b, output_tokens)[2]
        b *= 2
    return arrange_grace(
        requests,
        deadline_s=deadline_s,
        now_s=now_s,
        migration_s=migration_s,
        prefill_s=t1,
        decode_step_s=t2 if published or not steps else steps,
        held_back=1,
        shrinking_batch=not published,
    )
