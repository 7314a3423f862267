"""`ember bench coldstart --device cuda`: time to first token on a GPU with no instance running,
the checkpoint in the node store's DRAM tier, against a fresh transformers process and against
the pinned host-to-device ceiling for the same bytes.

It needs neither Ray nor S3 (GPU hosts lent for a benchmark may have neither): the node store
runs in this process (`NodeStore`, the object the per-node store actor wraps) and puts the
checkpoint in its DRAM tier (shared memory); each ember run is a child process that loads from
that copy the way an instance does (`Engine(device="cuda")`: DRAM tier -> pinned staging
buffers -> GPU, overlapped), then generates. Rows, each the median of `--runs`:

- baseline: a fresh `python`; import torch and transformers; `from_pretrained(device_map=
  "cuda")` from the HF folder (bf16 safetensors, page cache warm); tokenize; generate 1 token.
  Timed from `Popen` to the token.
- ember, fresh process: a fresh `python` given the DRAM-tier path; imports, CUDA context,
  engine (weights, tokenizer, KV cache), first token. Timed from `Popen`. This is the serving
  path on a GPU node today: the worker pool is CPU-only (an idle pooled worker holds no GPU).
- ember, pre-started worker: a process that already did a pool worker's warm-up for CUDA
  (`warm_engine_process("cuda")`: imports, CUDA context, first-call kernels, pinned staging
  buffers) is handed the path; timed from the hand-over. What a GPU-holding pool would give.
- ember, pre-started worker with the DRAM tier pinned: the same, and the warm-up also pinned
  the DRAM tier's copy (`pin=`: its files registered with the driver), so the load is a DMA
  from the tier's pages with no staging copy. The pinning is part of the warm-up, not timed.
- ceiling: the weight bytes over the pinned host-to-device bandwidth measured here.

The breakdown reports `weights_s` (the engine's own load timer: DRAM tier to GPU, synchronized),
`engine_s` (the rest of engine construction: model objects, tokenizer, KV cache) and the first
token; `tpot_s` is the time per output token over 16 more tokens, and `second_first_token_s`
the time to first token of the same request sent again (what the first forward pass at the
model's shapes costs on top). Writes benchmarks/results/coldstart-cuda.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench_coldstart import CACHE, DECODE_TOKENS, PROMPT, ROOT, median_run, run_baseline, save_doc
from machine import machine_facts

DRAM = Path("/dev/shm") / f"ember-bench-coldstart-gpu-{os.getuid()}"
EMBER_ROWS = ("ember-fresh-process", "ember-prestarted", "ember-prestarted-pinned")


def worker(mode: str, device: str, path: str) -> int:
    """A child: (pre-started: warm up, pinning the DRAM tier's copy at `path` if the mode is
    "prestarted-pinned", say "ready", read the path from stdin; fresh: `path`) then build the
    engine on `device` and generate; prints its timestamps as JSON."""
    t_start = time.time()
    warm_s = None
    if mode.startswith("prestarted"):
        from ember.store.warmup import warm_engine_process

        warm_s = warm_engine_process(device, pin=[path] if mode == "prestarted-pinned" else [])
        print("ready", flush=True)
        path = sys.stdin.readline().strip()
    t_given = time.time()
    import torch

    from ember.engine import Engine, EngineConfig, SamplingParams

    t_import = time.time()
    engine = Engine(
        EngineConfig(
            model=path, device=device, max_model_len=512, max_num_seqs=4, kv_cache_bytes=1 << 30
        )
    )
    t_engine = time.time()
    params = SamplingParams(max_tokens=1 + DECODE_TOKENS, temperature=0.0, ignore_eos=True)
    engine.add_request("r0", PROMPT, params)
    tokens: list[int] = []
    t_token = 0.0
    while engine.has_unfinished():
        for out in engine.step():
            if not tokens and out.new_token_ids:
                t_token = time.time()
            tokens += out.new_token_ids
    t_end = time.time()
    # The same request again: its time to first token is the first one's without the first
    # forward pass at these shapes (kernel loading and selection).
    engine.add_request("r1", PROMPT, params)
    t_again, again_s = time.time(), None
    while again_s is None:
        if any(out.new_token_ids for out in engine.step()):
            again_s = time.time() - t_again
    engine.abort("r1")
    print(
        json.dumps(
            {
                "t_start": t_start, "t_given": t_given, "t_import": t_import,
                "t_engine": t_engine, "t_token": t_token, "t_end": t_end,
                "weights_s": engine.load_s, "warm_s": warm_s, "token": tokens[0],
                "second_first_token_s": again_s,
                "gpu": torch.cuda.get_device_name(0) if device != "cpu" else None,
            }
        ),
        flush=True,
    )  # fmt: skip
    return 0


def _env() -> dict[str, str]:
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {
        **os.environ,
        "PYTHONPATH": pythonpath,
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }


def _last_json(text: str) -> dict[str, Any]:
    return dict(json.loads(text.strip().splitlines()[-1]))


def run_fresh(path: Path, device: str) -> dict[str, Any]:
    t0 = time.time()
    out = subprocess.run(
        [sys.executable, __file__, "--worker", "fresh", device, str(path)],
        capture_output=True, text=True, env=_env(), check=True,
    )  # fmt: skip
    r = _last_json(out.stdout)
    return _breakdown(r, t0) | {
        "python_s": r["t_start"] - t0,
        "import_s": r["t_import"] - r["t_start"],
    }


def run_prestarted(path: Path, device: str, pinned: bool = False) -> dict[str, Any]:
    """Pinned: the worker pins the DRAM tier's copy at `path` during its warm-up (a GPU pool
    worker knows its node's DRAM tier), before it is handed the request."""
    mode = "prestarted-pinned" if pinned else "prestarted"
    proc = subprocess.Popen(
        [sys.executable, __file__, "--worker", mode, device, str(path) if pinned else ""],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env(),
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    try:
        while (line := proc.stdout.readline()) and line.strip() != "ready":
            pass
        if not line:
            raise RuntimeError(f"pre-started worker exited {proc.wait()} before it was ready")
        time.sleep(0.5)  # idle, as a pooled worker is before a request
        t0 = time.time()
        proc.stdin.write(f"{path}\n")
        proc.stdin.flush()
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"pre-started worker exited {proc.returncode}")
    r = _last_json(out)
    return _breakdown(r, t0) | {"warm_s": r["warm_s"]}


