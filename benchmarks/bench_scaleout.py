"""Scale-out under rising load, with and without the scale-out prefetch.

A two-node Ray cluster on this machine (`ray.cluster_utils.Cluster`, one logical CPU per node,
so each node fits one instance), a moto S3 server on 127.0.0.1 holding the checkpoint, and
`ember serve --address` joined to the cluster. The deployment (`s3://`, min 1, max 2 instances,
target_concurrency 2) starts its first instance; then clients send completions back to back:
two for `--stage1-s` seconds (load 2: one instance carries it, above half of its target, so
the controller prefetches the checkpoint to the node the next instance would start on), then
four for `--stage2-s` seconds (the autoscaler adds the second instance, on the other node).

In one run, the same with `prefetch: ssd` (the scale-out prefetch on; the default) and
`prefetch: none` (off: the second instance fetches from S3 when the load has already come). We
record the second instance's tier, its load time and the time from the load's rise until it is
ready, and every request's latency in each stage.

    python benchmarks/bench_scaleout.py [--size 0.5b] [--out benchmarks/results/scaleout.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from machine import git_sha, machine_facts
from serve_process import free_port, instances, status, stop, wait_health

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "scaleout"
URL = "s3://bench/scaleout"
PROMPT = "The history of the river begins in the mountains where"


def ensure_checkpoint(size: str) -> Path:
    from ember.store import convert
    from ember.store.factory import make_model

    hf = CACHE / f"llama-{size}-bf16"
    if not (hf / "config.json").is_file():
        print(f"making the {size} factory model in {hf} (once)", flush=True)
        make_model(hf, "llama", size, "bf16")
    ck = CACHE / f"llama-{size}-bf16-ember"
    if not (ck / "index.json").is_file():
        convert(hf, ck, progress=False, overwrite=True)
    return ck


class Clients:
    """Threads sending completions back to back; every request's (start, latency, status)."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.records: list[tuple[float, float, int]] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        for _ in range(n):
            t = threading.Thread(target=self._run, daemon=True)
            t.start()
            self._threads.append(t)

    def _run(self) -> None:
        body = {"model": "m", "prompt": PROMPT, "max_tokens": 16, "temperature": 0.0}
        with httpx.Client(timeout=600) as client:
            while not self._stop.is_set():
                t0 = time.monotonic()
                try:
                    code = client.post(self.base + "/v1/completions", json=body).status_code
                except httpx.HTTPError:
                    code = 0
                with self._lock:
                    self.records.append((t0, time.monotonic() - t0, code))

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=600)


def latency_summary(
    records: list[tuple[float, float, int]], t0: float, t1: float
) -> dict[str, Any]:
    lat = sorted(d for s, d, c in records if t0 <= s < t1 and c == 200)
    failed = sum(1 for s, _, c in records if t0 <= s < t1 and c != 200)
    if not lat:
        return {"requests": 0, "failed": failed}
    return {
        "requests": len(lat),
        "failed": failed,
        "p50_s": round(statistics.median(lat), 3),
        "p90_s": round(lat[min(len(lat) - 1, int(0.9 * len(lat)))], 3),
        "max_s": round(lat[-1], 3),
    }


