"""The streaming engine: one model replica serving many requests with continuous batching.

A step is three moves (nano-vllm's shape): the scheduler returns a plan, the executor (the
model runner, or rank 0 of a tensor-parallel group) returns logits, and `_postprocess` samples,
appends tokens, applies stop conditions and emits `RequestOutput`s with incremental tokens and
text. Invalid requests raise `RequestError` from `add_request` and leave the engine serving
the others. `export_request`/`import_request` move a request between engines with its
generator state and, optionally, its KV cache.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import random
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch

from ember.controller.types import KvBlob
from ember.engine.block_manager import BlockManager
from ember.engine.checkpoint import checkpoint_tp, read_config, resolve
from ember.engine.config import DTYPE_NAMES, EngineConfig, ModelConfig
from ember.engine.kv_sizing import kv_cache_blocks
from ember.engine.model_runner import load_runner
from ember.engine.models.layers import ParallelContext
from ember.engine.request import Request, RequestOutput, RequestState, RequestStatus
from ember.engine.sampling import SamplingParams, advance, sample
from ember.engine.scheduler import SchedulePlan, Scheduler
from ember.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from ember.errors import ConfigError, RequestError

logger = logging.getLogger(__name__)

_DEFAULT_MAX_MODEL_LEN_CAP = 4096


class Executor(Protocol):
    def execute(self, plan: SchedulePlan) -> torch.Tensor | None: ...
    def read_kv(self, slots: Sequence[int]) -> torch.Tensor: ...
    def write_kv(self, slots: Sequence[int], kv: torch.Tensor) -> None: ...
    def close(self) -> None: ...


@contextlib.contextmanager
def _start_up_gc() -> Iterator[None]:
    """No cyclic garbage collection while an engine starts, and none ever again over what the
    imports left behind.

    After `import torch` the process holds several hundred thousand objects, and building an
    engine (modules, parameters, the tokenizer) allocates enough to trigger full collections
    that walk them all: on the 2-core dev VM they were 0.07 s of a 1.1B engine's start-up and
    0.1 s of its first token. So the first engine of a process freezes what exists before it
    (imported modules, which live as long as the process anyway) into the permanent
    generation, and collection waits until the engine is built."""
    if gc.get_freeze_count() == 0:
        gc.freeze()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# Prefill speed is measured on steps that prefill at least this many tokens (the step's
# decodes, run in the same pass, count as its overhead).
PREFILL_MEASURE_MIN_TOKENS = 32


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        with _start_up_gc():
            self._start(config)

    def _start(self, config: EngineConfig) -> None:
        self.config = config
        tp = config.tensor_parallel_size
        want = DTYPE_NAMES[config.dtype]
        _check_source_architecture(config.model)
        self.checkpoint = resolve(config.model, tp, None if want == "auto" else want)
        hf = read_config(self.checkpoint)
        self.model_config = ModelConfig.from_hf(hf)
        stored_tp = checkpoint_tp(self.checkpoint)
        if stored_tp and stored_tp != tp:
            raise ConfigError(
                f"tensor_parallel_size={tp} but the checkpoint {self.checkpoint} has shard sets "
                f"for tp={stored_tp}; convert it again with --tp {tp} or pass the HF folder"
            )
        self.model_name = str(hf.get("_name_or_path") or "") or _model_name(config.model)
        self.dtype: torch.dtype = getattr(
            torch, self.model_config.torch_dtype if want == "auto" else want
        )
        self.tokenizer = Tokenizer(self.checkpoint)
        self.max_model_len = _max_model_len(config, self.model_config)
        device = torch.device(config.device)
        num_blocks = kv_cache_blocks(
            config, self.model_config, self.dtype, self.max_model_len, device
        )
        self.block_manager = BlockManager(num_blocks, config.block_size_tokens)
        eos = self.model_config.eos_token_ids or self.tokenizer.eos_token_ids
        self.scheduler = Scheduler(
            self.block_manager,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            eos_token_ids=eos,
        )
        self._executor: Executor
        if tp == 1:
            self._executor = load_runner(
                str(self.checkpoint), self.model_config, ParallelContext(), device,
                self.dtype, num_blocks, config.block_size_tokens, config.pack_weights,
                config.pack_in_background, config.map_weights,
            )  # fmt: skip
        else:
            from ember.engine.parallel import TensorParallelExecutor, make_spec

            spec = make_spec(
                str(self.checkpoint), self.model_config, config.device, self.dtype,
                num_blocks, config.block_size_tokens, tp, config.pack_weights,
                config.pack_in_background, config.map_weights,
            )  # fmt: skip
            self._executor = TensorParallelExecutor(spec)
        # Seconds this process spent loading weights (None where rank processes load them).
        self.load_s: float | None = getattr(self._executor, "load_s", None)
        self._rng = random.Random(config.seed)
        self._requests: dict[str, Request] = {}
        self._aborted: list[RequestOutput] = []
        self._held: dict[str, Request] = {}  # held requests (live-migration targets), by id
        # Measured prefill speed (tokens per second of the steps that prefilled, smoothed;
        # None before the first): what a migration weighs a KV transfer against.
        self.prefill_tokens_per_s: float | None = None
        logger.info(
            "engine model=%s arch=%s dtype=%s tp=%d max_model_len=%d kv_blocks=%d",
            self.model_name, self.model_config.architecture, self.dtype, tp,
            self.max_model_len, num_blocks,
        )  # fmt: skip

    @classmethod
    def from_config(cls, **kwargs: Any) -> Engine:
        return cls(EngineConfig(**kwargs))

    # --- requests ---------------------------------------------------------------------------

    def add_request(
        self, request_id: str, prompt: str | Sequence[int], params: SamplingParams
    ) -> None:
        prompt_ids = self._new_request_ids(request_id, prompt, params)
        request = Request(
            request_id=request_id,
            prompt_token_ids=prompt_ids,
            params=params,
            generator=self._generator(params),
            detokenizer=IncrementalDetokenizer(self.tokenizer, len(prompt_ids)),
        )
        self._requests[request_id] = request
        self.scheduler.add(request)

    def resume_request(
        self,
        request_id: str,
        prompt: str | Sequence[int],
        params: SamplingParams,
        output_token_ids: Sequence[int],
        text_sent: str = "",
        hold: bool = False,
        kv: torch.Tensor | KvBlob | None = None,
    ) -> None:
        """Carry on a request whose engine was lost, from what its client was sent: the prompt,
        the ids generated so far and their text (`text_sent`; new text starts after it).

        Nothing of the lost engine is needed: the tokens are recomputed in a prefill, the
        detokenizer is replayed token by token as it ran there, and a seeded request's
        generator is advanced past the draws its sampled tokens took (`sampling.advance`), so
        greedy and seeded requests go on with exactly the tokens they would have produced
        unmoved. An unseeded sampled request goes on from a fresh seed (the router gives every
        sampled request a seed before it reaches an engine: `ember.api.router.resumable`).

        `hold`: the target side of a live migration. The tokens are prefilled but nothing is
        sampled; once they are in the cache, `step()` reports the request once with no new
        tokens (the acknowledgement). `extend_request` appends the tokens the source produced
        meanwhile and, with `release=True`, lets it go on from there.

        `kv`: the K/V of the first `kv.shape[2]` of these tokens, as `export_kv` (or
        `export_request(..., include_kv=True)`) gives them on the engine they come from (a live
        migration that found moving the cache cheaper than recomputing it). Positions up to the
        last token's are written into the cache instead of prefilled when blocks and a sequence
        slot are free now; otherwise (or without `kv`) every token is recomputed.
        """
        if not output_token_ids and not hold and kv is None:
            self.add_request(request_id, prompt, params)
            return
        prompt_ids = self._new_request_ids(request_id, prompt, params)
        ids = self._prompt_ids([*prompt_ids, *output_token_ids])  # in the vocabulary, fits
        output = ids[len(prompt_ids) :]
        self._check_room(request_id, params, len(output))
        request = Request(
            request_id=request_id,
            prompt_token_ids=prompt_ids,
            params=params,
            generator=self._generator(params),
            detokenizer=IncrementalDetokenizer(self.tokenizer, len(prompt_ids)),
            output_token_ids=output,
            emitted_text_len=len(text_sent),
            held=hold,
        )
        if kv is not None:
            kv = self._check_kv(kv)
        if hold:
            self._held[request_id] = request
        else:
            self._replay(request, text_sent)
        self._requests[request_id] = request
        if kv is None or not self._adopt_kv(request, kv):
            self.scheduler.add(request)

    def extend_request(
        self,
        request_id: str,
        token_ids: Sequence[int],
        text_sent: str = "",
        release: bool = False,
    ) -> None:
        """Append `token_ids` (produced by the migration's source since the last round) to a
        held request; they are prefilled in the next steps and acknowledged like the first
        round. `release=True` ends the hold: `text_sent` is what the client has (new text
        starts after it), and the request samples its next token as the unmoved one would."""
        request = self._requests.get(request_id)
        if request is None or not request.held:
            raise RequestError(f"request_id {request_id!r} is not a held request here")
        extra = self._prompt_ids([*request.prompt_token_ids, *token_ids])
        extra = extra[len(request.prompt_token_ids) :]  # in the vocabulary
        self._check_room(request_id, request.params, len(request.output_token_ids) + len(extra))
        if request.num_tokens + len(extra) >= self.max_model_len:
            raise RequestError(
                f"request {request_id!r} would have {request.num_tokens + len(extra)} tokens; "
                f"max_model_len is {self.max_model_len}"
            )
        request.output_token_ids.extend(extra)
        request.acked_tokens = -1
        if release:
            request.held = False
            del self._held[request_id]
            request.emitted_text_len = len(text_sent)
            request.generator = self._generator(request.params)
            self._replay(request, text_sent)

    def _check_room(self, request_id: str, params: SamplingParams, generated: int) -> None:
        if generated >= params.max_tokens:
            raise RequestError(
                f"request {request_id!r} already has {generated} of max_tokens="
                f"{params.max_tokens} tokens: nothing is left to generate"
            )

    def _replay(self, request: Request, text_sent: str) -> None:
        """Bring a resumed or released request's sampling and text state to where its tokens
        left them: a seeded generator advanced past the draws they took, the detokenizer run
        over them one by one as it ran where they were generated."""
        output = request.output_token_ids
        if not request.params.greedy:
            advance(request.generator, len(output), self.model_config.vocab_size)
        n_prompt = len(request.prompt_token_ids)
        detokenizer = IncrementalDetokenizer(self.tokenizer, n_prompt)
        for end in range(n_prompt + 1, request.num_tokens + 1):
            start = detokenizer.prefix_offset
            detokenizer.step(request.token_ids_from(start, end), start)
        if not detokenizer.text.startswith(text_sent):
            logger.warning(
                "request %s resumed: the text sent (%d chars) is not a prefix of its tokens' "
                "text (%d chars); continuing after the text sent",
                request.request_id, len(text_sent), len(detokenizer.text),
            )  # fmt: skip
        request.detokenizer = detokenizer

    def _new_request_ids(
        self, request_id: str, prompt: str | Sequence[int], params: SamplingParams
    ) -> list[int]:
        """The prompt's token ids, once the id is free and the params are SamplingParams."""
        if not isinstance(request_id, str) or not request_id:
            raise RequestError(f"request_id must be a non-empty string, got {request_id!r}")
        if request_id in self._requests:
            raise RequestError(f"request_id {request_id!r} is already in use")
        if not isinstance(params, SamplingParams):
            raise RequestError(f"params must be SamplingParams, got {type(params).__name__}")
        return self._prompt_ids(prompt)

    def _generator(self, params: SamplingParams) -> torch.Generator:
        """A request's own generator: seeded from `params.seed`, else from the engine's seed."""
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        generator = torch.Generator(device="cpu")
        generator.manual_seed(seed)
        return generator

    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt) if prompt else []
        elif isinstance(prompt, Sequence) and (
            set(map(type, prompt)) <= {int}  # the common case, checked at C speed
            or all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
        ):
            ids = [int(t) for t in prompt]
            vocab = self.model_config.vocab_size
            if ids and not (0 <= min(ids) and max(ids) < vocab):
                bad = [t for t in ids if not 0 <= t < vocab]
                raise RequestError(
                    f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})"
                )
        else:
            raise RequestError("prompt must be a string or a list of token ids")
        if not ids:
            raise RequestError("prompt is empty")
        if len(ids) >= self.max_model_len:
            raise RequestError(
                f"prompt has {len(ids)} tokens but max_model_len is {self.max_model_len} "
                "(prompt and at least one generated token must fit); shorten the prompt or "
                "raise max_model_len"
            )
        return ids

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its KV blocks; the next `step()` reports it once with
        finish_reason "abort". Unknown or finished ids are ignored."""
        request = self._requests.pop(request_id, None)
        if request is None:
            return
        self._held.pop(request_id, None)
        self.scheduler.finish(request, "abort")
        self._aborted.append(self._output(request, request.detokenizer.text))

    def has_unfinished(self) -> bool:
        """True while `step()` has work: a request runs or waits, or an abort is still to be
        reported. A held request (a live migration's target copy) counts only until its tokens
        are prefilled and acknowledged: then it waits for a command, not for a step (a runner
        that kept stepping for it would spin)."""
        if self._aborted or self.scheduler.num_unfinished() > len(self._held):
            return True
        return any(r.acked_tokens != r.num_tokens for r in self._held.values())

    def num_unfinished(self) -> int:
        return self.scheduler.num_unfinished()

    # --- the step ---------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        outputs, self._aborted = self._aborted, []
        plan = self.scheduler.schedule()
        if plan.seqs:
            t0 = time.perf_counter()
            logits = self._executor.execute(plan)
            assert logits is not None
            outputs.extend(self._postprocess(plan, logits))  # (sampling syncs a GPU)
            if plan.num_prefills:
                self._measure_prefill(plan, time.perf_counter() - t0)
        for request in self._held.values():  # acknowledge those whose tokens are all cached
            if request.acked_tokens != request.num_tokens and (
                request.status is RequestStatus.RUNNING
                and request.num_cached_tokens == request.num_tokens - 1
            ):
                request.acked_tokens = request.num_tokens
                outputs.append(self._output(request, ""))
        return outputs

    def _measure_prefill(self, plan: SchedulePlan, seconds: float) -> None:
        tokens = sum(len(s.token_ids) for s in plan.seqs[: plan.num_prefills])
        if tokens < PREFILL_MEASURE_MIN_TOKENS or seconds <= 0:
            return  # a step this small measures the step's overhead (or decodes), not prefill
        rate = tokens / seconds
        last = self.prefill_tokens_per_s
        self.prefill_tokens_per_s = rate if last is None else last + 0.3 * (rate - last)

    @torch.inference_mode()
    def _postprocess(self, plan: SchedulePlan, logits: torch.Tensor) -> list[RequestOutput]:
        seqs = plan.seqs
        if all(s.sample for s in seqs):
            requests = [self._requests[s.request_id] for s in seqs]
        else:  # prompt chunks that end before their last token: no token, no output
            rows = [i for i, s in enumerate(seqs) if s.sample]
            requests = [self._requests[seqs[i].request_id] for i in rows]
            logits = logits[rows]
        if not requests:  # only a long prompt's chunk ran
            self.scheduler.postprocess([], [], [])
            return []
        result = sample(logits, [r.params for r in requests], [r.generator for r in requests])
        self.scheduler.postprocess(requests, result.token_ids, result.logprobs)
        outputs = []
        for request in requests:
            text = self._update_text(request)
            outputs.append(self._output(request, text))
            if request.finished:
                del self._requests[request.request_id]
        return outputs

    def _update_text(self, request: Request) -> str:
        """Detokenize the new tokens, apply stop strings, and return the text that may be shown
        (while unfinished, the last len(longest stop) - 1 characters are held back so a stop
        string is never streamed)."""
        detok = request.detokenizer
        start = detok.prefix_offset
        new = detok.step(request.token_ids_from(start), start)
        stops = request.params.stop
        if not stops:
            return detok.text
        if new and request.finish_reason != "stop":
            longest = max(len(s) for s in stops)
            start = max(len(detok.text) - len(new) - longest + 1, 0)
            hits = [i for i in (detok.text.find(s, start) for s in stops) if i >= 0]
            if hits:
                detok.text = detok.text[: min(hits)]
                if not request.finished:
                    self.scheduler.finish(request, "stop")
                else:
                    request.finish_reason = "stop"
        if request.finished:
            return detok.text
        hold = max(len(s) for s in stops) - 1
        return detok.text[: len(detok.text) - hold] if hold else detok.text

    def _output(self, request: Request, visible_text: str) -> RequestOutput:
        emitted = request.emitted_text_len
        request.emitted_text_len = max(len(visible_text), emitted)
        new_ids, request.new_token_ids = request.new_token_ids, []
        lps = request.output_logprobs if request.params.logprobs is not None else None
        new_lps = None
        if lps is not None:
            new_lps = lps[max(len(lps) - len(new_ids), 0) :] if new_ids else []
        return RequestOutput(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            text=visible_text,
            new_token_ids=new_ids,
            new_text=visible_text[emitted:],
            finished=request.finished,
            finish_reason=request.finish_reason,
            new_logprobs=new_lps,
            _tokens=request.output_token_ids,
            _num_tokens=len(request.output_token_ids),
            _logprobs=lps,
            _num_logprobs=len(lps) if lps is not None else 0,
        )

    # --- migration --------------------------------------------------------------------------

    def export_request(self, request_id: str, include_kv: bool = False) -> RequestState:
        """A snapshot of an unfinished request (it keeps running here; `abort` it once the
        importing engine has it). KV is included only for a running request."""
        request = self._unfinished(request_id)
        return RequestState(
            request_id=request_id,
            prompt_token_ids=tuple(request.prompt_token_ids),
            output_token_ids=tuple(request.output_token_ids),
            params=request.params,
            rng_state=bytes(request.generator.get_state().numpy().tobytes()),
            text=request.detokenizer.text,
            text_emitted=request.emitted_text_len,
            output_logprobs=tuple(request.output_logprobs),
            kv=self._cached_kv(request) if include_kv else None,
        )

    def export_kv(self, request_id: str) -> KvBlob | None:
        """The K/V of an unfinished request's cached tokens as bytes (for another process:
        `resume_request(..., kv=)` there); None when it has none cached (not running)."""
        request = self._unfinished(request_id)
        kv = self._cached_kv(request)
        if kv is None:
            return None
        kv = kv.contiguous()
        data = kv.view(torch.uint8).numpy().tobytes()
        return KvBlob(tuple(kv.shape), str(kv.dtype).removeprefix("torch."), data)

    def _unfinished(self, request_id: str) -> Request:
        request = self._requests.get(request_id)
        if request is None:
            raise RequestError(f"request_id {request_id!r} is not an unfinished request here")
        return request

    def _cached_kv(self, request: Request) -> torch.Tensor | None:
        """The K/V of a running request's cached tokens (None: not running, or none cached)."""
        if request.status is not RequestStatus.RUNNING or not request.num_cached_tokens:
            return None
        slots = [self.block_manager.slot(request, p) for p in range(request.num_cached_tokens)]
        return self._executor.read_kv(slots)

    def cached_tokens(self, request_id: str) -> int:
        """How many of an unfinished request's tokens have K/V in the cache now."""
        request = self._unfinished(request_id)
        return request.num_cached_tokens if request.status is RequestStatus.RUNNING else 0

    def import_request(self, state: RequestState) -> None:
        """Continue `state` here. With KV for every token but the last it decodes next step;
        otherwise (or when the KV does not fit now) its tokens are recomputed in a prefill."""
        if state.request_id in self._requests:
            raise RequestError(f"request_id {state.request_id!r} is already in use")
        ids = list(state.prompt_token_ids) + list(state.output_token_ids)
        if not state.prompt_token_ids:
            raise RequestError("prompt is empty")
        if len(ids) >= self.max_model_len:
            raise RequestError(
                f"request has {len(ids)} tokens but max_model_len is {self.max_model_len}"
            )
        kv = state.kv
        if kv is not None:
            kv = self._check_kv(kv)
        generator = torch.Generator(device="cpu")
        generator.set_state(torch.frombuffer(bytearray(state.rng_state), dtype=torch.uint8))
        request = Request(
            request_id=state.request_id,
            prompt_token_ids=list(state.prompt_token_ids),
            params=state.params,
            generator=generator,
            detokenizer=IncrementalDetokenizer(self.tokenizer, len(ids), state.text),
            output_token_ids=list(state.output_token_ids),
            output_logprobs=list(state.output_logprobs),
            emitted_text_len=state.text_emitted,
        )
        self._requests[state.request_id] = request
        if kv is None or not self._adopt_kv(request, kv):
            self.scheduler.add(request)

    def _check_kv(self, kv: torch.Tensor | KvBlob) -> torch.Tensor:
        """`kv` as a tensor of this model's K/V shape (RequestError if it is not one)."""
        cfg = self.model_config
        want = (cfg.num_layers, 2, cfg.num_kv_heads, cfg.head_dim)
        if isinstance(kv, KvBlob):
            kv = _unpack_kv(kv)
        if kv.dim() != 5 or (*kv.shape[:2], *kv.shape[3:]) != want:
            raise RequestError(
                f"kv has shape {tuple(kv.shape)}; this model needs [{want[0]}, 2, tokens, "
                f"{want[2]}, {want[3]}]"
            )
        return kv

    def _adopt_kv(self, request: Request, kv: torch.Tensor) -> bool:
        """Write `kv` (its first positions, up to the one before `request`'s last token) into
        new blocks and admit `request` as running with them cached; False (nothing done) when
        the blocks or a sequence slot are not free now. Later tokens are prefilled as usual."""
        n = min(kv.shape[2], request.num_tokens - 1)
        if (
            n <= 0
            or not self.block_manager.can_grow(request, n)
            or len(self.scheduler.running) >= self.scheduler.max_num_seqs
        ):
            return False
        self.block_manager.grow(request, n)
        slots = [self.block_manager.slot(request, p) for p in range(n)]
        self._executor.write_kv(slots, kv[:, :, :n])
        request.num_cached_tokens = n
        admitted = self.scheduler.add_running(request)
        assert admitted
        return True

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K/V one token holds (all layers and heads): a KV transfer's size per token."""
        cfg = self.model_config
        return cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * self.dtype.itemsize

    def wait_for_packing(self) -> None:
        """Block until background weight packing (bf16 on CPU) is done and in use; benchmarks
        call it to time the steady state. A no-op when nothing is being packed."""
        runner: Any = getattr(self._executor, "runner", self._executor)
        runner.wait_packed()

    def close(self) -> None:
        """Stop tensor-parallel rank processes (a no-op for tp=1)."""
        self._executor.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _unpack_kv(blob: KvBlob) -> torch.Tensor:
    dtype = getattr(torch, blob.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise RequestError(f"kv has an unknown dtype {blob.dtype!r}")
    size = math.prod(blob.shape) * dtype.itemsize
    if len(blob.shape) != 5 or len(blob.data) != size:
        raise RequestError(
            f"kv holds {len(blob.data)} bytes; shape {blob.shape} of {blob.dtype} needs {size}"
        )
    with warnings.catch_warnings():  # (read-only bytes: the tensor is only read from)
        warnings.simplefilter("ignore", UserWarning)
        flat = (
            torch.frombuffer(blob.data, dtype=torch.uint8)
            if size
            else torch.empty(0, dtype=torch.uint8)
        )
    return flat.view(dtype).view(blob.shape)


def _check_source_architecture(model: str) -> None:
    """Fail on an unsupported HF folder before spending time converting it."""
    import json
    from pathlib import Path

    path = Path(model).expanduser() / "config.json"
    if path.is_file() and not (path.parent / "index.json").is_file():
        ModelConfig.from_hf(json.loads(path.read_text()))


def _model_name(model: str) -> str:
    from pathlib import Path

    return Path(model).name


def _max_model_len(config: EngineConfig, cfg: ModelConfig) -> int:
    limit = cfg.max_position_embeddings
    if config.max_model_len is None:
        return min(limit, _DEFAULT_MAX_MODEL_LEN_CAP)
    if config.max_model_len > limit:
        raise ConfigError(
            f"max_model_len={config.max_model_len} exceeds the model's "
            f"max_position_embeddings={limit}; lower max_model_len"
        )
    return config.max_model_len
