"""Opening a database: one set of settings for every connection, and the errors that name the file."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import sqlite_utils


class DBError(ValueError):
    """The database cannot be used as asked; the message names the file, table or column."""



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



def add_missing_columns(conn: sqlite3.Connection, table: str,
                        columns: dict[str, tuple[str, bool, str]]) -> None:
    """Columns added by a newer mondrian, added to an older file (nullable: old rows hold
    NULL, meaning "not recorded"); nothing else about a table ever changes in place."""
    have = {row[1] for row in conn.execute(f'PRAGMA table_info("{table}")')}
    for name, (sqltype, _, _) in columns.items():
        if name not in have:
            conn.execute(f'ALTER TABLE "{table}" ADD COLUMN {name} {sqltype}')


def has_table(conn: sqlite3.Connection, name: str) -> bool:
    """Whether the database has a table of this name (an older or foreign file may lack one)."""
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ? UNION ALL "
                        "SELECT 1 FROM sqlite_temp_master WHERE type IN ('table', 'view') AND name = ?",
                        (name, name)).fetchone() is not None  # temp views: `connect_union`


def connect_union(paths: Sequence[str | Path], tables: Sequence[str], distinct: Sequence[str] = ()) -> sqlite3.Connection:
    """Several databases read as one (service replicas each write their own requests file):
    each attached read-only, and per table in `tables` that any of them has, a TEMP view of
    the same name over all their rows (UNION ALL, or UNION for `distinct` tables such as the
    routing configs every replica records alike); a column an older file lacks reads NULL.
    The same file twice is an error (its rows would count twice)."""
    resolved = [Path(p).resolve() for p in paths]
    if len(set(resolved)) < len(resolved):
        twice = sorted({str(p) for p in resolved if resolved.count(p) > 1})
        raise DBError(f"{', '.join(twice)}: given more than once (its rows would count twice)")
    conn = sqlite3.connect(":memory:", uri=True)
    for i, path in enumerate(resolved):
        connect(path, read_only=True).close()  # the same checks and errors as one file
        conn.execute(f"ATTACH DATABASE ? AS db{i}", (f"{path.as_uri()}?mode=ro",))
    for table in tables:
        cols_per_db = []
        for i in range(len(resolved)):
            cols = [r[1] for r in conn.execute(f'PRAGMA db{i}.table_info("{table}")')]
            cols_per_db.append(cols)
        columns = list(dict.fromkeys(c for cols in cols_per_db for c in cols))
        if not columns:
            continue
        selects = [f'SELECT {", ".join(c if c in cols else f"NULL AS {c}" for c in columns)} FROM db{i}."{table}"'
                   for i, cols in enumerate(cols_per_db) if cols]
        glue = " UNION " if table in distinct else " UNION ALL "
        conn.execute(f'CREATE TEMP VIEW "{table}" AS {glue.join(selects)}')
    return conn
