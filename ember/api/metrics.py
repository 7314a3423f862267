"""Prometheus metrics of the API, the router and the controller, served at /metrics.

Each app owns its registry (several apps can live in one test process). Counters and
histograms are updated as requests run; the gauges that describe current state (queue depth,
in-flight requests, instances by state) and instance load times are read from the router and
the controller when Prometheus scrapes, so they are never stale.

    ember_requests_total{model,endpoint,status}        requests answered, by HTTP status
    ember_time_to_first_token_seconds{model}           arrival to first token (queue included)
    ember_time_per_output_token_seconds{model}         decode time per token after the first
    ember_request_duration_seconds{model}              arrival to last byte
    ember_prompt_tokens_total / ember_generation_tokens_total{model}   (rate() gives tokens/s)
    ember_queue_depth{model}, ember_requests_in_flight{model}
    ember_cold_starts_total{model}                     requests that found zero instances
    ember_requests_resumed_total{model}                requests resumed after their instance died
    ember_requests_quarantined_total{model}            requests ended as likely poison (router.py)
    ember_requests_migrated_total{model}               requests moved live off a node under notice
    ember_migration_kv_tokens_total{model}             tokens whose K/V a move sent (not recomputed)
    ember_migrations_failed_total{model}               live moves given up (no target in time, ...)
    ember_instance_load_seconds{model,tier}            instance start-up (load) time by tier
    ember_instances{model,state}                       instances by lifecycle state
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

LATENCY_BUCKETS_S = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)  # fmt: skip
TOKEN_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LOAD_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
INSTANCE_STATES = ("pending", "starting", "ready", "draining", "stopping", "stopped", "failed")


class _StateCollector(Collector):
    """Gauges read at scrape time from the router's loads and the controller's status."""

    def __init__(self, loads: Callable[[], dict[str, tuple[int, int]]], status: Callable[[], Any]):
        self._loads = loads
        self._status = status
        self._load_times: dict[tuple[str, str], list[float]] = {}  # (model, tier) -> seconds
        self._seen_instances: set[str] = set()

    def collect(self) -> Iterator[Metric]:
        queue = GaugeMetricFamily("ember_queue_depth", "Requests waiting", labels=["model"])
        flight = GaugeMetricFamily(
            "ember_requests_in_flight", "Requests on an instance", labels=["model"]
        )
        for model, (queued, in_flight) in sorted(self._loads().items()):
            queue.add_metric([model], queued)
            flight.add_metric([model], in_flight)
        instances = GaugeMetricFamily(
            "ember_instances", "Instances by lifecycle state", labels=["model", "state"]
        )
        try:
            statuses = list(self._status())
        except Exception:  # a scrape must not fail because the controller is busy or stopping
            logger.exception("metrics: controller status failed")
            statuses = []
        for st in statuses:
            counts = dict.fromkeys(INSTANCE_STATES, 0)
            for inst in st.instances:
                state = str(getattr(inst.state, "value", inst.state))
                counts[state] = counts.get(state, 0) + 1
                self._note_load(st.spec.name, inst)
            for state, n in counts.items():
                instances.add_metric([st.spec.name, state], n)
        yield queue
        yield flight
        yield instances
        yield self._load_histogram()

    def _note_load(self, model: str, inst: Any) -> None:
        if inst.load_s is None or inst.instance_id in self._seen_instances:
            return
        self._seen_instances.add(inst.instance_id)
        tier = inst.tier or "disk"
        self._load_times.setdefault((model, tier), []).append(float(inst.load_s))

    def _load_histogram(self) -> Metric:
        hist = HistogramMetricFamily(
            "ember_instance_load_seconds",
            "Instance start-up time, by the tier its checkpoint came from",
            labels=["model", "tier"],
        )
        for (model, tier), values in sorted(self._load_times.items()):
            buckets = [(str(b), float(sum(v <= b for v in values))) for b in LOAD_BUCKETS_S]
            buckets.append(("+Inf", float(len(values))))
            hist.add_metric([model, tier], buckets, sum_value=sum(values))
        return hist


class ApiMetrics:
    """The metric objects of one app, registered in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "ember_requests", "Requests answered", ["model", "endpoint", "status"], registry=r
        )
        self.ttft = Histogram(
            "ember_time_to_first_token_seconds",
            "Time from arrival to first generated token",
            ["model"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.tpot = Histogram(
            "ember_time_per_output_token_seconds",
            "Decode time per output token after the first",
            ["model"],
            buckets=TOKEN_BUCKETS_S,
            registry=r,
        )
        self.duration = Histogram(
            "ember_request_duration_seconds",
            "Time from arrival to the last byte",
            ["model"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "ember_prompt_tokens", "Prompt tokens processed", ["model"], registry=r
        )
        self.generation_tokens = Counter(
            "ember_generation_tokens", "Tokens generated", ["model"], registry=r
        )
        self.cold_starts = Counter(
            "ember_cold_starts", "Requests that found no instance and woke one", ["model"],
            registry=r,
        )  # fmt: skip
        self.migrated = Counter(
            "ember_requests_migrated", "Requests moved live off an instance under notice",
            ["model"], registry=r,
        )  # fmt: skip
        self.kv_moved = Counter(
            "ember_migration_kv_tokens", "Tokens whose K/V a live move sent instead of "
            "recomputing them", ["model"], registry=r,
        )  # fmt: skip
        self.moves_failed = Counter(
            "ember_migrations_failed", "Live moves given up (the request stayed where it was)",
            ["model"], registry=r,
        )  # fmt: skip
        self.resumed = Counter(
            "ember_requests_resumed", "Requests resumed on another instance after theirs died",
            ["model"], registry=r,
        )  # fmt: skip
        self.quarantined = Counter(
            "ember_requests_quarantined", "Requests ended instead of resumed: lost with their "
            "instance again and again, the last time as the only suspect there", ["model"],
            registry=r,
        )  # fmt: skip

    def watch(
        self,
        loads: Callable[[], dict[str, tuple[int, int]]],
        status: Callable[[], Iterable[Any]],
    ) -> None:
        """Register the scrape-time gauges (router loads, controller status)."""
        self.registry.register(_StateCollector(loads, status))

    def observe_move(self, model: str, kv_tokens: int) -> None:
        self.migrated.labels(model).inc()
        if kv_tokens:
            self.kv_moved.labels(model).inc(kv_tokens)

    def observe_request(
        self,
        model: str,
        endpoint: str,
        status: int,
        *,
        duration_s: float,
        ttft_s: float | None = None,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
    ) -> None:
        self.requests.labels(model, endpoint, str(status)).inc()
        if status != 200:
            return
        self.duration.labels(model).observe(duration_s)
        if ttft_s is not None:
            self.ttft.labels(model).observe(ttft_s)
            if completion_tokens > 1:
                self.tpot.labels(model).observe((duration_s - ttft_s) / (completion_tokens - 1))
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.generation_tokens.labels(model).inc(completion_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
