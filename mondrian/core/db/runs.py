"""The runs store's tables: `runs` and `run_metrics` (mondrian.train.runs)."""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING

from mondrian.core.db.connection import as_connection

if TYPE_CHECKING:
    import sqlite_utils

_RUNS_TABLES = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    advisor TEXT,
    status TEXT NOT NULL,
    started_at TEXT NOT NULL,
    ended_at TEXT,
    config TEXT,
    dataset_fingerprint TEXT,
    base_model TEXT,
    base_model_fingerprint TEXT,
    adapter_path TEXT,
    parent_run_id TEXT,
    summary TEXT,
    error TEXT,
    pid INTEGER,
    host TEXT
);
CREATE TABLE IF NOT EXISTS run_metrics (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    step INTEGER NOT NULL,
    name TEXT NOT NULL,
    value REAL NOT NULL,
    time REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS run_metrics_run ON run_metrics(run_id, name, step);
"""


def create_runs_tables(conn: sqlite3.Connection | sqlite_utils.Database) -> None:
    """Create `runs` and `run_metrics` (idempotent)."""
    as_connection(conn).executescript(_RUNS_TABLES)


