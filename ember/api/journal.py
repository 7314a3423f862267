"""The request journal: every routed request's prompt, parameters and generated token ids.

The router appends each delta's tokens as they pass through, so at any moment the journal holds
exactly what the client has been sent. That is what resuming a request elsewhere needs (prompt +
generated ids and text + sampling parameters): the router sends it to another instance as a
`Continuation` when the request's instance is lost (router.py).

Owns: active entries (unbounded: bounded in practice by the router's queues) and the most recent
finished entries (at most `max_finished`, oldest dropped first). In-memory only.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from ember.controller.types import StreamDelta


@dataclass(slots=True)
class JournalEntry:
    """One request's record; the router is its only writer."""

    request_id: str
    model: str
    prompt: str | list[int]
    params: Any  # ember.SamplingParams (kept untyped so the api never imports the engine eagerly)
    created_s: float
    instance_id: str | None = None
    prompt_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None


class RequestJournal:
    """Request id -> JournalEntry, for active and recently finished requests."""

    def __init__(self, max_finished: int = 10_000) -> None:
        self._max_finished = max_finished
        self._active: dict[str, JournalEntry] = {}
        self._finished: OrderedDict[str, JournalEntry] = OrderedDict()

    def open(
        self, request_id: str, model: str, prompt: str | list[int], params: Any, now_s: float
    ) -> JournalEntry:
        entry = JournalEntry(request_id, model, prompt, params, now_s)
        self._active[request_id] = entry
        return entry

    def record(self, entry: JournalEntry, delta: StreamDelta) -> None:
        entry.token_ids.extend(delta.new_token_ids)
        entry.text += delta.new_text
        entry.prompt_tokens = delta.prompt_tokens
        if delta.finished:
            entry.finish_reason = delta.finish_reason

    def close(self, entry: JournalEntry, finish_reason: str | None) -> None:
        """Move an entry to the finished set (`finish_reason` "abort" when it did not end)."""
        entry.finished = True
        entry.finish_reason = entry.finish_reason or finish_reason
        self._active.pop(entry.request_id, None)
        if self._max_finished == 0:
            return
        self._finished[entry.request_id] = entry
        while len(self._finished) > self._max_finished:
            self._finished.popitem(last=False)

    def get(self, request_id: str) -> JournalEntry | None:
        return self._active.get(request_id) or self._finished.get(request_id)

    def active(self) -> list[JournalEntry]:
        return list(self._active.values())

    def __len__(self) -> int:
        return len(self._active) + len(self._finished)
