"""The retrieval index of a dataset (advisors with `retrieval:`), and the examples each row shows.

The index holds the train split only, one example per leakage group (its first row by job id),
so nothing of valid or test can be copied from it; `leakage.check_leakage` re-reads the file and
proves that. Every row's prompt then carries its k examples (covering or nearest: the advisor's
`retrieval.method`), never one of its own group (a row must not see its own answer, nor a
re-asked copy of it).

An advisor that rewrites questions (`input_units`, `input_spelling`, `input_synonyms`) can make
two questions typed differently read alike ("solar under 1 mw in kenf", "solar below 1000kw in
kent"). A row never sees an example that reads as it does, and of rows that read alike in more
than one split only those of the first split (train, valid, test) are kept (`held_out_twins`;
the others are dropped with a reason in the dataset's stats): the model would otherwise be
taught, or validated on, the very text it is tested on.
"""

from __future__ import annotations

from collections.abc import Callable

from mondrian.core.contracts import Advisor
from mondrian.core.retrieval import BY_NAME, Example, RetrievalIndex, prompt_messages
from mondrian.dataset.rows import Row
from mondrian.dataset.splits import SPLITS
from mondrian.link.linker import normalize_text

TWIN = "reads as a question of an earlier split once rewritten (input_units / input_spelling / input_synonyms)"


def build_index(advisor: Advisor, train: list[Row]) -> RetrievalIndex:
    """One solved example per train group, in (group, job id) order."""
    assert advisor.retrieval is not None
    examples: dict[str, Example] = {}
    for row in sorted(train, key=lambda r: (r.group, r.job_id)):
        if row.text and row.group not in examples:
            examples[row.group] = Example(row.text, advisor.render(row.output), row.group, row.job_id)
    return RetrievalIndex(list(examples.values()), advisor.retrieval.k, BY_NAME[advisor.retrieval.method])


def _reads(advisor: Advisor, index: RetrievalIndex) -> Callable[[str], str]:
    """A question's key as the model reads it (the leakage check's normalized text, rewritten)."""
    return lambda text: normalize_text(advisor.shown(text, index.speller))


def held_out_twins(advisor: Advisor, index: RetrievalIndex, rows: list[Row]) -> list[Row]:
    """Valid and test rows whose question reads as a row of another group in an earlier split
    does. (One group in two splits is the splitter's fault: the leakage check reports it.)"""
    if not advisor.rewrites_input:
        return []  # lower-casing alone keeps groups apart: they are normalized text already
    reads = _reads(advisor, index)
    keyed = [(r, reads(r.text), SPLITS.index(r.split)) for r in rows if r.text]
    seen: dict[str, list[tuple[int, str]]] = {}
    for r, key, split in keyed:
        seen.setdefault(key, []).append((split, r.group))
    return [r for r, key, split in keyed if any(s < split and g != r.group for s, g in seen[key])]


def add_examples(advisor: Advisor, rows: list[Row], index: RetrievalIndex) -> None:
    """Rebuild each row's prompt with its examples (through the one prompt builder); never an
    example of the row's group, nor one that reads as the row does."""
    reads = _reads(advisor, index)
    alike: dict[str, set[str]] = {}
    for e in index.examples:
        alike.setdefault(reads(e.input), set()).add(e.group)
    for row in rows:
        answer = row.record["messages"][-1]
        exclude = {row.group} | (alike.get(reads(row.text), set()) if row.text else set())
        messages, _ = prompt_messages(advisor, row.text, index, exclude_groups=exclude)
        row.record["messages"] = [*messages, answer]
