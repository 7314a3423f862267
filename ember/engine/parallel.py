"""Tensor parallelism on one machine: rank processes joined by torch.distributed.

Rank 0 is the engine's own process: it schedules, samples, and broadcasts each step's plan
(plain data, pickled) to ranks 1..N-1, which are spawned here (`multiprocessing` spawn) and
loop on commands until told to stop. Every rank loads only its own shard set from the
checkpoint (converted with `tp=N`, split by `ember.store.sharding`) and holds its share of the
heads of the KV cache; row-parallel layers all-reduce. Backend: gloo on CPU, NCCL on CUDA
(rank r uses `cuda:r`); rendezvous on 127.0.0.1 at a free port.

Only one tensor-parallel engine per process (it owns the default process group).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ember.engine.config import ModelConfig
from ember.engine.model_runner import ModelRunner, load_runner
from ember.engine.models.layers import ParallelContext
from ember.engine.scheduler import SchedulePlan

logger = logging.getLogger(__name__)

_INIT_TIMEOUT = timedelta(seconds=300)


@dataclass(frozen=True, slots=True)
class RankSpec:
    """What a rank process needs to build its runner."""

    checkpoint: str
    model_config: ModelConfig
    device: str
    dtype: str
    num_blocks: int
    block_size: int
    world_size: int
    port: int
    threads: int
    pack_weights: bool = True
    pack_in_background: bool = False
    map_weights: bool = True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_device(spec: RankSpec, rank: int) -> torch.device:
    if spec.device.startswith("cuda"):
        return torch.device("cuda", rank)
    return torch.device("cpu")


def _init(spec: RankSpec, rank: int) -> ModelRunner:
    torch.set_num_threads(spec.threads)
    device = _rank_device(spec, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo",
        init_method=f"tcp://127.0.0.1:{spec.port}",
        rank=rank,
        world_size=spec.world_size,
        timeout=_INIT_TIMEOUT,
    )
    par = ParallelContext(rank=rank, world_size=spec.world_size)
    dtype = getattr(torch, spec.dtype)
    return load_runner(
        spec.checkpoint, spec.model_config, par, device, dtype, spec.num_blocks,
        spec.block_size, spec.pack_weights, spec.pack_in_background, spec.map_weights,
    )  # fmt: skip


def _broadcast(msg: Any) -> Any:
    box = [msg]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _rank_main(rank: int, spec: RankSpec) -> None:
    """Body of ranks 1..N-1: execute what rank 0 broadcasts until ("stop",)."""
    logging.basicConfig(level=logging.WARNING)
    runner = _init(spec, rank)
    try:
        while True:
            msg = _broadcast(None)
            if msg[0] == "stop":
                break
            _handle(runner, msg)
    finally:
        dist.destroy_process_group()


def _handle(runner: ModelRunner, msg: tuple[Any, ...]) -> Any:
    kind = msg[0]
    if kind == "run":
        return runner.execute(msg[1], want_logits=runner.par.rank == 0)
    if kind == "read_kv":
        local = runner.read_kv(msg[1])
        parts: list[Any] | None = [None] * runner.par.world_size if runner.par.rank == 0 else None
        dist.gather_object(local, parts, dst=0)
        return torch.cat(parts, dim=3) if parts is not None else None  # full heads
    if kind == "write_kv":
        kv = msg[2]
        n = runner.kv_heads
        runner.write_kv(msg[1], kv[:, :, :, runner.par.rank * n : (runner.par.rank + 1) * n])
        return None
    raise AssertionError(f"unknown command {kind!r}")


class TensorParallelExecutor:
    """Rank 0's handle on the group: the same methods as `ModelRunner`, run on every rank."""

    def __init__(self, spec: RankSpec) -> None:
        ctx = mp.get_context("spawn")
        self._procs = [
            ctx.Process(target=_rank_main, args=(r, spec), daemon=True, name=f"ember-rank{r}")
            for r in range(1, spec.world_size)
        ]
        for p in self._procs:
            p.start()
        self._threads_before = torch.get_num_threads()
        try:
            self.runner = _init(spec, 0)
        except BaseException:
            self._kill()
            raise
        self.kv_heads = self.runner.kv_heads * spec.world_size
        self._closed = False
        logger.info("tensor_parallel world_size=%d port=%d", spec.world_size, spec.port)

    def execute(self, plan: SchedulePlan) -> torch.Tensor:
        out = _handle(self.runner, _broadcast(("run", plan)))
        assert out is not None
        return out  # type: ignore[no-any-return]

    def read_kv(self, slots: Sequence[int]) -> torch.Tensor:
        return _handle(self.runner, _broadcast(("read_kv", list(slots))))  # type: ignore[no-any-return]

    def write_kv(self, slots: Sequence[int], kv: torch.Tensor) -> None:
        _handle(self.runner, _broadcast(("write_kv", list(slots), kv)))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.runner.close()
        try:
            _broadcast(("stop",))
        except Exception as e:  # a rank died (the step that found it raised already)
            logger.warning("tensor_parallel: could not stop the ranks in order: %s", e)
        try:
            dist.destroy_process_group()
        finally:
            for p in self._procs:
                p.join(timeout=30)
            self._kill()
            torch.set_num_threads(self._threads_before)

    def _kill(self) -> None:
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


def make_spec(
    checkpoint: str,
    cfg: ModelConfig,
    device: str,
    dtype: torch.dtype,
    num_blocks: int,
    block_size: int,
    world_size: int,
    pack_weights: bool = True,
    pack_in_background: bool = False,
    map_weights: bool = True,
) -> RankSpec:
    threads = max(1, (os.cpu_count() or 1) // world_size) if device == "cpu" else 1
    return RankSpec(
        checkpoint=checkpoint,
        model_config=cfg,
        device=device,
        dtype=str(dtype).removeprefix("torch."),
        num_blocks=num_blocks,
        block_size=block_size,
        world_size=world_size,
        port=_free_port(),
        threads=threads,
        pack_weights=pack_weights,
        pack_in_background=pack_in_background,
        map_weights=map_weights,
    )
