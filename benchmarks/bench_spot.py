"""Spot preemptions on a live cluster: what clients see with preemption notices (requests move
live) and without (the node just goes; requests resume from the journal), in one run.

The cluster is `ray.cluster_utils.Cluster` on this machine: an on-demand head and two spot
nodes, one logical CPU each (one instance per node), `ember serve --address` joined to it. The
deployment runs the 125m factory model in fp32 (exact: every moved or resumed request must end
with the undisturbed text), min = max = 2 instances, so one node is free for a replacement.
`--clients` threads send streamed greedy completions back to back; prompt and output lengths are
drawn with a fixed seed from the ShareGPT lengths (prompts of random token ids).

Every `--every-s` seconds a spot node that hosts an instance is preempted. `notice`: a
preemption notice (`POST /admin/nodes/{node}/notice`, `--grace-s`), and the node is removed
when the grace ends; `no-notice`: the node is removed at that moment with no word. Either way a
fresh spot node joins right after (the spot market gives one back). Recorded per request:
time to first token, latency, the longest gap between two chunks, whether the text equals the
undisturbed run's (computed in-process afterwards) and the status; summarised over every
request and over those in flight at a notice or a loss. Both modes run the same schedule and
the same requests in order. Everything shares this machine's cores (nodes joining, replacements
loading), which shows in every request's gaps, not only the moved or resumed ones'.

    python benchmarks/bench_spot.py [--duration-s 240] [--every-s 40] [--grace-s 20]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from bench_resume import MODEL, ensure_model
from machine import stamp
from serve_process import free_port, instances, metric_lines, stop, wait_health, wait_ready

ROOT = Path(__file__).resolve().parents[1]
LENGTHS_CSV = Path("/work/shared/traces/workload/sharegpt/lengths.csv")
SPOT = {"spot": "true", "zone": "b"}


def workload(n: int, max_prompt: int, max_output: int, seed: int) -> list[tuple[list[int], int]]:
    """`n` (prompt ids, max_tokens) pairs from the ShareGPT lengths, fixed seed."""
    with open(LENGTHS_CSV) as f:
        rows = [
            (int(r["num_prefill_tokens"]), int(r["num_decode_tokens"]))
            for r in csv.DictReader(f)
            if 0 < int(r["num_prefill_tokens"]) <= max_prompt
            and 0 < int(r["num_decode_tokens"]) <= max_output
        ]
    rng = random.Random(seed)
    picks = [rows[rng.randrange(len(rows))] for _ in range(n)]
    return [([rng.randrange(100, 30000) for _ in range(p)], o) for p, o in picks]


class Clients:
    """Threads that stream completions back to back, taking requests from one list in order."""

    def __init__(self, base: str, requests: list[tuple[list[int], int]], n: int) -> None:
        self.base = base
        self.requests = requests
        self.records: list[dict[str, Any]] = []
        self._next = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(n)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=900)

    def _take(self) -> int | None:
        with self._lock:
            if self._stop.is_set() or self._next >= len(self.requests):
                return None
            self._next += 1
            return self._next - 1

    def _run(self) -> None:
        with httpx.Client(timeout=900) as client:
            while (i := self._take()) is not None:
                self.records.append(self._one(client, i))

    def _one(self, client: httpx.Client, i: int) -> dict[str, Any]:
        prompt, max_tokens = self.requests[i]
        body = {
            "model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "stream": True, "ignore_eos": True,
        }  # fmt: skip
        t0 = time.monotonic()
        times: list[float] = []
        text = ""
        error = None
        try:
            with client.stream("POST", self.base + "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    error = f"HTTP {r.status_code}"
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    data = json.loads(line[6:])
                    if "error" in data:
                        error = str(data["error"].get("message"))
                        break
                    text += "".join(c["text"] for c in data.get("choices", []))
                    times.append(time.monotonic())
        except httpx.HTTPError as e:
            error = f"{type(e).__name__}: {e}"
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        return {
            "index": i,
            "start": t0,
            "end": time.monotonic(),
            "ttft_s": times[0] - t0 if times else None,
            "latency_s": time.monotonic() - t0,
            "max_gap_s": max(gaps, default=0.0),
            "text": text,
            "error": error,
        }


def run_mode(
    mode: str, args: argparse.Namespace, requests: list[tuple[list[int], int]]
) -> dict[str, Any]:
    from ray.cluster_utils import Cluster

    work = ROOT / ".cache" / "spot" / mode
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shm = Path(f"/dev/shm/ember-bench-spot-{os.getuid()}")
    shutil.rmtree(shm, ignore_errors=True)
    common: dict[str, Any] = {"num_cpus": 1, "node_ip_address": "127.0.0.1"}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            **common,
            "include_dashboard": False,
            "labels": {"spot": "false", "zone": "a"},
        },
    )
    spot_nodes = [cluster.add_node(**common, labels=SPOT) for _ in range(2)]
    cluster.wait_for_nodes()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "EMBER_DRAM_DIR": str(shm),
        "EMBER_SSD_DIR": str(work / "ssd"), "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    log_path = work / "serve.log"
    log = open(log_path, "wb")  # noqa: SIM115  # closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "ember", "serve", "--address", cluster.address, "--port", str(port),
         "--no-demo", "--state-dir", str(work / "state"), "--cache-dir", str(work / "cache")],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    events: list[dict[str, Any]] = []
    clients = Clients(base, requests, args.clients)
    try:
        wait_health(base, proc, 300, log_path)
        spec = {
            "name": "m", "source": str(args.model), "min_instances": 2, "max_instances": 2,
            "dtype": "fp32", "max_num_seqs": 8,
        }  # fmt: skip
        httpx.post(base + "/admin/deployments", json=spec, timeout=120).raise_for_status()
        wait_ready(base, 2, 600)
        t_start = time.monotonic()
        clients.start()
        next_at = t_start + args.every_s
        while time.monotonic() - t_start < args.duration_s:
            time.sleep(0.2)
            if time.monotonic() < next_at:
                continue
            next_at += args.every_s
            victim = busy_spot_node(base, cluster, spot_nodes)
            if victim is None:
                continue
            node, node_id = victim
            t = time.monotonic() - t_start
            if mode == "notice":
                r = httpx.post(
                    f"{base}/admin/nodes/{node_id}/notice", json={"deadline_s": args.grace_s},
                    timeout=30,
                )  # fmt: skip
                r.raise_for_status()
                events.append({"t_s": round(t, 2), "event": "notice", "node": node_id[:12],
                               "answer": r.json()})  # fmt: skip
                time.sleep(args.grace_s)
            cluster.remove_node(node, allow_graceful=False)
            spot_nodes.remove(node)
            events.append({"t_s": round(time.monotonic() - t_start, 2), "event": "lost",
                           "node": node_id[:12]})  # fmt: skip
            spot_nodes.append(cluster.add_node(**common, labels=SPOT))
            print(f"[{mode}] preempted {node_id[:12]} at {t:.1f} s", flush=True)
        clients.stop()
        counters = metric_lines(
            base, "ember_requests_resumed_total", "ember_requests_migrated_total"
        )
    finally:
        clients.stop()
        stop(proc)
        log.close()
        cluster.shutdown()
        shutil.rmtree(shm, ignore_errors=True)
    for rec in clients.records:  # times from the clients' start, as the events have them
        rec["start"] -= t_start
        rec["end"] -= t_start
    return {"mode": mode, "events": events, "records": clients.records, "counters": counters,
            "log": str(log_path)}  # fmt: skip


def busy_spot_node(base: str, cluster: Any, spot_nodes: list[Any]) -> tuple[Any, str] | None:
    """A spot node (the Ray node object and its id) hosting a ready instance, if any."""
    hosting = {i["node_id"] for i in instances(base) if i["state"] == "ready"}
    for node in spot_nodes:
        if node.node_id in hosting:
            return node, node.node_id
    return None


def summary(
    records: list[dict[str, Any]], reference: dict[int, str], events: list[dict[str, Any]]
) -> dict[str, Any]:
    """Latency, time to first token and longest gap (P50/P90/P99/max), over every request and
    over those in flight at a notice or a node loss (the ones a preemption touched)."""
    ok = [r for r in records if r["error"] is None]
    times = [e["t_s"] for e in events]
    hit = [r for r in ok if any(r["start"] < t < r["end"] for t in times)]

    def pct(values: list[float], q: float) -> float:
        values = sorted(values)
        return round(values[min(len(values) - 1, int(q * len(values)))], 3)

    out: dict[str, Any] = {
        "requests": len(records),
        "failed": len(records) - len(ok),
        "errors": sorted({r["error"] for r in records if r["error"]}),
        "identical_text": sum(reference.get(r["index"]) == r["text"] for r in ok),
    }
    for name, group in (("all", ok), ("in_flight_at_a_preemption", hit)):
        part: dict[str, Any] = {"requests": len(group)}
        for key in ("latency_s", "ttft_s", "max_gap_s"):
            values = [r[key] for r in group if r[key] is not None]
            if values:
                part[key] = {"p50": pct(values, 0.5), "p90": pct(values, 0.9),
                             "p99": pct(values, 0.99), "max": round(max(values), 3)}  # fmt: skip
        out[name] = part
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration-s", type=float, default=240.0)
    p.add_argument("--every-s", type=float, default=40.0, help="seconds between preemptions")
    p.add_argument("--grace-s", type=float, default=20.0, help="notice before the node goes")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--max-prompt", type=int, default=512)
    p.add_argument("--max-output", type=int, default=256)
    p.add_argument("--model", type=Path, default=MODEL)
    p.add_argument("--modes", nargs="+", default=["notice", "no-notice"])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "spot.json"))
    args = p.parse_args()
    args.model = ensure_model(args.model)
    requests = workload(400, args.max_prompt, args.max_output, seed=0)
    runs = [run_mode(mode, args, requests) for mode in args.modes]
    done = sorted({r["index"] for run in runs for r in run["records"]})
    print(f"reference: {len(done)} requests in-process (fp32, greedy)", flush=True)
    from ember import LLM, SamplingParams

    llm = LLM(str(args.model), dtype="fp32", max_num_seqs=16)
    try:
        outs = llm.generate(
            [requests[i][0] for i in done],
            [
                SamplingParams(max_tokens=requests[i][1], temperature=0.0, ignore_eos=True)
                for i in done
            ],
        )
    finally:
        llm.close()
    reference = {i: o.text for i, o in zip(done, outs, strict=True)}
    result: dict[str, Any] = {
        **stamp("spot"),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "modes": {
            run["mode"]: {
                "summary": summary(run["records"], reference, run["events"]),
                "events": run["events"],
                "counters": run["counters"],
            }
            for run in runs
        },
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({m: v["summary"] for m, v in result["modes"].items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
