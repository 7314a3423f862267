"""Per-layer latency profile of one model on one GPU type (SpotServe's offline profile).

`LatencyProfile.from_dict(d)` takes the dict of a profile JSON (as in
shared/profiles/spotserve/): `layer_num`, optional `padded_layer_num` (default `layer_num`),
optional `hidden_size`, optional `max_tp` (default: the largest `tp-M` present),
`final_fix_factor`, `pp_init_comm`, `pp_incr_comm` (ms per pipeline hop), `embed` (ms, index
log2 of the batch), and `tp-M` -> `bsz-b` -> {`init`, `incr`} (ms per decoder layer: prefill of
a micro-batch of b prompts of `prompt_tokens` tokens, one decode step). It does no I/O; a
missing or bad field raises `ProfileError` naming the field, so the file reader can add the path.
All stored times are milliseconds, as in the files.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from ember.errors import ProfileError


@dataclass(frozen=True, slots=True)
class LayerCost:
    """Milliseconds per decoder layer: prefill of one micro-batch, one decode step."""

    init_ms: float
    incr_ms: float


def _number(d: Mapping[str, Any], key: str, where: str = "") -> float:
    name = f"{where}{key}"
    if key not in d:
        raise ProfileError(name, "missing")
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
        raise ProfileError(name, f"must be a finite number >= 0, got {v!r}")
    return float(v)


def _positive_int(d: Mapping[str, Any], key: str) -> int:
    v = d.get(key)
    if key not in d:
        raise ProfileError(key, "missing")
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ProfileError(key, f"must be an integer >= 1, got {v!r}")
    return v


def _power_of_two_key(key: str, prefix: str) -> int | None:
    if not key.startswith(prefix):
        return None
    try:
        n = int(key[len(prefix) :])
    except ValueError:
        return None
    return n if n >= 1 and n & (n - 1) == 0 else None


@dataclass(frozen=True, slots=True)
class LatencyProfile:
    """A parsed latency profile; see the module docstring for the fields' meaning."""

    name: str
    layer_num: int
    padded_layer_num: int
    hidden_size: int | None
    max_tp: int
    final_fix_factor: float
    pp_init_comm_ms: float
    pp_incr_comm_ms: float
    embed_ms: tuple[float, ...]
    layer_costs: Mapping[tuple[int, int], LayerCost]  # (tp, micro-batch) -> cost
    prompt_tokens: int = 512

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, prompt_tokens: int = 512) -> LatencyProfile:
        if not isinstance(d, Mapping):
            raise ProfileError("<root>", f"must be a JSON object, got {type(d).__name__}")
        layer_num = _positive_int(d, "layer_num")
        padded = _positive_int(d, "padded_layer_num") if "padded_layer_num" in d else layer_num
        if padded < layer_num:
            raise ProfileError("padded_layer_num", f"{padded} is below layer_num {layer_num}")
        hidden = _positive_int(d, "hidden_size") if "hidden_size" in d else None
        embed = d.get("embed")
        if "embed" not in d:
            raise ProfileError("embed", "missing")
        if not isinstance(embed, list | tuple) or not embed:
            raise ProfileError("embed", f"must be a non-empty list of ms, got {embed!r}")
        embed_ms = tuple(_number({"embed": e}, "embed", "") for e in embed)
        costs: dict[tuple[int, int], LayerCost] = {}
        for key, per_bsz in d.items():
            tp = _power_of_two_key(key, "tp-")
            if tp is None:
                continue
            if not isinstance(per_bsz, Mapping):
                raise ProfileError(key, "must be an object of bsz-b entries")
            for bkey, entry in per_bsz.items():
                b = _power_of_two_key(bkey, "bsz-")
                if b is None:
                    continue
                if not isinstance(entry, Mapping):
                    raise ProfileError(f"{key}.{bkey}", "must be an object with init and incr")
                where = f"{key}.{bkey}."
                costs[(tp, b)] = LayerCost(
                    _number(entry, "init", where), _number(entry, "incr", where)
                )
        if not costs:
            raise ProfileError("tp-1", "missing: no tp-M.bsz-b entries with init/incr")
        present_max_tp = max(tp for tp, _ in costs)
        max_tp = _positive_int(d, "max_tp") if "max_tp" in d else present_max_tp
        max_tp = min(max_tp, present_max_tp)
        if prompt_tokens < 1:
            raise ProfileError("prompt_tokens", f"must be >= 1, got {prompt_tokens}")
        return cls(
            name=str(d.get("name", "profile")),
            layer_num=layer_num,
            padded_layer_num=padded,
            hidden_size=hidden,
            max_tp=max_tp,
            final_fix_factor=_number(d, "final_fix_factor"),
            pp_init_comm_ms=_number(d, "pp_init_comm"),
            pp_incr_comm_ms=_number(d, "pp_incr_comm"),
            embed_ms=embed_ms,
            layer_costs=MappingProxyType(costs),
            prompt_tokens=prompt_tokens,
        )

    def to_dict(self) -> dict[str, Any]:
        """The profile back in the JSON layout (`from_dict(p.to_dict()) == p`)."""
        out: dict[str, Any] = {
            "name": self.name,
            "layer_num": self.layer_num,
            "padded_layer_num": self.padded_layer_num,
            "max_tp": self.max_tp,
            "final_fix_factor": self.final_fix_factor,
            "pp_init_comm": self.pp_init_comm_ms,
            "pp_incr_comm": self.pp_incr_comm_ms,
            "embed": list(self.embed_ms),
        }
        if self.hidden_size is not None:
            out["hidden_size"] = self.hidden_size
        for (tp, b), c in sorted(self.layer_costs.items()):
            out.setdefault(f"tp-{tp}", {})[f"bsz-{b}"] = {"init": c.init_ms, "incr": c.incr_ms}
        return out

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LatencyProfile):
            return NotImplemented
        return self.to_dict() == other.to_dict() and self.prompt_tokens == other.prompt_tokens

    def __hash__(self) -> int:
        return hash((self.name, self.layer_num, self.padded_layer_num, self.max_tp))

    def tp_degrees(self) -> tuple[int, ...]:
        """Tensor-parallel degrees the profile covers, ascending, up to max_tp."""
        return tuple(sorted({tp for tp, _ in self.layer_costs if tp <= self.max_tp}))

    def has(self, tp: int, micro_batch: int) -> bool:
        return (tp, micro_batch) in self.layer_costs

    def cost(self, tp: int, micro_batch: int) -> LayerCost:
        try:
            return self.layer_costs[(tp, micro_batch)]
        except KeyError:
            raise ProfileError(f"tp-{tp}.bsz-{micro_batch}", "not in the profile") from None

    def embed_cost_ms(self, batch: int) -> float:
        """Embedding + LM-head ms for a batch (index log2(batch), clipped to the table)."""
        i = max(0, batch.bit_length() - 1)
        return self.embed_ms[min(i, len(self.embed_ms) - 1)]

    def max_batch(self) -> int:
        """The largest batch whose micro-batch sizes are all profiled at every TP degree."""
        return max(b for _, b in self.layer_costs)
