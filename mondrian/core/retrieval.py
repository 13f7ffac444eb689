"""Retrieval-augmented prompts: the train split's solved examples, and the k to show with a question.

An advisor opts in through its YAML (`retrieval: {k: 4}`). `mondrian dataset` then writes
`retrieval_index.json` beside the split files: one solved example (input, rendered answer,
job id) per distinct normalized train input. Every prompt of that advisor, in training rows,
in evaluation and in the service, is built by `prompt_messages`: the system prompt, the k
chosen examples as earlier user / assistant turns (most similar last, next to the question),
then the question. The model copies from solved examples instead of memorising a place table.

Similarity is TF-IDF over character n-grams within words (scikit-learn, `char_wb` 2-4, sublinear
tf), cosine: it survives typos ("yorkshrie"), abbreviations ("berks" shares "ber", "erk" with
"berkshire") and two-word questions, where word-level BM25 finds no shared token. The k examples
are then chosen to *cover* the question rather than to resemble it most (method `...-cover`,
the default): from the 64 most similar, greedily the one adding most of the question's n-gram
weight not yet shown, so one example brings the place, another the capacity phrase, another
the technology (coverage-based selection for compositional parsing, Gupta, Singh & Gardner,
"Coverage-based Example Selection for In-Context Learning", Findings of EMNLP 2023).
Questions are compared as typed; methods `...-shown` (YAML `cover-shown`, `nearest-shown`)
compare them as the advisor shows them to the model (lower-cased, amounts in kW, misspellings
mended, canonical words), indexed inputs and query alike, so "berks under 50 kilowatts" finds
the examples the model reads as "berkshire max 50 kw". Every method stays loadable: a version
is served with the method it was trained with. `scripts/bench_retrieval.py` measures
the options; its numbers are in the README.

The index file is the unit of identity: its sha256 goes on the dataset card and the version
card. Training copies it into the adapter folder, so a published version carries (and is
served with) exactly the index it was trained with; a version without one is served without
retrieval. `mondrian adapters reindex` publishes the same weights with a newer index (new
linked jobs answer at serve time without retraining).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mondrian.core.atomic import write_text_atomic
from mondrian.core.contracts import Advisor
from mondrian.core.rewrite import Speller

INDEX_FILE = "retrieval_index.json"
FORMAT = "mondrian-retrieval/1"
NEAREST = "tfidf-char_wb-2-4"  # the k most similar (indexes written before coverage)
COVER = "tfidf-char_wb-2-4-cover"  # the k covering the question's n-grams best
# The same two, comparing questions as the advisor shows them (rewritten: "berks" as
# "berkshire", "under 50 kilowatts" as "max 50 kw"), not as typed. Offline it puts more of the
# expected fields in reach, but one training run read lower on validation (README, Training),
# so it is an option, not the default.
NEAREST_SHOWN = NEAREST + "-shown"
COVER_SHOWN = COVER + "-shown"
SHOWN = (NEAREST_SHOWN, COVER_SHOWN)
METHOD = COVER  # what `mondrian dataset` writes for an advisor without `retrieval.method`
METHODS = (NEAREST, COVER, *SHOWN)
# the advisor YAML's `retrieval.method` (contracts.RETRIEVAL_METHODS)
BY_NAME = {"nearest": NEAREST, "cover": COVER, "nearest-shown": NEAREST_SHOWN, "cover-shown": COVER_SHOWN}
COVER_POOL = 64  # candidates the coverage choice looks at: the most similar ones


class RetrievalError(ValueError):
    """An index file that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class Example:
    """One solved example: the user's input, the answer exactly as the advisor writes it."""

    input: str
    answer: str
    group: str  # the input's leakage group (same normalized text = same group)
    job_id: str | None = None


