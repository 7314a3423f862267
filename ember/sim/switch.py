"""Planning one fleet change with the policy code: the configuration for the usable GPUs, which
replicas stay untouched, which are rebuilt on which GPUs, whose KV cache survives, and how long
the new replicas take to get their weights (peer migration or a load from storage).

Everything here calls `ember.policy` (optimizer, device mapper, migration planner, survivors);
the simulator only decides *when* things happen. A `PolicySet` says which calls and knobs apply.

Scale seam (sim-only): the device mapper builds a dense GPUs x positions matrix; above
`SimParams.exact_mapping_limit` cells the sim maps with the plain (in-order) strategy and
estimates weight moves per replica instead of calling the migration planner, so a 10,000-GPU
fleet stays fast. Replicas whose GPUs all survive and whose shape is unchanged are kept as they
are either way (the matching the KM mapper would find: they hold everything they need).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ember.errors import PolicyError
from ember.policy import (
    ConfigEstimate,
    Gpu,
    LinkBandwidth,
    MappingStrategy,
    MigrationPlan,
    ModelShape,
    ParallelConfig,
    Placement,
    PolicySet,
    Position,
    ResumeMode,
    RunningRequest,
    arrange_grace,
    choose_config,
    choose_survivors,
    estimate,
    map_devices,
    plan_migration,
    position_bytes,
)
from ember.sim.fleet import Replica, Requests
from ember.sim.profile_file import T4_MEMORY_BYTES, ProfileFile

# Prices of SpotServe's evaluation (AWS g4dn.12xlarge, 4x T4), from its artifact's
# scripts_ae/tradeoff_plot.py (shared/references/spotserve.md §3), per GPU-hour so that traces
# with other node sizes are priced per GPU.
G4DN_SPOT_USD_PER_GPU_HOUR = 1.9046 / 4
G4DN_ON_DEMAND_USD_PER_GPU_HOUR = 3.912 / 4


@dataclass(frozen=True, slots=True)
class SimParams:
    """Knobs of the simulated system; units in names. Defaults follow SpotServe's testbed."""

    grace_period_s: float = 30.0
    max_batch: int = 4  # SpotServe's scripts: MAX_BS=4
    engine_start_s: float = 2.0  # assumption: relaunching engine processes, weights attached
    bandwidth: LinkBandwidth = field(default_factory=LinkBandwidth)  # 50 Gbps links, 2 GB/s disk
    gpu_memory_bytes: int = T4_MEMORY_BYTES
    spot_usd_per_gpu_hour: float = G4DN_SPOT_USD_PER_GPU_HOUR
    on_demand_usd_per_gpu_hour: float = G4DN_ON_DEMAND_USD_PER_GPU_HOUR
    required_rate_rps: float | None = None  # optimizer target; None: the workload's mean rate
    slo_s: float | None = None  # None: 2x the first configuration's modelled latency
    drain_s: float = 3600.0  # keep serving this long after the trace ends
    exact_mapping_limit: int = 4_000_000  # GPUs x positions above which mapping goes plain
    warm_start: bool = True  # the first configuration is loaded before t = 0


@dataclass(frozen=True, slots=True)
class SwitchPlan:
    """A decided change. New replica indices: kept ones first, then built ones."""

    estimate: ConfigEstimate | None  # None: no configuration fits the usable GPUs
    keep: Mapping[int, int]  # new replica -> old replica kept untouched (same GPUs)
    build: Mapping[int, tuple[str, ...]]  # new replica -> its GPUs, position order
    stop: tuple[int, ...]  # old replicas that stop serving
    kv_stay: Mapping[int, int]  # new (built) replica -> old replica whose KV it takes over
    resume: Mapping[int, ResumeMode]  # request -> how it resumes (requests of stopped replicas)
    transfer_s: float  # from the switch until built replicas hold their weights (and KV)
    moved_bytes: int
    loaded_bytes: int
    placement: Placement | None

    @property
    def config(self) -> ParallelConfig | None:
        return None if self.estimate is None else self.estimate.config


