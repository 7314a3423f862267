"""One reconfiguration, decided end to end under a policy set: the piece the simulator and the
controller call when GPUs come, go, or receive a preemption notice.

Order of decisions (each a pure function of this package):
1. configuration: `choose_config` on the usable GPUs (`reparallelize`), or the current shape
   with as many replicas as fit (TP and PP fixed: reroute, restart);
2. survivors: which old replicas' running requests keep their KV (`choose_survivors`), or, for
   policies that keep no context, only replicas whose GPUs all survive keep running;
3. device map: `map_devices` (KM or plain order), with the inherited KV in the weights;
4. migration plan: `plan_migration` from what may be reused (everything for SpotServe and ember;
   only intact replicas for reroute/restart; nothing for reparallelization, which reloads);
5. grace budget: `arrange_grace` with the old configuration's step times and the plan's
   estimate, when a notice deadline is given and the policy uses the grace period.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from ember.errors import PolicyError
from ember.policy.device_map import DeviceMapping, MappingStrategy, map_devices
from ember.policy.grace import (
    GraceBudget,
    ResumeMode,
    RunningRequest,
    Survival,
    arrange_grace,
    choose_survivors,
)
from ember.policy.layout import Gpu, ModelShape, Placement, position_bytes, positions
from ember.policy.migration_plan import LinkBandwidth, MigrationPlan, plan_migration
from ember.policy.optimizer import ConfigEstimate, ParallelConfig, choose_config, estimate
from ember.policy.policy_set import PolicySet
from ember.policy.profile import LatencyProfile


@dataclass(frozen=True, slots=True)
class FleetView:
    """The deployment's GPUs at the moment of the change.

    current: today's placement (None before the first start).
    usable: GPUs the new configuration may use (survivors not under notice, plus new ones).
    dying: GPUs under a preemption notice (they can still send their data).
    lost: GPUs already gone (their data is gone too).
    hosts: host of every GPU named above and in `current`.
    """

    current: Placement | None
    usable: tuple[Gpu, ...]
    hosts: Mapping[str, str]
    dying: tuple[str, ...] = ()
    lost: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Reconfiguration:
    """What to do; `estimate` None means the usable GPUs cannot hold the model."""

    estimate: ConfigEstimate | None
    mapping: DeviceMapping | None
    survival: Survival
    plan: MigrationPlan | None
    grace: GraceBudget | None
    memory_fallback: bool = False  # no transfer order fitted the memory limit; planned without it
    on_demand_wanted: int = 0  # GPUs to acquire on demand; the plan is for spot GPUs only


def kv_layer_bytes(requests: Sequence[RunningRequest], shape: ModelShape) -> dict[int, int]:
    """KV bytes of one layer (all shards) per old replica, from its requests' token counts."""
    out: dict[int, int] = {}
    for r in requests:
        tokens = r.prompt_tokens + r.generated_tokens
        out[r.replica] = out.get(r.replica, 0) + tokens * shape.kv_token_layer_bytes
    return out


def _fixed_shape(
    profile: LatencyProfile, old: ParallelConfig, n_gpus: int, output_tokens: int, rate: float
) -> ConfigEstimate | None:
    dp = n_gpus // (old.tp * old.pp)
    if dp < 1:
        return None
    cfg = old.with_dp(dp)
    lat, t1, t2 = estimate(profile, cfg, output_tokens)
    tpt = dp * cfg.batch / lat
    return ConfigEstimate(cfg, lat, t1, t2, tpt, tpt >= rate)


def _intact_replicas(current: Placement, usable: Sequence[Gpu]) -> list[int]:
    ok = {g.gpu_id for g in usable}
    by_rep: dict[int, bool] = {}
    for pos, g in current.assignment.items():
        by_rep[pos.replica] = by_rep.get(pos.replica, True) and g in ok
    return sorted(r for r, intact in by_rep.items() if intact)


def _restrict(current: Placement, replicas: Sequence[int]) -> Placement | None:
    """The current placement cut down to `replicas`, renumbered 0..k-1 (None if empty)."""
    if not replicas:
        return None
    renum = {old: new for new, old in enumerate(replicas)}
    assign = {
        type(pos)(renum[pos.replica], pos.stage, pos.shard): g
        for pos, g in current.assignment.items()
        if pos.replica in renum
    }
    return Placement(current.config.with_dp(len(replicas)), assign)


def _choose(
    policy: PolicySet, profile: LatencyProfile, view: FleetView, rate: float
) -> tuple[ConfigEstimate | None, int]:
    """The new configuration, and the on-demand GPUs it wants beyond the usable ones."""
    cur, opt, n = view.current, policy.optimizer, len(view.usable)
    if policy.reparallelize or cur is None:
        est = choose_config(profile, n, rate, opt)
    else:
        est = _fixed_shape(profile, cur.config, n, opt.output_tokens, rate)
    if est is not None and est.on_demand_gpus and n < est.config.gpus:
        # Plan for what exists now; the caller acquires the on-demand GPUs and asks again.
        spot = choose_config(profile, n, rate, replace(opt, max_on_demand_gpus=0))
        return spot, est.config.gpus - n
    return est, 0


@dataclass(frozen=True, slots=True)
class _Reuse:
    survival: Survival  # in the caller's replica numbering
    old: Placement | None  # what the plan may reuse
    kv_stay: Mapping[int, int]  # in `old`'s numbering
    kv_bytes: Mapping[int, int]  # in `old`'s numbering


