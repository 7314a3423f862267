"""Serverless multi-model simulation: many models on one spot fleet, scaled from zero.

Each model (a function of an Azure Functions trace, say) gets instances on demand from the
policy autoscaler (`desired_instances`: queued + in-flight over a target concurrency) and loses
them after `keep_alive_s` idle. Where a new instance starts is the placement strategy under
comparison (ServerlessLLM's): `ember` and `serverlessllm` (`place`: start-up time from the
fastest tier holding the checkpoint, live-migrating running instances away when that wins;
ember adds preemption risk and price), `locality` (`place_locality`: start-up time, no
migration), `round_robin` and `random` (no locality). Start-up = the server's loading-queue
wait + bytes / bandwidth of the tier (GPU-resident 0, host DRAM, local SSD, a peer's copy,
remote store). Loaded checkpoints stay in the server's DRAM (LRU, `dram_models`) and SSD.

Spot nodes come and go per the trace: a noticed server takes no new instance; ember also
starts replacements for its instances at the notice. A lost server's running requests resume
elsewhere (ember keeps their generated tokens and re-prefills; the others restart).
"""

from __future__ import annotations

import heapq
import math
import random
import time
from collections import deque
from typing import cast

from ember.policy import (
    AutoscalerConfig,
    ModelSpec,
    ParallelConfig,
    PlacementConfig,
    PlacementDecision,
    PlacementStrategy,
    ServerState,
    Tier,
    desired_instances,
    place,
    place_locality,
    place_random,
    place_round_robin,
)
from ember.sim.fleet import BatchTimes, Replica, Requests
from ember.sim.metrics import Counters, SimResult, summarize
from ember.sim.profile_file import ProfileFile
from ember.sim.servers import Instance, Server, ServerlessParams, server_states
from ember.sim.spot_trace import ADD, SpotTrace
from ember.sim.workload import Workload

SERVERLESS_POLICIES = tuple(p.value for p in PlacementStrategy)
BATCH, READY, IDLE, LOST, ADDED, NOTICE = range(6)


