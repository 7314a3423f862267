"""/v1/completions and /v1/chat/completions as the `openai` client sees them (over an in-process
ASGI transport; tests/e2e does the same over real HTTP): bodies, SSE chunks, usage, logprobs,
stop strings, seeds and chat rendering, against the engine's own greedy tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from serving_support import serving

from ember import LLM, SamplingParams
from ember.controller.types import DeploymentSpec
from ember.engine.tokenizer import Tokenizer
from ember.store.factory import make_model

pytestmark = pytest.mark.anyio

PROMPT = "The number of people"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("model") / "tiny", "llama", "tiny", "fp32", seed=0)


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> dict[str, Any]:
    llm = LLM(str(model_dir))
    try:
        chat_prompt = Tokenizer(model_dir).apply_chat_template(MESSAGES)
        params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
        plain, chat = llm.generate([PROMPT, chat_prompt], params)
    finally:
        llm.close()
    return {"plain": plain, "chat": chat, "chat_prompt": chat_prompt}


@pytest.fixture
async def stack(tmp_path: Path, model_dir: Path) -> Any:
    spec = DeploymentSpec(name="tiny", source=str(model_dir), min_instances=1)
    async with serving(tmp_path, (spec,)) as s:
        await s.controller.wait_for_instance("tiny", 120)
        http = httpx.AsyncClient(transport=s.client._transport, base_url="http://ember.test/v1")
        s.openai = openai.AsyncOpenAI(
            base_url="http://ember.test/v1", api_key="unused", http_client=http, max_retries=0
        )
        yield s


async def test_completion_plain_and_streamed_match_the_engine(
    stack: Any, reference: dict[str, Any]
) -> None:
    ref = reference["plain"]
    kw: dict[str, Any] = {"model": "tiny", "prompt": PROMPT, "max_tokens": 10, "temperature": 0}
    kw["extra_body"] = {"ignore_eos": True}
    resp = await stack.openai.completions.create(**kw)
    assert resp.object == "text_completion"
    assert resp.choices[0].text == ref.text
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert resp.usage.completion_tokens == 10
    assert stack.app.state.router.journal.get(resp.id).token_ids == list(ref.token_ids)

    chunks = [c async for c in await stack.openai.completions.create(**kw, stream=True)]
    assert "".join(c.choices[0].text for c in chunks) == ref.text
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.usage is None for c in chunks)
    assert len({c.id for c in chunks}) == 1

    stream = await stack.openai.completions.create(
        **kw, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.total_tokens == 10 + len(ref.prompt_token_ids)

    metrics = (await stack.client.get("/metrics")).text
    assert 'ember_requests_total{endpoint="completions",model="tiny",status="200"} 3.0' in metrics
    assert 'ember_time_to_first_token_seconds_count{model="tiny"} 3.0' in metrics
    assert 'ember_generation_tokens_total{model="tiny"} 30.0' in metrics
    assert 'ember_instances{model="tiny",state="ready"} 1.0' in metrics
    assert 'ember_instance_load_seconds_count{model="tiny",tier="disk"} 1.0' in metrics


async def test_chat_renders_the_template_and_streams_role_then_content(
    stack: Any, reference: dict[str, Any]
) -> None:
    ref = reference["chat"]
    kw: dict[str, Any] = {"model": "tiny", "messages": MESSAGES, "max_tokens": 10, "temperature": 0}
    kw["extra_body"] = {"ignore_eos": True}
    resp = await stack.openai.chat.completions.create(**kw)
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == ref.text
    assert resp.usage.completion_tokens == 10
    entry = stack.app.state.router.journal.get(resp.id)
    assert entry.prompt == reference["chat_prompt"]

    stream = await stack.openai.chat.completions.create(
        **kw, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == "length" and set(finals[:-1]) == {None}
    assert chunks[-1].usage.prompt_tokens == resp.usage.prompt_tokens


async def test_stop_string_ends_the_text_before_it(stack: Any, reference: dict[str, Any]) -> None:
    text = reference["plain"].text
    stop = text[3:6]
    assert stop.strip() and stop not in text[:5]
    resp = await stack.openai.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=10, temperature=0, stop=[stop]
    )
    assert resp.choices[0].finish_reason == "stop"
    assert resp.choices[0].text == text[: text.index(stop)]


async def test_same_seed_same_sample(stack: Any) -> None:
    kw: dict[str, Any] = {"model": "tiny", "prompt": PROMPT, "max_tokens": 12, "temperature": 1.0}
    a = await stack.openai.completions.create(**kw, seed=7)
    b = await stack.openai.completions.create(**kw, seed=7)
    c = await stack.openai.completions.create(**kw, seed=8)
    assert a.choices[0].text == b.choices[0].text
    ids = stack.app.state.router.journal
    assert ids.get(a.id).token_ids == ids.get(b.id).token_ids != ids.get(c.id).token_ids


async def test_logprobs_have_one_entry_per_token(stack: Any) -> None:
    resp = await stack.openai.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2
    )
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    # Byte-level pieces of one character decode to U+FFFD alone, so tokens need not join to text.
    for chosen, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert value <= 0 and 1 <= len(top) <= 3
        if "\ufffd" not in "".join(top):  # distinct partial-byte tokens share the string U+FFFD
            assert top[chosen] == value == max(top.values())  # greedy: the most likely token
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]

    resp = await stack.openai.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    content = resp.choices[0].logprobs.content
    assert len(content) == 5
    for t in content:
        assert len(t.top_logprobs) == 3
        assert t.top_logprobs[0].logprob == t.logprob


async def test_token_prompt_outside_vocabulary_is_400(stack: Any) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await stack.openai.completions.create(model="tiny", prompt=[1, 10**6], max_tokens=2)
    assert info.value.body["param"] == "prompt"
    with pytest.raises(openai.NotFoundError):
        await stack.openai.completions.create(model="other", prompt="x", max_tokens=2)
