"""The A/B report on crafted request logs, its statistics against independent formulas, the CLI."""

import json
import math
import sqlite3

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import stats as sps

from mondrian.ab.report import ab_report, format_report, normalize_since
from mondrian.cli import cli
from mondrian.core.db import REQUEST_COLUMNS, DBError, create_request_tables
from mondrian.evaluate.stats import chi2_sf, srm_chi2, two_proportion_ztest, wilson_interval
from mondrian.serve.requests_log import record_routing

FIFTY_FIFTY = {"arms": [{"name": "control", "version": "v1", "weight": 50},
                        {"name": "treatment", "version": "v2", "weight": 50}],
               "shadow": None, "sticky": "none", "fallback": "production"}


class Log:
    """Rows written straight into a real SQLite file (the request-log schema of mondrian.core.db)."""

    def __init__(self, path):
        self.path = path
        self.rows = []
        self.n = 0

    def add(self, k=1, **kw):
        for _ in range(k):
            self.n += 1
            r = {"request_id": f"q{self.n}", "received_at": f"2026-11-22T09:{self.n % 60:02d}:00.000Z",
                 "advisor": "fit-query", "endpoint": "analyze", "arm": "control",
                 "assigned_version": "v1", "served_version": "v1", "base_fingerprint": "fp",
                 "routing_id": "r1", "status": 200, "contract_ok": 1, "latency_ms": 100.0,
                 "prompt_tokens": 50, "completion_tokens": 20} | kw
            self.rows.append(tuple(r.get(c) for c in REQUEST_COLUMNS))

    def save(self):
        conn = sqlite3.connect(self.path)
        create_request_tables(conn)
        with conn:
            conn.executemany(f"INSERT INTO requests VALUES ({','.join('?' * len(REQUEST_COLUMNS))})", self.rows)
        conn.close()
        return self.path


def wald_and_newcombe(xa, na, xb, nb, level=0.95):
    """Independent textbook formulas (Newcombe 1998, method 10), with scipy's normal quantile."""
    z = sps.norm.ppf(1 - (1 - level) / 2)
    pa, pb = xa / na, xb / nb
    d = pb - pa
    se = math.sqrt(pa * (1 - pa) / na + pb * (1 - pb) / nb)

    def wilson(x, n):
        p = x / n
        c = (2 * n * p + z**2) / (2 * (n + z**2))
        h = z * math.sqrt(z**2 + 4 * n * p * (1 - p)) / (2 * (n + z**2))
        return c - h, c + h

    la, ua = wilson(xa, na)
    lb, ub = wilson(xb, nb)
    newcombe = (d - math.sqrt((pb - lb) ** 2 + (ua - pa) ** 2), d + math.sqrt((ub - pb) ** 2 + (pa - la) ** 2))
    pool = (xa + xb) / (na + nb)
    zstat = d / math.sqrt(pool * (1 - pool) * (1 / na + 1 / nb))
    return d, (d - z * se, d + z * se), newcombe, 2 * sps.norm.sf(abs(zstat))


@pytest.mark.parametrize("xa, na, xb, nb", [(900, 1000, 930, 1000), (80, 100, 90, 100),
                                             (3, 40, 12, 55), (99, 100, 100, 100), (0, 10, 4, 12)])
def test_two_proportion_ztest_matches_independent_formulas(xa, na, xb, nb):
    res = two_proportion_ztest(xa, na, xb, nb)
    d, wald, newcombe, p = wald_and_newcombe(xa, na, xb, nb)
    assert res.diff == pytest.approx(d)
    assert res.ci_wald == pytest.approx(wald)
    assert res.ci_newcombe == pytest.approx(newcombe)
    assert res.p_value == pytest.approx(p, rel=1e-9)
    lo, hi = wilson_interval(xa, na)
    assert lo <= xa / na <= hi


def test_two_proportion_edge_cases():
    same = two_proportion_ztest(50, 50, 70, 70)  # both 100%: nothing to test
    assert (same.diff, same.z, same.p_value, same.ci_wald) == (0.0, None, 1.0, (0.0, 0.0))
    assert same.ci_newcombe[0] < 0 < same.ci_newcombe[1]  # Newcombe still has width
    empty = two_proportion_ztest(0, 0, 5, 10)
    assert empty.diff is None and empty.p_value is None and empty.p_b == 0.5
    with pytest.raises(ValueError, match="x_b"):
        two_proportion_ztest(1, 2, 5, 4)


