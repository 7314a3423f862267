"""Simulator benchmark: SpotServe's reproduction and a 10,000-GPU, 1M-request scale run.

`ember bench sim` (or `python benchmarks/bench_sim.py`) runs both parts:

- **repro**: SpotServe's 20B experiment (segments A_S = trace_0304_real, B_S = trace_0506_real,
  the GPT-20B T4 profile `T4-4x/megatron_h6144_profile.json` that the artifact's
  `aws_run_scheduler.sh` passes, 0.35 req/s from `query_tpt0.35_cv6.txt`, 512-token prompts,
  128-token outputs, 30 s grace, batch <= 4) under all five policies; P99 ratios next to the
  paper's. The baseline is the best of SpotServe's two baselines (reroute, reparallelize),
  measured in the same run. Two more rows: the optimizer aiming at 0.4 req/s (what the artifact's
  script passes as REQUIRED_TPT), and a storage-bandwidth sensitivity row with the weights read
  at 0.25 GB/s instead of the default 2 GB/s (an assumption, not a measured value: the
  artifact's checkpoints sit under /home, i.e. on the instance's EBS root volume).
  Results: benchmarks/results/sim_spotserve_A_S.json, sim_spotserve_B_S.json (+ PNGs).
- **scale**: SpotServe's full 10.6 h g4dn trace, 105 copies of its fleet (up to 10,080 T4
  GPUs), 5x faster, one GPT-6.7B deployment (T4-4x profile), one million requests (Poisson
  arrivals, 512-token prompts, 128-token outputs; a fraction of the fleet's capacity) under the
  `ember` policy; the baseline is the same run under the `restart` policy (no policy calls on
  notices). Reports events/s. Result: benchmarks/results/sim_scale.json.

`--quick`: 1/10 of the scale run and A_S only, for a smoke test.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

from machine import git_sha, machine_facts

from ember.policy import LinkBandwidth
from ember.sim.profile_file import read_profile
from ember.sim.runner import compare, format_table, record
from ember.sim.spot_trace import read_spot_trace
from ember.sim.switch import SimParams
from ember.sim.workload import Workload, read_workload

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHARED = Path("/work/shared")
SPOT = SHARED / "traces/spot/spotserve"
PROFILES = SHARED / "profiles/spotserve"
POLICIES = ("ember", "spotserve", "reroute", "reparallelize", "restart")

# SpotServe artifact, scripts_ae/tradeoff_plot.py, GPT-20B (shared/references/spotserve.md §3).
PAPER = {
    "A_S": {"spotserve": 46.1, "reroute": 51.0, "reparallelize": 61.3},
    "B_S": {"spotserve": 37.1, "reroute": 99.1, "reparallelize": 56.3},
}
SEGMENTS = {"A_S": "trace_0304_real.txt", "B_S": "trace_0506_real.txt"}


def machine() -> dict[str, Any]:
    return {**machine_facts(), "git_sha": git_sha()}


def repro(segment: str, plots: bool) -> dict[str, Any]:
    trace = read_spot_trace(SPOT / "trace_seg" / SEGMENTS[segment])
    wl = read_workload(
        SPOT / "query/query_tpt0.35_cv6.txt",
        prompt_tokens=512,
        output_tokens=128,
        horizon_s=trace.end_s,
    )
    prof = read_profile(PROFILES / "T4-4x/megatron_h6144_profile.json", gpus_per_node=4)
    rows: dict[str, Any] = {}
    for label, params in (
        ("default", SimParams(grace_period_s=30.0)),
        # The artifact's script gives its optimizer REQUIRED_TPT=0.4 while replaying 0.35 req/s.
        ("artifact_required_tpt_0.4", SimParams(required_rate_rps=0.4)),
        ("storage_0.25GBps", SimParams(bandwidth=LinkBandwidth(storage_Bps=0.25e9))),
    ):
        res = compare(trace, wl, prof, params, POLICIES)
        print(f"\n== SpotServe 20B reproduction, {segment} ({SEGMENTS[segment]}), {label}")
        print(format_table(res))
        best_base = min(res["reroute"].p99_s, res["reparallelize"].p99_s)
        paper_best = min(PAPER[segment]["reroute"], PAPER[segment]["reparallelize"])
        rows[label] = {
            "record": record(res, trace, wl, prof, params, seed=0),
            "p99_ratio_best_baseline_over_ember": best_base / res["ember"].p99_s,
            "p99_ratio_best_baseline_over_spotserve": best_base / res["spotserve"].p99_s,
            "p99_ratio_paper_best_baseline_over_spotserve": paper_best
            / PAPER[segment]["spotserve"],
            "paper_p99_s": PAPER[segment],
            "checks": {
                "ember_p99_below_both_baselines": res["ember"].p99_s
                < min(res["reroute"].p99_s, res["reparallelize"].p99_s),
                "ember_p99_no_worse_than_spotserve": res["ember"].p99_s
                <= res["spotserve"].p99_s + 1e-9,
                "ember_cost_no_higher_than_spotserve": res["ember"].cost_usd
                <= res["spotserve"].cost_usd + 1e-9,
            },
        }
        r = rows[label]
        print(
            f"P99 best baseline / ember = {r['p99_ratio_best_baseline_over_ember']:.2f}x, "
            f"/ spotserve = {r['p99_ratio_best_baseline_over_spotserve']:.2f}x "
            f"(artifact: {r['p99_ratio_paper_best_baseline_over_spotserve']:.2f}x; paper: 2.4-9.1x "
            f"across models and traces); checks {r['checks']}"
        )
        if plots and label == "default":
            from ember.sim.plots import write_plots

            out = RESULTS / f"sim_spotserve_{segment}_png"
            write_plots(res, out, title=f"(SpotServe 20B, {segment})")
    d = rows["default"]
    return {
        "benchmark": "sim_spotserve",
        "segment": segment,
        "metric": f"P99 latency, ember, SpotServe 20B on {segment}",
        "value": d["record"]["policies"]["ember"]["p99_s"],
        "unit": "s",
        "baseline": min(
            d["record"]["policies"]["reroute"]["p99_s"],
            d["record"]["policies"]["reparallelize"]["p99_s"],
        ),
        "baseline_name": "best of SpotServe's baselines (reroute, reparallelize), same run",
        "ratio": d["p99_ratio_best_baseline_over_ember"],
        "runs": rows,
        "machine": machine(),
        "command": f"python benchmarks/bench_sim.py --part repro --segment {segment}",
    }


def scale_workload(n: int, rate_rps: float, seed: int, start_s: float = 0.0) -> Workload:
    """Poisson arrivals from `start_s`, SpotServe's 512-token prompts and 128-token outputs."""
    rng = random.Random(seed)
    t, arrivals = start_s, []
    for _ in range(n):
        t += rng.expovariate(rate_rps)
        arrivals.append(t)
    return Workload(
        "poisson", "synthetic", tuple(arrivals), (512,) * n, (128,) * n, (0,) * n, ("model",)
    )


