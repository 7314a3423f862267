"""`ember bench serve`: what the serving path costs on top of the engine, over real HTTP.

Two measurements, each against the engine called in-process in the same run, on the same
random-weight model, prompts and sampling parameters (greedy, ignore_eos, so every request makes
exactly the tokens it asks for):

1. Warm request overhead: time to first token of one request at a time, streamed over HTTP from
   `ember serve` (API -> router -> Ray actor -> engine thread and back), minus the engine's own
   time to first token (add_request -> first token out of step()). p50 and p99. Target: <= 10 ms
   at p50.
2. Throughput: the same request mix (lengths drawn with a fixed seed from the ShareGPT length
   trace, prompts <= 512 tokens, outputs <= 128; 512 requests on the tiny model, 32 on 125m) at
   the same concurrency on both sides (32 = max_num_seqs requests in flight; a new one starts as
   soon as one ends), over HTTP vs the engine running the same requests in-process. Output
   tokens/s, median of the timed passes (5 tiny, 2 125m) after one untimed warm-up pass on each
   side; the ratio is the median of each HTTP pass's tokens/s over the engine pass run just
   before it (this VM's speed drifts by 10-20% within minutes, so each pair shares its phase).
   Target: >= 90% of the engine's.

3. The CPU the API process (`ember serve`: HTTP, router, controller) and this client use during
   the HTTP passes, as shares of one core (`throughput.api_process_cpu`, `client_cpu`): what the
   serving path needs beside the instance's own core.

The two sides never run at the same time (2 cores) but alternate in rounds (10 TTFT requests
each, then whole passes of the mix), so a busy neighbour on a shared machine slows both alike;
the in-process engine uses as many torch threads as an instance actor does (`instance_cpus`, 1 by
default) and the same weight layout (`--pack-weights`, packed by default; the server's pooled
workers are told through EMBER_POOL_PACK_WEIGHTS). Prompts are token ids, so both sides see
exactly the same prompt lengths.

    python benchmarks/bench_serve.py [--quick] [--size tiny|125m] [--url http://127.0.0.1:8000]

Writes benchmarks/results/serve.json (serve-quick.json with --quick).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from machine import stamp

ROOT = Path(__file__).resolve().parents[1]
LENGTHS_CSV = Path("/work/shared/traces/workload/sharegpt/lengths.csv")
MODEL_NAME = "bench"
# Prompts <= 512 and outputs <= 128 fit; it also bounds the KV cache both sides allocate.
MAX_MODEL_LEN = 1024


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def request_mix(n: int, max_prompt: int, max_output: int, vocab: int, seed: int = 0) -> list:
    """(prompt token ids, output tokens) per request, lengths from the ShareGPT trace."""
    rng = random.Random(seed)
    pairs: list[tuple[int, int]] = []
    if LENGTHS_CSV.is_file():
        with LENGTHS_CSV.open() as f:
            rows = [(int(r["num_prefill_tokens"]), int(r["num_decode_tokens"]))
                    for r in csv.DictReader(f)]  # fmt: skip
        rows = [(p, d) for p, d in rows if 4 <= p <= max_prompt and 1 <= d <= max_output]
        pairs = [rng.choice(rows) for _ in range(n)]
    else:  # the trace is not in this checkout: uniform lengths, said in the JSON
        pairs = [(rng.randint(16, max_prompt), rng.randint(16, max_output)) for _ in range(n)]
    return [([rng.randrange(10, vocab) for _ in range(p)], d) for p, d in pairs]


# --- the engine in-process ---------------------------------------------------------------------


class InProcess:
    """The baseline: an Engine in this process, with the threads an instance actor gets."""

    def __init__(self, model: Path, max_num_seqs: int, pack_weights: bool, threads: int) -> None:
        import torch

        from ember.engine.config import EngineConfig
        from ember.engine.engine import Engine

        # An instance actor runs torch with `instance_cpus` threads: give the baseline the same.
        torch.set_num_threads(threads)
        self.engine = Engine(
            EngineConfig(
                model=str(model),
                max_num_seqs=max_num_seqs,
                max_model_len=MAX_MODEL_LEN,
                pack_weights=pack_weights,
            )
        )
        self._ids = 0

    def _id(self) -> str:
        self._ids += 1
        return f"r{self._ids}"

    def ttft(self, prompt: list[int]) -> float:
        """add_request -> the first step output that carries a token."""
        from ember import SamplingParams

        engine = self.engine
        one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        engine.add_request(self._id(), prompt, one)
        got = False
        while not got:
            got = any(o.new_token_ids for o in engine.step())
        dt = time.perf_counter() - t0
        while engine.has_unfinished():
            engine.step()
        return dt

    def mix(self, mix: list, concurrency: int) -> tuple[int, float]:
        """(output tokens, seconds) for the whole request mix, at most `concurrency` requests
        in the engine at once (a new one is added as soon as one finishes, as a client would)."""
        from ember import SamplingParams

        engine = self.engine
        pending = list(reversed(mix))
        live = 0
        t0 = time.perf_counter()
        tokens = 0
        while pending or engine.has_unfinished():
            while pending and live < concurrency:
                prompt, out = pending.pop()
                params = SamplingParams(max_tokens=out, temperature=0.0, ignore_eos=True)
                engine.add_request(self._id(), prompt, params)
                live += 1
            for o in engine.step():
                tokens += len(o.new_token_ids)
                live -= bool(o.finished)
        return tokens, time.perf_counter() - t0

    def close(self) -> None:
        self.engine.close()


# --- CPU accounting ----------------------------------------------------------------------------


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used, all its threads."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- ember over HTTP ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(
    state: Path, pack_weights: bool, threads: int
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    config = state / "ember.yaml"  # the instance reserves `threads` CPUs; its torch threads follow
    config.write_text(json.dumps({"ray": {"instance_cpus": threads}}) + "\n")
    cmd = [sys.executable, "-m", "ember", "serve", "--port", str(port), "--no-demo",
           "--config", str(config),
           "--state-dir", str(state / "state"), "--cache-dir", str(state / "cache")]  # fmt: skip
    log = (state / "serve.log").open("wb")
    # "local": a private Ray instance even when another one runs on this machine.
    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           # The instances' engines lay their weights out as the baseline's does.
           "EMBER_POOL_PACK_WEIGHTS": "1" if pack_weights else "0"}  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ember serve exited ({proc.returncode}); see {state / 'serve.log'}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"ember serve did not answer /health in 180 s; see {state / 'serve.log'}")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    for sig, wait_s in ((signal.SIGINT, 30), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            return
        os.killpg(proc.pid, sig)
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            continue


def deploy(url: str, model: Path, max_num_seqs: int) -> None:
    spec = {"name": MODEL_NAME, "source": str(model), "min_instances": 1, "max_instances": 1,
            "keep_alive_s": 3600.0, "max_num_seqs": max_num_seqs, "max_queue": 4096,
            "max_model_len": MAX_MODEL_LEN,
            "request_timeout_s": 1800.0}  # fmt: skip
    r = httpx.post(url + "/admin/deployments", json=spec, timeout=30)
    r.raise_for_status()
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = httpx.get(url + "/admin/status", timeout=10).json()
        for dep in status["deployments"]:
            if dep["name"] == MODEL_NAME and any(i["state"] == "ready" for i in dep["instances"]):
                return
        time.sleep(0.5)
    raise RuntimeError("the benchmark deployment did not become ready in 600 s")


async def http_ttft(client: httpx.AsyncClient, prompt: list[int]) -> float:
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 1, "temperature": 0,
            "ignore_eos": True, "stream": True}  # fmt: skip
    t0 = time.perf_counter()
    first = None
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if first is None and line.startswith("data: {"):
                first = time.perf_counter() - t0
    assert first is not None, "no chunk arrived"
    return first


async def http_mix(url: str, mix: list, concurrency: int) -> tuple[int, float]:
    """(output tokens, seconds) for the whole request mix, `concurrency` requests at a time.

    aiohttp (what `vllm bench serve` uses; a dependency of ray[default]) spends about a third
    of httpx's CPU per request, and the client shares the machine's cores with the server."""
    import aiohttp

    slots = asyncio.Semaphore(concurrency)
    conn = aiohttp.TCPConnector(limit=concurrency + 4)
    timeout = aiohttp.ClientTimeout(total=1800)
    async with aiohttp.ClientSession(url, connector=conn, timeout=timeout) as session:

        async def one(prompt: list[int], out: int) -> int:
            body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": out, "temperature": 0,
                    "ignore_eos": True}  # fmt: skip
            async with slots, session.post("/v1/completions", json=body) as r:
                r.raise_for_status()
                return int((await r.json())["usage"]["completion_tokens"])

        await one(*mix[0])  # opens a connection outside the timed part
        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one(p, o) for p, o in mix))
        return sum(counts), time.perf_counter() - t0


class Passes:
    """The timed passes of the throughput mix: (output tokens, seconds) per side, and the CPU
    the API process and this client used in each HTTP pass, as shares of one core."""

    def __init__(self) -> None:
        self.engine: list[tuple[int, float]] = []
        self.http: list[tuple[int, float]] = []
        self.api_cpu: list[float] = []
        self.client_cpu: list[float] = []


async def interleaved(
    url: str, base: InProcess, prompt: list[int], rounds: int, per_round: int, mix: list,
    passes: int, concurrency: int, api_pid: int | None,
) -> tuple[list[float], list[float], Passes]:  # fmt: skip
    """Alternate the two sides in rounds, so a busy neighbour on the machine slows both alike.
    The engine side blocks the event loop while it runs: nothing else is in flight then."""
    limits = httpx.Limits(max_connections=len(mix) + 4, max_keepalive_connections=len(mix) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=1800, limits=limits) as client:
        for _ in range(10):  # warm-up, untimed
            base.ttft(prompt)
            await http_ttft(client, prompt)
        e_ttft: list[float] = []
        h_ttft: list[float] = []
        for _ in range(rounds):
            e_ttft += [base.ttft(prompt) for _ in range(per_round)]
            h_ttft += [await http_ttft(client, prompt) for _ in range(per_round)]
        base.mix(mix, concurrency)  # warm-up passes (batch shapes), untimed
        await http_mix(url, mix, concurrency)
        runs = Passes()
        for _ in range(passes):
            runs.engine.append(base.mix(mix, concurrency))
            api0 = cpu_s(api_pid) if api_pid is not None else 0.0
            client0 = time.process_time()  # the engine side is idle now: this is the client
            runs.http.append(await http_mix(url, mix, concurrency))
            wall = runs.http[-1][1]
            runs.client_cpu.append((time.process_time() - client0) / wall)
            if api_pid is not None:
                runs.api_cpu.append((cpu_s(api_pid) - api0) / wall)
    return e_ttft, h_ttft, runs


def _instance_cpus() -> float:
    from ember.cluster.cluster import ClusterConfig

    return ClusterConfig().instance_cpus


# --- main --------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, few requests (a minute)")
    ap.add_argument("--size", choices=("tiny", "125m"), help="factory Llama size")
    ap.add_argument("--url", help="use this running ember server instead of starting one")
    ap.add_argument("--requests", type=int, help="requests in the throughput mix")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/serve[-quick].json)")
    ap.add_argument(
        "--pack-weights", type=int, choices=(0, 1), default=1,
        help="engine weight layout on both sides (1: packed for oneDNN, the engine's default; "
        "0: plain, what pooled workers use with EMBER_POOL_PACK_WEIGHTS=0)",
    )  # fmt: skip
    ap.add_argument(
        "--threads", type=int, help="torch threads on both sides (the instance's instance_cpus; "
        "default: ember's, 1)",
    )  # fmt: skip
    ap.add_argument("--note", default="", help="free text stored in the JSON")
    args = ap.parse_args()
    pack = bool(args.pack_weights)
    threads = args.threads or max(1, int(_instance_cpus()))
    size = args.size or ("tiny" if args.quick else "125m")
    # A tiny model's requests are quick: more of them, so that a pass lasts seconds, as a 125m
    # pass of 32 does. With 128, a pass took 0.5-0.9 s and its ratio wandered from 69% to 82%
    # between runs of the same code.
    n_req = args.requests or {"tiny": 64 if args.quick else 512, "125m": 32}[size]
    n_ttft = 20 if args.quick else 50
    max_prompt, max_output = (128, 64) if args.quick else (512, 128)
    max_num_seqs = 32
    concurrency = max_num_seqs  # requests in flight at once, on both sides
    repeats = 5 if size == "tiny" else 2

    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)
    from ember.store.factory import make_model

    work = Path(tempfile.mkdtemp(prefix="ember-bench-serve-"))
    try:
        model = make_model(work / "model", "llama", size, "bf16", seed=0)
        vocab = json.loads((model / "config.json").read_text())["vocab_size"]
        rng = random.Random(1)
        ttft_prompt = [rng.randrange(10, vocab) for _ in range(64)]
        mix = request_mix(n_req, max_prompt, max_output, vocab)
        print(f"model: llama {size} bf16 (random weights); {n_req} requests; "
              f"{sum(len(p) for p, _ in mix)} prompt / {sum(o for _, o in mix)} output tokens")  # fmt: skip

        base = InProcess(model, max_num_seqs, pack, threads)
        proc = None
        url = args.url
        try:
            if url is None:
                proc, url = start_server(work, pack, threads)
            deploy(url, model, max_num_seqs)
            t = time.perf_counter()
            api_pid = proc.pid if proc is not None else None
            e_ttft, h_ttft, runs = asyncio.run(
                interleaved(
                    url, base, ttft_prompt, n_ttft // 10, 10, mix, repeats, concurrency, api_pid
                )
            )
            print(f"measured in {time.perf_counter() - t:.0f} s", flush=True)
        finally:
            base.close()
            if proc is not None:
                stop_server(proc)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    ms = 1000.0
    e50, e99 = percentile(e_ttft, 0.5) * ms, percentile(e_ttft, 0.99) * ms
    h50, h99 = percentile(h_ttft, 0.5) * ms, percentile(h_ttft, 0.99) * ms
    # Median over the timed passes of each side.
    e_runs, h_runs = runs.engine, runs.http
    e_tps = statistics.median(t / w for t, w in e_runs)
    h_tps = statistics.median(t / w for t, w in h_runs)
    # Each HTTP pass against the engine pass just before it, then the median of those ratios.
    pairs = zip(e_runs, h_runs, strict=True)
    pair_ratios = [(ht / hw) / (et / ew) for (et, ew), (ht, hw) in pairs]
    ratio = statistics.median(pair_ratios)
    api_cpu = statistics.median(runs.api_cpu) if runs.api_cpu else None
    client_cpu = statistics.median(runs.client_cpu)
    e_tokens, h_tokens = e_runs[0][0], h_runs[0][0]
    rows = [
        ("TTFT p50 (ms)", e50, h50, h50 - e50),
        ("TTFT p99 (ms)", e99, h99, h99 - e99),
        ("TTFT mean (ms)", statistics.mean(e_ttft) * ms, statistics.mean(h_ttft) * ms,
         (statistics.mean(h_ttft) - statistics.mean(e_ttft)) * ms),
        ("output tokens/s", e_tps, h_tps, ratio),
    ]  # fmt: skip
    print(f"\n{'':18} {'engine':>10} {'ember HTTP':>11} {'overhead/ratio':>15}")
    for name, a, b, c in rows:
        print(f"{name:18} {a:10.2f} {b:11.2f} {c:15.3f}")
    overhead = h50 - e50
    print(f"\nwarm request overhead p50 {overhead:.2f} ms (target <= 10), "
          f"p99 {h99 - e99:.2f} ms; throughput {ratio:.1%} of the engine (target >= 90%; "
          f"passes: {', '.join(f'{r:.1%}' for r in pair_ratios)})")  # fmt: skip
    api = f"API process {api_cpu:.0%} of a core, " if api_cpu is not None else ""
    print(f"CPU during the HTTP passes: {api}client {client_cpu:.0%} of a core")
    result = {
        **stamp("serve"),
        "metric": "warm request overhead p50 (HTTP TTFT - engine TTFT)",
        "value": overhead,
        "unit": "ms",
        "baseline": e50,
        "baseline_name": "engine's own TTFT in-process, same prompt (p50)",
        "ratio": h50 / e50,
        "targets": {"overhead_p50_ms_max": 10.0, "throughput_ratio_min": 0.9},
        "ttft_ms": {
            "engine_p50": e50,
            "engine_p99": e99,
            "http_p50": h50,
            "http_p99": h99,
            "overhead_p50": overhead,
            "overhead_p99": h99 - e99,
        },  # fmt: skip
        "throughput": {
            "metric": "output tokens/s",
            "engine": e_tps,
            "http": h_tps,
            "ratio": ratio,
            "pass_ratios": pair_ratios,
            "api_process_cpu": api_cpu,
            "client_cpu": client_cpu,
            "engine_tokens": e_tokens,
            "http_tokens": h_tokens,
        },  # fmt: skip
        "setup": {
            "model": f"llama-{size} bf16 random",
            "requests": n_req,
            "ttft_samples": n_ttft,
            "ttft_prompt_tokens": len(ttft_prompt),
            "max_num_seqs": max_num_seqs,
            "concurrency": concurrency,
            "torch_threads": threads,
            "passes": repeats,
            "engine_pack_weights": pack,
            "lengths": "sharegpt trace" if LENGTHS_CSV.is_file() else "uniform",
            "server": args.url or "ember serve (local Ray, one instance)",
        },  # fmt: skip
        "quick": args.quick,
        "note": args.note,
        "load_average_at_end": os.getloadavg(),
    }
    out = Path(args.out) if args.out else (
        ROOT / "benchmarks" / "results" / ("serve-quick.json" if args.quick else "serve.json")
    )  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
