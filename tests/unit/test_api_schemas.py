"""Request validation of the OpenAI-compatible bodies, and how a validation error names its param."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from ember.api.responses import error_status, validation_error_param
from ember.api.schemas import ChatCompletionRequest, CompletionRequest
from ember.errors import (
    AuthenticationError,
    ConfigError,
    DeploymentError,
    InstanceLostError,
    InvalidRequestError,
    ModelNotFoundError,
    QueueFullError,
    RequestError,
    RequestTimeoutError,
)


def _param_of(model: type, body: dict[str, Any]) -> str | None:
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    return validation_error_param(info.value.errors()[0])


def test_completion_accepts_string_and_token_prompts() -> None:
    assert CompletionRequest(model="m", prompt="hi").prompt == "hi"
    assert CompletionRequest(model="m", prompt=[5, 6, 7]).prompt == [5, 6, 7]
    # A batch of one prompt is that prompt.
    assert CompletionRequest(model="m", prompt=["hi"]).prompt == "hi"
    assert CompletionRequest(model="m", prompt=[[1, 2]]).prompt == [1, 2]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x"}, "model"),
        ({"model": "m"}, "prompt"),
        ({"model": "m", "prompt": ""}, "prompt"),
        ({"model": "m", "prompt": ["a", "b"]}, "prompt"),
        ({"model": "m", "prompt": [1, -2]}, "prompt"),
        ({"model": "m", "prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"model": "m", "prompt": "x", "max_tokens": "many"}, "max_tokens"),
        ({"model": "m", "prompt": "x", "temperature": -0.1}, "temperature"),
        ({"model": "m", "prompt": "x", "temperature": 2.5}, "temperature"),
        ({"model": "m", "prompt": "x", "top_p": 0}, "top_p"),
        ({"model": "m", "prompt": "x", "top_p": 1.5}, "top_p"),
        ({"model": "m", "prompt": "x", "n": 2}, "n"),
        ({"model": "m", "prompt": "x", "logprobs": 21}, "logprobs"),
        ({"model": "m", "prompt": "x", "logprobs": -1}, "logprobs"),
        ({"model": "m", "prompt": "x", "seed": -1}, "seed"),
        ({"model": "m", "prompt": "x", "stop": ""}, "stop"),
        ({"model": "m", "prompt": "x", "stop": ["a"] * 17}, "stop"),
        (
            {"model": "m", "prompt": "x", "stream_options": {"include_usage": True}},
            "stream_options",
        ),
        ({"model": "m", "prompt": "x", "echo": True}, "echo"),
        ({"model": "m", "prompt": "x", "best_of": 3}, "best_of"),
        ({"model": "m", "prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
        ({"model": "m", "prompt": "x", "logit_bias": {"5": 1.0}}, "logit_bias"),
        ({"model": "m", "prompt": "x", "top_k": 0}, "top_k"),
    ],
)
def test_bad_completion_parameter_is_named(body: dict[str, Any], param: str) -> None:
    assert _param_of(CompletionRequest, body) == param


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"model": "m", "messages": [{"content": "x"}]}, "messages[0].role"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 3}, "n"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, "max_completion_tokens"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    ],
)  # fmt: skip
def test_bad_chat_parameter_is_named(body: dict[str, Any], param: str) -> None:
    assert _param_of(ChatCompletionRequest, body) == param


def test_chat_content_parts_are_joined_and_unknown_fields_ignored() -> None:
    req = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            ],
            "logprobs": True,
            "top_logprobs": 3,
            "some_future_field": 1,
        }
    )  # fmt: skip
    assert req.rendered_messages() == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "ab"},
    ]
    assert req.top_logprobs == 3


def test_stop_list_and_usage_flag() -> None:
    req = CompletionRequest(model="m", prompt="x", stop="\n", stream=True)
    assert req.stop_list() == ["\n"]
    assert req.include_usage is False
    req = CompletionRequest.model_validate(
        {"model": "m", "prompt": "x", "stream": True, "stream_options": {"include_usage": True}}
    )
    assert req.include_usage is True


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (InvalidRequestError("x: bad", "x"), 400, "invalid_value"),
        (ConfigError("bad"), 400, "invalid_value"),
        (RequestError("prompt too long"), 400, "invalid_value"),
        (AuthenticationError("no key"), 401, "invalid_api_key"),
        (ModelNotFoundError("nope"), 404, "model_not_found"),
        (QueueFullError("full"), 429, "queue_full"),
        (RequestTimeoutError("slow"), 504, "timeout"),
        (DeploymentError("failed to start"), 503, "deployment_unavailable"),
        (InstanceLostError("gone"), 503, "deployment_unavailable"),
        (RuntimeError("bug"), 500, "internal_error"),
    ],
)
def test_error_status_table(exc: BaseException, status: int, code: str) -> None:
    info = error_status(exc)
    assert (info.status, info.code) == (status, code)
    assert error_status(InvalidRequestError("x: bad", "x")).param == "x"
