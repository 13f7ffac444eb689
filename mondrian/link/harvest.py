"""Harvest: served requests that users judged become jobs, so the next round trains on them.

Every served request (answered, not a shadow run) of the requests database is *seen* and ends
in exactly one outcome, so counts are conserved (seen = harvested + updated + unchanged +
skipped by reason), printed by `mondrian harvest`:

- a correction -> a job whose answer is the correction (users who corrected it differently
  disagree: skipped);
- accepted, with no correction and no rejection -> a job whose answer is the served answer;
- rejected without a correction, no feedback, accepted and rejected by different users, or a
  request whose input was not logged (`log_payloads` hash / off) -> skipped, by reason.

A job is keyed by its request: `job_id` is the request id, and the provenance columns
`harvested_from` (request id), `served_version` and `harvest_verdict` are added to the jobs
table. A second run adds nothing (`unchanged`); a verdict changed since the last run updates
that job (`updated`), and one that no longer gives an answer marks it `retracted` (a status
linking does not take). A harvested image is copied from the service's image store into the
data root (`harvested/<sha256>.<ext>`), where linking reads it like any other image.

`link`, `dataset` and `train` then take harvested jobs like any other, under the same dedupe
and leakage rules; in linking, a correction outranks an earlier job with the same input (the
earlier one is rejected as `superseded`), and it lands in that input's split.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mondrian.core.contracts import Advisor, loads_strict
from mondrian.core.db import (
    DBError,
    add_missing_columns,
    as_connection,
    connect,
    create_jobs_table,
    create_request_tables,
    has_table,
    open_db,
)
from mondrian.core.image_store import ImageStore
from mondrian.core.workspace import Workspace

# Columns harvest adds to the jobs table (nullable; NULL on jobs that production wrote).
HARVEST_COLUMNS: dict[str, tuple[str, bool, str]] = {
    "harvested_from": ("TEXT", False, "the served request this job was harvested from"),
    "served_version": ("TEXT", False, "the version that served that request ('base' for the base model)"),
    "harvest_verdict": ("TEXT", False, "'accepted' (the served answer) or 'corrected' (a user's correction)"),
}
RETRACTED = "retracted"  # a harvested job whose feedback no longer gives an answer
HARVESTED_DIR = "harvested"  # where harvested images are kept, under the data root

SKIP_REASONS = {
    "no_feedback": "no user has judged the answer",
    "rejected": "rejected without a correction: there is no right answer to learn",
    "disagreement": "users disagree: accepted by one and rejected by another, or corrected differently",
    "payload_not_logged": "the request was logged without its input (log_payloads hash or off)",
    "image_not_kept": "the request's image is not in the image store",
    "answer_invalid": "accepted, but the served answer is not JSON that meets the contract",
    "unknown_advisor": "no contract for the request's advisor",
}


@dataclass
class HarvestSummary:
    seen: int = 0
    harvested: int = 0  # new jobs
    updated: int = 0  # jobs whose verdict or answer changed since the last run
    retracted: int = 0  # jobs whose feedback no longer gives an answer
    unchanged: int = 0  # harvested before, nothing changed
    skipped: dict[str, int] = field(default_factory=dict)
    by_verdict: dict[str, int] = field(default_factory=dict)

    @property
    def conserved(self) -> bool:
        return self.seen == (self.harvested + self.updated + self.retracted + self.unchanged
                             + sum(self.skipped.values()))

    def line(self) -> str:
        skipped = ", ".join(f"{n} {r}" for r, n in self.skipped.items()) or "none"
        ok = "conserved" if self.conserved else "NOT CONSERVED"
        return (f"{self.seen} requests seen = {self.harvested} harvested + {self.updated} updated + "
                f"{self.retracted} retracted + {self.unchanged} unchanged + "
                f"{sum(self.skipped.values())} skipped ({skipped}) ({ok})")

    def to_dict(self) -> dict:
        return asdict(self) | {"conserved": self.conserved}


@dataclass
class _Decision:
    verdict: str | None = None  # accepted | corrected; None = skipped
    answer: dict | None = None
    reason: str | None = None


def decide(verdicts: list[tuple[str, str | None]], served_answer: str | None, contract: Advisor) -> _Decision:
    """What one request's current verdicts (verdict, correction JSON) teach, if anything."""
    corrections = {a for v, a in verdicts if v == "corrected"}
    kinds = {v for v, _ in verdicts}
    if not verdicts:
        return _Decision(reason="no_feedback")
    if len(corrections) > 1 or (corrections and "accepted" in kinds):
        return _Decision(reason="disagreement")
    if corrections:
        return _Decision("corrected", json.loads(next(iter(corrections))))
    if kinds == {"rejected"}:
        return _Decision(reason="rejected")
    if "rejected" in kinds:
        return _Decision(reason="disagreement")
    try:
        obj = loads_strict(served_answer or "")
    except ValueError:
        return _Decision(reason="answer_invalid")
    if not isinstance(obj, dict) or contract.violations(obj):
        return _Decision(reason="answer_invalid")
    return _Decision("accepted", contract.normalize(obj))


_REQUESTS = """
SELECT r.request_id, r.advisor, r.received_at, r.served_version, r.payloads, r.input_text,
       r.image_sha256, r.answer_text,
       (SELECT json_group_array(json_array(f.verdict, f.answer_json)) FROM feedback f
        WHERE f.request_id = r.request_id) AS verdicts,
       (SELECT max(f.updated_at) FROM feedback f WHERE f.request_id = r.request_id) AS judged_at
FROM requests r
WHERE r.shadow_of IS NULL AND r.status < 400 {where}
ORDER BY r.received_at, r.request_id
"""


