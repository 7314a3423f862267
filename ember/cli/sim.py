"""`ember sim`: replay a spot trace and a workload through several policies, fleet-scale.

Runs every named policy (ember, spotserve, reroute, reparallelize, restart) on the same inputs
with the discrete-event simulator (`ember.sim`), prints a table, and optionally writes a JSON
record (`--json`) and PNG plots (`--plots`: latency CDF, GPUs alive and in use over time).
A workload with several models (Azure Functions: one model per function) runs the serverless
simulator instead, comparing ServerlessLLM's placement strategies.
"""

from __future__ import annotations

import argparse
import math

from ember.errors import ConfigError

SPOT_DEFAULT = "ember,spotserve,reroute,reparallelize,restart"
SERVERLESS_DEFAULT = "ember,serverlessllm,locality,round_robin,random"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--spot-trace",
        required=True,
        metavar="FILE",
        help="spot availability trace (file or zone directory)",
    )
    parser.add_argument(
        "--workload", required=True, metavar="FILE", help="request arrivals or per-minute counts"
    )
    parser.add_argument(
        "--profile", required=True, metavar="FILE", help="per-layer latency profile JSON"
    )
    parser.add_argument(
        "--policies",
        default=SPOT_DEFAULT,
        help="comma-separated policies to compare (default: all five); for a multi-model"
        f" workload, placement strategies (default: {SERVERLESS_DEFAULT})",
    )
    parser.add_argument(
        "--grace-period-s", type=float, default=30.0, help="preemption notice, seconds (default 30)"
    )
    parser.add_argument(
        "--prompt-tokens",
        type=int,
        default=None,
        metavar="N",
        help="prompt length when the workload has none (default 512)",
    )
    parser.add_argument(
        "--output-tokens",
        type=int,
        default=None,
        metavar="N",
        help="output length when the workload has none (default 128)",
    )
    parser.add_argument(
        "--rate", type=float, default=None, metavar="R", help="rescale arrivals to R requests/s"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for generated arrivals (default 0)"
    )
    parser.add_argument(
        "--json", default=None, metavar="OUT.json", help="write the results as JSON"
    )
    parser.add_argument("--plots", default=None, metavar="DIR", help="write PNG plots into DIR")


def run(args: argparse.Namespace) -> int:
    from ember.policy import POLICY_NAMES
    from ember.sim.profile_file import read_profile
    from ember.sim.runner import (
        compare,
        compare_serverless,
        format_table,
        parse_policies,
        parse_serverless_policies,
        record,
        write_json,
    )
    from ember.sim.serverless import SERVERLESS_POLICIES, ServerlessParams
    from ember.sim.spot_trace import read_spot_trace
    from ember.sim.switch import SimParams
    from ember.sim.workload import read_workload

    if not (math.isfinite(args.grace_period_s) and args.grace_period_s >= 0):
        raise ConfigError(f"--grace-period-s must be >= 0, got {args.grace_period_s}")
    if args.rate is not None and not args.rate > 0:
        raise ConfigError(f"--rate must be > 0 requests/s, got {args.rate}")
    known = set(POLICY_NAMES) | set(SERVERLESS_POLICIES)
    unknown = [p for p in args.policies.split(",") if p.strip() and p.strip() not in known]
    if unknown:
        raise ConfigError(
            f"--policies: unknown {', '.join(unknown)}; known: {', '.join(POLICY_NAMES)}"
            f" (one model) or {', '.join(SERVERLESS_POLICIES)} (several models)"
        )
    trace = read_spot_trace(args.spot_trace)
    workload = read_workload(
        args.workload,
        prompt_tokens=args.prompt_tokens,
        output_tokens=args.output_tokens,
        rate_rps=args.rate,
        seed=args.seed,
        horizon_s=trace.end_s,
    )
    profile = read_profile(args.profile, gpus_per_node=trace.gpus_per_node)
    params: SimParams | ServerlessParams
    if len(workload.models) > 1:
        # Many models (functions) on one fleet: ServerlessLLM's placement comparisons.
        text = SERVERLESS_DEFAULT if args.policies == SPOT_DEFAULT else args.policies
        names = parse_serverless_policies(text)
        params = ServerlessParams(grace_period_s=args.grace_period_s)
        results = compare_serverless(trace, workload, profile, params, names, args.seed)
    else:
        params = SimParams(grace_period_s=args.grace_period_s)
        results = compare(trace, workload, profile, params, parse_policies(args.policies))
    print(
        f"spot trace {trace.path} ({trace.fmt}, up to {trace.max_nodes()} nodes x "
        f"{trace.gpus_per_node} GPUs, {trace.end_s:.0f} s); workload {workload.path} "
        f"({workload.fmt}, {len(workload)} requests, {workload.mean_rate_rps():.3f} req/s); "
        f"profile {profile.path} (W_min {profile.min_gpus} GPUs); grace {args.grace_period_s:g} s"
    )
    print(format_table(results))
    if args.json:
        write_json(args.json, record(results, trace, workload, profile, params, args.seed))
        print(f"wrote {args.json}")
    if args.plots:
        from ember.sim.plots import write_plots

        for p in write_plots(results, args.plots):
            print(f"wrote {p}")
    return 0