@pytest.mark.parametrize("x, df", [(0.3, 1), (3.84, 1), (5.99, 2), (7.8, 3), (13.3, 4), (40.0, 7),
                                   (2.0, 10), (1e-6, 5)])
def test_chi2_sf_matches_scipy(x, df):
    assert chi2_sf(x, df) == pytest.approx(sps.chi2.sf(x, df), rel=1e-9, abs=1e-300)


def test_srm_chi2_matches_scipy_chisquare():
    for observed, weights in (([1200, 800], [50, 50]), ([1010, 990], [1, 1]),
                              ([310, 320, 370], [30, 30, 40]), ([90, 10], [9, 1])):
        res = srm_chi2(observed, weights)
        n = sum(observed)
        ref = sps.chisquare(observed, [n * w / sum(weights) for w in weights])
        assert res.chi2 == pytest.approx(ref.statistic)
        assert res.p_value == pytest.approx(ref.pvalue, rel=1e-9)
    assert srm_chi2([1200, 800], [50, 50]).srm
    assert not srm_chi2([1010, 990], [50, 50]).srm
    zero = srm_chi2([5, 3], [1, 0])  # an arm with weight 0 got traffic
    assert zero.srm and zero.p_value == 0.0 and zero.to_dict()["chi2"] is None
    assert not srm_chi2([0, 0], [1, 1]).srm


def crafted(tmp_path):
    """fit-query: control / treatment / errs / slow arms plus pinned and shadow rows."""
    log = Log(tmp_path / "m.db")
    # control: 1000 rows, 900 compliant, 80 not, 20 errors (no verdict); 30 fallbacks; 10..300 ms
    lat = iter(np.linspace(10, 300, 1000))
    for i in range(1000):
        kw = {"latency_ms": float(next(lat))}
        if i < 900:
            kw["contract_ok"] = 1
        elif i < 980:
            kw["contract_ok"] = 0
            if i < 930:
                kw |= {"fallback": "production", "fallback_reason": "contract", "served_version": "v1"}
        else:
            kw |= {"contract_ok": None, "status": 500, "error": "worker died", "served_version": None}
        log.add(**kw)
    # treatment: 1000 rows, 930 compliant of 1000 judged, no errors
    log.add(930, arm="treatment", assigned_version="v2", served_version="v2", latency_ms=120.0)
    log.add(70, arm="treatment", assigned_version="v2", served_version="v1", contract_ok=0,
            fallback="production", fallback_reason="contract", latency_ms=140.0)
    # errs: 100 rows, 6 of them errors (status 200 with an error text counts too)
    log.add(94, arm="errs", assigned_version="v4", served_version="v4", routing_id=None)
    log.add(5, arm="errs", assigned_version="v4", status=503, contract_ok=None,
            error="overloaded", served_version=None, routing_id=None)
    log.add(1, arm="errs", assigned_version="v4", contract_ok=None, error="timeout", routing_id=None)
    # slow: p95 600 ms
    slow = [100.0] * 90 + [600.0] * 10
    for ms in slow:
        log.add(arm="slow", assigned_version="v5", served_version="v5", latency_ms=ms, routing_id=None)
    # pinned: never compared, never in the split
    log.add(300, arm="pinned", assigned_version="v0", served_version="v0", contract_ok=0)
    # shadow v3 of the first 200 control requests: compliant on all of them
    for i in range(1, 201):
        log.add(arm="control", assigned_version="v3", served_version="v3", shadow_of=f"q{i}",
                latency_ms=250.0)
    log.save()
    record_routing(log.path, "r1", "fit-query", FIFTY_FIFTY)
    return log.path, np.linspace(10, 300, 1000)


