"""Shared data for the policy tests (not a test module)."""

from __future__ import annotations

from typing import Any

# GPT-20B shape on T4 (SpotServe artifact, T4-4x/megatron_h6144_profile.json), batches <= 4.
H6144_DICT: dict[str, Any] = {
    "name": "megatron_h6144_profile",
    "layer_num": 44,
    "padded_layer_num": 48,
    "final_fix_factor": 1.1,
    "pp_init_comm": 7.0,
    "pp_incr_comm": 0.1,
    "hidden_size": 6144,
    "max_tp": 8,
    "embed": [0.318, 0.471, 0.607, 1.079],
    "tp-1": {
        "bsz-1": {"init": 107.203, "incr": 7.144},
        "bsz-2": {"init": 224.025, "incr": 7.259},
        "bsz-4": {"init": 454.014, "incr": 7.949},
    },
    "tp-2": {
        "bsz-1": {"init": 54.478, "incr": 3.808},
        "bsz-2": {"init": 115.698, "incr": 3.759},
        "bsz-4": {"init": 244.748, "incr": 4.076},
    },
    "tp-4": {
        "bsz-1": {"init": 37.562, "incr": 1.968},
        "bsz-2": {"init": 64.61, "incr": 1.938},
        "bsz-4": {"init": 132.855, "incr": 2.13},
    },
    "tp-8": {
        "bsz-1": {"init": 32.2, "incr": 1.758},
        "bsz-2": {"init": 42.778, "incr": 1.764},
        "bsz-4": {"init": 80.624, "incr": 1.932},
    },
}
