"""Automatic rollout: the service moves a canary through its steps by itself.

A route with a `rollout:` policy (mondrian.serve.routing.Rollout) routes between a control and
a candidate arm; the candidate's share is not the file's weights but the rollout's current
step. Its state is the last row of its timeline in `rollout_events` (schema:
mondrian.core.db.service), so it survives restarts and every service process on one database
sees the same share. Every `check_every_s` the control plane asks the judge (passed in by the
CLI: mondrian.ab.rollout.judge) about the evidence since the step began and records the
decision: advance to the next share, promote (after the last step: the `production` alias
moves to the candidate's version), roll back (share 0), or hold (recorded when its reason
changes).

Exactly one decision per step, with several processes: a decision is written as the next
`seq` inside one write transaction that first checks the timeline has not moved; a process
that finds it moved takes the state it finds. Service replicas that each write their own
requests log share one timeline file (`mondrian serve --rollout-db`, SQLite's write lock is
the lock) and judge on all their logs together (`--rollout-evidence`). A promotion moves the
alias inside that same transaction, so a failed move records nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sqlite3
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mondrian.core.db import connect, create_request_tables, has_table
from mondrian.serve.requests_log import now_iso
from mondrian.serve.routing import AdvisorRoute, Rollout

# (db_path, advisor, control arm, candidate arm, since, policy, last_step) -> decision with
# .action ('advance' | 'hold' | 'rollback'), .reason, .evidence
Judge = Callable[[str | Path, str, str, str, str, dict, bool], Any]


@dataclass(frozen=True)
class RolloutState:
    rollout_id: str
    seq: int
    status: str  # running | promoted | rolled_back
    step: int
    share: float  # the candidate's percent of traffic
    step_started_at: str
    action: str
    reason: str | None


def rollout_id(advisor: str, route: AdvisorRoute) -> str:
    """Names one rollout: the advisor, the policy and what the two arms point at (as written:
    `production` stays `production` when a promotion moves it)."""
    r = route.rollout
    refs = {a.name: a.version for a in route.arms}
    key = json.dumps([advisor, asdict(r), refs[r.control], refs[r.candidate]], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _share(r: Rollout, status: str, step: int) -> float:
    return {"running": float(r.steps[step]), "promoted": 100.0, "rolled_back": 0.0}[status]


class Rollouts:
    """Reads and advances rollout timelines in the service's database."""

    def __init__(self, db_path: str | Path, judge: Judge, evidence: list[str | Path] | None = None):
        """`db_path`: where the timeline lives (shared by every replica that serves the route:
        its write transaction is what makes a decision happen once); `evidence`: the requests
        logs the judge reads (every replica's; default: `db_path`)."""
        self.db_path, self.judge = db_path, judge
        self.evidence = evidence or [db_path]
        create_request_tables(db_path)
        self.me = f"{socket.gethostname()}:{os.getpid()}"

    def _latest(self, conn: sqlite3.Connection, rid: str) -> RolloutState | None:
        row = conn.execute("SELECT seq, status, step, share, step_started_at, action, reason FROM rollout_events "
                           "WHERE rollout_id = ? ORDER BY seq DESC LIMIT 1", (rid,)).fetchone()
        return RolloutState(rid, *row) if row else None

    def state(self, advisor: str, route: AdvisorRoute) -> RolloutState:
        """The rollout's current state; its first call writes the `start` event."""
        rid = rollout_id(advisor, route)
        conn = connect(self.db_path, autocommit=True)
        try:
            st = self._latest(conn, rid)
            if st is None:
                now = now_iso()
                r = route.rollout
                conn.execute("INSERT OR IGNORE INTO rollout_events (rollout_id, seq, advisor, at, action, status, "
                             "step, share, step_started_at, control, candidate, reason, decided_by) "
                             "VALUES (?, 1, ?, ?, 'start', 'running', 0, ?, ?, ?, ?, ?, ?)",
                             (rid, advisor, now, float(r.steps[0]), now, r.control, r.candidate,
                              f"canary steps {r.steps} %", self.me))
                st = self._latest(conn, rid)
            return st
        finally:
            conn.close()

    def check(self, advisor: str, route: AdvisorRoute, candidate_version: str | None,
              promote: Callable[[str], None]) -> RolloutState:
        """Judge the current step and record the decision (see the module docstring)."""
        r = route.rollout
        st = self.state(advisor, route)
        if st.status != "running":
            return st
        last = st.step == len(r.steps) - 1
        evidence = self.evidence[0] if len(self.evidence) == 1 else self.evidence
        d = self.judge(evidence, advisor, r.control, r.candidate, st.step_started_at, r.policy(), last)
        if d.action == "hold" and st.action == "hold" and d.reason == st.reason:
            return st  # nothing new to say
        now = now_iso()
        status, step, action, started = "running", st.step, d.action, st.step_started_at
        if d.action == "rollback":
            status = "rolled_back"
        elif d.action == "advance" and last:
            status, action = "promoted", "promote"
        elif d.action == "advance":
            step, started = st.step + 1, now
        conn = connect(self.db_path, autocommit=True)
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                moved = self._latest(conn, st.rollout_id)
                if moved is None or moved.seq != st.seq:  # another process decided this step
                    conn.execute("ROLLBACK")
                    return moved or st
                conn.execute("INSERT INTO rollout_events (rollout_id, seq, advisor, at, action, status, step, share, "
                             "step_started_at, control, candidate, candidate_version, reason, evidence_json, "
                             "decided_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             (st.rollout_id, st.seq + 1, advisor, now, action, status, step,
                              _share(r, status, step), started, r.control, r.candidate, candidate_version,
                              d.reason, json.dumps(d.evidence, default=str), self.me))
                if action == "promote":
                    promote(candidate_version)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return self._latest(conn, st.rollout_id)
        finally:
            conn.close()


def timeline(conn: sqlite3.Connection, advisor: str | None = None) -> list[dict]:
    """Every rollout event (oldest first), for the A/B report."""
    if not has_table(conn, "rollout_events"):
        return []
    cols = ("rollout_id", "seq", "advisor", "at", "action", "status", "step", "share", "candidate_version",
            "reason", "evidence_json", "decided_by")
    where, args = ("WHERE advisor = ?", (advisor,)) if advisor else ("", ())
    rows = conn.execute(f"SELECT {', '.join(cols)} FROM rollout_events {where} ORDER BY at, rollout_id, seq", args)
    out = []
    for row in rows:
        e = dict(zip(cols, row, strict=True))
        e["evidence"] = json.loads(e.pop("evidence_json")) if e["evidence_json"] else None
        out.append(e)
    return out
