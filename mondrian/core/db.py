"""THE SQLite module: how mondrian opens a database, and every table and view it creates.

- `connect` / `open_db`: one set of settings for every connection (WAL and a busy timeout
  on writable ones, `mode=ro` for readers, DBError naming the file when it cannot be used).
- `jobs`: the advisor's production records. An existing database whose column names
  differ is read through a mapping (canonical name -> actual column), so linking never
  depends on one naming scheme.
- `runs`, `run_metrics`: training / evaluation runs (mondrian.train.runs).
- `requests`, `routing_configs` and the ab_* views: the served-requests log
  (mondrian.serve.requests_log), read by the A/B report and by analysts.
- `images`, `verdicts`: the link cache (mondrian.link.linker).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

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


class DBError(ValueError):
    """The database cannot be used as asked; the message names the file, table or column."""


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


def connect(path: str | Path, *, create: bool = False, read_only: bool = False,
            timeout: float = 30.0, autocommit: bool = False,
            check_same_thread: bool = True) -> sqlite3.Connection:
    """A connection to the database at `path`, with the one set of settings mondrian uses.

    Writable connections run in WAL mode (readers never block the writer) and wait up to
    `timeout` seconds for a lock. `autocommit` (isolation_level None: the caller issues
    BEGIN / COMMIT itself, like the request log's group commit) adds synchronous=NORMAL:
    a committed row survives kill -9 of the process, not necessarily a power cut.
    `read_only` opens with `mode=ro` and never creates the file. A missing file is a
    DBError unless `create`; so is a file SQLite cannot use, naming the file."""
    path = Path(path)
    if create and read_only:
        raise ValueError("connect: a read-only connection cannot create the database")
    if not create and not path.is_file():
        raise DBError(f"{path}: no such database file")
    isolation = None if autocommit else ""
    conn = None
    try:
        if read_only:
            conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=timeout,
                                   isolation_level=isolation, check_same_thread=check_same_thread)
            # A file that is not a database opens fine; reading the schema is what fails.
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        else:
            conn = sqlite3.connect(str(path), timeout=timeout, isolation_level=isolation,
                                   check_same_thread=check_same_thread)
            conn.execute("PRAGMA journal_mode=WAL")
            if autocommit:
                conn.execute("PRAGMA synchronous=NORMAL")
    except sqlite3.DatabaseError as exc:
        if conn is not None:
            conn.close()
        raise DBError(f"{path}: not a usable SQLite database ({exc})") from exc
    return conn


def open_db(path: str | Path, create: bool = False) -> sqlite_utils.Database:
    """Open (or create) the database in WAL mode; a missing file is an error unless create."""
    import sqlite_utils  # noqa: PLC0415 - heavy: imports pandas when installed (~1 s); `mondrian --help` stays fast

    return sqlite_utils.Database(connect(path, create=create, check_same_thread=False))


def as_connection(conn_or_db: sqlite3.Connection | sqlite_utils.Database) -> sqlite3.Connection:
    """The sqlite3 connection under a sqlite_utils.Database, or the connection itself."""
    if isinstance(conn_or_db, sqlite3.Connection):
        return conn_or_db
    if isinstance(getattr(conn_or_db, "conn", None), sqlite3.Connection):  # a sqlite_utils.Database
        return conn_or_db.conn
    raise TypeError(f"expected a sqlite3.Connection or sqlite_utils.Database, "
                    f"got {type(conn_or_db).__name__}")


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


# --- runs (mondrian.train.runs) ---

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


# --- the served-requests log (mondrian.serve.requests_log) ---

# name -> (SQL type, NOT NULL, what it holds). The order is the table's column order.
REQUEST_COLUMNS: dict[str, tuple[str, bool, str]] = {
    "request_id": ("TEXT", True, "the request's id (primary key)"),
    "received_at": ("TEXT", True, "ISO 8601 UTC with milliseconds, e.g. 2026-11-22T09:30:01.123Z"),
    "advisor": ("TEXT", True, "the advisor asked"),
    "endpoint": ("TEXT", True, "'analyze' or 'chat'"),
    "arm": ("TEXT", True, "routing arm name; 'pinned' when the client named advisor@version"),
    "assigned_version": ("TEXT", False, "the arm's adapter version (e.g. 'v3'); NULL = base model"),
    "served_version": ("TEXT", False, "the version whose answer was returned; NULL = base"),
    "base_model": ("TEXT", False, "the base model's name"),
    "base_fingerprint": ("TEXT", True, "the base model's fingerprint"),
    "routing_id": ("TEXT", False, "id of the routing config in force (routing_configs)"),
    "sticky_key": ("TEXT", False, "sha256 of the user id, or the image sha256, used for assignment"),
    "shadow_of": ("TEXT", False, "shadow rows: the request_id they shadow; NULL for served rows"),
    "status": ("INTEGER", True, "HTTP status returned (shadow rows: 200 or 500 of the shadow run)"),
    "contract_ok": ("INTEGER", False, "1/0: the arm's own answer met the JSON contract; NULL on error"),
    "fallback": ("TEXT", False, "NULL, or 'production' / 'base': what answered instead of the arm"),
    "fallback_reason": ("TEXT", False, "why the fallback answered"),
    "error": ("TEXT", False, "error text"),
    "latency_ms": ("REAL", False, "received -> answer ready, ms"),
    "queue_ms": ("REAL", False, "time waiting for the model worker, ms"),
    "prompt_tokens": ("INTEGER", False, "prompt tokens"),
    "completion_tokens": ("INTEGER", False, "completion tokens"),
    "constrained": ("INTEGER", False, "1/0: decoded under the advisor's JSON-Schema grammar"),
    "examples": ("TEXT", False, "JSON list of the job ids of the retrieved examples the answering "
                                "version's prompt showed; NULL = no retrieval"),
}
# The arm of requests whose client named advisor@version: outside the routed split.
PINNED_ARM = "pinned"

_REQUEST_TABLES = (
    "CREATE TABLE IF NOT EXISTS requests (\n    "
    + ",\n    ".join(f"{name} {sqltype}{' NOT NULL' if notnull else ''}"
                     + (" PRIMARY KEY" if name == "request_id" else "")
                     for name, (sqltype, notnull, _) in REQUEST_COLUMNS.items())
    + "\n);\n"
    """
CREATE TABLE IF NOT EXISTS routing_configs (
    routing_id TEXT NOT NULL PRIMARY KEY,
    advisor TEXT NOT NULL,
    created_at TEXT NOT NULL,
    config_json TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS requests_advisor_arm ON requests(advisor, arm);
CREATE INDEX IF NOT EXISTS requests_received_at ON requests(received_at);
CREATE INDEX IF NOT EXISTS requests_served_version ON requests(served_version);
CREATE INDEX IF NOT EXISTS requests_shadow_of ON requests(shadow_of);
""")

# What counts as an error row, in the views and in the A/B report.
REQUEST_ERROR_SQL = "(error IS NOT NULL OR status >= 500)"

# Views: no data of their own, so they are (re)created whenever their SQL differs from
# what is stored (an older mondrian's view is replaced, an identical one left alone).
REQUEST_VIEWS: dict[str, str] = {
    # Served rows (not shadow), per advisor and arm.
    "ab_arms": f"""
SELECT advisor, arm,
       count(*) AS requests,
       sum(contract_ok = 1) AS compliant,
       1.0 * sum(contract_ok = 1) / nullif(count(contract_ok), 0) AS compliance_rate,
       count(fallback) AS fallbacks,
       1.0 * count(fallback) / count(*) AS fallback_rate,
       sum({REQUEST_ERROR_SQL}) AS errors,
       1.0 * sum({REQUEST_ERROR_SQL}) / count(*) AS error_rate,
       avg(latency_ms) AS avg_latency_ms,
       avg(completion_tokens) AS avg_completion_tokens,
       min(received_at) AS first_at,
       max(received_at) AS last_at
FROM requests
WHERE shadow_of IS NULL
GROUP BY advisor, arm""",
    # Served rows that returned an answer (status < 400), by the version that answered.
    # compliance_rate counts only rows the arm answered itself (no fallback): there
    # contract_ok describes served_version; fallback rows are counted in `fallbacks`.
    "ab_versions": """
SELECT advisor,
       coalesce(served_version, 'base') AS served_version,
       count(*) AS requests,
       1.0 * sum(CASE WHEN fallback IS NULL THEN contract_ok = 1 END)
           / nullif(count(CASE WHEN fallback IS NULL THEN contract_ok END), 0) AS compliance_rate,
       count(fallback) AS fallbacks,
       avg(latency_ms) AS avg_latency_ms
FROM requests
WHERE shadow_of IS NULL AND status < 400
GROUP BY advisor, coalesce(served_version, 'base')""",
    # Shadow runs, by the version shadowed in.
    "ab_shadow": f"""
SELECT advisor,
       coalesce(assigned_version, 'base') AS assigned_version,
       count(*) AS requests,
       1.0 * sum(contract_ok = 1) / nullif(count(contract_ok), 0) AS compliance_rate,
       1.0 * sum({REQUEST_ERROR_SQL}) / count(*) AS error_rate,
       avg(latency_ms) AS avg_latency_ms
FROM requests
WHERE shadow_of IS NOT NULL
GROUP BY advisor, coalesce(assigned_version, 'base')""",
    # Each shadow run next to the served request it shadowed: the paired comparison.
    "ab_shadow_pairs": """
SELECT s.advisor,
       coalesce(s.assigned_version, 'base') AS shadow_version,
       count(*) AS pairs,
       sum(p.contract_ok = 1 AND s.contract_ok = 1) AS both_ok,
       sum(p.contract_ok = 1 AND s.contract_ok = 0) AS served_only_ok,
       sum(p.contract_ok = 0 AND s.contract_ok = 1) AS shadow_only_ok,
       sum(p.contract_ok = 0 AND s.contract_ok = 0) AS neither_ok,
       1.0 * sum(p.contract_ok = 1) / count(*) AS served_compliance_rate,
       1.0 * sum(s.contract_ok = 1) / count(*) AS shadow_compliance_rate,
       avg(s.latency_ms - p.latency_ms) AS avg_latency_delta_ms
FROM requests s JOIN requests p ON p.request_id = s.shadow_of
WHERE s.contract_ok IS NOT NULL AND p.contract_ok IS NOT NULL
GROUP BY s.advisor, coalesce(s.assigned_version, 'base')""",
    # Served rows per UTC hour and arm: for time plots and "did it break at 14:00".
    "ab_hourly": f"""
SELECT advisor,
       substr(received_at, 1, 13) || ':00Z' AS hour,
       arm,
       count(*) AS requests,
       1.0 * sum(contract_ok = 1) / nullif(count(contract_ok), 0) AS compliance_rate,
       1.0 * sum({REQUEST_ERROR_SQL}) / count(*) AS error_rate,
       avg(latency_ms) AS avg_latency_ms
FROM requests
WHERE shadow_of IS NULL
GROUP BY advisor, substr(received_at, 1, 13), arm""",
    # Per routing config and arm: the configured share next to the observed share of
    # served requests (pinned requests excluded). The p-value is in `mondrian ab report`.
    "ab_split": """
SELECT w.routing_id, w.advisor, w.arm, w.version, w.weight,
       1.0 * w.weight / t.total_weight AS expected_share,
       coalesce(o.requests, 0) AS requests,
       1.0 * coalesce(o.requests, 0) / nullif(n.requests, 0) AS observed_share
FROM (SELECT rc.routing_id, rc.advisor,
             json_extract(a.value, '$.name') AS arm,
             json_extract(a.value, '$.version') AS version,
             json_extract(a.value, '$.weight') AS weight
      FROM routing_configs rc, json_each(rc.config_json, '$.arms') a) w
JOIN (SELECT routing_id, sum(json_extract(a.value, '$.weight')) AS total_weight
      FROM routing_configs, json_each(config_json, '$.arms') a GROUP BY routing_id) t
  ON t.routing_id = w.routing_id
LEFT JOIN (SELECT routing_id, arm, count(*) AS requests FROM requests
           WHERE shadow_of IS NULL AND arm <> 'pinned' GROUP BY routing_id, arm) o
  ON o.routing_id = w.routing_id AND o.arm = w.arm
LEFT JOIN (SELECT routing_id, count(*) AS requests FROM requests
           WHERE shadow_of IS NULL AND arm <> 'pinned' GROUP BY routing_id) n
  ON n.routing_id = w.routing_id""",
}


def _norm_sql(sql: str | None) -> str:
    return " ".join((sql or "").split())


def _add_missing_columns(conn: sqlite3.Connection, table: str,
                         columns: dict[str, tuple[str, bool, str]]) -> None:
    """Columns added by a newer mondrian, added to an older file (nullable: old rows hold
    NULL, meaning "not recorded"); nothing else about a table ever changes in place."""
    have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
    for name, (sqltype, _, _) in columns.items():
        if name not in have:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {sqltype}")


def create_request_tables(
        conn_or_path: sqlite3.Connection | sqlite_utils.Database | str | Path) -> None:
    """Create `requests`, `routing_configs`, their indexes and the ab_* views (idempotent).

    Accepts a sqlite3.Connection, a sqlite_utils.Database, or a path (the file is created
    in WAL mode)."""
    if isinstance(conn_or_path, str | Path):
        conn = connect(conn_or_path, create=True, autocommit=True)
        try:
            create_request_tables(conn)
        finally:
            conn.close()
        return
    conn = as_connection(conn_or_path)
    conn.executescript(_REQUEST_TABLES)
    _add_missing_columns(conn, "requests", REQUEST_COLUMNS)
    for name, body in REQUEST_VIEWS.items():
        sql = f"CREATE VIEW {name} AS{body}"
        row = conn.execute("SELECT type, sql FROM sqlite_master WHERE name = ?", (name,)).fetchone()
        if row and row[0] == "view" and _norm_sql(row[1]) == _norm_sql(sql):
            continue
        if row and row[0] != "view":
            raise ValueError(f"cannot create view '{name}': a {row[0]} of that name exists")
        conn.executescript(f"BEGIN; DROP VIEW IF EXISTS {name}; {sql}; COMMIT;")
