"""One reconfiguration, decided end to end under a policy set: the call the controller and the
simulator both make when GPUs come, go, or receive a preemption notice (one implementation).

Order of decisions (each a pure function of this package):
1. configuration: `choose_config` on the usable GPUs (policies that reparallelize), or the fixed
   shape with as many replicas as fit (reroute, restart); for ember, `hold_shape` then keeps the
   current shape unless a change pays for its pause (hysteresis.py);
2. replicas: with the shape unchanged, old replicas whose GPUs all survive are *kept* untouched
   (the matching Kuhn–Munkres would find: they hold everything they need) and the others
   *stop*; a shape change stops them all, as does any change for the reparallelization
   baseline; the missing replicas are *built*;
3. survivors: which stopped replicas' requests keep their KV on a built replica
   (`choose_survivors`); the others resume by the policy's dropped mode;
4. device map: `map_devices` for the built replicas on the GPUs kept replicas do not use (KM
   with the old placement for context-keeping policies, plain order otherwise);
5. transfers: `plan_migration` (peer to peer for ember/SpotServe, from storage for the
   baselines; ember takes the storage plan instead when it is faster, as when a few old
   replicas would have to feed many new ones; it is tried only when the peer plan is slower
   than every host reading all its new positions from disk) and the time until the built replicas serve
   (progressive start when allowed);
6. grace budget: `arrange_grace` for the stopped replicas' requests, when a deadline is given.

Fast paths for huge fleets (`Shortcuts`, exact by default): above `exact_mapping_cells` GPU x
position cells the built replicas are mapped in plain order and their transfer time is a
per-host bound (each host receives its positions' bytes over one link: the network for
context-keeping policies, its disk for the others) instead of a migration plan; and
`trim_senders` offers the planner only the stopped replicas plus as many untouched ones as there
are replicas to build (at least one) as weight senders: every replica holds a full copy, so a few
senders give the planner nearly the same choices as thousands at a fraction of its cost.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace

from ember.policy.device_map import MappingStrategy, map_devices
from ember.policy.grace import (
    GraceBudget,
    ResumeMode,
    RunningRequest,
    Survival,
    choose_survivors,
    grace_for_config,
)
from ember.policy.hysteresis import hold_shape, latency_at_load, reshape_pause_s, same_shape
from ember.policy.layout import Gpu, ModelShape, Placement, Position, position_bytes
from ember.policy.migration_plan import LinkBandwidth, MigrationPlan, plan_migration
from ember.policy.optimizer import ConfigEstimate, ParallelConfig, choose_config, estimate
from ember.policy.policy_set import PolicySet
from ember.policy.profile import LatencyProfile
from ember.policy.replica_set import merge, old_replicas, senders


@dataclass(frozen=True, slots=True)
class FleetView:
    """The deployment's GPUs at the moment of the change.

    current: today's placement (None before the first start, or after every replica was lost).
    usable: GPUs the new configuration may use (survivors not under notice, plus new ones).
    hosts: host of every GPU named here and in `current`.
    dying: GPUs under a preemption notice (they can still send their data).
    lost: GPUs already gone (their data is gone too).
    """

    current: Placement | None
    usable: Sequence[Gpu]
    hosts: Mapping[str, str]
    dying: Collection[str] = ()
    lost: Collection[str] = ()


@dataclass(frozen=True, slots=True)
class Shortcuts:
    """Fast paths for huge fleets (module docstring); None: exact."""

    exact_mapping_cells: int | None = None
    trim_senders: bool = False


@dataclass(frozen=True, slots=True)
class Reconfiguration:
    """What to do. New replica numbers: kept replicas first, then built ones.

    estimate: the chosen configuration (None: the usable GPUs cannot hold the model; every old
        replica stops).
    keep: new replica -> old replica that keeps serving where it is.
    build: new replica -> its GPUs in position order (stage-major, then shard).
    stop: old replicas that stop serving.
    survival: kv_stay maps a built replica to the stopped old replica whose KV it takes over;
        resume says how each request of a stopped replica resumes (request ids of `requests`).
    plan: the migration plan (None when nothing is built or the fast path estimated it).
    transfer_s: from the switch until the built replicas hold what they need to serve.
    held_shape: hysteresis kept the current shape over the optimizer's choice.
    on_demand_wanted: on-demand GPUs the optimizer wants beyond the usable ones (the plan is
        for the GPUs at hand; ask again once they arrive).
    """

    estimate: ConfigEstimate | None
    placement: Placement | None
    keep: Mapping[int, int]
    build: Mapping[int, tuple[str, ...]]
    stop: tuple[int, ...]
    survival: Survival
    plan: MigrationPlan | None
    transfer_s: float
    moved_bytes: int
    loaded_bytes: int
    grace: GraceBudget | None
    held_shape: bool = False
    on_demand_wanted: int = 0

    @property
    def config(self) -> ParallelConfig | None:
        return None if self.estimate is None else self.estimate.config

    @property
    def changes(self) -> bool:
        """False when the fleet stays exactly as it is."""
        return bool(self.stop or self.build)


def fixed_shape(
    profile: LatencyProfile, shape_of: ParallelConfig, n_gpus: int, output_tokens: int, rate: float
) -> ConfigEstimate | None:
    """`shape_of`'s TP, PP and batching with as many replicas as `n_gpus` fit (None: not one)."""
    dp = n_gpus // (shape_of.tp * shape_of.pp)
    if dp < 1:
        return None
    cfg = shape_of.with_dp(dp)
    lat, t1, t2 = estimate(profile, cfg, output_tokens)
    tpt = dp * cfg.batch / lat
    return ConfigEstimate(cfg, lat, t1, t2, tpt, tpt >= rate)


