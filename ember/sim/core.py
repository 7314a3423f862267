"""The discrete-event core: a fake clock, an event heap, and one policy driving one fleet.

Events (heap entries `(time, priority, seq, kind, payload)`; at equal times a finishing batch
goes first, then a switch, then a node loss): ADD (nodes acquired), NOTICE (a `remove` of the
trace, `grace_period_s` before it), LOST (the `remove` itself), BATCH (a batch ends), SWITCH
(every replica that must stop has stopped: move state, build replicas), READY (built replicas
hold their weights and serve). Arrivals are read from the sorted workload by a cursor, not
pushed on the heap. One switch at a time: changes that arrive during a switch are planned again
when it completes (a node loss still kills its replicas at once).

Deterministic: the only randomness is the seeded `random.Random` given to the workload reader;
equal inputs give equal results.
"""

from __future__ import annotations

import heapq
import logging
import math
import time
from collections import deque

from ember.policy import (
    ParallelConfig,
    Placement,
    PolicySet,
    Reconfiguration,
    ResumeMode,
)
from ember.sim.fleet import BatchTimes, Replica, Requests
from ember.sim.metrics import Counters, SimResult, summarize
from ember.sim.profile_file import ProfileFile
from ember.sim.spot_trace import ADD, SpotTrace
from ember.sim.switch import (
    SimParams,
    fleet_view,
    grace_stop_s,
    plan_switch,
    running_requests,
)
from ember.sim.workload import Workload

logger = logging.getLogger(__name__)

BATCH, SWITCH, LOST, READY, ADDED, NOTICE, RATE = range(7)


