"""The analyst's A/B report over the served-requests log (`mondrian ab report`).

`ab_report(db_path, ...)` reads the `requests` table (schema in mondrian.core.db) read-only and
returns a JSON-serializable dict; `format_report` renders it as markdown tables.

Per advisor:
- `arms`: served rows (shadow_of IS NULL) per routing arm, 'pinned' included (clients
  that named advisor@version): requests; compliance (contract_ok = 1 over rows where
  contract_ok is not null; it judges the arm's own answer, even when a fallback answered);
  fallback rate; error rate (error not null or status >= 500, over all rows); latency
  p50 / p95 (ms, all rows with a latency, errors included; linear interpolation); mean
  prompt / completion tokens; counts by served_version ('base' for NULL) over rows that
  returned an answer (status < 400); fallback reasons.
- `comparisons`: every routing arm against the control arm (the arm named 'control',
  else the first alphabetically; `control=` overrides; 'pinned' is never compared):
  compliance difference arm - control with the Newcombe hybrid score 95% interval (the
  one to read; near-100% compliance rates make the Wald interval under-cover), the
  unpooled Wald interval beside it, and the pooled two-proportion z-test p-value.
- `shadow`: shadow rows (shadow_of NOT NULL) per shadowed version (assigned_version):
  the same metrics, plus the paired comparison with the served answer of the request
  each one shadowed (McNemar on the discordant pairs; pairs where both have contract_ok).
- `srm`: the sample-ratio-mismatch check per routing_id seen in the window: observed
  served counts per arm (pinned excluded) against the shares of that config's arm
  weights (routing_configs), chi-square goodness of fit; SRM flagged when p < 0.001, the
  usual threshold (a real split mismatch gives tiny p-values; 0.001 keeps false alarms
  rare when many checks run). The counting unit is the unit of assignment: distinct
  sticky_key for sticky 'user' / 'image' configs (requests of one user are not
  independent draws, and counting them would raise false alarms), requests otherwise.
- `outcomes`, `outcome_comparisons`: what users said of the answers (feedback), per arm, and
  acceptance against control with always-valid and fixed-horizon tests and sequential
  guardrails (mondrian.ab.outcomes).
- `rollout`: the timeline of automatic rollouts (rollout_events): every decision, its share
  and its reason (mondrian.serve.rollout).
- `flags`: the rollback rule of the plan, per arm and per shadow version: error rate
  above 5% or p95 latency above 500 ms, with the reason.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from mondrian.ab.outcomes import (
    Guard,
    arm_outcomes,
    compare,
    format_outcomes,
    guardrails,
    read_units,
)
from mondrian.core.db import (
    PINNED_ARM,
    REQUEST_ERROR_SQL,
    DBError,
    connect,
    connect_union,
    has_table,
)
from mondrian.evaluate.stats import SRM_ALPHA, mcnemar, percentile, srm_chi2, two_proportion_ztest
from mondrian.serve.rollout import timeline

ERROR_RATE_MAX = 0.05  # rollback when an arm's error rate is above this
P95_LATENCY_MAX_MS = 500.0  # ... or its p95 latency is above this
CONTROL_ARM = "control"
METHODS = {"ci": "Newcombe hybrid score (method 10); unpooled Wald beside it",
           "p_value": "two-sided two-proportion z-test, pooled",
           "srm": "chi-square goodness of fit against the routing config's weights",
           "shadow": "McNemar on pairs (shadow run vs the served answer it shadowed)",
           "outcomes": "acceptance from users' feedback; always-valid: asymptotic confidence sequence, "
                       "normal mixture (Waudby-Smith et al., Annals of Statistics 2024); fixed-horizon "
                       "two-proportion z-test beside it; guardrails sequential (mondrian.ab.outcomes)",
           "percentiles": "linear interpolation"}


LOG_TABLES = ("requests", "feedback", "routing_configs", "rollout_events")


def open_log(db_path: str | Path | Sequence[str | Path]) -> sqlite3.Connection:
    """A read-only connection to a database that has the `requests` table; given several
    (service replicas, each writing its own), one connection over all of them
    (`connect_union`), refused when a request id appears in more than one."""
    paths = [db_path] if isinstance(db_path, (str, Path)) else list(db_path)
    for path in paths:
        conn = connect(path, read_only=True)
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        if "requests" not in tables:
            conn.close()
            raise DBError(f"{Path(path)}: no 'requests' table "
                          f"(tables: {', '.join(sorted(tables)) or 'none'}); "
                          "it is written by the advisor service's request log")
        if len(paths) == 1:
            return conn
        conn.close()
    conn = connect_union(paths, LOG_TABLES, distinct=("routing_configs", "rollout_events"))
    twice = conn.execute("SELECT count(*) - count(DISTINCT request_id) FROM requests").fetchone()[0]
    if twice:
        conn.close()
        raise DBError(f"{twice} request ids appear in more than one of {', '.join(map(str, paths))}: "
                      "copies of one log? (each replica writes its own file; ids are unique across them)")
    return conn


def normalize_since(since: str | None) -> str | None:
    """An ISO 8601 date or time (naive = UTC) as the log's UTC format, for comparing with
    received_at; ValueError naming `since`."""
    if since is None:
        return None
    try:
        dt = datetime.fromisoformat(since.strip())
    except ValueError as exc:
        raise ValueError(f"since: not an ISO 8601 date or time: {since!r}") from exc
    dt = dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)
    return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _rate(num: int | None, den: int | None) -> float | None:
    return num / den if den else None


def _metrics(agg: tuple, latencies: list[float], versions: dict, reasons: dict) -> dict:
    n, compliant, judged, fallbacks, errors, prompt, completion, first, last = agg
    compliant, fallbacks, errors = compliant or 0, fallbacks or 0, errors or 0
    return {
        "requests": n,
        "compliant": compliant,
        "judged": judged,  # rows with contract_ok not null: the compliance denominator
        "compliance_rate": _rate(compliant, judged),
        "fallbacks": fallbacks,
        "fallback_rate": _rate(fallbacks, n),
        "errors": errors,
        "error_rate": _rate(errors, n),
        "latency_p50_ms": percentile(latencies, 50),
        "latency_p95_ms": percentile(latencies, 95),
        "mean_prompt_tokens": prompt,
        "mean_completion_tokens": completion,
        "served_versions": dict(sorted(versions.items())),
        "fallback_reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
        "first_at": first,
        "last_at": last,
    }


def _flags(m: dict, error_rate_max: float, p95_max_ms: float) -> list[str]:
    flags = []
    if m["error_rate"] is not None and m["error_rate"] > error_rate_max:
        flags.append(f"error rate {m['error_rate']:.1%} > {error_rate_max:.0%} "
                     f"({m['errors']} of {m['requests']})")
    if m["latency_p95_ms"] is not None and m["latency_p95_ms"] > p95_max_ms:
        flags.append(f"p95 latency {m['latency_p95_ms']:.0f} ms > {p95_max_ms:.0f} ms")
    return flags


def _grouped(conn: sqlite3.Connection, key: str, where: str, params: list) -> dict:
    """Metrics per (advisor, key) for the rows matching `where`."""
    agg = {}
    for row in conn.execute(
            f"SELECT advisor, {key}, count(*), sum(contract_ok = 1), count(contract_ok), "
            f"count(fallback), sum({REQUEST_ERROR_SQL}), avg(prompt_tokens), "
            f"avg(completion_tokens), min(received_at), max(received_at) "
            f"FROM requests WHERE {where} "
            f"GROUP BY advisor, {key}", params):
        agg[(row[0], row[1])] = row[2:]
    lat: dict = {k: [] for k in agg}
    for adv, k, ms in conn.execute(f"SELECT advisor, {key}, latency_ms FROM requests "
                                   f"WHERE {where} AND latency_ms IS NOT NULL", params):
        lat[(adv, k)].append(ms)
    versions: dict = {k: {} for k in agg}
    for adv, k, v, c in conn.execute(
            f"SELECT advisor, {key}, coalesce(served_version, 'base'), count(*) FROM requests "
            f"WHERE {where} AND status < 400 GROUP BY 1, 2, 3", params):
        versions[(adv, k)][v] = c
    reasons: dict = {k: {} for k in agg}
    for adv, k, r, c in conn.execute(
            f"SELECT advisor, {key}, coalesce(fallback_reason, fallback), count(*) FROM requests "
            f"WHERE {where} AND fallback IS NOT NULL GROUP BY 1, 2, 3", params):
        reasons[(adv, k)][r] = c
    return {k: _metrics(agg[k], lat[k], versions[k], reasons[k]) for k in agg}


def _where(advisor: str | None, since: str | None, alias: str = "") -> tuple[list[str], list]:
    clauses, params = [], []
    if advisor is not None:
        clauses.append(f"{alias}advisor = ?")
        params.append(advisor)
    if since is not None:
        clauses.append(f"{alias}received_at >= ?")
        params.append(since)
    return clauses, params


def _srm(conn: sqlite3.Connection, advisor: str | None, since: str | None, alpha: float) -> dict:
    """SRM checks per advisor: {advisor: [check per routing_id]}."""
    clauses, params = _where(advisor, since)
    where = " AND ".join(["shadow_of IS NULL", f"arm <> '{PINNED_ARM}'", *clauses])
    seen: dict = {}
    for adv, rid, arm, n, units, keyless in conn.execute(
            f"SELECT advisor, routing_id, arm, count(*), count(DISTINCT sticky_key), "
            f"sum(sticky_key IS NULL) FROM requests WHERE {where} GROUP BY 1, 2, 3", params):
        seen.setdefault((adv, rid), {})[arm] = (n, units, keyless)
    has_configs = has_table(conn, "routing_configs")
    out: dict = {}
    for (adv, rid), arms in sorted(seen.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")):
        check: dict = {"routing_id": rid, "requests": sum(v[0] for v in arms.values())}
        out.setdefault(adv, []).append(check)
        row = None
        if rid is not None and has_configs:
            row = conn.execute("SELECT config_json FROM routing_configs WHERE routing_id = ?",
                               (rid,)).fetchone()
        if row is None:
            check["note"] = ("rows without a routing_id" if rid is None else
                             "routing config not recorded in routing_configs") + ": not checked"
            check["srm"] = None
            continue
        config = json.loads(row[0])
        weights = {a["name"]: float(a["weight"]) for a in config.get("arms", [])}
        names = list(weights) + sorted(set(arms) - set(weights))
        sticky = config.get("sticky", "none")
        by_key = sticky in ("user", "image") and not any(v[2] for v in arms.values())
        unit = "sticky_key" if by_key else "request"
        observed = [arms.get(a, (0, 0, 0))[1 if by_key else 0] for a in names]
        res = srm_chi2(observed, [weights.get(a, 0.0) for a in names], alpha)
        total = sum(observed)
        check |= {
            "unit": unit,
            "sticky": sticky,
            "arms": {a: {"weight": weights.get(a, 0.0),
                         "expected_share": weights.get(a, 0.0) / sum(weights.values()),
                         "observed": o,
                         "observed_share": o / total if total else None}
                     for a, o in zip(names, observed, strict=True)},
        } | {k: v for k, v in res.to_dict().items() if k not in ("observed", "expected")}
        unknown = sorted(set(arms) - set(weights))
        if unknown:
            check["note"] = f"arm(s) not in the routing config: {', '.join(unknown)}"
        elif sticky in ("user", "image") and not by_key:
            check["note"] = f"sticky '{sticky}' but some rows lack a sticky_key: counted requests"
    return out


def _shadow_pairs(conn: sqlite3.Connection, advisor: str | None, since: str | None) -> dict:
    clauses, params = _where(advisor, since, "s.")
    where = " AND ".join(["s.contract_ok IS NOT NULL", "p.contract_ok IS NOT NULL", *clauses])
    pairs: dict = {}
    for adv, version, served, shadow in conn.execute(
            "SELECT s.advisor, coalesce(s.assigned_version, 'base'), p.contract_ok, s.contract_ok "
            f"FROM requests s JOIN requests p ON p.request_id = s.shadow_of WHERE {where}", params):
        a, b = pairs.setdefault((adv, version), ([], []))
        a.append(served == 1)
        b.append(shadow == 1)
    out = {}
    for key, (served, shadow) in pairs.items():
        n = len(served)
        out[key] = {"pairs": n, "served_compliance": sum(served) / n,
                    "shadow_compliance": sum(shadow) / n,
                    "diff": (sum(shadow) - sum(served)) / n,
                    "mcnemar": mcnemar(served, shadow).to_dict()}
    return out


def ab_report(db_path: str | Path | Sequence[str | Path], advisor: str | None = None, control: str | None = None,
              since: str | None = None, *, error_rate_max: float = ERROR_RATE_MAX,
              p95_max_ms: float = P95_LATENCY_MAX_MS, srm_alpha: float = SRM_ALPHA,
              level: float = 0.95, guard: Guard | None = None) -> dict:
    """The A/B report of the requests log at `db_path`, or of several logs read as one
    (service replicas: `--db a.db --db b.db`; see the module docstring).

    `advisor`: only this advisor; `control`: the control arm's name; `since`: only rows
    received at or after this ISO 8601 time (naive = UTC). Raises mondrian.core.db.DBError
    (a ValueError) for a missing file or a missing `requests` table, ValueError for bad
    arguments (naming them)."""
    since_utc = normalize_since(since)
    conn = open_log(db_path)
    try:
        clauses, params = _where(advisor, since_utc)
        served = _grouped(conn, "arm", " AND ".join(["shadow_of IS NULL", *clauses]), params)
        shadow = _grouped(conn, "coalesce(assigned_version, 'base')",
                          " AND ".join(["shadow_of IS NOT NULL", *clauses]), params)
        pairs = _shadow_pairs(conn, advisor, since_utc)
        srm = _srm(conn, advisor, since_utc, srm_alpha)
        clauses_r, params_r = _where(advisor, since_utc, "r.")
        units = read_units(conn, " AND ".join(clauses_r) or "1", params_r)
        events = timeline(conn, advisor)
    finally:
        conn.close()

    advisors = sorted({a for a, _ in served} | {a for a, _ in shadow} | set(srm) | {e["advisor"] for e in events})
    if control is not None and advisors and not any((a, control) in served for a in advisors):
        arms = sorted({arm for _, arm in served})
        raise ValueError(f"control: no arm '{control}' in the window (arms: {', '.join(arms) or 'none'})")
    report: dict = {
        "db": str(db_path),
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "filters": {"advisor": advisor, "control": control, "since": since_utc},
        "thresholds": {"error_rate_max": error_rate_max, "p95_latency_max_ms": p95_max_ms,
                       "srm_alpha": srm_alpha, "ci_level": level},
        "methods": METHODS,
        "advisors": {},
    }
    for adv in advisors:
        arms = {arm: m for (a, arm), m in sorted(served.items()) if a == adv}
        routed = sorted(a for a in arms if a != PINNED_ARM)
        ctrl = control if control is not None else (
            CONTROL_ARM if CONTROL_ARM in routed else (routed[0] if routed else None))
        entry: dict = {"control": ctrl if ctrl in arms else None, "arms": {}, "comparisons": {},
                       "outcomes": {arm: arm_outcomes(units.get((adv, arm), [])) for arm in arms},
                       "outcome_comparisons": {}, "shadow": {}, "srm": srm.get(adv, []), "flags": {}}
        if ctrl is not None and ctrl not in arms:
            entry["note"] = f"control arm '{ctrl}' has no served rows for this advisor"
        for arm, m in arms.items():
            entry["arms"][arm] = m
            flags = _flags(m, error_rate_max, p95_max_ms)
            if flags:
                entry["flags"][arm] = flags
        if entry["control"] is not None:
            c = arms[ctrl]
            for arm in routed:
                if arm == ctrl:
                    continue
                m = arms[arm]
                test = two_proportion_ztest(c["compliant"], c["judged"], m["compliant"], m["judged"],
                                            level)
                entry["comparisons"][arm] = {"against": ctrl, "metric": "compliance_rate"} | test.to_dict()
                a, b = units.get((adv, ctrl), []), units.get((adv, arm), [])
                entry["outcome_comparisons"][arm] = {"against": ctrl} | compare(a, b, 1 - level, level=level) | {
                    "guardrails": guardrails(a, b, guard or Guard(p95_latency_ms=p95_max_ms), 1 - level)}
        for (a, version), m in sorted(shadow.items()):
            if a != adv:
                continue
            entry["shadow"][version] = m | {"paired": pairs.get((adv, version))}
            flags = _flags(m, error_rate_max, p95_max_ms)
            if flags:
                entry["flags"][f"shadow:{version}"] = flags
        entry["srm_detected"] = any(ch.get("srm") for ch in entry["srm"])
        entry["rollout"] = [e for e in events if e["advisor"] == adv]
        report["advisors"][adv] = entry
    return report


def _pct(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def _num(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _pval(p: float | None) -> str:
    if p is None:
        return "-"
    return f"{p:.2e}" if p < 1e-4 else f"{p:.4f}"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
            + ["| " + " | ".join(r) + " |" for r in rows])


def format_report(report: dict) -> str:
    """The report as markdown: per advisor, the arms, the comparisons with control, the
    shadow versions, the split check and the rollback flags."""
    f = report["filters"]
    t = report["thresholds"]
    lines = [f"# A/B report: {report['db']}", ""]
    window = ", ".join(f"{k} {v}" for k, v in f.items() if v is not None)
    lines.append(f"Filters: {window or 'none'}. Served rows only unless marked shadow. "
                 f"Rollback rule: error rate > {t['error_rate_max']:.0%} or p95 latency > "
                 f"{t['p95_latency_max_ms']:.0f} ms. SRM when p < {t['srm_alpha']}.")
    if not report["advisors"]:
        lines += ["", "No requests in the window."]
    for adv, e in report["advisors"].items():
        lines += ["", f"## {adv}", ""]
        rows = []
        for arm, m in e["arms"].items():
            versions = ", ".join(f"{v} {c}" for v, c in m["served_versions"].items()) or "-"
            rows.append([arm + (" (control)" if arm == e["control"] and arm != CONTROL_ARM else ""),
                         str(m["requests"]),
                         _pct(m["compliance_rate"]), _pct(m["fallback_rate"]), _pct(m["error_rate"]),
                         _num(m["latency_p50_ms"]), _num(m["latency_p95_ms"]),
                         _num(m["mean_prompt_tokens"], 1), _num(m["mean_completion_tokens"], 1),
                         versions])
        if rows:
            lines += _table(["arm", "requests", "compliance", "fallback", "errors", "p50 ms",
                             "p95 ms", "prompt tok", "compl. tok", "served versions"], rows)
        if e.get("note"):
            lines += ["", f"Note: {e['note']}"]
        if e["comparisons"]:
            level = int(round(100 * report["thresholds"]["ci_level"]))
            rows = []
            for arm, c in e["comparisons"].items():
                nc, wd = c["ci_newcombe"], c["ci_wald"]
                rows.append([f"{arm} - {c['against']}",
                             f"{_pct(c['p_b'])} vs {_pct(c['p_a'])}",
                             "-" if c["diff"] is None else f"{100 * c['diff']:+.2f} pp",
                             "-" if nc is None else f"[{100 * nc[0]:+.2f}, {100 * nc[1]:+.2f}]",
                             "-" if wd is None else f"[{100 * wd[0]:+.2f}, {100 * wd[1]:+.2f}]",
                             _pval(c["p_value"])])
            lines += ["", "Compliance against control:", ""]
            lines += _table(["arm", "compliance", "difference", f"{level}% CI (Newcombe)",
                             f"{level}% CI (Wald)", "p (z-test)"], rows)
        if e["shadow"]:
            rows = []
            for version, m in e["shadow"].items():
                p = m["paired"]
                paired = ("-" if not p else
                          f"{p['pairs']} pairs: shadow {_pct(p['shadow_compliance'])} vs served "
                          f"{_pct(p['served_compliance'])}, McNemar p {_pval(p['mcnemar']['p_value'])}")
                rows.append([version, str(m["requests"]), _pct(m["compliance_rate"]),
                             _pct(m["error_rate"]), _num(m["latency_p50_ms"]),
                             _num(m["latency_p95_ms"]), paired])
            lines += ["", "Shadow runs:", ""]
            lines += _table(["version", "runs", "compliance", "errors", "p50 ms", "p95 ms",
                             "paired with served"], rows)
        if e["srm"]:
            lines += ["", "Sample ratio (pinned requests excluded):", ""]
            for ch in e["srm"]:
                rid = ch["routing_id"] or "(no routing_id)"
                if ch.get("srm") is None:
                    lines.append(f"- {rid}: {ch['note']}")
                    continue
                split = ", ".join(f"{a} {v['observed']} ({_pct(v['observed_share'])} vs "
                                  f"{_pct(v['expected_share'])})" for a, v in ch["arms"].items())
                verdict = "SRM DETECTED" if ch["srm"] else "ok"
                lines.append(f"- {rid}: {verdict}, p {_pval(ch['p_value'])}; "
                             f"{split}; unit {ch['unit']}"
                             + (f"; {ch['note']}" if ch.get("note") else ""))
        lines += format_outcomes(e)
        if e.get("rollout"):
            lines += ["", "Rollout timeline (rollout_events):", ""]
            lines += _table(["at", "rollout", "action", "share", "reason", "decided by"],
                            [[ev["at"], ev["rollout_id"][:8], ev["action"], f"{ev['share']:g}%", ev["reason"] or "-",
                              ev["decided_by"] or "-"] for ev in e["rollout"]])
        lines += ["", "Rollback flags:" if e["flags"] else "Rollback flags: none"]
        for arm, flags in e["flags"].items():
            lines.append(f"- {arm}: {'; '.join(flags)}")
    return "\n".join(lines) + "\n"