def scale(quick: bool) -> dict[str, Any]:
    copies, n = (11, 100_000) if quick else (105, 1_000_000)
    speedup = 5.0
    trace = read_spot_trace(SPOT / "trace_full/g4dn.csv").time_scaled(speedup).scaled(copies)
    prof = read_profile(PROFILES / "T4-4x/megatron_6.7B_profile.json", gpus_per_node=4)
    start = trace.events[0].t_s  # the trace opens with no node for its first minutes
    rate = n / ((trace.end_s - start) * 0.9)
    wl = scale_workload(n, rate, seed=0, start_s=start)
    params = SimParams(drain_s=1800.0)
    peak_gpus = trace.max_nodes() * trace.gpus_per_node
    print(
        f"\n== scale: {copies} copies of g4dn.csv at {speedup:g}x, up to {peak_gpus} GPUs, "
        f"{n} requests at {rate:.0f} req/s over {trace.end_s:.0f} s"
    )
    t0 = time.perf_counter()
    res = compare(trace, wl, prof, params, ("ember", "restart"))
    total = time.perf_counter() - t0
    print(format_table(res))
    e, b = res["ember"], res["restart"]
    for name, r in res.items():
        print(f"{name}: {r.events} events in {r.wall_s:.1f} s = {r.events_per_s:,.0f} events/s")
    rec = record(res, trace, wl, prof, params, seed=0)
    for p in rec["policies"].values():
        p["timeline"] = p["timeline"][:50]  # keep the committed JSON small
    return {
        "benchmark": "sim_scale",
        "metric": "simulator wall time, ember policy, 10,000-GPU fleet, 1M requests"
        if not quick
        else "simulator wall time (quick: 1/10 scale)",
        "value": e.wall_s,
        "unit": "s",
        "events": e.events,
        "events_per_s": e.events_per_s,
        "peak_gpus": peak_gpus,
        "requests": n,
        "baseline": b.wall_s,
        "baseline_name": "same run under the restart policy (no policy calls on notices)",
        "ratio": e.wall_s / b.wall_s if b.wall_s else None,
        "limit_s": 300.0,
        "under_limit": e.wall_s < 300.0,
        "total_wall_s_both_policies": total,
        "record": rec,
        "machine": machine(),
        "command": "python benchmarks/bench_sim.py --part scale" + (" --quick" if quick else ""),
        "note": "wall times depend on the machine's load: see machine.load_average_at_start",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("all", "repro", "scale"), default="all")
    ap.add_argument("--segment", choices=("A_S", "B_S", "both"), default="both")
    ap.add_argument("--quick", action="store_true", help="1/10 scale run and A_S only")
    ap.add_argument("--no-write", action="store_true", help="print only, write no result files")
    args = ap.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.part in ("all", "repro"):
        segs = (
            ["A_S"]
            if args.quick
            else (["A_S", "B_S"] if args.segment == "both" else [args.segment])
        )
        for seg in segs:
            out = repro(seg, plots=not args.no_write)
            if not args.no_write:
                path = RESULTS / f"sim_spotserve_{seg}.json"
                path.write_text(json.dumps(out, indent=1) + "\n")
                print(f"wrote {path}")
    if args.part in ("all", "scale"):
        out = scale(args.quick)
        if not args.no_write:
            path = RESULTS / ("sim_scale_quick.json" if args.quick else "sim_scale.json")
            path.write_text(json.dumps(out, indent=1) + "\n")
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