@dataclass(frozen=True, slots=True)
class FleetView:
    """What the planner sees of the fleet at the decision."""

    placement: Placement | None  # current (old) placement
    usable: Sequence[Gpu]  # alive, not under notice
    dying: frozenset[str]  # GPUs under notice
    lost: frozenset[str]  # GPUs gone (old placement may still name them)
    hosts: Mapping[str, str]  # every GPU id ever seen -> host
    running: Sequence[tuple[int, RunningRequest]]  # (request index, state) on old replicas
    kv_bytes_per_token_layer: int
    first: bool


def choose(
    ps: PolicySet, pf: ProfileFile, n_gpus: int, rate: float, fixed: ParallelConfig | None
) -> ConfigEstimate | None:
    """The configuration this policy wants for `n_gpus` usable GPUs."""
    if ps.reparallelize or fixed is None:
        return choose_config(pf.profile, n_gpus, rate, ps.optimizer)
    dp = n_gpus // (fixed.tp * fixed.pp)
    if dp < 1:
        return None
    cfg = fixed.with_dp(dp)
    lat, t1, t2 = estimate(pf.profile, cfg, ps.optimizer.output_tokens)
    tpt = cfg.dp * cfg.batch / lat
    return ConfigEstimate(cfg, lat, t1, t2, tpt, tpt >= rate)


def _shape(c: ParallelConfig) -> tuple[int, ...]:
    return (c.tp, c.pp, c.batch, c.micro_prefill, c.micro_decode)


def plan_switch(
    ps: PolicySet,
    pf: ProfileFile,
    params: SimParams,
    view: FleetView,
    rate: float,
    fixed: ParallelConfig | None,
) -> SwitchPlan | None:
    """Decide the change; None when the policy changes nothing."""
    est = choose(ps, pf, len(view.usable), rate, fixed)
    old = view.placement
    old_reps = _old_replicas(old)
    bad = view.dying | view.lost
    intact = [r for r, gs in sorted(old_reps.items()) if not (set(gs) & bad)]
    if est is None:
        if not old_reps:
            return None
        resume = _resume(ps, view.running, set(old_reps), set())
        return SwitchPlan(None, {}, {}, tuple(sorted(old_reps)), {}, resume, 0.0, 0, 0, None)
    new = est.config
    same = old is not None and _shape(old.config) == _shape(new)
    kept_old = intact[: new.dp] if same else []
    changed = old is not None and (old.config != new or len(intact) < len(old_reps))
    if ps.restart_all and changed:
        kept_old = []  # the reparallelization baseline restarts every replica on any change
    stop = tuple(r for r in sorted(old_reps) if r not in kept_old)
    n_build = new.dp - len(kept_old)
    if not stop and n_build == 0:
        return None
    keep = {i: r for i, r in enumerate(kept_old)}
    taken = {g for r in kept_old for g in old_reps[r]}
    cands = [g for g in view.usable if g.gpu_id not in taken]
    running_stopped = [(i, rr) for i, rr in view.running if rr.replica in set(stop)]
    sub_kv: dict[int, int] = {}
    if ps.keep_kv and n_build > 0 and running_stopped:
        surv = choose_survivors(
            [rr for _, rr in running_stopped],
            n_build,
            by_tokens=ps.survivors_by_tokens,
            dropped_mode=ps.dropped,
        )
        sub_kv = dict(surv.kv_stay)
    kv_stay = {len(keep) + j: r for j, r in sub_kv.items()}
    resume = _resume(ps, view.running, set(stop), set(sub_kv.values()))
    build: dict[int, tuple[str, ...]] = {}
    transfer_s, moved, loaded = 0.0, 0, 0
    sub_place: Placement | None = None
    if n_build > 0:
        sub = new.with_dp(n_build)
        cells = len(cands) * sub.gpus
        strategy = ps.mapping if cells <= params.exact_mapping_limit else MappingStrategy.PLAIN
        kv_layer = _kv_layer_bytes(view, sub_kv.values()) if sub_kv else None
        mapping = map_devices(
            sub,
            cands,
            pf.shape,
            old=old if ps.reuse_context else None,
            kv_stay=sub_kv or None,
            kv_layer_bytes=kv_layer,
            strategy=strategy,
        )
        sub_place = mapping.placement
        for j in range(n_build):
            build[len(keep) + j] = tuple(
                sub_place.assignment[Position(j, p, m)]
                for p in range(sub.pp)
                for m in range(sub.tp)
            )
        if not view.first:
            src, src_kv, src_layer = _sources(old, stop, kept_old, n_build, sub_kv, kv_layer)
            transfer_s, moved, loaded = _transfer(
                ps, pf.shape, params, view, src, sub_place, src_kv, src_layer, cells, est
            )
    placement = _merge(new, old, keep, build)
    return SwitchPlan(est, keep, build, stop, kv_stay, resume, transfer_s, moved, loaded, placement)


