"""Readers of spot traces, workloads and latency profiles: real shared files, and malformed
snippets whose error names the file and the line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ember.errors import ConfigError, TraceError
from ember.sim.profile_file import read_profile
from ember.sim.spot_trace import ADD, REMOVE, read_spot_trace
from ember.sim.workload import read_workload

SHARED = Path("/work/shared")
SPOT = SHARED / "traces/spot"
WORK = SHARED / "traces/workload"
PROFILES = SHARED / "profiles/spotserve"
needs_shared = pytest.mark.skipif(not SPOT.exists(), reason="shared traces not present")


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# --- real files -------------------------------------------------------------------------------


@needs_shared
def test_spotserve_segment_a_s_has_its_published_shape() -> None:
    t = read_spot_trace(SPOT / "spotserve/trace_seg/trace_0304_real.txt")
    assert t.fmt == "spotserve-seg"
    assert t.end_s == 1320.0 and t.gpus_per_node == 4
    assert t.nodes_alive(0.0) == 7 and t.max_nodes() == 10
    assert sum(e.op == REMOVE for e in t.events) == 3  # A_S: 3 preemptions
    assert [e.node for e in t.events if e.t_s == 1200.0] == ["node-10", "node-3"]


@needs_shared
def test_spotserve_full_csv_counts_adds_and_removes() -> None:
    t = read_spot_trace(SPOT / "spotserve/trace_full/g4dn.csv")
    assert t.fmt == "spotserve-csv"
    assert sum(e.op == ADD for e in t.events) == 79
    assert sum(e.op == REMOVE for e in t.events) == 74
    assert t.max_nodes() == 24


@needs_shared
def test_count_json_with_prices_and_zone_directory() -> None:
    one = read_spot_trace(
        SPOT / "skypilot-spot-traces/preemption/1-node/aws-04-22-2023/us-west-2b_v100_1.json"
    )
    assert one.fmt == "count-json" and one.gpus_per_node == 1
    assert one.spot_prices[0] == (0.0, 0.918) and one.end_s == 19961 * 32
    zones = read_spot_trace(SPOT / "spothedge-ae/data/GCP1")
    assert zones.fmt == "count-json-dir" and zones.gpus_per_node == 8
    assert {e.zone for e in zones.events} >= {"us-central1-a_a100_40gb_8"}


@needs_shared
def test_workload_formats_from_the_shared_traces() -> None:
    q = read_workload(SPOT / "spotserve/query/query_tpt0.35_cv6.txt")
    assert (q.fmt, len(q), q.prompt_tokens[0], q.output_tokens[0]) == (
        "spotserve-query",
        1024,
        512,
        128,
    )
    assert q.mean_rate_rps() == pytest.approx(0.35, rel=0.02)
    conv = read_workload(WORK / "azure_llm_2023/conv.csv")
    assert (conv.fmt, len(conv)) == ("azure-llm", 9754)
    assert (conv.prompt_tokens[0], conv.output_tokens[0], conv.arrival_s[0]) == (374, 44, 0.0)
    moon = read_workload(WORK / "mooncake/conversation.jsonl")
    assert (len(moon), moon.prompt_tokens[0], moon.output_tokens[0]) == (5719, 6758, 500)
    share = read_workload(WORK / "sharegpt/lengths.csv", rate_rps=2.0, horizon_s=100.0)
    assert share.fmt == "sharegpt" and share.arrival_s[-1] < 100.0
    fn19 = read_workload(WORK / "azure_functions_2019/invocations.csv", horizon_s=600.0)
    assert fn19.fmt == "azure-functions-2019" and len(fn19.models) > 10
    fn21 = read_workload(WORK / "azure_functions_2021/invocations_sample.csv")
    assert (len(fn21), len(fn21.models)) == (199, 31)
    maf = read_workload(
        SPOT / "spothedge-ae/workloads/maf1/cleaned.csv", rate_rps=5.0, horizon_s=600.0
    )
    assert maf.fmt == "maf-counts" and 2000 < len(maf) < 4000


@needs_shared
def test_maf_counts_without_rate_refuse_to_expand_billions() -> None:
    with pytest.raises(ConfigError, match="--rate"):
        read_workload(SPOT / "spothedge-ae/workloads/maf1/cleaned.csv")


@needs_shared
def test_shared_profile_gives_spotserve_w_min() -> None:
    pf = read_profile(PROFILES / "T4-4x/megatron_h6144_profile.json")
    assert pf.profile.layer_num == 44 and pf.hidden_size == 6144
    assert pf.min_gpus == 12  # SpotServe's W_min for 20B on 16 GB T4s (MIN_WORLD_SIZE=12)
    assert read_profile(PROFILES / "T4-4x/megatron_6.7B_profile.json").min_gpus == 4
    assert read_profile(PROFILES / "T4-4x/megatron_h7168_profile.json").min_gpus == 16


# --- malformed input: one error naming file and line -----------------------------------------


def test_malformed_segment_line_names_file_and_line(tmp_path: Path) -> None:
    p = write(tmp_path, "seg.txt", '[0, "add", {"nodes": ["a"]}]\n[60000, "add", {"nodes": [1]}]\n')
    with pytest.raises(TraceError) as e:
        read_spot_trace(p)
    assert (e.value.path, e.value.line) == (str(p), 2)
    assert str(e.value).startswith(f"{p}:2: ")


def test_segment_unknown_operation_and_time_going_back(tmp_path: Path) -> None:
    p = write(tmp_path, "a.txt", '[0, "add", {"nodes": ["a"]}]\n\n[5, "boot", {"nodes": []}]\n')
    with pytest.raises(TraceError, match=r"a\.txt:3: unknown operation 'boot'"):
        read_spot_trace(p)
    p = write(tmp_path, "b.txt", '[10, "add", {"nodes": ["a"]}]\n[5, "remove", {"nodes": ["a"]}]\n')
    with pytest.raises(TraceError, match=r"b\.txt:2: .*back in time"):
        read_spot_trace(p)


def test_negative_required_rate_names_the_line(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        "w.txt",
        '[0, "add", {"nodes": ["a"]}]\n[1000, "other", {"nodes": [], "required_tpt": -0.5}]\n',
    )
    with pytest.raises(TraceError, match=r"w\.txt:2: required_tpt must be a rate >= 0"):
        read_spot_trace(p)


def test_csv_trace_bad_timestamp(tmp_path: Path) -> None:
    p = write(tmp_path, "g.csv", "0,add,node1\n60000,add,node2\nsoon,remove,node1\n")
    with pytest.raises(TraceError, match=r"g\.csv:3: timestamp 'soon' is not a number"):
        read_spot_trace(p)


def test_count_json_negative_count_names_the_data_line(tmp_path: Path) -> None:
    p = write(
        tmp_path, "z_v100_1.json", '{"metadata": {"gap_seconds": 60},\n "data": [1, 2, -1]}\n'
    )
    with pytest.raises(TraceError, match=r"z_v100_1\.json:2: data\[2\] = -1"):
        read_spot_trace(p)


def test_unknown_formats_are_refused(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match=r"x\.txt:1: unknown spot trace format"):
        read_spot_trace(write(tmp_path, "x.txt", "hello world\n"))
    with pytest.raises(TraceError, match=r"y\.csv:1: unknown workload format"):
        read_workload(write(tmp_path, "y.csv", "a;b;c\n1;2;3\n"))


def test_count_json_becomes_adds_and_removes(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        "us-x_v100_8.json",
        json.dumps({"metadata": {"gap_seconds": 10}, "data": [2, 1, 3]}),
    )
    t = read_spot_trace(p)
    assert t.gpus_per_node == 8 and t.end_s == 30.0
    assert [(e.t_s, e.op) for e in t.events] == [
        (0.0, ADD),
        (0.0, ADD),
        (10.0, REMOVE),
        (20.0, ADD),
        (20.0, ADD),
    ]
    assert [t.nodes_alive(x) for x in (0, 10, 20)] == [2, 1, 3]


def test_workload_bad_token_count_names_file_and_line(tmp_path: Path) -> None:
    p = write(tmp_path, "q.txt", "0,0.5,512,0\n1,1.0,-3,100\n")
    with pytest.raises(TraceError, match=r"q\.txt:2: input_len must be >= 0, got -3"):
        read_workload(p)
    p = write(
        tmp_path,
        "m.jsonl",
        '{"timestamp": 0, "input_length": 5, "output_length": 2}\n{"timestamp": 1}\n',
    )
    with pytest.raises(TraceError, match=r"m\.jsonl:2: missing field 'input_length'"):
        read_workload(p)


def test_negative_rate_in_rates_file_and_on_the_command_line(tmp_path: Path) -> None:
    p = write(tmp_path, "rates.csv", "0.5,0.6,-0.1,0.4,0.5\n")
    with pytest.raises(TraceError, match=r"rates\.csv:1: rate #2 must be >= 0"):
        read_workload(p)
    good = write(tmp_path, "ok.csv", "0.5,0.6,0.1,0.4,0.5\n")
    with pytest.raises(ConfigError, match="--rate must be > 0"):
        read_workload(good, rate_rps=-1.0)


def test_rates_file_is_seeded_poisson(tmp_path: Path) -> None:
    p = write(tmp_path, "rates.csv", "1.0,2.0,1.0,0.5,1.5\n")
    a, b = read_workload(p, seed=3), read_workload(p, seed=3)
    assert a == b and len(a) > 100
    assert read_workload(p, seed=4).arrival_s != a.arrival_s
    assert read_workload(p, seed=3, prompt_tokens=64, output_tokens=8).prompt_tokens[0] == 64


def test_rate_rescales_timestamps_keeping_shape(tmp_path: Path) -> None:
    p = write(tmp_path, "q.txt", "0,0.0,512,0\n1,2.0,512,1\n2,4.0,512,2\n")
    w = read_workload(p, rate_rps=1.0)
    assert w.arrival_s == (0.0, 1.0, 2.0)


def _toy_profile() -> dict[str, object]:
    return {
        "name": "toy",
        "layer_num": 2,
        "hidden_size": 64,
        "final_fix_factor": 1.0,
        "pp_init_comm": 0.0,
        "pp_incr_comm": 0.0,
        "embed": [0.0],
        "tp-1": {"bsz-1": {"init": 1000.0, "incr": 100.0}},
    }


def test_profile_missing_field_names_file_and_line(tmp_path: Path) -> None:
    d = _toy_profile()
    del d["final_fix_factor"]
    p = write(tmp_path, "p.json", json.dumps(d, indent=1))
    with pytest.raises(TraceError, match=r"p\.json:1: profile field 'final_fix_factor': missing"):
        read_profile(p)
    d = _toy_profile()
    d["tp-1"] = {"bsz-1": {"init": 1000.0}}
    text = json.dumps(d, indent=1)
    p = write(tmp_path, "q.json", text)
    line = text.splitlines().index(' "tp-1": {') + 2  # the "bsz-1" line
    with pytest.raises(
        TraceError, match=rf"q\.json:{line}: profile field 'tp-1.bsz-1.incr': missing"
    ):
        read_profile(p)


def test_profile_not_json_names_the_line(tmp_path: Path) -> None:
    p = write(tmp_path, "bad.json", '{\n "layer_num": 2,\n "embed": [0.0,,]\n}\n')
    with pytest.raises(TraceError, match=r"bad\.json:3: not JSON"):
        read_profile(p)
