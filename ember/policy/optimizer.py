"""Parallel-configuration optimizer (SpotServe §2a): choose (D, P, M, B, M1, M2) for N GPUs.

Cost model, from the per-layer profile (ms), with L_s = ceil(layer_num / P) layers per stage:
  prefill t1 = init[M][B/M1] * L_s * (P + M1 - 1) / M1 + pp_init_comm * (P - 1) / M1
  decode  t2 = incr[M][B/M2] * L_s * (P + M2 - 1)      + pp_incr_comm * (P - 1) / M2
  latency l  = fix * (t1 + S_out * t2 + 2 * embed[log2 B]);  throughput phi = D * B / l.
Search: M a profiled power of two <= min(max_tp, N); B, M1, M2 powers of two with M1, M2 <= B
<= max_batch; P from ceil(min_gpus / M) while P * M <= N, P dividing padded_layer_num;
D = floor(N / (P * M)) replicas (SpotServe fills every replica that fits).
Choice: the lowest-latency configuration whose throughput meets the arrival rate; if none, the
highest-throughput one. Knobs beyond the paper's code, all off in `OptimizerConfig.spotserve()`:
`rate_headroom` (ask for throughput >= rate * (1 + headroom) first), `tie_tolerance` (among
configurations within this relative latency of the best, take the fewest GPUs: the paper's
cost tie-break), `queue_aware` (rank by latency + modelled queueing delay), `trim_replicas`
(use only the replicas the rate needs, freeing GPUs), and `max_on_demand_gpus` (add on-demand
GPUs, in steps of `on_demand_step_gpus`, when spot GPUs cannot meet the rate). `ember()` keeps
the published ranking: on SpotServe's own traces none of the ranking knobs lowered P99 in the
simulator (docs/policy.md has the sweep), so they stay opt-in.
Enumeration order is fixed, so equal inputs give equal choices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ember.errors import ConfigError
from ember.policy.profile import LatencyProfile


@dataclass(frozen=True, slots=True)
class ParallelConfig:
    """One parallel configuration: D replicas of P stages of M tensor shards, batch B."""

    dp: int
    tp: int
    pp: int
    batch: int
    micro_prefill: int = 1  # M1
    micro_decode: int = 1  # M2

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "pp", "batch", "micro_prefill", "micro_decode"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def gpus(self) -> int:
        return self.dp * self.tp * self.pp

    def with_dp(self, dp: int) -> ParallelConfig:
        return ParallelConfig(
            dp, self.tp, self.pp, self.batch, self.micro_prefill, self.micro_decode
        )


@dataclass(frozen=True, slots=True)
class ConfigEstimate:
    """A configuration with its modelled costs (seconds; throughput in requests/s)."""

    config: ParallelConfig
    latency_s: float
    prefill_s: float  # t1, fix factor applied
    decode_step_s: float  # t2, fix factor applied
    throughput_rps: float
    meets_rate: bool
    on_demand_gpus: int = 0


@dataclass(frozen=True, slots=True)
class OptimizerConfig:
    """Knobs of the optimizer; `spotserve()` is the published behaviour, `ember()` ours."""

    max_batch: int = 4
    min_gpus: int = 1  # W_min: GPUs the model (weights + KV) needs at the least
    output_tokens: int = 128
    rate_headroom: float = 0.0
    tie_tolerance: float = 0.0
    trim_replicas: bool = False
    max_on_demand_gpus: int = 0
    on_demand_step_gpus: int = 4
    queue_aware: bool = False  # rank by latency + modelled queueing delay (`queue_wait_s`)
    arrival_cv: float = 1.0  # coefficient of variation of inter-arrival times (1: Poisson)

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_batch & (self.max_batch - 1):
            raise ConfigError(f"max_batch must be a power of two >= 1, got {self.max_batch}")
        for name in ("min_gpus", "output_tokens", "on_demand_step_gpus"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("rate_headroom", "tie_tolerance", "arrival_cv"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ConfigError(f"{name} must be a finite value >= 0, got {v}")
        if self.max_on_demand_gpus < 0:
            raise ConfigError(f"max_on_demand_gpus must be >= 0, got {self.max_on_demand_gpus}")

    @classmethod
    def spotserve(
        cls, *, max_batch: int = 4, min_gpus: int = 1, output_tokens: int = 128
    ) -> OptimizerConfig:
        """SpotServe as published: fill replicas, no headroom, no cost tie-break, no on-demand."""
        return cls(max_batch=max_batch, min_gpus=min_gpus, output_tokens=output_tokens)

    @classmethod
    def ember(
        cls,
        *,
        max_batch: int = 4,
        min_gpus: int = 1,
        output_tokens: int = 128,
        max_on_demand_gpus: int = 0,
    ) -> OptimizerConfig:
        """ember: the published ranking, plus an optional on-demand top-up."""
        return cls(
            max_batch=max_batch,
            min_gpus=min_gpus,
            output_tokens=output_tokens,
            max_on_demand_gpus=max_on_demand_gpus,
        )


def estimate(
    profile: LatencyProfile, config: ParallelConfig, output_tokens: int = 128
) -> tuple[float, float, float]:
    """(latency_s, prefill_s, decode_step_s) of one request under `config`, fix factor applied."""
    tp, pp, b = config.tp, config.pp, config.batch
    m1, m2 = config.micro_prefill, config.micro_decode
    layers_per_stage = -(-profile.layer_num // pp)
    init = profile.cost(tp, b // m1).init_ms
    incr = profile.cost(tp, b // m2).incr_ms
    t1 = init * layers_per_stage * (pp + m1 - 1) / m1 + profile.pp_init_comm_ms * (pp - 1) / m1
    t2 = incr * layers_per_stage * (pp + m2 - 1) + profile.pp_incr_comm_ms * (pp - 1) / m2
    fix = profile.final_fix_factor
    lat = fix * (t1 + output_tokens * t2 + 2 * profile.embed_cost_ms(b))
    return lat / 1000.0, fix * t1 / 1000.0, fix * t2 / 1000.0


def candidate_shapes(
    profile: LatencyProfile, n_gpus: int, opt: OptimizerConfig
) -> list[ParallelConfig]:
    """Every (M, B, M1, M2, P) that fits in n_gpus, with D = floor(N / (P*M)), in search order."""
    out: list[ParallelConfig] = []
    batches = [1 << i for i in range(opt.max_batch.bit_length())]
    for tp in profile.tp_degrees():
        if tp > n_gpus:
            break
        for b in batches:
            for m1 in (x for x in batches if x <= b):
                for m2 in (x for x in batches if x <= b):
                    if not (profile.has(tp, b // m1) and profile.has(tp, b // m2)):
                        continue
                    pp = max(1, -(-opt.min_gpus // tp))
                    while pp * tp <= n_gpus:
                        if profile.padded_layer_num % pp == 0 and pp <= profile.layer_num:
                            out.append(ParallelConfig(n_gpus // (pp * tp), tp, pp, b, m1, m2))
                        pp += 1
    return out


def _evaluate(
    profile: LatencyProfile, n_gpus: int, rate: float, opt: OptimizerConfig
) -> list[ConfigEstimate]:
    out: list[ConfigEstimate] = []
    needed = rate * (1.0 + opt.rate_headroom)
    for shape in candidate_shapes(profile, n_gpus, opt):
        lat, t1, t2 = estimate(profile, shape, opt.output_tokens)
        per_replica = shape.batch / lat
        cfg = shape
        if opt.trim_replicas and needed > 0:
            cfg = shape.with_dp(max(1, min(shape.dp, math.ceil(needed / per_replica - 1e-12))))
        tpt = cfg.dp * per_replica
        out.append(ConfigEstimate(cfg, lat, t1, t2, tpt, tpt >= rate))
    return out


def queue_wait_s(rate: float, latency_s: float, slots: int, arrival_cv: float = 1.0) -> float:
    """Mean queueing delay with `slots` request slots (D * B) each busy `latency_s` per request.

    Allen–Cunneen for G/D/c with Sakasegawa's Lq approximation: Lq = rho^sqrt(2(c+1)) / (1-rho),
    Wq = Lq / rate * (cv_a^2 + 0) / 2; infinite at utilisation >= 1.
    """
    if rate <= 0:
        return 0.0
    rho = rate * latency_s / slots
    if rho >= 1.0:
        return math.inf
    lq = rho ** math.sqrt(2.0 * (slots + 1)) / (1.0 - rho)
    return lq / rate * (arrival_cv**2) / 2.0


def _pick(
    cands: list[ConfigEstimate], needed: float, tie: float, opt: OptimizerConfig, rate: float
) -> ConfigEstimate | None:
    ok = [c for c in cands if c.throughput_rps >= needed]
    if not ok:
        return None

    def cost(c: ConfigEstimate) -> float:
        if not opt.queue_aware:
            return c.latency_s
        return c.latency_s + queue_wait_s(
            rate, c.latency_s, c.config.dp * c.config.batch, opt.arrival_cv
        )

    best = min(cost(c) for c in ok)
    if math.isinf(best):
        return None
    if tie <= 0:
        return next(c for c in ok if cost(c) == best)  # first in search order, as published
    near = [c for c in ok if cost(c) <= best * (1.0 + tie)]
    return min(near, key=lambda c: (c.config.gpus, cost(c)))


def choose_config(
    profile: LatencyProfile,
    n_gpus: int,
    arrival_rate_rps: float,
    opt: OptimizerConfig | None = None,
) -> ConfigEstimate | None:
    """The configuration for `n_gpus` usable GPUs at `arrival_rate_rps`; None if none fits.

    None means fewer GPUs than `opt.min_gpus` (and no on-demand top-up allowed): the model
    cannot be served. With `max_on_demand_gpus`, the smallest top-up that meets the rate is
    used (`on_demand_gpus` in the result), else the best spot-only choice stands.
    """
    opt = opt or OptimizerConfig()
    if n_gpus < 0:
        raise ConfigError(f"n_gpus must be >= 0, got {n_gpus}")
    if not (math.isfinite(arrival_rate_rps) and arrival_rate_rps >= 0):
        raise ConfigError(f"arrival_rate_rps must be a finite value >= 0, got {arrival_rate_rps}")
    spot = _choose_for(profile, n_gpus, arrival_rate_rps, opt)
    if opt.max_on_demand_gpus <= 0 or (spot is not None and spot.meets_rate):
        return spot
    extra = opt.on_demand_step_gpus
    while extra <= opt.max_on_demand_gpus:
        topped = _choose_for(profile, n_gpus + extra, arrival_rate_rps, opt)
        if topped is not None and topped.meets_rate:
            od = max(0, topped.config.gpus - n_gpus)
            return ConfigEstimate(
                topped.config,
                topped.latency_s,
                topped.prefill_s,
                topped.decode_step_s,
                topped.throughput_rps,
                True,
                od,
            )
        extra += opt.on_demand_step_gpus
    return spot


def _choose_for(
    profile: LatencyProfile, n_gpus: int, rate: float, opt: OptimizerConfig
) -> ConfigEstimate | None:
    if n_gpus < opt.min_gpus or n_gpus < 1:
        return None
    cands = _evaluate(profile, n_gpus, rate, opt)
    if not cands:
        return None
    if opt.rate_headroom > 0:
        picked = _pick(cands, rate * (1.0 + opt.rate_headroom), opt.tie_tolerance, opt, rate)
        if picked is not None:
            return picked
    picked = _pick(cands, rate, opt.tie_tolerance, opt, rate)
    if picked is not None:
        return picked
    # Nothing meets the rate: the highest throughput, first in search order on ties.
    top = max(c.throughput_rps for c in cands)
    return next(c for c in cands if c.throughput_rps == top)
