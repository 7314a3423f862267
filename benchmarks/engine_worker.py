"""One engine's measurements for `ember bench engine`, run in a fresh process per engine.

Run by bench_engine.py as `PYTHON engine_worker.py SPEC.json`, with the project's python for
ember and transformers and with .vllm-venv's python for vLLM, so this file imports only the
standard library at the top; each engine's packages are imported inside its adapter.

SPEC.json: {"engine", "model", "spawn_time" (the parent's time.time() just before it started
this process), "threads", "device" ("cpu" or "cuda"; vLLM's CPU build runs on CPU only),
"max_model_len", "kv_cache_bytes", "short_prompt", "cold_only", "decode": {"prompt",
"new_tokens", "runs"} or null, "throughput": {"prompts", "outputs"} or null, "result"}. The
worker writes its result JSON to SPEC["result"]: cold start (process start to first generated
token), decode timings, throughput.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Any


class Adapter:
    """generate(prompts, max_tokens) -> list of generated-token counts; each engine's own API."""

    def generate(self, prompts: list[list[int]], max_tokens: list[int]) -> list[int]:
        raise NotImplementedError

    def settle(self) -> None:
        """Finish start-up work left in the background before steady-state timings."""


class EmberAdapter(Adapter):
    def __init__(self, spec: dict[str, Any]) -> None:
        import torch

        torch.set_num_threads(spec["threads"])
        from ember import LLM, SamplingParams

        self._params = SamplingParams
        self.llm = LLM(
            spec["model"],
            dtype="auto",
            max_model_len=spec["max_model_len"],
            max_num_seqs=64,
            kv_cache_bytes=spec["kv_cache_bytes"],
            device=spec.get("device", "cpu"),
        )

    def generate(self, prompts: list[list[int]], max_tokens: list[int]) -> list[int]:
        params = [self._params(max_tokens=n, temperature=0.0, ignore_eos=True) for n in max_tokens]
        outs = self.llm.generate(prompts, params)
        return [len(o.token_ids) for o in outs]

    def settle(self) -> None:
        # ember repacks bf16 weights for oneDNN on a background thread after the first token
        wait = getattr(self.llm.engine, "wait_for_packing", None)
        if wait is not None:
            wait()


