"""The served-requests log: durable against kill -9, group commit, strict rows, the views."""

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from mondrian.core.db import REQUEST_COLUMNS, REQUEST_VIEWS, create_request_tables
from mondrian.serve.requests_log import RequestLog, now_iso, record_routing, validate_row
from tests.helpers import ROOT

CONFIG = {"arms": [{"name": "control", "version": "v1", "weight": 50},
                   {"name": "treatment", "version": "v2", "weight": 50}],
          "shadow": "v3", "sticky": "user", "fallback": "production"}


def row(i, **kw) -> dict:
    return {"request_id": f"req-{i}", "received_at": now_iso(), "advisor": "fit-query",
            "endpoint": "analyze", "arm": "control", "assigned_version": "v1",
            "served_version": "v1", "base_model": "smollm2-135m", "base_fingerprint": "bf747d13",
            "routing_id": "r1", "status": 200, "contract_ok": 1, "latency_ms": 12.5,
            "queue_ms": 0.4, "prompt_tokens": 50, "completion_tokens": 20} | kw


def count(path, where="1") -> int:
    with sqlite3.connect(path) as conn:
        return conn.execute(f"SELECT count(*) FROM requests WHERE {where}").fetchone()[0]


KILL_SCRIPT = r"""
import itertools, sys, threading
from mondrian.serve.requests_log import RequestLog, now_iso

log = RequestLog(sys.argv[1])
out = threading.Lock()

def worker(t):
    for i in itertools.count():
        ids = [f"t{t}-{i}-{k}" for k in range(4)]
        futs = [log.submit({"request_id": rid, "received_at": now_iso(), "advisor": "fit-query",
                            "endpoint": "chat", "arm": "control", "base_fingerprint": "fp",
                            "status": 200, "contract_ok": 1, "latency_ms": 1.0}) for rid in ids]
        for rid, fut in zip(ids, futs):
            fut.result()  # committed: only now may the id be printed
            with out:
                sys.stdout.write(rid + "\n")
                sys.stdout.flush()

for t in range(6):
    threading.Thread(target=worker, args=(t,), daemon=True).start()
threading.Event().wait()
"""