def _reuse(
    policy: PolicySet,
    view: FleetView,
    requests: Sequence[RunningRequest],
    est: ConfigEstimate | None,
    shape: ModelShape,
) -> _Reuse:
    cur = view.current
    kv_bytes = kv_layer_bytes(requests, shape)
    if policy.restart_all or cur is None:
        return _Reuse(
            Survival({}, {r.request_id: ResumeMode.RESTART for r in requests}), None, {}, {}
        )
    new_dp = est.config.dp if est else 0
    if policy.reuse_context and policy.keep_kv:
        survival = choose_survivors(
            requests, new_dp, by_tokens=policy.survivors_by_tokens, dropped_mode=policy.dropped
        )
        return _Reuse(survival, cur, survival.kv_stay, kv_bytes)
    # No context moves: replicas whose GPUs all survive keep running where they are.
    intact = _intact_replicas(cur, view.usable)[:new_dp]
    kept = set(intact)
    resume = {
        r.request_id: ResumeMode.KEEP_KV if r.replica in kept else policy.dropped for r in requests
    }
    survival = Survival(dict(enumerate(intact)), resume)
    own = {i: kv_bytes.get(old, 0) for i, old in enumerate(intact)}
    return _Reuse(survival, _restrict(cur, intact), {i: i for i in range(len(intact))}, own)


def plan_reconfiguration(
    policy: PolicySet,
    profile: LatencyProfile,
    shape: ModelShape,
    view: FleetView,
    requests: Sequence[RunningRequest],
    *,
    arrival_rate_rps: float,
    now_s: float,
    deadline_s: float | None = None,
    bandwidth: LinkBandwidth | None = None,
    memory_limit_bytes: int | None = None,
) -> Reconfiguration:
    """Decide the new configuration, placement, transfers and grace budget (module docstring).

    `requests` are the running requests with their old replica; `survival.kv_stay` and
    `survival.resume` use the same replica numbers.
    """
    est, wanted = _choose(policy, profile, view, arrival_rate_rps)
    reuse = _reuse(policy, view, requests, est, shape)

    def grace_for(migration_s: float) -> GraceBudget | None:
        return _grace(policy, profile, view, requests, now_s, deadline_s, migration_s)

    if est is None:
        return Reconfiguration(None, None, reuse.survival, None, grace_for(0.0), False, wanted)
    if reuse.old is not None and not policy.reuse_context:
        mapping = _keep_intact(reuse.old, est.config, view.usable, shape)
    else:
        strategy = policy.mapping if reuse.old is not None else MappingStrategy.PLAIN
        mapping = map_devices(
            est.config,
            view.usable,
            shape,
            old=reuse.old,
            kv_stay=reuse.kv_stay,
            kv_layer_bytes=reuse.kv_bytes,
            strategy=strategy,
        )

    def plan(limit: int | None) -> MigrationPlan:
        return plan_migration(
            reuse.old,
            mapping.placement,
            shape,
            view.hosts,
            dying=view.dying,
            lost=view.lost,
            kv_stay=reuse.kv_stay,
            kv_layer_bytes=reuse.kv_bytes,
            memory_limit_bytes=limit,
            bandwidth=bandwidth,
            peer_copies=policy.reuse_context,
        )

    limit = memory_limit_bytes if policy.memory_limit else None
    fallback = False
    try:
        migration = plan(limit)
    except PolicyError:
        if limit is None:
            raise
        migration, fallback = plan(None), True
    grace = grace_for(migration.estimated_s)
    return Reconfiguration(est, mapping, reuse.survival, migration, grace, fallback, wanted)


def _keep_intact(
    intact: Placement, config: ParallelConfig, usable: Sequence[Gpu], shape: ModelShape
) -> DeviceMapping:
    """Intact replicas stay on their GPUs; new replicas take the other GPUs in host order."""
    keep = {pos: g for pos, g in intact.assignment.items() if pos.replica < config.dp}
    taken = set(keep.values())
    free = iter(
        sorted((g for g in usable if g.gpu_id not in taken), key=lambda g: (g.host_id, g.gpu_id))
    )
    assign = dict(keep)
    for pos in positions(config):
        if pos not in assign:
            assign[pos] = next(free).gpu_id
    kept = sum(position_bytes(pos, config, shape) for pos in keep)
    return DeviceMapping(Placement(config, assign), kept, 0)


def _grace(
    policy: PolicySet,
    profile: LatencyProfile,
    view: FleetView,
    requests: Sequence[RunningRequest],
    now_s: float,
    deadline_s: float | None,
    migration_s: float,
) -> GraceBudget | None:
    if deadline_s is None or not policy.use_grace_period or view.current is None:
        return None
    cfg = view.current.config
    out = policy.optimizer.output_tokens
    _, t1, t2 = estimate(profile, cfg, out)
    steps: dict[int, float] = {}
    b = 1
    while b <= cfg.batch:
        m2 = min(cfg.micro_decode, b)
        if profile.has(cfg.tp, b // m2):
            steps[b] = estimate(profile, ParallelConfig(cfg.dp, cfg.tp, cfg.pp, b, 1, m2), out)[2]
        b *= 2
    return arrange_grace(
        requests,
        deadline_s=deadline_s,
        now_s=now_s,
        migration_s=migration_s,
        prefill_s=t1,
        decode_step_s=t2 if policy.published_budget or not steps else steps,
        held_back=1,
        shrinking_batch=not policy.published_budget,
    )
