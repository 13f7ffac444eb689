"""Manifest rows -> the chat rows one advisor trains on, and what happened to every other row.

Text advisors get mlx-lm chat rows; image advisors get mlx-vlm rows whose user content is an
explicit part list, image first (see `mondrian.dataset.build` for the formats and why).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mondrian.core.contracts import Advisor
from mondrian.core.fingerprint import file_sha256
from mondrian.core.jsonl import read_jsonl
from mondrian.core.retrieval import prompt_messages
from mondrian.dataset.splits import split_of
from mondrian.link.linker import text_group  # one definition of "the same input"

IMAGES = "images"  # the dataset's image folder, relative to the split files


class DatasetError(ValueError):
    """The manifest or the options cannot make a dataset; the message says why."""


@dataclass
class Row:
    job_id: str
    group: str
    split: str
    output: dict[str, Any]
    record: dict[str, Any]  # the JSONL row as written
    text: str | None = None  # the user's text (the retrieval index keys on it)
    image_src: Path | None = None
    image_name: str | None = None


@dataclass
class _Input:
    """A usable manifest row's user side: its leakage group and the JSONL fields it adds."""

    group: str
    text: str | None  # the user's text (None: an image alone)
    record: dict[str, Any]  # fields before "messages" ({"images": [...]} for image rows)
    image_src: Path | None = None
    image_name: str | None = None


def read_manifest(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line_no, row in read_jsonl(path, DatasetError):
        # a rejected row may lack an id (that is why it was rejected); a linked one may not
        if not isinstance(row, dict) or (row.get("status") != "rejected" and not isinstance(row.get("job_id"), str)):
            raise DatasetError(f"{path}:{line_no}: a manifest row must be an object "
                               "with a string job_id")
        rows.append(row)
    return rows


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def _image_input(inp: dict[str, Any], text: str | None, data_root: Path,
                 sha_cache: dict[Path, str]) -> _Input | str:
    rel = inp.get("image")
    if not isinstance(rel, str) or not rel:
        return "missing_image"
    src = (data_root / rel).resolve()
    if not _inside(src, data_root):
        return "image_outside_data_root"
    if not src.is_file():
        return "image_missing"
    if src not in sha_cache:
        sha_cache[src] = file_sha256(src)
    group = sha_cache[src]  # the bytes we ship are what groups rows, not the record
    if inp.get("image_sha256") not in (None, group):
        return "image_changed"  # the file is no longer what the job saw
    name = f"{group}{src.suffix.lower() or '.png'}"
    return _Input(group, text, {"images": [f"{IMAGES}/{name}"]}, src, name)


def _input_of(m: dict[str, Any], advisor: Advisor, data_root: Path | None,
              sha_cache: dict[Path, str]) -> _Input | str:
    """A linked manifest row's input, or the reason it is dropped."""
    inp, output = m.get("input"), m.get("output")
    if not isinstance(inp, dict):
        return "missing_input"
    # Upstream normalized it already; a row that breaks the contract must not be taught.
    if not isinstance(output, dict) or advisor.violations(output):
        return "contract_violation"
    text = inp.get("text")
    text = text if isinstance(text, str) and text.strip() else None
    if advisor.input_kind == "image":
        assert data_root is not None  # build_dataset requires it for image advisors
        return _image_input(inp, text, data_root, sha_cache)
    if text is None:
        return "missing_text"
    return _Input(text_group(text), text, {})


def collect_rows(manifest: list[dict[str, Any]], advisor: Advisor, data_root: Path | None,
                 ratios: tuple[float, float, float], salt: str
                 ) -> tuple[list[Row], dict[str, Any]]:
    """Rows to write, and what happened to every manifest row."""
    rejected: Counter[str] = Counter()
    other: Counter[str] = Counter()
    dropped: dict[str, list[str]] = {}
    group_mismatch = 0
    seen: set[str] = set()
    rows: list[Row] = []
    sha_cache: dict[Path, str] = {}
    for m in manifest:
        job_id = m["job_id"]
        if m.get("advisor") != advisor.name:
            other[str(m.get("advisor"))] += 1
            continue
        status = m.get("status")
        if status == "rejected":
            rejected[str(m.get("reason") or "unknown")] += 1
            continue
        if status != "linked":
            got: _Input | str = f"unknown_status:{status}"
        elif job_id in seen:
            got = "duplicate_job_id"
        else:
            got = _input_of(m, advisor, data_root, sha_cache)
        if isinstance(got, str):
            dropped.setdefault(got, []).append(job_id)
            continue
        if m.get("group") not in (None, got.group):
            group_mismatch += 1  # we use our own; counted so an upstream bug is visible
        seen.add(job_id)
        # explicit parts for images, image first: see mondrian.dataset.build's docstring
        record = {**got.record, "messages": [
            *prompt_messages(advisor, got.text, image=advisor.input_kind == "image")[0],
            {"role": "assistant", "content": advisor.render(m["output"])},
        ]}
        rows.append(Row(job_id, got.group, split_of(got.group, ratios, salt), m["output"],
                        record, got.text, got.image_src, got.image_name))
    return rows, _outcome(manifest, rows, rejected, other, dropped, group_mismatch)


def _outcome(manifest: list[dict[str, Any]], rows: list[Row], rejected: Counter[str],
             other: Counter[str], dropped: dict[str, list[str]], group_mismatch: int
             ) -> dict[str, Any]:
    answers: dict[str, set[str]] = {}
    for r in rows:
        answers.setdefault(r.group, set()).add(r.record["messages"][-1]["content"])
    return {
        "rows": len(manifest),
        "linked": len(rows),
        "rejected_upstream": dict(sorted(rejected.items())),
        "rejected_upstream_total": sum(rejected.values()),
        "dropped": {k: {"count": len(v), "job_ids": sorted(v)} for k, v in sorted(dropped.items())},
        "other_advisors": dict(sorted(other.items())),
        "group_mismatch": group_mismatch,
        # Same input, different answers: the model is taught two things for one question.
        "conflicting_groups": sum(1 for a in answers.values() if len(a) > 1),
    }
