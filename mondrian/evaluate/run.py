"""Evaluate a LoRA adapter against its base model: same rows, one model load, paired statistics.

`evaluate()` loads the base model once with the adapter's LoRA layers installed, and answers
every row of a dataset split twice with greedy decoding, batched through mlx-lm's
`BatchGenerator` (the engine of `batch_generate`):

- arm `base`: every LoRA layer's `scale` set to 0, which gives the base model's logits bit
  for bit (the LoRA matmuls still run; a test checks the logits against a plain load);
- arm `adapter`: the adapter's own scale;
- with `constrained=True`, also `base_constrained` and `adapter_constrained`: the same, with
  llguidance's JSON-Schema mask applied to the logits (see `SchemaConstraint`).

The prompt of a row is its chat messages minus the assistant turn, through the tokenizer's
chat template with the generation prompt (exactly what training masked as the prompt); the
reference is the assistant turn parsed as JSON.

Metrics per arm: JSON parse rate, contract compliance (the advisor's JSON Schema), exact match
of the whole object, per-field accuracy, latency p50/p95 per answer, answers/s and tokens/s.
Per-field accuracy is taken over the rows where the field is *relevant*: present in the
reference or in the answer. A field both lack is not counted; one the reference lacks and the
answer invents is an error ("invented"), one the answer lacks is an error ("missing").
Values compare type-strictly after canonicalization (100 == 100.0, but 1 != true and
"1" != 1). Numbers also count as right *within tolerance* when |got - expected| <=
max(abs_tol, rel_tol * |expected|), with MAE and R^2 over the rows where both have a number;
lists (postcode prefixes, technologies) are exact (order included, as the contract writes
them) and also scored by set F1.

Paired statistics for base vs adapter (and each arm vs its constrained twin): McNemar on
parse, compliance and exact match (exact binomial when discordant pairs are few) and seeded
paired-bootstrap 95% intervals on the differences of the rates and of field accuracy.

Outputs: `report.md` (side by side: summary, per field, critical cases, the adapter's worst
failures, rows where the arms differ), `report.json` (everything, per row too), `metrics.json`
(the headline numbers, for an adapter card), and a run of kind "eval" in the runs database
(config, fingerprints, summary) with per-metric rows at step 0.

The advisor's critical cases (`CRITICAL_CASES`) run on every arm and report pass/fail,
checking only the fields they name plus contract compliance.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from mondrian.core.contracts import Advisor, canonical, loads_strict
from mondrian.core.fingerprint import file_sha256
from mondrian.core.jsonl import read_jsonl
from mondrian.evaluate import stats
from mondrian.models.generation import (
    AdapterSwitch,
    Generation,
    SchemaConstraint,
    chat_prompt,
    generate_batch,
)

ABS_TOL = 0.5
REL_TOL = 0.05
RESAMPLES = 2000
WORST_SHOWN = 10
DIFFER_SHOWN = 5
REPORT_MD = "report.md"
REPORT_JSON = "report.json"
METRICS_JSON = "metrics.json"  # the headline numbers alone (EvalReport.summary): for an adapter card

BASE, ADAPTER = "base", "adapter"
CONSTRAINED_SUFFIX = "_constrained"


class EvalError(ValueError):
    """The evaluation cannot run as asked; the message says why."""


# ---------------------------------------------------------------------------------------------
# critical cases


@dataclass(frozen=True)
class CriticalCase:
    name: str
    question: str
    expect: dict  # only these fields are checked (plus contract compliance)


def _fit_query_cases() -> list[CriticalCase]:
    from mondrian.demo.questions import PLACES

    return [
        CriticalCase("berkshire wind over 100kw", "wind sites over 100kw in berkshire",
                     {"technology": "Wind", "capacity_min_kw": 100,
                      "postcode_patterns": list(PLACES["Berkshire"])}),
        CriticalCase("fit rate by id", "what is the fit rate for fit id 1585",
                     {"query_type": "fit_rate", "fit_id": "1585"}),
        CriticalCase("compare wind and solar in Yorkshire", "compare wind and solar in Yorkshire",
                     {"query_type": "comparison", "technologies": ["Wind", "Photovoltaic"],
                      "postcode_patterns": list(PLACES["Yorkshire"])}),
    ]


# advisor name -> the cases every evaluation of it runs
CRITICAL_CASES: dict[str, Callable[[], list[CriticalCase]]] = {"fit-query": _fit_query_cases}


def critical_cases(advisor: Advisor | str) -> list[CriticalCase]:
    name = advisor if isinstance(advisor, str) else advisor.name
    build = CRITICAL_CASES.get(name)
    return build() if build else []


def check_case(advisor: Advisor, case: CriticalCase, text: str) -> dict:
    """Pass/fail of one answer to a critical case: compliant, and every named field equal."""
    score = score_answer(advisor, case.expect, text)
    got = score.obj if isinstance(score.obj, dict) else {}
    checks = {k: {"expected": v, "got": got.get(k), "ok": k in got and _same(got[k], v)}
              for k, v in case.expect.items()}
    problems = []
    if not score.parsed:
        problems.append(f"not JSON ({score.error})")
    elif not score.compliant:
        problems += [f"schema: {v}" for v in score.violations[:3]]
    problems += [f"{k}: expected {_show(c['expected'])}, got "
                 f"{_show(c['got']) if k in got else 'nothing'}" for k, c in checks.items() if not c["ok"]]
    return {"name": case.name, "question": case.question, "passed": not problems,
            "compliant": score.compliant, "checks": checks, "answer": text, "problems": problems}


def run_critical_cases(advisor: Advisor, answer: Callable[[list[str]], Sequence[str]],
                       cases: Sequence[CriticalCase] | None = None) -> list[dict]:
    """Ask `answer` (questions -> answer texts: a model, or a stub) the advisor's critical cases."""
    cases = list(critical_cases(advisor) if cases is None else cases)
    if not cases:
        return []
    texts = list(answer([c.question for c in cases]))
    if len(texts) != len(cases):
        raise EvalError(f"{len(cases)} critical questions got {len(texts)} answers")
    return [check_case(advisor, c, t) for c, t in zip(cases, texts, strict=True)]


