"""Runs the model for a `SchedulePlan`: turns the plan's plain data into tensors, owns the paged
KV cache, and returns the logits of each scheduled request's last token.

The KV cache is one tensor per layer, `[2, num_blocks, block_size, kv_heads, head_dim]`, in the
model's dtype, attached to the layer's attention module. Slot `s` of a layer is block
`s // block_size`, offset `s % block_size`, in both halves (K and V).
"""

from __future__ import annotations

import atexit
import logging
import math
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ember.engine.config import ModelConfig
from ember.engine.models import build_model, cpu_attention
from ember.engine.models.layers import (
    AttentionMetadata,
    DecodeGroup,
    KernelDecode,
    Linear,
    ParallelContext,
    can_pack_linears,
)
from ember.engine.scheduler import ScheduledSeq, SchedulePlan

_Tensors = tuple[torch.Tensor | None, ...]  # one per prefill chunk (None: not needed)

logger = logging.getLogger(__name__)

# Decode requests attended per call. Contexts are padded to the longest in a group, so groups of
# requests sorted by length waste little; fewer, larger groups save per-call overhead.
DECODE_GROUP_SIZE = 8


class ModelRunner:
    def __init__(
        self,
        cfg: ModelConfig,
        weights: Mapping[str, torch.Tensor],
        par: ParallelContext,
        device: torch.device,
        num_blocks: int,
        block_size: int,
        source: str = "checkpoint",
        pack_weights: bool = True,
        pack_in_background: bool = False,
    ) -> None:
        self.cfg = cfg
        self.par = par
        self.device = device
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.model = build_model(cfg, weights, par, source)
        self.dtype = next(self.model.parameters()).dtype
        self.load_s = 0.0  # seconds spent loading the weights (set by load_runner)
        self.packed = False
        self._packer: WeightPacker | None = None
        self._threads_while_packing: int | None = None
        # Packing in the background starts once the first step is done: that step (a cold
        # start's first token) runs on every core with nothing beside it. On the 2-core dev VM
        # a 1.1B engine's first token took 0.10-0.13 s this way, 0.2-0.37 s beside the packer.
        self._pack_after_step = False
        if pack_weights and can_pack_linears(device, self.dtype):
            if pack_in_background:
                self._pack_after_step = True
            else:
                self._packer = WeightPacker(self.model)
                self.wait_packed()
        self.kv_heads = cfg.num_kv_heads // par.world_size
        self.attention_modules: list[Any] = [layer.self_attn for layer in self._layers()]
        shape = (2, num_blocks, block_size, self.kv_heads, cfg.head_dim)
        self.kv_caches = [_zeros(shape, self.dtype, device) for _ in self.attention_modules]
        for module, cache in zip(self.attention_modules, self.kv_caches, strict=True):
            module.kv_cache = cache
        # The CPU decode kernel when it can read this cache (else torch ops, see layers.py).
        self.use_kernel = bool(self.kv_caches) and cpu_attention.supports(self.kv_caches[0])
        logger.info(
            "model_runner arch=%s rank=%d/%d dtype=%s device=%s kv_blocks=%d block_size=%d",
            cfg.architecture, par.rank, par.world_size, self.dtype, device, num_blocks, block_size,
        )  # fmt: skip

    def _layers(self) -> Sequence[Any]:
        inner: Any = self.model.model
        layers = inner.decoder.layers if self.cfg.is_opt else inner.layers
        return list(layers)  # type: ignore[arg-type]

    def close(self) -> None:
        """Stop a background packing job (nothing else to release)."""
        if self._packer is not None:
            self._packer.stop()

    def _start_packing(self) -> None:
        self._pack_after_step = False
        threads = torch.get_num_threads()
        if threads > 1:
            # The packer keeps one core busy: serve on the others meanwhile. With every core's
            # worth of serving threads plus the packer, each parallel region waits for a
            # descheduled thread (steps measured 10x slower on 2 cores).
            self._threads_while_packing = threads
            torch.set_num_threads(threads - 1)
        self._packer = WeightPacker(self.model)

    def wait_packed(self) -> None:
        """Block until the packed weights are in use (no-op when not packing)."""
        if self._pack_after_step:
            self._start_packing()
        if self._packer is not None:
            self._packer.wait()
            self._install_packed()

    def _install_packed(self) -> None:
        # Called between steps only, so no forward ever sees a half-swapped layer.
        packer = self._packer
        if packer is None or not packer.finished():
            return
        self._packer = None
        self.packed = packer.install()
        if self._threads_while_packing is not None:
            torch.set_num_threads(self._threads_while_packing)
            self._threads_while_packing = None

    @torch.inference_mode()
    def execute(self, plan: SchedulePlan, want_logits: bool = True) -> torch.Tensor | None:
        """Logits [len(plan.seqs), vocab] (float32) of each request's last token."""
        self._install_packed()
        input_ids, positions, meta, last = self._prepare(plan)
        hidden = self.model(input_ids, positions, meta)  # [T, hidden]
        logits = None
        if want_logits:
            logits = self.model.compute_logits(hidden[last]).float()  # type: ignore[operator]
        if self._pack_after_step:
            self._start_packing()
        return logits

    def _prepare(
        self, plan: SchedulePlan
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        bs = self.block_size
        seqs = plan.seqs
        lens = [len(s.token_ids) for s in seqs]
        input_ids: list[int] = []
        pos_list: list[int] = []
        slot_list: list[int] = []
        for s, n in zip(seqs, lens, strict=True):
            input_ids.extend(s.token_ids)
            pos_list.extend(range(s.start_position, s.start_position + n))
            slot_list.extend(_slots(s.block_table, s.start_position, s.start_position + n, bs))
        upcast = self.device.type == "cpu" and self.dtype != torch.float32
        slots = torch.tensor(slot_list, dtype=torch.long).to(self.device)  # [T]
        n = plan.num_prefills
        bounds, masks, contexts = self._prefill_meta(seqs[:n], lens[:n])
        groups, kernel = self._decode_meta(seqs[n:]) if n < len(seqs) else ((), None)
        meta = AttentionMetadata(
            slot_mapping=slots,
            num_prefill_tokens=sum(lens[:n]),
            upcast=upcast,
            seq_bounds=bounds,
            prefill_masks=masks,
            prefill_contexts=contexts,
            decode_groups=groups,
            decode_kernel=kernel,
        )
        last = torch.tensor(lens).cumsum(0) - 1  # [B] index of each request's last token
        ids = torch.tensor(input_ids, dtype=torch.long).to(self.device)
        positions = torch.tensor(pos_list, dtype=torch.long).to(self.device)
        return ids, positions, meta, last.to(self.device)

    def _prefill_meta(
        self, seqs: Sequence[ScheduledSeq], lens: list[int]
    ) -> tuple[tuple[tuple[int, int], ...], _Tensors, _Tensors]:
        """Each prefill chunk's [start, end) in the flat batch, its mask (None: causal over its
        own tokens) and, for a chunk after the first, the cache slots of every key it attends
        to (its request's positions 0..end, read from the cache after this step's write)."""
        bounds, masks, contexts = [], [], []
        start = 0
        window = self.cfg.sliding_window
        bs = self.block_size
        for s, n in zip(seqs, lens, strict=True):
            bounds.append((start, start + n))
            start += n
            first = s.start_position
            keys = first + n
            mask = None
            context = None
            if first > 0:
                context = torch.tensor(_slots(s.block_table, 0, keys, bs), dtype=torch.long)
                context = context.to(self.device)
            if first > 0 or (window is not None and n > window):  # else plain causal SDPA
                q_pos = torch.arange(first, keys)[:, None]
                k_pos = torch.arange(keys)[None, :]
                allowed = k_pos <= q_pos
                if window is not None:
                    allowed &= k_pos > q_pos - window
                mask = allowed.to(self.device)  # [n, keys]
            masks.append(mask)
            contexts.append(context)
        return tuple(bounds), tuple(masks), tuple(contexts)

    def _decode_meta(
        self, seqs: Sequence[ScheduledSeq]
    ) -> tuple[tuple[DecodeGroup, ...], KernelDecode | None]:
        """The decoding requests' attention inputs: for the CPU kernel, else in groups."""
        ctx = [s.start_position + 1 for s in seqs]
        if self.use_kernel:
            return (), self._kernel_meta(seqs, ctx)
        if len(seqs) <= DECODE_GROUP_SIZE:
            groups = [self._decode_group(list(range(len(seqs))), seqs, ctx, whole=True)]
        else:
            # Requests sorted by context length, in groups: little padding, few calls.
            order = sorted(range(len(seqs)), key=ctx.__getitem__)
            groups = [
                self._decode_group(order[i : i + DECODE_GROUP_SIZE], seqs, ctx, whole=False)
                for i in range(0, len(order), DECODE_GROUP_SIZE)
            ]
        return tuple(groups), None

    def _kernel_meta(self, seqs: Sequence[ScheduledSeq], ctx: list[int]) -> KernelDecode:
        bs = self.block_size
        n_blocks = [-(-c // bs) for c in ctx]
        tables = np.zeros((len(seqs), max(n_blocks)), dtype=np.int32)
        for row, (s, n) in enumerate(zip(seqs, n_blocks, strict=True)):
            tables[row, :n] = s.block_table[:n]
        window = self.cfg.sliding_window
        starts = [max(c - window, 0) for c in ctx] if window is not None else [0] * len(ctx)
        return KernelDecode(
            block_tables=torch.from_numpy(tables),
            context_lens=torch.tensor(ctx, dtype=torch.int32),
            window_starts=torch.tensor(starts, dtype=torch.int32),
            max_len=max(c - s for c, s in zip(ctx, starts, strict=True)),
        )

    def _decode_group(
        self, members: list[int], seqs: Sequence[ScheduledSeq], ctx: list[int], whole: bool
    ) -> DecodeGroup:
        bs = self.block_size
        lk = max(ctx[i] for i in members)
        n_blocks = -(-lk // bs)
        tables = [list(seqs[i].block_table[:n_blocks]) for i in members]
        tables = [t + [0] * (n_blocks - len(t)) for t in tables]
        window = self.cfg.sliding_window
        mask = None
        if any(ctx[i] != lk for i in members) or (window is not None and lk > window):
            keys = torch.arange(lk)[None, :]  # [1, Lk]
            pos = torch.tensor([ctx[i] - 1 for i in members])[:, None]  # [G, 1]
            allowed = keys <= pos
            if window is not None:
                allowed &= keys > pos - window
            mask = allowed[:, None, None, :].to(self.device)  # [G, 1, 1, Lk]
        contiguous = _contiguous_start(tables[0], bs) if len(members) == 1 else None
        return DecodeGroup(
            rows=None if whole else torch.tensor(members).to(self.device),
            block_tables=None if contiguous is not None else torch.tensor(tables).to(self.device),
            context_len=lk,
            attn_mask=mask,
            contiguous_start=contiguous,
        )

    def read_kv(self, slots: Sequence[int]) -> torch.Tensor:
        """K/V of `slots` as a CPU tensor [layers, 2, len(slots), kv_heads, head_dim]."""
        index = torch.tensor(list(slots), dtype=torch.long, device=self.device)
        out = [
            c.view(2, -1, self.kv_heads, self.cfg.head_dim).index_select(1, index)
            for c in self.kv_caches
        ]
        return torch.stack(out).cpu()

    def write_kv(self, slots: Sequence[int], kv: torch.Tensor) -> None:
        """Write `kv` [layers, 2, len(slots), kv_heads, head_dim] into `slots`."""
        index = torch.tensor(list(slots), dtype=torch.long, device=self.device)
        for layer, cache in enumerate(self.kv_caches):
            flat = cache.view(2, -1, self.kv_heads, self.cfg.head_dim)
            flat.index_copy_(1, index, kv[layer].to(device=self.device, dtype=self.dtype))


def _slots(table: Sequence[int], start: int, end: int, block_size: int) -> list[int]:
    """The cache slots of positions [start, end) of a request whose blocks are `table` (as
    `BlockManager.slot` gives them one by one)."""
    return [table[p // block_size] * block_size + p % block_size for p in range(start, end)]


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed tensor. On CPU it comes from calloc (fresh zero pages from the OS, touched only
    when written) so a large KV cache costs nothing at start-up; `torch.zeros` would write every
    page. Zeros matter: masked-out slots are still multiplied by 0, and 0 * NaN is NaN."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)


def _contiguous_start(table: list[int], block_size: int) -> int | None:
    """The first slot when `table` is a run of consecutive block ids, else None."""
    first = table[0]
    if table[-1] - first != len(table) - 1 or any(b != first + i for i, b in enumerate(table)):
        return None
    return first * block_size


_LIVE_PACKERS: weakref.WeakSet[WeightPacker] = weakref.WeakSet()


@atexit.register
def _stop_packers() -> None:
    for packer in list(_LIVE_PACKERS):
        packer.stop()


class WeightPacker:
    """Packs every linear weight for oneDNN on a background thread, so that the first requests
    are served (with the plain weights) while it runs; `install` swaps the packed weights in
    and gives the other, small parameters their own memory so that the store's buffer, which
    only the plain weights still shared, is released: one copy of the weights stays, in the
    faster layout. bf16 results before and after the swap can differ in the last bits."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.modules = [m for m in model.modules() if isinstance(m, Linear)]
        self.result: list[torch.Tensor] | None = None
        self.error: BaseException | None = None
        self._stop = threading.Event()
        _LIVE_PACKERS.add(self)
        self._thread = threading.Thread(target=self._run, name="ember-pack", daemon=True)
        self._started = time.perf_counter()
        self._thread.start()

    def _run(self) -> None:
        try:
            out = []
            with torch.inference_mode():
                for m in self.modules:
                    if self._stop.is_set():
                        raise RuntimeError("interpreter exit")
                    out.append(m.packed_weight())
            self.result = out
        except BaseException as e:  # noqa: BLE001 - reported by install(), serving goes on
            self.error = e

    def finished(self) -> bool:
        return not self._thread.is_alive()

    def stop(self) -> None:
        """Abandon packing after the current layer (interpreter exit: a thread killed inside
        a C++ op aborts the process)."""
        self._stop.set()
        self._thread.join()

    def wait(self) -> None:
        self._thread.join()

    def install(self) -> bool:
        if self.result is None:
            logger.warning("weight packing failed, serving with plain weights: %r", self.error)
            return False
        packed = set()
        for module, weight in zip(self.modules, self.result, strict=True):
            module.install_packed(weight)
            packed.add(id(module.weight))
        for param in self.model.parameters():
            if id(param) not in packed:
                param.data = param.data.clone()
        self.result = None
        logger.info(
            "packed_weights layers=%d seconds=%.2f", len(self.modules),
            time.perf_counter() - self._started,
        )  # fmt: skip
        return True


def load_runner(
    checkpoint: str,
    cfg: ModelConfig,
    par: ParallelContext,
    device: torch.device,
    dtype: torch.dtype,
    num_blocks: int,
    block_size: int,
    pack_weights: bool = True,
    pack_in_background: bool = False,
    map_weights: bool = True,
) -> ModelRunner:
    """Load this rank's weights from the store and build its runner (a dtype other than the
    stored one costs a cast; `Engine` converts HF folders in the right dtype to avoid it)."""
    from pathlib import Path

    from ember.engine.checkpoint import load_rank

    t0 = time.perf_counter()
    weights = load_rank(Path(checkpoint), device, par.rank, map_cpu=map_weights)
    if any(t.dtype != dtype and t.is_floating_point() for t in weights.values()):
        weights = {k: t.to(dtype) if t.is_floating_point() else t for k, t in weights.items()}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    load_s = time.perf_counter() - t0
    runner = ModelRunner(
        cfg, weights, par, device, num_blocks, block_size, checkpoint, pack_weights,
        pack_in_background,
    )  # fmt: skip
    runner.load_s = load_s
    return runner
