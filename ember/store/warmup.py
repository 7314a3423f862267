"""Warming a process that will host an engine before it has a model (the worker pool).

`warm_engine_process(device)` imports what building an engine imports (torch, the model code,
the tokenizer library, the DRAM-tier mapper) and runs each kind of op a decode step uses once,
on tiny tensors, in every float dtype: the thread pool starts and first-call kernel setup
(oneDNN, bf16 paths) happens now, not during a request's first token. It loads ember's CPU
decode-attention kernel too, compiling it if this machine's cache has none yet. On CUDA it also
creates the device's context, runs the same ops there (cuBLAS handles, attention kernels), pins
the loader's staging buffers and, given checkpoints it may be asked to load (the node store's
DRAM tier), registers their files with the driver (`cuda_loader.pin_checkpoint`) so that loading
one later is a DMA from where it already is. With `engine_pass` (the default on CUDA) it also
builds a tiny random-weight Llama engine on the device and generates with it (prefill, decode,
greedy and sampled), so the kernels an engine step launches are loaded before the first real
request: the first forward pass of a fresh CUDA process pays for loading each kernel it meets.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path


def warm_engine_process(
    device: str = "cpu", pin: Sequence[str | Path] = (), engine_pass: bool | None = None
) -> float:
    """Do the warm-up for engines on `device` ("cpu" or "cuda[:N]"), pinning the checkpoints in
    `pin` on CUDA; `engine_pass` (None: on CUDA only) runs a tiny engine there. Returns the
    seconds it took."""
    t0 = time.perf_counter()
    import torch
    import torch.nn.functional as F

    import ember.engine.engine  # noqa: F401
    import ember.engine.model_runner  # noqa: F401
    import ember.engine.tokenizer  # noqa: F401
    import ember.store.shm  # noqa: F401

    devices = ["cpu"]
    if device.startswith("cuda"):
        from ember.store.cuda_loader import reserve_staging
        from ember.store.loader import LoaderConfig

        if torch.device(device).index is not None:
            torch.cuda.set_device(torch.device(device))
        devices.append(device)
        reserve_staging(LoaderConfig())
        if pin:
            from ember.store.cuda_loader import pin_checkpoint

            for path in pin:
                pin_checkpoint(path)
    with torch.inference_mode():
        for dev in devices:
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                x = torch.randn(4, 8, 64, dtype=torch.float32).to(dev, dtype)
                w = torch.randn(64, 64, dtype=torch.float32).to(dev, dtype)
                y = F.silu(F.linear(x, w)) * x
                F.scaled_dot_product_attention(y, y, y, is_causal=True)
                torch.softmax(y.float(), dim=-1).argmax(dim=-1).tolist()
                F.embedding(torch.tensor([1, 2], device=dev), w)
    # The CPU decode-attention kernel: compiled on this machine's first use (about a second,
    # once per cache directory), then only loaded; either way not during a request's start.
    from ember.engine.models import cpu_attention

    if cpu_attention.enabled():
        cpu_attention.load()
    if engine_pass if engine_pass is not None else device.startswith("cuda"):
        _tiny_engine_pass(device)
    return time.perf_counter() - t0


def _tiny_engine_pass(device: str) -> None:
    """Generate with a tiny random-weight Llama (bf16, written to a temporary directory and
    removed) on `device`: two requests of different lengths, one greedy, one sampled."""
    import tempfile

    from ember.engine import Engine, EngineConfig, SamplingParams
    from ember.store.convert import convert
    from ember.store.factory import make_model

    with tempfile.TemporaryDirectory(prefix="ember-warmup-") as tmp:
        hf = make_model(Path(tmp) / "hf", "llama", "tiny", "bf16")
        ck = convert(hf, Path(tmp) / "ck", progress=False)
        engine = Engine(
            EngineConfig(
                model=str(ck), device=device, max_model_len=256, max_num_seqs=4,
                kv_cache_bytes=16 << 20,
            )
        )  # fmt: skip
        engine.add_request("warm-greedy", list(range(1, 40)), SamplingParams(max_tokens=4,
                           temperature=0.0, ignore_eos=True))  # fmt: skip
        engine.add_request("warm-sampled", list(range(1, 7)), SamplingParams(max_tokens=4,
                           temperature=0.8, top_p=0.9, top_k=20, seed=0, ignore_eos=True))  # fmt: skip
        while engine.has_unfinished():
            engine.step()
        del engine
