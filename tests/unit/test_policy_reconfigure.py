"""One reconfiguration end to end under each policy set: what each keeps, moves and reloads."""

from __future__ import annotations

import pytest
from policy_fixtures import H6144_DICT

from ember.policy import (
    POLICY_NAMES,
    FleetView,
    Gpu,
    LatencyProfile,
    ModelShape,
    ParallelConfig,
    ResumeMode,
    RunningRequest,
    TransferKind,
    plan_reconfiguration,
    policy_set,
)

PROFILE = LatencyProfile.from_dict(H6144_DICT)
SHAPE = ModelShape.gpt(44, 6144)
GPUS = tuple(Gpu(f"h{h:02d}g{i}", f"h{h:02d}") for h in range(12) for i in range(4))
HOSTS = {g.gpu_id: g.host_id for g in GPUS}
# replica d runs two requests that are 10 + 40 d (+ k) tokens into their 128-token answers
REQS = [
    RunningRequest(f"r{d}{k}", d, 512, 10 + 40 * d + k, 128) for d in range(3) for k in range(2)
]


def _start(name: str) -> FleetView:
    first = plan_reconfiguration(
        policy_set(name, min_gpus=12), PROFILE, SHAPE, FleetView(None, GPUS, HOSTS), [],
        arrival_rate_rps=0.35, now_s=0.0,
    )  # fmt: skip
    assert first.estimate is not None and first.mapping is not None
    assert first.estimate.config == ParallelConfig(3, 8, 2, 2, 2, 1)
    return FleetView(first.mapping.placement, GPUS, HOSTS)


def _kinds(r: object) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in r.plan.transfers:  # type: ignore[attr-defined]
        out[t.kind.value] = out.get(t.kind.value, 0) + t.nbytes
    return out


def test_first_start_fills_hosts_in_order() -> None:
    view = _start("ember")
    assert view.current is not None
    replica_hosts = {
        d: sorted({HOSTS[g] for p, g in view.current.assignment.items() if p.replica == d})
        for d in range(3)
    }
    assert replica_hosts == {0: ["h00", "h01", "h02", "h03"], 1: ["h04", "h05", "h06", "h07"],
                             2: ["h08", "h09", "h10", "h11"]}  # fmt: skip


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_half_a_replica_lost_under_notice(name: str) -> None:
    """Hosts h02-h05 get a notice: replicas 0 and 1 each lose half their GPUs."""
    start = _start(name)
    dying = tuple(g.gpu_id for g in GPUS if g.host_id in ("h02", "h03", "h04", "h05"))
    usable = tuple(g for g in GPUS if g.gpu_id not in dying)
    view = FleetView(start.current, usable, HOSTS, dying=dying)
    r = plan_reconfiguration(
        policy_set(name, min_gpus=12), PROFILE, SHAPE, view, REQS,
        arrival_rate_rps=0.35, now_s=0.0, deadline_s=30.0, memory_limit_bytes=15 * 2**30,
    )  # fmt: skip
    assert r.estimate is not None and r.plan is not None and r.mapping is not None
    assert r.estimate.config.dp == 2 and not r.memory_fallback
    assert set(r.mapping.placement.gpus()) <= {g.gpu_id for g in usable}
    kinds = _kinds(r)
    if name in ("ember", "spotserve"):
        # replica 2 stays, the most progressed other replica (1) keeps its KV; weights and KV
        # move peer to peer and nothing is read from storage
        assert dict(r.survival.kv_stay) == {0: 2, 1: 1}
        assert "load" not in kinds and kinds["kv"] > 0
        dropped = ResumeMode.RECOMPUTE if name == "ember" else ResumeMode.RESTART
        assert {r.survival.resume[f"r0{k}"] for k in range(2)} == {dropped}
        assert r.grace is not None and r.grace.steps > 0
    elif name == "reparallelize":
        assert set(r.survival.resume.values()) == {ResumeMode.RESTART}
        assert set(kinds) == {"load"}
        assert kinds["load"] == pytest.approx(2 * SHAPE.weight_bytes, rel=1e-3)
    else:  # reroute, restart: replica 2 keeps running; the new replica loads from storage
        assert dict(r.survival.kv_stay) == {0: 2}
        assert r.survival.resume["r20"] is ResumeMode.KEEP_KV
        assert r.survival.resume["r10"] is ResumeMode.RESTART
        assert set(kinds) == {"load"}
        assert kinds["load"] == pytest.approx(SHAPE.weight_bytes, rel=1e-3)
        assert (r.grace is None) == (name == "restart")
    assert all(t.kind is not TransferKind.LOAD or t.src is None for t in r.plan.transfers)


def test_ember_and_spotserve_differ_only_where_ember_adds() -> None:
    dying = tuple(g.gpu_id for g in GPUS if g.host_id in ("h02", "h03", "h04", "h05"))
    usable = tuple(g for g in GPUS if g.gpu_id not in dying)
    out = {}
    for name in ("ember", "spotserve"):
        view = FleetView(_start(name).current, usable, HOSTS, dying=dying)
        out[name] = plan_reconfiguration(
            policy_set(name, min_gpus=12), PROFILE, SHAPE, view, REQS,
            arrival_rate_rps=0.35, now_s=25.0, deadline_s=30.0,
        )  # fmt: skip
    e, s = out["ember"], out["spotserve"]
    assert e.plan == s.plan and e.mapping == s.mapping  # same map and transfers here
    assert e.grace is not None and s.grace is not None
    assert e.grace.steps >= s.grace.steps  # the re-priced budget never gives fewer steps