def test_report_rates_percentiles_flags_and_comparison(tmp_path):
    db, control_lat = crafted(tmp_path)
    rep = ab_report(db)
    json.dumps(rep, allow_nan=False)  # JSON-serializable, no NaN / Infinity
    e = rep["advisors"]["fit-query"]
    assert e["control"] == "control"
    c = e["arms"]["control"]
    assert (c["requests"], c["compliant"], c["judged"]) == (1000, 900, 980)
    assert c["compliance_rate"] == pytest.approx(900 / 980)
    assert c["fallback_rate"] == pytest.approx(0.03)
    assert c["error_rate"] == pytest.approx(0.02)
    assert c["latency_p50_ms"] == pytest.approx(np.percentile(control_lat, 50))
    assert c["latency_p95_ms"] == pytest.approx(np.percentile(control_lat, 95))
    assert c["served_versions"] == {"v1": 980}  # the 20 errors returned no answer
    assert c["fallback_reasons"] == {"contract": 30}
    assert c["mean_completion_tokens"] == 20
    t = e["arms"]["treatment"]
    assert t["served_versions"] == {"v1": 70, "v2": 930}
    assert t["compliance_rate"] == pytest.approx(0.93)

    # Flags: errs (6%) and slow (p95 600 ms); control (2%, p95 ~285 ms) and treatment are fine.
    assert set(e["flags"]) == {"errs", "slow"}
    assert "error rate 6.0% > 5%" in e["flags"]["errs"][0]
    assert e["arms"]["errs"]["error_rate"] == pytest.approx(0.06)
    assert e["arms"]["slow"]["latency_p95_ms"] == pytest.approx(600.0)
    assert "p95 latency 600 ms > 500 ms" in e["flags"]["slow"][0]

    # Comparisons: every routed arm against control, never pinned.
    assert set(e["comparisons"]) == {"treatment", "errs", "slow"}
    cmp = e["comparisons"]["treatment"]
    d, wald, newcombe, p = wald_and_newcombe(900, 980, 930, 1000)
    assert cmp["against"] == "control"
    assert cmp["diff"] == pytest.approx(d)
    assert cmp["ci_wald"] == pytest.approx(list(wald))
    assert cmp["ci_newcombe"] == pytest.approx(list(newcombe))
    assert cmp["p_value"] == pytest.approx(p, rel=1e-9)

    # Shadow: 200 runs, all compliant; paired with the served answers (the first 200 control
    # rows, all compliant) there are no discordant pairs.
    sh = e["shadow"]["v3"]
    assert sh["requests"] == 200 and sh["compliance_rate"] == 1.0
    assert sh["paired"]["pairs"] == 200 and sh["paired"]["mcnemar"]["discordant"] == 0
    assert e["arms"]["control"]["requests"] == 1000  # shadow rows are not served rows

    # The split: r1 has 1000 / 1000 (fair); the rows without routing_id are reported, unchecked.
    checks = {ch["routing_id"]: ch for ch in e["srm"]}
    assert checks["r1"]["srm"] is False and checks["r1"]["unit"] == "request"
    assert checks[None]["srm"] is None and "routing_id" in checks[None]["note"]
    assert e["srm_detected"] is False

    text = format_report(rep)
    assert "| treatment | 1000 | 93.0%" in text
    assert "- errs: error rate 6.0%" in text and "- slow: p95 latency 600 ms" in text


def test_control_override_and_filters(tmp_path):
    db, _ = crafted(tmp_path)
    rep = ab_report(db, control="treatment")
    e = rep["advisors"]["fit-query"]
    assert e["control"] == "treatment" and "control" in e["comparisons"]
    assert e["comparisons"]["control"]["diff"] == pytest.approx(900 / 980 - 0.93)
    with pytest.raises(ValueError, match="control: no arm 'nope'"):
        ab_report(db, control="nope")
    assert ab_report(db, advisor="photo-critic")["advisors"] == {}
    with pytest.raises(ValueError, match="since"):
        ab_report(db, since="yesterday")
    assert normalize_since("2026-11-22T10:30:00+01:00") == "2026-11-22T09:30:00.000Z"
    late = ab_report(db, since="2026-11-22T09:30")  # minutes 30..59 of the crafted hour
    n_late = late["advisors"]["fit-query"]["arms"]["control"]["requests"]
    assert 0 < n_late < 1000
    empty = ab_report(db, since="2030-01-01")
    assert empty["advisors"] == {} and "No requests in the window" in format_report(empty)


def test_default_control_is_first_arm_by_name(tmp_path):
    log = Log(tmp_path / "m.db")
    log.add(10, arm="b-arm")
    log.add(10, arm="a-arm", contract_ok=0)
    log.add(5, arm="pinned")
    rep = ab_report(log.save())
    e = rep["advisors"]["fit-query"]
    assert e["control"] == "a-arm" and list(e["comparisons"]) == ["b-arm"]