def test_kill_9_keeps_every_acknowledged_row(tmp_path):
    db = tmp_path / "requests.db"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(db)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    acked = []
    deadline = time.monotonic() + 30
    try:
        while len(acked) < 400 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            acked.append(line.rstrip("\n"))
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    # Lines already in the pipe when the process died were acknowledged too.
    rest = proc.stdout.read()
    acked += [x for x in rest.split("\n")[:-1] if x]  # the last piece may be a torn line
    err = proc.stderr.read()
    assert proc.returncode == -signal.SIGKILL, err
    assert len(acked) >= 400, f"only {len(acked)} rows acknowledged before the deadline: {err}"
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    stored = {r[0] for r in conn.execute("SELECT request_id FROM requests")}
    missing = [rid for rid in acked if rid not in stored]
    assert not missing, f"{len(missing)} acknowledged rows lost, e.g. {missing[:5]}"
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_group_commit_batches_concurrent_submits(tmp_path):
    db = tmp_path / "r.db"
    n_threads, per_thread = 8, 150
    with RequestLog(db) as log:
        futures, lock = [], threading.Lock()

        def submit_many(t):
            mine = [log.submit(row(f"{t}-{i}")) for i in range(per_thread)]
            with lock:
                futures.extend(mine)

        threads = [threading.Thread(target=submit_many, args=(t,)) for t in range(n_threads)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        for fut in futures:
            assert fut.result(timeout=30) is None
        total = n_threads * per_thread
        assert log.rows_written == total
        assert log.commits < total / 4, (log.commits, total)
        assert log.largest_batch > 1

        # Blocking write() from many threads at once also shares commits.
        before_rows, before_commits = log.rows_written, log.commits
        barrier = threading.Barrier(16)

        def write_some(t):
            barrier.wait()
            for i in range(20):
                log.write(row(f"w{t}-{i}"))

        threads = [threading.Thread(target=write_some, args=(t,)) for t in range(16)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert log.rows_written - before_rows == 320
        assert log.commits - before_commits < 320
    assert count(db) == total + 320


def test_future_resolves_only_after_commit(tmp_path):
    db = tmp_path / "r.db"
    with RequestLog(db) as log:
        fut = log.submit(row(1))
        fut.result(timeout=10)
        # A separate connection sees the row as soon as the future is done.
        assert count(db, "request_id = 'req-1'") == 1


@pytest.mark.parametrize("bad, key", [
    ({"colour": "red"}, "colour"),
    ({"advisor": None}, "advisor"),
    ({"status": "200"}, "status"),
    ({"latency_ms": "fast"}, "latency_ms"),
    ({"contract_ok": 2}, "contract_ok"),
    ({"received_at": "2026-11-22 09:30:01"}, "received_at"),
    ({"prompt_tokens": 1.5}, "prompt_tokens"),
])
def test_bad_rows_raise_naming_the_key_and_write_nothing(tmp_path, bad, key):
    db = tmp_path / "r.db"
    with RequestLog(db) as log:
        with pytest.raises(ValueError, match=f"'{key}'"):
            log.submit(row(1) | bad)
        log.flush()
        assert log.commits == 0
    assert count(db) == 0


def test_missing_required_keys_are_named(tmp_path):
    for key in ("request_id", "received_at", "advisor", "endpoint", "arm", "base_fingerprint",
                "status"):
        r = row(1)
        del r[key]
        with pytest.raises(ValueError, match=f"'{key}'"):
            validate_row(r)
    # Optional keys may be left out; a bool contract_ok is stored as 1/0.
    values = validate_row({k: v for k, v in row(1).items() if REQUEST_COLUMNS[k][1]} | {"contract_ok": True})
    assert values[list(REQUEST_COLUMNS).index("contract_ok")] == 1


def test_duplicate_id_fails_only_its_own_future(tmp_path):
    db = tmp_path / "r.db"
    with RequestLog(db) as log:
        log.write(row(1))
        futs = [log.submit(row(i)) for i in (2, 1, 3)]  # likely one batch
        assert futs[0].result(timeout=10) is None
        with pytest.raises(ValueError, match="already recorded"):
            futs[1].result(timeout=10)
        assert futs[2].result(timeout=10) is None
    assert count(db) == 3


def test_failed_commit_resolves_futures_with_the_error(tmp_path):
    db = tmp_path / "r.db"
    with RequestLog(db) as log:
        log.write(row(1))
        with sqlite3.connect(db) as other:
            other.execute("DROP TABLE requests")
        fut = log.submit(row(2))
        with pytest.raises(sqlite3.OperationalError, match="requests"):
            fut.result(timeout=10)


def test_disabled_log_writes_nothing(tmp_path):
    log = RequestLog.disabled()
    fut = log.submit({"anything": "goes"})
    assert fut.done() and fut.result() is None
    log.write(row(1))
    log.flush()
    log.close()
    assert log.commits == 0
    assert list(tmp_path.iterdir()) == []


def test_close_flushes_and_then_refuses(tmp_path):
    db = tmp_path / "r.db"
    log = RequestLog(db)
    futs = [log.submit(row(i)) for i in range(50)]
    log.close()
    assert all(f.done() and f.exception() is None for f in futs)
    assert count(db) == 50
    with pytest.raises(RuntimeError, match="closed"):
        log.submit(row(99))
    log.close()  # idempotent


def test_create_tables_is_idempotent_and_upgrades_views(tmp_path):
    db = tmp_path / "r.db"
    create_request_tables(db)
    conn = sqlite3.connect(db)
    version = conn.execute("PRAGMA schema_version").fetchone()[0]
    create_request_tables(conn)
    assert conn.execute("PRAGMA schema_version").fetchone()[0] == version  # nothing rewritten
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    assert {"requests", "routing_configs", *REQUEST_VIEWS} <= names
    assert {"requests_advisor_arm", "requests_received_at", "requests_served_version"} <= names
    conn.executescript("DROP VIEW ab_arms; CREATE VIEW ab_arms AS SELECT 1 AS old")
    create_request_tables(conn)
    cols = [d[0] for d in conn.execute("SELECT * FROM ab_arms").description]
    assert cols[:3] == ["advisor", "arm", "requests"]


def test_record_routing_insert_or_ignore(tmp_path):
    db = tmp_path / "r.db"
    assert record_routing(db, "r1", "fit-query", CONFIG) is True
    assert record_routing(db, "r1", "fit-query", CONFIG) is False
    with pytest.raises(ValueError, match="different config"):
        record_routing(db, "r1", "fit-query", CONFIG | {"shadow": None})
    bad = {"arms": [{"name": "a", "weight": 50}, {"name": "b", "weight": -1}]}
    with pytest.raises(ValueError, match=r"arms\[1\]\.weight"):
        record_routing(db, "r2", "fit-query", bad)
    with pytest.raises(ValueError, match="sticky"):
        record_routing(db, "r2", "fit-query", CONFIG | {"sticky": "session"})
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM routing_configs").fetchone()[0] == 1


def test_views_answer_plain_sqlite3(tmp_path):
    db = tmp_path / "r.db"
    record_routing(db, "r1", "fit-query", CONFIG)
    rows = ([row(f"c{i}", sticky_key=f"u{i}", contract_ok=int(i < 8)) for i in range(10)]
            + [row(f"t{i}", arm="treatment", assigned_version="v2", served_version="v2",
                   sticky_key=f"v{i}", latency_ms=30.0) for i in range(9)]
            + [row("t9", arm="treatment", assigned_version="v2", served_version=None,
                   status=500, contract_ok=None, error="worker died", latency_ms=30.0)]
            + [row("t10", arm="treatment", assigned_version="v2", served_version="v1",
                   contract_ok=0, fallback="production", fallback_reason="contract")]
            + [row(f"s{i}", shadow_of=f"req-c{i}", assigned_version="v3", served_version="v3",
                   contract_ok=int(i < 9), latency_ms=40.0) for i in range(10)])
    with RequestLog(db) as log:
        for fut in [log.submit(r) for r in rows]:
            fut.result(timeout=10)
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    arms = {r["arm"]: dict(r) for r in conn.execute("SELECT * FROM ab_arms")}
    assert arms["control"]["requests"] == 10 and arms["control"]["compliance_rate"] == 0.8
    t = arms["treatment"]
    assert (t["requests"], t["errors"], t["fallbacks"]) == (11, 1, 1)
    assert t["compliance_rate"] == pytest.approx(9 / 10)  # the error row has no verdict
    assert t["error_rate"] == pytest.approx(1 / 11)
    versions = {r["served_version"]: dict(r) for r in conn.execute("SELECT * FROM ab_versions")}
    assert versions["v1"]["requests"] == 11 and versions["v1"]["fallbacks"] == 1
    assert versions["v1"]["compliance_rate"] == pytest.approx(0.8)  # the fallback row is not v1's
    assert versions["v2"]["requests"] == 9 and "base" not in versions  # the 500 answered nothing
    shadow = dict(conn.execute("SELECT * FROM ab_shadow").fetchone())
    assert (shadow["assigned_version"], shadow["requests"], shadow["compliance_rate"]) == ("v3", 10, 0.9)
    pairs = dict(conn.execute("SELECT * FROM ab_shadow_pairs").fetchone())
    assert (pairs["both_ok"], pairs["shadow_only_ok"], pairs["served_only_ok"]) == (8, 1, 0)
    split = {r["arm"]: dict(r) for r in conn.execute("SELECT * FROM ab_split")}
    assert split["control"]["expected_share"] == 0.5
    assert split["control"]["requests"] == 10 and split["treatment"]["requests"] == 11
    hourly = conn.execute("SELECT sum(requests) FROM ab_hourly").fetchone()[0]
    assert hourly == 21
