"""DeploymentSpec validation and round trips; the instance lifecycle's transition function."""

from __future__ import annotations

import pickle

import pytest

from ember.controller.types import (
    DeploymentSpec,
    DeploymentStatus,
    InstanceEvent,
    InstanceInfo,
    InstanceState,
    StreamDelta,
    transition,
)
from ember.errors import ConfigError, DeploymentError

S, E = InstanceState, InstanceEvent


def test_spec_round_trips_through_dict() -> None:
    spec = DeploymentSpec("m-1", "/models/m", min_instances=1, max_instances=3, keep_alive_s=5.0)
    assert DeploymentSpec.from_dict(spec.to_dict()) == spec


def test_spec_from_dict_accepts_int_for_float_fields() -> None:
    spec = DeploymentSpec.from_dict({"name": "m", "source": "/x", "keep_alive_s": 7})
    assert spec.keep_alive_s == 7.0 and isinstance(spec.keep_alive_s, float)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"name": "m", "source": "/x", "bogus": 1}, "bogus"),
        ({"source": "/x"}, "name"),
        ({"name": "m"}, "source"),
        ({"name": "m", "source": "/x", "max_instances": 0}, "max_instances"),
        ({"name": "m", "source": "/x", "min_instances": 2, "max_instances": 1}, "max_instances"),
        ({"name": "m", "source": "/x", "min_instances": -1}, "min_instances"),
        ({"name": "m", "source": "/x", "tp": 0}, "tp"),
        ({"name": "m", "source": "/x", "dtype": "int3"}, "dtype"),
        ({"name": "m", "source": "/x", "keep_alive_s": -1}, "keep_alive_s"),
        ({"name": "m", "source": "/x", "target_concurrency": "4"}, "target_concurrency"),
        ({"name": "m", "source": "/x", "max_num_seqs": True}, "max_num_seqs"),
        ({"name": "m", "source": "/x", "max_num_batched_tokens": 0}, "max_num_batched_tokens"),
        ({"name": "m", "source": "/x", "request_timeout_s": 0}, "request_timeout_s"),
        ({"name": "bad name!", "source": "/x"}, "name"),
        ({"name": "", "source": "/x"}, "name"),
    ],
)
def test_spec_from_dict_rejects_bad_field_naming_it(data: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{field}:"):
        DeploymentSpec.from_dict(data)


def test_happy_path_lifecycle() -> None:
    state = S.PENDING
    for event, want in [
        (E.LAUNCHED, S.STARTING),
        (E.LOADED, S.READY),
        (E.DRAIN, S.DRAINING),
        (E.STOP, S.STOPPING),
        (E.EXITED, S.STOPPED),
    ]:
        state = transition(state, event)
        assert state is want


def test_pending_instance_stops_without_a_stopping_phase() -> None:
    assert transition(S.PENDING, E.STOP) is S.STOPPED


def test_errors_while_starting_or_serving_fail_the_instance() -> None:
    assert transition(S.STARTING, E.ERROR) is S.FAILED
    assert transition(S.READY, E.ERROR) is S.FAILED
    assert transition(S.STOPPING, E.ERROR) is S.STOPPED


@pytest.mark.parametrize(
    ("state", "event"),
    [(S.STOPPED, E.LAUNCHED), (S.READY, E.LOADED), (S.PENDING, E.DRAIN), (S.STOPPED, E.STOP)],
)
def test_illegal_transition_raises(state: InstanceState, event: InstanceEvent) -> None:
    with pytest.raises(DeploymentError, match=f"state {state.value} cannot take event"):
        transition(state, event)


def test_states_are_plain_strings() -> None:
    assert S.READY == "ready" and str(S.DRAINING) == "draining"


def test_status_to_dict_lists_instances_with_string_states() -> None:
    spec = DeploymentSpec("m", "/x")
    info = InstanceInfo(
        "m-1", "m", "node-a", S.READY, 2, 1.5, 0.25, tier="dram", pid=4242,
        engine={"steps": 7, "kv_pulls": 1},
    )  # fmt: skip
    d = DeploymentStatus(spec, (info,), desired=1, cached_on=("node-a",)).to_dict()
    assert d["name"] == "m" and d["desired"] == 1 and d["cached_on"] == ["node-a"]
    assert (d["revision"], d["last_error"]) == (0, None)
    assert d["instances"] == [
        {
            "instance_id": "m-1",
            "deployment": "m",
            "node_id": "node-a",
            "state": "ready",
            "in_flight": 2,
            "started_at_s": 1.5,
            "load_s": 0.25,
            "error": None,
            "tier": "dram",
            "revision": 0,
            "estimated_load_s": None,
            "pid": 4242,
            "engine": {"steps": 7, "kv_pulls": 1},
        }
    ]


def test_messages_pickle_for_ray() -> None:
    delta = StreamDelta("r", (1, 2), "ab", True, "stop", 3, ({1: -0.5}, {2: -0.1}))
    assert pickle.loads(pickle.dumps(delta)) == delta
    spec = DeploymentSpec("m", "/x")
    assert pickle.loads(pickle.dumps(spec)) == spec


def test_spec_dtypes_are_the_engines() -> None:
    from ember.engine.config import DTYPE_NAMES

    for name in DTYPE_NAMES:
        DeploymentSpec("m", "/x", dtype=name).validate()
