"""ember bench coldstart: time to first token with zero instances running, the checkpoint in the
node store's DRAM tier, on its SSD tier and only in S3, against a fresh transformers process.

What each number includes:
- baseline (what a user does today): `python -c` started fresh; imports torch + transformers;
  `from_pretrained` from the HF folder (bf16 safetensors, page cache warm) and its tokenizer;
  tokenize the prompt; `generate(max_new_tokens=1)`. Measured from `Popen` to the token.
- ember, per tier: a local Ray node running the node store actor and a pool of one pre-started,
  model-less instance worker (warm, idle, excluded). Timed from the request to the first token
  arriving back in this process:
  worker: take the worker from the pool and assign it the deployment (one actor call);
  load: the worker's `start`: `store` = the node store's acquire, which answers as soon as the
  checkpoint can be mapped (a DRAM hit, or a fetch S3 -> SSD -> DRAM / SSD -> DRAM started),
  then `engine` = the engine built on the DRAM copy while the fetch streams in (weights are
  views of shared memory, mapped tensor by tensor as their chunks are verified; tokenizer; KV
  cache);
  first token: the `generate` call streaming the first token back.
  Queueing is zero by construction: no controller queue in this path (the request goes
  straight to the node's pool), so it is reported as such.
- "dram-packed": the same, but the engine re-lays the bf16 weights out for oneDNN after its
  first step (`EMBER_POOL_PACK_WEIGHTS=1`, the default; "dram" is run with it off): a private
  copy per instance, faster decode. The last column
  (time per output token over 16 more tokens) shows what each choice costs afterwards.
- "dram-nopool": the same from DRAM, but the worker is a fresh actor process (what the pool
  saves: process start and imports).
- "dram-checked": the same from DRAM, but the worker asks S3 whether the copy is current before
  building its engine (`EMBER_CONFIRM_CACHE_FIRST=1`), as every start did until 2026-12-07;
  "dram" asks while it builds. `--s3-rtt-ms` puts a round trip in front of every S3 answer
  (`latency_proxy.py`; loopback moto answers in about a millisecond, a real object store in
  tens), which is what the overlap hides.
"ssd" runs drop the SSD copy from the page cache first (posix_fadvise DONTNEED), so they read
the disk; "ssd-warm" runs read it into the page cache first (and check with mincore that it is
there), as the baseline's HF folder is (its page cache is warm: it was just read by the
previous run). An SSD copy is in the page cache in practice when it was fetched or read
recently; the SSD -> DRAM fetch reads uncached bytes with O_DIRECT, which leaves them uncached.
The S3 server is moto on loopback: every ranged GET makes it copy the whole object in Python,
so S3 numbers measure moto more than the pipeline (64 MiB ranges keep the request count low).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from machine import git_sha, machine_facts

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "coldstart"
PROMPT = "The capital of France is"
TIERS = ("s3", "ssd", "ssd-warm", "dram", "dram-packed", "dram-nopool", "dram-checked")
DECODE_TOKENS = 16  # after the first, to report the time per output token

BASELINE = r"""
import json, sys, time
t_start = time.time()
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
t_import = time.time()
path, prompt, device = sys.argv[1:4]
placed = {} if device == "cpu" else {"device_map": device}  # straight to the GPU (accelerate)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, **placed)
tok = AutoTokenizer.from_pretrained(path)
if device != "cpu":
    torch.cuda.synchronize()
t_load = time.time()
ids = tok(prompt, return_tensors="pt").input_ids.to(device)
with torch.inference_mode():
    out = model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
token = int(out[0, -1])
t_token = time.time()
print(json.dumps({"t_start": t_start, "t_import": t_import, "t_load": t_load,
                  "t_token": t_token, "token": token}))
