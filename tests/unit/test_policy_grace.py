"""Grace-period arrangement: step budgets at their boundaries, survivors, resume choice."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ember.errors import ConfigError
from ember.policy import (
    ResumeMode,
    RunningRequest,
    arrange_grace,
    choose_survivors,
    prefer_recompute,
    step_budget,
)


@pytest.mark.parametrize(
    ("slot_s", "held_back", "steps"),
    [
        (1.1, 1, 9),  # exactly 10 steps of 1.1 * 0.1 s fit; one is held back
        (1.0999, 1, 8),  # just under: 9 fit
        (1.1, 0, 10),
        (0.11, 1, 0),  # one step fits, and it is the one held back
        (0.0, 0, 0),
        (-3.0, 0, 0),  # migration already late
    ],
)
def test_step_budget_at_its_boundaries(slot_s: float, held_back: int, steps: int) -> None:
    assert step_budget(slot_s, 0.1, safety=1.1, held_back=held_back) == steps


def _req(rid: str, replica: int, prompt: int, gen: int, max_new: int = 128) -> RunningRequest:
    return RunningRequest(rid, replica, prompt, gen, max_new)


def test_arrange_grace_gives_each_request_its_share_of_the_budget() -> None:
    reqs = [_req("short", 0, 512, 123), _req("long", 0, 512, 20)]  # 5 and 108 tokens left
    g = arrange_grace(
        reqs, deadline_s=30.0, now_s=10.0, migration_s=18.9, prefill_s=0.5, decode_step_s=0.1
    )
    assert g.slot_s == pytest.approx(1.1)
    assert g.steps == 9
    assert dict(g.steps_by_request) == {"short": 5, "long": 9}
    assert g.finishing == ("short",)
    assert g.accept_new_batch is True  # 1.1 s > 1.1 * (0.5 + 0.1)
    # a slot of exactly 1.1 * (t1 + t2) does not admit a new batch; a hair more does
    edge = arrange_grace(
        reqs, deadline_s=0.66, now_s=0.0, migration_s=0.0, prefill_s=0.5, decode_step_s=0.1
    )
    more = arrange_grace(
        reqs, deadline_s=0.67, now_s=0.0, migration_s=0.0, prefill_s=0.5, decode_step_s=0.1
    )
    assert (edge.accept_new_batch, more.accept_new_batch) == (False, True)


def test_shrinking_batch_budget_reprices_steps_as_requests_finish() -> None:
    reqs = [_req("a", 0, 10, 125), _req("b", 0, 10, 118)]  # 3 and 10 tokens left
    steps = {1: 0.05, 2: 0.1}
    common = dict(now_s=0.0, migration_s=0.0, prefill_s=0.0, decode_step_s=steps, safety=1.0)
    # 3 steps at batch 2 (0.3 s) + 4 at batch 1 (0.2 s) = 0.5 s: 7 steps, one held back
    g = arrange_grace(reqs, deadline_s=0.5, shrinking_batch=True, **common)  # type: ignore[arg-type]
    assert g.steps == 6
    published = arrange_grace(reqs, deadline_s=0.5, **common)  # type: ignore[arg-type]
    assert published.steps == 4  # floor(0.5 / 0.1) - 1 at the batch-2 step time
    # when everything can finish, nothing is held back
    done = arrange_grace(reqs, deadline_s=1.0, shrinking_batch=True, **common)  # type: ignore[arg-type]
    assert done.steps == 10 and done.finishing == ("a", "b")


@settings(deadline=None)
@given(
    slot=st.floats(-5, 50),
    t2=st.floats(0.001, 2.0),
    extra=st.floats(0, 10),
)
def test_step_budget_is_monotone_and_fits_the_slot(slot: float, t2: float, extra: float) -> None:
    n = step_budget(slot, t2)
    assert n >= 0
    assert step_budget(slot + extra, t2) >= n
    assert n * 1.1 * t2 <= max(slot, 0.0) + 1e-6


def test_survivors_by_spotserve_progress_keep_the_furthest_batches() -> None:
    reqs = [
        _req("r1", 0, 512, 100),
        _req("r2", 1, 512, 20),
        _req("r3", 1, 512, 20),
        _req("r4", 2, 100, 120),
    ]
    s = choose_survivors(reqs, 2, by_tokens=False, dropped_mode=ResumeMode.RESTART)
    assert dict(s.kv_stay) == {0: 2, 1: 0}
    assert s.resume["r2"] is ResumeMode.RESTART and s.resume["r3"] is ResumeMode.RESTART
    assert s.resume["r1"] is ResumeMode.KEEP_KV and s.resume["r4"] is ResumeMode.KEEP_KV
    e = choose_survivors(reqs, 2)  # ember: most tokens saved, dropped ones recompute
    assert dict(e.kv_stay) == {0: 1, 1: 0}
    assert e.resume["r4"] is ResumeMode.RECOMPUTE
    assert choose_survivors(reqs, 5).resume == {r.request_id: ResumeMode.KEEP_KV for r in reqs}
    assert dict(choose_survivors(reqs, 0).kv_stay) == {}


def test_recompute_is_preferred_only_when_faster_than_moving_kv() -> None:
    # 1000 tokens at 10k tok/s = 0.1 s; 1 GB at 5 GB/s = 0.2 s
    assert prefer_recompute(1000, 10**9, transfer_Bps=5e9, prefill_tokens_per_s=1e4)
    assert not prefer_recompute(1000, 10**8, transfer_Bps=5e9, prefill_tokens_per_s=1e4)
    with pytest.raises(ConfigError):
        prefer_recompute(1, 1, transfer_Bps=0, prefill_tokens_per_s=1)


def test_bad_inputs_are_rejected() -> None:
    with pytest.raises(ConfigError):
        step_budget(1.0, 0.0)
    with pytest.raises(ConfigError, match="r"):
        _req("r", 0, -1, 0)
    with pytest.raises(ConfigError, match="new_replicas"):
        choose_survivors([], -1)
