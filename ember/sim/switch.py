"""The simulator's side of a fleet change: its parameters, the call into the policy, and when a
stopping replica's batch stops.

What changes (configuration, kept / stopped / built replicas, device map, survivors, transfers)
is decided by `ember.policy.plan_reconfiguration`, the same call the controller makes; this
module only gathers its inputs from the simulated fleet and prices the grace period for the
simulator's static batches. The huge-fleet fast paths of that call (`Shortcuts`) are switched
on from `SimParams.exact_mapping_limit` and `SimParams.trim_senders`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ember.policy import (
    FleetView,
    LinkBandwidth,
    ParallelConfig,
    PolicySet,
    Reconfiguration,
    RunningRequest,
    Shortcuts,
    arrange_grace,
    plan_reconfiguration,
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
    trim_senders: bool = True  # offer the migration planner a few untouched replicas, not all
    warm_start: bool = True  # the first configuration is loaded before t = 0


def plan_switch(
    ps: PolicySet,
    pf: ProfileFile,
    params: SimParams,
    view: FleetView,
    running: Sequence[RunningRequest],
    *,
    rate: float,
    now: float,
    fixed: ParallelConfig | None,
    horizon_s: float,
) -> Reconfiguration:
    """The policy's decision for this change (request ids are the simulator's request indices)."""
    return plan_reconfiguration(
        ps,
        pf.profile,
        pf.shape,
        view,
        running,
        arrival_rate_rps=rate,
        now_s=now,
        bandwidth=params.bandwidth,
        memory_limit_bytes=params.gpu_memory_bytes,
        fixed_config=fixed,
        horizon_s=horizon_s,
        engine_start_s=params.engine_start_s,
        shortcuts=Shortcuts(params.exact_mapping_limit, params.trim_senders),
    )


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
