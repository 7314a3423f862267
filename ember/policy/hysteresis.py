"""Reconfiguration hysteresis: keep the current parallel shape unless changing it pays.

SpotServe re-runs its optimizer on every fleet change and takes the lowest-latency shape. On a
large, busy trace that flips the pipeline depth back and forth, and every shape change stops
every replica: they drain their batches, weights move, engines restart. ember weighs that price
against the gain before it changes shape (what SpotServe lacks):

- the *held* option is the current shape (TP, PP, batch, micro-batches) with as many replicas as
  the usable GPUs fit; only replicas that lost a GPU are rebuilt, the rest keep serving;
- when its throughput is below `rate * (1 + rate_headroom)` and the optimizer's choice has more,
  the fleet needs that capacity: the choice stands;
- a held shape with headroom is not traded for a faster one without it (the next shrink would
  force a switch back);
- otherwise the change must pay for itself. A full switch pauses serving for about
  P = drain + transfer + restart (drain: the held shape's request latency, the longest a running
  batch takes to finish; transfer: when TP or PP change, every GPU receiving its new position's
  weights over the inter-host link, an upper bound; none when only the batching changes;
  restart: engine start). Requests arriving during the pause wait P / 2 more on average, rate * P^2 / 2 request-seconds in all; the new shape saves
  (held latency - new latency) per request, rate * H * saving over the time H it would serve
  before the next change. Change only if H * saving > P^2 / 2 (the rate cancels), and
  only if the pause delays at most `max_paused_fraction` of the requests served until the next
  change (P / H <= 1%): the mean rule alone lets a churning fleet switch every minute or two,
  each switch pushing a few percent of the requests into the tail, and the P99 is what SpotServe
  and ember are judged on;
- the saving is priced at the load the fleet has (`latency_at_load`), not at full batches as
  the optimizer ranks shapes: a replica serves about rate * latency / D requests at once
  (Little's law), so at a sixth of capacity a batch-4 and a batch-2 shape run the same batches
  of one and neither is faster (the optimizer's batch-2 preference saves nothing there).

H is not known in advance; the caller estimates it from the fleet's recent history
(`expected_interval_s`: the mean gap between its last changes, infinite until `min_gaps` gaps
have been seen: one gap says nothing about how often the fleet changes, and trusting it held
SpotServe's A_S fleet on a slower shape for the whole trace), so a
fleet that stays still long enough (about 100 pauses, half an hour for a 20B model) reshapes as
SpotServe does and a churning one holds its shape. Pure functions; no
clock is read here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ember.errors import ConfigError
from ember.policy.layout import ModelShape, Position, position_bytes
from ember.policy.migration_plan import LinkBandwidth
from ember.policy.optimizer import ConfigEstimate, ParallelConfig, estimate
from ember.policy.profile import LatencyProfile


@dataclass(frozen=True, slots=True)
class HysteresisConfig:
    """rate_headroom: the current shape is held only while its throughput is at least
        rate * (1 + rate_headroom).
    history_window: how many recent fleet-change gaps `expected_interval_s` averages.
    min_gaps: fewer gaps than this give no estimate (H infinite: the optimizer's choice stands).
    max_paused_fraction: a change is refused when the requests its pause delays are more than
        this fraction of those served before the next change (P / H): above 1 - q of them, the
        q-quantile latency rises by up to the pause (0.01: protect the P99).
    """

    rate_headroom: float = 0.25
    history_window: int = 8
    min_gaps: int = 2
    max_paused_fraction: float = 0.01

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rate_headroom) and self.rate_headroom >= 0):
            raise ConfigError(
                f"rate_headroom must be a finite value >= 0, got {self.rate_headroom}"
            )
        if not 0 <= self.max_paused_fraction <= 1:
            raise ConfigError(
                f"max_paused_fraction must be in [0, 1], got {self.max_paused_fraction}"
            )
        if self.history_window < 1:
            raise ConfigError(f"history_window must be >= 1, got {self.history_window}")
        if not 1 <= self.min_gaps <= self.history_window:
            raise ConfigError(
                f"min_gaps must be in [1, history_window={self.history_window}], "
                f"got {self.min_gaps}"
            )


def same_shape(a: ParallelConfig, b: ParallelConfig) -> bool:
    """Equal except for the replica count: replicas of one can keep serving in the other."""
    return (a.tp, a.pp, a.batch, a.micro_prefill, a.micro_decode) == (
        b.tp,
        b.pp,
        b.batch,
        b.micro_prefill,
        b.micro_decode,
    )


def reshape_pause_s(
    held: ConfigEstimate,
    new: ParallelConfig,
    shape: ModelShape,
    gpus_per_host: int,
    bandwidth: LinkBandwidth,
    engine_start_s: float,
) -> float:
    """Seconds a full switch to `new` stops serving (module docstring): drain + transfer bound +
    engine start. The transfer bound has every GPU of a host receive its whole new position;
    it is 0 when TP and PP stay (the weights are already in place)."""
    old = held.config
    if (old.tp, old.pp) == (new.tp, new.pp):
        return held.latency_s + engine_start_s
    biggest = max(position_bytes(Position(0, stage, 0), new, shape) for stage in range(new.pp))
    transfer = bandwidth.overhead_s + gpus_per_host * biggest / bandwidth.inter_host_Bps
    return held.latency_s + transfer + engine_start_s


def latency_at_load(
    profile: LatencyProfile, config: ParallelConfig, rate_rps: float, output_tokens: int
) -> float:
    """A request's modelled latency when each replica serves the batch the load gives it: the
    smallest profiled power of two >= rate * full-batch latency / D, at most B (micro-batch
    counts capped to it)."""
    full = estimate(profile, config, output_tokens)[0]
    want = rate_rps * full / config.dp
    b = 1
    while b < config.batch and b < want:
        b *= 2
    m1, m2 = min(config.micro_prefill, b), min(config.micro_decode, b)
    if not (profile.has(config.tp, b // m1) and profile.has(config.tp, b // m2)):
        return full
    at_load = ParallelConfig(config.dp, config.tp, config.pp, b, m1, m2)
    return estimate(profile, at_load, output_tokens)[0]


def hold_shape(
    held: ConfigEstimate,
    new: ConfigEstimate,
    *,
    rate_rps: float,
    pause_s: float,
    horizon_s: float,
    saving_s: float,
    cfg: HysteresisConfig,
) -> bool:
    """True when the current shape (`held`, replicas refitted to the usable GPUs) should stay
    instead of the optimizer's `new` choice (module docstring); `saving_s`: how much sooner a
    request finishes under `new` (`latency_at_load` of each)."""
    if same_shape(held.config, new.config):
        return True
    short = held.throughput_rps < rate_rps * (1.0 + cfg.rate_headroom)
    if short and new.throughput_rps > held.throughput_rps:
        return False  # the fleet needs the capacity
    if not short and new.throughput_rps < rate_rps * (1.0 + cfg.rate_headroom):
        return True  # it would trade the headroom away for speed, and soon have to come back
    if saving_s <= 0 or pause_s > cfg.max_paused_fraction * horizon_s:
        return True
    return not horizon_s * saving_s > pause_s * pause_s / 2.0


def expected_interval_s(change_times_s: Sequence[float], window: int, min_gaps: int = 1) -> float:
    """Mean gap between the last `window` + 1 distinct fleet-change times (inf until there are
    `min_gaps` gaps)."""
    distinct: list[float] = []
    for t in change_times_s:
        if not distinct or t > distinct[-1]:
            distinct.append(t)
    recent = distinct[-(window + 1) :]
    if len(recent) < max(2, min_gaps + 1):
        return math.inf
    return (recent[-1] - recent[0]) / (len(recent) - 1)
