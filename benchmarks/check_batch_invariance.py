"""Do greedy tokens depend on what else is in the batch, and on a recompute? Per dtype.

On the 125m factory model (random weights), for fp32 and bf16: six greedy requests of 128
tokens (16-token random prompts), each generated alone and all six in one batch; and each
resumed (`Engine.resume_request`: its first 64 tokens recomputed in a prefill) after its
undisturbed run. Reports, per request, the first token where the batch run or the resumed run
parts from the request run alone (None: nowhere).

    python benchmarks/check_batch_invariance.py [--out benchmarks/results/batch-invariance.json]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

from machine import stamp

ROOT = Path(__file__).resolve().parents[1]
MODEL = Path.home() / ".cache" / "ember" / "bench-models" / "llama-125m"


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)


def one_dtype(model: Path, dtype: str, prompts: list[list[int]], cut: int) -> dict[str, Any]:
    from ember import LLM, SamplingParams

    llm = LLM(str(model), dtype=dtype)
    try:
        llm.engine.wait_for_packing()
        params = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
        alone = [list(llm.generate([p], params)[0].token_ids) for p in prompts]
        batch = [list(o.token_ids) for o in llm.generate(prompts, params)]
        resumed = []
        engine = llm.engine
        for i, (prompt, ids) in enumerate(zip(prompts, alone, strict=True)):
            engine.resume_request(f"r{i}", prompt, params, ids[:cut])
            last = None
            while engine.has_unfinished():
                for out in engine.step():
                    if out.finished:
                        last = out
            assert last is not None
            resumed.append(list(last.token_ids))
    finally:
        llm.close()
    return {
        "dtype": dtype,
        "batch_vs_alone_first_difference": [
            first_difference(a, b) for a, b in zip(alone, batch, strict=True)
        ],
        "resumed_vs_alone_first_difference": [
            first_difference(a, r) for a, r in zip(alone, resumed, strict=True)
        ],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=MODEL)
    p.add_argument("--cut", type=int, default=64, help="tokens kept before the resume")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "batch-invariance.json"))
    args = p.parse_args()
    if not (args.model / "config.json").is_file():
        from ember.store.factory import make_model

        make_model(args.model, "llama", "125m", "bf16")
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 30000) for _ in range(16)] for _ in range(6)]
    rows = [one_dtype(args.model, dtype, prompts, args.cut) for dtype in ("fp32", "bf16")]
    for row in rows:
        print(json.dumps(row), flush=True)
    result = {
        **stamp("batch-invariance"),
        "settings": {
            "model": "llama 125m factory model (bf16 weights)",
            "requests": 6,
            "prompt_tokens": 16,
            "max_tokens": 128,
            "greedy": True,
            "resume_cut": args.cut,
        },  # fmt: skip
        "results": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
