"""The controller's durable state in SQLite: deployed functions and the nodes it has seen.

One file (`<home>/controller.db`), WAL mode, one connection used from the event loop's thread
(each call is a few small rows, far below a millisecond). A restarted controller reads every
function back; nodes come back as not alive until they heartbeat again. Documents are JSON and
node status is protobuf bytes: nothing here is pickled.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoscaler.keepalive import IdleHistogram
from controller.models import ModelInfo
from controller.spec import FunctionSpec, spec_from_dict

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1  # tables added with IF NOT EXISTS (idle_times) need no new version
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS functions (
    name TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    model TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS idle_times (
    name TEXT PRIMARY KEY,
    histogram TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS nodes (
    node_id TEXT PRIMARY KEY,
    address TEXT NOT NULL,
    status BLOB,
    last_seen REAL NOT NULL
);
"""


@dataclass(frozen=True)
class FunctionRecord:
    """A deployed function: its spec and what the controller learned about its model."""

    name: str
    spec: FunctionSpec
    model: ModelInfo
    created_at: float
    updated_at: float

    @property
    def memory_bytes(self) -> int:
        """What one instance reserves on a node (the spec's, else inferred)."""
        if self.spec.resources.memory_bytes is not None:
            return self.spec.resources.memory_bytes
        return self.model.instance_bytes(self.spec.engine.kv_cache_bytes)

    @property
    def context_length(self) -> int:
        return self.spec.engine.max_model_len or self.model.context_length


@dataclass(frozen=True)
class NodeRecord:
    node_id: str
    address: str
    status: bytes | None
    last_seen: float


class Registry:
    """CRUD over the SQLite file; methods are synchronous and fast."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) != SCHEMA_VERSION:
            raise RuntimeError(
                f"{path}: schema version {row[0]}, this controller reads {SCHEMA_VERSION}; "
                "use a controller of the same version or a new --home."
            )

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # ---- functions -----------------------------------------------------------------------

    def put_function(self, name: str, spec: FunctionSpec, model: ModelInfo) -> FunctionRecord:
        """Create or replace; keeps the original creation time."""
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT created_at FROM functions WHERE name=?", (name,)).fetchone()
            created = row[0] if row else now
            db.execute(
                "INSERT OR REPLACE INTO functions VALUES (?, ?, ?, ?, ?)",
                (name, json.dumps(spec.to_dict()), json.dumps(model.to_json()), created, now),
            )
        return FunctionRecord(name, spec, model, created, now)

    def get_function(self, name: str) -> FunctionRecord | None:
        row = self._db.execute("SELECT * FROM functions WHERE name=?", (name,)).fetchone()
        return _function(row) if row else None

    def functions(self) -> list[FunctionRecord]:
        rows = self._db.execute("SELECT * FROM functions ORDER BY name").fetchall()
        return [_function(row) for row in rows]

    def delete_function(self, name: str) -> bool:
        """Delete the function and its idle-time histogram."""
        with self._tx() as db:
            db.execute("DELETE FROM idle_times WHERE name=?", (name,))
            return db.execute("DELETE FROM functions WHERE name=?", (name,)).rowcount > 0

    # ---- idle times (adaptive keep-alive) ------------------------------------------------

    def put_idle_histogram(self, function: str, histogram: IdleHistogram) -> None:
        """Replace `function`'s histogram of idle times (sparse JSON, a few hundred bytes)."""
        self._db.execute(
            "INSERT OR REPLACE INTO idle_times VALUES (?, ?)",
            (function, json.dumps(histogram.to_json())),
        )

    def idle_histograms(self) -> dict[str, IdleHistogram]:
        """Every stored histogram by function. One that does not parse is skipped with a
        warning: the function learns its idle times afresh."""
        found: dict[str, IdleHistogram] = {}
        for name, text in self._db.execute("SELECT name, histogram FROM idle_times"):
            try:
                found[name] = IdleHistogram.from_json(json.loads(text))
            except ValueError as exc:  # json.JSONDecodeError is one
                log.warning("%s: ignoring its stored idle times (%s); learning afresh", name, exc)
        return found

    # ---- nodes ---------------------------------------------------------------------------

    def put_node(self, node_id: str, address: str, status: bytes | None, seen: float) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO nodes VALUES (?, ?, ?, ?)", (node_id, address, status, seen)
        )

    def nodes(self) -> list[NodeRecord]:
        rows = self._db.execute("SELECT * FROM nodes ORDER BY node_id").fetchall()
        return [NodeRecord(*row) for row in rows]

    def delete_node(self, node_id: str) -> None:
        """Forget a node for good (the autoscaler terminated it)."""
        with self._tx() as db:
            db.execute("DELETE FROM nodes WHERE node_id = ?", (node_id,))


def _function(row: tuple[Any, ...]) -> FunctionRecord:
    name, spec, model, created, updated = row
    return FunctionRecord(
        name,
        spec_from_dict(json.loads(spec)),
        ModelInfo.from_json(json.loads(model)),
        created,
        updated,
    )
