"""The served-requests log: one SQLite row per request the advisor service answers.

Tables (see README, "A/B analysis (SQL)"):
- `requests`: one row per served request, plus one row per shadow run (`shadow_of` set).
- `routing_configs`: every routing config the service ran under, by `routing_id`; the
  A/B report reads the arm weights from it for the sample-ratio-mismatch check.
- views `ab_arms`, `ab_versions`, `ab_shadow`, `ab_shadow_pairs`, `ab_hourly`, `ab_split`
  for the analyst (Datasette, pandas, sqlite3).

`RequestLog` writes rows from the request path without making it wait on SQLite more
than it must: `submit(row)` validates the row synchronously (a bad row raises ValueError
naming the key and nothing is enqueued), enqueues it, and returns a Future. One writer
thread owns the connection; it drains everything queued, inserts it with one
`executemany` in one transaction (group commit), commits, and only then resolves those
futures. The log belongs to one process: create it after any fork. The database is in WAL mode with `synchronous=NORMAL`: a committed row survives
kill -9 of the process (not necessarily a power cut, which is not what we guard against).
"""

from __future__ import annotations

import atexit
import json
import queue
import re
import sqlite3
import threading
from concurrent.futures import Future
from datetime import UTC, datetime
from pathlib import Path

import sqlite_utils

# name -> (SQL type, NOT NULL, what it holds). The order is the table's column order.
COLUMNS: dict[str, tuple[str, bool, str]] = {
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
}
REQUIRED = tuple(name for name, (_, notnull, _) in COLUMNS.items() if notnull)
PINNED_ARM = "pinned"
STICKY = ("user", "image", "none")
FALLBACKS = ("production", "base", "none")

_ISO_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z$")

