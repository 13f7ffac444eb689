"""Metrics: one answer scored against its reference, one arm's aggregate, two arms compared.

An answer is parsed as strict JSON and checked against the advisor's contract. Per-field
accuracy is taken over the rows where the field is *relevant*: present in the reference or in
the answer. A field both lack is not counted; one the reference lacks and the answer invents
is an error ("invented"), one the answer lacks is an error ("missing"). Values compare
type-strictly after canonicalization (100 == 100.0, but 1 != true and "1" != 1). Numbers also
count as right *within tolerance* when |got - expected| <= max(abs_tol, rel_tol * |expected|),
with MAE and R^2 over the rows where both have a number; lists (postcode prefixes,
technologies) are exact (order included, as the contract writes them) and also scored by set
F1.

Paired statistics for two arms on the same rows: McNemar on parse, compliance and exact match
(exact binomial when discordant pairs are few) and seeded paired-bootstrap 95% intervals on
the differences of the rates and of field accuracy.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mondrian.core.contracts import Advisor, canonical, loads_strict
from mondrian.evaluate import stats
from mondrian.models.decode import Generation

ABS_TOL = 0.5
REL_TOL = 0.05
RESAMPLES = 2000


class EvalError(ValueError):
    """The evaluation cannot run as asked; the message says why."""


# ---------------------------------------------------------------------------------------------
# scoring one answer


def value_key(value: Any) -> str:
    """A type-strict comparison key: 100 and 100.0 agree, 1 and true and "1" do not."""
    return json.dumps(canonical(value), sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def same_value(a: Any, b: Any) -> bool:
    """Equal after canonicalization, type-strictly (see `value_key`)."""
    return value_key(a) == value_key(b)


def is_number(v: Any) -> bool:
    """An int or float, not a bool (JSON true is not 1)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def show_value(v: Any, limit: int = 120) -> str:
    """Compact JSON of a value for a report line, cut at `limit` characters."""
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
                out.append(f"{name}: expected {show_value(f.expected)}, got {show_value(f.got)}")
            elif f.status == "missing":
                out.append(f"{name}: missing (expected {show_value(f.expected)})")
            elif f.status == "invented":
                out.append(f"{name}: invented {show_value(f.got)}")
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


def score_field(expected_has: bool, expected: Any, got_has: bool, got: Any) -> FieldResult:
    """One field of one answer: its status, and tolerance / set F1 where they apply."""
    if not expected_has and not got_has:
        return FieldResult("absent")
    if not got_has:
        return FieldResult("missing", expected=expected, f1=0.0 if isinstance(expected, list) else None,
                           within_tol=False if is_number(expected) else None)
    if not expected_has:
        return FieldResult("invented", got=got, f1=0.0 if isinstance(got, list) else None,
                           within_tol=False if is_number(got) else None)
    res = FieldResult("correct" if same_value(got, expected) else "wrong", expected=expected, got=got)
    if is_number(expected):
        res.within_tol = is_number(got) and abs(got - expected) <= max(ABS_TOL, REL_TOL * abs(expected))
    if isinstance(expected, list):
        res.f1 = stats.set_f1([value_key(v) for v in got], [value_key(v) for v in expected]) if isinstance(got, list) else 0.0
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
                 exact=isinstance(obj, dict) and same_value(obj, reference), obj=obj, error=error,
                 violations=violations, fields=fields, extra_keys=sorted(k for k in answer if k not in known))


# ---------------------------------------------------------------------------------------------
# metrics of one arm, comparisons of two


def _rate(flags: Sequence[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def field_metrics(advisor: Advisor, scores: Sequence[Score]) -> dict[str, dict]:
    """Per contract field: counts by status, accuracy over the relevant rows, and tolerance /
    MAE / R^2 for numbers or set F1 for lists."""
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
                 if r.status in ("correct", "wrong") and is_number(r.got) and is_number(r.expected)]
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
              "mean_tokens": sum(toks) / len(toks), "longest_tokens": max(toks),
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