def grace_stop_s(
    ps: PolicySet,
    rep: Replica,
    reqs: Requests,
    now: float,
    deadline: float | None,
    transfer_s: float,
) -> float:
    """When a stopping replica's running batch stops: the policy's grace budget
    (`arrange_grace`) for context-keeping policies, the kill for the baselines, now without a
    deadline (or for `restart`, which ignores notices)."""
    if deadline is None or not ps.use_grace_period:
        return now
    if not ps.keep_kv:
        return min(rep.end_s, deadline)  # the baselines run until the kill
    t_ref = max(now, rep.t0 + rep.t1)
    steps_now = rep.steps_done(t_ref)
    rr = [
        RunningRequest(str(i), rep.index, reqs.prompt[i], reqs.gen[i] + steps_now, reqs.output[i])
        for i in rep.batch
    ]
    # The simulated engine batches statically: a step costs the same until the batch ends, so
    # ember's shrinking-batch budget is priced with that constant step here.
    budget = arrange_grace(
        rr,
        deadline_s=deadline,
        now_s=t_ref,
        migration_s=transfer_s,
        prefill_s=0.0,
        decode_step_s=rep.t2,
        shrinking_batch=not ps.published_budget,
    )
    if budget.steps >= max(r.remaining for r in rr):
        return rep.end_s
    return t_ref + budget.steps * rep.t2


def _old_replicas(old: Placement | None) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    if old is not None:
        for pos, g in old.assignment.items():
            out.setdefault(pos.replica, []).append(g)
    return out


def _resume(
    ps: PolicySet,
    running: Sequence[tuple[int, RunningRequest]],
    stopped: set[int],
    kept_kv: set[int],
) -> dict[int, ResumeMode]:
    out: dict[int, ResumeMode] = {}
    for i, rr in running:
        if rr.replica in stopped:
            out[i] = ResumeMode.KEEP_KV if rr.replica in kept_kv else ps.dropped
    return out


def _kv_layer_bytes(view: FleetView, replicas: object) -> dict[int, int]:
    want = set(replicas)  # type: ignore[call-overload]
    out: dict[int, int] = {}
    for _, rr in view.running:
        if rr.replica in want:
            tokens = rr.prompt_tokens + rr.generated_tokens
            out[rr.replica] = out.get(rr.replica, 0) + tokens * view.kv_bytes_per_token_layer
    return out