def _choose(
    policy: PolicySet,
    profile: LatencyProfile,
    shape: ModelShape,
    view: FleetView,
    rate: float,
    fixed: ParallelConfig | None,
    horizon_s: float,
    bandwidth: LinkBandwidth,
    engine_start_s: float,
) -> tuple[ConfigEstimate | None, int, bool]:
    """The configuration, the on-demand GPUs it wants, and whether hysteresis held the shape."""
    cur, opt, n = view.current, policy.optimizer, len(view.usable)
    if not policy.reparallelize and (fixed or cur) is not None:
        base = fixed or cur.config  # type: ignore[union-attr]
        return fixed_shape(profile, base, n, opt.output_tokens, rate), 0, False
    est = choose_config(profile, n, rate, opt)
    wanted = 0
    if est is not None and est.on_demand_gpus and n < est.config.gpus:
        wanted = est.config.gpus - n  # plan for what exists now; the caller asks again later
        est = choose_config(profile, n, rate, replace(opt, max_on_demand_gpus=0))
    hyst = policy.hysteresis
    if hyst is None or cur is None or est is None or same_shape(cur.config, est.config):
        return est, wanted, False
    held = fixed_shape(profile, cur.config, n, opt.output_tokens, rate)
    if held is None:
        return est, wanted, False
    per_host: dict[str, int] = {}
    for g in view.usable:
        per_host[g.host_id] = per_host.get(g.host_id, 0) + 1
    pause = reshape_pause_s(
        held, est.config, shape, max(per_host.values()), bandwidth, engine_start_s
    )
    out = opt.output_tokens
    saving = latency_at_load(profile, held.config, rate, out) - latency_at_load(
        profile, est.config, rate, out
    )
    if hold_shape(
        held, est, rate_rps=rate, pause_s=pause, horizon_s=horizon_s, saving_s=saving, cfg=hyst
    ):
        return held, wanted, True
    return est, wanted, False


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
    fixed_config: ParallelConfig | None = None,
    horizon_s: float = float("inf"),
    engine_start_s: float = 0.0,
    shortcuts: Shortcuts | None = None,
) -> Reconfiguration:
    """Decide the new configuration, replicas, placement, transfers and grace budget (module
    docstring).

    `requests` are the running requests with their old replica (numbers of `view.current`).
    `fixed_config`: the shape a policy that does not reparallelize keeps (its first choice;
    default the current one). `horizon_s`: how long the new configuration is expected to serve
    (`expected_interval_s`); `engine_start_s`: engine restart after a switch; both only enter
    ember's hysteresis.
    """
    bw = bandwidth or LinkBandwidth()
    cuts = shortcuts or Shortcuts()
    est, wanted, held = _choose(
        policy,
        profile,
        shape,
        view,
        arrival_rate_rps,
        fixed_config,
        horizon_s,
        bw,
        engine_start_s,
    )
    old = view.current
    reps = old_replicas(old)
    if est is None:
        stop = tuple(sorted(reps))
        survival = _survival(policy, requests, set(stop), 0, 0)
        grace = _grace(policy, profile, old, requests, stop, now_s, deadline_s, 0.0)
        return Reconfiguration(
            None, None, {}, {}, stop, survival, None, 0.0, 0, 0, grace, held, wanted
        )
    new = est.config
    bad = set(view.dying) | set(view.lost)
    intact = [r for r, gs in sorted(reps.items()) if not (set(gs) & bad)]
    kept_old = intact[: new.dp] if old is not None and same_shape(old.config, new) else []
    if policy.restart_all and old is not None and (old.config != new or len(intact) < len(reps)):
        kept_old = []  # the reparallelization baseline restarts every replica on any change
    stop = tuple(r for r in sorted(reps) if r not in kept_old)
    keep = dict(enumerate(kept_old))
    stopped = [r for r in requests if r.replica in set(stop)]
    survival = _survival(policy, stopped, set(stop), new.dp - len(keep), len(keep))
    built = _Built({}, None, 0.0, 0, 0)
    if new.dp > len(keep):
        taken = {g for r in kept_old for g in reps[r]}
        cands = [g for g in view.usable if g.gpu_id not in taken]
        built = _build(
            policy, shape, view, est, cands, kept_old, stop, stopped, survival, bw, cuts,
            memory_limit_bytes,
        )  # fmt: skip
    grace = _grace(policy, profile, old, requests, stop, now_s, deadline_s, built.transfer_s)
    placement = merge(new, old, keep, built.gpus)
    return Reconfiguration(
        est, placement, keep, built.gpus, stop, survival, built.plan, built.transfer_s,
        built.moved_bytes, built.loaded_bytes, grace, held, wanted,
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class _Built:
    gpus: Mapping[int, tuple[str, ...]]  # new replica -> its GPUs, position order
    plan: MigrationPlan | None
    transfer_s: float
    moved_bytes: int
    loaded_bytes: int


def _build(
    policy: PolicySet,
    shape: ModelShape,
    view: FleetView,
    est: ConfigEstimate,
    cands: Sequence[Gpu],
    kept_old: Sequence[int],
    stop: Sequence[int],
    stopped: Sequence[RunningRequest],
    survival: Survival,
    bw: LinkBandwidth,
    cuts: Shortcuts,
    memory_limit_bytes: int | None,
) -> _Built:
    """Map the replicas to build onto `cands` and price getting their weights (and KV) there."""
    old, n_keep = view.current, len(kept_old)
    sub = est.config.with_dp(est.config.dp - n_keep)
    exact = cuts.exact_mapping_cells is None or len(cands) * sub.gpus <= cuts.exact_mapping_cells
    kv_sub = {n - n_keep: o for n, o in survival.kv_stay.items()}  # built-replica numbering
    kv_bytes = {o: b for o, b in kv_layer_bytes(stopped, shape).items() if o in kv_sub.values()}
    reuse = old is not None and policy.reuse_context
    sub_place = map_devices(
        sub,
        cands,
        shape,
        old=old if reuse else None,
        kv_stay=kv_sub or None,
        kv_layer_bytes=kv_bytes or None,
        strategy=policy.mapping if exact and old is not None else MappingStrategy.PLAIN,
    ).placement
    gpus = {
        n_keep + j: tuple(
            sub_place.assignment[Position(j, p, m)] for p in range(sub.pp) for m in range(sub.tp)
        )
        for j in range(sub.dp)
    }
    if not exact:
        t, total = _per_host_bound(sub_place, shape, view.hosts, bw, reuse)
        return _Built(gpus, None, t, *((total, 0) if reuse else (0, total)))
    src = senders(old, stop, kept_old, sub.dp, cuts.trim_senders) if reuse else None

    def plan_for(peers: bool) -> MigrationPlan:
        return plan_migration(
            src.placement if src else None,
            sub_place,
            shape,
            view.hosts,
            dying=view.dying,
            lost=view.lost,
            kv_stay=src.renumber_kv(kv_sub) if src else None,
            kv_layer_bytes=src.renumber_bytes(kv_bytes) if src else None,
            memory_limit_bytes=memory_limit_bytes if policy.memory_limit else None,
            bandwidth=bw,
            peer_copies=peers,
        )

    plan = plan_for(policy.reuse_context)
    # Storage is tried only when the peer plan is slower than every host reading all of its
    # new positions from its own disk (a quick bound); the storage plan itself reads less.
    if policy.reuse_context and policy.load_when_faster:
        disk_bound, _ = _per_host_bound(sub_place, shape, view.hosts, bw, over_network=False)
        if plan.estimated_s > disk_bound:
            from_storage = plan_for(False)
            if from_storage.estimated_s < plan.estimated_s:
                plan = from_storage
    t = plan.estimated_s
    if policy.progressive and len(plan.prefix_ready_s) > 1:
        t = max(plan.prefix_ready_s[1], plan.estimated_s - est.prefill_s)
    return _Built(gpus, plan, t, plan.moved_bytes, plan.loaded_bytes)


def _survival(
    policy: PolicySet,
    requests: Sequence[RunningRequest],
    stop: set[int],
    n_build: int,
    offset: int,
) -> Survival:
    """Built replica (numbered from `offset`) -> stopped old replica whose KV it takes over, and
    how every request of a stopped replica resumes."""
    stopped = [r for r in requests if r.replica in stop]
    kv: dict[int, int] = {}
    if policy.keep_kv and n_build > 0 and stopped:
        surv = choose_survivors(
            stopped, n_build, by_tokens=policy.survivors_by_tokens, dropped_mode=policy.dropped
        )
        kv = {offset + j: r for j, r in surv.kv_stay.items()}
    kept = set(kv.values())
    resume = {
        r.request_id: ResumeMode.KEEP_KV if r.replica in kept else policy.dropped
        for r in requests
        if r.replica in stop
    }
    return Survival(kv, resume)


def _per_host_bound(
    new: Placement,
    shape: ModelShape,
    hosts: Mapping[str, str],
    bw: LinkBandwidth,
    over_network: bool,
) -> tuple[float, int]:
    """Fast path: each host receives its positions' bytes over one link (seconds, bytes)."""
    per_host: dict[str, int] = {}
    for pos, g in new.assignment.items():
        h = hosts[g]
        per_host[h] = per_host.get(h, 0) + position_bytes(pos, new.config, shape)
    rate = bw.inter_host_Bps if over_network else bw.storage_Bps
    return bw.overhead_s + max(per_host.values(), default=0) / rate, sum(per_host.values())


def _grace(
    policy: PolicySet,
    profile: LatencyProfile,
    old: Placement | None,
    requests: Sequence[RunningRequest],
    stop: Sequence[int],
    now_s: float,
    deadline_s: float | None,
    migration_s: float,
) -> GraceBudget | None:
    if deadline_s is None or not policy.use_grace_period or old is None or not stop:
        return None
    stopping = [r for r in requests if r.replica in set(stop)]
    return grace_for_config(
        profile,
        old.config,
        stopping,
        now_s=now_s,
        deadline_s=deadline_s,
        migration_s=migration_s,
        output_tokens=policy.optimizer.output_tokens,
        published=policy.published_budget,
    )


def kv_layer_bytes(requests: Sequence[RunningRequest], shape: ModelShape) -> dict[int, int]:
    """KV bytes of one layer (all shards) per old replica, from its requests' token counts."""
    out: dict[int, int] = {}
    for r in requests:
        tokens = r.prompt_tokens + r.generated_tokens
        out[r.replica] = out.get(r.replica, 0) + tokens * shape.kv_token_layer_bytes
    return out
