"""What one simulated run measured: latency percentiles, completions, cost, and the timeline.

End-to-end latency is finish - arrival of every completed request; time to first token is the
first token's time - arrival. Requests not finished when the replay stops (trace end plus the
drain time) count as `lost`. Cost is node-hours held x price: spot nodes at the trace's mean
spot price when the file has one, else SpotServe's g4dn.12xlarge spot price ($1.9046/h for 4
GPUs, charged per GPU for other node sizes); GPU-hours
count every GPU of a held node (SpotServe's accounting: a held instance is paid for), from the
start until the last request finishes (or the trace ends, if later work never came).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np


@dataclass(slots=True)
class Counters:
    """What a run counts besides per-request times (one owner mutates it)."""

    events: int = 0
    switches: int = 0
    migrations: int = 0  # switches (or live migrations) that moved context, no reload
    cold_starts: int = 0  # instances/replicas that loaded weights from a storage tier
    moved_bytes: int = 0
    loaded_bytes: int = 0


if TYPE_CHECKING:
    from ember.sim.fleet import Requests
    from ember.sim.spot_trace import SpotTrace


@dataclass(frozen=True, slots=True)
class SimResult:
    """One policy's numbers on one input; `to_dict()` is the JSON record."""

    policy: str
    requests: int
    completed: int
    lost: int
    p50_s: float
    p90_s: float
    p99_s: float
    mean_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    slo_s: float
    slo_attainment: float
    cost_usd: float
    gpu_hours: float
    cold_starts: int
    migrations: int
    switches: int
    restarted_requests: int
    recomputed_tokens: int
    moved_gb: float
    loaded_gb: float
    events: int
    wall_s: float
    events_per_s: float
    timeline: tuple[tuple[float, int, int, str], ...]
    latencies_s: tuple[float, ...]

    def to_dict(self, *, with_samples: bool = False) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["timeline"] = [list(x) for x in self.timeline]
        if with_samples:
            d["latencies_s"] = list(self.latencies_s)
        else:
            d.pop("latencies_s")
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in d.items()}


def _pct(x: np.ndarray, q: float) -> float:
    return float(np.percentile(x, q)) if x.size else math.nan


def summarize(
    policy: str,
    reqs: Requests,
    trace: SpotTrace,
    counters: Counters,
    timeline: list[tuple[float, int, int, str]],
    *,
    slo_s: float,
    spot_usd_per_gpu_hour: float,
    node_seconds: float,
    wall_s: float,
) -> SimResult:
    r = reqs
    finish = np.asarray(r.finish, dtype=np.float64)
    arrival = np.asarray(r.arrival, dtype=np.float64)
    ok = ~np.isnan(finish)
    lat = finish[ok] - arrival[ok]
    ttft = np.asarray(r.first_token, dtype=np.float64)[ok] - arrival[ok]
    slo = slo_s
    n = len(arrival)
    prices = trace.spot_prices
    gpus_per_node = trace.gpus_per_node
    if prices:
        price = sum(p for _, p in prices) / len(prices)
    else:
        price = spot_usd_per_gpu_hour * gpus_per_node
    return SimResult(
        policy=policy,
        requests=n,
        completed=int(ok.sum()),
        lost=int(n - ok.sum()),
        p50_s=_pct(lat, 50),
        p90_s=_pct(lat, 90),
        p99_s=_pct(lat, 99),
        mean_s=float(lat.mean()) if lat.size else math.nan,
        ttft_p50_s=_pct(ttft, 50),
        ttft_p99_s=_pct(ttft, 99),
        slo_s=slo,
        slo_attainment=float((lat <= slo).sum() / n) if n else math.nan,
        cost_usd=node_seconds / 3600.0 * price,
        gpu_hours=node_seconds / 3600.0 * gpus_per_node,
        cold_starts=counters.cold_starts,
        migrations=counters.migrations,
        switches=counters.switches,
        restarted_requests=int(sum(1 for x in r.restarts if x)),
        recomputed_tokens=int(sum(r.recomputed)),
        moved_gb=counters.moved_bytes / 1e9,
        loaded_gb=counters.loaded_bytes / 1e9,
        events=counters.events,
        wall_s=wall_s,
        events_per_s=counters.events / wall_s if wall_s > 0 else math.inf,
        timeline=tuple(timeline),
        latencies_s=tuple(float(x) for x in np.sort(lat)),
    )