class ServerlessSimulator:
    """One placement strategy over a multi-model workload and a spot trace."""

    def __init__(
        self,
        strategy: str,
        trace: SpotTrace,
        workload: Workload,
        profile: ProfileFile,
        params: ServerlessParams,
        seed: int = 0,
    ) -> None:
        self.name = PlacementStrategy(strategy)
        self.trace, self.wl, self.params = trace, workload, params
        self.rng = random.Random(seed)  # the random placement's draws
        self.ssd_rng = random.Random(seed)  # which SSDs hold which checkpoints: same for all
        self.cursor = 0
        self.reqs = Requests(
            workload.arrival_s, workload.prompt_tokens, workload.output_tokens, workload.model
        )
        weights = profile.weight_bytes
        self.gpus_per_instance = min(
            trace.gpus_per_node, max(1, math.ceil(weights / (params.gpu_memory_bytes / 2)))
        )
        tp = 1 << (self.gpus_per_instance.bit_length() - 1)
        tp = max(t for t in profile.profile.tp_degrees() if t <= tp)
        self.gpus_per_instance = tp
        batch = 1  # the largest batch whose power-of-two sizes are all profiled
        while batch * 2 <= params.max_batch and profile.profile.has(tp, batch * 2):
            batch *= 2
        self.times = BatchTimes.of(profile.profile, ParallelConfig(1, tp, 1, batch, 1, 1))
        self.specs = [ModelSpec(m, weights, tp) for m in workload.models]
        self.auto = AutoscalerConfig(
            min_instances=0,
            max_instances=params.max_instances,
            target_concurrency=params.target_concurrency,
            keep_alive_s=params.keep_alive_s,
        )
        self.pcfg = (
            PlacementConfig.ember() if self.name is PlacementStrategy.EMBER else PlacementConfig()
        )
        self.servers: dict[str, Server] = {}
        self.queues: list[deque[int]] = [deque() for _ in workload.models]
        self.instances: list[list[Instance]] = [[] for _ in workload.models]
        self.last_busy: list[float | None] = [None] * len(workload.models)
        self.starving: set[int] = set()
        self.removals: dict[str, deque[float]] = {}
        self.heap: list[tuple[float, int, int, int, object]] = []
        self.seq = self.next_iid = self.done = 0
        self.now = 0.0
        self.node_seconds = 0.0
        self.alive_since: dict[str, float] = {}
        self.c = Counters()
        self.timeline: list[tuple[float, int, int, str]] = []
        for ev in trace.events:
            if ev.op == ADD:
                self._push(ev.t_s, ADDED, (ev.node, ev.zone))
            else:
                self._push(max(0.0, ev.t_s - params.grace_period_s), NOTICE, ev.node)
                self._push(ev.t_s, LOST, ev.node)

    def _push(self, t: float, kind: int, payload: object) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, kind, self.seq, kind, payload))

    def run(self) -> SimResult:
        t_wall = time.perf_counter()
        arr, n, k = self.wl.arrival_s, len(self.wl), 0
        horizon = self.trace.end_s + self.params.drain_s
        while True:
            t_ev = self.heap[0][0] if self.heap else math.inf
            if k < n and arr[k] <= t_ev:
                self.now = arr[k]
                m = self.wl.model[k]
                self.queues[m].append(k)
                k += 1
                self.c.events += 1
                self._serve(m)
                continue
            if not self.heap or t_ev > horizon or (k == n and self.done == n):
                break
            t, _, _, kind, payload = heapq.heappop(self.heap)
            self.now = t
            self.c.events += 1
            self._handle(kind, payload)
        end = self.now
        node_s = self.node_seconds + sum(max(0.0, end - t) for t in self.alive_since.values())
        return summarize(
            self.name.value,
            self.reqs,
            self.trace,
            self.c,
            self.timeline,
            slo_s=2.0 * self.times.prefill_s[1] + 2.0 * 128 * self.times.step_s[1] + 10.0,
            spot_usd_per_gpu_hour=self.params.spot_usd_per_gpu_hour,
            node_seconds=node_s,
            wall_s=time.perf_counter() - t_wall,
        )

    def _handle(self, kind: int, payload: object) -> None:
        if kind == BATCH:
            inst, epoch = cast(tuple[Instance, int], payload)
            if epoch == inst.rep.epoch and inst.rep.busy:
                finished: list[int] = []
                inst.rep.settle(self.now, self.reqs, finished)
                self._completed(finished)
                self._serve(inst.model)
                self._went_idle(inst)
        elif kind == READY:
            inst = cast(Instance, payload)
            if inst in inst.server.instances:
                inst.ready, inst.last_used = True, self.now
                self._serve(inst.model)
                self._went_idle(inst)
        elif kind == IDLE:
            self._idle(cast(Instance, payload))
        elif kind == ADDED:
            node, zone = cast(tuple[str, str], payload)
            self._added(node, zone)
        elif kind == NOTICE:
            self._notice(cast(str, payload))
        elif kind == LOST:
            self._lost(cast(str, payload))

    def _completed(self, finished: list[int]) -> None:
        self.done += len(finished)
        for i in finished:
            if math.isnan(self.reqs.first_token[i]):
                self.reqs.first_token[i] = self.reqs.finish[i]

    # --- serving and scaling --------------------------------------------------------------

    def _serve(self, m: int) -> None:
        q = self.queues[m]
        for inst in self.instances[m]:
            if not q:
                break
            rep = inst.rep
            if inst.ready and not inst.draining and not rep.busy:
                batch = [q.popleft() for _ in range(min(len(q), rep.times_batch))]
                end = rep.start(self.now, batch, self.reqs, set())
                self._push(end, BATCH, (inst, rep.epoch))
        if q or any(i.rep.busy for i in self.instances[m]):
            self.last_busy[m] = self.now
        self._scale(m)

    def _went_idle(self, inst: Instance) -> None:
        if inst.ready and not inst.rep.busy:
            inst.last_used = self.now
            self._push(self.now + self.params.keep_alive_s, IDLE, inst)

    def _scale(self, m: int) -> None:
        live = [i for i in self.instances[m] if not i.draining]
        in_flight = sum(len(i.rep.batch) for i in live)
        want = desired_instances(
            self.auto,
            queued=len(self.queues[m]),
            in_flight=in_flight,
            current=len(live),
            now_s=self.now,
            last_busy_s=self.last_busy[m],
        )
        for _ in range(want - len(live)):
            if not self._start(m):
                self.starving.add(m)
                return
        self.starving.discard(m)

    def _idle(self, inst: Instance) -> None:
        if inst not in inst.server.instances or inst.rep.busy or self.queues[inst.model]:
            return
        if self.now - inst.last_used >= self.params.keep_alive_s - 1e-9:
            self._remove(inst)

    def _remove(self, inst: Instance, rescale: bool = True) -> None:
        inst.server.instances.discard(inst)
        inst.server.free += self.gpus_per_instance
        self.instances[inst.model].remove(inst)
        if rescale:
            for m in sorted(self.starving):
                self._scale(m)

    # --- placement ------------------------------------------------------------------------

    def _states(self, m: int) -> list[ServerState]:
        return server_states(
            self.servers,
            m,
            self.wl.models[m],
            now=self.now,
            removals=self.removals,
            params=self.params,
            specs=self.specs,
            reqs=self.reqs,
        )

    def _decide(self, m: int) -> PlacementDecision | None:
        states, spec = self._states(m), self.specs[m]
        if self.name is PlacementStrategy.RANDOM:
            return place_random(states, spec, self.rng)
        if self.name is PlacementStrategy.ROUND_ROBIN:
            d, self.cursor = place_round_robin(states, spec, self.cursor)
            return d
        if self.name is PlacementStrategy.LOCALITY:
            return place_locality(states, spec, PlacementConfig(migrate=False))
        return place(states, spec, self.pcfg)

    def _evict_idle(self, m: int) -> bool:
        """Keep-alive is best effort: free the least recently used idle instance of another
        model (same rule for every strategy) so that a model with work can start."""
        idle = [
            i
            for lst in self.instances
            for i in lst
            if i.model != m
            and i.ready
            and not i.rep.busy
            and not self.queues[i.model]
            and i.server.name in self.servers
        ]
        if not idle:
            return False
        self._remove(min(idle, key=lambda i: (i.last_used, i.iid)), rescale=False)
        return True

    def _start(self, m: int) -> bool:
        d = self._decide(m)
        while d is None and self._evict_idle(m):
            d = self._decide(m)
        if d is None:
            return False
        s = self.servers[d.server_id]
        by_id = {str(i.iid): i for i in s.instances}
        for mv in d.migrations:
            self._migrate(by_id[mv.instance_id], self.servers[mv.dst], mv.estimated_s)
        if s.free < self.gpus_per_instance:
            return False
        self.next_iid += 1
        inst = Instance(self.next_iid, m, s, Replica(self.next_iid, [], {s.name}, self.times))
        s.instances.add(inst)
        s.free -= self.gpus_per_instance
        self.instances[m].append(inst)
        if d.tier is not Tier.GPU:
            self.c.cold_starts += 1
            self.c.loaded_bytes += self.specs[m].size_bytes
        s.queue_until = self.now + d.startup_s  # start-up includes the queue wait before it
        s.dram[m] = None
        s.dram.move_to_end(m)
        while len(s.dram) > self.params.dram_models:
            s.dram.popitem(last=False)
        s.ssd.add(m)
        self._push(self.now + d.startup_s, READY, inst)
        return True

    def _migrate(self, inst: Instance, dst: Server, pause_s: float) -> None:
        """Live-migrate `inst` to `dst`: its running batch pauses `pause_s` (re-prefill there)."""
        self.c.migrations += 1
        src = inst.server
        src.instances.discard(inst)
        src.free += self.gpus_per_instance
        dst.instances.add(inst)
        dst.free -= self.gpus_per_instance
        inst.server = dst
        rep = inst.rep
        if rep.busy:
            rep.t0 += pause_s
            rep.end_s += pause_s
            rep.epoch += 1
            self._push(rep.end_s, BATCH, (inst, rep.epoch))

    # --- the fleet ------------------------------------------------------------------------

    def _added(self, node: str, zone: str) -> None:
        share = self.params.ssd_copies / max(1, self.trace.max_nodes())
        ssd = {m for m in range(len(self.specs)) if self.ssd_rng.random() < share}
        self.servers[node] = Server(node, zone, self.trace.gpus_per_node, ssd)
        self.alive_since[node] = self.now
        self._mark()
        for m in sorted(self.starving):
            self._scale(m)

    def _notice(self, node: str) -> None:
        s = self.servers.get(node)
        if s is None:
            return
        s.noticed = True
        if self.name is PlacementStrategy.EMBER:
            for inst in sorted(s.instances, key=lambda i: i.iid):
                inst.draining = True  # finish the running batch; a replacement starts now
                self._scale(inst.model)

    def _lost(self, node: str) -> None:
        s = self.servers.pop(node, None)
        if s is None:
            return
        self.node_seconds += self.now - self.alive_since.pop(node)
        self.removals.setdefault(s.zone, deque()).append(self.now)
        dead, s.instances = sorted(s.instances, key=lambda i: i.iid), set()
        for inst in dead:  # all out first: scaling below must not see (or evict) them
            self.instances[inst.model].remove(inst)
        for inst in dead:
            if inst.rep.busy:
                finished: list[int] = []
                left = inst.rep.settle(self.now, self.reqs, finished)
                self._completed(finished)
                for i in left:
                    if self.name is not PlacementStrategy.EMBER and self.reqs.gen[i]:
                        self.reqs.restarts[i] += 1
                        self.reqs.gen[i] = 0
                self.queues[inst.model].extendleft(reversed(left))
            self._scale(inst.model)
        self._mark()

    def _mark(self) -> None:
        alive = sum(s.gpus for s in self.servers.values())
        used = sum(s.gpus - s.free for s in self.servers.values())
        self.timeline.append((self.now, alive, used, f"{sum(len(x) for x in self.instances)} inst"))
