"""Durable controller state: deployments in one SQLite file, so a restarted controller restores them.

Owns the file and its schema (`PRAGMA user_version` holds the schema version). Each row is one
deployment's spec as JSON; writes are single statements in autocommit mode, so a crash leaves
either the old or the new spec, never half of one. Instances are not stored: they are actors
that die with the controller's Ray job and are recreated by the reconcile loop.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from pathlib import Path

from ember.controller.types import DeploymentSpec
from ember.errors import ConfigError

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1


class DeploymentStore:
    """Deployments by name in SQLite; safe to call from any thread (one lock, one connection)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        with self._lock:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise ConfigError(
                    f"{self.path}: state schema version {version} is newer than this ember "
                    f"({SCHEMA_VERSION}); use a newer ember or another --state-db"
                )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS deployments ("
                " name TEXT PRIMARY KEY, spec TEXT NOT NULL, updated_at REAL NOT NULL)"
            )
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def save(self, spec: DeploymentSpec) -> None:
        """Insert or replace the deployment named `spec.name`."""
        with self._lock:
            self._db.execute(
                "INSERT INTO deployments (name, spec, updated_at) VALUES (?, ?, ?)"
                " ON CONFLICT(name) DO UPDATE SET spec=excluded.spec, updated_at=excluded.updated_at",
                (spec.name, json.dumps(spec.to_dict(), sort_keys=True), time.time()),
            )

    def delete(self, name: str) -> bool:
        """Remove a deployment; True if it existed."""
        with self._lock:
            cur = self._db.execute("DELETE FROM deployments WHERE name = ?", (name,))
            return cur.rowcount > 0

    def load_all(self) -> list[DeploymentSpec]:
        """Every stored deployment, by name; a row that no longer validates is skipped and logged."""
        with self._lock:
            rows = self._db.execute("SELECT name, spec FROM deployments ORDER BY name").fetchall()
        specs = []
        for name, text in rows:
            try:
                specs.append(DeploymentSpec.from_dict(json.loads(text)))
            except (ValueError, ConfigError) as e:
                logger.error("stored deployment %s is invalid and was skipped: %s", name, e)
        return specs

    def close(self) -> None:
        with self._lock:
            self._db.close()
