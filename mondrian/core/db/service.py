"""The service's tables: `requests` (mondrian.serve.requests_log), `routing_configs`,
`feedback` with its `feedback_history` (mondrian.serve.feedback), `rollout_events`
(mondrian.serve.rollout), and the ab_* views the A/B report and analysts read.

`feedback` holds each user's current verdict on a served request, one row per (request_id,
user); `feedback_history` every verdict ever sent, by revision (1 = the first), so a changed
mind replaces the verdict and keeps the old one.

`rollout_events` is a rollout's timeline: one row per decision (start, hold, advance, promote,
rollback) with its evidence, numbered by `seq` within the rollout; the primary key (rollout_id,
seq) is what lets exactly one of several service processes take each decision."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING

from mondrian.core.db.connection import add_missing_columns, as_connection, connect

if TYPE_CHECKING:
    import sqlite_utils

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
    # payloads: what the row keeps of the input and the answer (the service's log_payloads)
    "payloads": ("TEXT", False, "'full', 'hash' or 'off': what this row keeps of input and answer"),
    "input_text": ("TEXT", False, "the input text as asked (payloads 'full')"),
    "input_sha256": ("TEXT", False, "sha256 of the input text (payloads 'full' and 'hash')"),
    "image_sha256": ("TEXT", False, "sha256 of the input image (payloads 'full' and 'hash'); with 'full' "
                                    "the image is kept once, by this hash, in the service's image store"),
    "answer_text": ("TEXT", False, "the answer text returned; shadow rows: the shadow's (payloads 'full')"),
    "answer_sha256": ("TEXT", False, "sha256 of the answer text (payloads 'full' and 'hash')"),
}
# What `log_payloads` keeps: full = the texts (and the image file), hash = only their sha256s,
# off = neither.
PAYLOAD_MODES = ("full", "hash", "off")
VERDICTS = ("accepted", "rejected", "corrected")
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
CREATE TABLE IF NOT EXISTS feedback (
    request_id TEXT NOT NULL,
    user TEXT NOT NULL,
    advisor TEXT NOT NULL,
    verdict TEXT NOT NULL CHECK (verdict IN ('accepted', 'rejected', 'corrected')),
    answer_json TEXT,
    revision INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (request_id, user)
);
CREATE TABLE IF NOT EXISTS feedback_history (
    request_id TEXT NOT NULL,
    user TEXT NOT NULL,
    revision INTEGER NOT NULL,
    verdict TEXT NOT NULL,
    answer_json TEXT,
    at TEXT NOT NULL,
    PRIMARY KEY (request_id, user, revision)
);
CREATE INDEX IF NOT EXISTS feedback_advisor ON feedback(advisor, verdict);
CREATE TABLE IF NOT EXISTS rollout_events (
    rollout_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    advisor TEXT NOT NULL,
    at TEXT NOT NULL,
    action TEXT NOT NULL CHECK (action IN ('start', 'hold', 'advance', 'promote', 'rollback')),
    status TEXT NOT NULL CHECK (status IN ('running', 'promoted', 'rolled_back')),
    step INTEGER NOT NULL,
    share REAL NOT NULL,
    step_started_at TEXT NOT NULL,
    control TEXT NOT NULL,
    candidate TEXT NOT NULL,
    candidate_version TEXT,
    reason TEXT,
    evidence_json TEXT,
    decided_by TEXT,
    PRIMARY KEY (rollout_id, seq)
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


def create_request_tables(
        conn_or_path: sqlite3.Connection | sqlite_utils.Database | str | Path) -> None:
    """Create `requests`, `routing_configs`, `feedback`, `feedback_history`, `rollout_events`,
    their indexes and the ab_* views (idempotent).

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
    add_missing_columns(conn, "requests", REQUEST_COLUMNS)
    for name, body in REQUEST_VIEWS.items():
        sql = f"CREATE VIEW {name} AS{body}"
        row = conn.execute("SELECT type, sql FROM sqlite_master WHERE name = ?", (name,)).fetchone()
        if row and row[0] == "view" and _norm_sql(row[1]) == _norm_sql(sql):
            continue
        if row and row[0] != "view":
            raise ValueError(f"cannot create view '{name}': a {row[0]} of that name exists")
        conn.executescript(f"BEGIN; DROP VIEW IF EXISTS {name}; {sql}; COMMIT;")
