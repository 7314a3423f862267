"""Run several policies on the same inputs and report them: a table, a JSON record, plots.

Every policy sees the same spot trace, the same workload (same seed, same arrivals) and the same
profile; only the `PolicySet` differs. The JSON record holds, per policy, the numbers of
`SimResult.to_dict()` plus the inputs and parameters that produced them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ember.errors import ConfigError
from ember.policy import POLICY_NAMES, policy_set
from ember.sim.core import Simulator
from ember.sim.metrics import SimResult
from ember.sim.profile_file import ProfileFile
from ember.sim.spot_trace import SpotTrace
from ember.sim.switch import SimParams

if TYPE_CHECKING:
    from ember.sim.serverless import ServerlessParams
from ember.sim.workload import Workload

logger = logging.getLogger(__name__)


def parse_policies(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in names if p not in POLICY_NAMES]
    if bad or not names:
        raise ConfigError(
            f"--policies: unknown {', '.join(bad) or '(empty)'}; known: {', '.join(POLICY_NAMES)}"
        )
    return list(dict.fromkeys(names))


def parse_serverless_policies(text: str) -> list[str]:
    from ember.sim.serverless import SERVERLESS_POLICIES

    names = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in names if p not in SERVERLESS_POLICIES]
    if bad or not names:
        raise ConfigError(
            f"--policies: {', '.join(bad) or '(empty)'} not a placement strategy for a multi-model"
            f" workload; known: {', '.join(SERVERLESS_POLICIES)}"
        )
    return list(dict.fromkeys(names))


def compare_serverless(
    trace: SpotTrace,
    workload: Workload,
    profile: ProfileFile,
    params: ServerlessParams,
    policies: Sequence[str],
    seed: int = 0,
) -> dict[str, SimResult]:
    """ServerlessLLM's placement comparisons on a multi-model workload (same inputs each)."""
    from ember.sim.serverless import ServerlessSimulator

    out: dict[str, SimResult] = {}
    for name in policies:
        out[name] = ServerlessSimulator(name, trace, workload, profile, params, seed).run()
        logger.info("sim serverless=%s p99_s=%.2f", name, out[name].p99_s)
    return out


def compare(
    trace: SpotTrace,
    workload: Workload,
    profile: ProfileFile,
    params: SimParams,
    policies: Sequence[str],
) -> dict[str, SimResult]:
    out: dict[str, SimResult] = {}
    for name in policies:
        ps = policy_set(name, min_gpus=profile.min_gpus, max_batch=params.max_batch)
        res = Simulator(ps, trace, workload, profile, params).run()
        logger.info(
            "sim policy=%s completed=%d lost=%d p99_s=%.2f events=%d wall_s=%.2f",
            name,
            res.completed,
            res.lost,
            res.p99_s,
            res.events,
            res.wall_s,
        )
        out[name] = res
    return out


def record(
    results: dict[str, SimResult],
    trace: SpotTrace,
    workload: Workload,
    profile: ProfileFile,
    params: SimParams | ServerlessParams,
    seed: int,
) -> dict[str, Any]:
    p = json.loads(json.dumps(asdict(params), default=str))
    return {
        "inputs": {
            "spot_trace": trace.path,
            "spot_trace_format": trace.fmt,
            "gpus_per_node": trace.gpus_per_node,
            "max_nodes": trace.max_nodes(),
            "trace_end_s": trace.end_s,
            "workload": workload.path,
            "workload_format": workload.fmt,
            "requests": len(workload),
            "mean_rate_rps": round(workload.mean_rate_rps(), 6),
            "profile": profile.path,
            "min_gpus": profile.min_gpus,
            "seed": seed,
        },
        "params": p,
        "policies": {name: r.to_dict() for name, r in results.items()},
    }


def write_json(path: str | Path, rec: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(rec, indent=1, sort_keys=False) + "\n")


_COLUMNS = (
    ("policy", "policy", "{}"),
    ("p50_s", "P50 s", "{:.1f}"),
    ("p90_s", "P90 s", "{:.1f}"),
    ("p99_s", "P99 s", "{:.1f}"),
    ("mean_s", "mean s", "{:.1f}"),
    ("ttft_p99_s", "TTFT99 s", "{:.1f}"),
    ("completed", "done", "{}"),
    ("lost", "lost", "{}"),
    ("slo_attainment", "SLO", "{:.3f}"),
    ("cost_usd", "cost $", "{:.2f}"),
    ("gpu_hours", "GPU-h", "{:.1f}"),
    ("cold_starts", "cold", "{}"),
    ("migrations", "migr", "{}"),
    ("restarted_requests", "restarted", "{}"),
    ("recomputed_tokens", "recomp tok", "{}"),
)


def format_table(results: dict[str, SimResult]) -> str:
    rows = [[h for _, h, _ in _COLUMNS]]
    for r in results.values():
        d = r.to_dict()
        rows.append([fmt.format(d[k]) for k, _, fmt in _COLUMNS])
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = [
        "  ".join(
            c.rjust(w) if i else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
