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

import json
import math
import random
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from ember.errors import ConfigError, TraceError

DEFAULT_PROMPT_TOKENS = 512  # SpotServe's evaluation: 512-token prompts ...
DEFAULT_OUTPUT_TOKENS = 128  # ... and 128 generated tokens (fixed in its engine config)
MAX_REQUESTS = 5_000_000  # a count trace may expand to billions (MAF: 1.2e10); refuse, name --rate


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


@dataclass(frozen=True, slots=True)
class _Opts:
    prompt: int
    output: int
    rate: float | None
    rng: random.Random
    horizon_s: float


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
    opts = _Opts(
        prompt_tokens or DEFAULT_PROMPT_TOKENS,
        output_tokens or DEFAULT_OUTPUT_TOKENS,
        rate_rps,
        random.Random(seed),
        horizon_s,
    )
    head = next((ln.strip() for ln in lines if ln.strip()), "")
    reader = _pick_reader(p, head, lines)
    rows = reader(p, lines, opts)
    rows.sort(key=lambda r: r[0])
    stretch = rate_rps is not None and reader in _TIMESTAMPED
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


Row = tuple[float, int, int, str]  # arrival_s, prompt, output, model


def _pick_reader(p: Path, head: str, lines: list[str]):  # type: ignore[no-untyped-def]
    h = head.lower()
    if h.startswith("{"):
        return _read_mooncake
    if h.startswith("time (min),requests"):
        return _read_maf_counts
    if h.startswith("timestamp,contexttokens,generatedtokens"):
        return _read_azure_llm
    if h.startswith("num_prefill_tokens,num_decode_tokens"):
        return _read_sharegpt
    if h.startswith("timestamp,model,request tokens,response tokens"):
        return _read_burstgpt
    if h.startswith("hashowner,hashapp,hashfunction,trigger,"):
        return _read_azure_functions_2019
    if h.startswith("app,func,end_timestamp,duration"):
        return _read_azure_functions_2021
    if h.startswith("hashowner,hashapp,hashfunction,average") or h.startswith(
        "hashfunction,hashowner,hashapp,samplecount"
    ):
        raise TraceError(
            p, 1, "per-function duration/memory statistics, not a workload; pass invocations.csv"
        )
    cols = h.split(",")
    if len([ln for ln in lines if ln.strip()]) == 1 and len(cols) > 4:
        return _read_spotserve_rates
    if len(cols) == 4 and all(_is_number(c) for c in cols):
        return _read_spotserve_query
    raise TraceError(p, 1, f"unknown workload format (first line {head[:60]!r})")


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _num(p: Path, no: int, s: str, what: str, *, integer: bool = False) -> float:
    try:
        v = float(s)
    except ValueError as e:
        raise TraceError(p, no, f"{what} {s!r} is not a number") from e
    if not math.isfinite(v) or v < 0:
        raise TraceError(p, no, f"{what} must be >= 0, got {s}")
    if integer and v != int(v):
        raise TraceError(p, no, f"{what} must be an integer, got {s}")
    return v


def _tokens(p: Path, no: int, s: str | int | float, what: str) -> int:
    v = _num(p, no, str(s), what, integer=True)
    if v < 1:
        raise TraceError(p, no, f"{what} must be >= 1 token, got {s}")
    return int(v)


def _split(p: Path, no: int, line: str, n: int) -> list[str]:
    cols = [c.strip() for c in line.split(",")]
    if len(cols) < n:
        raise TraceError(p, no, f"expected at least {n} comma-separated columns, got {len(cols)}")
    return cols


def _read_spotserve_query(p: Path, lines: list[str], o: _Opts) -> list[Row]:
    rows: list[Row] = []
    for no, ln in enumerate(lines, start=1):
        if not ln.strip():
            continue
        c = _split(p, no, ln, 4)
        t = _num(p, no, c[1], "arrival_time_s")
        rows.append((t, _tokens(p, no, c[2], "input_len"), o.output, "model"))
    return rows


def _poisson_in(rng: random.Random, t0: float, t1: float, rate: float) -> list[float]:
    out: list[float] = []
    if rate <= 0:
        return out
    t = t0 + rng.expovariate(rate)
    while t < t1:
        out.append(t)
        t += rng.expovariate(rate)
    return out


def _read_spotserve_rates(p: Path, lines: list[str], o: _Opts) -> list[Row]:
    no = next(i for i, ln in enumerate(lines, start=1) if ln.strip())
    rates = [_num(p, no, c, f"rate #{k}") for k, c in enumerate(lines[no - 1].split(","))]
    if o.rate is not None:
        mean = sum(rates) / len(rates)
        rates = [r * o.rate / mean for r in rates] if mean > 0 else rates
    rows: list[Row] = []
    for minute, r in enumerate(rates):
        if minute * 60.0 >= o.horizon_s:
            break
        for t in _poisson_in(o.rng, minute * 60.0, (minute + 1) * 60.0, r):
            rows.append((t, o.prompt, o.output, "model"))
    return rows


def _counts_to_arrivals(counts: list[float], o: _Opts, scale: float) -> list[float]:
    minutes = (
        min(len(counts), math.ceil(o.horizon_s / 60.0))
        if math.isfinite(o.horizon_s)
        else len(counts)
    )
    expected = scale * sum(counts[:minutes])
    if expected > MAX_REQUESTS:
        raise ConfigError(
            f"the workload expands to {expected:.3g} requests (over {MAX_REQUESTS:,}): "
            "give --rate R to rescale it, or a shorter spot trace"
        )
    out: list[float] = []
    for minute, c in enumerate(counts[:minutes]):
        want = c * scale
        n = int(want) + (1 if o.rng.random() < want - int(want) else 0)
        out.extend(sorted(minute * 60.0 + 60.0 * o.rng.random() for _ in range(n)))
    return out