def split_log(tmp_path, a, b, config=FIFTY_FIFTY, users=None):
    log = Log(tmp_path / "split.db")
    for arm, n in (("control", a), ("treatment", b)):
        for i in range(n):
            log.add(arm=arm, routing_id="r1",
                    sticky_key=None if users is None else f"{arm}-user{i % users[arm]}")
    log.add(500, arm="pinned", routing_id="r1")  # pinned traffic never counts against the split
    log.save()
    record_routing(log.path, "r1", "fit-query", config)
    return log.path


def test_srm_detected_for_60_40_under_50_50(tmp_path):
    rep = ab_report(split_log(tmp_path, 1200, 800))
    e = rep["advisors"]["fit-query"]
    ch = e["srm"][0]
    assert ch["routing_id"] == "r1" and ch["srm"] is True and e["srm_detected"] is True
    assert ch["p_value"] == pytest.approx(sps.chisquare([1200, 800]).pvalue, rel=1e-9)
    assert ch["arms"]["control"]["observed"] == 1200 and ch["arms"]["control"]["expected_share"] == 0.5
    assert "SRM DETECTED" in format_report(rep)


def test_no_srm_for_a_fair_split(tmp_path):
    rep = ab_report(split_log(tmp_path, 1015, 985))
    ch = rep["advisors"]["fit-query"]["srm"][0]
    assert ch["srm"] is False and ch["p_value"] == pytest.approx(sps.chisquare([1015, 985]).pvalue)


def test_sticky_split_counts_assignment_units(tmp_path):
    # 1200 / 800 requests, but from 100 / 100 users: the users were split fairly.
    sticky = FIFTY_FIFTY | {"sticky": "user"}
    rep = ab_report(split_log(tmp_path, 1200, 800, sticky, users={"control": 100, "treatment": 100}))
    ch = rep["advisors"]["fit-query"]["srm"][0]
    assert ch["unit"] == "sticky_key" and ch["srm"] is False
    assert ch["arms"]["control"]["observed"] == 100


def test_arm_missing_from_config_is_a_mismatch(tmp_path):
    log = Log(tmp_path / "m.db")
    log.add(100, arm="control")
    log.add(100, arm="treatment")
    log.add(3, arm="ghost")
    log.save()
    record_routing(log.path, "r1", "fit-query", FIFTY_FIFTY)
    ch = ab_report(log.path)["advisors"]["fit-query"]["srm"][0]
    assert ch["srm"] is True and "ghost" in ch["note"]


def test_errors_for_missing_db_and_table(tmp_path):
    with pytest.raises(DBError, match="no such database"):
        ab_report(tmp_path / "none.db")
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE jobs (id INTEGER)").connection.close()
    with pytest.raises(DBError, match="no 'requests' table"):
        ab_report(other)
    assert not (tmp_path / "none.db").exists()  # the report never creates a database


