"""Run tracking in SQLite: every training / evaluation run, its config, fingerprints and metrics.

Tables (in the workspace's mondrian.db, next to `jobs`; schema in mondrian.core.db):
- `runs`: one row per run: kind, advisor, status (running / completed / failed /
  interrupted), config JSON, dataset and base-model fingerprints, adapter path,
  summary numbers, error text, pid and host (a `running` row whose process is gone
  was killed: it reads as `interrupted`).
- `run_metrics`: (run_id, step, name, value, time) rows: train_loss, val_loss,
  learning_rate, tokens_per_s, peak_memory_gb ...
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path

from mondrian.core.db import create_runs_tables, open_db

STATUSES = ("running", "completed", "failed", "interrupted")

def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class RunStore:
    """Writes and reads runs; one connection per store, commits on every write (WAL)."""

    def __init__(self, db_path: str | Path):
        self.path = Path(db_path)
        self.db = open_db(self.path, create=True)
        create_runs_tables(self.db)

    def close(self) -> None:
        self.db.conn.close()

    def start(self, kind: str, advisor: str | None, config: dict, dataset_fingerprint: str | None,
              base_model: str | None, base_model_fingerprint: str | None, adapter_path: str | None,
              run_id: str | None = None, parent_run_id: str | None = None) -> str:
        run_id = run_id or f"{kind}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"
        with self.db.conn:
            self.db.conn.execute(
                "INSERT INTO runs (run_id, kind, advisor, status, started_at, config, dataset_fingerprint,"
                " base_model, base_model_fingerprint, adapter_path, parent_run_id, pid, host)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (run_id, kind, advisor, "running", _now(), json.dumps(config, default=str),
                 dataset_fingerprint, base_model, base_model_fingerprint, adapter_path, parent_run_id,
                 os.getpid(), socket.gethostname()))
        return run_id

    def resume(self, run_id: str) -> None:
        """A resumed run is the same run again: running, owned by this process."""
        with self.db.conn:
            self.db.conn.execute("UPDATE runs SET status='running', ended_at=NULL, error=NULL, pid=?, host=?"
                                 " WHERE run_id=?", (os.getpid(), socket.gethostname(), run_id))

    def log(self, run_id: str, step: int, metrics: dict[str, float]) -> None:
        t = time.time()
        rows = [(run_id, step, k, float(v), t) for k, v in metrics.items() if v is not None]
        with self.db.conn:
            # A resumed run replays from its checkpoint: drop what the killed run logged past it.
            self.db.conn.executemany("DELETE FROM run_metrics WHERE run_id=? AND step=? AND name=?",
                                     [(r[0], r[1], r[2]) for r in rows])
            self.db.conn.executemany("INSERT INTO run_metrics VALUES (?,?,?,?,?)", rows)

    def truncate_metrics(self, run_id: str, after_step: int) -> None:
        with self.db.conn:
            self.db.conn.execute("DELETE FROM run_metrics WHERE run_id=? AND step>?", (run_id, after_step))

    def finish(self, run_id: str, status: str, summary: dict | None = None, error: str | None = None) -> None:
        assert status in STATUSES, status
        with self.db.conn:
            self.db.conn.execute("UPDATE runs SET status=?, ended_at=?, summary=?, error=? WHERE run_id=?",
                                 (status, _now(), json.dumps(summary or {}, default=str), error, run_id))

    def get(self, run_id: str) -> dict | None:
        rows = self.list(run_id=run_id)
        return rows[0] if rows else None

    def list(self, kind: str | None = None, advisor: str | None = None, run_id: str | None = None,
             limit: int = 1000) -> list[dict]:
        where, args = [], []
        for col, val in (("kind", kind), ("advisor", advisor), ("run_id", run_id)):
            if val:
                where.append(f"{col}=?")
                args.append(val)
        sql = "SELECT * FROM runs" + (" WHERE " + " AND ".join(where) if where else "")
        cur = self.db.conn.execute(sql + " ORDER BY started_at DESC, rowid DESC LIMIT ?", (*args, limit))
        names = [d[0] for d in cur.description]
        out = []
        for row in cur.fetchall():
            run = dict(zip(names, row, strict=True))
            run["config"] = json.loads(run["config"] or "{}")
            run["summary"] = json.loads(run["summary"] or "{}")
            if run["status"] == "running" and not _alive(run["pid"], run["host"]):
                run["status"] = "interrupted"  # killed (kill -9, power loss): nobody will finish it
            out.append(run)
        return out

    def metrics(self, run_id: str, name: str | None = None) -> list[tuple[int, str, float]]:
        sql = "SELECT step, name, value FROM run_metrics WHERE run_id=?"
        args: list = [run_id]
        if name:
            sql += " AND name=?"
            args.append(name)
        return list(self.db.conn.execute(sql + " ORDER BY name, step", args))


def _alive(pid: int | None, host: str | None) -> bool:
    if pid is None or host != socket.gethostname():
        return True  # cannot tell from here
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