class TransformersAdapter(Adapter):
    """transformers `generate`, greedy, in padded static batches (left padding)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        import torch

        torch.set_num_threads(spec["threads"])
        import transformers

        self.torch = torch
        self.device = spec.get("device", "cpu")
        placed = {} if self.device == "cpu" else {"device_map": self.device}  # needs accelerate
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            spec["model"], dtype=torch.bfloat16, **placed
        )
        self.model.eval()
        self.pad_id = int(self.model.config.pad_token_id or 0)

    def generate(self, prompts: list[list[int]], max_tokens: list[int]) -> list[int]:
        torch = self.torch
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        n = max(max_tokens)  # a static batch runs until its longest request is done
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=self.pad_id,
            )
        if self.device != "cpu":
            torch.cuda.synchronize()
        return [out.shape[1] - width] * len(prompts)


class VllmAdapter(Adapter):
    def __init__(self, spec: dict[str, Any]) -> None:
        from vllm import LLM, SamplingParams

        self._params = SamplingParams
        self.llm = LLM(
            model=spec["model"],
            dtype="bfloat16",
            max_model_len=spec["max_model_len"],
            max_num_seqs=64,
            seed=0,
        )

    def generate(self, prompts: list[list[int]], max_tokens: list[int]) -> list[int]:
        params = [self._params(max_tokens=n, temperature=0.0, ignore_eos=True) for n in max_tokens]
        inputs = [{"prompt_token_ids": p} for p in prompts]
        outs = self.llm.generate(inputs, params, use_tqdm=False)
        return [len(o.outputs[0].token_ids) for o in outs]


ADAPTERS = {"ember": EmberAdapter, "transformers": TransformersAdapter, "vllm": VllmAdapter}


def cpu_seconds() -> float:
    """User + system CPU time of this process and its children (vLLM's engine core is one).

    On a shared machine wall time depends on the neighbours; CPU time much less so."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


CPU_SPENT: list[float] = []  # CPU seconds of each _timed call, in order


def _timed(adapter: Adapter, prompts: list[list[int]], max_tokens: list[int]) -> tuple[float, int]:
    cpu = cpu_seconds()
    start = time.perf_counter()
    counts = adapter.generate(prompts, max_tokens)
    elapsed = time.perf_counter() - start
    CPU_SPENT.append(cpu_seconds() - cpu)
    return elapsed, sum(counts)


def measure_decode(
    adapter: Adapter, prompt: list[int], new_tokens: int, runs: int
) -> dict[str, Any]:
    """Batch-1 decode rate: (new_tokens - 1) / (T(new_tokens) - T(1)), prefill cancelled out."""
    _timed(adapter, [prompt], [new_tokens])  # warm-up, excluded
    full, first, cpu_rates = [], [], []
    for _ in range(runs):
        t1, _ = _timed(adapter, [prompt], [1])
        tn, n = _timed(adapter, [prompt], [new_tokens])
        assert n == new_tokens, (n, new_tokens)
        first.append(t1)
        full.append(tn)
        cpu_rates.append((new_tokens - 1) / max(CPU_SPENT[-1] - CPU_SPENT[-2], 1e-9))
    rates = [(new_tokens - 1) / max(tn - t1, 1e-9) for tn, t1 in zip(full, first, strict=True)]
    return {
        "tok_per_cpu_s_median": statistics.median(cpu_rates),
        "tok_s_runs": rates,
        "tok_s_median": statistics.median(rates),
        "tok_s_best": max(rates),
        "prefill_plus_one_s_median": statistics.median(first),
        "end_to_end_s_median": statistics.median(full),
    }


def measure_throughput(
    adapter: Adapter, prompts: list[list[int]], outputs: list[int], static_batch: int | None
) -> dict[str, Any]:
    """All requests; static batches of `static_batch` in arrival order when given."""
    adapter.generate([prompts[0][:16]], [4])  # warm-up, excluded
    start = time.perf_counter()
    cpu = cpu_seconds()
    generated = 0
    if static_batch:
        for i in range(0, len(prompts), static_batch):
            _, n = _timed(adapter, prompts[i : i + static_batch], outputs[i : i + static_batch])
            generated += n
    else:
        _, generated = _timed(adapter, prompts, outputs)
    elapsed = time.perf_counter() - start
    useful = sum(outputs)
    cpu = cpu_seconds() - cpu
    return {
        "cpu_s": cpu,
        "out_tok_per_cpu_s": useful / cpu,
        "elapsed_s": elapsed,
        "useful_output_tokens": useful,
        "generated_tokens": generated,
        "out_tok_s": useful / elapsed,
    }


def main(spec_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    engine = spec["engine"]
    result: dict[str, Any] = {"engine": engine, "model": spec["model"], "pid": os.getpid()}
    t0 = time.time()
    adapter = ADAPTERS[engine](spec)
    result["init_s"] = time.time() - t0
    adapter.generate([spec["short_prompt"]], [1])
    result["cold_start_s"] = time.time() - spec["spawn_time"]
    result["first_generate_s"] = time.time() - t0 - result["init_s"]
    if not spec.get("cold_only"):
        t = time.time()
        adapter.settle()
        result["settle_s"] = time.time() - t
    if not spec.get("cold_only"):
        d = spec.get("decode")
        if d:
            result["decode"] = measure_decode(adapter, d["prompt"], d["new_tokens"], d["runs"])
        tp = spec.get("throughput")
        if tp:
            static = 8 if engine == "transformers" else None
            result["throughput"] = measure_throughput(adapter, tp["prompts"], tp["outputs"], static)
    with open(spec["result"], "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
