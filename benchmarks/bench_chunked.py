"""What chunked prefill buys the requests already running when a long prompt arrives.

One engine in this process (Llama 125m factory model, bf16, packed weights, 2 torch threads)
decodes `--decoders` requests (32-token prompts, ignore_eos, long outputs). Once they all decode,
a `--long`-token prompt arrives. The run records the wall time of every step until that prompt's
first token and `--after` steps more, and reports, for each `max_num_batched_tokens`:

- the longest gap between two tokens of a running request (the step that prefills the most of
  the long prompt), and the p50 of those gaps over the window;
- the long prompt's time to first token (from its `add_request` to the step that samples it).

Budget 8192 (above the prompt) is the engine before chunked prefill: the whole prompt in one
step beside the decodes. Smaller budgets split it into chunks of what the decodes leave.
The budgets run one after another in one process, each on a fresh engine, `--rounds` times
interleaved; the median of the rounds is reported.

    python benchmarks/bench_chunked.py [--long 1900] [--decoders 16] [--budgets 8192,2048,512]

Writes benchmarks/results/chunked.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from machine import stamp

ROOT = Path(__file__).resolve().parents[1]
BENCH_MODELS = Path.home() / ".cache" / "ember" / "bench-models"


def model_dir() -> Path:
    """The 125m factory model bench_engine uses, made once (random weights)."""
    from ember.store.factory import make_model

    path = BENCH_MODELS / "llama-125m"
    if not (path / "config.json").is_file():
        make_model(path, "llama", "125m", "bf16", seed=0)
    return path


def one_run(model: Path, budget: int, decoders: int, long: int, after: int) -> dict[str, float]:
    from ember.engine import Engine, EngineConfig, SamplingParams

    engine = Engine(
        EngineConfig(
            model=str(model), max_model_len=2048, max_num_seqs=decoders + 1,
            max_num_batched_tokens=budget,
        )
    )  # fmt: skip
    engine._executor.wait_packed()  # type: ignore[attr-defined]  # packed, as when serving
    decode = SamplingParams(max_tokens=1000, temperature=0.0, ignore_eos=True)
    for i in range(decoders):
        engine.add_request(f"d{i}", [10 + i] * 32, decode)
    for _ in range(8):  # every decoder past its prefill, steps at their steady size
        engine.step()
    gaps: list[float] = []
    t_add = time.perf_counter()
    engine.add_request("long", list(range(100, 100 + long)), SamplingParams(max_tokens=2))
    ttft = None
    left = after
    last = t_add
    while left > 0:
        outs = engine.step()
        now = time.perf_counter()
        if any(o.request_id.startswith("d") and o.new_token_ids for o in outs):
            gaps.append(now - last)
            last = now
        if ttft is None and any(o.request_id == "long" and o.new_token_ids for o in outs):
            ttft = now - t_add
        if ttft is not None:
            left -= 1
    engine.close()
    assert ttft is not None
    return {"max_gap_s": max(gaps), "p50_gap_s": statistics.median(gaps), "long_ttft_s": ttft}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--long", type=int, default=1900, help="tokens of the arriving prompt")
    ap.add_argument("--decoders", type=int, default=16, help="requests decoding meanwhile")
    ap.add_argument("--budgets", default="8192,2048,512", help="max_num_batched_tokens values")
    ap.add_argument("--after", type=int, default=8, help="steps recorded after its first token")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "chunked.json"))
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    budgets = [int(b) for b in args.budgets.split(",")]
    model = model_dir()
    runs: dict[int, list[dict[str, float]]] = {b: [] for b in budgets}
    with tempfile.TemporaryDirectory() as cache:
        os.environ.setdefault("EMBER_CACHE_DIR", cache)
        for _ in range(args.rounds):
            for b in budgets:
                runs[b].append(one_run(model, b, args.decoders, args.long, args.after))
    rows = []
    print(f"{args.decoders} requests decoding, a {args.long}-token prompt arrives (median of "
          f"{args.rounds}):")  # fmt: skip
    print(f"{'budget':>8} {'longest gap ms':>15} {'p50 gap ms':>11} {'long TTFT ms':>13}")
    for b in budgets:
        row = {k: statistics.median(r[k] for r in runs[b]) for k in runs[b][0]}
        rows.append({"max_num_batched_tokens": b, **row, "runs": runs[b]})
        print(f"{b:>8} {row['max_gap_s'] * 1e3:>15.1f} {row['p50_gap_s'] * 1e3:>11.1f} "
              f"{row['long_ttft_s'] * 1e3:>13.1f}")  # fmt: skip
    result = {
        **stamp("chunked"),
        "metric": "longest gap between two tokens of a running request while a long prompt is "
        "prefilled",
        "setup": {
            "model": "llama-125m bf16 random (packed)",
            "threads": args.threads,
            "decoders": args.decoders,
            "long_prompt_tokens": args.long,
            "rounds": args.rounds,
        },
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
