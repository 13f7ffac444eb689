"""The rows an evaluation answers, as (prompt, reference answer):

- a dataset split's chat rows (`load_rows`): the prompt is the row's messages minus the
  assistant turn (exactly what training masked as the prompt, retrieved examples included);
- a questions file (`load_questions`): JSONL of {"input", "expected"} (optional "id"), such as
  the hand-written set; each prompt is built by the one prompt builder with the adapter's
  retrieval index (`mondrian.core.retrieval.prompt_messages`), as the service builds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mondrian.core.contracts import Advisor
from mondrian.core.jsonl import read_jsonl
from mondrian.core.retrieval import RetrievalIndex, prompt_messages
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


def load_questions(path: str | Path, advisor: Advisor, index: RetrievalIndex | None,
                   limit: int | None = None) -> list[EvalRow]:
    """A questions file's rows, prompts built with `index` (None: no examples)."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path}: no such questions file")
    rows: list[EvalRow] = []
    for line, item in read_jsonl(path, EvalError):
        if limit is not None and len(rows) >= limit:
            break
        if not isinstance(item, dict) or not isinstance(item.get("input"), str) or not item["input"].strip():
            raise EvalError(f"{path}:{line}: a question row needs a non-empty string 'input'")
        ref = item.get("expected")
        if not isinstance(ref, dict):
            raise EvalError(f"{path}:{line}: 'expected' must be the answer object")
        bad = advisor.violations(ref)
        if bad:
            raise EvalError(f"{path}:{line}: expected breaks the {advisor.name} contract ({bad[0]})")
        messages, _ = prompt_messages(advisor, item["input"], index)
        rows.append(EvalRow(len(rows), line, item["input"], ref, messages,
                            str(item["id"]) if item.get("id") is not None else None))
    if not rows:
        raise EvalError(f"{path}: no rows")
    return rows