"""


def disk_read_gbps(path: Path, threads: int = 32, chunk: int = 4 << 20) -> float:
    """The disk's ceiling for the SSD tier: `path` dropped from the page cache, then read with
    O_DIRECT at queue depth `threads` (one `chunk` read in flight per thread, into 2 MiB-page
    buffers, as `ember bench load`'s raw_direct row)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from ember.store.hostmem import map_anonymous
    from ember.store.pagecache import evict

    evict(path)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    work = iter(range(0, os.fstat(fd).st_size, chunk))
    lock = threading.Lock()

    def reader(_: int) -> int:
        buf = map_anonymous(chunk, huge_pages=True)
        view, total = memoryview(buf), 0
        while True:
            with lock:
                off = next(work, None)
            if off is None:
                view.release()
                buf.close()
                return total
            total += os.preadv(fd, [view[:chunk]], off)

    try:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            n = sum(pool.map(reader, range(threads)))
        return n / (time.perf_counter() - t0) / 1e9
    finally:
        os.close(fd)


def ensure_model(size: str) -> Path:
    from ember.store.factory import make_model

    out = CACHE / f"llama-{size}-bf16"
    if not (out / "config.json").is_file():
        print(f"making the {size} factory model in {out} (once)", flush=True)
        make_model(out, "llama", size, "bf16")
    return out


def run_baseline(hf: Path, threads: int, device: str = "cpu") -> dict[str, float]:
    """What a user does today, in a fresh process: transformers from the HF folder to `device`,
    one generated token. Timed from `Popen`."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.time()
    out = subprocess.run(
        [sys.executable, "-c", BASELINE, str(hf), PROMPT, device],
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {
        "total_s": r["t_token"] - t0,
        "python_s": r["t_start"] - t0,
        "import_s": r["t_import"] - r["t_start"],
        "load_s": r["t_load"] - r["t_import"],
        "first_token_s": r["t_token"] - r["t_load"],
        "token": r["token"],
    }


class Harness:
    """A private Ray node with the node store actor, a worker pool of one, a moto S3 server."""

    def __init__(self, threads: int, s3_rtt_s: float = 0.0) -> None:
        import ray
        from local_s3 import start_local_s3

        from ember.cluster.adapter import RayAdapter, current_node_id
        from ember.cluster.node_store_actor import start_node_store
        from ember.cluster.worker_pool import WorkerPool
        from ember.store.node_store import NodeStoreConfig

        self.s3 = start_local_s3()
        self.remote, remote_cfg = self.s3.remote, self.s3.config
        self.proxy = None
        if s3_rtt_s > 0:  # the node store reaches S3 through a round trip (uploads do not)
            from latency_proxy import LatencyProxy

            self.proxy = LatencyProxy(self.s3.port, s3_rtt_s)
            remote_cfg = replace(remote_cfg, endpoint_url=self.proxy.endpoint)
        self.shm = Path(f"/dev/shm/ember-bench-{os.getuid()}")
        shutil.rmtree(self.shm, ignore_errors=True)
        shutil.rmtree(CACHE / "ssd", ignore_errors=True)
        self.adapter = RayAdapter.start_local(num_cpus=max(4, threads))
        self.node = current_node_id()
        cfg = NodeStoreConfig(
            dram_dir=str(self.shm / "dram"), dram_capacity_bytes=8 << 30,
            ssd_dir=str(CACHE / "ssd"), ssd_capacity_bytes=16 << 30, remote=remote_cfg,
        )  # fmt: skip
        self.store = start_node_store(self.node, cfg)
        # The store's slot of this machine under CACHE/ssd (`claim_slot`).
        self.ssd_dir = Path(ray.get(self.store.tier_dirs.remote())["ssd"])
        env = {"OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
        self.env = env
        self.pool = WorkerPool(1, str(CACHE / "ember-cache"), env=env, pack_weights=False)
        self.packed_pool = WorkerPool(1, str(CACHE / "ember-cache"), env=env, pack_weights=True)
        self.checked_pool = WorkerPool(
            1, str(CACHE / "ember-cache"), env={**env, "EMBER_CONFIRM_CACHE_FIRST": "1"},
            pack_weights=False,
        )  # fmt: skip
        self.ray = ray
        self.last_residual: float | None = None

    def close(self) -> None:
        self.pool.shutdown()
        self.packed_pool.shutdown()
        self.checked_pool.shutdown()
        if self.proxy is not None:
            self.proxy.close()
        self.adapter.shutdown()
        self.s3.stop()
        shutil.rmtree(self.shm, ignore_errors=True)

    def push(self, size: str, hf: Path, prefix: str | None = None) -> str:
        from ember.store import convert
        from ember.store.remote import parse_s3_url

        ck = CACHE / f"llama-{size}-ember"
        if not (ck / "index.json").is_file():
            convert(hf, ck, progress=False, overwrite=True)
        url = f"s3://bench/{prefix or size}"
        self.remote.upload_checkpoint(ck, parse_s3_url(url))
        return url

    def place(self, url: str, tier: str) -> None:
        """Put the checkpoint only where the run wants it."""
        get = self.ray.get
        if tier == "s3":
            get(self.store.evict.remote(url, "dram"))
            get(self.store.evict.remote(url, "ssd"))
        elif tier.startswith("ssd"):
            get(self.store.ensure.remote(url, "ssd"))
            get(self.store.evict.remote(url, "dram"))
            if tier == "ssd":
                self.last_residual = self.evict_ssd_copy(url)
            else:  # "ssd-warm": the SSD copy in the page cache
                self.last_residual = self.cache_ssd_copy(url)
        else:
            get(self.store.ensure.remote(url, "dram"))

    def evict_ssd_copy(self, url: str) -> float:
        """Drop the SSD tier's copy from the page cache (posix_fadvise DONTNEED after an
        fdatasync) and check with mincore that it is gone; returns the largest share of a file
        still resident, and refuses to go on above 1% (the run would not read the disk)."""
        from ember.store.node_store import checkpoint_key
        from ember.store.pagecache import evict

        copy = self.ssd_dir / checkpoint_key(url)
        residual = max(evict(f) for f in copy.iterdir() if f.is_file())
        if residual > 0.01:
            raise RuntimeError(f"{copy}: {residual:.1%} still in the page cache after eviction")
        return residual

    def cache_ssd_copy(self, url: str) -> float:
        """Read the SSD tier's copy into the page cache (buffered reads) and check with mincore
        that it is there; returns the smallest share of a file resident (refuses below 99%)."""
        from ember.store.node_store import checkpoint_key
        from ember.store.pagecache import resident_fraction

        copy = self.ssd_dir / checkpoint_key(url)
        for f in copy.iterdir():
            if f.is_file():
                with f.open("rb") as fh:
                    while fh.read(64 << 20):
                        pass
        resident = min(resident_fraction(f) for f in copy.iterdir() if f.is_file())
        if resident < 0.99:
            raise RuntimeError(f"{copy}: only {resident:.1%} in the page cache after reading it")
        return resident

    def pool_for(self, tier: str) -> Any:
        return {"dram-packed": self.packed_pool, "dram-checked": self.checked_pool}.get(
            tier, self.pool
        )

    def warm_worker(self, tier: str = "dram") -> Any:
        pool = self.pool_for(tier)
        pool.sync([self.node])
        (ref,) = pool.idle()[self.node]
        return self.ray.get(ref.actor.info.remote())

    def cold_start(self, url: str, tier: str) -> dict[str, Any]:
        return asyncio.run(self._cold_start(url, tier))

    async def _cold_start(self, url: str, tier: str) -> dict[str, Any]:
        from ember import SamplingParams
        from ember.cluster.worker_pool import PooledInstanceActor
        from ember.controller.types import DeploymentSpec

        spec = DeploymentSpec(name="bench", source=url, max_model_len=512, max_num_seqs=4)
        params = SamplingParams(max_tokens=1 + DECODE_TOKENS, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        if tier != "dram-nopool":
            ref = self.pool_for(tier).take(self.node, refill=False)
            assert ref is not None
            actor = ref.actor
        else:
            actor = (
                self.ray.remote(PooledInstanceActor)
                .options(num_cpus=0, runtime_env={"env_vars": self.env})
                .remote(str(CACHE / "ember-cache"))
            )
        await actor.assign.remote(spec, "bench-0")
        t_worker = time.perf_counter()
        await actor.start.remote()
        t_load = time.perf_counter()
        tokens: list[int] = []
        t_token = t_end = 0.0
        gen = actor.generate.options(num_returns="streaming").remote("r0", PROMPT, params)
        async for obj in gen:
            delta = await obj
            if not tokens and delta.new_token_ids:
                t_token = time.perf_counter()
            tokens += delta.new_token_ids
            if delta.finished:
                t_end = time.perf_counter()
                break
        timings = await actor.start_timings.remote()
        self.ray.kill(actor, no_restart=True)
        await self._until_unpinned(url)
        return {
            "total_s": t_token - t0,
            "queueing_s": 0.0,
            "worker_s": t_worker - t0,
            "load_s": t_load - t_worker,
            "store_s": timings.get("store_s"),
            "engine_s": timings.get("engine_s"),
            "served_from": timings.get("served_from"),
            "confirm_wait_s": timings.get("confirm_wait_s"),
            "first_token_s": t_token - t_load,
            "tpot_s": (t_end - t_token) / max(1, len(tokens) - 1),
            "token": tokens[0] if tokens else None,
            "resident_after_evict": self.last_residual if tier == "ssd" else None,
            "resident_before": self.last_residual if tier == "ssd-warm" else None,
        }

    async def _until_unpinned(self, url: str, timeout_s: float = 60.0) -> None:
        """The killed instance's pin is gone (the store reaps pins of dead processes)."""
        deadline = time.monotonic() + timeout_s
        while any(r.pins for r in await self.store.status.remote() if r.key == url):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} still pinned {timeout_s} s after its instance died")
            await asyncio.sleep(0.05)


