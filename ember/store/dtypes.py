"""The dtypes a checkpoint can hold, and their names in ember's index, safetensors and torch.

ember's index names dtypes with short lowercase names (`bf16`, `f8e4m3fn`, `bool`...). Every
name maps to exactly one torch dtype and one safetensors code, so a round trip through the
format never changes a tensor's dtype. Anything outside this table is refused with
`UnsupportedDtypeError` at conversion time rather than stored as bytes nobody can read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ember.errors import ConfigError


@dataclass(frozen=True, slots=True)
class DType:
    name: str  # ember's name, as written in index.json
    torch_dtype: torch.dtype
    safetensors: str  # the code in a safetensors header
    itemsize: int


_ALL = (
    DType("f64", torch.float64, "F64", 8),
    DType("f32", torch.float32, "F32", 4),
    DType("f16", torch.float16, "F16", 2),
    DType("bf16", torch.bfloat16, "BF16", 2),
    DType("f8e4m3fn", torch.float8_e4m3fn, "F8_E4M3", 1),
    DType("f8e5m2", torch.float8_e5m2, "F8_E5M2", 1),
    DType("i8", torch.int8, "I8", 1),
    DType("u8", torch.uint8, "U8", 1),
    DType("i16", torch.int16, "I16", 2),
    DType("i32", torch.int32, "I32", 4),
    DType("i64", torch.int64, "I64", 8),
    DType("bool", torch.bool, "BOOL", 1),
)

BY_NAME: dict[str, DType] = {d.name: d for d in _ALL}
BY_TORCH: dict[torch.dtype, DType] = {d.torch_dtype: d for d in _ALL}
BY_SAFETENSORS: dict[str, DType] = {d.safetensors: d for d in _ALL}

# Floating dtypes `convert(..., dtype=...)` may cast between; fp8 and integer tensors are kept
# as they are (casting them would change their meaning: scales, indices, masks).
CASTABLE = frozenset({"f64", "f32", "f16", "bf16"})

# What `--dtype` accepts, to ember's names.
_ALIASES = {
    "bf16": "bf16",
    "bfloat16": "bf16",
    "fp16": "f16",
    "f16": "f16",
    "float16": "f16",
    "half": "f16",
    "fp32": "f32",
    "f32": "f32",
    "float32": "f32",
    "float": "f32",
}


def parse_target_dtype(value: str | torch.dtype) -> DType:
    """The dtype `convert` casts floating tensors to; raises ConfigError for anything else."""
    if isinstance(value, torch.dtype):
        d = BY_TORCH.get(value)
        if d is None or d.name not in CASTABLE:
            raise ConfigError(f"cannot convert a checkpoint to {value}; use bf16, fp16 or fp32")
        return d
    name = _ALIASES.get(value.lower())
    if name is None:
        raise ConfigError(f"unknown --dtype {value!r}; use bf16, fp16 or fp32")
    return BY_NAME[name]
