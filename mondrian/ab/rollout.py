"""The rollout judge: advance, hold, roll back or promote a canary, from the evidence of the
current step (the requests and feedback since the step began), with always-valid tests
(mondrian.ab.outcomes, mondrian.ab.sequential), so checking after every request is as valid as
checking once. The service's rollout loop (mondrian.serve.rollout) calls it and records what
it decided; it is passed in as a function, so the service never imports the A/B package.

- rollback: a guardrail shows harm (its whole interval above its margin), or the candidate is
  worse than control on the decision metric (acceptance, or compliance for advisors without
  feedback: the interval wholly below 0);
- hold: fewer than `min_samples` requests with a value of the metric on either arm; or, on the last step, the
  candidate is not yet better (with `promote_when: better`);
- advance (the last step: promote): enough evidence, no harm, not worse, and on the last step
  better (or merely not worse with `promote_when: no_harm`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mondrian.ab.outcomes import Guard, compare, guardrails, metric_values, read_units
from mondrian.ab.report import open_log


@dataclass
class Decision:
    action: str  # advance | hold | rollback (advance on the last step promotes)
    reason: str
    evidence: dict = field(default_factory=dict)


def judge(db_path: str | Path | Sequence[str | Path], advisor: str, control: str, candidate: str, since: str, policy: dict,
          last_step: bool) -> Decision:
    """Decide one rollout step from the rows received at or after `since` (ISO UTC), in one
    requests log or several (service replicas' logs, read as one).
    `policy`: min_samples, alpha, promote_when, guardrails (margins, p95_latency_ms)."""
    conn = open_log(db_path)
    try:
        units = read_units(conn, "r.advisor = ? AND r.received_at >= ? AND r.arm IN (?, ?)",
                           (advisor, since, control, candidate))
    finally:
        conn.close()
    a, b = units.get((advisor, control), []), units.get((advisor, candidate), [])
    alpha, need = policy.get("alpha", 0.05), policy.get("min_samples", 200)
    metric = policy.get("metric", "acceptance_rate")
    n_star = 2 * need  # the sequences are tightest where the step expects to decide
    cmp = compare(a, b, alpha, n_star, level=1 - alpha, metric=metric)
    guards = guardrails(a, b, Guard(**policy.get("guardrails", {})), alpha, n_star)
    judged = (len(metric_values(a, metric)), len(metric_values(b, metric)))
    evidence = {"since": since, "served": [len(a), len(b)], "judged": list(judged), "metric": metric,
                "acceptance": cmp["sequential"], "decision": cmp["decision"],
                "fixed_horizon_p": cmp["fixed_horizon"]["p_value"],
                "guardrails": {k: {"status": g["status"], "estimate": g["estimate"], "low": g["low"],
                                   "high": g["high"], "margin": g["margin"]} for k, g in guards.items()}}
    harm = [k for k, g in guards.items() if g["status"] == "harm"]
    if harm:
        return Decision("rollback", f"guardrail harm: {', '.join(harm)}", evidence)
    if cmp["decision"] == "worse":
        return Decision("rollback", f"{metric} worse than control (always-valid interval below 0)", evidence)
    if min(judged) < need:
        return Decision("hold", f"collecting evidence: fewer than {need} requests with a {metric} on an arm",
                        evidence)
    if last_step and policy.get("promote_when", "better") == "better" and cmp["decision"] != "better":
        return Decision("hold", "not yet better than control: promotion waits for the interval to clear 0",
                        evidence)
    return Decision("advance", "better than control" if cmp["decision"] == "better" else
                    "enough evidence, no harm, not worse", evidence)
