"""The retrieval index of a dataset (advisors with `retrieval:`), and the examples each row shows.

The index holds the train split only, one example per leakage group (its first row by job id),
so nothing of valid or test can be copied from it; `leakage.check_leakage` re-reads the file and
proves that. Every row's prompt then carries its k examples (covering or nearest: the advisor's
`retrieval.method`), never one of its own group (a row must not see its own answer, nor a
re-asked copy of it).
"""

from __future__ import annotations

from mondrian.core.contracts import Advisor
from mondrian.core.retrieval import BY_NAME, Example, RetrievalIndex, prompt_messages
from mondrian.dataset.rows import Row


def build_index(advisor: Advisor, train: list[Row]) -> RetrievalIndex:
    """One solved example per train group, in (group, job id) order."""
    assert advisor.retrieval is not None
    examples: dict[str, Example] = {}
    for row in sorted(train, key=lambda r: (r.group, r.job_id)):
        if row.text and row.group not in examples:
            examples[row.group] = Example(row.text, advisor.render(row.output), row.group, row.job_id)
    return RetrievalIndex(list(examples.values()), advisor.retrieval.k, BY_NAME[advisor.retrieval.method])


def add_examples(advisor: Advisor, rows: list[Row], index: RetrievalIndex) -> None:
    """Rebuild each row's prompt with its examples (through the one prompt builder)."""
    for row in rows:
        answer = row.record["messages"][-1]
        messages, _ = prompt_messages(advisor, row.text, index, exclude_group=row.group)
        row.record["messages"] = [*messages, answer]
