"""The served-requests log: one SQLite row per request the advisor service answers.

Tables (their schema is in mondrian.core.db; see README, "A/B analysis (SQL)"):
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
futures. The log belongs to one process: create it after any fork. The database is in
WAL mode with `synchronous=NORMAL`: a committed row survives kill -9 of the process (not
necessarily a power cut, which is not what we guard against).

The database file must stay the one the log opened: SQLite keeps writing to a deleted (or
renamed-over) file, and everything written after that is lost when the connection closes.
So the writer compares the path's device and inode with the opened file's before every
commit group and every `check_every_s` while idle; once they differ, `problem` says so, and
every row from then on fails with `LogUnavailable` instead of being acknowledged.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import queue
import re
import sqlite3
import threading
from concurrent.futures import Future
from datetime import UTC, datetime
from pathlib import Path

from mondrian.core.db import (
    PAYLOAD_MODES,
    PINNED_ARM,
    REQUEST_COLUMNS,
    as_connection,
    connect,
    create_request_tables,
)
from mondrian.serve.routing import FALLBACK, STICKY

REQUIRED = tuple(name for name, (_, notnull, _) in REQUEST_COLUMNS.items() if notnull)

_ISO_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z$")


_INSERT = (f"INSERT INTO requests ({', '.join(REQUEST_COLUMNS)}) "
           f"VALUES ({', '.join('?' for _ in REQUEST_COLUMNS)})")


def now_iso() -> str:
    """Now, as the log writes times: ISO 8601 UTC with milliseconds, e.g. 2026-11-22T09:30:01.123Z."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


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
    if config.get("fallback", "none") not in FALLBACK:
        raise ValueError(f"routing config: 'fallback' must be one of {', '.join(FALLBACK)}, "
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
        conn = connect(db_path_or_conn, create=True, autocommit=True)
        try:
            return record_routing(conn, routing_id, advisor, config, created_at)
        finally:
            conn.close()
    conn = as_connection(db_path_or_conn)
    create_request_tables(conn)
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


def payload_fields(mode: str, text: str | None, image_sha256: str | None, answer: str | None) -> dict:
    """The row's payload columns under `log_payloads` `mode` (see PAYLOAD_MODES): 'full' keeps
    the texts and their hashes, 'hash' only the hashes, 'off' nothing."""
    if mode not in PAYLOAD_MODES:
        raise ValueError(f"log_payloads must be one of {', '.join(PAYLOAD_MODES)}, got {mode!r}")
    if mode == "off":
        return {"payloads": mode}
    row = {"payloads": mode, "image_sha256": image_sha256,
           "input_sha256": _sha256(text) if text else None,
           "answer_sha256": _sha256(answer) if answer is not None else None}
    if mode == "full":
        row |= {"input_text": text or None, "answer_text": answer}
    return row


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def validate_row(row: dict) -> tuple:
    """The row as an insert tuple in column order; ValueError naming the offending key."""
    if not isinstance(row, dict):
        raise ValueError(f"a request row must be a dict, got {type(row).__name__}")
    for key in row:
        if key not in REQUEST_COLUMNS:
            raise ValueError(f"unknown key '{key}' in request row "
                             f"(columns: {', '.join(REQUEST_COLUMNS)})")
    for key in REQUIRED:
        if row.get(key) is None:
            raise ValueError(f"request row lacks '{key}' (required, NOT NULL)")
    values = []
    for key, (sqltype, _, _) in REQUEST_COLUMNS.items():
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


class LogUnavailable(RuntimeError):
    """The log cannot keep rows (its database file is gone or was replaced)."""


class RequestLog:
    """Background, group-committing writer of `requests` rows (see the module docstring).

    `commits` counts committed transactions, `rows_written` the rows in them; both only
    grow, and `rows_written / commits` is the mean group size.
    """

    def __init__(self, db_path: str | Path | None = None, *, enabled: bool = True,
                 max_batch: int = 5000, check_every_s: float = 1.0):
        self.enabled = enabled
        self.check_every_s = check_every_s
        self.problem: str | None = None  # set once the database file is gone or replaced
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
        # From here on the connection is used by the writer thread only.
        self._conn = connect(self.path, create=True, autocommit=True, check_same_thread=False)
        create_request_tables(self._conn)
        self._identity = self._file_identity()
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

    def _file_identity(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def check(self) -> str | None:
        """Why the log cannot keep rows (its file was deleted or replaced), or None. Sticky:
        rows written to the old file since then are lost, so the log never recovers."""
        if self.enabled and self.problem is None:
            now = self._file_identity()
            if now is None:
                self.problem = f"the request database {self.path} was deleted while the service ran"
            elif now != self._identity:
                self.problem = f"the request database {self.path} was replaced while the service ran"
        return self.problem

    # --- the writer thread ---

    def _run(self) -> None:
        try:
            stop = False
            while not stop:
                batch = []
                try:
                    item = self._queue.get(timeout=self.check_every_s)
                except queue.Empty:
                    self.check()  # on a schedule, so /health knows without traffic
                    continue
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
                if self.check():
                    raise LogUnavailable(self.problem)
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
                if self.check():  # deleted while we wrote: the rows went to an unlinked file
                    raise LogUnavailable(self.problem)
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