class RetrievalIndex:
    """Solved examples and a similarity over their inputs; `nearest` is the one query."""

    def __init__(self, examples: list[Example], k: int, method: str = METHOD):
        if method not in METHODS:
            raise RetrievalError(f"retrieval method {method!r} is not known (this mondrian has {', '.join(METHODS)})")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise RetrievalError(f"retrieval k must be an integer >= 1, got {k!r}")
        self.examples, self.k, self.method = list(examples), k, method
        self._vectorizer: Any = None
        self._matrix: Any = None
        self._speller: Speller | None = None
        self._view: Callable[[str], str] | None = None  # text as compared (SHOWN methods)
        self._view_key: str | None = None

    # ---- identity and files

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "method": self.method, "k": self.k,
                "examples": [{"input": e.input, "answer": e.answer, "group": e.group, "job_id": e.job_id}
                             for e in self.examples]}

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=1, sort_keys=True) + "\n"

    @property
    def fingerprint(self) -> str:
        """sha256 of the file `save` writes: the same examples and k give the same fingerprint."""
        return hashlib.sha256(self.dumps().encode()).hexdigest()

    def save(self, path: str | Path) -> str:
        """Write the index atomically; returns its fingerprint."""
        text = self.dumps()
        write_text_atomic(Path(path), text)
        return hashlib.sha256(text.encode()).hexdigest()

    @classmethod
    def load(cls, path: str | Path) -> RetrievalIndex:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise RetrievalError(f"{path}: not a readable retrieval index ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise RetrievalError(f"{path}: format must be {FORMAT!r}")
        items = data.get("examples")
        if not isinstance(items, list):
            raise RetrievalError(f"{path}: examples must be a list")
        examples = []
        for i, item in enumerate(items):
            if not (isinstance(item, dict) and all(isinstance(item.get(key), str) and item[key]
                                                   for key in ("input", "answer", "group"))):
                raise RetrievalError(f"{path}: example {i + 1}: input, answer and group must be non-empty strings")
            examples.append(Example(item["input"], item["answer"], item["group"], item.get("job_id")))
        try:
            return cls(examples, data.get("k"), data.get("method"))
        except RetrievalError as exc:
            raise RetrievalError(f"{path}: {exc}") from None

    @property
    def speller(self) -> Speller:
        """The words of the indexed questions, for an advisor with `input_spelling`."""
        if self._speller is None:
            self._speller = Speller(e.input for e in self.examples)
        return self._speller

    # ---- the query

    @property
    def compares_shown(self) -> bool:
        """Whether questions are compared as an advisor shows them (`viewed_as` first)."""
        return self.method in SHOWN

    def viewed_as(self, key: str, view: Callable[[str], str]) -> RetrievalIndex:
        """Compare questions through `view` (an advisor's `shown`), identified by `key` (its
        fingerprint): indexed inputs and queries alike. A new key refits. No-op for a method
        that compares typed text, so a version trained on one is asked as it was taught."""
        if self.compares_shown and key != self._view_key:
            self._view, self._view_key = view, key
            self._vectorizer = self._matrix = None
        return self

    def viewed_by(self, advisor: Advisor) -> RetrievalIndex:
        """`viewed_as` the advisor's own view: its `shown`, mending spelling with this index's
        speller where the advisor does."""
        speller = self.speller if advisor.input_spelling else None
        return self.viewed_as(advisor.fingerprint, lambda t: advisor.shown(t, speller))

    def _compared(self, text: str) -> str:
        if not self.compares_shown:
            return text
        if self._view is None:
            raise RetrievalError(f"retrieval method {self.method!r} compares questions as an advisor shows "
                                 "them: call viewed_as (prompt_messages does) before nearest")
        return self._view(text)

    def fit(self) -> RetrievalIndex:
        """Fit the similarity now (a loader does, so no request pays it); `nearest` fits on
        first use otherwise. Idempotent."""
        if self._vectorizer is not None or not self.examples:  # nothing to fit on: nearest finds none
            return self
        from sklearn.feature_extraction.text import (  # noqa: PLC0415 - heavy: scikit-learn import ~0.5 s; only indexed advisors pay it
            TfidfVectorizer,
        )

        self._vectorizer = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), lowercase=True,
                                           sublinear_tf=True)
        self._matrix = self._vectorizer.fit_transform([self._compared(e.input) for e in self.examples])
        return self

    def nearest(self, text: str, k: int | None = None, exclude_groups: frozenset[str] | set[str] = frozenset()
                ) -> list[Example]:
        """The k examples to show for `text`, most similar first; ties keep index order (stable).
        Examples of `exclude_groups` are never returned (a training row's own group)."""
        k = self.k if k is None else k
        if not self.examples or k < 1:
            return []
        self.fit()
        query = self._vectorizer.transform([self._compared(text)])
        scores = (self._matrix @ query.T).toarray().ravel()
        order = [int(i) for i in np.argsort(-scores, kind="stable")  # stable: equal scores keep index order
                 if self.examples[i].group not in exclude_groups]
        if self.method in (NEAREST, NEAREST_SHOWN):
            chosen = order[:k]
        else:
            pool = order[:COVER_POOL]
            chosen = [pool[j] for j in sorted(_cover(self._matrix, query, pool, k))]  # similarity order
        return [self.examples[i] for i in chosen]


def _cover(matrix: Any, query: Any, pool: list[int], k: int) -> list[int]:
    """Greedy weighted coverage: each pick is the pool row adding most of the query's n-gram
    weight (its TF-IDF) not yet present in an earlier pick; ties go to the more similar row.
    Greedy is within 1 - 1/e of the best set, the coverage function being submodular.
    Returns positions in `pool`, in the order picked."""
    cols, weight = query.indices, query.data
    present = (matrix[pool][:, cols].toarray() > 0).astype(np.float64)  # pool x query n-grams
    covered = np.zeros(len(cols))
    picked: list[int] = []
    for _ in range(min(k, len(pool))):
        gain = (np.maximum(present - covered, 0.0) * weight).sum(axis=1)
        gain[picked] = -1.0
        j = int(np.argmax(gain))  # first maximum: the pool is in similarity order
        picked.append(j)
        covered = np.maximum(covered, present[j])
    return picked


def prompt_messages(advisor: Advisor, text: str | None, index: RetrievalIndex | None = None, *,
                    image: bool = False, exclude_groups: Collection[str] = ()) -> tuple[list[dict], list[Example]]:
    """The chat a model answers for `text`, and the examples it shows. The one prompt builder
    of training rows, evaluation and the service: without an index (or for an image) it is
    `advisor.messages`; with one, its chosen solved examples come first as earlier turns."""
    examples: list[Example] = []
    # the model reads questions as the advisor shows them; a SHOWN index compares them so too
    speller = index.speller if index is not None and advisor.input_spelling else None
    if index is not None and not image and text and text.strip():
        examples = index.viewed_by(advisor).nearest(text, exclude_groups=frozenset(exclude_groups))
    shots = [(e.input, e.answer) for e in reversed(examples)]  # most similar next to the question
    return advisor.messages(text, image=image, examples=shots, speller=speller), examples