# ---------------------------------------------------------------------------------------------
# scoring one answer


def _key(value) -> str:
    """A type-strict comparison key: 100 and 100.0 agree, 1 and true and "1" do not."""
    return json.dumps(canonical(value), sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _same(a, b) -> bool:
    return _key(a) == _key(b)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _show(v, limit: int = 120) -> str:
    s = json.dumps(v, ensure_ascii=False, separators=(",", ":")) if not isinstance(v, str) else json.dumps(v)
    return s if len(s) <= limit else s[: limit - 1] + "…"


def parse_answer(text: str) -> tuple[Any, str | None]:
    """The JSON value of an answer (surrounding whitespace allowed, nothing else) or an error.
    NaN / Infinity and duplicate keys are errors, as the linker treats production answers."""
    try:
        return loads_strict(text.strip()), None
    except json.JSONDecodeError as exc:
        return None, f"{exc.msg} at column {exc.colno}" if text.strip() else "empty answer"
    except ValueError as exc:
        return None, str(exc)


@dataclass
class FieldResult:
    status: str  # correct | wrong | missing | invented | absent (in neither)
    expected: Any = None
    got: Any = None
    within_tol: bool | None = None  # numbers
    f1: float | None = None  # lists

    @property
    def relevant(self) -> bool:
        return self.status != "absent"


@dataclass
class Score:
    parsed: bool
    compliant: bool
    exact: bool
    obj: Any
    error: str | None
    violations: list[str]
    fields: dict[str, FieldResult]
    extra_keys: list[str]

    @property
    def correct_fields(self) -> int:
        return sum(f.status == "correct" for f in self.fields.values())

    @property
    def relevant_fields(self) -> int:
        return sum(f.relevant for f in self.fields.values())

    @property
    def field_errors(self) -> int:
        return self.relevant_fields - self.correct_fields + len(self.extra_keys)

    @property
    def severity(self) -> tuple[int, int]:
        """For ranking failures: not JSON > breaks the contract > wrong fields; then how many."""
        level = 3 if not self.parsed else 2 if not self.compliant else 1 if not self.exact else 0
        return level, self.field_errors

    def problems(self) -> list[str]:
        """What was wrong, in words."""
        if not self.parsed:
            return [f"not JSON: {self.error}"]
        out = [f"schema: {v}" for v in self.violations]
        if not isinstance(self.obj, dict):
            return out or [f"not an object: {type(self.obj).__name__}"]
        for name, f in self.fields.items():
            if f.status == "wrong":
                out.append(f"{name}: expected {_show(f.expected)}, got {_show(f.got)}")
            elif f.status == "missing":
                out.append(f"{name}: missing (expected {_show(f.expected)})")
            elif f.status == "invented":
                out.append(f"{name}: invented {_show(f.got)}")
        out += [f"{k}: not a field of the contract" for k in self.extra_keys if not self.violations]
        return out

    def to_dict(self) -> dict:
        return {"parsed": self.parsed, "compliant": self.compliant, "exact": self.exact,
                "error": self.error, "violations": self.violations,
                "fields": {k: f.status for k, f in self.fields.items() if f.relevant},
                "problems": self.problems()}


def _field_kind(advisor: Advisor, name: str) -> str:
    prop = advisor.schema.get("properties", {}).get(name, {})
    t = prop.get("type") if isinstance(prop, dict) else None
    if t in ("number", "integer"):
        return "number"
    if t == "array":
        return "list"
    if t == "boolean":
        return "boolean"
    return "string" if t == "string" else "value"


def score_field(expected_has: bool, expected, got_has: bool, got) -> FieldResult:
    if not expected_has and not got_has:
        return FieldResult("absent")
    if not got_has:
        return FieldResult("missing", expected=expected, f1=0.0 if isinstance(expected, list) else None,
                           within_tol=False if _is_number(expected) else None)
    if not expected_has:
        return FieldResult("invented", got=got, f1=0.0 if isinstance(got, list) else None,
                           within_tol=False if _is_number(got) else None)
    res = FieldResult("correct" if _same(got, expected) else "wrong", expected=expected, got=got)
    if _is_number(expected):
        res.within_tol = _is_number(got) and abs(got - expected) <= max(ABS_TOL, REL_TOL * abs(expected))
    if isinstance(expected, list):
        res.f1 = stats.set_f1([_key(v) for v in got], [_key(v) for v in expected]) if isinstance(got, list) else 0.0
    return res


def score_answer(advisor: Advisor, reference: dict, text: str) -> Score:
    """Score one answer text against the reference object."""
    obj, error = parse_answer(text)
    parsed = error is None
    violations = [str(v) for v in advisor.violations(obj)] if parsed else []
    answer = obj if isinstance(obj, dict) else {}
    fields = {name: score_field(name in reference, reference.get(name), name in answer, answer.get(name))
              for name in advisor.fields}
    known = set(advisor.fields)
    return Score(parsed=parsed, compliant=parsed and not violations,
                 exact=isinstance(obj, dict) and _same(obj, reference), obj=obj, error=error,
                 violations=violations, fields=fields, extra_keys=sorted(k for k in answer if k not in known))


# ---------------------------------------------------------------------------------------------
# metrics of one arm, comparisons of two


def _rate(flags: Sequence[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def field_metrics(advisor: Advisor, scores: Sequence[Score]) -> dict[str, dict]:
    out = {}
    for name in advisor.fields:
        results = [s.fields[name] for s in scores]
        rel = [r for r in results if r.relevant]
        counts = {k: sum(r.status == k for r in results) for k in ("correct", "wrong", "missing", "invented")}
        m: dict[str, Any] = {"kind": _field_kind(advisor, name),
                             "support": counts["correct"] + counts["wrong"] + counts["missing"],
                             "n": len(rel), **counts,
                             "accuracy": counts["correct"] / len(rel) if rel else None}
        pairs = [(r.got, r.expected) for r in results
                 if r.status in ("correct", "wrong") and _is_number(r.got) and _is_number(r.expected)]
        if m["kind"] == "number" or pairs:
            within = sum(bool(r.within_tol) for r in rel)
            m |= {"within_tol": within, "tol_accuracy": within / len(rel) if rel else None,
                  "n_pairs": len(pairs), "mae": stats.mae([p for p, _ in pairs], [r for _, r in pairs]),
                  "r2": stats.r2([p for p, _ in pairs], [r for _, r in pairs])}
        f1s = [r.f1 for r in rel if r.f1 is not None]
        if m["kind"] == "list" or f1s:
            m["f1"] = sum(f1s) / len(f1s) if f1s else None
        out[name] = m
    return out


def arm_metrics(advisor: Advisor, scores: Sequence[Score], gens: Sequence[Generation] | None = None,
                wall_s: float | None = None, generated: int | None = None,
                generated_tokens: int | None = None) -> dict:
    """Headline and per-field metrics of one arm. Throughput is over everything the arm
    generated in its batched run (`generated` answers / `generated_tokens` in `wall_s`)."""
    correct = sum(s.correct_fields for s in scores)
    relevant = sum(s.relevant_fields for s in scores)
    m: dict[str, Any] = {
        "rows": len(scores),
        "parse_rate": _rate([s.parsed for s in scores]),
        "compliance": _rate([s.compliant for s in scores]),
        "exact_match": _rate([s.exact for s in scores]),
        "field_accuracy": correct / relevant if relevant else None,
        "fields": field_metrics(advisor, scores),
    }
    if gens:
        lat = [g.latency_s for g in gens if g.latency_s is not None]
        toks = [g.tokens for g in gens]
        m |= {"latency_p50_s": stats.percentile(lat, 50), "latency_p95_s": stats.percentile(lat, 95),
              "mean_tokens": sum(toks) / len(toks),
              "truncated": sum(g.finish_reason == "length" for g in gens)}
    if wall_s:
        n = generated if generated is not None else len(scores)
        t = generated_tokens if generated_tokens is not None else sum(g.tokens for g in gens or [])
        m |= {"wall_s": wall_s, "answers_per_s": n / wall_s, "tokens_per_s": t / wall_s}
    return m


def compare(advisor: Advisor, a: Sequence[Score], b: Sequence[Score], name_a: str, name_b: str,
            seed: int = 0, resamples: int = RESAMPLES) -> dict:
    """Paired comparison of arm b against arm a on the same rows (differences are b - a)."""
    if len(a) != len(b):
        raise EvalError(f"arms {name_a} and {name_b} scored different rows ({len(a)} vs {len(b)})")
    ones = [1.0] * len(a)

    def binary(attr: str) -> dict:
        xa, xb = [getattr(s, attr) for s in a], [getattr(s, attr) for s in b]
        ci = stats.bootstrap_diff([float(x) for x in xa], ones, [float(x) for x in xb], ones,
                                  resamples=resamples, seed=seed)
        return {"a": _rate(xa), "b": _rate(xb), "diff": ci.to_dict(),
                "mcnemar": stats.mcnemar(xa, xb).to_dict()}

    out: dict[str, Any] = {"a": name_a, "b": name_b, "rows": len(a),
                           "parse_rate": binary("parsed"), "compliance": binary("compliant"),
                           "exact_match": binary("exact")}
    fa = [(float(s.correct_fields), float(s.relevant_fields)) for s in a]
    fb = [(float(s.correct_fields), float(s.relevant_fields)) for s in b]
    ci = stats.bootstrap_diff([x for x, _ in fa], [y for _, y in fa], [x for x, _ in fb], [y for _, y in fb],
                              resamples=resamples, seed=seed)
    ra, rb = sum(x for x, _ in fa), sum(x for x, _ in fb)
    da, db = sum(y for _, y in fa), sum(y for _, y in fb)
    out["field_accuracy"] = {"a": ra / da if da else None, "b": rb / db if db else None, "diff": ci.to_dict()}
    fields = {}
    for name in advisor.fields:
        pa = [(float(s.fields[name].status == "correct"), float(s.fields[name].relevant)) for s in a]
        pb = [(float(s.fields[name].status == "correct"), float(s.fields[name].relevant)) for s in b]
        if not any(y for _, y in pa) and not any(y for _, y in pb):
            continue
        ci = stats.bootstrap_diff([x for x, _ in pa], [y for _, y in pa], [x for x, _ in pb], [y for _, y in pb],
                                  resamples=resamples, seed=seed)
        fields[name] = {"diff": ci.to_dict()}
    out["fields"] = fields
    return out


# ---------------------------------------------------------------------------------------------
# rows


@dataclass
class EvalRow:
    index: int
    line: int  # line in the split file
    question: str
    reference: dict
    messages: list[dict]  # the prompt: the row's messages minus the assistant turn
    job_id: str | None = None


def load_rows(data_dir: str | Path, split: str, advisor: Advisor, limit: int | None = None) -> list[EvalRow]:
    """The split's chat rows as (prompt messages, reference answer); the reference must meet
    the contract (a dataset built by `mondrian dataset` always does)."""
    data_dir = Path(data_dir)
    path = data_dir / f"{split}.jsonl"
    if not path.is_file():
        raise EvalError(f"{path}: missing (build it with `mondrian dataset`; a path is never looked up on the hub)")
    jobs = {}
    index = data_dir / "index.jsonl"
    if index.is_file():
        jobs = {r["line"]: r.get("job_id") for _, r in read_jsonl(index, EvalError) if r.get("split") == split}
    rows: list[EvalRow] = []
    for line, row in read_jsonl(path, EvalError):
        if limit is not None and len(rows) >= limit:
            break
        msgs = row.get("messages") if isinstance(row, dict) else None
        if not msgs or msgs[-1].get("role") != "assistant":
            raise EvalError(f"{path}:{line}: a chat row ending with the assistant's answer is needed")
        if "images" in row or any(not isinstance(m.get("content"), str) for m in msgs):
            raise EvalError(f"{path}:{line}: image rows are not supported by this evaluation (text advisors only)")
        ref, err = parse_answer(msgs[-1]["content"])
        if err or not isinstance(ref, dict):
            raise EvalError(f"{path}:{line}: the reference answer is not a JSON object ({err})")
        bad = advisor.violations(ref)
        if bad:
            raise EvalError(f"{path}:{line}: the reference breaks the {advisor.name} contract ({bad[0]})")
        users = [m["content"] for m in msgs[:-1] if m.get("role") == "user"]
        rows.append(EvalRow(len(rows), line, users[-1] if users else "", ref, msgs[:-1], jobs.get(line)))
    if not rows:
        raise EvalError(f"{path}: no rows")
    return rows


# ---------------------------------------------------------------------------------------------
# the report


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
                     cases: Sequence[CriticalCase] | None = None, seed: int = 0,
                     resamples: int = RESAMPLES, config: dict | None = None,
                     notes: Sequence[str] = ()) -> EvalReport:
    """Score every arm's answers to `rows` and compare the arms; the model-free half of
    `evaluate()`. `answers[arm][i]` answers `rows[i]`; `critical[arm][j]` answers case j;
    `walls[arm]` is (seconds, answers, tokens) of the arm's batched run."""
    cases = list(critical_cases(advisor) if cases is None else cases)
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
    pairs = []
    if BASE in gens and ADAPTER in gens:
        pairs.append((BASE, ADAPTER))
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


def _pct(v) -> str:
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


def _num(v, fmt: str = "{:.3g}") -> str:
    return "—" if v is None else fmt.format(v)


def _cell(text: str, limit: int = 90) -> str:
    text = " ".join(str(text).split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("|", "\\|")


def _code(text: str, limit: int = 160) -> str:
    return "`" + _cell(text, limit).replace("`", "'") + "`"


def _markdown(r: EvalReport) -> str:
    arms = list(r.arms)
    c = r.comparisons[0] if r.comparisons else None
    a, b = (c["a"], c["b"]) if c else (arms[0], None)
    cfg = r.config
    lines = [f"# Evaluation: {r.advisor} ({', '.join(arms)})", ""]
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
    lines.append(f"- numbers within tolerance: |got - expected| <= max({ABS_TOL}, {REL_TOL:g} x |expected|); "
                 "bootstrap: paired, 95%, "
                 f"{(c or {}).get('exact_match', {}).get('diff', {}).get('resamples', RESAMPLES)} resamples, "
                 f"seed {(c or {}).get('exact_match', {}).get('diff', {}).get('seed', 0)}")
    for n in r.notes:
        lines.append(f"- note: {n}")
    lines += ["", "## Summary", ""]
    if c:
        lines += [f"| metric | {a} | {b} | difference (95% CI) | p-value (McNemar, {a}-only/{b}-only) |",
                  "|---|---|---|---|---|"]
        for key, label in (("parse_rate", "JSON parse rate"), ("compliance", "contract compliance"),
                           ("exact_match", "exact match"), ("field_accuracy", "field accuracy (micro)")):
            lines.append(f"| {label} | {_pct(c[key]['a'])} | {_pct(c[key]['b'])} | {_pts(c[key]['diff'])} | "
                         f"{_p(c[key].get('mcnemar'))} |")
    else:
        lines += [f"| metric | {a} |", "|---|---|"]
        for key, label in (("parse_rate", "JSON parse rate"), ("compliance", "contract compliance"),
                           ("exact_match", "exact match"), ("field_accuracy", "field accuracy (micro)")):
            lines.append(f"| {label} | {_pct(r.arms[a][key])} |")
    cols = [x for x in (a, b) if x]
    speed = [("latency p50 per answer (s)", "latency_p50_s", "{:.2f}"),
             ("latency p95 per answer (s)", "latency_p95_s", "{:.2f}"),
             ("answers/s (batched)", "answers_per_s", "{:.2f}"), ("tokens/s", "tokens_per_s", "{:.1f}"),
             ("mean tokens per answer", "mean_tokens", "{:.1f}"), ("stopped at max_tokens", "truncated", "{}")]
    for label, key, fmt in speed:
        vals = [_num(r.arms[x].get(key), fmt) for x in cols]
        lines.append(f"| {label} | " + " | ".join(vals) + (" | | |" if c else " |"))
    if r.critical:
        passed = [f"{sum(x['passed'] for x in r.critical.get(arm, []))}/{len(r.critical.get(arm, []))}" for arm in cols]
        lines.append("| critical cases passed | " + " | ".join(passed) + (" | | |" if c else " |"))

    # per field
    lines += ["", "## Per field", "",
              "Accuracy over the rows where the field is in the reference or in the answer "
              "(support = rows whose reference has it); wrong / missing / invented are the "
              f"{b or a} arm's errors.", ""]
    head = "| field | kind | support | " + " | ".join(f"{x} acc" for x in cols)
    head += " | difference (95% CI) |" if c else " |"
    head += f" {b or a}: wrong / missing / invented | {b or a}: within tol / MAE / R² or set F1 |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    last = r.arms[b or a]["fields"]
    for name, fm in last.items():
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

    # critical cases
    if r.critical:
        crit_arms = list(r.critical)
        lines += ["", "## Critical cases", "", "Only the fields named are checked, plus contract compliance.", "",
                  "| case | question | expects | " + " | ".join(crit_arms) + " |",
                  "|---|---|---|" + "---|" * len(crit_arms)]
        first = r.critical[crit_arms[0]]
        for j, case in enumerate(first):
            cells = []
            for arm in crit_arms:
                res = r.critical[arm][j]
                cells.append("PASS" if res["passed"] else "FAIL: " + _cell("; ".join(res["problems"]), 100))
            lines.append(f"| {case['name']} | {_cell(case['question'])} | "
                         f"{_code(json.dumps({k: v['expected'] for k, v in case['checks'].items()}))} | "
                         + " | ".join(cells) + " |")
        lines += ["", "Answers:", ""]
        for arm in crit_arms:
            for res in r.critical[arm]:
                lines.append(f"- {arm} / {res['name']}: {_code(res['answer'])}")

    # worst failures
    target = b or a
    fails = [row for row in r.rows if not row["arms"][target]["exact"]]

    def sev(row):
        s = row["arms"][target]
        level = 3 if not s["parsed"] else 2 if not s["compliant"] else 1
        return (-level, -len(s["problems"]), row["index"])

    fails.sort(key=sev)
    lines += ["", f"## Worst failures of the {target} arm", "",
              f"{len(fails)} of {len(r.rows)} rows are not an exact match; the worst "
              f"{min(WORST_SHOWN, len(fails))} (not JSON, then contract breaks, then most wrong fields):", ""]
    for k, row in enumerate(fails[:WORST_SHOWN], 1):
        s = row["arms"][target]
        lines += [f"{k}. **{_cell(row['question'], 200)}** (line {row['line']}"
                  + (f", {row['job_id']}" if row.get("job_id") else "") + ")",
                  f"   - expected: {_code(json.dumps(row['expected'], ensure_ascii=False, separators=(',', ':')), 300)}",
                  f"   - got: {_code(s['answer'], 300)}",
                  f"   - wrong: {_cell('; '.join(s['problems']), 400)}"]
    if not fails:
        lines.append("None.")

    # where the arms differ
    if c:
        differ = [row for row in r.rows if row["arms"][a]["exact"] != row["arms"][b]["exact"]]
        differ.sort(key=lambda row: (row["arms"][b]["exact"] is False, row["index"]))  # b wins first
        b_wins = sum(row["arms"][b]["exact"] for row in differ)
        lines += ["", f"## Where {a} and {b} differ", "",
                  f"{len(differ)} rows differ in exact match ({b} right only: {b_wins}, {a} right only: "
                  f"{len(differ) - b_wins}); a few of each:", "",
                  f"| question | expected | {a} | {b} |", "|---|---|---|---|"]
        shown = [x for x in differ if x["arms"][b]["exact"]][:DIFFER_SHOWN]
        shown += [x for x in differ if not x["arms"][b]["exact"]][:DIFFER_SHOWN]
        for row in shown:
            mark = {True: "✓ ", False: "✗ "}
            lines.append(f"| {_cell(row['question'], 80)} | "
                         f"{_code(json.dumps(row['expected'], ensure_ascii=False, separators=(',', ':')), 120)} | "
                         f"{mark[row['arms'][a]['exact']]}{_code(row['arms'][a]['answer'], 120)} | "
                         f"{mark[row['arms'][b]['exact']]}{_code(row['arms'][b]['answer'], 120)} |")

    # constrained decoding
    cons = [x for x in r.comparisons if x["b"].endswith(CONSTRAINED_SUFFIX)]
    if cons:
        lines += ["", "## Constrained decoding (JSON Schema, llguidance)", "",
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
        if cfg.get("grammar_rewrites"):
            lines += ["", "Schema rewritten for the grammar: " + "; ".join(cfg["grammar_rewrites"]) + "."]
        if cfg.get("grammar_warnings"):
            lines += ["", "Not enforced by the grammar (checked after decoding): "
                      + "; ".join(cfg["grammar_warnings"])]
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes it private; a report is ordinary output
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(report: EvalReport, out_dir: str | Path) -> Path:
    """report.md, report.json and metrics.json into `out_dir` (each file written atomically;
    other files in the folder are left alone)."""
    out = Path(out_dir).resolve()
    report.out_dir = str(out)
    _write_atomic(out / REPORT_JSON, json.dumps(report.to_dict(), indent=1, ensure_ascii=False, default=str) + "\n")
    _write_atomic(out / METRICS_JSON, json.dumps(report.summary(), indent=1, default=str) + "\n")
    _write_atomic(out / REPORT_MD, report.to_markdown())
    return out


# ---------------------------------------------------------------------------------------------
# evaluate()


def _adapter_folder(adapter_path: str | Path) -> tuple[Path, dict]:
    folder = Path(adapter_path)
    if not folder.is_dir():
        raise EvalError(f"adapter folder {folder} does not exist")
    cfg_path, weights = folder / "adapter_config.json", folder / "adapters.safetensors"
    for p in (cfg_path, weights):
        if not p.is_file():
            raise EvalError(f"{folder}: no {p.name} (an adapter folder written by `mondrian train` or `mlx_lm lora`)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise EvalError(f"{cfg_path}: not JSON ({exc.msg})") from None
    kind = cfg.get("fine_tune_type", "lora")
    if kind != "lora":
        raise EvalError(f"{folder}: fine_tune_type {kind!r}: only LoRA adapters can be switched off to get the base")
    return folder, cfg


def _parent_run(folder: Path) -> str | None:
    best = folder / "best" / "best.json"
    try:
        return json.loads(best.read_text()).get("run_id") if best.is_file() else None
    except (json.JSONDecodeError, OSError):
        return None


def evaluate(base_model: str | None, adapter_path: str | Path | None, data_dir: str | Path, advisor: Advisor, *,
             split: str = "test", limit: int | None = None, batch_size: int = 16, max_tokens: int = 256,
             db: str | Path | None = None, out_dir: str | Path | None = None, constrained: bool = False,
             seed: int = 0, resamples: int = RESAMPLES, progress: bool = False) -> EvalReport:
    """Base vs adapter on the same rows of `data_dir/<split>.jsonl`; see the module docstring.

    `base_model` is a model spec (`mondrian.models.sources.resolve`); None takes the adapter's own
    `adapter_config.json` "model". Without an adapter only the base arm runs. `db` defaults to
    the mondrian.db of the workspace holding the data (as training does); `out_dir` to
    `<db folder>/evals/<run_id>`. The run is recorded as kind "eval" (failed / interrupted
    if it does not finish).
    """
    from mondrian.models.sources import ModelError, resolve
    from mondrian.train.loop import runs_db
    from mondrian.train.runs import RunStore

    if batch_size < 1 or max_tokens < 1:
        raise EvalError("batch_size and max_tokens must be positive")
    data_dir = Path(data_dir)
    if advisor.input_kind != "text":
        raise EvalError(f"advisor {advisor.name}: only text advisors can be evaluated here")
    rows = load_rows(data_dir, split, advisor, limit)
    split_file = data_dir / f"{split}.jsonl"
    adapter, adapter_cfg = (None, {}) if adapter_path is None else _adapter_folder(adapter_path)
    spec = base_model or adapter_cfg.get("model")
    if not spec:
        raise EvalError("no base model: give one (the adapter's config does not name it)")
    try:
        card = resolve(spec)
    except ModelError as exc:
        raise EvalError(str(exc)) from exc
    cases = critical_cases(advisor)
    system = next((m for m in rows[0].messages if m.get("role") == "system"), None)
    case_msgs = [([system] if system else []) + [{"role": "user", "content": c.question}] for c in cases]

    config = {"advisor": advisor.name, "advisor_fingerprint": advisor.fingerprint, "base_model": spec,
              "base_model_path": card.path, "base_model_fingerprint": card.fingerprint,
              "adapter_path": str(adapter.resolve()) if adapter else None,
              "adapter_sha256": file_sha256(adapter / "adapters.safetensors") if adapter else None,
              "adapter_trained_on": adapter_cfg.get("model"), "data": str(data_dir), "split": split,
              "rows": len(rows), "limit": limit, "dataset_fingerprint": file_sha256(split_file),
              "batch_size": batch_size, "max_tokens": max_tokens, "constrained": constrained,
              "decoding": "greedy", "seed": seed, "resamples": resamples,
              "abs_tol": ABS_TOL, "rel_tol": REL_TOL}
    notes = []
    if adapter_cfg.get("model") and Path(adapter_cfg["model"]).resolve() != Path(card.path).resolve():
        notes.append(f"the adapter was trained on {adapter_cfg['model']}, evaluated on {card.path}")

    db_path = runs_db(SimpleNamespace(db=db), data_dir)
    db_path.parent.mkdir(parents=True, exist_ok=True)
    store = RunStore(db_path)
    run_id = store.start("eval", advisor.name, config, config["dataset_fingerprint"], spec, card.fingerprint,
                         config["adapter_path"], parent_run_id=_parent_run(adapter) if adapter else None)
    try:
        from mlx_lm import load

        model, tokenizer = load(card.path, adapter_path=str(adapter) if adapter else None)
        switch = AdapterSwitch(model) if adapter else None
        prompts = [chat_prompt(tokenizer, r.messages) for r in rows] + [chat_prompt(tokenizer, m) for m in case_msgs]
        plan = [BASE] + ([ADAPTER] if adapter else [])
        constraint = None
        if constrained:
            constraint = SchemaConstraint(advisor.schema, tokenizer)
            config["grammar_warnings"] = constraint.warnings
            config["grammar_rewrites"] = constraint.rewrites
            plan += [arm + CONSTRAINED_SUFFIX for arm in list(plan)]
        answers, crit, walls = {}, {}, {}
        for arm in plan:
            if switch:
                switch.set(arm.startswith(ADAPTER))
            procs = [constraint.processor() for _ in prompts] if arm.endswith(CONSTRAINED_SUFFIX) else None
            bar = None
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=len(prompts), desc=arm, unit="answer", file=sys.stderr)
            try:
                gens, wall = generate_batch(model, tokenizer, prompts, batch_size=batch_size, max_tokens=max_tokens,
                                            logits_processors=procs, progress=bar.update if bar else None)
            finally:
                if bar:
                    bar.close()
            answers[arm], crit[arm] = gens[: len(rows)], gens[len(rows):]
            walls[arm] = (wall, len(gens), sum(g.tokens for g in gens))
        if switch:
            switch.set(True)
        report = evaluate_answers(advisor, rows, answers, critical=crit if cases else None, walls=walls,
                                  cases=cases, seed=seed, resamples=resamples, config=config, notes=notes)
        report.run_id = run_id
        out = Path(out_dir) if out_dir else store.path.parent / "evals" / run_id
        write_report(report, out)
        store.log(run_id, 0, report.metric_rows())
        store.finish(run_id, "completed", report.summary())
        return report
    except KeyboardInterrupt:
        store.finish(run_id, "interrupted", error="interrupted")
        raise
    except BaseException as exc:
        store.finish(run_id, "failed", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        store.close()
