"""Spot availability traces: every format under shared/traces/spot/, read into one `SpotTrace`.

A `SpotTrace` is a time-ordered list of node events (`add`: a node is acquired, `remove`: it is
preempted at that time), the end of the replay, the GPUs per node, optional target-rate changes
and an optional spot-price series. Notices are not in the files: the simulator derives them
(a `remove` at t is noticed at t - grace period, as SpotServe's artifact replays its segments).

Formats (recognised from the content, not the file name):
- `spotserve-seg`: JSON Lines `[t_ms, "add"|"remove"|"other"|"DONE", {"nodes": [...],
  "required_tpt"?: x}]`; lines starting with `#` are comments (SpotServe's test.txt).
- `spotserve-csv`: `timestamp_ms,add|remove,node_id` with no header (SpotServe's g4dn.csv).
- `count-json`: `{"metadata": {"gap_seconds": g}, "data": [n_0, n_1, ...], "prices"?: [...]}`,
  the number of nodes alive at tick i (SkyPilot spot-traces, SkyServe/SpotHedge data); turned
  into add/remove events, removing the most recently added node first.
- a directory of count-json files: one zone per file, merged (node names carry the zone).

Every malformed input raises `TraceError(path, line, reason)`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

from ember.errors import TraceError

ADD = "add"
REMOVE = "remove"

# GPUs per node by format: SpotServe's trace is AWS g4dn.12xlarge (4x T4); the JSON sets encode
# "<gpu>_<count>" in the file name (v100_1, v100_8, a100_40gb_8); CPU-only files count as 1.
SPOTSERVE_GPUS_PER_NODE = 4
_GPU_COUNT = re.compile(r"_(?:v100|k80|a100(?:_\d+gb)?|t4|a10g|h100|l4)_(\d+)$", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class NodeEvent:
    """One node joins (`add`) or leaves (`remove`) the fleet at `t_s` seconds from the start."""

    t_s: float
    op: str
    node: str
    zone: str = ""


@dataclass(frozen=True, slots=True)
class RateChange:
    """From `t_s` on, the optimizer must meet `rate_rps` (SpotServe's `required_tpt`)."""

    t_s: float
    rate_rps: float


@dataclass(frozen=True, slots=True)
class SpotTrace:
    """A replayable spot trace; events are sorted by time, removes before adds at equal times."""

    path: str
    fmt: str
    events: tuple[NodeEvent, ...]
    end_s: float
    gpus_per_node: int
    rate_changes: tuple[RateChange, ...] = ()
    spot_prices: tuple[
        tuple[float, float], ...
    ] = ()  # (t_s, USD per node-hour), if the file has them

    def nodes_alive(self, t_s: float) -> int:
        alive: set[str] = set()
        for ev in self.events:
            if ev.t_s > t_s:
                break
            if ev.op == ADD:
                alive.add(ev.node)
            else:
                alive.discard(ev.node)
        return len(alive)

    def max_nodes(self) -> int:
        alive, best = 0, 0
        for ev in self.events:
            alive += 1 if ev.op == ADD else -1
            best = max(best, alive)
        return best

    def time_scaled(self, factor: float) -> SpotTrace:
        """The same events `factor` times faster (SpotServe's *_tight segments do this by hand)."""
        if not factor > 0:
            raise TraceError(self.path, None, f"time factor must be > 0, got {factor}")
        return replace(
            self,
            events=tuple(replace(ev, t_s=ev.t_s / factor) for ev in self.events),
            end_s=self.end_s / factor,
            rate_changes=tuple(replace(r, t_s=r.t_s / factor) for r in self.rate_changes),
            spot_prices=tuple((t / factor, p) for t, p in self.spot_prices),
        )

    def scaled(self, copies: int) -> SpotTrace:
        """`copies` independent replicas of this fleet (node names suffixed), for scale runs."""
        if copies < 1:
            raise TraceError(self.path, None, f"scale factor must be >= 1, got {copies}")
        events = [replace(ev, node=f"{ev.node}#{k}") for ev in self.events for k in range(copies)]
        return replace(self, events=_sorted(events))


def _sorted(events: list[NodeEvent]) -> tuple[NodeEvent, ...]:
    return tuple(sorted(events, key=lambda e: (e.t_s, e.op != REMOVE, e.node)))


def read_spot_trace(path: str | Path, gpus_per_node: int | None = None) -> SpotTrace:
    """Read any supported spot trace (file or directory of zone files); see the module doc."""
    p = Path(path)
    if p.is_dir():
        return _read_zone_dir(p, gpus_per_node)
    if not p.is_file():
        raise TraceError(p, None, "no such spot trace file")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise TraceError(p, None, f"cannot read: {e}") from e
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    if first.startswith("{"):
        return _read_count_json(p, text, gpus_per_node)
    if first.startswith("[") or first.startswith("#["):
        return _read_segment(p, text, gpus_per_node)
    if re.match(r"^\d+(\.\d+)?\s*,\s*(add|remove)\s*,", first):
        return _read_csv(p, text, gpus_per_node)
    raise TraceError(
        p,
        1,
        f"unknown spot trace format (first line {first[:60]!r}); expected SpotServe JSON "
        "Lines, SpotServe CSV (ms,add|remove,node) or a count JSON {metadata, data}",
    )


def _check_time(path: Path, line: int, t_ms: object, last: float) -> float:
    if isinstance(t_ms, bool) or not isinstance(t_ms, int | float):
        raise TraceError(path, line, f"timestamp must be a number of ms, got {t_ms!r}")
    t = float(t_ms) / 1000.0
    if t < 0:
        raise TraceError(path, line, f"negative timestamp {t_ms}")
    if t < last:
        raise TraceError(
            path, line, f"timestamp {t_ms} ms goes back in time (previous {last * 1e3:g})"
        )
    return t


def _read_segment(path: Path, text: str, gpus_per_node: int | None) -> SpotTrace:
    events: list[NodeEvent] = []
    rates: list[RateChange] = []
    last, end = 0.0, None
    for no, raw in enumerate(text.splitlines(), start=1):
        s = raw.strip()
        if not s or s.startswith("#"):
            continue
        try:
            row = json.loads(s)
        except json.JSONDecodeError as e:
            raise TraceError(path, no, f"not JSON: {e.msg}") from e
        if not (isinstance(row, list) and len(row) == 3 and isinstance(row[2], dict)):
            raise TraceError(
                path, no, 'expected [t_ms, "add"|"remove"|"other"|"DONE", {"nodes": [...]}]'
            )
        t = _check_time(path, no, row[0], last)
        op, body = row[1], row[2]
        nodes = body.get("nodes", [])
        if not isinstance(nodes, list) or not all(isinstance(n, str) for n in nodes):
            raise TraceError(path, no, "'nodes' must be a list of node names")
        if "required_tpt" in body:
            rate = body["required_tpt"]
            if isinstance(rate, bool) or not isinstance(rate, int | float) or rate < 0:
                raise TraceError(path, no, f"required_tpt must be a rate >= 0, got {rate!r}")
            rates.append(RateChange(t, float(rate)))
        if op == "DONE":
            end = t
            break
        if op not in (ADD, REMOVE, "other"):
            raise TraceError(
                path, no, f"unknown operation {op!r}; expected add, remove, other, DONE"
            )
        if op != "other":
            events.extend(NodeEvent(t, op, n) for n in nodes)
        last = t
    if not events:
        raise TraceError(path, None, "no add/remove events")
    _check_consistent(path, events)
    return SpotTrace(
        path=str(path),
        fmt="spotserve-seg",
        events=_sorted(events),
        end_s=end if end is not None else last + 60.0,
        gpus_per_node=gpus_per_node or SPOTSERVE_GPUS_PER_NODE,
        rate_changes=tuple(rates),
    )


def _read_csv(path: Path, text: str, gpus_per_node: int | None) -> SpotTrace:
    events: list[NodeEvent] = []
    last = 0.0
    for no, raw in enumerate(text.splitlines(), start=1):
        s = raw.strip()
        if not s:
            continue
        cols = [c.strip() for c in s.split(",")]
        if len(cols) != 3:
            raise TraceError(
                path, no, f"expected 3 columns timestamp_ms,op,node_id, got {len(cols)}"
            )
        try:
            t_ms = float(cols[0])
        except ValueError as e:
            raise TraceError(path, no, f"timestamp {cols[0]!r} is not a number") from e
        t = _check_time(path, no, t_ms, last)
        if cols[1] not in (ADD, REMOVE):
            raise TraceError(path, no, f"unknown operation {cols[1]!r}; expected add or remove")
        if not cols[2]:
            raise TraceError(path, no, "empty node id")
        events.append(NodeEvent(t, cols[1], cols[2]))
        last = t
    if not events:
        raise TraceError(path, None, "no events")
    _check_consistent(path, events)
    return SpotTrace(
        path=str(path),
        fmt="spotserve-csv",
        events=_sorted(events),
        end_s=last + 60.0,  # events are at 1-minute granularity: replay one more minute
        gpus_per_node=gpus_per_node or SPOTSERVE_GPUS_PER_NODE,
    )


def _check_consistent(path: Path, events: list[NodeEvent]) -> None:
    alive: set[str] = set()
    for ev in events:
        if ev.op == ADD:
            if ev.node in alive:
                raise TraceError(path, None, f"node {ev.node} added at {ev.t_s:g} s while alive")
            alive.add(ev.node)
        elif ev.node not in alive:
            raise TraceError(path, None, f"node {ev.node} removed at {ev.t_s:g} s but never added")
        else:
            alive.discard(ev.node)


def _json_line_of(text: str, key: str) -> int | None:
    idx = text.find(f'"{key}"')
    return None if idx < 0 else text.count("\n", 0, idx) + 1


def _count_series(path: Path, text: str) -> tuple[float, list[int], list[float]]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise TraceError(path, e.lineno, f"not JSON: {e.msg}") from e
    if not isinstance(doc, dict) or "data" not in doc:
        raise TraceError(path, 1, "count trace needs a 'data' list (and metadata.gap_seconds)")
    meta = doc.get("metadata")
    gap = meta.get("gap_seconds") if isinstance(meta, dict) else None
    if isinstance(gap, bool) or not isinstance(gap, int | float) or gap <= 0:
        raise TraceError(
            path,
            _json_line_of(text, "metadata") or 1,
            f"metadata.gap_seconds must be > 0, got {gap!r}",
        )
    data = doc["data"]
    line = _json_line_of(text, "data")
    if not isinstance(data, list) or not data:
        raise TraceError(path, line, "'data' must be a non-empty list of node counts")
    for i, n in enumerate(data):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise TraceError(path, line, f"data[{i}] = {n!r}: node counts must be integers >= 0")
    prices = doc.get("prices") or []
    if not isinstance(prices, list) or any(
        isinstance(x, bool) or not isinstance(x, int | float) or x < 0 for x in prices
    ):
        raise TraceError(
            path, _json_line_of(text, "prices"), "'prices' must be a list of USD/h >= 0"
        )
    return float(gap), data, [float(x) for x in prices]


def _gpus_from_name(path: Path) -> int:
    m = _GPU_COUNT.search(path.stem)
    return int(m.group(1)) if m else 1


def _count_events(zone: str, gap: float, data: list[int]) -> list[NodeEvent]:
    events: list[NodeEvent] = []
    stack: list[str] = []
    serial = 0
    for i, n in enumerate(data):
        t = i * gap
        while len(stack) > n:
            events.append(NodeEvent(t, REMOVE, stack.pop(), zone))
        while len(stack) < n:
            name = f"{zone}/n{serial}" if zone else f"n{serial}"
            serial += 1
            stack.append(name)
            events.append(NodeEvent(t, ADD, name, zone))
    return events


def _read_count_json(path: Path, text: str, gpus_per_node: int | None) -> SpotTrace:
    gap, data, prices = _count_series(path, text)
    events = _count_events(path.stem, gap, data)  # may be empty: a zone that never had capacity
    return SpotTrace(
        path=str(path),
        fmt="count-json",
        events=_sorted(events),
        end_s=len(data) * gap,
        gpus_per_node=gpus_per_node or _gpus_from_name(path),
        spot_prices=tuple((i * gap, p) for i, p in enumerate(prices)),
    )


def _read_zone_dir(path: Path, gpus_per_node: int | None) -> SpotTrace:
    files = sorted(path.glob("*.json"))
    if not files:
        raise TraceError(path, None, "directory holds no *.json zone traces")
    events: list[NodeEvent] = []
    end, gpus = 0.0, set()
    for f in files:
        one = _read_count_json(f, f.read_text(), gpus_per_node)
        events.extend(one.events)
        end = max(end, one.end_s)
        gpus.add(one.gpus_per_node)
    if len(gpus) != 1:
        raise TraceError(path, None, f"zone files disagree on GPUs per node: {sorted(gpus)}")
    return SpotTrace(
        path=str(path),
        fmt="count-json-dir",
        events=_sorted(events),
        end_s=end,
        gpus_per_node=gpus.pop(),
    )