def _sources(
    old: Placement | None,
    stop: Sequence[int],
    kept: Sequence[int],
    n_build: int,
    kv_stay: Mapping[int, int],
    kv_layer: Mapping[int, int] | None,
) -> tuple[Placement | None, dict[int, int], dict[int, int] | None]:
    """The old replicas the migration may read from: the stopped ones, plus up to `n_build`
    untouched ones as extra senders (renumbered 0..k-1). Every old replica holds a full copy,
    so a few senders give the planner the same choices as thousands at a fraction of its cost
    (sim-only speed seam); KV maps are renumbered to match."""
    if old is None:
        return None, dict(kv_stay), dict(kv_layer) if kv_layer else None
    chosen = list(stop) + [r for r in kept[: max(1, n_build)] if r not in stop]
    renum = {r: k for k, r in enumerate(chosen)}
    assign = {
        Position(renum[p.replica], p.stage, p.shard): g
        for p, g in old.assignment.items()
        if p.replica in renum
    }
    sub = Placement(old.config.with_dp(len(chosen)), assign)
    kv = {n: renum[o] for n, o in kv_stay.items() if o in renum}
    layer = {renum[o]: b for o, b in (kv_layer or {}).items() if o in renum} if kv_layer else None
    return sub, kv, layer


def _transfer(
    ps: PolicySet,
    shape: ModelShape,
    params: SimParams,
    view: FleetView,
    old: Placement | None,
    new: Placement,
    kv_stay: Mapping[int, int],
    kv_layer: Mapping[int, int] | None,
    cells: int,
    est: ConfigEstimate,
) -> tuple[float, int, int]:
    """Seconds until the built replicas can serve, bytes moved between GPUs, bytes loaded."""
    bw = params.bandwidth
    if ps.reuse_context and old is not None and cells <= params.exact_mapping_limit:
        limit = params.gpu_memory_bytes if ps.memory_limit else None
        try:
            plan = _migrate(old, new, shape, view, kv_stay, kv_layer, limit, bw)
        except PolicyError:
            # No order fits the memory limit: SpotServe then takes the least-bad layer first;
            # the planner refuses, so the sim plans without the limit (same bytes, same time).
            plan = _migrate(old, new, shape, view, kv_stay, kv_layer, None, bw)
        t = plan.estimated_s
        if ps.progressive and len(plan.prefix_ready_s) > 1:
            t = max(plan.prefix_ready_s[1], plan.estimated_s - est.prefill_s)
        return t, plan.moved_bytes, plan.loaded_bytes
    # From storage: each host reads the shards of its new positions from its own disk. (At
    # scale, a context-reusing policy gets the same per-host bound over the network instead.)
    per_host: dict[str, int] = {}
    for pos, g in new.assignment.items():
        h = view.hosts[g]
        per_host[h] = per_host.get(h, 0) + position_bytes(pos, new.config, shape)
    total = sum(per_host.values())
    rate = bw.inter_host_Bps if ps.reuse_context else bw.storage_Bps
    t = bw.overhead_s + max(per_host.values(), default=0) / rate
    return (t, total, 0) if ps.reuse_context else (t, 0, total)


def _migrate(
    old: Placement,
    new: Placement,
    shape: ModelShape,
    view: FleetView,
    kv_stay: Mapping[int, int],
    kv_layer: Mapping[int, int] | None,
    limit: int | None,
    bw: LinkBandwidth,
) -> MigrationPlan:
    return plan_migration(
        old,
        new,
        shape,
        view.hosts,
        dying=view.dying,
        lost=view.lost,
        kv_stay=kv_stay or None,
        kv_layer_bytes=kv_layer,
        memory_limit_bytes=limit,
        bandwidth=bw,
    )


def _merge(
    new: ParallelConfig,
    old: Placement | None,
    keep: Mapping[int, int],
    build: Mapping[int, tuple[str, ...]],
) -> Placement:
    assign: dict[Position, str] = {}
    renumber = {o: n for n, o in keep.items()}
    if old is not None:
        for pos, g in old.assignment.items():
            n = renumber.get(pos.replica)
            if n is not None:
                assign[Position(n, pos.stage, pos.shard)] = g
    for n, gpus in build.items():
        k = 0
        for p in range(new.pp):
            for m in range(new.tp):
                assign[Position(n, p, m)] = gpus[k]
                k += 1
    return Placement(new, assign)
