"""The first request a user sends to `ember serve`: started as `make serve` starts it (the demo
model, a private Ray on 127.0.0.1), one completion sent the moment `/health` first answers.

Two cases, each `--runs` times: a first start (a fresh cache directory: the demo model is
written and converted, the CPU attention kernel compiled) and a restart (the same cache and
state directories again). In one run, the same against this tree and against a baseline tree
(`--baseline-ref`, default the last commit before `ember serve` waited for its warm pool and
prepared the demo at deploy), each in its own overlay venv (`bench_update.overlay_python`).

    python benchmarks/bench_first_request.py [--runs 3] [--out benchmarks/results/first-request.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from bench_update import overlay_python
from machine import stamp
from serve_process import check_tree, free_port, stop, wait_health, worktree

ROOT = Path(__file__).resolve().parents[1]
BASELINE_REF = "a9b1b67"


def one_start(python: Path, tree: Path, work: Path) -> dict[str, float]:
    """Start `ember serve` from `tree` on `work`'s directories; seconds from the process start
    to the first 200 from /health, and of one completion sent then."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "EMBER_DRAM_DIR": str(work / "shm"), "EMBER_SSD_DIR": str(work / "ssd"),
    }  # fmt: skip
    check_tree(python, tree, env, work)
    log = open(work / "serve.log", "ab")  # noqa: SIM115  # closed below
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [str(python), "-m", "ember", "serve", "--port", str(port), "--state-dir",
         str(work / "state"), "--cache-dir", str(work / "cache")],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=work,
    )  # fmt: skip
    try:
        wait_health(base, proc, 180, work / "serve.log")
        t_health = time.monotonic()
        body = {"model": "ember-demo", "prompt": "hello", "max_tokens": 4, "temperature": 0.0}
        r = httpx.post(base + "/v1/completions", json=body, timeout=300)
        r.raise_for_status()
        t_first = time.monotonic()
    finally:
        stop(proc)
        log.close()
    return {"health_s": t_health - t0, "first_request_s": t_first - t_health}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--baseline-ref", default=BASELINE_REF, help="git ref of the baseline tree")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "first-request.json"))
    args = p.parse_args()
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    with tempfile.TemporaryDirectory(prefix="ember-bench-first-") as tmp:
        with worktree(ROOT, args.baseline_ref, Path(tmp) / "baseline-tree") as baseline:
            trees = {"baseline": baseline, "ember": ROOT}
            pythons = {n: overlay_python(t, Path(tmp) / f"venv-{n}") for n, t in trees.items()}
            for i in range(args.runs):  # the trees take turns, so a slow phase hits both
                for name, tree in trees.items():
                    work = Path(tmp) / f"{name}-{i}"
                    work.mkdir()
                    for case in ("first_start", "restart"):
                        row = one_start(pythons[name], tree, work)
                        results.setdefault(name, {}).setdefault(case, []).append(row)
                        print(f"{name} run {i} {case}: {json.dumps(row)}", flush=True)
                    shutil.rmtree(work / "shm", ignore_errors=True)
    summary: dict[str, Any] = {}
    for name, cases in results.items():
        for case, rows in cases.items():
            summary[f"{name}_{case}"] = {
                k: {"median": round(statistics.median(r[k] for r in rows), 3),
                    "min": round(min(r[k] for r in rows), 3),
                    "max": round(max(r[k] for r in rows), 3)}
                for k in ("health_s", "first_request_s")
            }  # fmt: skip
    for case in ("first_start", "restart"):
        b, e = summary[f"baseline_{case}"], summary[f"ember_{case}"]
        print(
            f"{case}: first request {e['first_request_s']['median']:.3f} s (baseline "
            f"{b['first_request_s']['median']:.3f} s); /health after {e['health_s']['median']:.2f}"
            f" s (baseline {b['health_s']['median']:.2f} s)"
        )
    doc = {
        **stamp("first_request"),
        "metric": "seconds of one completion sent the moment `ember serve` first answers /health",
        "baseline": f"the same with the tree at {args.baseline_ref}",
        "command": "python benchmarks/bench_first_request.py " + " ".join(sys.argv[1:]),
        "summary": summary,
        "runs": results,
        "baseline_ref": args.baseline_ref,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
