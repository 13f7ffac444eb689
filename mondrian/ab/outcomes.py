"""Outcome A/B: is the candidate *right* more often? From the users' feedback on served answers
(the `feedback` table, mondrian.serve.feedback), per arm:

- coverage: served requests with any feedback / served requests;
- acceptance rate: requests every judge accepted / judged requests (the decision metric); for
  traffic with known answers (the demo's simulated users accept exactly-right answers and
  correct the rest) it is the exact-match rate;
- correction and rejection rates (a request with a correction counts as corrected);
- field accuracy against corrections: over corrected requests whose served answer was logged
  (log_payloads full) and is a JSON object, the share of fields (of either answer) that the
  served answer had right, overall and per field.

Each routed arm is compared with control on acceptance by an always-valid confidence sequence
(mondrian.ab.sequential) with the fixed-horizon z-test and Newcombe interval beside it (valid
only for one look at a sample size fixed in advance). Guardrails are sequential too, candidate
minus control, over served rows: error rate, fallback rate and contract failures (a guardrail
is `harm` when its whole interval is above the margin, `ok` when its whole interval is below
it, `pending` otherwise), and p95 latency as the share of requests slower than the limit
(`harm` when that share's interval is wholly above 5%, `ok` when wholly below).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

from mondrian.ab.sequential import DEFAULT_N_STAR, SequentialResult, diff_cs, mean_cs
from mondrian.core.db import REQUEST_ERROR_SQL, has_table
from mondrian.evaluate.stats import two_proportion_ztest
from mondrian.serve.routing import ROLLOUT_METRICS

SLOW_SHARE_MAX = 0.05  # p95 latency <= the limit  <=>  at most 5% of requests slower than it


@dataclass
class Guard:
    """Margins: how much worse than control (absolute rate difference) a candidate may be."""

    error_rate: float = 0.0
    fallback_rate: float = 0.0
    contract_failure_rate: float = 0.0
    p95_latency_ms: float = 500.0


def _verdict(verdicts: list[str]) -> str:
    if "corrected" in verdicts:
        return "corrected"
    return "accepted" if set(verdicts) == {"accepted"} else "rejected"


def _fields(served: str | None, correction: str | None) -> dict[str, bool] | None:
    try:
        a, b = json.loads(served or ""), json.loads(correction or "")
    except ValueError:
        return None
    if not isinstance(a, dict) or not isinstance(b, dict):
        return None
    return {k: a.get(k) == b.get(k) for k in sorted(set(a) | set(b))}


def read_units(conn: sqlite3.Connection, where: str, params: Sequence) -> dict[tuple[str, str], list[dict]]:
    """(advisor, arm) -> one dict per served row: judged verdict (or None), error, fallback,
    contract failure, latency, and the field checks against a correction."""
    feedback = ("(SELECT json_group_array(json_array(f.verdict, f.answer_json)) FROM feedback f "
                "WHERE f.request_id = r.request_id)") if has_table(conn, "feedback") else "NULL"
    # a log written before payloads were kept has no answer_text (the report opens it read-only)
    answer = "r.answer_text" if any(c[1] == "answer_text" for c in conn.execute("PRAGMA table_info(requests)")) \
        else "NULL"
    out: dict[tuple[str, str], list[dict]] = {}
    rows = conn.execute(
        f"SELECT r.advisor, r.arm, {REQUEST_ERROR_SQL}, r.fallback IS NOT NULL, r.contract_ok, r.latency_ms, "
        f"r.status, {answer}, {feedback} FROM requests r WHERE r.shadow_of IS NULL AND {where} "
        "ORDER BY r.received_at", list(params))
    for advisor, arm, error, fallback, contract_ok, latency, status, answer, fb in rows:
        votes = json.loads(fb) if fb else []
        verdict = _verdict([v for v, _ in votes]) if votes and status < 400 else None
        correction = next((a for v, a in votes if v == "corrected"), None)
        out.setdefault((advisor, arm), []).append({
            "verdict": verdict, "error": bool(error), "fallback": bool(fallback),
            "contract_failed": None if contract_ok is None else contract_ok == 0, "latency_ms": latency,
            "fields": _fields(answer, correction) if verdict == "corrected" else None})
    return out


def arm_outcomes(units: list[dict]) -> dict:
    served = len(units)
    judged = [u["verdict"] for u in units if u["verdict"] is not None]
    counts = {k: judged.count(k) for k in ("accepted", "corrected", "rejected")}
    checks = [u["fields"] for u in units if u["fields"] is not None]
    per_field: dict[str, list[bool]] = {}
    for c in checks:
        for k, ok in c.items():
            per_field.setdefault(k, []).append(ok)
    cells = [ok for c in checks for ok in c.values()]
    return {
        "served": served, "judged": len(judged), "coverage": len(judged) / served if served else None,
        **counts,
        "acceptance_rate": counts["accepted"] / len(judged) if judged else None,
        "correction_rate": counts["corrected"] / len(judged) if judged else None,
        "rejection_rate": counts["rejected"] / len(judged) if judged else None,
        "field_accuracy_vs_corrections": sum(cells) / len(cells) if cells else None,
        "corrections_compared": len(checks),
        "per_field": {k: sum(v) / len(v) for k, v in sorted(per_field.items())},
    }


def _status(r: SequentialResult, margin: float) -> str:
    if r.low is None:
        return "pending"
    if r.low > margin:
        return "harm"
    return "ok" if r.high < margin else "pending"


def guardrails(control: list[dict], arm: list[dict], guard: Guard, alpha: float = 0.05,
               n_star: int = DEFAULT_N_STAR) -> dict:
    """Each guardrail's always-valid interval (candidate - control, or the candidate's slow
    share) and its status."""
    out = {}
    for name, key, margin in (("error_rate", "error", guard.error_rate),
                              ("fallback_rate", "fallback", guard.fallback_rate),
                              ("contract_failure_rate", "contract_failed", guard.contract_failure_rate)):
        a = [float(u[key]) for u in control if u[key] is not None]
        b = [float(u[key]) for u in arm if u[key] is not None]
        r = diff_cs(a, b, alpha, n_star)
        out[name] = {"margin": margin, "status": _status(r, margin)} | r.to_dict()
    slow = [float(u["latency_ms"] > guard.p95_latency_ms) for u in arm if u["latency_ms"] is not None]
    r = mean_cs(slow, alpha, n_star)
    out["slow_rate"] = {"margin": SLOW_SHARE_MAX, "limit_ms": guard.p95_latency_ms,
                        "status": _status(r, SLOW_SHARE_MAX)} | r.to_dict()
    return out


def metric_values(units: list[dict], metric: str = "acceptance_rate") -> list[float]:
    """One 0/1 value per unit that has one: acceptance (judged requests) or compliance (the
    arm's own answer met the contract; for advisors without feedback)."""
    if metric == "acceptance_rate":
        return [float(u["verdict"] == "accepted") for u in units if u["verdict"] is not None]
    if metric == "compliance_rate":
        return [float(not u["contract_failed"]) for u in units if u["contract_failed"] is not None]
    raise ValueError(f"metric {metric!r} must be one of {', '.join(ROLLOUT_METRICS)}")


def compare(control: list[dict], arm: list[dict], alpha: float = 0.05, n_star: int = DEFAULT_N_STAR,
            level: float = 0.95, metric: str = "acceptance_rate") -> dict:
    """`metric` of `arm` against `control`: the always-valid result and, beside it, the
    fixed-horizon z-test (read it only for a sample size fixed in advance)."""
    a, b = metric_values(control, metric), metric_values(arm, metric)
    seq = diff_cs(a, b, alpha, n_star)
    fixed = two_proportion_ztest(int(sum(a)), len(a), int(sum(b)), len(b), level)
    return {"metric": metric, "sequential": seq.to_dict(),
            "decision": ("better" if seq.low is not None and seq.low > 0 else
                         "worse" if seq.high is not None and seq.high < 0 else "undecided"),
            "fixed_horizon": fixed.to_dict()}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _interval(r: dict) -> str:
    return "-" if r.get("low") is None else f"[{100 * r['low']:+.1f}, {100 * r['high']:+.1f}] pp"


def format_outcomes(entry: dict) -> list[str]:
    """Markdown lines for one advisor's outcome section (empty when nobody gave feedback)."""
    outcomes = entry.get("outcomes") or {}
    if not any(m["judged"] for m in outcomes.values()):
        return ["", "Outcomes: no feedback in the window (POST /v1/requests/{id}/feedback)."]
    lines = ["", "Outcomes (users' feedback):", "", "| arm | served | judged | coverage | accepted | corrected | "
             "rejected | field acc. vs corrections |", "|---|---|---|---|---|---|---|---|"]
    for arm, m in outcomes.items():
        lines.append(f"| {arm} | {m['served']} | {m['judged']} | {_pct(m['coverage'])} | {_pct(m['acceptance_rate'])} "
                     f"| {_pct(m['correction_rate'])} | {_pct(m['rejection_rate'])} | "
                     f"{_pct(m['field_accuracy_vs_corrections'])} ({m['corrections_compared']}) |")
    comparisons = entry.get("outcome_comparisons") or {}
    if comparisons:
        lines += ["", "Acceptance against control: always-valid confidence sequence (read it at any time), "
                      "fixed-horizon z-test beside it (one look at a planned size only):", "",
                  "| arm | difference | always-valid 95% | p (always-valid) | decision | p (z-test) | guardrails |",
                  "|---|---|---|---|---|---|---|"]
        for arm, c in comparisons.items():
            s, f = c["sequential"], c["fixed_horizon"]
            diff = "-" if s["estimate"] is None else f"{100 * s['estimate']:+.1f} pp"
            guards = ", ".join(f"{k} {g['status']}" for k, g in c["guardrails"].items())
            p_seq = "-" if s["p_value"] is None else f"{s['p_value']:.4f}"
            p_fix = "-" if f["p_value"] is None else f"{f['p_value']:.4f}"
            lines.append(f"| {arm} - {c['against']} | {diff} | {_interval(s)} | {p_seq} | {c['decision']} | "
                         f"{p_fix} | {guards} |")
    return lines
