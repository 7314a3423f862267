"""The dependency rule of ARCHITECTURE.md, checked on the source: who may import ray and torch."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "ember"

# package folder -> modules it must never import
FORBIDDEN: dict[str, set[str]] = {
    "policy": {"ray", "torch"},
    "sim": {"ray", "torch"},
    "api": {"ray", "torch"},
    "controller": {"ray", "torch"},
    "migration": {"ray", "torch"},
    "cluster": {"torch"},
    "store": {"ray"},
    "engine": {"ray"},
    "cli": {"ray", "torch"},
}


def _imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_folder_does_not_import_forbidden_modules(folder: str) -> None:
    bad = []
    for path in sorted((PKG / folder).rglob("*.py")):
        hits = _imported_roots(path) & FORBIDDEN[folder]
        if hits:
            bad.append(f"{path.relative_to(PKG)} imports {sorted(hits)}")
    assert not bad, "; ".join(bad)


def test_only_cluster_imports_ray() -> None:
    bad = [
        str(p.relative_to(PKG))
        for p in PKG.rglob("*.py")
        if "ray" in _imported_roots(p) and p.relative_to(PKG).parts[0] != "cluster"
    ]
    assert not bad, bad
