"""ember bench peer: a checkpoint fetched into a node's DRAM tier from another node's copy
(`ember.store.peer`) against the same fetch from S3, on a two-node local Ray cluster.

Each row times one node store's `ensure(url)` (the fetch a cold start waits for: every chunk
verified against the index, written to the node's DRAM tier and SSD tier, the SSD files
fsynced), from the Ray call to its answer, with the fetching node holding no copy before:
- "s3": node 1 fetches from S3 (a moto server on loopback; no node holds the checkpoint).
- "peer-dram": node 0 holds it in DRAM; node 1 fetches it from node 0's peer server (the index
  still comes from S3: one GET, the version check).
- "peer-ssd": node 0 holds it on SSD only, dropped from the page cache (so node 0 reads its
  disk while it sends).
The ceiling: "tmpfs-copy", a plain `cp` of node 0's DRAM copy into a new tmpfs directory (the
memory -> tmpfs copy every DRAM fetch ends in, with no network, no hashing and no SSD write).

"burst" times two nodes that need the checkpoint at once, no node holding it: node 0 starts
its fetch from S3, and as soon as that fetch is under way node 1 starts its own; the row is
the time until both hold it. With peers (the default) node 1 streams node 0's fetch in
progress, each range once node 0 has verified it, so S3 sends the bytes once; `--no-peers`
(node stores with `peer_fetch=False`, written to its own JSON) is the same burst with both
nodes reading S3.

"start-s3" and "start-peer" time a cold start on node 1 to its first token instead, as
bench_coldstart does (a pre-started pooled worker there is assigned the deployment, loads it
through node 1's store and generates; 1 torch thread): the checkpoint only in S3, or in node 0's
DRAM. The store answers as soon as the engine can map the fetch in progress, so the engine is
built while the bytes arrive.

Both nodes are Ray nodes on this one machine (127.0.0.1), so "network" is loopback: the peer
rows measure the pipeline (TCP, hashing, tmpfs and SSD writes on 2 cores), not a data-centre
link. moto copies each ranged GET's whole object in Python, so "s3" measures moto more than
S3 (see bench_coldstart); it is here because it is what a node without a peer does.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from machine import stamp

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "peer"
ROWS = ("s3", "peer-dram", "peer-ssd", "tmpfs-copy", "start-s3", "start-peer", "burst")
PROMPT = "The capital of France is"


def ensure_checkpoint(size: str) -> Path:
    from ember.store import convert
    from ember.store.factory import make_model

    hf, ck = CACHE / f"llama-{size}-bf16", CACHE / f"llama-{size}-ember"
    if not (hf / "config.json").is_file():
        print(f"making the {size} factory model in {hf} (once)", flush=True)
        make_model(hf, "llama", size, "bf16")
    if not (ck / "index.json").is_file():
        convert(hf, ck, progress=False, overwrite=True)
    return ck


class Harness:
    """Two Ray nodes on 127.0.0.1, a node store actor on each, a moto S3 server."""

    def __init__(self, peers: bool = True) -> None:
        import ray
        from local_s3 import start_local_s3
        from ray.cluster_utils import Cluster

        from ember.cluster.node_store_actor import start_node_store
        from ember.store.node_store import NodeStoreConfig

        self.s3 = start_local_s3()
        self.remote, remote_cfg = self.s3.remote, self.s3.config
        self.shm = Path(f"/dev/shm/ember-bench-peer-{os.getuid()}")
        shutil.rmtree(self.shm, ignore_errors=True)
        shutil.rmtree(CACHE / "ssd", ignore_errors=True)
        common: dict[str, Any] = {"num_cpus": 1, "node_ip_address": "127.0.0.1"}
        self.cluster = Cluster(
            initialize_head=True, head_node_args={**common, "include_dashboard": False}
        )
        self.cluster.add_node(**common)
        self.cluster.wait_for_nodes()
        ray.init(address=self.cluster.address, namespace="ember", logging_level=logging.WARNING)
        self.ray = ray
        self.nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        self.stores = []
        for i, node in enumerate(self.nodes):
            cfg = NodeStoreConfig(
                dram_dir=str(self.shm / f"n{i}"), dram_capacity_bytes=8 << 30,
                ssd_dir=str(CACHE / "ssd" / f"n{i}"), ssd_capacity_bytes=16 << 30,
                remote=remote_cfg, peer_fetch=peers,
            )  # fmt: skip
            self.stores.append(start_node_store(node, cfg))
        self.dirs = [ray.get(s.tier_dirs.remote()) for s in self.stores]
        self.pool: Any = None  # node 1's pooled worker, for the start rows

    def start(self, url: str, settle_s: float) -> dict[str, Any]:
        """A cold start on node 1 from a pre-started worker, to the first token."""
        import asyncio

        from ember import SamplingParams
        from ember.cluster.worker_pool import WorkerPool
        from ember.controller.types import DeploymentSpec

        if self.pool is None:
            env = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
            self.pool = WorkerPool(1, str(CACHE / "ember-cache"), env=env, pack_weights=False)
        self.pool.sync([self.nodes[1]])
        (idle,) = self.pool.idle()[self.nodes[1]]
        self.ray.get(idle.actor.info.remote())  # warm: imports done
        time.sleep(settle_s)
        spec = DeploymentSpec(name="bench", source=url, max_model_len=256, max_num_seqs=2)
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)

        async def run() -> dict[str, Any]:
            t0 = time.perf_counter()
            ref = self.pool.take(self.nodes[1], refill=False)
            await ref.actor.assign.remote(spec, "bench-0")
            await ref.actor.start.remote()
            t_load = time.perf_counter()
            gen = ref.actor.generate.options(num_returns="streaming").remote("r0", PROMPT, params)
            async for obj in gen:
                if (await obj).finished:
                    break
            t_token = time.perf_counter()
            timings = await ref.actor.start_timings.remote()
            self.ray.kill(ref.actor, no_restart=True)
            return {
                "seconds": t_token - t0, "load_s": t_load - t0, "first_token_s": t_token - t_load,
                "store_s": timings.get("store_s"), "engine_s": timings.get("engine_s"),
                "served_from": timings.get("served_from"),
            }  # fmt: skip

        got = asyncio.run(run())
        # The killed worker's pin is reaped, and the fetch it started is done: the store
        # answered as soon as the engine could map the copy, and the fetch goes on after the
        # first token (evicting before it commits would leave the next row a whole copy).
        deadline = time.monotonic() + 300
        while any(
            r.pins or r.fetched is not None
            for r in self.ray.get(self.stores[1].status.remote())
            if r.key == url
        ):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} still pinned or fetching on node 1")
            time.sleep(0.05)
        return got

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
        self.ray.shutdown()
        self.cluster.shutdown()
        self.s3.stop()
        shutil.rmtree(self.shm, ignore_errors=True)

    def push(self, ck: Path, name: str) -> str:
        from ember.store.remote import parse_s3_url

        url = f"s3://bench/{name}"
        self.remote.upload_checkpoint(ck, parse_s3_url(url))
        return url

    def evict(self, i: int, url: str, *tiers: str) -> None:
        for tier in tiers:
            self.ray.get(self.stores[i].evict.remote(url, tier))

    def place(self, url: str, row: str) -> float | None:
        """Node 1 holds nothing; node 0 holds what `row` needs. Returns the largest share of a
        node 0 SSD file left in the page cache (peer-ssd), refusing above 1%."""
        from ember.store.node_store import checkpoint_key
        from ember.store.pagecache import evict

        self.evict(1, url, "dram", "ssd")
        if row in ("s3", "start-s3"):
            self.evict(0, url, "dram", "ssd")
            for i, store in enumerate(self.stores):
                left = [r for r in self.ray.get(store.status.remote()) if r.key == url]
                if left:
                    raise RuntimeError(f"node {i}: copies left after eviction: {left}")
            return None
        self.ray.get(self.stores[0].ensure.remote(url, "dram" if row != "peer-ssd" else "ssd"))
        if row != "peer-ssd":
            return None
        self.evict(0, url, "dram")
        copy = Path(self.dirs[0]["ssd"]) / checkpoint_key(url)
        residual = max(evict(f) for f in copy.iterdir() if f.is_file())
        if residual > 0.01:
            raise RuntimeError(f"{copy}: {residual:.1%} still in the page cache after eviction")
        return residual

    def fetch(self, url: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        report = self.ray.get(self.stores[1].ensure.remote(url, "dram"))
        return {"seconds": time.perf_counter() - t0, "served_from": report.served_from}

    def burst(self, url: str, settle_s: float) -> dict[str, Any]:
        """Both nodes fetch at once (node 1 once node 0's fetch is under way)."""
        self.place(url, "s3")
        time.sleep(settle_s)
        t0 = time.perf_counter()
        first = self.stores[0].ensure.remote(url, "dram")
        while not any(
            r.fetched is not None
            for r in self.ray.get(self.stores[0].status.remote())
            if r.key == url and r.tier == "dram"
        ):
            time.sleep(0.01)
        t1 = time.perf_counter()
        second = self.ray.get(self.stores[1].ensure.remote(url, "dram"))
        t2 = time.perf_counter()
        report = self.ray.get(first)
        return {
            "seconds": max(t2, t0 + report.seconds) - t0,
            "node0_s": report.seconds, "node1_s": t2 - t1, "node1_starts_after_s": t1 - t0,
            "served_from": second.served_from, "node0_served_from": report.served_from,
        }  # fmt: skip

    def tmpfs_copy(self, url: str, settle_s: float) -> dict[str, Any]:
        from ember.store.node_store import checkpoint_key

        self.ray.get(self.stores[0].ensure.remote(url, "dram"))
        time.sleep(settle_s)
        src = Path(self.dirs[0]["dram"]) / checkpoint_key(url)
        dst = self.shm / "copy"
        shutil.rmtree(dst, ignore_errors=True)
        t0 = time.perf_counter()
        subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
        seconds = time.perf_counter() - t0
        shutil.rmtree(dst, ignore_errors=True)
        return {"seconds": seconds, "served_from": "tmpfs"}


def _memory() -> dict[str, float]:
    """Memory available and the load average right after a run: moto keeps whole objects in
    memory and copies one per ranged GET, which can leave the next rows short of memory."""
    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, value = line.split(":", 1)
        info[name] = int(value.split()[0]) / 2**20
    return {"mem_available_gib": round(info["MemAvailable"], 1), "load_1m": os.getloadavg()[0]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="1b", help="factory model size (bf16)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument(
        "--settle-s", type=float, default=15.0,
        help="pause between placing the copies and the timed fetch: a fetch right after the "
        "setup's own fetch (from S3, say) ran 2-3x slower without one",
    )  # fmt: skip
    p.add_argument(
        "--no-peers", action="store_true",
        help="node stores with peer_fetch=False (the burst without peers)",
    )  # fmt: skip
    p.add_argument("--out", default=None, help="default: benchmarks/results/peer.json")
    args = p.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    rows_wanted = [r for r in args.rows.split(",") if r]
    for r in rows_wanted:
        if r not in ROWS:
            raise SystemExit(f"unknown row {r!r}; rows: {', '.join(ROWS)}")
    ck = ensure_checkpoint(args.size)
    nbytes = sum(f.stat().st_size for f in ck.iterdir() if f.name.startswith("rank"))
    h = Harness(peers=not args.no_peers)
    runs: list[dict[str, Any]] = []
    try:
        url = h.push(ck, args.size)
        for i in range(args.runs):  # rows interleaved: a slow moment of the machine hits all
            for row in rows_wanted:
                if row == "tmpfs-copy":
                    got = h.tmpfs_copy(url, args.settle_s)
                elif row == "burst":
                    got = h.burst(url, args.settle_s)
                elif row.startswith("start-"):
                    h.place(url, row)
                    got = h.start(url, args.settle_s)
                else:
                    residual = h.place(url, row)
                    time.sleep(args.settle_s)
                    got = h.fetch(url)
                    if residual is not None:
                        got["page_cache_residual"] = residual
                got.update(row=row, run=i, gbps=nbytes / got["seconds"] / 1e9, **_memory())
                runs.append(got)
                print(json.dumps(got), flush=True)
    finally:
        h.close()
    summary = {}
    for row in rows_wanted:
        mine = [r for r in runs if r["row"] == row]
        secs = [r["seconds"] for r in mine]
        summary[row] = {
            "seconds_min": min(secs),
            "seconds_median": statistics.median(secs),
            "gbps_best": nbytes / min(secs) / 1e9,
            "gbps_median": nbytes / statistics.median(secs) / 1e9,
            "served_from": sorted({r["served_from"] for r in mine}),
        }
    for base, rows in (("s3", ("peer-dram", "peer-ssd")), ("start-s3", ("start-peer",))):
        for row in rows:
            if base in summary and row in summary:
                summary[row]["speedup_vs_s3_median"] = (
                    summary[base]["seconds_median"] / summary[row]["seconds_median"]
                )
    result = {
        **stamp("peer"),
        "settings": {
            "model": f"llama {args.size} factory model, bf16",
            "partition_bytes": nbytes,
            "runs": args.runs,
            "settle_s": args.settle_s,
            "peers": not args.no_peers,
            "nodes": "two Ray nodes on one machine (127.0.0.1), one node store actor each",
            "s3": "moto server on loopback",
            "timed": "node 1's node store ensure(url, 'dram'): fetch, verify, DRAM + SSD write; "
            "start-*: a pooled worker on node 1 to its first token (1 torch thread)",
        },
        "runs": runs,
        "summary": summary,
    }
    out = args.out or str(ROOT / "benchmarks" / "results" / "peer.json")
    Path(out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