_TABLES = (
    "CREATE TABLE IF NOT EXISTS requests (\n    "
    + ",\n    ".join(f"{name} {sqltype}{' NOT NULL' if notnull else ''}"
                     + (" PRIMARY KEY" if name == "request_id" else "")
                     for name, (sqltype, notnull, _) in COLUMNS.items())
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

_ERR = "(error IS NOT NULL OR status >= 500)"

# Views: no data of their own, so they are (re)created whenever their SQL differs from
# what is stored (an older mondrian's view is replaced, an identical one left alone).
VIEWS: dict[str, str] = {
    # Served rows (not shadow), per advisor and arm.
    "ab_arms": f"""
SELECT advisor, arm,
       count(*) AS requests,
       sum(contract_ok = 1) AS compliant,
       1.0 * sum(contract_ok = 1) / nullif(count(contract_ok), 0) AS compliance_rate,
       count(fallback) AS fallbacks,
       1.0 * count(fallback) / count(*) AS fallback_rate,
       sum({_ERR}) AS errors,
       1.0 * sum({_ERR}) / count(*) AS error_rate,
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
       1.0 * sum({_ERR}) / count(*) AS error_rate,
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
       1.0 * sum({_ERR}) / count(*) AS error_rate,
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

_INSERT = (f"INSERT INTO requests ({', '.join(COLUMNS)}) "
           f"VALUES ({', '.join('?' for _ in COLUMNS)})")


def now_iso() -> str:
    """Now, as the log writes times: ISO 8601 UTC with milliseconds, e.g. 2026-11-22T09:30:01.123Z."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _connect(path: str | Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), timeout=30, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def _raw(conn_or_db) -> sqlite3.Connection:
    if isinstance(conn_or_db, sqlite_utils.Database):
        return conn_or_db.conn
    if isinstance(conn_or_db, sqlite3.Connection):
        return conn_or_db
    raise TypeError(f"expected a sqlite3.Connection or sqlite_utils.Database, got {type(conn_or_db).__name__}")


def _norm_sql(sql: str | None) -> str:
    return " ".join((sql or "").split())


def create_tables(conn_or_db) -> None:
    """Create `requests`, `routing_configs`, their indexes and the ab_* views (idempotent).

    Accepts a sqlite3.Connection, a sqlite_utils.Database, or a path (the file is created
    in WAL mode)."""
    if isinstance(conn_or_db, str | Path):
        conn = _connect(conn_or_db)
        try:
            create_tables(conn)
        finally:
            conn.close()
        return
    conn = _raw(conn_or_db)
    conn.executescript(_TABLES)
    for name, body in VIEWS.items():
        sql = f"CREATE VIEW {name} AS{body}"
        row = conn.execute("SELECT type, sql FROM sqlite_master WHERE name = ?", (name,)).fetchone()
        if row and row[0] == "view" and _norm_sql(row[1]) == _norm_sql(sql):
            continue
        if row and row[0] != "view":
            raise ValueError(f"cannot create view '{name}': a {row[0]} of that name exists")
        conn.executescript(f"BEGIN; DROP VIEW IF EXISTS {name}; {sql}; COMMIT;")


def validate_routing_config(config: dict) -> None:
    """Check the keys the A/B report relies on; ValueError naming the field."""
    if not isinstance(config, dict):
        raise ValueError(f"routing config must be a dict, got {type(config).__name__}")
    arms = config.get("arms")
    if not isinstance(arms, list) or not arms:
        raise ValueError("routing config: 'arms' must be a non-empty list")
    names = set()
    for i, arm in enumerate(arms):
        if not isinstance(arm, dict):
            raise ValueError(f"routing config: arms[{i}] must be a dict")
        name = arm.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"routing config: arms[{i}].name must be a non-empty string")
        if name == PINNED_ARM:
            raise ValueError(f"routing config: arms[{i}].name '{PINNED_ARM}' is reserved for pinned requests")
        if name in names:
            raise ValueError(f"routing config: arms[{i}].name '{name}' is repeated")
        names.add(name)
        version = arm.get("version")
        if version is not None and not isinstance(version, str):
            raise ValueError(f"routing config: arms[{i}].version must be a string or null")
        weight = arm.get("weight")
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight >= 0:
            raise ValueError(f"routing config: arms[{i}].weight must be a number >= 0, got {weight!r}")
    if not sum(a["weight"] for a in arms) > 0:
        raise ValueError("routing config: the arms' weights sum to 0")
    shadow = config.get("shadow")
    if shadow is not None and not isinstance(shadow, str):
        raise ValueError("routing config: 'shadow' must be a version string or null")
    if config.get("sticky", "none") not in STICKY:
        raise ValueError(f"routing config: 'sticky' must be one of {', '.join(STICKY)}, "
                         f"got {config.get('sticky')!r}")
    if config.get("fallback", "none") not in FALLBACKS:
        raise ValueError(f"routing config: 'fallback' must be one of {', '.join(FALLBACKS)}, "
                         f"got {config.get('fallback')!r}")


def record_routing(db_path_or_conn, routing_id: str, advisor: str, config: dict,
                   created_at: str | None = None) -> bool:
    """Record a routing config under `routing_id` (insert or ignore). True if inserted.

    Recording the same id again with the same config is a no-op; with a different config
    it is a ValueError (the A/B report would otherwise check the split against the
    wrong weights)."""
    if not isinstance(routing_id, str) or not routing_id:
        raise ValueError("routing_id must be a non-empty string")
    if not isinstance(advisor, str) or not advisor:
        raise ValueError("advisor must be a non-empty string")
    validate_routing_config(config)
    config_json = json.dumps(config, sort_keys=True, separators=(",", ":"))
    if isinstance(db_path_or_conn, str | Path):
        conn = _connect(db_path_or_conn)
        try:
            return record_routing(conn, routing_id, advisor, config, created_at)
        finally:
            conn.close()
    conn = _raw(db_path_or_conn)
    create_tables(conn)
    with conn:
        cur = conn.execute("INSERT OR IGNORE INTO routing_configs (routing_id, advisor, created_at, "
                           "config_json) VALUES (?, ?, ?, ?)",
                           (routing_id, advisor, created_at or now_iso(), config_json))
        if cur.rowcount:
            return True
        old_advisor, old_json = conn.execute(
            "SELECT advisor, config_json FROM routing_configs WHERE routing_id = ?",
            (routing_id,)).fetchone()
    if old_advisor != advisor or json.loads(old_json) != json.loads(config_json):
        raise ValueError(f"routing_id '{routing_id}' is already recorded with a different "
                         f"{'advisor' if old_advisor != advisor else 'config'}")
    return False


def validate_row(row: dict) -> tuple:
    """The row as an insert tuple in column order; ValueError naming the offending key."""
    if not isinstance(row, dict):
        raise ValueError(f"a request row must be a dict, got {type(row).__name__}")
    for key in row:
        if key not in COLUMNS:
            raise ValueError(f"unknown key '{key}' in request row (columns: {', '.join(COLUMNS)})")
    for key in REQUIRED:
        if row.get(key) is None:
            raise ValueError(f"request row lacks '{key}' (required, NOT NULL)")
    values = []
    for key, (sqltype, _, _) in COLUMNS.items():
        value = row.get(key)
        if value is not None:
            if sqltype == "TEXT":
                ok = isinstance(value, str)
            elif sqltype == "INTEGER":
                ok = isinstance(value, int) and (key == "contract_ok" or not isinstance(value, bool))
            else:
                ok = isinstance(value, int | float) and not isinstance(value, bool)
            if not ok:
                raise ValueError(f"request row: '{key}' must be {sqltype} or null, "
                                 f"got {type(value).__name__} {value!r}")
            if isinstance(value, bool):
                value = int(value)
        values.append(value)
    if not _ISO_UTC.match(row["received_at"]):
        raise ValueError(f"request row: 'received_at' must be ISO 8601 UTC ending in Z "
                         f"(e.g. {now_iso()}), got {row['received_at']!r}")
    if row.get("contract_ok") not in (None, 0, 1):
        raise ValueError(f"request row: 'contract_ok' must be 1, 0 or null, got {row['contract_ok']!r}")
    return tuple(values)


_STOP = object()


class RequestLog:
    """Background, group-committing writer of `requests` rows (see the module docstring).

    `commits` counts committed transactions, `rows_written` the rows in them; both only
    grow, and `rows_written / commits` is the mean group size.
    """

    def __init__(self, db_path: str | Path | None = None, *, enabled: bool = True,
                 max_batch: int = 5000):
        self.enabled = enabled
        self.path = Path(db_path) if db_path is not None else None
        self.max_batch = max_batch
        self.commits = 0
        self.rows_written = 0
        self.largest_batch = 0
        self._closed = False
        self._lock = threading.Lock()
        if not enabled:
            return
        if db_path is None:
            raise ValueError("RequestLog needs a db_path (or enabled=False)")
        self._conn = _connect(self.path)  # from here on used by the writer thread only
        create_tables(self._conn)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="mondrian-request-log", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    @classmethod
    def disabled(cls) -> RequestLog:
        """A log that records nothing: submit() returns a completed future at once (it does
        not even validate), for the "recording off" arm of a benchmark."""
        return cls(enabled=False)

    def submit(self, row: dict) -> Future:
        """Validate and enqueue one row; the future resolves (None) once its transaction has
        committed, or with the exception that kept it from committing."""
        fut: Future = Future()
        if not self.enabled:
            fut.set_result(None)
            return fut
        item = (validate_row(row), fut)
        with self._lock:
            if self._closed:
                raise RuntimeError("RequestLog is closed")
            self._queue.put(item)
        return fut

    def write(self, row: dict) -> None:
        """submit(row) and wait until it is committed."""
        self.submit(row).result()

    def flush(self) -> None:
        """Wait until every row submitted before this call is committed (or failed)."""
        if not self.enabled:
            return
        fut: Future = Future()
        with self._lock:
            if self._closed:
                return
            self._queue.put((None, fut))
        fut.result()

    def close(self) -> None:
        """Write everything queued, stop the writer thread, close the connection (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self.enabled:
                self._queue.put(_STOP)
        if self.enabled:
            self._thread.join()
            atexit.unregister(self.close)

    def __enter__(self) -> RequestLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- the writer thread ---

    def _run(self) -> None:
        try:
            stop = False
            while not stop:
                batch = []
                item = self._queue.get()
                while True:
                    if item is _STOP:
                        stop = True
                        break
                    batch.append(item)
                    if len(batch) >= self.max_batch:
                        break
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                self._write_batch(batch)
        finally:
            self._conn.close()

    def _write_batch(self, batch: list) -> None:
        # A future cancelled while queued is dropped with its row.
        live = [(values, fut) for values, fut in batch if fut.set_running_or_notify_cancel()]
        rows = [(values, fut) for values, fut in live if values is not None]
        failed: dict[int, Exception] = {}
        if rows:
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    conn.executemany(_INSERT, [values for values, _ in rows])
                except sqlite3.IntegrityError:
                    # Some row clashes (a repeated request_id): redo the batch row by row
                    # so only the clashing rows fail.
                    conn.execute("ROLLBACK")
                    conn.execute("BEGIN IMMEDIATE")
                    failed = self._insert_each(rows)
                conn.execute("COMMIT")
            except Exception as exc:  # noqa: BLE001 - every future must learn the outcome
                if conn.in_transaction:
                    try:
                        conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                for values, fut in live:
                    if values is None:  # a flush() marker: the rows before it are settled
                        fut.set_result(None)
                    else:
                        fut.set_exception(exc)
                return
            self.commits += 1
            self.rows_written += len(rows) - len(failed)
            self.largest_batch = max(self.largest_batch, len(rows))
        for _, fut in live:
            exc = failed.get(id(fut))
            if exc is None:
                fut.set_result(None)
            else:
                fut.set_exception(exc)

    def _insert_each(self, rows: list) -> dict[int, Exception]:
        failed = {}
        for values, fut in rows:
            self._conn.execute("SAVEPOINT row")
            try:
                self._conn.execute(_INSERT, values)
            except sqlite3.IntegrityError as exc:
                self._conn.execute("ROLLBACK TO row")
                err = ValueError(f"request_id {values[0]!r} is already recorded"
                                 if "request_id" in str(exc) else f"request row rejected: {exc}")
                err.__cause__ = exc
                failed[id(fut)] = err
            self._conn.execute("RELEASE row")
        return failed
