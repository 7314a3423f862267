"""The engine's request life cycle on a tiny factory model: streaming increments, stop strings,
abort, preemption, seeded sampling across batch compositions, export/import, bad input, and no
KV block leaked whatever way a request ends."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from ember import LLM, SamplingParams
from ember.controller.types import KvBlob
from ember.engine import Engine, EngineConfig, RequestOutput
from ember.engine.kv_sizing import bytes_per_block
from ember.errors import CheckpointNotFoundError, RequestError, UnsupportedArchitectureError
from ember.migration.transfer import KvMode, MoveLink, export_for_move
from ember.store import read_index

GREEDY = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EMBER_CACHE_DIR", str(tmp_path_factory.mktemp("ember-cache")))
        yield


@pytest.fixture(scope="module")
def model(model_factory: Callable[..., Path]) -> Path:
    return model_factory("llama")


@pytest.fixture(scope="module")
def engine(model: Path) -> Engine:
    return Engine(EngineConfig(model=str(model), dtype="fp32", max_model_len=128))


def _new_engine(model: Path, **kwargs: object) -> Engine:
    return Engine(EngineConfig(model=str(model), dtype="fp32", max_model_len=128, **kwargs))  # type: ignore[arg-type]


def _drain(engine: Engine) -> dict[str, list[RequestOutput]]:
    """Step until idle; every output per request, in order; invariants checked every step."""
    seen: dict[str, list[RequestOutput]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            seen.setdefault(out.request_id, []).append(out)
        engine.block_manager.check()
    for out in engine.step():  # abort reports
        seen.setdefault(out.request_id, []).append(out)
    assert engine.block_manager.num_free == engine.block_manager.num_blocks
    return seen


def _run(
    engine: Engine, prompts: dict[str, list[int] | str], params: SamplingParams
) -> dict[str, RequestOutput]:
    for rid, prompt in prompts.items():
        engine.add_request(rid, prompt, params)
    return {rid: outs[-1] for rid, outs in _drain(engine).items()}


def test_stream_increments_add_up_to_the_final_output(engine: Engine) -> None:
    engine.add_request("s", "the people of the water", GREEDY)
    outs = _drain(engine)["s"]
    final = outs[-1]
    assert final.finished and final.finish_reason == "length" and len(final.token_ids) == 40
    assert [t for o in outs for t in o.new_token_ids] == final.token_ids
    assert "".join(o.new_text for o in outs) == final.text
    assert final.text == engine.tokenizer.decode(final.token_ids)
    assert all(not o.finished for o in outs[:-1])


def test_stop_string_ends_the_request_and_is_never_streamed(engine: Engine) -> None:
    full = _run(engine, {"a": "one two three"}, GREEDY)["a"].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert len(stop) == 3 and full.count(stop) >= 1
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=[stop])
    engine.add_request("b", "one two three", params)
    outs = _drain(engine)["b"]
    final = outs[-1]
    assert final.finish_reason == "stop"
    assert final.text == full[: full.index(stop)]
    assert "".join(o.new_text for o in outs) == final.text


def test_stop_token_ids_and_eos_finish_with_stop(engine: Engine) -> None:
    ref = _run(engine, {"r": [5, 6, 7]}, GREEDY)["r"].token_ids
    params = SamplingParams(max_tokens=40, temperature=0, stop_token_ids=[ref[3]])
    out = _run(engine, {"t": [5, 6, 7]}, params)["t"]
    assert out.finish_reason == "stop" and out.token_ids == ref[: ref.index(ref[3]) + 1]


def test_abort_frees_blocks_and_reports_once(engine: Engine) -> None:
    engine.add_request("x", [5, 6, 7, 8], GREEDY)
    engine.add_request("y", [9, 10], GREEDY)
    engine.step()
    engine.step()
    engine.abort("x")
    engine.abort("missing")  # ignored
    outs = _drain(engine)
    assert outs["x"][-1].finish_reason == "abort" and outs["x"][-1].finished
    assert sum(o.finished for o in outs["x"]) == 1
    assert outs["y"][-1].finish_reason == "length"


@pytest.mark.parametrize(
    ("prompt", "params", "field"),
    [
        ("", GREEDY, "prompt"),
        ([], GREEDY, "prompt"),
        ([1] * 128, GREEDY, "max_model_len"),
        ([5, 99999], GREEDY, "vocabulary"),
        ("hi", "not params", "params"),
    ],
)
def test_bad_requests_are_refused_and_the_engine_keeps_serving(
    engine: Engine, prompt: object, params: object, field: str
) -> None:
    engine.add_request("ok", [5, 6, 7], GREEDY)
    with pytest.raises(RequestError, match=field):
        engine.add_request("bad", prompt, params)  # type: ignore[arg-type]
    with pytest.raises(RequestError, match="request_id"):
        engine.add_request("ok", [5], GREEDY)
    outs = _drain(engine)
    assert set(outs) == {"ok"} and outs["ok"][-1].finish_reason == "length"


def test_unknown_model_folder_and_unsupported_architecture(tmp_path: Path, model: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="model"):
        Engine(EngineConfig(model=str(tmp_path / "nope")))
    other = tmp_path / "gpt2"
    shutil.copytree(model, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel"):
        Engine(EngineConfig(model=str(other)))


def test_seeded_sampling_is_the_same_alone_and_in_any_batch(engine: Engine) -> None:
    params = SamplingParams(max_tokens=24, temperature=0.8, top_p=0.95, seed=1234)
    alone = _run(engine, {"s": [5, 6, 7]}, params)["s"].token_ids
    crowd: dict[str, list[int] | str] = {f"o{i}": [9 + i] * (i + 1) for i in range(5)}
    for i, rid in enumerate(crowd):
        engine.add_request(rid, crowd[rid], SamplingParams(max_tokens=5 + 7 * i, seed=i))
    engine.step()
    engine.add_request("s2", [5, 6, 7], params)  # joins mid-way
    outs = _drain(engine)
    assert outs["s2"][-1].token_ids == alone
    unseeded = SamplingParams(max_tokens=24, temperature=0.8)
    assert (
        len({tuple(_run(engine, {"u": [5, 6, 7]}, unseeded)["u"].token_ids) for _ in range(3)}) > 1
    )


def test_preemption_by_recompute_gives_the_same_tokens(model: Path, engine: Engine) -> None:
    prompts: dict[str, list[int] | str] = {str(i): [5 + i] * (10 + 9 * i) for i in range(4)}
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    ref = _run(engine, prompts, params)
    # 12 blocks of 16 tokens; the four requests need 4 + 4 + 5 + 5 blocks at their longest.
    per_block = bytes_per_block(engine.model_config, 1, 16, torch.float32)
    small = _new_engine(model, kv_cache_bytes=per_block * 12)
    for rid, prompt in prompts.items():
        small.add_request(rid, prompt, params)
    preempted = 0
    outs: dict[str, RequestOutput] = {}
    while small.has_unfinished():
        preempted += sum(r.num_preemptions for r in small._requests.values())
        for out in small.step():
            outs[out.request_id] = out
        small.block_manager.check()
    assert preempted > 0
    assert small.block_manager.num_free == small.block_manager.num_blocks
    assert {k: v.token_ids for k, v in outs.items()} == {k: v.token_ids for k, v in ref.items()}


@pytest.mark.parametrize("include_kv", [False, True])
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_exported_request_resumes_with_identical_tokens(
    model: Path, engine: Engine, include_kv: bool, temperature: float
) -> None:
    params = SamplingParams(max_tokens=30, temperature=temperature, seed=99, ignore_eos=True)
    prompt = [5, 17, 33, 8, 40, 12]
    unmoved = _run(engine, {"m": prompt}, params)["m"]
    engine.add_request("m", prompt, params)
    engine.add_request("other", [7, 7, 7], GREEDY)
    streamed = []
    for _ in range(11):
        streamed += [t for o in engine.step() if o.request_id == "m" for t in o.new_token_ids]
    state = engine.export_request("m", include_kv=include_kv)
    assert (state.kv is not None) == include_kv
    if include_kv:
        assert state.kv is not None and state.kv.shape[2] == len(prompt) + len(streamed) - 1
    engine.abort("m")
    _drain(engine)
    target = _new_engine(model)
    target.import_request(state)
    rest = _drain(target)["m"]
    assert streamed + [t for o in rest for t in o.new_token_ids] == unmoved.token_ids
    assert rest[-1].token_ids == unmoved.token_ids and rest[-1].text == unmoved.text


@pytest.mark.parametrize(
    ("temperature", "stop"), [(0.0, None), (0.9, None), (0.0, "stop"), (0.9, "stop")]
)
def test_a_lost_request_resumes_from_what_its_client_was_sent(
    model: Path, engine: Engine, temperature: float, stop: str | None
) -> None:
    """Only the prompt, the ids streamed and the text streamed survive the lost engine (no
    generator state, no KV): the new engine still gives the unmoved tokens and text."""
    params = SamplingParams(max_tokens=30, temperature=temperature, seed=7, ignore_eos=True)
    prompt = "the people of the water"
    full = _run(engine, {"u": prompt}, params)["u"]
    if stop is not None:  # a stop string first found late in the output
        early = len(engine.tokenizer.decode(full.token_ids[:16]))
        stop_at = next(
            full.text[i : i + 3]
            for i in range(len(full.text) - 4, early, -1)
            if full.text.find(full.text[i : i + 3]) > early
        )
        params = SamplingParams(
            max_tokens=30, temperature=temperature, seed=7, ignore_eos=True, stop=[stop_at]
        )
    unmoved = _run(engine, {"u": prompt}, params)["u"]
    engine.add_request("u", prompt, params)
    ids: list[int] = []
    text = ""
    while len(ids) < 12:
        for out in engine.step():
            assert not out.finished
            ids += out.new_token_ids
            text += out.new_text
    assert stop is None or text != engine.tokenizer.decode(ids)  # something was held back
    engine.abort("u")
    _drain(engine)
    target = _new_engine(model)
    target.resume_request("u", prompt, params, ids, text)
    rest = _drain(target)["u"]
    assert ids + [t for o in rest for t in o.new_token_ids] == unmoved.token_ids
    assert text + "".join(o.new_text for o in rest) == unmoved.text
    assert rest[-1].finish_reason == unmoved.finish_reason
    with pytest.raises(RequestError, match="max_tokens"):
        target.resume_request("v", prompt, params, unmoved.token_ids, unmoved.text)
    target.resume_request("w", prompt, params, [], "")  # nothing sent yet: a new request
    assert _drain(target)["w"][-1].token_ids == unmoved.token_ids


@pytest.mark.parametrize(
    ("temperature", "stop", "kv"),
    [(0.0, None, False), (0.9, None, False), (0.9, "stop", False), (0.0, None, True),
     (0.9, "stop", True)],
)  # fmt: skip
def test_a_live_migration_in_rounds_gives_the_unmoved_tokens_and_text(
    model: Path, engine: Engine, temperature: float, stop: str | None, kv: bool
) -> None:
    """The target holds a copy: prefilled from what the client had when the move began (or,
    with `kv`, given the source's K/V of those tokens instead), then from what the source
    streamed during each round, acknowledged (an output with no token) after each; nothing is
    sampled while held. Released with the text sent, it goes on with exactly the unmoved tokens
    and text; the source's copy is aborted; no block leaks."""
    params = SamplingParams(
        max_tokens=40, temperature=temperature, seed=3, ignore_eos=True,
        stop=[stop] if stop else None,
    )  # fmt: skip
    prompt = "the people of the water"
    if stop is not None:  # a stop string found late in the output, so text is held back
        full = _run(engine, {"u": prompt}, params)["u"].text
        stop = next(
            full[i : i + 3] for i in range(len(full) - 4, 10, -1) if full.find(full[i : i + 3]) > 10
        )
        params = SamplingParams(
            max_tokens=40, temperature=temperature, seed=3, ignore_eos=True, stop=[stop]
        )
    unmoved = _run(engine, {"u": prompt}, params)["u"]
    target = _new_engine(model)
    engine.add_request("u", prompt, params)
    ids: list[int] = []
    text = ""
    sent = 0  # ids the target has
    acks = 0
    for goal in (8, 14, 17, 19):  # the source streams on while the target catches up
        while len(ids) < goal:
            for out in engine.step():
                ids += out.new_token_ids
                text += out.new_text
        if sent == 0:
            blob = export_for_move(engine, "u", MoveLink(KvMode.ALWAYS if kv else KvMode.NEVER))
            assert (blob is not None) == kv
            target.resume_request("u", prompt, params, ids, "", hold=True, kv=blob)
            n_prompt = len(target.tokenizer.encode(prompt))
            assert target.cached_tokens("u") == (n_prompt + len(ids) - 1 if kv else 0)
        elif goal < 19:
            target.extend_request("u", ids[sent:])
        else:  # the last round: the source stops, the target goes on
            engine.abort("u")
            _drain(engine)
            target.extend_request("u", ids[sent:], text, release=True)
            break
        sent = len(ids)
        outs: list[RequestOutput] = []
        while not outs:
            outs = target.step()
        assert [(o.new_token_ids, o.new_text, o.finished) for o in outs] == [([], "", False)]
        assert not target.has_unfinished()  # held and acknowledged: nothing to step for
        assert target.step() == []  # held: nothing sampled, nothing more reported
        acks += 1
    assert acks == 3
    rest = _drain(target)["u"]
    assert ids + [t for o in rest for t in o.new_token_ids] == unmoved.token_ids
    assert text + "".join(o.new_text for o in rest) == unmoved.text
    with pytest.raises(RequestError, match="not a held request"):
        target.extend_request("u", [5])


def test_kv_sent_as_bytes_arrives_bit_equal(model: Path, engine: Engine) -> None:
    """`export_kv` -> bytes -> `resume_request(kv=)` on another engine: the cache there holds
    the same bits, and the request goes on with the same tokens."""
    unmoved = _run(engine, {"u": [5, 6, 7, 8, 9]}, GREEDY)["u"].token_ids
    engine.add_request("u", [5, 6, 7, 8, 9], GREEDY)
    ids: list[int] = []
    while len(ids) < 10:
        ids += [t for o in engine.step() for t in o.new_token_ids]
    blob = engine.export_kv("u")
    assert blob is not None and blob.tokens == 5 + len(ids) - 1
    sent = engine.export_request("u", include_kv=True).kv
    engine.abort("u")
    _drain(engine)
    target = _new_engine(model)
    target.resume_request("u", [5, 6, 7, 8, 9], GREEDY, ids, kv=blob)
    assert target.cached_tokens("u") == blob.tokens
    arrived = target.export_request("u", include_kv=True).kv
    assert arrived is not None and sent is not None and torch.equal(arrived, sent)
    rest = [t for o in _drain(target)["u"] for t in o.new_token_ids]
    assert ids + rest == unmoved


def test_prefill_speed_is_measured_on_prefills_of_some_size(model: Path) -> None:
    target = _new_engine(model)
    _run(target, {"short": [5, 6, 7]}, GREEDY)  # a 3-token prefill and decodes: not measured
    assert target.prefill_tokens_per_s is None
    _run(target, {"long": list(range(5, 70))}, GREEDY)
    assert target.prefill_tokens_per_s is not None and target.prefill_tokens_per_s > 0


def test_kv_of_the_wrong_shape_is_refused_and_the_engine_keeps_serving(
    model: Path, engine: Engine
) -> None:
    cfg = engine.model_config
    bad = torch.zeros(cfg.num_layers, 2, 3, cfg.num_kv_heads + 1, cfg.head_dim)
    with pytest.raises(RequestError, match="kv has shape"):
        engine.resume_request("k", [5, 6, 7], GREEDY, [8], hold=True, kv=bad)
    short = KvBlob((cfg.num_layers, 2, 3, cfg.num_kv_heads, cfg.head_dim), "float32", b"\0" * 8)
    with pytest.raises(RequestError, match="kv holds 8 bytes"):
        engine.resume_request("k", [5, 6, 7], GREEDY, [8], hold=True, kv=short)
    assert not engine.has_unfinished()
    assert _run(engine, {"ok": [5, 6, 7]}, GREEDY)["ok"].finish_reason == "length"


def test_a_held_request_refuses_tokens_past_its_limits(model: Path) -> None:
    target = _new_engine(model)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    target.resume_request("h", [5, 6, 7], params, [8, 9], hold=True)
    with pytest.raises(RequestError, match="max_tokens"):
        target.extend_request("h", list(range(8)))
    with pytest.raises(RequestError, match="vocabulary"):
        target.extend_request("h", [10**9])
    target.extend_request("h", [10], "", release=True)
    assert len(_drain(target)["h"][-1].token_ids) == 10


def test_a_long_seeded_request_resumed_anywhere_keeps_every_token(
    model_factory: Callable[..., Path],
) -> None:
    """1,200 sampled tokens, resumed (recomputed in a prefill) at several points: every
    continuation equals the unmoved run. With inverse-CDF sampling this model, prompt and seed
    lost token 266 at three of these four points (the prefill's logits differ in the last bits
    from the decode steps' and the draw fell that close to a CDF boundary)."""
    model = model_factory("llama", "tiny", "fp32", seed=11)
    engine = Engine(EngineConfig(model=str(model), dtype="fp32", max_model_len=2048))
    params = SamplingParams(max_tokens=1200, temperature=0.8, seed=5, ignore_eos=True)
    prompt = "people would make a sound"
    unmoved = _run(engine, {"u": prompt}, params)["u"].token_ids
    for cut in (30, 50, 60, 200):
        ids = unmoved[:cut]
        engine.resume_request(f"r{cut}", prompt, params, ids, engine.tokenizer.decode(ids))
        assert _drain(engine)[f"r{cut}"][-1].token_ids == unmoved, cut


def test_mapped_weights_and_loaded_weights_give_the_same_tokens(
    model: Path, engine: Engine
) -> None:
    prompts: dict[str, list[int] | str] = {"a": [5, 17, 33, 8], "b": "the water", "c": [9] * 30}
    seeded = SamplingParams(max_tokens=24, temperature=0.8, seed=5, ignore_eos=True)
    loaded = _new_engine(model, map_weights=False)
    parts = [str(engine.checkpoint / p.file) for p in read_index(engine.checkpoint).partitions]
    maps = Path("/proc/self/maps").read_text()
    assert all(p in maps for p in parts)  # the CPU engine's weights are the files' own pages
    for params in (GREEDY, seeded):
        got = {k: v.token_ids for k, v in _run(loaded, prompts, params).items()}
        assert got == {k: v.token_ids for k, v in _run(engine, prompts, params).items()}


def test_llm_generate_keeps_prompt_order_and_accepts_ids_and_text(model: Path) -> None:
    llm = LLM(str(model), dtype="fp32", max_model_len=128)
    params = SamplingParams(max_tokens=8, temperature=0, logprobs=2)
    outs = llm.generate(["the water", [5, 6, 7], "a"], params)
    assert [o.prompt_token_ids for o in outs][1] == [5, 6, 7]
    assert outs[0].prompt_token_ids == llm.tokenizer.encode("the water")
    assert all(len(o.token_ids) == 8 or o.finish_reason == "stop" for o in outs)
    for o in outs:
        assert o.logprobs is not None and len(o.logprobs) == len(o.token_ids)
        for tok, lp in zip(o.token_ids, o.logprobs, strict=True):
            assert tok in lp and lp[tok] == max(lp.values())  # greedy picks the top one
    single = llm.generate([5, 6, 7], params)
    assert single[0].token_ids == outs[1].token_ids


def test_chat_template_comes_from_the_folder(engine: Engine) -> None:
    text = engine.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|user|>\nhi</s>\n<|assistant|>\n"


def test_a_large_mixed_batch_gives_each_request_its_tokens_alone(engine: Engine) -> None:
    # More running requests than one decode attention group, contexts of very different lengths.
    prompts: dict[str, list[int] | str] = {
        str(i): [(7 * i + j) % 1000 + 4 for j in range(3 + 9 * i)] for i in range(12)
    }
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    together = _run(engine, prompts, params)
    for rid, prompt in prompts.items():
        alone = _run(engine, {rid: prompt}, params)[rid]
        assert alone.token_ids == together[rid].token_ids, rid


def test_requests_joining_mid_decode_get_their_tokens_alone(engine: Engine) -> None:
    """A newcomer is prefilled in the same step as the running requests' decodes, and every
    request still makes the tokens it makes alone."""
    prompts: dict[str, list[int] | str] = {
        str(i): [(5 * i + j) % 900 + 7 for j in range(4 + 11 * i)] for i in range(6)
    }
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    alone = {rid: _run(engine, {rid: p}, params)[rid].token_ids for rid, p in prompts.items()}
    final: dict[str, RequestOutput] = {}
    for k, (rid, prompt) in enumerate(prompts.items()):  # one newcomer per step
        engine.add_request(rid, prompt, params)
        outs = engine.step()
        assert [o.request_id for o in outs] == [rid, *list(prompts)[:k]]  # its prefill + decodes
        assert all(len(o.new_token_ids) == 1 for o in outs)
        final.update((o.request_id, o) for o in outs)
    final.update((rid, outs[-1]) for rid, outs in _drain(engine).items())
    assert {rid: o.token_ids for rid, o in final.items()} == alone
