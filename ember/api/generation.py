"""The two generation endpoints' work: request -> SamplingParams -> router -> OpenAI response.

`Generation.completion` and `Generation.chat` take a validated request, start it on the router
and wait for its first delta before answering, so every error that happens before generation
begins (unknown model, full queue, timeout, prompt too long) is a proper HTTP error. After that:
- `stream: false`: deltas are gathered into one response; if the client goes away meanwhile,
  the request is aborted on its instance.
- `stream: true`: Server-Sent Events in OpenAI's chunk format, ending with `data: [DONE]`; with
  `stream_options.include_usage` a last chunk with empty `choices` carries the usage, as
  OpenAI's server does. An error after the stream began is sent as one `{"error": ...}` event.
  Closing the stream (client gone) aborts the request.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from starlette.responses import StreamingResponse
from starlette.types import Send

from ember.api import prompts
from ember.api.config import ApiConfig
from ember.api.metrics import ApiMetrics
from ember.api.responses import error_status, sse_error_event
from ember.api.router import ControllerLike, Router
from ember.api.schemas import ChatCompletionRequest, CompletionRequest
from ember.controller.types import StreamDelta
from ember.errors import EmberError
from ember.policy.clock import Clock


class AbortingStreamingResponse(StreamingResponse):
    """A StreamingResponse that always closes its body iterator, so a client that disconnects
    mid-stream aborts the request at once instead of whenever the generator is collected."""

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


@dataclass(slots=True)
class _Outcome:
    """What one request produced, for the response body and the metrics."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[dict[int, float]] = field(default_factory=list)
    prompt_tokens: int = 0
    finish_reason: str | None = None
    first_token_s: float | None = None

    def add(self, delta: StreamDelta, now_s: float) -> None:
        if self.first_token_s is None and delta.new_token_ids:
            self.first_token_s = now_s
        self.token_ids.extend(delta.new_token_ids)
        self.text += delta.new_text
        if delta.logprobs:
            self.logprobs.extend(delta.logprobs)
        self.prompt_tokens = delta.prompt_tokens
        if delta.finished:
            self.finish_reason = delta.finish_reason

    def usage(self) -> dict[str, int]:
        n = len(self.token_ids)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": n,
            "total_tokens": self.prompt_tokens + n,
        }


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class Generation:
    """Runs /v1/completions and /v1/chat/completions requests; see the module docstring."""

    def __init__(
        self,
        controller: ControllerLike,
        router: Router,
        config: ApiConfig,
        metrics: ApiMetrics,
        clock: Clock,
    ) -> None:
        self._controller = controller
        self._router = router
        self._config = config
        self._metrics = metrics
        self._clock = clock
        self.tokenizers = prompts.TokenizerCache()

    # --- endpoints ----------------------------------------------------------------------------

    async def completion(self, body: CompletionRequest, request: Request) -> Response:
        t0 = self._clock.now()
        endpoint = "completions"
        try:
            spec = self._controller.get(body.model)
            prompt: str | list[int] = body.prompt  # type: ignore[assignment]  # one prompt
            tokenizer = None
            if isinstance(prompt, list):
                prompts.check_token_ids(self.tokenizers.vocab_size(spec.source), prompt)
            if body.logprobs is not None:
                tokenizer = self.tokenizers.get(spec.source)
            params = self._params(body, body.max_tokens, body.logprobs)
            request_id = f"cmpl-{uuid.uuid4().hex}"
            stream = self._router.generate(body.model, request_id, prompt, params)
            first = await anext(stream)
        except EmberError as e:
            self._observe_error(body.model, endpoint, e, t0)
            raise
        created = int(time.time())

        def choice(
            token_ids: list[int], text: str, lps: list[dict[int, float]], text_start: int,
            finish_reason: str | None,
        ) -> dict[str, Any]:  # fmt: skip
            logprobs = None
            if body.logprobs is not None and tokenizer is not None:
                logprobs = prompts.completion_logprobs(tokenizer, token_ids, lps, text_start)
            return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

        def body_of(choices: list[dict[str, Any]]) -> dict[str, Any]:
            return {
                "id": request_id,
                "object": "text_completion",
                "created": created,
                "model": body.model,
                "choices": choices,
            }

        def render_chunks(delta: StreamDelta, text_start: int) -> list[dict[str, Any]]:
            c = choice(
                list(delta.new_token_ids),
                delta.new_text,
                list(delta.logprobs or ()),
                text_start,
                delta.finish_reason if delta.finished else None,
            )
            return [body_of([c])]

        if body.stream:
            return self._stream(
                body.model, endpoint, stream, first, t0, render_chunks, body.include_usage,
                empty=lambda _: body_of([]),
            )  # fmt: skip
        out = await self._gather(body.model, endpoint, stream, first, t0, request)
        if out is None:
            return Response(status_code=499)
        resp = body_of([choice(out.token_ids, out.text, out.logprobs, 0, out.finish_reason)])
        resp["usage"] = out.usage()
        return JSONResponse(resp)

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        t0 = self._clock.now()
        endpoint = "chat.completions"
        try:
            spec = self._controller.get(body.model)
            tokenizer = self.tokenizers.get(spec.source)
            prompt = prompts.render_chat(tokenizer, body.rendered_messages())
            top_n = body.top_logprobs or 0
            max_tokens = body.max_completion_tokens or body.max_tokens
            params = self._params(body, max_tokens, top_n if body.logprobs else None)
            request_id = f"chatcmpl-{uuid.uuid4().hex}"
            stream = self._router.generate(body.model, request_id, prompt, params)
            first = await anext(stream)
        except EmberError as e:
            self._observe_error(body.model, endpoint, e, t0)
            raise
        created = int(time.time())

        def logprobs_of(ids: list[int], lps: list[dict[int, float]]) -> dict[str, Any] | None:
            if not body.logprobs:
                return None
            return {"content": prompts.chat_logprobs(tokenizer, ids, lps, top_n)}

        def chunk(choice: dict[str, Any]) -> dict[str, Any]:
            return {
                "id": request_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": body.model,
                "choices": [choice],
            }

        def render_chunks(delta: StreamDelta, _: int) -> list[dict[str, Any]]:
            out: list[dict[str, Any]] = []
            if delta.new_text or delta.new_token_ids:
                lps = logprobs_of(list(delta.new_token_ids), list(delta.logprobs or ()))
                out.append(
                    chunk(
                        {
                            "index": 0,
                            "delta": {"content": delta.new_text},
                            "logprobs": lps,
                            "finish_reason": None,
                        }
                    )
                )
            if delta.finished:  # OpenAI ends with an empty delta that carries finish_reason
                out.append(
                    chunk(
                        {
                            "index": 0,
                            "delta": {},
                            "logprobs": None,
                            "finish_reason": delta.finish_reason,
                        }
                    )
                )
            return out

        if body.stream:
            head = chunk(
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            )
            return self._stream(
                body.model, endpoint, stream, first, t0, render_chunks, body.include_usage,
                head=head, empty=chunk,
            )  # fmt: skip
        out = await self._gather(body.model, endpoint, stream, first, t0, request)
        if out is None:
            return Response(status_code=499)
        return JSONResponse(
            {
                "id": request_id,
                "object": "chat.completion",
                "created": created,
                "model": body.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": out.text},
                        "logprobs": logprobs_of(out.token_ids, out.logprobs),
                        "finish_reason": out.finish_reason,
                    }
                ],
                "usage": out.usage(),
            }
        )

    # --- shared machinery ----------------------------------------------------------------------

    def _params(self, body: Any, max_tokens: int | None, logprobs: int | None) -> Any:
        from ember import SamplingParams

        default = (
            self._config.completion_default_max_tokens
            if isinstance(body, CompletionRequest)
            else self._config.chat_default_max_tokens
        )
        return SamplingParams(
            max_tokens=max_tokens or default,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=-1 if body.top_k is None else body.top_k,
            min_p=0.0 if body.min_p is None else body.min_p,
            seed=body.seed,
            stop=tuple(body.stop_list()),
            stop_token_ids=tuple(body.stop_token_ids or ()),
            ignore_eos=body.ignore_eos,
            logprobs=logprobs,
        )

    async def _gather(
        self,
        model: str,
        endpoint: str,
        stream: AsyncIterator[StreamDelta],
        first: StreamDelta,
        t0: float,
        request: Request,
    ) -> _Outcome | None:
        """All deltas of a non-streamed request; None if the client left (request aborted)."""
        out = _Outcome()

        async def collect() -> None:
            delta = first
            out.add(delta, self._clock.now())
            while not delta.finished:
                delta = await anext(stream)
                out.add(delta, self._clock.now())

        work = asyncio.ensure_future(collect())
        gone = asyncio.ensure_future(_client_gone(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
            await _aclose(stream)
        if work.cancelled():
            self._metrics.observe_request(model, endpoint, 499, duration_s=self._clock.now() - t0)
            return None
        try:
            work.result()
        except EmberError as e:
            self._observe_error(model, endpoint, e, t0)
            raise
        self._observe_ok(model, endpoint, out, t0)
        return out

    def _stream(
        self,
        model: str,
        endpoint: str,
        stream: AsyncIterator[StreamDelta],
        first: StreamDelta,
        t0: float,
        render: Callable[[StreamDelta, int], list[dict[str, Any]]],
        include_usage: bool,
        empty: Callable[[dict[str, Any]], dict[str, Any]],
        head: dict[str, Any] | None = None,
    ) -> Response:
        out = _Outcome()

        async def events() -> AsyncIterator[str]:
            status = 499
            try:
                if head is not None:
                    yield _sse(head)
                delta = first
                while True:
                    text_start = len(out.text)
                    out.add(delta, self._clock.now())
                    for chunk in render(delta, text_start):
                        yield _sse(chunk)
                    if delta.finished:
                        break
                    delta = await anext(stream)
                if include_usage:
                    usage_chunk = empty({})
                    usage_chunk["choices"] = []
                    usage_chunk["usage"] = out.usage()
                    yield _sse(usage_chunk)
                yield "data: [DONE]\n\n"
                status = 200
            except EmberError as e:
                status = error_status(e).status
                yield sse_error_event(e)
                yield "data: [DONE]\n\n"
            finally:
                await _aclose(stream)
                if status == 200:
                    self._observe_ok(model, endpoint, out, t0)
                else:
                    self._metrics.observe_request(
                        model, endpoint, status, duration_s=self._clock.now() - t0
                    )

        return AbortingStreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    def _observe_ok(self, model: str, endpoint: str, out: _Outcome, t0: float) -> None:
        now = self._clock.now()
        self._metrics.observe_request(
            model,
            endpoint,
            200,
            duration_s=now - t0,
            ttft_s=None if out.first_token_s is None else out.first_token_s - t0,
            prompt_tokens=out.prompt_tokens,
            completion_tokens=len(out.token_ids),
        )

    def _observe_error(self, model: str, endpoint: str, exc: BaseException, t0: float) -> None:
        status = error_status(exc).status
        self._metrics.observe_request(model, endpoint, status, duration_s=self._clock.now() - t0)


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body was read already, so receive() waits)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _aclose(stream: AsyncIterator[StreamDelta]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()