def run_variant(prefetch: str, endpoint: str, args: argparse.Namespace) -> dict[str, Any]:
    from ray.cluster_utils import Cluster

    work = CACHE / f"run-{prefetch}"
    shutil.rmtree(work, ignore_errors=True)
    shm = Path(f"/dev/shm/ember-bench-scaleout-{os.getuid()}")
    shutil.rmtree(shm, ignore_errors=True)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ, "EMBER_S3_ENDPOINT_URL": endpoint, "EMBER_DRAM_DIR": str(shm),
        "EMBER_SSD_DIR": str(work / "ssd"), "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench", "OMP_NUM_THREADS": str(args.threads),
        "TOKENIZERS_PARALLELISM": "false",
    }  # fmt: skip
    log = open(CACHE / f"serve-{prefetch}.log", "wb")  # noqa: SIM115  # closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "ember", "serve", "--address", cluster.address, "--port",
         str(port), "--no-demo", "--state-dir", str(work / "state"), "--cache-dir",
         str(work / "cache")],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    clients = Clients(base)
    out: dict[str, Any] = {"prefetch": prefetch}
    try:
        wait_health(base, proc, 180, Path(log.name))
        spec = {
            "name": "m", "source": URL, "min_instances": 1, "max_instances": 2,
            "target_concurrency": 2, "keep_alive_s": 600, "max_model_len": 256,
            "max_num_seqs": 4, "prefetch": prefetch,
        }  # fmt: skip
        r = httpx.post(base + "/admin/deployments", json=spec, timeout=60)
        if r.status_code not in (200, 201):
            raise RuntimeError(f"deploy failed: {r.status_code} {r.text}")
        t_deploy = time.monotonic()
        while [i["state"] for i in instances(base)] != ["ready"]:
            if time.monotonic() - t_deploy > 600:
                raise TimeoutError("the first instance did not start in 600 s")
            time.sleep(0.2)
        first = instances(base)[0]
        out["first_instance"] = {"tier": first["tier"], "load_s": round(first["load_s"], 3)}
        print(f"[{prefetch}] first instance ready from {first['tier']}", flush=True)
        t1 = time.monotonic()
        clients.add(2)
        ssd_at = None
        while time.monotonic() - t1 < args.stage1_s:
            if ssd_at is None and on_other_node(base, first["node_id"]):
                ssd_at = time.monotonic() - t1
                print(f"[{prefetch}] other node holds a copy {ssd_at:.1f} s into stage 1")
            time.sleep(0.2)
        out["other_node_copy_after_s"] = None if ssd_at is None else round(ssd_at, 2)
        t2 = time.monotonic()
        clients.add(2)
        second: dict[str, Any] | None = None
        while time.monotonic() - t2 < args.stage2_s or second is None:
            ready = [i for i in instances(base) if i["state"] == "ready"]
            if second is None and len(ready) == 2:
                [inst] = [i for i in ready if i["instance_id"] != first["instance_id"]]
                second = {
                    "tier": inst["tier"], "load_s": round(inst["load_s"], 3),
                    "ready_after_load_rise_s": round(time.monotonic() - t2, 2),
                    "estimated_load_s": inst.get("estimated_load_s"),
                    "same_node_as_first": inst["node_id"] == first["node_id"],
                }  # fmt: skip
                print(f"[{prefetch}] second instance: {second}", flush=True)
            if time.monotonic() - t2 > 600:
                raise TimeoutError("no second instance in 600 s")
            time.sleep(0.2)
        t3 = time.monotonic()
        clients.stop()
        out["second_instance"] = second
        out["stage1"] = latency_summary(clients.records, t1, t2)
        out["stage2"] = latency_summary(clients.records, t2, t3)
        # The requests sent while the second instance was starting: what the scale-out costs.
        assert second is not None
        out["stage2_until_second_ready"] = latency_summary(
            clients.records, t2, t2 + second["ready_after_load_rise_s"]
        )
    finally:
        clients.stop()
        stop(proc)
        log.close()
        cluster.shutdown()
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    return out


def on_other_node(base: str, node_id: str) -> bool:
    """Whether a node other than `node_id` lists a complete copy of the checkpoint."""
    rows = status(base).get("checkpoints", {})
    return any(
        n != node_id and r["key"] == URL and r.get("fetched") is None
        for n, rs in rows.items() for r in rs
    )  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", default="0.5b", choices=("tiny", "125m", "0.5b", "1b"))
    ap.add_argument("--threads", type=int, default=1, help="torch threads per instance")
    ap.add_argument("--stage1-s", type=float, default=45.0)
    ap.add_argument("--stage2-s", type=float, default=30.0)
    ap.add_argument("--variants", default="ssd,none", help="prefetch settings, in this order")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scaleout.json"))
    args = ap.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray on loopback only
    # The node stores run in the cluster's processes, which take these from this one's.
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"})
    CACHE.mkdir(parents=True, exist_ok=True)
    from local_s3 import start_local_s3

    from ember.store.remote import parse_s3_url

    ck = ensure_checkpoint(args.size)
    nbytes = sum(p.stat().st_size for p in ck.iterdir())
    s3 = start_local_s3()
    s3.remote.upload_checkpoint(ck, parse_s3_url(URL))
    results = {}
    try:
        for prefetch in args.variants.split(","):
            results[prefetch] = run_variant(prefetch, s3.endpoint, args)
    finally:
        s3.stop()
    doc = {
        "benchmark": "scaleout",
        "command": "python benchmarks/bench_scaleout.py " + " ".join(sys.argv[1:]),
        "git": git_sha(),
        "machine": machine_facts(),
        "model": {"size": args.size, "dtype": "bf16", "checkpoint_bytes": nbytes},
        "stage1_clients": 2,
        "stage2_clients": 4,
        "stage1_s": args.stage1_s,
        "stage2_s": args.stage2_s,
        "results": results,
    }
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(results, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
