"""The rows an evaluation answers: a dataset split's chat rows as (prompt, reference answer).

The prompt of a row is its chat messages minus the assistant turn (exactly what training
masked as the prompt); the reference is the assistant turn parsed as JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mondrian.core.contracts import Advisor
from mondrian.core.jsonl import read_jsonl
from mondrian.evaluate.metrics import EvalError, parse_answer


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
