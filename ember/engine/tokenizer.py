"""Tokenization with the `tokenizers` library (no transformers import: it costs seconds of cold
start), chat templates rendered with jinja2, and incremental detokenization for streaming.

`Tokenizer` reads a model folder's tokenizer.json, tokenizer_config.json (chat template,
special tokens) and config.json/generation_config.json (eos ids). A folder without a chat
template gets `DEFAULT_CHAT_TEMPLATE`: one "<role>: <content>" line per message, then
"assistant:" when a generation prompt is asked for.

`IncrementalDetokenizer` is vLLM's prefix/read-offset scheme: it decodes a short window of
tokens twice and emits only text that is complete (never a dangling U+FFFD from a split
multi-byte character), so the concatenation of the increments is the decoded text.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ember.errors import CheckpointNotFoundError, RequestError

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
)


def _special_content(value: Any) -> str | None:
    if isinstance(value, Mapping):
        content = value.get("content")
        return str(content) if content is not None else None
    return str(value) if value is not None else None


class Tokenizer:
    """Encode, decode and chat-format for one model folder."""

    def __init__(self, folder: str | Path) -> None:
        from tokenizers import Tokenizer as _HFTokenizer

        folder = Path(folder)
        path = folder / "tokenizer.json"
        text = _read_text(path)
        if text is None:
            raise CheckpointNotFoundError(path, "no tokenizer.json (the engine needs one)")
        self._tok = _HFTokenizer.from_str(text)
        cfg = _read_json(folder / "tokenizer_config.json")
        self.chat_template: str = _chat_template(cfg.get("chat_template")) or DEFAULT_CHAT_TEMPLATE
        self.bos_token = _special_content(cfg.get("bos_token"))
        self.eos_token = _special_content(cfg.get("eos_token"))
        eos_ids: list[int] = []
        for name in ("generation_config.json", "config.json"):
            eos = _read_json(folder / name).get("eos_token_id")
            if eos is not None:
                eos_ids = list(eos) if isinstance(eos, list) else [int(eos)]
                break
        if not eos_ids and self.eos_token is not None:
            tid = self._tok.token_to_id(self.eos_token)
            eos_ids = [tid] if tid is not None else []
        self.eos_token_ids: tuple[int, ...] = tuple(eos_ids)
        self.eos_token_id: int | None = eos_ids[0] if eos_ids else None
        if self.eos_token is None and self.eos_token_id is not None:
            self.eos_token = self._tok.id_to_token(self.eos_token_id)
        self._template: Any = None

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        """Render the chat template; the BOS token is left to `encode` when the tokenizer adds
        it (templates that write it themselves would otherwise double it)."""
        if not isinstance(messages, list) or not all(
            isinstance(m, Mapping) and "role" in m and "content" in m for m in messages
        ):
            raise RequestError("messages must be a list of {'role': ..., 'content': ...} dicts")
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_template_error
            self._template = env.from_string(self.chat_template)
        return str(
            self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        )


def _raise_template_error(message: str) -> None:
    raise RequestError(f"chat template: {message}")


def _chat_template(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # [{"name": "default", "template": ...}, ...]
        for item in value:
            if isinstance(item, Mapping) and item.get("name") == "default":
                return str(item.get("template"))
    return None


def _read_json(path: Path) -> dict[str, Any]:
    text = _read_text(path)
    if text is None:
        return {}
    data = json.loads(text)
    return data if isinstance(data, dict) else {}


def _read_text(path: Path, gap_s: float = 1.0) -> str | None:
    """The file's text, or None when its folder has no such file. A folder that is itself
    missing is waited for (up to `gap_s`): a DRAM-tier checkpoint still being fetched is renamed
    at its commit and a link is left in its place, and a read between the two found neither
    (`ember.store.shm.settled_path`). Seen under load: the tokenizer, read by path after the
    weights were mapped, failed with a bare "No such file or directory", and a missing
    tokenizer_config.json would silently have meant the default chat template."""
    deadline = time.monotonic() + gap_s
    while True:
        try:
            return path.read_text(encoding="utf-8")
        except (FileNotFoundError, NotADirectoryError):
            if path.parent.is_dir() or time.monotonic() > deadline:
                return None
            time.sleep(0.001)


class IncrementalDetokenizer:
    """Turns a growing token list into text increments (vLLM's offset scheme).

    `prefix_offset..read_offset` is text already emitted that gives the next tokens their
    context (leading spaces of SentencePiece pieces); only the text past it is new.
    """

    __slots__ = ("_tokenizer", "prefix_offset", "read_offset", "text")

    def __init__(self, tokenizer: Tokenizer, num_context_tokens: int, text: str = "") -> None:
        self._tokenizer = tokenizer
        self.read_offset = num_context_tokens
        self.prefix_offset = max(num_context_tokens - 5, 0)
        self.text = text

    def step(self, token_ids: Sequence[int], start: int = 0) -> str:
        """The new text after the sequence grew (empty while a character is incomplete).
        `token_ids` is the sequence from position `start` on, where `start` <= `prefix_offset`:
        the engine passes only that tail, not the whole context."""
        total = start + len(token_ids)
        if total <= self.read_offset:
            return ""
        decode = self._tokenizer.decode
        lo = self.prefix_offset - start
        prefix = decode(token_ids[lo : self.read_offset - start])
        full = decode(token_ids[lo:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        new = full[len(prefix) :]
        self.prefix_offset = self.read_offset
        self.read_offset = total
        self.text += new
        return new
