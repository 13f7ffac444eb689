"""The evaluation report: every arm scored and compared (`evaluate_answers`, the model-free half
of `evaluate()`), rendered as `report.md` (side by side: summary, per field, critical cases,
the adapter's worst failures, rows where the arms differ, constrained decoding), `report.json`
(everything, per row too) and `metrics.json` (the headline numbers, for an adapter card)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mondrian.core.atomic import write_text_atomic
from mondrian.core.contracts import Advisor, Case
from mondrian.evaluate.cases import run_critical_cases
from mondrian.evaluate.metrics import (
    ABS_TOL,
    REL_TOL,
    RESAMPLES,
    EvalError,
    arm_metrics,
    compare,
    score_answer,
)
from mondrian.evaluate.rows import EvalRow
from mondrian.models.decode import Generation

WORST_SHOWN = 10
DIFFER_SHOWN = 5
REPORT_MD = "report.md"
REPORT_JSON = "report.json"
METRICS_JSON = "metrics.json"  # the headline numbers alone (EvalReport.summary): for an adapter card

BASE, ADAPTER = "base", "adapter"
CONSTRAINED_SUFFIX = "_constrained"


@dataclass
class EvalReport:
    advisor: str
    split: str
    arms: dict[str, dict]  # arm -> arm_metrics
    comparisons: list[dict]  # compare() results; the first is the headline (base vs adapter)
    critical: dict[str, list[dict]]  # arm -> check_case results
    rows: list[dict]  # per row: question, expected, and per arm its answer and score
    config: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    run_id: str | None = None
    out_dir: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def comparison(self, a: str, b: str) -> dict | None:
        return next((c for c in self.comparisons if c["a"] == a and c["b"] == b), None)

    def summary(self) -> dict:
        """The headline numbers (the run's summary in the runs database)."""
        out: dict[str, Any] = {"rows": len(self.rows), "out_dir": self.out_dir}
        for arm, m in self.arms.items():
            out[arm] = {k: m.get(k) for k in ("parse_rate", "compliance", "exact_match", "field_accuracy",
                                             "latency_p50_s", "latency_p95_s", "answers_per_s", "tokens_per_s")}
            if arm in self.critical:
                out[arm]["critical_passed"] = sum(c["passed"] for c in self.critical[arm])
                out[arm]["critical_total"] = len(self.critical[arm])
        for c in self.comparisons:
            out[f"{c['b']}_vs_{c['a']}"] = {
                k: {"diff": c[k]["diff"]["estimate"], "low": c[k]["diff"]["low"], "high": c[k]["diff"]["high"],
                    **({"p_value": c[k]["mcnemar"]["p_value"]} if "mcnemar" in c[k] else {})}
                for k in ("compliance", "exact_match", "field_accuracy")}
        return out

    def metric_rows(self) -> dict[str, float]:
        """Flat name -> value rows for run_metrics (step 0)."""
        out: dict[str, float] = {}
        for arm, m in self.arms.items():
            for k, v in m.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    out[f"{arm}.{k}"] = v
            for f, fm in m["fields"].items():
                for k in ("accuracy", "tol_accuracy", "mae", "r2", "f1"):
                    if fm.get(k) is not None:
                        out[f"{arm}.field.{f}.{k}"] = fm[k]
            if arm in self.critical:
                out[f"{arm}.critical_passed"] = sum(c["passed"] for c in self.critical[arm])
        for c in self.comparisons:
            pre = f"{c['b']}_vs_{c['a']}"
            for k in ("parse_rate", "compliance", "exact_match", "field_accuracy"):
                for part in ("estimate", "low", "high"):
                    if c[k]["diff"][part] is not None:
                        out[f"{pre}.{k}.{'diff' if part == 'estimate' else part}"] = c[k]["diff"][part]
                if "mcnemar" in c[k]:
                    out[f"{pre}.{k}.p_value"] = c[k]["mcnemar"]["p_value"]
            for f, fc in c["fields"].items():
                if fc["diff"]["estimate"] is not None:
                    out[f"{pre}.field.{f}.diff"] = fc["diff"]["estimate"]
        return out

    def to_markdown(self) -> str:
        return _markdown(self)


def evaluate_answers(advisor: Advisor, rows: Sequence[EvalRow], answers: dict[str, Sequence[Generation | str]],
                     *, critical: dict[str, Sequence[Generation | str]] | None = None,
                     walls: dict[str, tuple[float, int, int]] | None = None,
                     cases: Sequence[Case] | None = None, seed: int = 0,
                     resamples: int = RESAMPLES, config: dict | None = None,
                     notes: Sequence[str] = ()) -> EvalReport:
    """Score every arm's answers to `rows` and compare the arms; the model-free half of
    `evaluate()`. `answers[arm][i]` answers `rows[i]`; `critical[arm][j]` answers case j (of
    `cases`, by default the advisor's own); `walls[arm]` is (seconds, answers, tokens) of the
    arm's batched run."""
    cases = list(advisor.cases if cases is None else cases)
    gens = {arm: [g if isinstance(g, Generation) else Generation(g) for g in got] for arm, got in answers.items()}
    for arm, got in gens.items():
        if len(got) != len(rows):
            raise EvalError(f"arm {arm}: {len(got)} answers for {len(rows)} rows")
    scores = {arm: [score_answer(advisor, r.reference, g.text) for r, g in zip(rows, got, strict=True)]
              for arm, got in gens.items()}
    arms = {}
    for arm in gens:
        wall = (walls or {}).get(arm)
        arms[arm] = arm_metrics(advisor, scores[arm], gens[arm], *(wall or (None, None, None)))
    pairs = []  # base vs adapter first (free decoding's, then the constrained arms')
    for suffix in ("", CONSTRAINED_SUFFIX):
        if BASE + suffix in gens and ADAPTER + suffix in gens:
            pairs.append((BASE + suffix, ADAPTER + suffix))
    for arm in list(gens):
        if arm + CONSTRAINED_SUFFIX in gens:
            pairs.append((arm, arm + CONSTRAINED_SUFFIX))
    comparisons = [compare(advisor, scores[a], scores[b], a, b, seed=seed, resamples=resamples) for a, b in pairs]
    crit = {}
    for arm, got in (critical or {}).items():
        texts = [g.text if isinstance(g, Generation) else g for g in got]
        crit[arm] = run_critical_cases(advisor, lambda _q, texts=texts: texts, cases)
    out_rows = []
    for i, r in enumerate(rows):
        out_rows.append({"index": r.index, "line": r.line, "job_id": r.job_id, "question": r.question,
                         "expected": r.reference,
                         "arms": {arm: {"answer": gens[arm][i].text, "tokens": gens[arm][i].tokens,
                                        "latency_s": gens[arm][i].latency_s,
                                        "finish_reason": gens[arm][i].finish_reason,
                                        **scores[arm][i].to_dict()} for arm in gens}})
    return EvalReport(advisor=advisor.name, split=(config or {}).get("split", "test"), arms=arms,
                      comparisons=comparisons, critical=crit, rows=out_rows, config=dict(config or {}),
                      notes=list(notes))


def write_report(report: EvalReport, out_dir: str | Path) -> Path:
    """report.md, report.json and metrics.json into `out_dir` (each file written atomically;
    other files in the folder are left alone)."""
    out = Path(out_dir).resolve()
    report.out_dir = str(out)
    write_text_atomic(out / REPORT_JSON,
                      json.dumps(report.to_dict(), indent=1, ensure_ascii=False, default=str) + "\n")
    write_text_atomic(out / METRICS_JSON, json.dumps(report.summary(), indent=1, default=str) + "\n")
    write_text_atomic(out / REPORT_MD, report.to_markdown())
    return out


# ---------------------------------------------------------------------------------------------
# report.md


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"


def _pts(ci: dict) -> str:
    if ci["estimate"] is None:
        return "—"
    s = f"{100 * ci['estimate']:+.1f} pts"
    if ci["low"] is not None:
        s += f" ({100 * ci['low']:+.1f}, {100 * ci['high']:+.1f})"
    return s


def _p(mc: dict | None) -> str:
    if not mc:
        return "—"
    p = mc["p_value"]
    txt = "<0.001" if p < 0.001 else f"{p:.3f}"
    return f"{txt} ({mc['method']}, {mc['a_only']}/{mc['b_only']})" if mc["method"] != "none" else "1 (no discordant rows)"


def _num(v: float | None, fmt: str = "{:.3g}") -> str:
    return "—" if v is None else fmt.format(v)


def _cell(text: str, limit: int = 90) -> str:
    text = " ".join(str(text).split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("|", "\\|")


def _code(text: str, limit: int = 160) -> str:
    return "`" + _cell(text, limit).replace("`", "'") + "`"


def _compact(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _markdown(r: EvalReport) -> str:
    c = r.comparisons[0] if r.comparisons else None
    a, b = (c["a"], c["b"]) if c else (list(r.arms)[0], None)
    lines = _md_header(r, c) + _md_summary(r, c, a, b) + _md_fields(r, c, a, b) + _md_critical(r)
    lines += _md_worst(r, b or a)
    if c:
        lines += _md_differ(r, a, b)
    lines += _md_constrained(r)
    return "\n".join(lines) + "\n"


def _md_header(r: EvalReport, c: dict | None) -> list[str]:
    cfg = r.config
    lines = [f"# Evaluation: {r.advisor} ({', '.join(r.arms)})", ""]
    if r.run_id:
        lines.append(f"- run: `{r.run_id}`")
    if cfg.get("base_model"):
        lines.append(f"- base model: `{cfg['base_model']}` (fingerprint `{str(cfg.get('base_model_fingerprint'))[:12]}`)")
    if cfg.get("adapter_path"):
        lines.append(f"- adapter: `{cfg['adapter_path']}` (adapters.safetensors sha256 "
                     f"`{str(cfg.get('adapter_sha256'))[:12]}`)")
    if cfg.get("data"):
        lines.append(f"- data: `{cfg['data']}` split `{r.split}`, {len(r.rows)} rows "
                     f"(sha256 `{str(cfg.get('dataset_fingerprint'))[:12]}`)")
    if cfg.get("batch_size"):
        lines.append(f"- decoding: greedy, batched {cfg['batch_size']} at a time, max {cfg.get('max_tokens')} tokens; "
                     f"one model load, base = LoRA scale 0")
    boot = (c or {}).get("exact_match", {}).get("diff", {})
    lines.append(f"- numbers within tolerance: |got - expected| <= max({ABS_TOL}, {REL_TOL:g} x |expected|); "
                 f"bootstrap: paired, 95%, {boot.get('resamples', RESAMPLES)} resamples, seed {boot.get('seed', 0)}")
    lines += [f"- note: {n}" for n in r.notes]
    return lines


_HEADLINE = (("parse_rate", "JSON parse rate"), ("compliance", "contract compliance"),
             ("exact_match", "exact match"), ("field_accuracy", "field accuracy (micro)"))
_SPEED = (("latency p50 per answer (s)", "latency_p50_s", "{:.2f}"),
          ("latency p95 per answer (s)", "latency_p95_s", "{:.2f}"),
          ("answers/s (batched)", "answers_per_s", "{:.2f}"), ("tokens/s", "tokens_per_s", "{:.1f}"),
          ("mean tokens per answer", "mean_tokens", "{:.1f}"), ("longest answer (tokens)", "longest_tokens", "{}"),
          ("stopped at max_tokens", "truncated", "{}"))


def _md_summary(r: EvalReport, c: dict | None, a: str, b: str | None) -> list[str]:
    lines = ["", "## Summary", ""]
    if c:
        lines += [f"| metric | {a} | {b} | difference (95% CI) | p-value (McNemar, {a}-only/{b}-only) |",
                  "|---|---|---|---|---|"]
        lines += [f"| {label} | {_pct(c[key]['a'])} | {_pct(c[key]['b'])} | {_pts(c[key]['diff'])} | "
                  f"{_p(c[key].get('mcnemar'))} |" for key, label in _HEADLINE]
    else:
        lines += [f"| metric | {a} |", "|---|---|"]
        lines += [f"| {label} | {_pct(r.arms[a][key])} |" for key, label in _HEADLINE]
    cols = [x for x in (a, b) if x]
    tail = " | | |" if c else " |"
    for label, key, fmt in _SPEED:
        lines.append(f"| {label} | " + " | ".join(_num(r.arms[x].get(key), fmt) for x in cols) + tail)
    if r.critical:
        passed = [f"{sum(x['passed'] for x in r.critical.get(arm, []))}/{len(r.critical.get(arm, []))}" for arm in cols]
        lines.append("| critical cases passed | " + " | ".join(passed) + tail)
    return lines


def _md_fields(r: EvalReport, c: dict | None, a: str, b: str | None) -> list[str]:
    cols = [x for x in (a, b) if x]
    lines = ["", "## Per field", "",
             "Accuracy over the rows where the field is in the reference or in the answer "
             "(support = rows whose reference has it); wrong / missing / invented are the "
             f"{b or a} arm's errors.", ""]
    head = "| field | kind | support | " + " | ".join(f"{x} acc" for x in cols)
    head += " | difference (95% CI) |" if c else " |"
    head += f" {b or a}: wrong / missing / invented | {b or a}: within tol / MAE / R² or set F1 |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for name, fm in r.arms[b or a]["fields"].items():
        if fm["n"] == 0 and all(r.arms[x]["fields"][name]["n"] == 0 for x in cols):
            continue
        accs = " | ".join(_pct(r.arms[x]["fields"][name]["accuracy"]) for x in cols)
        diff = f" | {_pts(c['fields'][name]['diff'])}" if c and name in c["fields"] else (" | —" if c else "")
        if fm["kind"] == "number" or "mae" in fm:
            extra = f"{_pct(fm.get('tol_accuracy'))} / {_num(fm.get('mae'))} / {_num(fm.get('r2'), '{:.3f}')}"
        elif "f1" in fm:
            extra = f"F1 {_num(fm.get('f1'), '{:.3f}')}"
        else:
            extra = ""
        lines.append(f"| {name} | {fm['kind']} | {fm['support']} | {accs}{diff} | "
                     f"{fm['wrong']} / {fm['missing']} / {fm['invented']} | {extra} |")
    return lines


def _md_critical(r: EvalReport) -> list[str]:
    if not r.critical:
        return []
    crit_arms = list(r.critical)
    lines = ["", "## Critical cases", "", "Only the fields named are checked, plus contract compliance.", "",
             "| case | question | expects | " + " | ".join(crit_arms) + " |",
             "|---|---|---|" + "---|" * len(crit_arms)]
    for j, case in enumerate(r.critical[crit_arms[0]]):
        cells = []
        for arm in crit_arms:
            res = r.critical[arm][j]
            cells.append("PASS" if res["passed"] else "FAIL: " + _cell("; ".join(res["problems"]), 100))
        lines.append(f"| {case['name']} | {_cell(case['question'])} | "
                     f"{_code(json.dumps({k: v['expected'] for k, v in case['checks'].items()}))} | "
                     + " | ".join(cells) + " |")
    lines += ["", "Answers:", ""]
    lines += [f"- {arm} / {res['name']}: {_code(res['answer'])}" for arm in crit_arms for res in r.critical[arm]]
    return lines


def _md_worst(r: EvalReport, target: str) -> list[str]:
    fails = [row for row in r.rows if not row["arms"][target]["exact"]]

    def severity(row: dict) -> tuple[int, int, int]:
        s = row["arms"][target]
        level = 3 if not s["parsed"] else 2 if not s["compliant"] else 1
        return (-level, -len(s["problems"]), row["index"])

    fails.sort(key=severity)
    lines = ["", f"## Worst failures of the {target} arm", "",
             f"{len(fails)} of {len(r.rows)} rows are not an exact match; the worst "
             f"{min(WORST_SHOWN, len(fails))} (not JSON, then contract breaks, then most wrong fields):", ""]
    for k, row in enumerate(fails[:WORST_SHOWN], 1):
        s = row["arms"][target]
        lines += [f"{k}. **{_cell(row['question'], 200)}** (line {row['line']}"
                  + (f", {row['job_id']}" if row.get("job_id") else "") + ")",
                  f"   - expected: {_code(_compact(row['expected']), 300)}",
                  f"   - got: {_code(s['answer'], 300)}",
                  f"   - wrong: {_cell('; '.join(s['problems']), 400)}"]
    if not fails:
        lines.append("None.")
    return lines


def _md_differ(r: EvalReport, a: str, b: str) -> list[str]:
    differ = [row for row in r.rows if row["arms"][a]["exact"] != row["arms"][b]["exact"]]
    differ.sort(key=lambda row: (row["arms"][b]["exact"] is False, row["index"]))  # b wins first
    b_wins = sum(row["arms"][b]["exact"] for row in differ)
    lines = ["", f"## Where {a} and {b} differ", "",
             f"{len(differ)} rows differ in exact match ({b} right only: {b_wins}, {a} right only: "
             f"{len(differ) - b_wins}); a few of each:", "",
             f"| question | expected | {a} | {b} |", "|---|---|---|---|"]
    shown = [x for x in differ if x["arms"][b]["exact"]][:DIFFER_SHOWN]
    shown += [x for x in differ if not x["arms"][b]["exact"]][:DIFFER_SHOWN]
    mark = {True: "✓ ", False: "✗ "}
    for row in shown:
        lines.append(f"| {_cell(row['question'], 80)} | {_code(_compact(row['expected']), 120)} | "
                     f"{mark[row['arms'][a]['exact']]}{_code(row['arms'][a]['answer'], 120)} | "
                     f"{mark[row['arms'][b]['exact']]}{_code(row['arms'][b]['answer'], 120)} |")
    return lines


def _md_constrained(r: EvalReport) -> list[str]:
    cons = [x for x in r.comparisons if x["b"].endswith(CONSTRAINED_SUFFIX)]
    if not cons:
        return []
    lines = ["", "## Constrained decoding (JSON Schema, llguidance)", "",
             "| arm | parse | compliance | exact | field acc | answers/s | tokens/s | latency p50 (s) | "
             "compliance diff (95% CI) | p-value | exact diff (95% CI) | p-value |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in cons:
        for arm, first in ((x["a"], True), (x["b"], False)):
            m = r.arms[arm]
            tail = (" | | | |" if first else
                    f" | {_pts(x['compliance']['diff'])} | {_p(x['compliance']['mcnemar'])} | "
                    f"{_pts(x['exact_match']['diff'])} | {_p(x['exact_match']['mcnemar'])} |")
            lines.append(f"| {arm} | {_pct(m['parse_rate'])} | {_pct(m['compliance'])} | {_pct(m['exact_match'])} | "
                         f"{_pct(m['field_accuracy'])} | {_num(m.get('answers_per_s'), '{:.2f}')} | "
                         f"{_num(m.get('tokens_per_s'), '{:.1f}')} | {_num(m.get('latency_p50_s'), '{:.2f}')}"
                         + tail)
    cfg = r.config
    if cfg.get("grammar_rewrites"):
        lines += ["", "Schema rewritten for the grammar: " + "; ".join(cfg["grammar_rewrites"]) + "."]
    if cfg.get("grammar_list_caps"):
        lines += ["", "Lists capped at the longest in the training split, each item unique: "
                  + ", ".join(f"{k} <= {v}" for k, v in sorted(cfg["grammar_list_caps"].items())) + "."]
    if cfg.get("grammar_warnings"):
        lines += ["", "Not enforced by the grammar (checked after decoding): "
                  + "; ".join(cfg["grammar_warnings"])]
    return lines