def _count_scale(counts: list[float], o: _Opts) -> float:
    """Factor that makes the minutes replayed (those before the horizon) average `o.rate`."""
    if math.isfinite(o.horizon_s):
        counts = counts[: max(1, math.ceil(o.horizon_s / 60.0))]
    total = sum(counts)
    if o.rate is None or total == 0:
        return 1.0
    return o.rate * 60.0 * len(counts) / total


def _read_maf_counts(p: Path, lines: list[str], o: _Opts) -> list[Row]:
    counts: list[float] = []
    for no, ln in enumerate(lines[1:], start=2):
        if ln.strip():
            counts.append(_num(p, no, _split(p, no, ln, 2)[1], "Requests", integer=True))
    arr = _counts_to_arrivals(counts, o, _count_scale(counts, o))
    return [(t, o.prompt, o.output, "model") for t in arr]


def _read_azure_llm(p: Path, lines: list[str], o: _Opts) -> list[Row]:
    rows: list[Row] = []
    for no, ln in enumerate(lines[1:], start=2):
        if not ln.strip():
            continue
        c = _split(p, no, ln, 3)
        ts = c[0]
        if "." in ts:  # seven fractional digits: trim to the six fromisoformat takes
            head, frac = ts.split(".", 1)
            ts = f"{head}.{frac[:6]}"
        try:
            t = datetime.fromisoformat(ts).timestamp()
        except ValueError as e:
            raise TraceError(p, no, f"TIMESTAMP {c[0]!r} is not a date-time") from e
        rows.append(
            (
                t,
                _tokens(p, no, c[1], "ContextTokens"),
                _tokens(p, no, c[2], "GeneratedTokens"),
                "model",
            )
        )
    return rows


def _read_mooncake(p: Path, lines: list[str], o: _Opts) -> list[Row]:
    rows: list[Row] = []
    for no, ln in enumerate(lines, start=1):
        if not ln.strip():
            continue
        try:
            d = json.loads(ln)
        except json.JSONDecodeError as e:
            raise TraceError(p, no, f"not JSON: {e.msg}") from e
        if not isinstance(d, dict):
            raise TraceError(p, no, "expected a JSON object per line")
        for key in ("timestamp", "input_length", "output_length"):
            if key not in d:
                raise TraceError(p, no, f"missing field {key!r}")
        t = _num(p, no, str(d["timestamp"]), "timestamp") / 1000.0
        rows.append(
            (
                t,
                _tokens(p, no, d["input_length"], "input_length"),
                _tokens(p, no, d["output_length"], "output_length"),
                "model",
            )
        )
    return rows


def _read_sharegpt(p: Path, lines: list[str], o: _Opts) -> list[Row]:
    if o.rate is None:
        raise ConfigError(f"{p} has lengths but no timestamps: give --rate R for Poisson arrivals")
    rows: list[Row] = []
    t = 0.0
    for no, ln in enumerate(lines[1:], start=2):
        if not ln.strip():
            continue
        c = _split(p, no, ln, 2)
        t += o.rng.expovariate(o.rate)
        if t >= o.horizon_s:
            break
        rows.append(
            (
                t,
                _tokens(p, no, c[0], "num_prefill_tokens"),
                _tokens(p, no, c[1], "num_decode_tokens"),
                "model",
            )
        )
    return rows


def _read_burstgpt(p: Path, lines: list[str], o: _Opts) -> list[Row]:
    rows: list[Row] = []
    for no, ln in enumerate(lines[1:], start=2):
        if not ln.strip():
            continue
        c = _split(p, no, ln, 4)
        if _num(p, no, c[3], "Response tokens") == 0:
            continue  # a failed request in BurstGPT
        rows.append(
            (
                _num(p, no, c[0], "Timestamp"),
                _tokens(p, no, c[2], "Request tokens"),
                _tokens(p, no, c[3], "Response tokens"),
                c[1] or "model",
            )
        )
    return rows


def _read_azure_functions_2019(p: Path, lines: list[str], o: _Opts) -> list[Row]:
    header = _split(p, 1, lines[0], 5)
    n_min = len(header) - 4
    per_fn: list[tuple[str, list[float]]] = []
    for no, ln in enumerate(lines[1:], start=2):
        if not ln.strip():
            continue
        c = _split(p, no, ln, len(header))
        per_fn.append(
            (
                c[2][:12],
                [
                    _num(p, no, x, f"minute {header[4 + k]}", integer=True)
                    for k, x in enumerate(c[4 : 4 + n_min])
                ],
            )
        )
    totals = [sum(cs) for _, cs in per_fn]
    scale = (
        _count_scale([sum(col) for col in zip(*(cs for _, cs in per_fn), strict=True)], o)
        if sum(totals)
        else 1.0
    )
    rows: list[Row] = []
    for fn, counts in per_fn:
        rows.extend(
            (t, o.prompt, o.output, f"fn-{fn}") for t in _counts_to_arrivals(counts, o, scale)
        )
    return rows


def _read_azure_functions_2021(p: Path, lines: list[str], o: _Opts) -> list[Row]:
    rows: list[Row] = []
    for no, ln in enumerate(lines[1:], start=2):
        if not ln.strip():
            continue
        c = _split(p, no, ln, 4)
        end, dur = _num(p, no, c[2], "end_timestamp"), _num(p, no, c[3], "duration")
        rows.append((max(0.0, end - dur), o.prompt, o.output, f"fn-{c[0][:8]}-{c[1][:8]}"))
    return rows


_TIMESTAMPED = (
    _read_spotserve_query,
    _read_azure_llm,
    _read_mooncake,
    _read_burstgpt,
    _read_azure_functions_2021,
)


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