def _breakdown(r: dict[str, Any], t0: float) -> dict[str, Any]:
    return {
        "total_s": r["t_token"] - t0,
        "weights_s": r["weights_s"],
        "engine_s": r["t_engine"] - r["t_import"] - r["weights_s"],
        "first_token_s": r["t_token"] - r["t_engine"],
        "tpot_s": (r["t_end"] - r["t_token"]) / DECODE_TOKENS,
        "second_first_token_s": r["second_first_token_s"],
        "token": r["token"],
    }


def pinned_h2d_gbps(nbytes: int, runs: int = 5) -> float:
    """Best of `runs` copies of `nbytes` from pinned host memory to the GPU."""
    import torch

    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dev.copy_(host, non_blocking=True)  # first-call setup, excluded
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    del host, dev
    torch.cuda.empty_cache()
    return nbytes / best / 1e9


def prepare(size: str) -> tuple[Path, Path, int]:
    """The HF folder, the ember checkpoint (converted once) and the weight bytes."""
    from ember.store import convert, read_index
    from ember.store.factory import make_model

    hf = CACHE / f"llama-{size}-bf16"
    if not (hf / "config.json").is_file():
        print(f"making llama {size} in {hf} ...", flush=True)
        make_model(hf, "llama", size, "bf16")
    ck = CACHE / f"llama-{size}-ember"
    if not (ck / "index.json").is_file():
        convert(hf, ck, progress=False, overwrite=True)
    return hf, ck, read_index(ck).rank_nbytes(0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1b", help="factory sizes (default 1b)")
    p.add_argument("--runs", type=int, default=3, help="runs per row; the median is reported")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "coldstart-cuda.json"))
    p.add_argument("--device", default="cuda", help="cpu only checks this script without a GPU")
    args, _ = p.parse_known_args(argv)
    from ember.store.node_store import NodeStore, NodeStoreConfig

    sizes = [s for s in args.sizes.split(",") if s]
    shutil.rmtree(DRAM, ignore_errors=True)
    store = NodeStore(
        NodeStoreConfig(
            dram_dir=str(DRAM / "dram"), dram_capacity_bytes=32 << 30,
            ssd_dir=str(DRAM / "ssd"), ssd_capacity_bytes=1 << 30,
        )
    )  # fmt: skip
    results: dict[str, Any] = {}
    threads = os.cpu_count() or 1
    try:
        for size in sizes:
            hf, ck, nbytes = prepare(size)
            dram_path = store.ensure(str(ck)).path
            h2d = pinned_h2d_gbps(nbytes) if args.device != "cpu" else float("nan")
            res: dict[str, Any] = {
                "weight_bytes": nbytes,
                "pinned_h2d_gbps": h2d,
                "ceiling_s": nbytes / h2d / 1e9,
                "dram_path": str(dram_path),
            }
            rows: dict[str, tuple[Any, Path]] = {
                "baseline": (lambda p, d: run_baseline(p, threads, d), hf),
                "ember-fresh-process": (run_fresh, dram_path),
                "ember-prestarted": (run_prestarted, dram_path),
                "ember-prestarted-pinned": (
                    lambda p, d: run_prestarted(p, d, pinned=True),
                    dram_path,
                ),
            }
            for name, (fn, path) in rows.items():
                cells = []
                for _ in range(args.runs):
                    cells.append(fn(path, args.device))
                    print(f"{size} {name}: " + json.dumps(cells[-1]), flush=True)
                res[name] = median_run(cells)
            # The same greedy first token everywhere (bf16 on different kernels may differ on a
            # near-tie: reported, not asserted).
            res["same_first_token"] = len({res[n]["token"] for n in rows}) == 1
            results[size] = res
            print_table(size, res)
    finally:
        shutil.rmtree(DRAM, ignore_errors=True)
    write_json(args.out, results, args.runs)
    return 0


