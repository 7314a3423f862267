"""One reconfiguration end to end under each policy set: what each keeps, moves and reloads."""

from __future__ import annotations

import math

import pytest
from policy_fixtures import H6144_DICT

from ember.policy import (
    POLICY_NAMES,
    FleetView,
    Gpu,
    LatencyProfile,
    ModelShape,
    ParallelConfig,
    Reconfiguration,
    ResumeMode,
    RunningRequest,
    Shortcuts,
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
    assert first.estimate is not None and first.placement is not None
    assert first.estimate.config == ParallelConfig(3, 8, 2, 2, 2, 1)
    assert first.stop == () and sorted(first.build) == [0, 1, 2] and first.keep == {}
    return FleetView(first.placement, GPUS, HOSTS)


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
    assert r.estimate is not None and r.plan is not None and r.placement is not None
    assert r.estimate.config.dp == 2 and r.plan.within_memory and not r.held_shape
    assert set(r.placement.gpus()) <= {g.gpu_id for g in usable}
    kinds = _kinds(r)
    if name in ("ember", "spotserve"):
        # 32 GPUs at 0.35 req/s: batch 4 instead of 2 (2 x 2 / 12.1 s is short of the rate),
        # so every replica stops; the two most progressed (2, then 1) keep their KV on the two
        # built replicas; weights and KV move peer to peer and nothing is read from storage
        assert r.estimate.config == ParallelConfig(2, 8, 2, 4, 4, 1)
        assert r.stop == (0, 1, 2) and r.keep == {} and sorted(r.build) == [0, 1]
        assert dict(r.survival.kv_stay) == {0: 2, 1: 1}
        assert "load" not in kinds and kinds["kv"] > 0
        dropped = ResumeMode.RECOMPUTE if name == "ember" else ResumeMode.RESTART
        assert {r.survival.resume[f"r0{k}"] for k in range(2)} == {dropped}
        assert r.survival.resume["r20"] is ResumeMode.KEEP_KV
        assert r.grace is not None and r.grace.steps > 0
    elif name == "reparallelize":
        assert r.stop == (0, 1, 2) and r.keep == {}
        assert set(r.survival.resume.values()) == {ResumeMode.RESTART}
        assert set(kinds) == {"load"}
        assert kinds["load"] == pytest.approx(2 * SHAPE.weight_bytes, rel=1e-3)
    else:  # reroute, restart: replica 2 keeps running; one new replica loads from storage
        assert r.keep == {0: 2} and r.stop == (0, 1) and list(r.build) == [1]
        assert dict(r.survival.kv_stay) == {}
        assert "r20" not in r.survival.resume  # its replica keeps running: nothing to resume
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
    assert e.plan == s.plan and e.placement == s.placement  # same map and transfers here
    assert e.grace is not None and s.grace is not None
    assert e.grace.steps >= s.grace.steps  # the re-priced budget never gives fewer steps


def _grown(name: str, horizon_s: float) -> Reconfiguration:
    """48 more GPUs arrive at 0.35 req/s: the optimizer's lowest-latency shape for 96 GPUs is
    PP 4 (11.96 s) instead of the running PP 2 (12.12 s), 0.16 s faster per request."""
    more = tuple(Gpu(f"h{h:02d}g{i}", f"h{h:02d}") for h in range(12, 24) for i in range(4))
    hosts = {**HOSTS, **{g.gpu_id: g.host_id for g in more}}
    view = FleetView(_start(name).current, GPUS + more, hosts)
    return plan_reconfiguration(
        policy_set(name, min_gpus=12), PROFILE, SHAPE, view, REQS,
        arrival_rate_rps=0.35, now_s=0.0, horizon_s=horizon_s,
    )  # fmt: skip


def test_ember_keeps_its_shape_when_the_change_would_not_pay_before_the_next_one() -> None:
    # Held: 6 replicas of the running shape give 0.99 req/s >= 1.25 x 0.35. At 0.35 req/s they
    # run batches of one (12.47 s); the 3 PP-4 replicas would run batches of two (11.96 s):
    # 0.51 s saved per request. Pause of a full switch = 12.12 s drain + 0.5 s + 4 GPUs x
    # 2.5 GB / 6.25 GB/s = about 14.2 s: it pays after 14.2^2 / 2 / 0.51 = about 200 s, and
    # delays under 1% of the requests only if the next change is 1,420 s away.
    r = _grown("ember", horizon_s=1000.0)
    assert r.held_shape and r.config == ParallelConfig(6, 8, 2, 2, 2, 1)
    assert r.keep == {0: 0, 1: 1, 2: 2} and r.stop == () and sorted(r.build) == [3, 4, 5]
    assert r.survival.resume == {}  # nobody is interrupted


def test_ember_changes_shape_when_the_fleet_is_quiet_as_spotserve_always_does() -> None:
    for name, horizon in (("ember", math.inf), ("ember", 1500.0), ("spotserve", 150.0)):
        r = _grown(name, horizon_s=horizon)
        assert not r.held_shape and r.config == ParallelConfig(3, 8, 4, 2, 2, 1), name
        assert r.stop == (0, 1, 2) and r.keep == {}, name


def test_unchanged_fleet_changes_nothing() -> None:
    for name in POLICY_NAMES:
        start = _start(name)
        r = plan_reconfiguration(
            policy_set(name, min_gpus=12), PROFILE, SHAPE, start, REQS,
            arrival_rate_rps=0.35, now_s=0.0,
        )  # fmt: skip
        assert not r.changes and r.keep == {0: 0, 1: 1, 2: 2} and r.plan is None, name


def test_huge_fleet_shortcuts_give_the_same_replicas_and_a_per_host_transfer_bound() -> None:
    dying = tuple(g.gpu_id for g in GPUS if g.host_id in ("h02", "h03", "h04", "h05"))
    usable = tuple(g for g in GPUS if g.gpu_id not in dying)
    view = FleetView(_start("ember").current, usable, HOSTS, dying=dying)
    kw = {"arrival_rate_rps": 0.35, "now_s": 0.0}
    exact = plan_reconfiguration(policy_set("ember", min_gpus=12), PROFILE, SHAPE, view, REQS, **kw)  # type: ignore[arg-type]
    fast = plan_reconfiguration(
        policy_set("ember", min_gpus=12), PROFILE, SHAPE, view, REQS, **kw,  # type: ignore[arg-type]
        shortcuts=Shortcuts(exact_mapping_cells=1, trim_senders=True),
    )  # fmt: skip
    assert (fast.config, fast.stop, fast.keep, fast.survival) == (
        exact.config, exact.stop, exact.keep, exact.survival
    )  # fmt: skip
    assert fast.plan is None and exact.plan is not None
    # plain order: 32 GPUs on 8 hosts, each host receives 4 positions of 20B/16 over 50 Gbps
    per_host = 4 * SHAPE.weight_bytes / 16
    assert fast.transfer_s == pytest.approx(0.5 + per_host / (50e9 / 8), rel=1e-2)
