"""The jobs table (production records, read through a column mapping) and the link cache."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from mondrian.core.db.connection import DBError

if TYPE_CHECKING:
    import sqlite_utils

# Canonical job columns and what they hold.
JOB_COLUMNS = {
    "job_id": "the job's id in the production system",
    "advisor": "which advisor the job ran (e.g. photo-critic, fit-query)",
    "status": "completed / failed / pending / running ...",
    "image_path": "input image, relative to the data root",
    "image_sha256": "sha256 of the input image as recorded by production (optional)",
    "input_text": "input text (text advisors)",
    "analysis_path": "the analysis output file, relative to the data root (hash-named)",
    "analysis_json": "the analysis output inline, when not in a file",
    "model": "the model / adapter that produced the analysis",
    "created_at": "when the job was created (ISO 8601)",
    "completed_at": "when it completed (ISO 8601)",
}
REQUIRED_COLUMNS = ("job_id", "advisor", "status")


@dataclass
class JobColumns:
    """Actual column names in the jobs table, by canonical name. None: the table lacks it."""

    job_id: str | None = "job_id"
    advisor: str | None = "advisor"
    status: str | None = "status"
    image_path: str | None = "image_path"
    image_sha256: str | None = "image_sha256"
    input_text: str | None = "input_text"
    analysis_path: str | None = "analysis_path"
    analysis_json: str | None = "analysis_json"
    model: str | None = "model"
    created_at: str | None = "created_at"
    completed_at: str | None = "completed_at"


def create_jobs_table(db: sqlite_utils.Database, table: str = "jobs") -> None:
    """Our jobs schema. job_id is indexed, not unique: production tables do repeat ids,
    and linking must see (and reject) the repeats rather than have the insert fail."""
    if table in db.table_names():
        return
    db[table].create({"id": int, **{c: str for c in JOB_COLUMNS}}, pk="id")
    db[table].create_index(["job_id"])
    db[table].create_index(["advisor", "status"])


def read_jobs(db: sqlite_utils.Database, table: str = "jobs",
              columns: JobColumns | None = None) -> Iterator[dict]:
    """Yield every job as a dict keyed by canonical column names, in table order."""
    columns = columns or JobColumns()
    if table not in db.table_names():
        raise DBError(f"table '{table}' not found (tables: {', '.join(db.table_names()) or 'none'})")
    actual = set(db[table].columns_dict)
    mapping = {k: v for k, v in asdict(columns).items() if v is not None}
    missing = [f"{k} -> '{v}'" for k, v in mapping.items() if v not in actual]
    if missing:
        raise DBError(f"table '{table}' lacks mapped column(s) {', '.join(missing)} "
                      f"(columns: {', '.join(sorted(actual))}); fix the column mapping in the config")
    absent = [c for c in REQUIRED_COLUMNS if c not in mapping]
    if absent:
        raise DBError(f"the column mapping must name {', '.join(absent)}")
    select = ", ".join(f'"{v}" AS "{k}"' for k, v in mapping.items())
    # TEXT arrives as bytes and is decoded here: sqlite3's own decoding raises on the first
    # invalid UTF-8 value and would end the whole read. A value that is not UTF-8 stays bytes,
    # for the linker to reject as that one job's problem.
    saved, db.conn.text_factory = db.conn.text_factory, bytes
    try:
        cursor = db.execute(f'SELECT rowid AS _rowid, {select} FROM "{table}" ORDER BY rowid')
        names = [d[0] for d in cursor.description]
        for row in cursor:
            job = dict(zip(names, map(_text, row), strict=True))
            for key in JOB_COLUMNS:
                job.setdefault(key, None)
            yield job
    finally:
        db.conn.text_factory = saved


def _text(value):
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value
    return value


def count_jobs(db: sqlite_utils.Database, table: str = "jobs") -> int:
    return db.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]


# --- the link cache (mondrian.link.linker) ---

_LINK_CACHE_TABLES = (
    "CREATE TABLE IF NOT EXISTS images (path TEXT PRIMARY KEY, size INTEGER, "
    "mtime_ns INTEGER, sha256 TEXT, width INTEGER, height INTEGER, "
    "reason TEXT, detail TEXT, max_pixels INTEGER);\n"
    "CREATE TABLE IF NOT EXISTS verdicts (key BLOB PRIMARY KEY, detail TEXT);\n"
)


def create_link_cache_tables(conn: sqlite3.Connection) -> None:
    """Create the link cache's `images` (by real path) and `verdicts` (by analysis key) tables."""
    conn.executescript(_LINK_CACHE_TABLES)