def print_table(size: str, res: dict[str, Any]) -> None:
    base = res["baseline"]["total_s"]
    print(f"\ncold start to first token on the GPU, llama {size} bf16 (median; seconds)")
    print(f"{'path':<24}{'total':>8}{'weights':>9}{'engine':>8}{'1st tok':>9}{'speedup':>9}")
    b = res["baseline"]
    print(f"{'transformers (fresh)':<24}{base:>8.3f}{b['load_s']:>9.3f}{'-':>8}"
          f"{b['first_token_s']:>9.3f}{1.0:>8.1f}x")  # fmt: skip
    for name in EMBER_ROWS:
        r = res[name]
        print(f"{name:<24}{r['total_s']:>8.3f}{r['weights_s']:>9.3f}{r['engine_s']:>8.3f}"
              f"{r['first_token_s']:>9.3f}{base / r['total_s']:>8.1f}x")  # fmt: skip
    for name in ("ember-prestarted", "ember-prestarted-pinned"):
        weights = res[name]["weights_s"]
        print(
            f"{name}: weights {res['weight_bytes'] / 1e9:.2f} GB, DRAM tier -> GPU in "
            f"{weights:.3f} s ({res['weight_bytes'] / weights / 1e9:.1f} GB/s); the same "
            f"request again: first token in {res[name]['second_first_token_s']:.3f} s"
        )
    print(
        f"pinned host-to-device ceiling "
        f"{res['pinned_h2d_gbps']:.1f} GB/s = {res['ceiling_s']:.3f} s; same first token in "
        f"every row: {res['same_first_token']}"
    )


def write_json(out: str, results: dict[str, Any], runs: int) -> None:
    rows = []
    for size, res in results.items():
        base = res["baseline"]["total_s"]
        for name in EMBER_ROWS:
            r = res[name]
            rows.append({
                "metric": f"coldstart_cuda_ttft_{name}_{size}", "value": r["total_s"],
                "unit": "s", "baseline": base, "ratio": base / r["total_s"],
            })  # fmt: skip
        for name in ("ember-prestarted", "ember-prestarted-pinned"):
            r = res[name]
            rows.append({
                "metric": f"coldstart_cuda_weights_gbps_{name}_{size}",
                "value": res["weight_bytes"] / r["weights_s"] / 1e9, "unit": "GB/s",
                "baseline": res["pinned_h2d_gbps"], "baseline_name": "pinned host-to-device copy",
                "ratio": res["ceiling_s"] / r["weights_s"],
            })  # fmt: skip
    doc = {
        "benchmark": "coldstart-cuda",
        "metric": "cold-start time to first token on cuda:0 (zero instances running)",
        "baseline": "fresh python + transformers from_pretrained(device_map='cuda') + 1 token",
        "rows": rows,
        "details": results,
    }
    save_doc(out, doc, runs, machine_facts())


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        sys.exit(worker(sys.argv[2], sys.argv[3], sys.argv[4]))
    sys.exit(main())