def http_cold_starts(
    endpoint: str, url: str, prefetch_url: str, runs: int, threads: int
) -> dict[str, Any]:
    """The whole serving path: `ember serve` (its own private Ray, node store actor, pool of
    one), a deployment of `url` with min_instances=0, keep_alive_s=1 and no prefetch, and one
    completion request (1 token, not streamed) timed from send to response: queueing in the
    router and controller, the pooled worker, the load and the token, plus HTTP. The first
    request fetches from S3; after each scale-to-zero the next one starts from the DRAM tier.
    Then a deployment of `prefetch_url` (the same checkpoint under another prefix) as a user
    makes it, with the default prefetch to SSD: the time until the store lists the SSD copy,
    then the first request, timed the same way."""
    import socket

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    work = CACHE / "http-run"
    shutil.rmtree(work, ignore_errors=True)
    shm = Path(f"/dev/shm/ember-bench-http-{os.getuid()}")
    env = {
        **os.environ, "EMBER_WORKER_POOL_SIZE": "1", "EMBER_S3_ENDPOINT_URL": endpoint,
        "EMBER_DRAM_DIR": str(shm), "EMBER_SSD_DIR": str(work / "ssd"),
        "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
        "OMP_NUM_THREADS": str(threads),
    }  # fmt: skip
    log = open(CACHE / "http-serve.log", "wb")  # noqa: SIM115  # closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "ember", "serve", "--port", str(port), "--no-demo",
         "--state-dir", str(work / "state"), "--cache-dir", str(work / "cache")],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    out: dict[str, Any] = {}
    try:
        _wait_http(base + "/health", 180)
        spec = {"name": "m", "source": url, "min_instances": 0, "keep_alive_s": 1.0,
                "max_model_len": 512, "max_num_seqs": 4, "prefetch": "none"}  # fmt: skip
        httpx.post(base + "/admin/deployments", json=spec, timeout=30).raise_for_status()
        body = {"model": "m", "prompt": PROMPT, "max_tokens": 1, "temperature": 0.0}
        times: list[float] = []
        estimates: list[dict[str, Any]] = []
        for i in range(1 + runs):
            _wait_scaled_to_zero(base, 120)
            time.sleep(3.0)  # the pool's replacement worker finishes starting
            t0 = time.perf_counter()
            r = httpx.post(base + "/v1/completions", json=body, timeout=300)
            r.raise_for_status()
            times.append(time.perf_counter() - t0)
            print(f"http request {i} ({'s3' if i == 0 else 'dram'}): {times[-1]:.3f} s", flush=True)
            estimates.append(_estimate_row(base, "m", times[-1]))
        out = {"s3_total_s": times[0], "dram_total_s": sorted(times[1:])[len(times[1:]) // 2],
               "dram_runs_s": [round(t, 4) for t in times[1:]]}  # fmt: skip
        # From S3 again, now that the node's store has measured its link: placement's estimate
        # of the load next to the load itself, before (assumed 1 GB/s) and after.
        _wait_scaled_to_zero(base, 120)
        for tier in ("dram", "ssd"):
            r = httpx.post(base + "/admin/deployments/m/evict", json={"tier": tier}, timeout=60)
            r.raise_for_status()
        time.sleep(3.0)
        t0 = time.perf_counter()
        httpx.post(base + "/v1/completions", json=body, timeout=300).raise_for_status()
        out["s3_measured_total_s"] = time.perf_counter() - t0
        estimates.append(_estimate_row(base, "m", out["s3_measured_total_s"]))
        out["estimates"] = estimates
        nodes = httpx.get(base + "/admin/status", timeout=10).json().get("nodes", [])
        out["fetch_bytes_per_s"] = [n.get("fetch_bytes_per_s") for n in nodes]
        for e in estimates:
            print(
                f"  from {e['tier']}: load {e['load_s']:.3f} s, placement estimated "
                f"{e['estimated_load_s'] or float('nan'):.3f} s", flush=True,
            )  # fmt: skip
        _wait_scaled_to_zero(base, 120)
        time.sleep(3.0)
        t0 = time.perf_counter()
        spec = {**spec, "name": "p", "source": prefetch_url}
        del spec["prefetch"]  # the default: to SSD
        httpx.post(base + "/admin/deployments", json=spec, timeout=30).raise_for_status()
        while not _on_ssd(base, prefetch_url):
            if time.perf_counter() - t0 > 300:
                raise TimeoutError(f"{prefetch_url} was not prefetched to SSD in 300 s")
            time.sleep(0.05)
        out["prefetch_to_ssd_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        r = httpx.post(base + "/v1/completions", json={**body, "model": "p"}, timeout=300)
        r.raise_for_status()
        out["prefetched_total_s"] = time.perf_counter() - t0
        state = httpx.get(base + "/admin/status", timeout=10).json()
        [dep] = [d for d in state["deployments"] if d["name"] == "p"]
        out["prefetched_tier"] = [i.get("tier") for i in dep["instances"]]
        print(
            f"deploy with prefetch: on SSD after {out['prefetch_to_ssd_s']:.3f} s; first "
            f"request {out['prefetched_total_s']:.3f} s from {out['prefetched_tier']}",
            flush=True,
        )
    finally:
        proc.send_signal(2)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        log.close()
        shutil.rmtree(shm, ignore_errors=True)
    return out


def _wait_http(url: str, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {timeout_s} s")


def _estimate_row(base: str, name: str, total_s: float) -> dict[str, Any]:
    """The instance serving `name`: where its weights came from, its load and placement's
    estimate of it (`ember status`)."""
    import httpx

    state = httpx.get(base + "/admin/status", timeout=10).json()
    [dep] = [d for d in state["deployments"] if d["name"] == name]
    [inst] = [i for i in dep["instances"] if i["state"] == "ready"]
    return {
        "tier": inst.get("tier"), "load_s": inst.get("load_s"), "total_s": round(total_s, 4),
        "estimated_load_s": inst.get("estimated_load_s"),
    }  # fmt: skip


def _on_ssd(base: str, url: str) -> bool:
    import httpx

    state = httpx.get(base + "/admin/status", timeout=10).json()
    rows = [r for rows in state.get("checkpoints", {}).values() for r in rows]
    # A complete copy: status also lists fetches in flight, with their progress in "fetched".
    return any(r["key"] == url and r["tier"] == "ssd" and r.get("fetched") is None for r in rows)


def _wait_scaled_to_zero(base: str, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = httpx.get(base + "/admin/status", timeout=10).json()
        if all(not d.get("instances") for d in state.get("deployments", [])):
            return
        time.sleep(0.5)
    raise TimeoutError(f"the deployment did not scale to zero in {timeout_s} s")


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    best = sorted(runs, key=lambda r: r["total_s"])[len(runs) // 2]
    return {**best, "runs_total_s": [round(r["total_s"], 4) for r in runs]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="0.5b,1b", help="factory sizes (default 0.5b,1b)")
    p.add_argument("--runs", type=int, default=3, help="runs per cell; the median is reported")
    p.add_argument("--quick", action="store_true", help="0.5b only, 1 run")
    p.add_argument("--no-http", action="store_true", help="skip the `ember serve` HTTP runs")
    p.add_argument("--tiers", default=",".join(TIERS), help=f"subset of {','.join(TIERS)}")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "coldstart.json"))
    p.add_argument(
        "--s3-rtt-ms", type=float, default=0.0,
        help="a round trip added to every S3 answer the node store gets (default 0: loopback)",
    )  # fmt: skip
    p.add_argument(
        "--device", default="cpu", help="cuda: to the GPU, without Ray (see coldstart_gpu.py)"
    )
    args = p.parse_args()
    if args.device.startswith("cuda"):
        import coldstart_gpu

        return int(coldstart_gpu.main(sys.argv[1:]))
    sizes = ["0.5b"] if args.quick else args.sizes.split(",")
    runs = 1 if args.quick else args.runs
    tiers = [t for t in args.tiers.split(",") if t]
    if unknown := set(tiers) - set(TIERS):
        p.error(f"unknown tiers {sorted(unknown)}; choose from {','.join(TIERS)}")
    threads = os.cpu_count() or 1
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    facts = machine_facts()
    facts["s3_rtt_ms_added"] = args.s3_rtt_ms
    models = {s: ensure_model(s) for s in sizes}
    part = next((CACHE / f"llama-{sizes[-1]}-ember").glob("rank0-part*.bin"), None)
    if part is not None:
        facts["disk_odirect_read_gbps"] = round(disk_read_gbps(part), 2)
        print(f"disk: O_DIRECT read at qd32 {facts['disk_odirect_read_gbps']} GB/s", flush=True)
    results: dict[str, Any] = {}
    harness = Harness(threads, args.s3_rtt_ms / 1000)
    try:
        for size in sizes:
            hf = models[size]
            res: dict[str, Any] = {}
            res["baseline"] = median_run([run_baseline(hf, threads) for _ in range(runs)])
            print(f"{size} baseline: " + json.dumps(res["baseline"]), flush=True)
            url = harness.push(size, hf)
            idle = harness.warm_worker()
            res["pooled_worker_idle"] = {
                "rss_bytes": idle.rss_bytes, "uss_bytes": idle.uss_bytes, "warm_s": idle.warm_s,
            }  # fmt: skip
            for tier in tiers:
                cells = []
                for _ in range(1 if tier == "s3" else runs):  # S3 runs are moto-bound, slow
                    harness.place(url, "dram" if tier.startswith("dram") else tier)
                    if tier != "dram-nopool":
                        harness.warm_worker(tier)
                    cells.append(harness.cold_start(url, tier))
                    print(f"{size} {tier}: " + json.dumps(cells[-1]), flush=True)
                res[tier] = median_run(cells)
            results[size] = res
            print_table(size, res)
        if not args.no_http and "s3" in tiers:
            size = sizes[0]
            endpoint = harness.remote.config.endpoint_url or ""
            prefetch_url = harness.push(size, models[size], prefix=f"{size}-prefetched")
            results[size]["http"] = http_cold_starts(
                endpoint, f"s3://bench/{size}", prefetch_url, runs, threads
            )
            base = results[size]["baseline"]["total_s"]
            h = results[size]["http"]
            print(
                f"\nember serve over HTTP, {size}: first request (S3) {h['s3_total_s']:.3f} s, "
                f"after scale to zero (DRAM) {h['dram_total_s']:.3f} s "
                f"({base / h['dram_total_s']:.1f}x the baseline); deployed with prefetch: first "
                f"request {h['prefetched_total_s']:.3f} s ({base / h['prefetched_total_s']:.1f}x)"
            )
    finally:
        harness.close()
    facts["load_average_at_end"] = os.getloadavg()[0]
    write_json(args.out, results, facts, sizes, runs)
    return 0


def print_table(size: str, res: dict[str, Any]) -> None:
    base = res["baseline"]["total_s"]
    print(f"\ncold start to first token, llama {size} bf16 (median; seconds)")
    head = f"{'path':<22}{'total':>8}{'queue':>8}{'worker':>8}{'load':>8}{'store':>8}"
    print(head + f"{'engine':>8}{'1st tok':>9}{'speedup':>9}{'tpot ms':>9}")
    b = res["baseline"]
    print(
        f"{'transformers (fresh)':<22}{base:>8.3f}{'-':>8}{b['python_s'] + b['import_s']:>8.3f}"
        f"{b['load_s']:>8.3f}{'-':>8}{'-':>8}{b['first_token_s']:>9.3f}{1.0:>8.1f}x{'-':>9}"
    )
    for tier in (t for t in TIERS if t in res):
        r = res[tier]
        print(
            f"{'ember ' + tier:<22}{r['total_s']:>8.3f}{r['queueing_s']:>8.3f}{r['worker_s']:>8.3f}"
            f"{r['load_s']:>8.3f}{r['store_s']:>8.3f}{r['engine_s']:>8.3f}"
            f"{r['first_token_s']:>9.3f}{base / r['total_s']:>8.1f}x{r['tpot_s'] * 1e3:>9.1f}"
        )
    idle = res["pooled_worker_idle"]
    print(
        f"idle pooled worker: {idle['uss_bytes'] / 2**20:.0f} MiB private (USS), "
        f"{idle['rss_bytes'] / 2**20:.0f} MiB RSS; its imports took {idle['warm_s']:.2f} s"
    )


def write_json(out: str, results: dict[str, Any], facts: dict[str, Any], sizes: list[str],
               runs: int) -> None:  # fmt: skip
    rows = []
    for size, res in results.items():
        base = res["baseline"]["total_s"]
        for tier in (t for t in TIERS if t in res):
            rows.append({
                "metric": f"coldstart_ttft_{tier}_{size}", "value": res[tier]["total_s"],
                "unit": "s", "baseline": base, "ratio": base / res[tier]["total_s"],
            })  # fmt: skip
        for where in ("s3", "dram", "prefetched"):  # prefetched: first request after deploy
            if res.get("http") and f"{where}_total_s" in res["http"]:
                value = res["http"][f"{where}_total_s"]
                rows.append({
                    "metric": f"coldstart_http_{where}_{size}", "value": value, "unit": "s",
                    "baseline": base, "ratio": base / value,
                })  # fmt: skip
    doc = {
        "benchmark": "coldstart",
        "metric": "cold-start time to first token (zero instances running)",
        "value": rows[0]["value"] if rows else None,
        "unit": "s",
        "baseline": "fresh python + transformers from_pretrained + generate 1 token",
        "rows": rows,
        "details": results,
        "sizes": sizes,
    }
    save_doc(out, doc, runs, facts)


def save_doc(out: str, doc: dict[str, Any], runs: int, facts: dict[str, Any]) -> None:
    """Write a cold-start result (medians of `runs`) with the machine facts, sha and time."""
    doc = {
        **doc,
        "runs": runs,
        "statistic": "median",
        "machine": facts,
        "git_sha": git_sha(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    sys.exit(main())
