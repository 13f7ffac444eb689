"""Critical cases: the advisor's own must-pass questions (`cases:` in its YAML), asked of every
arm; each passes when the answer meets the contract and gets every field it names exactly."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from mondrian.core.contracts import Advisor, Case
from mondrian.evaluate.metrics import EvalError, same_value, score_answer, show_value


def check_case(advisor: Advisor, case: Case, text: str) -> dict:
    """Pass/fail of one answer to a critical case: compliant, and every named field equal."""
    score = score_answer(advisor, case.expect, text)
    got = score.obj if isinstance(score.obj, dict) else {}
    checks = {k: {"expected": v, "got": got.get(k), "ok": k in got and same_value(got[k], v)}
              for k, v in case.expect.items()}
    problems = []
    if not score.parsed:
        problems.append(f"not JSON ({score.error})")
    elif not score.compliant:
        problems += [f"schema: {v}" for v in score.violations[:3]]
    problems += [f"{k}: expected {show_value(c['expected'])}, got "
                 f"{show_value(c['got']) if k in got else 'nothing'}"
                 for k, c in checks.items() if not c["ok"]]
    # "question" is the key report.json has always used for the case's input
    return {"name": case.name, "question": case.input, "passed": not problems,
            "compliant": score.compliant, "checks": checks, "answer": text, "problems": problems}


def run_critical_cases(advisor: Advisor, answer: Callable[[list[str]], Sequence[str]],
                       cases: Sequence[Case] | None = None) -> list[dict]:
    """Ask `answer` (inputs -> answer texts: a model, or a stub) the critical cases, by default
    the advisor's own."""
    cases = list(advisor.cases if cases is None else cases)
    if not cases:
        return []
    texts = list(answer([c.input for c in cases]))
    if len(texts) != len(cases):
        raise EvalError(f"{len(cases)} critical questions got {len(texts)} answers")
    return [check_case(advisor, c, t) for c, t in zip(cases, texts, strict=True)]
