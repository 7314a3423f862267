"""Tokenizer wrapper: chat templates (the folder's, or the documented default) and incremental
detokenization that never emits half a character."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ember.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from ember.errors import CheckpointNotFoundError, RequestError
from ember.store.factory_tokenizer import tokenizer_json


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tok")
    (path / "tokenizer.json").write_text(tokenizer_json(1024))
    (path / "config.json").write_text(json.dumps({"eos_token_id": 2}))
    return path


def test_default_chat_template_when_the_folder_has_none(folder: Path) -> None:
    tok = Tokenizer(folder)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(messages) == "system: be brief\nuser: hi\nassistant:"
    assert tok.apply_chat_template(messages, add_generation_prompt=False).endswith("user: hi\n")
    assert tok.eos_token_id == 2
    with pytest.raises(RequestError, match="messages"):
        tok.apply_chat_template([{"content": "no role"}])


def test_missing_tokenizer_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="tokenizer.json"):
        Tokenizer(tmp_path)


def test_a_folder_caught_between_its_rename_and_its_link_is_waited_for(
    folder: Path, tmp_path: Path
) -> None:
    """A DRAM-tier checkpoint's fetch commits by renaming its in-progress directory and leaving
    a link in its place: a reader in between finds no folder at all. The tokenizer waits for it
    instead of failing (or, for tokenizer_config.json, silently taking the defaults)."""
    import shutil
    import threading

    final = tmp_path / "key"
    shutil.copytree(folder, final)
    (final / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ 'T' }}"}))
    fetching = tmp_path / ".fetching" / "key"
    fetching.parent.mkdir()
    link = threading.Timer(0.05, lambda: fetching.symlink_to(final, target_is_directory=True))
    link.start()  # the link appears 50 ms after the read began
    try:
        tok = Tokenizer(fetching)
    finally:
        link.join()
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "T"
    assert tok.eos_token_id == 2


def test_increments_never_split_a_character_and_add_up_to_the_text(folder: Path) -> None:
    tok = Tokenizer(folder)
    prompt = tok.encode("the water")
    output = tok.encode("héllo wörld ✓ über 42", add_special_tokens=False)
    ids = list(prompt)
    detok = IncrementalDetokenizer(tok, len(prompt))
    pieces = []
    for t in output:
        ids.append(t)
        piece = detok.step(ids)
        assert "\ufffd" not in piece
        pieces.append(piece)
    assert "".join(pieces) == detok.text == tok.decode(output)
    assert any(p == "" for p in pieces)  # some characters span several byte tokens


def test_increments_from_the_context_tail_equal_those_from_the_whole_context(
    folder: Path,
) -> None:
    """The engine hands the detokenizer only the tokens from `prefix_offset` on (copying a long
    context for every request at every step cost O(context)): the same increments."""
    tok = Tokenizer(folder)
    prompt = tok.encode("a long prompt " * 40)
    output = tok.encode("héllo wörld ✓ über 42 ∑ naïve", add_special_tokens=False)
    whole = IncrementalDetokenizer(tok, len(prompt))
    tail = IncrementalDetokenizer(tok, len(prompt))
    ids = list(prompt)
    for t in output:
        ids.append(t)
        start = tail.prefix_offset
        assert tail.step(ids[start:], start) == whole.step(ids)
    assert tail.text == whole.text == tok.decode(output)