def harvest(ws: Workspace, contracts: dict[str, Advisor], requests_db: str | Path | None = None,
            image_store: str | Path | None = None, advisors: list[str] | None = None) -> HarvestSummary:
    """Turn judged requests into jobs in the workspace's jobs table (see the module docstring).
    One transaction: a failed run writes nothing."""
    requests_db = Path(requests_db or ws.db_path)
    store = ImageStore(image_store or requests_db.resolve().parent / "request-images")
    db = open_db(ws.db_path, create=True)
    conn = as_connection(db)
    summary = HarvestSummary()
    try:
        src = connect(requests_db)  # a missing file is a DBError naming it
        try:
            if not has_table(src, "requests"):
                raise DBError(f"{requests_db}: no 'requests' table (the advisor service writes it)")
            create_request_tables(src)  # a log from an older mondrian gains the payload and feedback tables
            where = f"AND r.advisor IN ({', '.join('?' for _ in advisors)})" if advisors else ""
            rows = src.execute(_REQUESTS.format(where=where), advisors or []).fetchall()
        finally:
            src.close()
        col = {k: v for k, v in asdict(ws.columns).items() if v is not None}
        missing = [k for k in ("job_id", "advisor", "status", "analysis_json", "input_text") if k not in col]
        if missing:
            raise ValueError(f"harvest writes {', '.join(missing)}: map them in the workspace's columns "
                             f"({ws.root}/mondrian.yaml)")
        create_jobs_table(db, ws.jobs_table)
        add_missing_columns(conn, ws.jobs_table, HARVEST_COLUMNS)
        conn.commit()
        existing = {r[0]: r[1:] for r in conn.execute(
            f'SELECT harvested_from, "{col["status"]}", "{col["analysis_json"]}", '
            f'harvest_verdict FROM "{ws.jobs_table}" WHERE harvested_from IS NOT NULL')}
        conn.execute("BEGIN IMMEDIATE")
        for row in rows:
            summary.seen += 1
            outcome = _harvest_one(conn, ws, col, contracts, store, row, existing.get(row[0]))
            if outcome in SKIP_REASONS:
                summary.skipped[outcome] = summary.skipped.get(outcome, 0) + 1
            else:
                setattr(summary, outcome, getattr(summary, outcome) + 1)
        conn.execute("COMMIT")
        summary.by_verdict = dict(conn.execute(  # every live harvested job, this run's and earlier ones
            f'SELECT harvest_verdict, count(*) FROM "{ws.jobs_table}" WHERE harvested_from IS NOT NULL '
            f'AND "{col["status"]}" <> ? GROUP BY 1 ORDER BY 1', (RETRACTED,)).fetchall())
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    finally:
        conn.close()
    summary.skipped = {r: summary.skipped[r] for r in SKIP_REASONS if r in summary.skipped}
    if not summary.conserved:  # cannot happen by construction
        raise RuntimeError(f"harvest counts are not conserved: {summary.line()}")
    return summary


def _harvest_one(conn: sqlite3.Connection, ws: Workspace, col: dict, contracts: dict[str, Advisor],
                 store: ImageStore, row: tuple, before: tuple | None) -> str:
    """Insert, update or retract one request's job; the outcome (or a skip reason)."""
    request_id, advisor, received_at, served_version, payloads, text, image_sha, answer_text, verdicts, judged = row
    contract = contracts.get(advisor)
    if contract is None:
        return "unknown_advisor"
    if payloads != "full" or not (image_sha if contract.input_kind == "image" else text):
        return "payload_not_logged"
    d = decide([tuple(v) for v in json.loads(verdicts or "[]")], answer_text, contract)
    if d.verdict is None:
        if before is not None and before[0] != RETRACTED:  # harvested earlier; no answer now
            conn.execute(f'UPDATE "{ws.jobs_table}" SET "{col["status"]}" = ? WHERE harvested_from = ?',
                         (RETRACTED, request_id))
            return "retracted"
        return d.reason
    analysis = contract.render(d.answer)
    if before is not None:
        if before == (ws.completed_status[0], analysis, d.verdict):
            return "unchanged"
        conn.execute(f'UPDATE "{ws.jobs_table}" SET "{col["status"]}" = ?, "{col["analysis_json"]}" = ?, '
                     f'harvest_verdict = ? WHERE harvested_from = ?',
                     (ws.completed_status[0], analysis, d.verdict, request_id))
        return "updated"
    job = {"job_id": request_id, "advisor": advisor, "status": ws.completed_status[0], "analysis_json": analysis,
           "model": "correction" if d.verdict == "corrected" else f"{advisor}@{served_version or 'base'}",
           "created_at": received_at, "completed_at": judged}
    if contract.input_kind == "image":
        kept = store.path(image_sha)
        if kept is None:
            return "image_not_kept"
        copy = ImageStore(ws.data_path / HARVESTED_DIR).keep(kept.read_bytes(), image_sha)
        job |= {"image_path": f"{HARVESTED_DIR}/{copy.name}", "image_sha256": image_sha, "input_text": text}
    else:
        job["input_text"] = text
    values = {col[k]: v for k, v in job.items() if col.get(k)}
    values |= {"harvested_from": request_id, "served_version": served_version or "base",
               "harvest_verdict": d.verdict}
    names = ", ".join(f'"{k}"' for k in values)
    conn.execute(f'INSERT INTO "{ws.jobs_table}" ({names}) VALUES ({", ".join("?" for _ in values)})',
                 list(values.values()))
    return "harvested"
