"""The sampler: the Gumbel-max race against the inverse-CDF sampler it replaced (`--baseline-ref`).

Two measurements, each in one run against the baseline loaded from git (`git show
REF:ember/engine/sampling.py`, imported as its own module):
- the sampler alone: `sample()` on random logits of `rows` x `vocab` (temperature 0.8, every
  row seeded), median of `--repeats` calls, for rows 1/8/64 and the Llama (32,000) and Qwen2
  (151,936) vocabularies;
- the engine: `LLM.generate` of 64 sampled requests (128-token prompts, 128 new tokens,
  temperature 0.8, seeded) on the 125m factory model, bf16, 2 threads, with the engine's
  sampler set to one or the other (the baseline function replaces `ember.engine.engine.sample`
  for its runs; nothing else differs), runs alternating.

    python benchmarks/bench_sampler.py [--baseline-ref 2899c9c] [--runs 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from machine import stamp

ROOT = Path(__file__).resolve().parents[1]
MODEL = Path.home() / ".cache" / "ember" / "bench-models" / "llama-125m"


def baseline_sampler(ref: str, where: Path) -> Callable[..., Any]:
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{ref}:ember/engine/sampling.py"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    path = where / "baseline_sampling.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_sampling", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["baseline_sampling"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    fn: Callable[..., Any] = module.sample
    return fn


def time_sampler(fn: Callable[..., Any], rows: int, vocab: int, repeats: int) -> float:
    from ember.engine.sampling import SamplingParams

    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)) * 3
    params = [SamplingParams(temperature=0.8, seed=i) for i in range(rows)]
    gens = [torch.Generator().manual_seed(i) for i in range(rows)]
    fn(logits, params, gens)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(logits, params, gens)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_engine(llm: Any, prompts: list[list[int]]) -> float:
    from ember import SamplingParams

    params = [
        SamplingParams(max_tokens=128, temperature=0.8, seed=i, ignore_eos=True)
        for i in range(len(prompts))
    ]
    engine = llm.engine
    t0 = time.perf_counter()
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        engine.add_request(f"b{i}-{t0}", prompt, p)
    tokens = 0
    while engine.has_unfinished():
        for out in engine.step():
            tokens += len(out.new_token_ids)
    return tokens / (time.perf_counter() - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline-ref", default="2899c9c")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--model", type=Path, default=MODEL)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sampler.json"))
    args = p.parse_args()
    torch.set_num_threads(2)
    import ember.engine.engine as engine_module
    from ember.engine.sampling import sample

    with tempfile.TemporaryDirectory() as tmp:
        samplers = {"race": sample, "inverse_cdf": baseline_sampler(args.baseline_ref, Path(tmp))}
        alone = []
        for vocab in (32000, 151936):
            for rows in (1, 8, 64):
                row: dict[str, Any] = {"rows": rows, "vocab": vocab}
                for name, fn in samplers.items():
                    row[f"{name}_ms"] = time_sampler(fn, rows, vocab, args.repeats) * 1e3
                row["speedup"] = row["inverse_cdf_ms"] / row["race_ms"]
                alone.append(row)
                print(json.dumps(row), flush=True)

        if not (args.model / "config.json").is_file():
            from ember.store.factory import make_model

            make_model(args.model, "llama", "125m", "bf16")
        from ember import LLM

        llm = LLM(str(args.model), dtype="bf16", max_num_seqs=64)
        rng = random.Random(0)
        prompts = [[rng.randrange(100, 30000) for _ in range(128)] for _ in range(64)]
        engine_runs: dict[str, list[float]] = {name: [] for name in samplers}
        try:
            llm.engine.wait_for_packing()
            time_engine(llm, prompts[:8])  # warm-up
            for _ in range(args.runs):
                for name, fn in samplers.items():
                    engine_module.sample = fn  # type: ignore[attr-defined]
                    engine_runs[name].append(time_engine(llm, prompts))
                    print(f"engine {name}: {engine_runs[name][-1]:.1f} out tok/s", flush=True)
        finally:
            engine_module.sample = sample  # type: ignore[attr-defined]
            llm.close()
    medians = {name: statistics.median(v) for name, v in engine_runs.items()}
    engine_row: dict[str, Any] = {
        name: {"median_out_tok_s": medians[name], "runs": v} for name, v in engine_runs.items()
    }
    ratio = medians["race"] / medians["inverse_cdf"]
    result = {
        **stamp("sampler"),
        "baseline_ref": args.baseline_ref,
        "sampler_alone": alone,
        "engine_64_sampled_requests_125m_bf16": engine_row | {"ratio": ratio},
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"engine: race / inverse-CDF = {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
