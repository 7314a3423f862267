"""The simulator core on a scenario small enough to check by hand, every policy, determinism.

Scenario: two 1-GPU nodes `a` and `b`; a toy profile (2 layers, prefill 1000 ms and decode
100 ms per layer, no pipeline/embedding cost, fix factor 1) gives a 2 s prefill and 0.2 s
decode steps. Two requests of 512 + 400 tokens arrive at 60 s and 61 s, one per replica, each
needing 2 + 400 x 0.2 = 82 s. Node `b` is removed at 100 s, so its notice comes at 70 s.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ember.policy import POLICY_NAMES, policy_set
from ember.sim.core import Simulator
from ember.sim.profile_file import read_profile
from ember.sim.runner import compare, record
from ember.sim.spot_trace import read_spot_trace
from ember.sim.switch import SimParams
from ember.sim.workload import Workload, read_workload

PROFILE = {
    "name": "toy",
    "layer_num": 2,
    "hidden_size": 64,
    "final_fix_factor": 1.0,
    "pp_init_comm": 0.0,
    "pp_incr_comm": 0.0,
    "embed": [0.0],
    "tp-1": {"bsz-1": {"init": 1000.0, "incr": 100.0}},
}
TRACE = (
    '[0, "add", {"nodes": ["a", "b"]}]\n'
    '[100000, "remove", {"nodes": ["b"]}]\n'
    '[300000, "DONE", {"nodes": []}]\n'
)


@pytest.fixture()
def inputs(tmp_path: Path):  # type: ignore[no-untyped-def]
    (tmp_path / "p.json").write_text(json.dumps(PROFILE))
    (tmp_path / "t.txt").write_text(TRACE)
    trace = read_spot_trace(tmp_path / "t.txt", gpus_per_node=1)
    prof = read_profile(tmp_path / "p.json", gpus_per_node=1)
    wl = Workload("toy", "synthetic", (60.0, 61.0), (512, 512), (400, 400), (0, 0), ("m",))
    return trace, wl, prof


def run(inputs, name: str):  # type: ignore[no-untyped-def]
    trace, wl, prof = inputs
    sim = Simulator(policy_set(name, min_gpus=1), trace, wl, prof, SimParams(grace_period_s=30.0))
    return sim, sim.run()


def _dying_request(sim: Simulator) -> int:
    """The request whose latency is not the undisturbed 82 s."""
    lat = [f - a for f, a in zip(sim.reqs.finish, sim.reqs.arrival, strict=True)]
    (i,) = [k for k, x in enumerate(lat) if abs(x - 82.0) > 1e-6]
    return i


def test_preempted_request_resumes_with_its_tokens_under_ember(inputs) -> None:  # type: ignore[no-untyped-def]
    sim, res = run(inputs, "ember")
    assert (res.completed, res.lost) == (2, 0)
    i = _dying_request(sim)
    other = 1 - i
    t_start = sim.reqs.arrival[i]
    # Notice at 70 s, deadline 100 s, nothing to migrate: slot 30 s buys floor(30 / 0.22) - 1
    # = 135 more steps, so the batch stops at 70 + 135 x 0.2 = 97 s having decoded
    # (97 - t_start - 2) / 0.2 tokens, which ember keeps.
    kept = int((97.0 - t_start - 2.0) / 0.2 + 1e-9)
    resume_at = sim.reqs.arrival[other] + 82.0  # the survivor's own request ends first
    prefill = 2.0 * (512 + kept) / 512  # re-prefill of prompt + kept tokens
    expect = resume_at + prefill + (400 - kept) * 0.2
    assert sim.reqs.finish[i] == pytest.approx(expect)
    assert sim.reqs.recomputed[i] == 512 + kept
    assert sim.reqs.restarts[i] == 0
    assert sim.reqs.first_token[i] == pytest.approx(t_start + 2.0)
    assert res.gpu_hours == pytest.approx((100.0 + expect) / 3600.0)


def test_spotserve_restarts_the_request_it_cannot_keep_kv_for(inputs) -> None:  # type: ignore[no-untyped-def]
    sim, res = run(inputs, "spotserve")
    i = _dying_request(sim)
    other = 1 - i
    # D shrinks to 1 and the surviving replica is busy: no new replica inherits the KV cache,
    # so SpotServe restarts the request from its prompt after the survivor's request (82 s).
    expect = sim.reqs.arrival[other] + 82.0 + 82.0
    assert sim.reqs.finish[i] == pytest.approx(expect)
    assert (sim.reqs.restarts[i], sim.reqs.recomputed[i]) == (1, 0)
    assert res.restarted_requests == 1 and res.migrations == 0


@pytest.mark.parametrize("name", ["reroute", "restart"])
def test_baselines_lose_progress_at_the_kill(inputs, name: str) -> None:  # type: ignore[no-untyped-def]
    sim, res = run(inputs, name)
    i = _dying_request(sim)
    assert sim.reqs.finish[i] == pytest.approx(sim.reqs.arrival[1 - i] + 164.0)
    assert sim.reqs.restarts[i] == 1


def test_ember_beats_spotserve_on_the_hand_scenario(inputs) -> None:  # type: ignore[no-untyped-def]
    _, ember = run(inputs, "ember")
    _, spot = run(inputs, "spotserve")
    assert ember.p99_s < spot.p99_s
    assert ember.cost_usd <= spot.cost_usd


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_every_policy_completes_every_request(inputs, name: str) -> None:  # type: ignore[no-untyped-def]
    _, res = run(inputs, name)
    assert (res.policy, res.requests, res.completed, res.lost) == (name, 2, 2, 0)
    assert res.p50_s >= 82.0 - 1e-9
    assert res.timeline[0][3].startswith("D2 P1 M1 ")


def test_no_usable_gpu_loses_the_requests(tmp_path: Path, inputs) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "gone.txt").write_text(
        '[0, "add", {"nodes": ["a"]}]\n[10000, "remove", {"nodes": ["a"]}]\n[60000, "DONE", {"nodes": []}]\n'
    )
    trace = read_spot_trace(tmp_path / "gone.txt", gpus_per_node=1)
    _, wl, prof = inputs
    res = Simulator(policy_set("ember", min_gpus=1), trace, wl, prof, SimParams(drain_s=60.0)).run()
    assert (res.completed, res.lost) == (0, 2)


def test_same_seed_gives_the_same_record(tmp_path: Path, inputs) -> None:  # type: ignore[no-untyped-def]
    trace, _, prof = inputs
    (tmp_path / "rates.csv").write_text("0.02,0.05,0.03,0.01,0.04\n")

    def once(seed: int) -> str:
        wl = read_workload(
            tmp_path / "rates.csv", output_tokens=40, seed=seed, horizon_s=trace.end_s
        )
        res = compare(trace, wl, prof, SimParams(), POLICY_NAMES)
        rec = record(res, trace, wl, prof, SimParams(), seed)
        for p in rec["policies"].values():
            p.pop("wall_s")
            p.pop("events_per_s")
        return json.dumps(rec, sort_keys=True)

    first = once(7)
    assert once(7) == first
    assert once(8) != first


# --- serverless multi-model ----------------------------------------------------------------


def test_serverless_cold_start_then_dram_hit_after_keep_alive(tmp_path: Path, inputs) -> None:  # type: ignore[no-untyped-def]
    from ember.sim.serverless import SERVERLESS_POLICIES, ServerlessParams, ServerlessSimulator

    trace, _, prof = inputs
    # Two models; model "m" is called at 10 s and again at 200 s (after its 60 s keep-alive).
    wl = Workload(
        "toy",
        "synthetic",
        (10.0, 12.0, 200.0),
        (512, 512, 512),
        (10, 10, 10),
        (0, 1, 0),
        ("m", "n"),
    )
    params = ServerlessParams(keep_alive_s=60.0)
    size = prof.weight_bytes
    for name in SERVERLESS_POLICIES:
        sim = ServerlessSimulator(name, trace, wl, prof, params, seed=1)
        res = sim.run()
        assert (res.completed, res.lost) == (3, 0), name
        # Every node's SSD holds every checkpoint (2 copies over 2 nodes): first start reads
        # SSD at 2 GB/s, then 2 s prefill; the later start finds the checkpoint in host DRAM
        # (25 GB/s) wherever it was, unless it lands on the other node (SSD again).
        first = sim.reqs.first_token[0] - 10.0
        assert first == pytest.approx(size / 2e9 + 2.0), name
        again = sim.reqs.first_token[2] - 200.0
        assert again in (pytest.approx(size / 25e9 + 2.0), pytest.approx(size / 2e9 + 2.0)), name
        assert res.cold_starts == 3, name
    sim = ServerlessSimulator("locality", trace, wl, prof, params, seed=1)
    sim.run()
    assert sim.reqs.first_token[2] - 200.0 == pytest.approx(size / 25e9 + 2.0)


def _churn(tmp_path: Path, rng) -> tuple:  # type: ignore[no-untyped-def,type-arg]
    """A trace whose nodes come and go faster than the grace period (2 GPUs per node)."""
    lines, alive, serial, t = [], [], 0, 0
    for _ in range(30):
        t += rng.choice([5_000, 10_000, 20_000, 40_000])
        if alive and rng.random() < 0.45:
            gone = rng.sample(alive, rng.randint(1, len(alive)))
            alive = [n for n in alive if n not in gone]
            lines.append(json.dumps([t, "remove", {"nodes": gone}]))
        else:
            new = [f"n{serial + k}" for k in range(rng.randint(1, 3))]
            serial += len(new)
            alive += new
            lines.append(json.dumps([t, "add", {"nodes": new}]))
    lines.append(json.dumps([t + 60_000, "DONE", {"nodes": []}]))
    (tmp_path / "churn.txt").write_text("\n".join(lines) + "\n")
    return read_spot_trace(tmp_path / "churn.txt", gpus_per_node=2), t / 1000


def _check_requests(sim, res, n: int, name: str) -> None:  # type: ignore[no-untyped-def]
    r = sim.reqs
    assert res.completed + res.lost == n, name
    for i in range(n):
        if r.finish[i] == r.finish[i]:  # finished (not NaN): once, after arriving, all tokens
            assert r.finish[i] >= r.arrival[i] and r.gen[i] == r.output[i], name
        assert 0 <= r.gen[i] <= r.output[i], name


@pytest.mark.parametrize("seed", range(4))
def test_churning_fleet_keeps_request_invariants(tmp_path: Path, inputs, seed: int) -> None:  # type: ignore[no-untyped-def]
    import random as _random

    rng = _random.Random(seed)
    trace, end = _churn(tmp_path, rng)
    _, _, prof = inputs
    n = 60
    arrivals = tuple(sorted(rng.uniform(0, end) for _ in range(n)))
    outs = tuple(rng.randint(1, 60) for _ in range(n))
    wl = Workload("churn", "synthetic", arrivals, (256,) * n, outs, (0,) * n, ("m",))
    for name in POLICY_NAMES:
        sim = Simulator(policy_set(name, min_gpus=1), trace, wl, prof, SimParams(drain_s=600.0))
        _check_requests(sim, sim.run(), n, name)


@pytest.mark.parametrize("seed", range(3))
def test_serverless_churn_keeps_requests_and_gpu_accounting(
    tmp_path: Path, inputs, seed: int
) -> None:  # type: ignore[no-untyped-def]
    import random as _random

    from ember.sim.serverless import SERVERLESS_POLICIES, ServerlessParams, ServerlessSimulator

    rng = _random.Random(seed)
    trace, end = _churn(tmp_path, rng)
    _, _, prof = inputs
    n = 150
    arrivals = tuple(sorted(rng.uniform(0, end) for _ in range(n)))
    outs = tuple(rng.randint(1, 30) for _ in range(n))
    models = tuple(rng.randint(0, 7) for _ in range(n))
    wl = Workload("x", "s", arrivals, (128,) * n, outs, models, tuple(f"m{i}" for i in range(8)))
    for name in SERVERLESS_POLICIES:
        params = ServerlessParams(keep_alive_s=20.0, drain_s=600.0)
        sim = ServerlessSimulator(name, trace, wl, prof, params, seed)
        _check_requests(sim, sim.run(), n, name)
        for s in sim.servers.values():
            assert s.free == s.gpus - len(s.instances) * sim.gpus_per_instance, name
