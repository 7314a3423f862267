"""The controller's SQLite store: deployments survive a reopen; bad rows and versions are caught."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from ember.controller.state import DeploymentStore
from ember.controller.types import DeploymentSpec
from ember.errors import ConfigError


def test_saved_deployments_are_restored_after_reopen(tmp_path: Path) -> None:
    db = tmp_path / "sub" / "ember.db"
    store = DeploymentStore(db)
    a = DeploymentSpec("a", "/m/a", max_instances=2)
    b = DeploymentSpec("b", "/m/b", keep_alive_s=3.0)
    store.save(b)
    store.save(a)
    store.close()
    assert DeploymentStore(db).load_all() == [a, b]


def test_save_replaces_and_delete_removes(tmp_path: Path) -> None:
    store = DeploymentStore(tmp_path / "e.db")
    store.save(DeploymentSpec("a", "/m/a"))
    store.save(DeploymentSpec("a", "/m/a2", max_instances=4))
    assert store.load_all() == [DeploymentSpec("a", "/m/a2", max_instances=4)]
    assert store.delete("a") is True
    assert store.delete("a") is False
    assert store.load_all() == []


def test_invalid_stored_row_is_skipped(tmp_path: Path) -> None:
    db = tmp_path / "e.db"
    store = DeploymentStore(db)
    store.save(DeploymentSpec("good", "/m/g"))
    store.close()
    con = sqlite3.connect(db)
    con.execute("INSERT INTO deployments VALUES ('bad', '{\"name\": \"bad\"}', 0)")
    con.commit()
    con.close()
    assert [s.name for s in DeploymentStore(db).load_all()] == ["good"]


def test_newer_schema_version_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "e.db"
    con = sqlite3.connect(db)
    con.execute("PRAGMA user_version=99")
    con.close()
    with pytest.raises(ConfigError, match="schema version 99"):
        DeploymentStore(db)
