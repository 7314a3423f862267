"""Block manager invariants and the scheduler's batching and preemption policy (no model)."""

from __future__ import annotations

import pytest
import torch

from ember.engine.block_manager import BlockManager
from ember.engine.request import Request, RequestStatus
from ember.engine.sampling import SamplingParams
from ember.engine.scheduler import Scheduler
from ember.engine.tokenizer import IncrementalDetokenizer

EOS = 2


def _request(rid: str, prompt_len: int, max_tokens: int = 100) -> Request:
    return Request(
        request_id=rid,
        prompt_token_ids=list(range(10, 10 + prompt_len)),
        params=SamplingParams(max_tokens=max_tokens, temperature=0),
        generator=torch.Generator(),
        detokenizer=IncrementalDetokenizer(None, prompt_len),  # type: ignore[arg-type]
    )


def test_blocks_return_to_the_pool_when_requests_free_them() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = _request("a", 5), _request("b", 9)
    bm.grow(a, 5)
    bm.grow(b, 9)
    assert len(a.block_table) == 2 and len(b.block_table) == 3 and bm.num_free == 3
    assert bm.slot(a, 5 - 1) == a.block_table[1] * 4
    bm.check()
    bm.free(a)
    bm.free(b)
    bm.check()
    assert bm.num_free == bm.num_blocks and a.block_table == [] and b.block_table == []


def test_shared_blocks_are_freed_by_the_last_holder_only() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    a, b = _request("a", 8), _request("b", 8)
    bm.grow(a, 8)
    bm.share(b, a.block_table)
    bm.free(a)
    assert bm.num_free == 2
    bm.check()
    bm.free(b)
    assert bm.num_free == 4
    bm.check()


def test_double_free_is_caught() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    a = _request("a", 4)
    bm.grow(a, 4)
    table = list(a.block_table)
    bm.free(a)
    a.block_table = table
    with pytest.raises(AssertionError, match="double free"):
        bm.free(a)


def _scheduler(num_blocks: int, max_num_seqs: int = 8, budget: int = 1000) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, 4), max_num_seqs, budget, 64, [EOS])


def _run_step(s: Scheduler, token: int = 7) -> tuple[list[str], int, list[str]]:
    plan = s.schedule()
    reqs = {r.request_id: r for r in [*s.running, *s.waiting]}
    batch = [reqs[q.request_id] for q in plan.seqs]
    s.postprocess(batch, [token] * len(batch), [None] * len(batch))
    return [q.request_id for q in plan.seqs], plan.num_prefills, list(plan.preempted)


def test_prefill_comes_first_then_everyone_decodes_together() -> None:
    s = _scheduler(num_blocks=32)
    for i in range(3):
        s.add(_request(str(i), 6))
    assert _run_step(s) == (["0", "1", "2"], 3, [])
    plan = s.schedule()
    assert plan.num_prefills == 0 and [q.token_ids for q in plan.seqs] == [(7,)] * 3
    assert [q.start_position for q in plan.seqs] == [6, 6, 6]


def test_a_request_arriving_mid_decode_is_prefilled_in_the_decode_step() -> None:
    s = _scheduler(num_blocks=32)
    s.add(_request("0", 6))
    s.add(_request("1", 6))
    _run_step(s)
    s.add(_request("new", 5))
    plan = s.schedule()  # the newcomer's prompt, then one token of each running request
    assert plan.num_prefills == 1 and [q.request_id for q in plan.seqs] == ["new", "0", "1"]
    assert [(q.start_position, len(q.token_ids)) for q in plan.seqs] == [(0, 5), (6, 1), (6, 1)]


def test_max_num_seqs_bounds_the_batch() -> None:
    s = _scheduler(num_blocks=64, max_num_seqs=2)
    for i in range(5):
        s.add(_request(str(i), 3, max_tokens=2))
    seen = []
    while s.has_unfinished():
        ids, _, _ = _run_step(s)
        assert len(ids) <= 2 and len(s.running) <= 2
        seen.append(ids)
    assert s.block_manager.num_free == s.block_manager.num_blocks
    assert seen[0] == ["0", "1"]


def test_prefill_token_budget_splits_prefills_across_steps() -> None:
    s = _scheduler(num_blocks=64, budget=10)
    for i in range(3):
        s.add(_request(str(i), 6))
    assert _run_step(s)[0] == ["0"]
    assert _run_step(s)[0] == ["1", "0"]  # 6 new tokens + 1 decode: "2" waits for budget
    assert _run_step(s)[:2] == (["2", "0", "1"], 1)


def test_out_of_blocks_preempts_the_newest_request_by_recompute() -> None:
    # 4 blocks of 4 tokens: two requests of 8 prompt tokens hold 2 blocks each.
    s = _scheduler(num_blocks=4)
    a, b = _request("a", 8), _request("b", 8)
    s.add(a)
    s.add(b)
    _run_step(s)  # prefill both: 9 tokens each now, 4 blocks used
    ids, prefill, preempted = _run_step(s)  # decode needs a 3rd block each
    assert preempted == ["b"] and ids == ["a"] and not prefill  # no admission while short
    assert b.status is RequestStatus.WAITING and b.block_table == [] and b.num_cached_tokens == 0
    assert s.waiting[0] is b and b.output_token_ids == [7]
    s.block_manager.check()
    s.finish(a, "abort")
    ids, prefill, _ = _run_step(s)  # b comes back with prompt + generated tokens recomputed
    assert ids == ["b"] and prefill and b.num_cached_tokens == 9
    s.finish(b, "abort")
    assert s.block_manager.num_free == 4


def test_token_level_stops_finish_and_free() -> None:
    s = _scheduler(num_blocks=16)
    eos, length = _request("eos", 3), _request("len", 3, max_tokens=1)
    s.add(eos)
    s.add(length)
    plan = s.schedule()
    assert len(plan.seqs) == 2
    s.postprocess([eos, length], [EOS, 9], [None, None])
    assert (eos.finish_reason, length.finish_reason) == ("stop", "length")
    assert not s.has_unfinished() and s.block_manager.num_free == 16
