"""Cost of ember's policy code: optimizer, device mapper and migration planner at 8, 64, 512 GPUs.

Scenario per size N (hosts of 4 GPUs, like SpotServe's g4dn.12xlarge, GPT-6.7B shape on the T4
profile, 1.5 req/s): choose a configuration for N GPUs and place it; then one host is preempted:
choose a configuration for N - 4 GPUs, map the survivors onto it (two-level Kuhn–Munkres,
keeping KV of the most-progressed replicas) and plan the transfers (`preempt` rows; the
optimizer usually keeps the shape and drops a replica, so little moves). `reshape` rows time the
heavy path: the same loss, but the new configuration halves TP and doubles PP, so most weights
and all inherited KV caches move.
Serverless placement (ServerlessLLM start-up estimator with live migration, ember's risk and
price terms) is timed per decision on fleets of 8-GPU servers holding 64 models, against
locality-only placement (no migration) as the baseline.
Baseline in the same run: plain in-order placement (the no-device-mapper ablation) for the
mapper, whose kept bytes show what the matching buys. The optimizer (ember's preset is the
published ranking) is also timed with every opt-in knob on (headroom, near-ties, queue-aware).
Times are medians of repeated runs (warm-up excluded).

    python benchmarks/bench_policy.py [--quick] [--out benchmarks/results/policy.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from machine import git_sha, machine_facts

from ember.policy import (
    Gpu,
    LatencyProfile,
    MappingStrategy,
    ModelShape,
    ModelSpec,
    OptimizerConfig,
    ParallelConfig,
    Placement,
    PlacementConfig,
    RunningInstance,
    ServerState,
    Tier,
    choose_config,
    map_devices,
    place,
    place_locality,
    plan_migration,
)

ROOT = Path(__file__).resolve().parents[1]
PROFILE = Path("/work/shared/profiles/spotserve/T4-4x/megatron_6.7B_profile.json")
SIZES = (8, 64, 512)
GPUS_PER_HOST = 4
RATE_RPS = 1.5


def machine() -> dict[str, Any]:
    return {**machine_facts(), "git_sha": git_sha()}


def _place_all(servers: list[ServerState], models: list[ModelSpec], cfg: Any) -> object:
    return [place(servers, m, cfg) for m in models]


def _place_all_locality(servers: list[ServerState], models: list[ModelSpec]) -> object:
    return [place_locality(servers, m) for m in models]


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    result = fn()  # warm-up, excluded
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def run_size(profile: LatencyProfile, n: int, repeats: int) -> list[dict[str, Any]]:
    shape = ModelShape.gpt(profile.layer_num, profile.hidden_size or 4096)
    gpus = [
        Gpu(f"h{h:04d}g{i}", f"h{h:04d}")
        for h in range(n // GPUS_PER_HOST)
        for i in range(GPUS_PER_HOST)
    ]
    ember_opt = OptimizerConfig.ember(min_gpus=4)
    knobs = OptimizerConfig(min_gpus=4, rate_headroom=0.25, tie_tolerance=0.02, queue_aware=True)
    before = choose_config(profile, n, RATE_RPS, ember_opt)
    assert before is not None
    old = map_devices(before.config, gpus, shape).placement
    survivors = gpus[GPUS_PER_HOST:]
    t_opt, after = timed(
        lambda: choose_config(profile, len(survivors), RATE_RPS, ember_opt), repeats
    )
    t_opt_base, _ = timed(lambda: choose_config(profile, len(survivors), RATE_RPS, knobs), repeats)
    assert after is not None
    rows = []
    b = before.config
    reshaped = ParallelConfig(len(survivors) // (b.tp * b.pp), max(1, b.tp // 2), b.pp * 2, b.batch)
    for scenario, new_cfg in (("preempt", after.config), ("reshape", reshaped)):  # type: ignore[attr-defined]
        row = _map_and_plan(profile, shape, gpus, survivors, old, before.config, new_cfg, repeats)
        rows.append(
            {
                "gpus": n,
                "scenario": scenario,
                "config_before": [b.dp, b.tp, b.pp, b.batch],
                "config_after": [new_cfg.dp, new_cfg.tp, new_cfg.pp, new_cfg.batch],
                "optimizer_ms": t_opt * 1e3,
                "optimizer_all_knobs_ms": t_opt_base * 1e3,
                **row,
            }
        )
    return rows


def _map_and_plan(
    profile: LatencyProfile,
    shape: ModelShape,
    gpus: list[Gpu],
    survivors: list[Gpu],
    old: Placement,
    old_cfg: ParallelConfig,
    new_cfg: ParallelConfig,
    repeats: int,
) -> dict[str, Any]:
    kv_layer = 4 * 640 * ModelShape.kv_bytes_per_token_layer(profile.hidden_size or 4096)
    kv_bytes = {r: kv_layer for r in range(old_cfg.dp)}
    kv_stay = {d: d + 1 for d in range(min(new_cfg.dp, old_cfg.dp - 1))}
    kw: dict[str, Any] = {"old": old, "kv_stay": kv_stay, "kv_layer_bytes": kv_bytes}
    t_map, mapped = timed(lambda: map_devices(new_cfg, survivors, shape, **kw), repeats)
    t_plain, plain = timed(
        lambda: map_devices(new_cfg, survivors, shape, strategy=MappingStrategy.PLAIN, **kw),
        repeats,
    )
    hosts = {g.gpu_id: g.host_id for g in gpus}
    dying = [g.gpu_id for g in gpus[:GPUS_PER_HOST]]
    new_placement = mapped.placement  # type: ignore[attr-defined]
    t_plan, plan = timed(
        lambda: plan_migration(
            old, new_placement, shape, hosts, dying=dying, kv_stay=kv_stay,
            kv_layer_bytes=kv_bytes, memory_limit_bytes=16 * 2**30,
        ),
        max(1, repeats // 2),
    )  # fmt: skip
    return {
        "mapper_ms": t_map * 1e3,
        "mapper_plain_ms": t_plain * 1e3,
        "kept_gib": mapped.kept_bytes / 2**30,  # type: ignore[attr-defined]
        "kept_plain_gib": plain.kept_bytes / 2**30,  # type: ignore[attr-defined]
        "planner_ms": t_plan * 1e3,
        "transfers": len(plan.transfers),  # type: ignore[attr-defined]
        "migration_estimate_s": plan.estimated_s,  # type: ignore[attr-defined]
    }


def placement_rows(repeats: int) -> list[dict[str, Any]]:
    rng = random.Random(0)
    bw = {Tier.DRAM: 10e9, Tier.SSD: 2e9, Tier.PEER: 1.25e9, Tier.REMOTE: 0.1e9}
    models = [ModelSpec(f"m{i:02d}", 14 * 10**9, rng.choice([1, 1, 2])) for i in range(64)]
    rows = []
    cfg = PlacementConfig.ember()
    for n_gpus in (*SIZES, 10_000):
        servers = []
        for s in range(max(1, n_gpus // 8)):
            tiers = {m.model_id: rng.choice([Tier.DRAM, Tier.SSD]) for m in rng.sample(models, 3)}
            insts = tuple(
                RunningInstance(f"s{s}i{k}", m, (rng.randint(100, 2000),))
                for k, m in enumerate(rng.sample(models, rng.randint(0, 6)))
            )
            used = sum(i.model.gpus for i in insts)
            servers.append(
                ServerState(f"s{s:05d}", max(0, 8 - used), tiers, bw, instances=insts,
                            preemption_risk=rng.random() * 0.2, price_per_gpu_hour=0.9)
            )  # fmt: skip
        picks = models[:16]
        t_place, _ = timed(functools.partial(_place_all, servers, picks, cfg), repeats)
        t_loc, _ = timed(functools.partial(_place_all_locality, servers, picks), repeats)
        rows.append(
            {
                "gpus": n_gpus,
                "servers": len(servers),
                "place_ms": t_place * 1e3 / len(picks),
                "locality_ms": t_loc * 1e3 / len(picks),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--profile", type=Path, default=PROFILE)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "policy.json")
    args = ap.parse_args(argv)
    profile = LatencyProfile.from_dict(json.loads(args.profile.read_text()))
    repeats = 3 if args.quick else 15
    rows = [r for n in SIZES for r in run_size(profile, n, repeats)]
    head = (
        f"{'GPUs':>5} {'scenario':>8} {'config after (D,M,P,B)':>23} {'optimizer ms':>13} {'knobs on':>10}"
        f" {'mapper ms':>10} {'plain':>7} {'kept GiB':>9} {'plain':>7} {'plan ms':>8} {'xfers':>6} {'est s':>6}"
    )
    print(head)
    for r in rows:
        print(
            f"{r['gpus']:>5} {r['scenario']:>8} {str(tuple(r['config_after'])):>23} {r['optimizer_ms']:>13.2f}"
            f" {r['optimizer_all_knobs_ms']:>10.2f} {r['mapper_ms']:>10.2f} {r['mapper_plain_ms']:>7.2f}"
            f" {r['kept_gib']:>9.1f} {r['kept_plain_gib']:>7.1f} {r['planner_ms']:>8.1f}"
            f" {r['transfers']:>6} {r['migration_estimate_s']:>6.2f}"
        )
    placement = placement_rows(max(1, repeats // 3))
    print(f"\n{'GPUs':>6} {'servers':>8} {'place ms/decision':>18} {'locality-only ms':>17}")
    for r in placement:
        print(f"{r['gpus']:>6} {r['servers']:>8} {r['place_ms']:>18.2f} {r['locality_ms']:>17.2f}")
    big = next(r for r in rows if r["gpus"] == SIZES[-1] and r["scenario"] == "preempt")
    result = {
        "benchmark": "policy",
        "metric": f"optimizer + device mapper time at {big['gpus']} GPUs",
        "value": big["optimizer_ms"] + big["mapper_ms"],
        "unit": "ms",
        "baseline": big["optimizer_ms"] + big["mapper_plain_ms"],
        "baseline_name": "optimizer + plain in-order placement (no KM device mapper)",
        "ratio": (big["optimizer_ms"] + big["mapper_ms"])
        / max(1e-9, big["optimizer_ms"] + big["mapper_plain_ms"]),
        "rows": rows,
        "placement_rows": placement,
        "profile": profile.name,
        "rate_rps": RATE_RPS,
        "quick": args.quick,
        "machine": machine(),
        "note": "median of repeats, warm-up excluded; see machine.load_average_at_start",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
