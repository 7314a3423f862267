"""Workloads: every format under shared/traces/workload/ and SpotServe's query files, read into
one `Workload` (arrival times with prompt and output lengths, and a model per request).

Formats are recognised from the content (header or row shape):
- `spotserve-query`: `id,arrival_s,input_len,byte_offset`, no header (SpotServe query/*.txt).
- `spotserve-rates`: one line of per-minute mean rates in req/s (SpotServe arrival-rates.csv).
- `maf-counts`: `Time (min),Requests` per-minute counts (SkyServe's Azure Functions workload).
- `azure-llm`: `TIMESTAMP,ContextTokens,GeneratedTokens` (Azure LLM inference trace 2023).
- `mooncake`: JSON Lines with `timestamp` (ms), `input_length`, `output_length`.
- `sharegpt`: `num_prefill_tokens,num_decode_tokens,...` lengths only; arrivals are Poisson at
  the rate given (it has no timestamps).
- `burstgpt`: `Timestamp,Model,Request tokens,Response tokens,...` (failed rows skipped).
- `azure-functions-2019`: per-function per-minute invocation counts; each function is a model.
- `azure-functions-2021`: `app,func,end_timestamp,duration`; arrival = end - duration.
Counts and rates become arrivals placed by a seeded random.Random (uniform within the minute for
counts, Poisson for rates). Lengths missing from a format come from `prompt_tokens` /
`output_tokens` (defaults 512 / 128, SpotServe's setting). `rate_rps` rescales the load keeping
its shape: timestamps are stretched by a constant, counts are thinned or multiplied.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

from ember.errors import ConfigError, TraceError
from ember.sim.workload_formats import TIMESTAMPED, ReadOptions, pick_reader

DEFAULT_PROMPT_TOKENS = 512  # SpotServe's evaluation: 512-token prompts ...
DEFAULT_OUTPUT_TOKENS = 128  # ... and 128 generated tokens (fixed in its engine config)


@dataclass(frozen=True, slots=True)
class Workload:
    """Requests sorted by arrival; parallel tuples, one entry per request."""

    path: str
    fmt: str
    arrival_s: tuple[float, ...]
    prompt_tokens: tuple[int, ...]
    output_tokens: tuple[int, ...]
    model: tuple[int, ...]  # index into `models`
    models: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.arrival_s)

    def mean_rate_rps(self) -> float:
        if len(self.arrival_s) < 2:
            return 0.0
        span = self.arrival_s[-1] - self.arrival_s[0]
        return (len(self.arrival_s) - 1) / span if span > 0 else math.inf

    def until(self, end_s: float) -> Workload:
        """Only the requests arriving before `end_s`."""
        n = next((i for i, t in enumerate(self.arrival_s) if t >= end_s), len(self.arrival_s))
        return Workload(
            self.path,
            self.fmt,
            self.arrival_s[:n],
            self.prompt_tokens[:n],
            self.output_tokens[:n],
            self.model[:n],
            self.models,
        )


def read_workload(
    path: str | Path,
    *,
    prompt_tokens: int | None = None,
    output_tokens: int | None = None,
    rate_rps: float | None = None,
    seed: int = 0,
    horizon_s: float = math.inf,
) -> Workload:
    """Read any supported workload file (see the module doc); arrivals from `horizon_s` on are
    dropped (count formats never expand the minutes past it)."""
    p = Path(path)
    for name, v in (("--prompt-tokens", prompt_tokens), ("--output-tokens", output_tokens)):
        if v is not None and v < 1:
            raise ConfigError(f"{name} must be >= 1, got {v}")
    if rate_rps is not None and not rate_rps > 0:
        raise ConfigError(f"--rate must be > 0 req/s, got {rate_rps}")
    if not p.is_file():
        raise TraceError(p, None, "no such workload file")
    try:
        lines = p.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise TraceError(p, None, f"cannot read: {e}") from e
    opts = ReadOptions(
        prompt_tokens or DEFAULT_PROMPT_TOKENS,
        output_tokens or DEFAULT_OUTPUT_TOKENS,
        rate_rps,
        random.Random(seed),
        horizon_s,
    )
    head = next((ln.strip() for ln in lines if ln.strip()), "")
    reader = pick_reader(p, head, lines)
    rows = reader(p, lines, opts)
    rows.sort(key=lambda r: r[0])
    stretch = rate_rps is not None and reader in TIMESTAMPED
    if rows and not stretch:  # a stretched trace is cut after stretching, below
        rows = [r for r in rows if r[0] - rows[0][0] < horizon_s]
    if not rows:
        raise TraceError(p, None, "no requests in workload")
    t0 = rows[0][0]
    models = sorted({r[3] for r in rows})
    index = {m: i for i, m in enumerate(models)}
    wl = Workload(
        str(p),
        reader.__name__.removeprefix("_read_").replace("_", "-"),
        tuple(r[0] - t0 for r in rows),
        tuple(r[1] for r in rows),
        tuple(r[2] for r in rows),
        tuple(index[r[3]] for r in rows),
        tuple(models),
    )
    if stretch:
        assert rate_rps is not None
        wl = _stretch(wl, rate_rps).until(horizon_s)
    return wl


def _stretch(wl: Workload, rate_rps: float) -> Workload:
    mean = wl.mean_rate_rps()
    if not math.isfinite(mean) or mean <= 0:
        return wl
    f = mean / rate_rps
    return Workload(
        wl.path,
        wl.fmt,
        tuple(t * f for t in wl.arrival_s),
        wl.prompt_tokens,
        wl.output_tokens,
        wl.model,
        wl.models,
    )
