"""The workload formats: recognising a file from its first line, and one reader per format
turning its lines into rows (arrival s, prompt tokens, output tokens, model). Errors name the
file and line (`TraceError`). `workload.read_workload` sorts, rescales and packs the rows; the
formats are listed in its module docstring.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from ember.errors import ConfigError, TraceError

MAX_REQUESTS = 5_000_000  # a count trace may expand to billions (MAF: 1.2e10); refuse, name --rate


@dataclass(frozen=True, slots=True)
class ReadOptions:
    """Defaults for missing lengths, the rate for Poisson formats, the seeded RNG, the horizon."""

    prompt: int
    output: int
    rate: float | None
    rng: random.Random
    horizon_s: float


Row = tuple[float, int, int, str]  # arrival_s, prompt, output, model
Reader = Callable[[Path, list[str], ReadOptions], list[Row]]


def pick_reader(p: Path, head: str, lines: list[str]) -> Reader:
    """The reader for this file's format (module docstring of workload.py), from its first line."""
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


def _row(
    p: Path,
    no: int,
    t: float,
    prompt: tuple[str | int | float, str],
    output: tuple[str | int | float, str],
    model: str = "model",
) -> Row:
    """One request row; `prompt` and `output` are (value, column name for errors)."""
    return (t, _tokens(p, no, *prompt), _tokens(p, no, *output), model)


def _split(p: Path, no: int, line: str, n: int) -> list[str]:
    cols = [c.strip() for c in line.split(",")]
    if len(cols) < n:
        raise TraceError(p, no, f"expected at least {n} comma-separated columns, got {len(cols)}")
    return cols


def _read_spotserve_query(p: Path, lines: list[str], o: ReadOptions) -> list[Row]:
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


def _read_spotserve_rates(p: Path, lines: list[str], o: ReadOptions) -> list[Row]:
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


def _counts_to_arrivals(counts: list[float], o: ReadOptions, scale: float) -> list[float]:
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


def _count_scale(counts: list[float], o: ReadOptions) -> float:
    """Factor that makes the minutes replayed (those before the horizon) average `o.rate`."""
    if math.isfinite(o.horizon_s):
        counts = counts[: max(1, math.ceil(o.horizon_s / 60.0))]
    total = sum(counts)
    if o.rate is None or total == 0:
        return 1.0
    return o.rate * 60.0 * len(counts) / total


def _read_maf_counts(p: Path, lines: list[str], o: ReadOptions) -> list[Row]:
    counts: list[float] = []
    for no, ln in enumerate(lines[1:], start=2):
        if ln.strip():
            counts.append(_num(p, no, _split(p, no, ln, 2)[1], "Requests", integer=True))
    arr = _counts_to_arrivals(counts, o, _count_scale(counts, o))
    return [(t, o.prompt, o.output, "model") for t in arr]


def _read_azure_llm(p: Path, lines: list[str], o: ReadOptions) -> list[Row]:
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
        rows.append(_row(p, no, t, (c[1], "ContextTokens"), (c[2], "GeneratedTokens")))
    return rows


def _read_mooncake(p: Path, lines: list[str], o: ReadOptions) -> list[Row]:
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
            _row(
                p, no, t, (d["input_length"], "input_length"), (d["output_length"], "output_length")
            )
        )
    return rows


def _read_sharegpt(p: Path, lines: list[str], o: ReadOptions) -> list[Row]:
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
        rows.append(_row(p, no, t, (c[0], "num_prefill_tokens"), (c[1], "num_decode_tokens")))
    return rows


def _read_burstgpt(p: Path, lines: list[str], o: ReadOptions) -> list[Row]:
    rows: list[Row] = []
    for no, ln in enumerate(lines[1:], start=2):
        if not ln.strip():
            continue
        c = _split(p, no, ln, 4)
        if _num(p, no, c[3], "Response tokens") == 0:
            continue  # a failed request in BurstGPT
        rows.append(
            _row(
                p,
                no,
                _num(p, no, c[0], "Timestamp"),
                (c[2], "Request tokens"),
                (c[3], "Response tokens"),
                c[1] or "model",
            )
        )
    return rows


def _read_azure_functions_2019(p: Path, lines: list[str], o: ReadOptions) -> list[Row]:
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


def _read_azure_functions_2021(p: Path, lines: list[str], o: ReadOptions) -> list[Row]:
    rows: list[Row] = []
    for no, ln in enumerate(lines[1:], start=2):
        if not ln.strip():
            continue
        c = _split(p, no, ln, 4)
        end, dur = _num(p, no, c[2], "end_timestamp"), _num(p, no, c[3], "duration")
        rows.append((max(0.0, end - dur), o.prompt, o.output, f"fn-{c[0][:8]}-{c[1][:8]}"))
    return rows


TIMESTAMPED: tuple[Reader, ...] = (  # formats with their own timestamps: --rate stretches them
    _read_spotserve_query,
    _read_azure_llm,
    _read_mooncake,
    _read_burstgpt,
    _read_azure_functions_2021,
)
