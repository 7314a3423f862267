"""A live move's cost with the request's K/V sent against recomputed, by context length.

For each mode of `migration_kv` (`--modes`, default never and always: recompute on the target,
or the source's K/V sent: pulled by the target from the source's node since edde917, through
the API server before), one `ember serve` (private Ray on 127.0.0.1)
with two instances of the 125m factory model (bf16 weights, run in `--dtype`). For each prompt
length (`--contexts`, token ids), the undisturbed greedy stream first (the reference text), then
`--runs` times the same stream with a preemption notice for the node once `--before` tokens
have arrived: the router moves it to another instance in rounds while it streams.

Recorded per move, from the server's log and the client's chunks: the target's catch-up time
(from the moment it holds a slot: the source's export and the K/V's way there, or the prefill
of the whole context, and the rounds), tokens whose K/V were sent, the pause at the switch
(the client's gap after the chunk the source stopped at), the longest gap from the notice on
(the target's prefill shares this machine's two cores with the source's decoding), the CPU time
the `ember serve` process (API server, router, controller) spent from the moment the stream began
until it ended, and whether the text equals the undisturbed one. This is one machine: the
notice drains both instances and the replacements start beside them, so notice-to-switch
includes a replacement's cold start.

    python benchmarks/bench_move.py [--dtype fp32|bf16] [--contexts 16 512 1536] [--runs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
from bench_resume import MODEL, ensure_model, move_medians, one_move, stream
from machine import stamp
from serve_process import free_port, instances, metric_lines, stop, wait_health, wait_ready

ROOT = Path(__file__).resolve().parents[1]
READY = re.compile(
    r"request (\S+) ready to move from \S+ to \S+ \((\d+) tokens held, (\d+) with their K/V; "
    r"(\d+) behind; caught up in ([\d.]+) s\)"
)


def one_mode(args: argparse.Namespace, mode: str, model: Path, work: Path) -> list[dict[str, Any]]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = work / f"ember-{mode}.yaml"
    config.write_text(f"api:\n  migration_kv: {mode}\n")
    env = {
        **os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "EMBER_DRAM_DIR": str(work / f"shm-{mode}"), "EMBER_SSD_DIR": str(work / f"ssd-{mode}"),
    }  # fmt: skip
    log_path = work / f"serve-{mode}.log"
    log = open(log_path, "ab")  # noqa: SIM115  # closed below
    server = subprocess.Popen(
        [sys.executable, "-m", "ember", "serve", "--port", str(port), "--num-cpus", "4",
         "--config", str(config), "--no-demo",
         "--state-dir", str(work / f"state-{mode}"), "--cache-dir", str(work / "cache")],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=work,
    )  # fmt: skip
    rows: list[dict[str, Any]] = []
    api = psutil.Process(server.pid)  # the API server (router, controller) of `ember serve`
    try:
        wait_health(base, server, 180, log_path)
        spec = {
            "name": "m", "source": str(model), "min_instances": 2, "max_instances": 2,
            "dtype": args.dtype,
        }  # fmt: skip
        httpx.post(base + "/admin/deployments", json=spec, timeout=60).raise_for_status()
        wait_ready(base, 2)
        rng = random.Random(0)
        for context in args.contexts:
            prompt = [rng.randrange(100, 30000) for _ in range(context)]
            max_tokens = args.before + args.after
            _, _, ref = stream(base, prompt, max_tokens)
            for run in range(args.runs):
                wait_ready(base, 2)
                cpu0 = api.cpu_times()
                before_ids = {i["instance_id"] for i in instances(base, "m")}
                try:
                    move = one_move(base, prompt, args.before, max_tokens, log_path, ref)
                except RuntimeError as e:  # the stream ended before the move was ready
                    print(f"{mode:6s} prompt {context:5d} run {run}: {e}", flush=True)
                    rows.append({"mode": mode, "prompt_tokens": context, "run": run,
                                 "moved": False})  # fmt: skip
                    continue
                api_cpu_s = _cpu_s(api.cpu_times()) - _cpu_s(cpu0)
                ready = READY.findall(log_path.read_text(errors="replace"))
                pulls = _pulls(base, before_ids)
                held, kv, behind, caught = ready[-1][1:]
                move |= {
                    "mode": mode, "prompt_tokens": context, "run": run, "moved": True,
                    "held_tokens": int(held), "kv_tokens": int(kv), "behind_tokens": int(behind),
                    "catch_up_s": float(caught),
                    "api_cpu_s": api_cpu_s,
                    # the K/V pulls the move's target counted (None: the tree has no such
                    # count; the K/V went through the API server then), and failed pulls
                    "target_kv_pulls": pulls[0],
                    "target_kv_pull_failures": pulls[1],
                }  # fmt: skip
                rows.append(move)
                print(
                    f"{mode:6s} prompt {context:5d} run {run}: catch-up {move['catch_up_s']:.3f} s "
                    f"({move['kv_tokens']} K/V tokens sent), switch gap "
                    f"{move['switch_gap_s'] or 0:.3f} s, longest gap after the notice "
                    f"{move['longest_gap_after_notice_s'] or 0:.3f} s, notice to switch "
                    f"{move['notice_to_switch_s']:.3f} s; API process CPU {move['api_cpu_s']:.3f} s; "
                    f"target's K/V pulls {move['target_kv_pulls']}; "
                    f"identical {move['identical_text']}",
                    flush=True,
                )
        print(metric_lines(base, "ember_requests_migrated", "ember_migration_kv_tokens"))
    finally:
        stop(server)
        log.close()
        shutil.rmtree(work / f"shm-{mode}", ignore_errors=True)
    return rows


def _pulls(base: str, before_ids: set[str]) -> tuple[int | None, int | None]:
    """The K/V pulls (and failed ones) of the instances started since `before_ids` were listed
    (the move's target), read once the controller's health probe (every 5 s) has seen them."""
    time.sleep(6.0)
    engines = [i.get("engine") for i in instances(base, "m") if i["instance_id"] not in before_ids]
    seen = [e for e in engines if e is not None]
    if not seen or all("kv_pulls" not in e for e in seen):
        return None, None
    return sum(e.get("kv_pulls", 0) for e in seen), sum(e.get("kv_pull_failures", 0) for e in seen)


def _cpu_s(times: Any) -> float:
    return float(times.user + times.system)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", nargs="+", default=["never", "always"])
    p.add_argument("--contexts", type=int, nargs="+", default=[16, 512, 1536])
    p.add_argument("--before", type=int, default=64, help="tokens streamed before the notice")
    p.add_argument("--after", type=int, default=1000, help="tokens to generate after it")
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--model", type=Path, default=MODEL)
    p.add_argument("--dtype", default="fp32", help="the deployment's dtype")
    p.add_argument("--out", default=None, help="default: benchmarks/results/move-DTYPE.json")
    args = p.parse_args()
    model = ensure_model(args.model)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ember-bench-move-") as tmp:
        for mode in args.modes:
            rows += one_mode(args, mode, model, Path(tmp))
    summary = []
    for mode in args.modes:
        for context in args.contexts:
            every = [r for r in rows if r["mode"] == mode and r["prompt_tokens"] == context]
            mine = [r for r in every if r["moved"]]
            if not mine:
                summary.append({"mode": mode, "prompt_tokens": context, "moved": 0})
                continue
            summary.append(
                {
                    "mode": mode,
                    "prompt_tokens": context,
                    "moved": f"{len(mine)} of {len(every)}",
                    "held_tokens_median": statistics.median(r["held_tokens"] for r in mine),
                    "kv_tokens_median": statistics.median(r["kv_tokens"] for r in mine),
                    "catch_up_s_median": statistics.median(r["catch_up_s"] for r in mine),
                    "api_cpu_s_median": statistics.median(r["api_cpu_s"] for r in mine),
                    **move_medians(mine),
                }
            )
    result = {
        **stamp("move"),
        "settings": {
            "model": f"llama 125m factory model (bf16 weights), run in {args.dtype}",
            "instances": 2,
            "greedy": True,
            "before": args.before,
            "after": args.after,
            "runs": args.runs,
            "notice": "a preemption notice for the node once `before` tokens arrived",
            "modes": args.modes,
        },
        "runs": rows,
        "summary": summary,
    }
    out = args.out or str(ROOT / "benchmarks" / "results" / f"move-{args.dtype}.json")
    Path(out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
