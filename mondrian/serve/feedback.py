"""Feedback on served requests: what a user said about an answer, kept in the `feedback` and
`feedback_history` tables (schema: mondrian.core.db.service).

A verdict is `accepted` (the answer was right), `rejected` (it was wrong) or `corrected` (it
was wrong, and here is the right answer, which must meet the advisor's contract). One user has
one current verdict per request: sending the same verdict again changes nothing (idempotent),
a different one replaces it and the old one stays in `feedback_history`. Only requests the
service answered take feedback (not shadow runs, not errors). `POST
/v1/requests/{request_id}/feedback` and `mondrian feedback` both come here.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

from mondrian.core.contracts import Advisor
from mondrian.core.db import VERDICTS, connect, create_request_tables
from mondrian.serve.errors import ServiceError
from mondrian.serve.requests_log import now_iso

FIELDS = ("verdict", "answer", "user")


@dataclass(frozen=True)
class Verdict:
    verdict: str
    answer: dict | None = None  # the correction (verdict 'corrected' only)
    user: str = ""  # '' = anonymous: all anonymous feedback on a request is one voice

    @classmethod
    def from_body(cls, body: dict) -> Verdict:
        """The verdict in a feedback body; ServiceError 400 naming the field."""
        unknown = sorted(set(body) - set(FIELDS))
        if unknown:
            raise ServiceError(400, f"unknown field(s) {', '.join(unknown)} (known: {', '.join(FIELDS)})")
        verdict, answer, user = body.get("verdict"), body.get("answer"), body.get("user")
        if verdict not in VERDICTS:
            raise ServiceError(400, f"field 'verdict' must be one of {', '.join(VERDICTS)}, got {verdict!r}")
        if user is not None and not isinstance(user, str):
            raise ServiceError(400, f"field 'user' must be a string, got {type(user).__name__}")
        if verdict == "corrected":
            if not isinstance(answer, dict):
                raise ServiceError(400, "field 'answer' (a JSON object: the right answer) is required "
                                        "with verdict 'corrected'")
        elif answer is not None:
            raise ServiceError(400, f"field 'answer' goes with verdict 'corrected' only, not {verdict!r}")
        return cls(verdict, answer, user or "")


class FeedbackStore:
    """Writes verdicts into the requests database (one connection, one writer at a time)."""

    def __init__(self, db_path: str | Path, contracts: dict[str, Advisor]):
        self.contracts = contracts
        self._conn = connect(db_path, create=True, autocommit=True, check_same_thread=False)
        create_request_tables(self._conn)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def record(self, request_id: str, v: Verdict) -> dict:
        """Record `v` on a served request; the current verdict with `changed` (False when it
        repeats the current one). 404 for an unknown request, 422 naming the JSON path for a
        correction that breaks the contract."""
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                out = self._record(conn, request_id, v)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return out

    def _record(self, conn, request_id: str, v: Verdict) -> dict:
        row = conn.execute("SELECT advisor, status, shadow_of FROM requests WHERE request_id = ?",
                           (request_id,)).fetchone()
        if row is None or row[2] is not None:
            raise ServiceError(404, f"no served request {request_id!r} (feedback is for the ids the "
                                    "service returned; shadow runs take none)")
        advisor, status, _ = row
        if status >= 400:
            raise ServiceError(409, f"request {request_id!r} returned no answer (HTTP {status}); "
                                    "there is nothing to judge")
        answer_json = None
        if v.answer is not None:
            contract = self.contracts.get(advisor)
            if contract is None:
                raise ServiceError(409, f"request {request_id!r} is for advisor {advisor!r}, whose contract "
                                        "is not known here")
            problems = contract.violations(v.answer)
            if problems:
                raise ServiceError(422, f"the correction breaks {advisor}'s contract at {problems[0].path}: "
                                        f"{problems[0].message}" + (f" (+{len(problems) - 1} more)"
                                                                    if len(problems) > 1 else ""))
            answer_json = contract.render(v.answer)
        now = now_iso()
        cur = conn.execute("SELECT verdict, answer_json, revision, created_at FROM feedback "
                           "WHERE request_id = ? AND user = ?", (request_id, v.user)).fetchone()
        if cur is not None and (cur[0], cur[1]) == (v.verdict, answer_json):
            return self._current(conn, request_id, v.user) | {"changed": False}
        revision = (cur[2] if cur else 0) + 1
        conn.execute("INSERT INTO feedback (request_id, user, advisor, verdict, answer_json, revision, created_at, "
                     "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (request_id, user) DO UPDATE SET "
                     "verdict = excluded.verdict, answer_json = excluded.answer_json, revision = excluded.revision, "
                     "updated_at = excluded.updated_at",
                     (request_id, v.user, advisor, v.verdict, answer_json, revision, now, now))
        conn.execute("INSERT INTO feedback_history (request_id, user, revision, verdict, answer_json, at) "
                     "VALUES (?, ?, ?, ?, ?, ?)", (request_id, v.user, revision, v.verdict, answer_json, now))
        return self._current(conn, request_id, v.user) | {"changed": True}

    @staticmethod
    def _current(conn, request_id: str, user: str) -> dict:
        cols = ("request_id", "user", "advisor", "verdict", "answer_json", "revision", "created_at", "updated_at")
        row = conn.execute(f"SELECT {', '.join(cols)} FROM feedback WHERE request_id = ? AND user = ?",
                           (request_id, user)).fetchone()
        out = dict(zip(cols, row, strict=True))
        out["answer"] = json.loads(out.pop("answer_json")) if out["answer_json"] else None
        return out