def test_cli_ab_report(tmp_path):
    db, _ = crafted(tmp_path)
    runner = CliRunner()
    res = runner.invoke(cli, ["ab", "report", "--db", str(db), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert set(data["advisors"]["fit-query"]["flags"]) == {"errs", "slow"}
    res = runner.invoke(cli, ["ab", "report", "--db", str(db), "--advisor", "fit-query",
                              "--control", "treatment", "--since", "2026-11-22"])
    assert res.exit_code == 0, res.output
    assert "## fit-query" in res.output and "control - treatment" in res.output
    res = runner.invoke(cli, ["ab", "report", "--db", str(tmp_path / "missing.db")])
    assert res.exit_code != 0 and "no such database file" in res.output
    res = runner.invoke(cli, ["ab", "report", "--db", str(db), "--control", "nope", "--json"])
    assert res.exit_code != 0 and "control: no arm 'nope'" in res.output
    for args in (["ab"], ["ab", "report"]):
        assert runner.invoke(cli, [*args, "--help"]).exit_code == 0


def test_outcomes_acceptance_sequential_decision_and_guardrails(tmp_path):
    """Feedback on two arms: control accepted 60 of 100 judged, treatment 90 of 100; treatment
    also errs on 30 of its 130 served rows. Counts, rates and the field check against
    corrections are exact; the sequential interval equals mondrian.ab.sequential on the same
    0/1 values and (with 30 points on 100 a side) calls the treatment better; the error
    guardrail calls harm; the fixed-horizon test sits beside it."""
    from mondrian.ab.sequential import diff_cs

    log = Log(tmp_path / "o.db")
    answer = json.dumps({"query_type": "search", "technology": "Wind"})
    log.add(120, answer_text=answer)  # control: q1..q120, 100 judged
    log.add(100, arm="treatment", assigned_version="v2", served_version="v2", answer_text=answer)  # q121..q220
    log.add(30, arm="treatment", assigned_version="v2", served_version=None, status=500, error="boom",
            contract_ok=None)
    log.save()
    fixed = json.dumps({"query_type": "search", "technology": "Hydro"})
    votes = [(f"q{i}", "accepted" if i <= 60 else "corrected", None if i <= 60 else fixed) for i in range(1, 101)]
    votes += [(f"q{i}", "accepted" if i <= 210 else "rejected", None) for i in range(121, 221)]
    with sqlite3.connect(log.path) as conn:
        conn.executemany("INSERT INTO feedback VALUES (?, '', 'fit-query', ?, ?, 1, 'now', 'now')", votes)
    e = ab_report(log.path)["advisors"]["fit-query"]
    c, t = e["outcomes"]["control"], e["outcomes"]["treatment"]
    assert (c["served"], c["judged"], c["accepted"], c["corrected"], c["rejected"]) == (120, 100, 60, 40, 0)
    assert c["coverage"] == pytest.approx(100 / 120) and c["acceptance_rate"] == pytest.approx(0.6)
    # corrected answers differ only in the technology: 1 of 2 fields right, every time
    assert c["field_accuracy_vs_corrections"] == pytest.approx(0.5) and c["corrections_compared"] == 40
    assert c["per_field"] == {"query_type": 1.0, "technology": 0.0}
    assert (t["served"], t["judged"], t["accepted"], t["rejected"]) == (130, 100, 90, 10)
    cmp = e["outcome_comparisons"]["treatment"]
    ref = diff_cs([1.0] * 60 + [0.0] * 40, [1.0] * 90 + [0.0] * 10, 0.05)
    assert cmp["sequential"]["low"] == pytest.approx(ref.low) and cmp["sequential"]["p_value"] == pytest.approx(ref.p_value)
    assert cmp["decision"] == "better" and cmp["fixed_horizon"]["p_value"] < cmp["sequential"]["p_value"]
    g = cmp["guardrails"]
    assert g["error_rate"]["status"] == "harm" and g["error_rate"]["estimate"] == pytest.approx(30 / 130)
    assert g["fallback_rate"]["status"] == "pending"  # 0 vs 0: nothing to say, nothing proven
    md = format_report(ab_report(log.path))
    assert "| treatment - control | +30.0 pp |" in md and "error_rate harm" in md


def test_replicas_logs_read_as_one(tmp_path):
    """Two service replicas, each with its own requests file (same plan, sticky hash): one
    report over both equals the report of one file holding all the rows; SRM is over the
    union (each replica alone looks skewed, together the split is fair); the same file twice,
    or two copies of one log, are refused rather than counted twice."""
    rows = {"a": [], "b": []}
    for i in range(1000):  # replica a got 70% of control's users, replica b 70% of treatment's
        arm = "control" if i % 2 == 0 else "treatment"
        side = "a" if (i % 10 < 7) == (arm == "control") else "b"
        rows[side].append({"arm": arm, "assigned_version": "v1" if arm == "control" else "v2",
                           "served_version": "v1" if arm == "control" else "v2",
                           "request_id": f"req-{side}-{i}", "contract_ok": int(i % 3 != 0)})
    logs = {}
    for side, items in (*rows.items(), ("all", rows["a"] + rows["b"])):
        log = Log(tmp_path / f"{side}.db")
        for r in items:
            log.add(**r)
        logs[side] = log.save()
        record_routing(log.path, "r1", "fit-query", FIFTY_FIFTY)
    alone = ab_report(logs["a"])["advisors"]["fit-query"]
    assert alone["srm"][0]["srm"] is True  # one replica's share alone is 70/30
    both = ab_report([logs["a"], logs["b"]])
    union = ab_report(logs["all"])
    assert both["advisors"] == union["advisors"]
    e = both["advisors"]["fit-query"]
    assert e["srm"][0]["srm"] is False
    assert sum(a["requests"] for a in e["arms"].values()) == 1000
    runner = CliRunner()
    res = runner.invoke(cli, ["ab", "report", "--db", str(logs["a"]), "--db", str(logs["b"]), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["advisors"] == union["advisors"]
    with pytest.raises(DBError, match="more than once"):
        ab_report([logs["a"], logs["a"]])
    with pytest.raises(DBError, match="request ids appear in more than one"):
        ab_report([logs["all"], logs["b"]])