class Simulator:
    """Replays one spot trace and one workload under one policy set."""

    def __init__(
        self,
        policy: PolicySet,
        trace: SpotTrace,
        workload: Workload,
        profile: ProfileFile,
        params: SimParams,
    ) -> None:
        self.ps, self.trace, self.pf, self.params = policy, trace, profile, params
        self.wl = workload
        self.reqs = Requests(
            workload.arrival_s, workload.prompt_tokens, workload.output_tokens, workload.model
        )
        self.rate = params.required_rate_rps or max(workload.mean_rate_rps(), 1e-6)
        self.now = 0.0
        self.heap: list[tuple[float, int, int, int, object]] = []
        self.seq = 0
        self.queue: deque[int] = deque()
        self.idle: list[Replica] = []
        self.replicas: dict[int, Replica] = {}
        self.placement: Placement | None = None
        self.fixed: ParallelConfig | None = None
        self.times: dict[tuple[int, ...], BatchTimes] = {}
        self.hosts: dict[str, str] = {}
        self.node_gpus: dict[str, list[str]] = {}
        self.alive_since: dict[str, float] = {}
        self.noticed: dict[str, float] = {}  # node -> deadline
        self.lost: set[str] = set()  # lost GPU ids
        self.node_seconds = 0.0
        self.switching = False
        self.pending = False
        self.first = True
        self.done = 0
        self.last_finish = 0.0
        self.c = Counters()
        self.timeline: list[tuple[float, int, int, str]] = []
        self.first_latency_s: float | None = None
        self.change_times: list[float] = []  # trace-driven fleet and rate changes
        self._schedule_trace()

    # --- event plumbing -------------------------------------------------------------------

    def _push(self, t: float, kind: int, payload: object) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, kind, self.seq, kind, payload))

    def _schedule_trace(self) -> None:
        g = self.params.grace_period_s
        by_time: dict[tuple[float, int], list[str]] = {}
        added: dict[str, float] = {}
        for ev in self.trace.events:
            if ev.op == ADD:
                added[ev.node] = ev.t_s
                by_time.setdefault((ev.t_s, ADDED), []).append(ev.node)
            else:
                notice = max(added.get(ev.node, 0.0), ev.t_s - g)
                by_time.setdefault((notice, NOTICE), []).append(ev.node)
                by_time.setdefault((ev.t_s, LOST), []).append(ev.node)
        for (t, kind), nodes in sorted(by_time.items()):
            self._push(t, kind, nodes)
        for rc in self.trace.rate_changes:
            self._push(rc.t_s, RATE, rc.rate_rps)

    def run(self) -> SimResult:
        t_wall = time.perf_counter()
        arrivals = self.wl.arrival_s
        n, k = len(arrivals), 0
        horizon = self.trace.end_s + self.params.drain_s
        heap = self.heap
        while True:
            t_ev = heap[0][0] if heap else math.inf
            if k < n and arrivals[k] <= t_ev:
                self.now = arrivals[k]
                self.queue.append(k)
                k += 1
                self.c.events += 1
                if self.idle:
                    self._dispatch()
                continue
            if not heap or t_ev > horizon or (k == n and self.done == n):
                break
            t, _, _, kind, payload = heapq.heappop(heap)
            self.now = t
            self.c.events += 1
            self._handle(kind, payload)
        return self._result(time.perf_counter() - t_wall)

    def _handle(self, kind: int, payload: object) -> None:
        if kind == BATCH:
            self._batch_done(payload)  # type: ignore[arg-type]
        elif kind == SWITCH:
            self._switch(payload)  # type: ignore[arg-type]
        elif kind == READY:
            self._ready()
        elif kind == LOST:
            self._lost(payload)  # type: ignore[arg-type]
        elif kind == ADDED:
            self._added(payload)  # type: ignore[arg-type]
        elif kind == NOTICE:
            self._notice(payload)  # type: ignore[arg-type]
        elif kind == RATE:
            self.rate = float(payload)  # type: ignore[arg-type]
            self.change_times.append(self.now)
            self._reconfigure()

    # --- serving --------------------------------------------------------------------------

    def _dispatch(self) -> None:
        q, idle, reqs = self.queue, self.idle, self.reqs
        while q and idle:
            rep = idle.pop()
            if rep.busy or not rep.accepting or self.replicas.get(rep.index) is not rep:
                continue
            b = min(len(q), rep.times_batch)
            batch = [q.popleft() for _ in range(b)]
            end = rep.start(self.now, batch, reqs, _NO_KV)
            self._push(end, BATCH, (rep, rep.epoch))

    def _batch_done(self, payload: tuple[Replica, int]) -> None:
        rep, epoch = payload
        if epoch != rep.epoch or rep.end_s > rep.stop_s + 1e-9:
            return  # stale, or the grace budget stops it earlier (settled at the switch)
        finished: list[int] = []
        left = rep.settle(self.now, self.reqs, finished)
        assert not left, "a batch that ran to its end left requests unfinished"
        self._completed(finished)
        if rep.accepting and self.replicas.get(rep.index) is rep:
            self.idle.append(rep)
            self._dispatch()

    def _completed(self, finished: list[int]) -> None:
        self.done += len(finished)
        for i in finished:
            if self.reqs.finish[i] > self.last_finish:
                self.last_finish = self.reqs.finish[i]
            if math.isnan(self.reqs.first_token[i]):
                self.reqs.first_token[i] = self.reqs.finish[i]

    def _times(self, cfg: ParallelConfig) -> BatchTimes:
        key = (cfg.tp, cfg.pp, cfg.batch, cfg.micro_prefill, cfg.micro_decode)
        if key not in self.times:
            self.times[key] = BatchTimes.of(self.pf.profile, cfg)
        return self.times[key]

    # --- fleet changes --------------------------------------------------------------------

    def _added(self, nodes: list[str]) -> None:
        per = self.trace.gpus_per_node
        for node in nodes:
            gpus = [f"{node}/g{j}" for j in range(per)]
            self.node_gpus[node] = gpus
            for g in gpus:
                self.hosts[g] = node
            self.alive_since[node] = self.now
        self.change_times.append(self.now)
        if self.placement is not None:
            self._mark(self.placement.config)
        self._reconfigure(self.now + self.params.grace_period_s)

    def _notice(self, nodes: list[str]) -> None:
        if not self.ps.use_grace_period:
            return  # the restart baseline ignores notices
        deadline = self.now + self.params.grace_period_s
        self.change_times.append(self.now)
        for node in nodes:
            if node in self.alive_since:
                self.noticed[node] = deadline
        self._reconfigure(deadline)

    def _lost(self, nodes: list[str]) -> None:
        gone: set[str] = set()
        for node in nodes:
            if node not in self.alive_since:
                continue
            self.node_seconds += self.now - self.alive_since.pop(node)
            self.noticed.pop(node, None)
            gone.add(node)
            self.lost.update(self.node_gpus[node])
        if not gone:
            return
        self.change_times.append(self.now)
        self._mark(self.placement.config if self.placement else None)
        killed = [r for r in self.replicas.values() if r.nodes & gone]
        for rep in killed:
            self._kill(rep)
        if killed or not self.switching:
            self._reconfigure()

    def _kill(self, rep: Replica) -> None:
        """A replica lost a node: its running batch stops now; its requests resume by the
        policy's dropped mode (ember keeps their tokens; the others restart)."""
        del self.replicas[rep.index]
        left: list[int] = []
        if rep.busy:
            finished: list[int] = []
            left = rep.settle(self.now, self.reqs, finished)
            self._completed(finished)
        left.extend(rep.kv)
        rep.kv = []
        self._requeue({i: self.ps.dropped for i in left})

    def _requeue(self, modes: dict[int, ResumeMode]) -> None:
        for i, mode in modes.items():
            if mode is ResumeMode.RESTART and self.reqs.gen[i]:
                self.reqs.restarts[i] += 1
                self.reqs.gen[i] = 0
        # Interrupted requests go back before new ones, oldest first (SpotServe's API server).
        self.queue.extendleft(sorted(modes, key=lambda i: self.reqs.arrival[i], reverse=True))

    def _deadline(self) -> float | None:
        live = [d for n, d in self.noticed.items() if n in self.alive_since]
        return min(live) if live else None

    def _reconfigure(self, deadline: float | None = None) -> None:
        if self.switching:
            self.pending = True
            return
        notice = self._deadline()
        if notice is not None:
            deadline = notice if deadline is None else min(deadline, notice)
        dying_nodes = set(self.noticed) if self.ps.use_grace_period else set()
        view = fleet_view(
            self.placement, self.alive_since, self.node_gpus, dying_nodes, self.hosts, self.lost
        )
        running = running_requests(self.replicas.values(), self.reqs, self.now)
        plan = plan_switch(
            self.ps, self.pf, self.params, view, running, rate=self.rate, now=self.now,
            fixed=self.fixed, change_times=self.change_times,
        )  # fmt: skip
        if not plan.changes:
            return
        self.switching = True
        switch_at = self.now
        for r in plan.stop:
            stopping = self.replicas.get(r)
            if stopping is None:
                continue
            stopping.accepting = False
            busy = stopping.busy
            stopping.stop_s = (
                grace_stop_s(self.ps, stopping, self.reqs, self.now, deadline, plan.transfer_s)
                if busy
                else self.now
            )
            end = min(stopping.stop_s, stopping.end_s) if busy else self.now
            switch_at = max(switch_at, end)
        self._push(switch_at, SWITCH, plan)

    def _switch(self, plan: Reconfiguration) -> None:
        interrupted: dict[int, ResumeMode] = {}
        kv_home: dict[int, int] = {}  # request -> old replica, for KV-keeping requests
        for r in plan.stop:
            rep = self.replicas.get(r)
            if rep is None:
                continue
            if rep.busy:
                finished: list[int] = []
                left = rep.settle(min(rep.stop_s, self.now), self.reqs, finished)
                self._completed(finished)
                lost_kv = bool(set(rep.gpus) & self.lost)
                for i in left:
                    mode = plan.survival.resume.get(str(i), self.ps.dropped)
                    if mode is ResumeMode.KEEP_KV and lost_kv:
                        mode = self.ps.dropped
                    interrupted[i] = mode
                    if mode is ResumeMode.KEEP_KV:
                        kv_home[i] = r
            rep.accepting = False
        new: dict[int, Replica] = {}
        cfg = plan.config
        ready_at = self.now
        if cfg is not None:
            times = self._times(cfg)
            for n, o in plan.keep.items():
                kept = self.replicas.get(o)
                if kept is None:
                    continue  # lost a node since the plan: the next plan rebuilds it
                kept.index, kept.times = n, times
                new[n] = kept
            warm = self.first and self.params.warm_start  # loaded before t = 0
            start = 0.0 if warm else self.params.engine_start_s
            transfer = 0.0 if warm else plan.transfer_s
            ready_at = self.now + transfer + (start if plan.build else 0.0)
            for n, gpus in plan.build.items():
                built = Replica(n, list(gpus), {self.hosts[g] for g in gpus}, times)
                built.ready_s, built.accepting = ready_at, False
                new[n] = built
            by_old = {o: n for n, o in plan.survival.kv_stay.items()}
            for i, o in sorted(kv_home.items()):
                home = new[by_old[o]]
                if len(home.kv) < home.times_batch:
                    home.kv.append(i)
                else:  # the new batch size is smaller: the overflow resumes like a dropped one
                    interrupted[i] = self.ps.dropped
        self.replicas = new
        self.placement = plan.placement
        if cfg is not None and self.fixed is None:
            self.fixed = cfg
            self.first_latency_s = plan.estimate.latency_s if plan.estimate else None
        self._account(plan)
        self._requeue({i: m for i, m in interrupted.items() if m is not ResumeMode.KEEP_KV})
        self.first = False
        self._mark(cfg)
        if plan.build:
            self._push(ready_at, READY, None)
        else:
            self._ready()

    def _account(self, plan: Reconfiguration) -> None:
        self.c.switches += 1
        if not (self.first and self.params.warm_start):  # the first load happens before t = 0
            self.c.moved_bytes += plan.moved_bytes
            self.c.loaded_bytes += plan.loaded_bytes
        if plan.build and not self.first:
            if self.ps.reuse_context:
                self.c.migrations += 1
            else:
                self.c.cold_starts += len(plan.build)

    def _ready(self) -> None:
        self.switching = False
        gone = {self.hosts[g] for g in self.lost}
        for rep in list(self.replicas.values()):
            if rep.nodes & gone:
                self._kill(rep)
                self.pending = True
                continue
            if not rep.accepting and rep.ready_s <= self.now + 1e-9:
                rep.accepting = True
                if rep.kv:
                    held, rep.kv = rep.kv, []
                    end = rep.start(self.now, held, self.reqs, set(held))
                    self._push(end, BATCH, (rep, rep.epoch))
                else:
                    self.idle.append(rep)
            elif rep.accepting and not rep.busy:
                self.idle.append(rep)
        if self.pending:
            self.pending = False
            self._reconfigure(self._deadline())
        self._dispatch()

    def _mark(self, cfg: ParallelConfig | None) -> None:
        alive = sum(len(self.node_gpus[n]) for n in self.alive_since)
        used = cfg.gpus if cfg else 0
        label = f"D{cfg.dp} P{cfg.pp} M{cfg.tp} B{cfg.batch}" if cfg else "none"
        self.timeline.append((self.now, alive, used, label))

    def _result(self, wall_s: float) -> SimResult:
        last_arrival = self.wl.arrival_s[-1] if len(self.wl) else 0.0
        end = max(last_arrival, self.last_finish) if self.done else self.now
        node_s = self.node_seconds + sum(max(0.0, end - t) for t in self.alive_since.values())
        self.now = max(self.now, end)
        self._mark(self.placement.config if self.placement else None)
        slo = self.params.slo_s or 2.0 * (self.first_latency_s or 0.0) or math.inf
        return summarize(
            self.ps.name.value,
            self.reqs,
            self.trace,
            self.c,
            self.timeline,
            slo_s=slo,
            spot_usd_per_gpu_hour=self.params.spot_usd_per_gpu_hour,
            node_seconds=node_s,
            wall_s=wall_s,
        )


_NO_KV: set[int] = set()
