"""`ember sim` end to end: the shared SpotServe segment through every policy, its table, JSON
and plots; bad input exits 1 with one line naming the file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ember.cli.main import main

SPOT = Path("/work/shared/traces/spot/spotserve")
PROFILE = Path("/work/shared/profiles/spotserve/T4-4x/megatron_h6144_profile.json")
needs_shared = pytest.mark.skipif(not PROFILE.exists(), reason="shared traces not present")

KEYS = {
    "p50_s",
    "p90_s",
    "p99_s",
    "mean_s",
    "ttft_p99_s",
    "completed",
    "lost",
    "cost_usd",
    "gpu_hours",
}


@needs_shared
def test_sim_command_writes_table_json_and_plots(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out.json"
    rc = main(
        [
            "sim",
            "--spot-trace", str(SPOT / "trace_seg/trace_0506_real.txt"),
            "--workload", str(SPOT / "query/query_tpt0.35_cv6.txt"),
            "--profile", str(PROFILE),
            "--prompt-tokens", "512",
            "--output-tokens", "128",
            "--json", str(out),
            "--plots", str(tmp_path / "plots"),
        ]
    )  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    for name in ("ember", "spotserve", "reroute", "reparallelize", "restart"):
        assert f"\n{name} " in text
    rec = json.loads(out.read_text())
    pols = rec["policies"]
    assert list(pols) == ["ember", "spotserve", "reroute", "reparallelize", "restart"]
    for p in pols.values():
        assert KEYS <= set(p)
        assert p["completed"] + p["lost"] == rec["inputs"]["requests"] == 357
    # B_S: ember's tail below both SpotServe baselines and no worse than spotserve, same cost.
    assert pols["ember"]["p99_s"] < min(pols["reroute"]["p99_s"], pols["reparallelize"]["p99_s"])
    assert pols["ember"]["p99_s"] <= pols["spotserve"]["p99_s"]
    assert pols["ember"]["cost_usd"] <= pols["spotserve"]["cost_usd"] + 1e-9
    for png in ("latency_cdf.png", "gpus_over_time.png"):
        assert (tmp_path / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_trace_line_exits_1_with_one_line(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    trace = tmp_path / "t.txt"
    trace.write_text('[0, "add", {"nodes": ["a"]}]\n[oops]\n')
    rc = main(
        ["sim", "--spot-trace", str(trace), "--workload", str(trace), "--profile", str(trace)]
    )
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"ember sim: error: {trace}:2: not JSON: Expecting value"]


def test_unknown_policy_and_negative_rate_are_config_errors(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    f = str(tmp_path / "x")
    assert (
        main(["sim", "--spot-trace", f, "--workload", f, "--profile", f, "--policies", "magic"])
        == 1
    )
    assert "--policies: unknown magic" in capsys.readouterr().err
    assert main(["sim", "--spot-trace", f, "--workload", f, "--profile", f, "--rate", "-2"]) == 1
    assert "--rate must be > 0" in capsys.readouterr().err
