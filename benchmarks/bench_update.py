"""What users see during an update: one client sends completions back to back to a deployment
served by `ember serve` while the deployment is updated (an engine change, `max_num_seqs`; then,
in a fresh server, a new version of the model in another folder), and we record every
request's latency and status from before the update until the new revision alone serves.

In one run, the same measurement against this tree and against a baseline tree (`--baseline-ref`,
default the last commit before rolling updates, when an update stopped the idle instance first
and started its replacement after): the longest request during the update is the time a
client waited for the model to come back.

    python benchmarks/bench_update.py [--model DIR] [--out benchmarks/results/update.json]
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
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from machine import stamp
from serve_process import check_tree, free_port, instances, stop, wait_health, worktree

ROOT = Path(__file__).resolve().parents[1]
BASELINE_REF = "a8af3d9"  # the commit before f6a95f5 (rolling updates)
DEFAULT_MODEL = Path.home() / ".cache" / "ember" / "bench-models" / "llama-125m"


def overlay_python(tree: Path, where: Path) -> Path:
    """A virtual environment at `where` whose `ember` is `tree`'s, with every other package
    from this interpreter's environment. (PYTHONPATH is not enough: the project's editable
    install puts its own finder ahead of it, in every process Ray starts too.)"""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    site = next(where.glob("lib/python*/site-packages"))
    deps = next(p for p in map(Path, sys.path) if p.name == "site-packages" and p.is_dir())
    (site / "00-ember-tree.pth").write_text(f"{tree}\n")
    (site / "01-deps.pth").write_text(f"{deps}\n")
    return where / "bin" / "python"


def run_tree(
    python: Path, tree: Path, model: Path, work: Path, settle_s: float, change: str
) -> dict[str, Any]:
    """Start `ember serve` from `tree` (with `python`, see `overlay_python`), deploy `model`
    with one instance, update it while a client sends requests, and return the timeline.
    change: "engine" (`max_num_seqs` 4 -> 8) or "source" (a new version of the model in
    another folder, which the new instance converts and loads: as a user deploys new
    weights)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "EMBER_DRAM_DIR": str(work / "shm"), "EMBER_SSD_DIR": str(work / "ssd"),
    }  # fmt: skip
    check_tree(python, tree, env, work)
    log = open(work / "serve.log", "wb")  # noqa: SIM115  # closed below
    proc = subprocess.Popen(
        [str(python), "-m", "ember", "serve", "--port", str(port), "--no-demo",
         "--state-dir", str(work / "state"), "--cache-dir", str(work / "cache")],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=work,
    )  # fmt: skip
    try:
        wait_health(base, proc, 180, work / "serve.log")
        spec = {"name": "m", "source": str(model), "min_instances": 1, "max_model_len": 512,
                "max_num_seqs": 4}  # fmt: skip
        httpx.post(base + "/admin/deployments", json=spec, timeout=60).raise_for_status()
        body = {"model": "m", "prompt": "The quick brown fox", "max_tokens": 8,
                "temperature": 0.0}  # fmt: skip
        while httpx.post(base + "/v1/completions", json=body, timeout=300).status_code != 200:
            time.sleep(0.5)  # the first instance is starting
        records: list[tuple[float, float, int]] = []  # (sent, seconds, status)
        halt = threading.Event()

        def client() -> None:
            with httpx.Client(timeout=300) as c:
                while not halt.is_set():
                    t0 = time.monotonic()
                    try:
                        status = c.post(base + "/v1/completions", json=body).status_code
                    except httpx.HTTPError:
                        status = 0
                    records.append((t0, time.monotonic() - t0, status))

        thread = threading.Thread(target=client, daemon=True)
        thread.start()
        time.sleep(settle_s)
        if change == "engine":
            new = {**spec, "max_num_seqs": 8}
        else:
            v2 = work / "model-v2"
            shutil.copytree(model, v2, copy_function=shutil.copy)  # new mtimes: new weights
            new = {**spec, "source": str(v2)}
        old_ids = {i["instance_id"] for i in instances(base)}
        t_update = time.monotonic()
        r = httpx.post(base + "/admin/deployments", json=new, timeout=60)
        r.raise_for_status()
        while time.monotonic() - t_update < 300:  # until a new instance alone serves
            live = [i for i in instances(base) if i["state"] not in ("failed", "stopped")]
            if [(i["state"], i["instance_id"] in old_ids) for i in live] == [("ready", False)]:
                break
            time.sleep(0.1)
        else:
            raise TimeoutError("the update did not finish in 300 s")
        t_done = time.monotonic()
        time.sleep(settle_s)
        halt.set()
        thread.join(300)
    finally:
        stop(proc)
        log.close()
        shutil.rmtree(work / "shm", ignore_errors=True)
    before = [s for t, s, _ in records if t + s < t_update]
    during = [(t, s, st) for t, s, st in records if t + s >= t_update and t <= t_done]
    return {
        "requests": len(records),
        "failed": sum(1 for *_, st in records if st != 200),
        "before_p50_s": statistics.median(before) if before else None,
        "during_requests": len(during),
        "during_failed": sum(1 for *_, st in during if st != 200),
        "during_max_s": max((s for _, s, _ in during), default=None),
        "during_p50_s": statistics.median([s for _, s, _ in during]) if during else None,
        "update_to_single_instance_s": t_done - t_update,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="a Hugging Face folder")
    p.add_argument("--baseline-ref", default=BASELINE_REF, help="git ref of the baseline tree")
    p.add_argument("--settle-s", type=float, default=3.0, help="requests before and after")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "update.json"))
    args = p.parse_args()
    model = Path(args.model).expanduser()
    if not (model / "config.json").is_file():
        p.error(f"--model {model}: no config.json (make one: ember make-model --size 125m DIR)")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ember-bench-update-") as tmp:
        with worktree(ROOT, args.baseline_ref, Path(tmp) / "baseline-tree") as baseline:
            for name, tree in (("baseline", baseline), ("ember", ROOT)):
                python = overlay_python(tree, Path(tmp) / f"venv-{name}")
                for change in ("engine", "source"):
                    work = Path(tmp) / f"{name}-{change}"
                    work.mkdir()
                    results[f"{name}_{change}"] = run_tree(
                        python, tree, model, work, args.settle_s, change
                    )
                    print(f"{name} {change}: {json.dumps(results[f'{name}_{change}'])}", flush=True)
    rows = []
    for change in ("engine", "source"):
        b, e = results[f"baseline_{change}"], results[f"ember_{change}"]
        rows += [
            {"metric": f"update_{change}_longest_request_s", "value": e["during_max_s"],
             "unit": "s", "baseline": b["during_max_s"],
             "ratio": b["during_max_s"] / max(e["during_max_s"], 1e-9)},
            {"metric": f"update_{change}_failed_requests", "value": e["during_failed"],
             "unit": "requests", "baseline": b["during_failed"]},
        ]  # fmt: skip
        print(
            f"{change} change: longest request during the update {e['during_max_s']:.3f} s "
            f"(baseline {b['during_max_s']:.3f} s); failed {e['during_failed']} "
            f"(baseline {b['during_failed']})"
        )
    doc = {
        **stamp("update"),
        "metric": "longest request during an update (one client sending back to back)",
        "value": rows[0]["value"],
        "unit": "s",
        "baseline": f"the same with the tree at {args.baseline_ref} (replace: stop, then start)",
        "rows": rows,
        "details": results,
        "model": str(model),
        "baseline_ref": args.baseline_ref,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
