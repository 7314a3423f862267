"""The conversion cache: a changed model folder replaces its old conversion instead of adding
one, and `ember cache ls|prune` list and remove stale entries, unused ones and interrupted
conversions (whose process is gone), but never a conversion still running."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ember.cli.main import main
from ember.engine.checkpoint import SOURCE_FILE, cache_dirs, entries, prune, resolve

CONFIG = {"architectures": ["LlamaForCausalLM"], "num_attention_heads": 2}


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("EMBER_CACHE_DIR", str(root))
    return root


def hf_folder(path: Path, seed: int = 0) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(CONFIG))
    g = torch.Generator().manual_seed(seed)
    save_file(
        {"model.embed_tokens.weight": torch.randn(16, 8, generator=g)}, path / "m.safetensors"
    )
    return path


def listed(root: Path) -> list[tuple[str, str]]:
    return sorted((e.path.name, e.status) for d in cache_dirs(root) for e in entries(d))


def test_a_changed_folder_replaces_its_conversions_and_other_degrees_stay(
    tmp_path: Path, root: Path
) -> None:
    src = hf_folder(tmp_path / "model")
    first = resolve(src, 1, None)
    assert resolve(src, 1, None) == first  # a second start finds it
    tp2 = resolve(src, 2, None)
    record = json.loads((first / SOURCE_FILE).read_text())
    assert record == {"source": str(src.resolve()), "tp": 1, "dtype": None}
    hf_folder(src, seed=1)  # the user saves new weights into the folder
    os.utime(src / "m.safetensors", ns=(1, time.time_ns() + 10**9))
    second = resolve(src, 1, None)
    assert second != first and not first.exists()  # superseded, removed
    assert not tp2.exists()  # converted from the old files too: it could never be used again
    tp2_new = resolve(src, 2, None)
    assert listed(root) == sorted([(second.name, "current"), (tp2_new.name, "current")])


def test_prune_removes_stale_and_interrupted_keeps_current_running_and_recent(
    tmp_path: Path, root: Path
) -> None:
    keep = resolve(hf_folder(tmp_path / "keep"), 1, None)
    gone_src = hf_folder(tmp_path / "gone", seed=1)
    gone = resolve(gone_src, 1, None)
    legacy = resolve(hf_folder(tmp_path / "legacy", seed=2), 1, None)
    (legacy / SOURCE_FILE).unlink()  # converted before entries recorded their source
    for p in gone_src.iterdir():
        p.unlink()
    gone_src.rmdir()
    ckpts = root / "checkpoints"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    interrupted = ckpts / f".x-1.converting-{dead}-abcd"
    running = ckpts / f".y-1.converting-{os.getpid()}-abcd"
    for d in (interrupted, running):
        d.mkdir()
        (d / "rank0-part0000.bin").write_bytes(b"\0" * 4096)
    node = root / "nodes" / "host" / "checkpoints"  # `ember serve`'s per-machine cache
    node.mkdir(parents=True)
    os.rename(keep, node / keep.name)

    assert listed(root) == sorted([
        (keep.name, "current"), (gone.name, "stale"), (legacy.name, "unknown"),
        (interrupted.name, "partial"), (running.name, "partial"),
    ])  # fmt: skip
    dry = prune(root, dry_run=True)
    assert sorted(e.path.name for e in dry) == sorted([gone.name, interrupted.name])
    assert gone.exists() and interrupted.exists()
    prune(root)
    assert listed(root) == sorted([
        (keep.name, "current"), (legacy.name, "unknown"), (running.name, "partial")
    ])  # fmt: skip
    assert [e.path.name for e in prune(root, unused_days=1)] == []  # all used just now
    old = time.time() - 3 * 86400
    os.utime(legacy, (old, old))
    assert [e.path.name for e in prune(root, unused_days=2)] == [legacy.name]
    prune(root, everything=True)
    assert listed(root) == [(running.name, "partial")]  # a live conversion is never touched


def test_cli_lists_and_prunes(
    tmp_path: Path, root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    entry = resolve(hf_folder(tmp_path / "model"), 1, None)
    assert main(["cache", "--cache-dir", str(root), "ls", "--json"]) == 0
    [row] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["path"] == str(entry) and row["status"] == "current" and row["tp"] == 1
    assert row["bytes"] == sum(f.stat().st_size for f in entry.iterdir())
    assert main(["cache", "ls"]) == 0  # $EMBER_CACHE_DIR
    out = capsys.readouterr().out
    assert "current" in out and str(entry) in out and "1 entries" in out
    assert main(["cache", "prune", "--all", "--dry-run"]) == 0
    assert "would remove 1 entries" in capsys.readouterr().out and entry.exists()
    assert main(["cache", "prune", "--all"]) == 0
    assert not entry.exists()
    assert main(["cache", "prune", "--unused-days", "-1"]) == 1
    assert "--unused-days: must be >= 0" in capsys.readouterr().err
