"""Prompts in the API process: chat rendering, token-id checks and token strings for logprobs.

The engine applies no chat template, so the API renders `messages` to one prompt string with the
tokenizer's own chat template (tokenizer_config.json's `chat_template`), or, for a model without
one, `ember.engine.tokenizer.DEFAULT_CHAT_TEMPLATE` ("role: content" lines, then "assistant:").
Tokenizers are the engine's `Tokenizer` class (the `tokenizers` library, never transformers),
read from the deployment's source folder (HF folders and ember checkpoints both carry the
tokenizer files) and cached per source.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ember.engine.tokenizer import Tokenizer
from ember.errors import InvalidRequestError


class TokenizerCache:
    """One `Tokenizer` (and the model's vocabulary size) per deployment source, loaded once."""

    def __init__(self) -> None:
        self._by_source: dict[str, Tokenizer] = {}
        self._vocab: dict[str, int] = {}
        self._lock = threading.Lock()

    def vocab_size(self, source: str) -> int:
        """The model's vocabulary (config.json `vocab_size`; often padded past the tokenizer's)."""
        size = self._vocab.get(source)
        if size is None:
            cfg = Path(_local(source)) / "config.json"
            try:
                size = int(json.loads(cfg.read_text())["vocab_size"])
            except (OSError, ValueError, KeyError, TypeError):
                size = self.get(source).vocab_size
            self._vocab[source] = size
        return size

    def get(self, source: str) -> Tokenizer:
        tok = self._by_source.get(source)
        if tok is None:
            with self._lock:
                tok = self._by_source.get(source)
                if tok is None:
                    tok = Tokenizer(_local(source))
                    self._by_source[source] = tok
        return tok

    def forget(self, source: str) -> None:
        self._by_source.pop(source, None)
        self._vocab.pop(source, None)


def _local(source: str) -> str:
    """An s3:// model's tokenizer and config files, downloaded once (node stores fetch weights)."""
    if not source.startswith("s3://"):
        return source
    from ember.store.remote import side_files_dir

    return side_files_dir(source)


def render_chat(tokenizer: Tokenizer, messages: list[dict[str, str]]) -> str:
    """The prompt string for a chat request, ending with the assistant's generation prompt."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def check_token_ids(vocab: int, ids: Sequence[int]) -> None:
    """Refuse prompt token ids outside the model's vocabulary (400, param "prompt")."""
    bad = [i for i in ids if i >= vocab]
    if bad:
        raise InvalidRequestError(
            f"prompt: token id {bad[0]} is outside the vocabulary (size {vocab})", "prompt"
        )


def token_string(tokenizer: Tokenizer, token_id: int) -> str:
    """A token as text for logprobs (byte-level pieces may decode to U+FFFD alone)."""
    return tokenizer.decode([token_id], skip_special_tokens=False)


def completion_logprobs(
    tokenizer: Tokenizer,
    token_ids: Sequence[int],
    logprobs: Sequence[dict[int, float]],
    text_start: int,
) -> dict[str, Any]:
    """The legacy completions `logprobs` object for some tokens (text offsets from text_start)."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top: list[dict[str, float] | None] = []
    offsets: list[int] = []
    offset = text_start
    for tid, lp in zip(token_ids, logprobs, strict=False):
        s = token_string(tokenizer, tid)
        tokens.append(s)
        token_logprobs.append(lp.get(tid))
        top.append({token_string(tokenizer, i): v for i, v in lp.items()})
        offsets.append(offset)
        offset += len(s)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top,
        "text_offset": offsets,
    }


def chat_logprobs(
    tokenizer: Tokenizer,
    token_ids: Sequence[int],
    logprobs: Sequence[dict[int, float]],
    top_n: int,
) -> list[dict[str, Any]]:
    """The chat `logprobs.content` list: each chosen token with its `top_n` alternatives."""
    content = []
    for tid, lp in zip(token_ids, logprobs, strict=False):
        s = token_string(tokenizer, tid)
        ranked = sorted(lp.items(), key=lambda kv: -kv[1])[:top_n]
        content.append(
            {
                "token": s,
                "logprob": lp.get(tid, float("-inf")),
                "bytes": list(s.encode()),
                "top_logprobs": [
                    {
                        "token": (t := token_string(tokenizer, i)),
                        "logprob": v,
                        "bytes": list(t.encode()),
                    }
                    for i, v in ranked
                ],
            }
        )
    return content
