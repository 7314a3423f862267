"""Latency-profile files (shared/profiles/spotserve/*/*.json) read into the policy's
`LatencyProfile`, with the model facts the simulator needs beside it (hidden size, bytes,
the fewest GPUs that hold the model).

`LatencyProfile.from_dict` names a bad field; this reader adds the file and the line where the
field (or its parent object) sits, so every bad profile is one `TraceError(path, line, reason)`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from ember.errors import ProfileError, TraceError
from ember.policy import LatencyProfile, ModelShape

T4_MEMORY_BYTES = 16 * 2**30  # g4dn's T4: 16 GB (SpotServe's testbed)


@dataclass(frozen=True, slots=True)
class ProfileFile:
    """A parsed profile and what the simulator derives from it."""

    path: str
    profile: LatencyProfile
    hidden_size: int
    shape: ModelShape  # fp32 GPT shape, as SpotServe's engine runs it
    min_gpus: int  # W_min: the fewest GPUs that hold weights and KV

    @property
    def weight_bytes(self) -> int:
        return (
            self.shape.layers * self.shape.layer_bytes
            + self.shape.embed_bytes
            + self.shape.head_bytes
        )


def _line_of_field(text: str, field: str) -> int | None:
    """Line of the innermost key of a dotted field that exists, searching each part after the last."""
    pos, found = 0, None
    for part in field.split("."):
        idx = text.find(f'"{part}"', pos)
        if idx < 0:
            break
        pos, found = idx, idx
    return None if found is None else text.count("\n", 0, found) + 1


def _hidden_from_name(name: str, layers: int) -> int | None:
    """`megatron_h6144` -> 6144; `opt-20B`, `6.7B` -> the hidden size of a GPT that size."""
    h = re.search(r"_h(\d+)", name)
    if h:
        return int(h.group(1))
    m = re.search(r"(\d+(?:\.\d+)?)\s*([BM])", name)
    if not m:
        return None
    params = float(m.group(1)) * (1e9 if m.group(2) == "B" else 1e6)
    return int(round(math.sqrt(params / (12 * layers)) / 64.0)) * 64


def min_gpus_for(shape: ModelShape, gpus_per_node: int, gpu_memory_bytes: int) -> int:
    """W_min: weights take at most half of each GPU (the rest is KV cache and activations),
    rounded up to whole nodes. On 16 GB T4s in fp32 this gives SpotServe's 4 / 12 / 16 GPUs
    for the 6.7B / 20B / 30B shapes."""
    weights = shape.layers * shape.layer_bytes + shape.embed_bytes + shape.head_bytes
    need = math.ceil(weights / (gpu_memory_bytes / 2))
    return max(1, -(-need // gpus_per_node) * gpus_per_node)


def read_profile(
    path: str | Path,
    *,
    prompt_tokens: int = 512,
    gpus_per_node: int = 4,
    gpu_memory_bytes: int = T4_MEMORY_BYTES,
) -> ProfileFile:
    """Read a SpotServe-style latency profile JSON; every fault is a TraceError with a line."""
    p = Path(path)
    if not p.is_file():
        raise TraceError(p, None, "no such profile file")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise TraceError(p, None, f"cannot read: {e}") from e
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise TraceError(p, e.lineno, f"not JSON: {e.msg}") from e
    try:
        prof = LatencyProfile.from_dict(doc, prompt_tokens=prompt_tokens)
    except ProfileError as e:
        line = _line_of_field(text, e.field) if isinstance(doc, dict) else 1
        raise TraceError(p, line or 1, str(e)) from e
    hidden = prof.hidden_size or _hidden_from_name(prof.name, prof.layer_num)
    if hidden is None:
        raise TraceError(p, 1, "profile field 'hidden_size': missing, and the name gives no size")
    shape = ModelShape.gpt(prof.layer_num, hidden)
    return ProfileFile(
        str(p), prof, hidden, shape, min_gpus_for(shape, gpus_per_node, gpu_memory_bytes)
    )
