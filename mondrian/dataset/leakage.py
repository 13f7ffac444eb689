"""The leakage check: no group (same normalized question, same image bytes) in two splits.

`check_leakage` reads the written split files only: nothing from the manifest is trusted, so a
buggy splitter or a hand-edited folder is caught the same way. A row is keyed by its question
(the last user turn: earlier turns are retrieved examples). The retrieval index counts as the
train split: an index example whose input is a valid or test question is a leak too. Rows hold
questions as the model reads them (the pinned prompt's input settings: lower-cased, amounts in
one unit, misspellings mended), so index examples are keyed in the same form: two questions
typed differently that a model reads alike ("1 MW", "1000kw") are one group here.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mondrian.core.config import ConfigError
from mondrian.core.contracts import PROMPT_FILE, read_prompt, rewrites
from mondrian.core.fingerprint import file_sha256
from mondrian.core.retrieval import INDEX_FILE, RetrievalError, RetrievalIndex
from mondrian.core.rewrite import show
from mondrian.dataset.splits import SPLITS
from mondrian.link.linker import normalize_text  # one definition of "the same input"


@dataclass(frozen=True)
class LeakedGroup:
    key: str  # normalized user text, or an image sha256
    splits: dict[str, int]  # split -> rows of this group in it

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "splits": dict(self.splits)}


@dataclass
class LeakageReport:
    """Groups found in more than one split, computed from the written files only."""

    key: str  # what groups rows: "normalized_user_text", "image_sha256" (or both, mixed data)
    rows: dict[str, int]  # rows read per split
    groups: dict[str, int]  # distinct groups per split
    leaked: list[LeakedGroup] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # rows the check could not key
    index_examples: int | None = None  # examples in the retrieval index (None: no index)

    @property
    def ok(self) -> bool:
        # A row that cannot be keyed (missing image, no user text) cannot be vouched for.
        return not self.leaked and not self.problems

    def summary(self) -> str:
        if self.ok:
            return f"ok: no group in more than one split ({sum(self.groups.values())} groups)"
        parts = []
        if self.leaked:
            first = self.leaked[0]
            parts.append(f"{len(self.leaked)} group(s) in more than one split, e.g. "
                         f"{first.key[:60]!r} in {first.splits}")
        if self.problems:
            parts.append(f"{len(self.problems)} row(s) not checkable, e.g. {self.problems[0]}")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "key": self.key, "rows": dict(self.rows),
                "groups": dict(self.groups), "leaked": [g.to_dict() for g in self.leaked],
                "problems": list(self.problems), "index_examples": self.index_examples}


def _user_text(messages: list[dict[str, Any]]) -> str:
    """The question: the last user turn's text (earlier user turns are retrieved examples)."""
    users = [m for m in messages if m.get("role") == "user"]
    content = users[-1].get("content") if users else None
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text") or "" for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _index_keys(out: Path, where: dict[str, Counter[str]], problems: list[str]) -> int | None:
    """Count the retrieval index's inputs as train keys; the number of examples (None: no index)."""
    if not (out / INDEX_FILE).exists():
        return None
    try:
        index = RetrievalIndex.load(out / INDEX_FILE)
        pinned = read_prompt(out) or {}
    except (RetrievalError, ConfigError) as exc:
        problems.append(str(exc))
        return 0
    try:
        asked = rewrites(pinned, str(out / PROMPT_FILE))
    except ConfigError as exc:
        problems.append(str(exc))
        return 0
    speller = index.speller if asked["input_spelling"] else None
    for example in index.examples:
        key = normalize_text(show(example.input, units=asked["input_units"], speller=speller,
                                  synonyms=asked["input_synonyms"]))  # as the rows show it
        if key:
            where.setdefault(key, Counter())["train"] += 1
    return len(index.examples)


def check_leakage(out_dir: str | os.PathLike[str]) -> LeakageReport:
    """Re-read the three split files and report every group found in more than one split.

    Rows with images are keyed by the sha256 of each image file's bytes (read from disk,
    relative to `out_dir`); rows without by the normalized user text. Nothing from the
    manifest is trusted here.
    """
    out = Path(out_dir)
    where: dict[str, Counter[str]] = {}
    rows: dict[str, int] = {}
    problems: list[str] = []
    kinds: set[str] = set()
    image_sha: dict[Path, str | None] = {}
    for split in SPLITS:
        path = out / f"{split}.jsonl"
        rows[split] = 0
        if not path.is_file():
            continue
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                rows[split] += 1
                try:
                    row = json.loads(line)
                    messages = row["messages"]
                except (ValueError, KeyError, TypeError):
                    problems.append(f"{split}.jsonl:{line_no}: not a chat row")
                    continue
                keys = []
                images = row.get("images") or []
                if isinstance(images, str):
                    images = [images]
                if images:
                    kinds.add("image_sha256")
                    for img in images:
                        p = (out / img) if not Path(img).is_absolute() else Path(img)
                        if p not in image_sha:
                            image_sha[p] = file_sha256(p) if p.is_file() else None
                        if image_sha[p] is None:
                            problems.append(f"{split}.jsonl:{line_no}: image {img} is missing")
                        else:
                            keys.append(image_sha[p])
                else:
                    kinds.add("normalized_user_text")
                    text = normalize_text(_user_text(messages))
                    if text:
                        keys.append(text)
                    else:
                        problems.append(f"{split}.jsonl:{line_no}: no user text")
                for k in keys:
                    where.setdefault(k, Counter())[split] += 1
    index_examples = _index_keys(out, where, problems)
    groups = {s: sum(1 for c in where.values() if c[s]) for s in SPLITS}
    leaked = [LeakedGroup(k, {s: c[s] for s in SPLITS if c[s]})
              for k, c in sorted(where.items()) if sum(1 for s in SPLITS if c[s]) > 1]
    return LeakageReport(key="+".join(sorted(kinds)) or "none", rows=rows, groups=groups,
                         leaked=leaked, problems=problems, index_examples=index_examples)
