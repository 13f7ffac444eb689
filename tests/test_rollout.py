"""Automatic rollout on a real SQLite file with the real judge (mondrian.ab.rollout): it holds
until the evidence is in, advances step by step, promotes, rolls back on harm or on a worse
candidate, writes each decision with its evidence, and several processes racing on one
database take each decision exactly once. tests/test_service.py runs it inside the service."""

from __future__ import annotations

import json
import sqlite3
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from mondrian.ab.report import ab_report, format_report
from mondrian.ab.rollout import judge
from mondrian.core.config import from_dict
from mondrian.core.db import create_request_tables
from mondrian.serve.rollout import Rollouts
from mondrian.serve.routing import AdvisorRoute, RoutingConfig

ADV = "fit-query"
LATER = "2099-01-01T00:00:00.000Z"  # rows dated after every step's start count for every step


def _route(**rollout) -> AdvisorRoute:
    return from_dict(AdvisorRoute, {
        "arms": [{"name": "control", "version": "production", "weight": 1},
                 {"name": "candidate", "version": "v2", "weight": 1}],
        "rollout": {"steps": [10, 50], "min_samples": 30, "check_every_s": 0.1} | rollout}, "route")


def _traffic(db: Path, accepted: dict[str, int], n: int = 40, errors: dict[str, int] | None = None,
             start: int = 0, compliant: dict[str, int] | None = None, feedback: bool = True) -> None:
    """n served requests an arm, the first `accepted[arm]` accepted and the rest rejected (and
    the first `compliant[arm]` meeting the contract; all by default)."""
    create_request_tables(db)
    conn = sqlite3.connect(db)
    with conn:
        for arm in ("control", "candidate"):
            for i in range(n):
                rid = f"{arm}-{start + i}"
                err = i < (errors or {}).get(arm, 0)
                row = {"request_id": rid, "received_at": LATER, "advisor": ADV, "endpoint": "analyze", "arm": arm,
                       "base_fingerprint": "fp", "status": 500 if err else 200,
                       "contract_ok": None if err else int(i < (compliant or {}).get(arm, n)),
                       "error": "boom" if err else None, "latency_ms": 50.0}
                conn.execute(f"INSERT INTO requests ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                             list(row.values()))
                if not err and feedback:
                    verdict = "accepted" if i < accepted[arm] else "rejected"
                    conn.execute("INSERT INTO feedback VALUES (?, '', ?, ?, NULL, 1, ?, ?)", (rid, ADV, verdict, LATER, LATER))
    conn.close()


def _events(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT seq, action, status, step, share FROM rollout_events ORDER BY seq").fetchall()


def test_holds_then_advances_then_promotes(tmp_path):
    db = tmp_path / "m.db"
    route, promoted = _route(), []
    ro = Rollouts(db, judge)
    assert ro.state(ADV, route).share == 10.0  # the start event: the first step
    st = ro.check(ADV, route, "v2", promoted.append)
    assert st.action == "hold" and "collecting evidence" in st.reason
    assert ro.check(ADV, route, "v2", promoted.append).seq == st.seq  # the same hold is not written again
    _traffic(db, {"control": 20, "candidate": 38})  # 50% vs 95% accepted, 40 judged an arm
    assert ro.check(ADV, route, "v2", promoted.append).action == "advance"
    st = ro.check(ADV, route, "v2", promoted.append)
    assert (st.action, st.status, st.share) == ("promote", "promoted", 100.0) and promoted == ["v2"]
    assert _events(db) == [(1, "start", "running", 0, 10.0), (2, "hold", "running", 0, 10.0),
                           (3, "advance", "running", 1, 50.0), (4, "promote", "promoted", 1, 100.0)]
    ev = json.loads(sqlite3.connect(db).execute("SELECT evidence_json FROM rollout_events WHERE seq = 4").fetchone()[0])
    assert ev["judged"] == [40, 40] and ev["decision"] == "better" and ev["acceptance"]["low"] > 0
    md = format_report(ab_report(db))
    assert "Rollout timeline" in md and "| promote | 100% |" in md


@pytest.mark.parametrize("accepted, errors, reason", [
    ({"control": 38, "candidate": 10}, None, "acceptance_rate worse than control"),
    ({"control": 30, "candidate": 30}, {"control": 0, "candidate": 12}, "guardrail harm: error_rate"),
])
def test_rolls_back_a_worse_or_harmful_candidate(tmp_path, accepted, errors, reason):
    db = tmp_path / "m.db"
    _traffic(db, accepted, errors=errors)
    st = Rollouts(db, judge).check(ADV, _route(guardrails={"error_rate": 0.02}), "v2", lambda v: None)
    assert (st.action, st.status, st.share) == ("rollback", "rolled_back", 0.0) and reason in st.reason
    assert Rollouts(db, judge).check(ADV, _route(guardrails={"error_rate": 0.02}), "v2", lambda v: None).seq == st.seq


def test_last_step_waits_for_better_unless_no_harm_is_enough(tmp_path):
    db = tmp_path / "m.db"
    _traffic(db, {"control": 30, "candidate": 31})  # no real difference
    better = Rollouts(db, judge)
    assert better.check(ADV, _route(steps=[50]), "v2", lambda v: None).reason.startswith("not yet better")
    st = Rollouts(db, judge).check(ADV, _route(steps=[50], promote_when="no_harm"), "v2", lambda v: None)
    assert st.status == "promoted"


def test_a_rollout_policy_is_checked():
    with pytest.raises(ValueError, match="exactly two arms"):
        from_dict(AdvisorRoute, {"arms": [{"name": "a"}], "rollout": {}}, "route")
    for bad, msg in (({"steps": [50, 10]}, "increasing"), ({"promote_when": "soon"}, "promote_when"),
                     ({"guardrails": {"latency": 1}}, "unknown"), ({"min_samples": 0}, "min_samples")):
        with pytest.raises(ValueError, match=msg):
            _route(**bad)
    assert isinstance(from_dict(RoutingConfig, {"advisors": {ADV: {"arms": [{"name": "control"}, {"name": "candidate"}],
                                                                   "rollout": {}}}}, "r").advisors[ADV], AdvisorRoute)


def _race(db: str, calls: int) -> list[str]:
    ro = Rollouts(db, judge)
    route = _route(steps=[5, 25, 50])
    return [ro.check(ADV, route, "v2", lambda v: None).action for _ in range(calls)]


def test_several_processes_take_each_decision_once(tmp_path):
    db = tmp_path / "m.db"
    _traffic(db, {"control": 20, "candidate": 38})
    with ProcessPoolExecutor(4) as pool:
        seen = [a for got in pool.map(_race, [str(db)] * 4, [15] * 4) for a in got]
    events = _events(db)
    assert [e[1] for e in events] == ["start", "advance", "advance", "promote"]  # one decision per step
    assert [e[0] for e in events] == [1, 2, 3, 4] and set(seen) <= {"start", "advance", "promote"}


def test_compliance_can_be_the_decision_metric_without_feedback(tmp_path):
    db = tmp_path / "m.db"
    _traffic(db, {"control": 0, "candidate": 0}, compliant={"control": 16, "candidate": 39}, feedback=False)
    acceptance = Rollouts(db, judge).check(ADV, _route(), "v2", lambda v: None)
    assert acceptance.action == "hold" and "acceptance_rate" in acceptance.reason  # nobody judged anything
    st = Rollouts(db, judge).check(ADV, _route(metric="compliance_rate"), "v2", lambda v: None)
    assert st.action == "advance" and st.share == 50.0
    with pytest.raises(ValueError, match="rollout.metric"):
        _route(metric="latency")
