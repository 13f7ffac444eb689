"""Build train/valid/test JSONL for one advisor from a link manifest, split without leakage.

Input: a link manifest folder (`manifest.jsonl`, one JSON object per job; see `mondrian/link/linker.py`).
Output folder (written under a temp sibling name, then renamed into place):

- `train.jsonl`, `valid.jsonl`, `test.jsonl` in the advisor's trainer format:
  - text advisors, mlx-lm chat rows::

        {"messages": [{"role": "system", "content": SYSTEM},
                      {"role": "user", "content": QUESTION},
                      {"role": "assistant", "content": advisor.render(output)}]}

  - image advisors, mlx-vlm rows (paths relative to the split folder, which is where
    `mlx_vlm.trainer.datasets.load` resolves them)::

        {"images": ["images/<sha256>.png"],
         "messages": [{"role": "system", "content": SYSTEM},
                      {"role": "user", "content": [{"type": "image"}]},
                      {"role": "assistant", "content": advisor.render(output)}]}

    The user content is an explicit part list, image first (then a text part when the job
    has input text). Why not a plain string: mlx-vlm's Qwen2-VL formatter appends the image
    marker *after* string content, while Qwen2-VL's own convention is image first; a part
    list puts the image exactly where we say, whatever the model family's formatter does.
- `images/<sha256><ext>`: every image, hard-linked (copied across file systems), so the
  folder is self-contained. A hard link shares the source's bytes: edit photos by writing
  new files, never in place (the `image_sha256` check catches a changed source next build).
- `index.jsonl`: split, line, job_id and group of every row (links eval results to jobs).
- `dataset_stats.json` / `dataset_stats.md`: counts, upstream rejections, token lengths,
  truncation, output field distributions, the leakage check and fingerprints.

Splits come from a stable hash of `salt + group`: adding jobs never moves an existing row,
and every row of a leakage group (same normalized question / same image bytes) lands in the
same split. `check_leakage` re-reads the written files and proves it; a build that leaks
raises and leaves the previous output untouched.

Peer-loader pitfalls (mlx-lm 0.32.2, mlx-vlm 0.7.10):
- mlx-lm opens the JSONL without an encoding, so rows are written ASCII-only (\\u escapes).
- mlx-vlm has two `VisionDataset` classes. `mlx_vlm.trainer.vlm.sft.dataset.VisionDataset`
  (what `Trainer` / `python -m mlx_vlm.train` use) resolves relative image paths against the
  loaded split's folder; the older `mlx_vlm.trainer.datasets.VisionDataset` passes them to the
  processor as they are, i.e. relative to the process's working directory.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mondrian.core.atomic import atomic_folder
from mondrian.core.contracts import Advisor
from mondrian.core.fingerprint import file_sha256, folder_fingerprint
from mondrian.core.jsonl import read_jsonl
from mondrian.link.linker import normalize_text, text_group  # one definition of "the same input"

SPLITS = ("train", "valid", "test")
DEFAULT_RATIOS = (0.8, 0.1, 0.1)
DEFAULT_SALT = "mondrian-split-v1"
FORMAT = "mondrian-dataset/1"  # in dataset_stats.json: marks a folder this module may replace
STATS_JSON = "dataset_stats.json"
STATS_MD = "dataset_stats.md"
INDEX = "index.jsonl"
IMAGES = "images"
_RATIO_TOLERANCE = 1e-6
_TOP_STRINGS = 10  # free-text fields: how many most common values the stats list


class DatasetError(ValueError):
    """The manifest or the options cannot make a dataset; the message says why."""


class LeakageError(DatasetError):
    """A built dataset has a group in more than one split."""

    def __init__(self, report: LeakageReport):
        self.report = report
        super().__init__(f"leakage: {report.summary()}")


# ---------------------------------------------------------------------------------------------
# Grouping and splitting


def validate_ratios(ratios: Sequence[float]) -> tuple[float, float, float]:
    """(train, valid, test) as floats, or a ValueError naming what is wrong."""
    if isinstance(ratios, (str, bytes)) or not isinstance(ratios, Sequence) or len(ratios) != 3:
        raise ValueError(f"ratios must be three numbers (train, valid, test), got {ratios!r}")
    out = []
    for name, r in zip(SPLITS, ratios, strict=True):
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r):
            raise ValueError(f"ratio for '{name}' must be a finite number, got {r!r}")
        if r < 0:
            raise ValueError(f"ratio for '{name}' must not be negative, got {r}")
        out.append(float(r))
    total = sum(out)
    if abs(total - 1.0) > _RATIO_TOLERANCE:
        raise ValueError(f"ratios must sum to 1, got {total:g} ({', '.join(map(str, out))})")
    if out[0] <= 0:
        raise ValueError("ratio for 'train' must be > 0: there is nothing to train on")
    if out[1] <= 0:
        # mlx-lm trains without validation only with a warning; we want a validation loss.
        raise ValueError("ratio for 'valid' must be > 0: training needs a validation split")
    return out[0], out[1], out[2]


def _unit_interval(group: str, salt: str) -> float:
    """A stable value in [0, 1) from sha256(salt + group): first 8 bytes / 2**64."""
    digest = hashlib.sha256((salt + group).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(group: str, ratios: Sequence[float] = DEFAULT_RATIOS, salt: str = DEFAULT_SALT) -> str:
    """The split of a leakage group: a pure function of (group, ratios, salt), so rows never
    move when data is added and all rows of a group land together."""
    r = validate_ratios(ratios)
    x = _unit_interval(group, salt)
    upper = 0.0
    for name, ratio in zip(SPLITS, r, strict=True):
        upper += ratio
        if ratio > 0 and x < upper:
            return name
    # Float rounding can leave x just above the last bound: give it to the last non-empty split.
    return next(n for n, ratio in zip(reversed(SPLITS), reversed(r), strict=True) if ratio > 0)


# ---------------------------------------------------------------------------------------------
# Leakage check


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
                "problems": list(self.problems)}


def _user_text(messages: list[dict[str, Any]]) -> str:
    texts = []
    for m in messages:
        if m.get("role") != "user":
            continue
        content = m.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(p.get("text") or "" for p in content
                         if isinstance(p, dict) and p.get("type") == "text")
    return " ".join(texts)


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
    groups = {s: sum(1 for c in where.values() if c[s]) for s in SPLITS}
    leaked = [LeakedGroup(k, {s: c[s] for s in SPLITS if c[s]})
              for k, c in sorted(where.items()) if sum(1 for s in SPLITS if c[s]) > 1]
    return LeakageReport(key="+".join(sorted(kinds)) or "none", rows=rows, groups=groups,
                         leaked=leaked, problems=problems)


# ---------------------------------------------------------------------------------------------
# The build


@dataclass
class DatasetReport:
    """What a build produced; `to_dict()` is what dataset_stats.json holds (less `seconds`)."""

    out_dir: str
    advisor: str
    input_kind: str
    ratios: tuple[float, float, float]
    salt: str
    counts: dict[str, int]  # rows per split
    groups: dict[str, int]  # leakage groups per split
    manifest: dict[str, Any]  # rows read, linked, rejected upstream by reason, dropped here
    tokens: dict[str, Any]  # token lengths per split (or a note why they were skipped)
    truncated: dict[str, Any]  # per split: rows longer than max_seq_length and their job ids
    fields: dict[str, Any]  # output field distributions, all rows
    fields_by_split: dict[str, Any]
    leakage: LeakageReport
    fingerprints: dict[str, str]  # sha256 of each output file and of the manifest
    fingerprint: str  # one sha256 over the split files and images: the dataset's identity
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "out_dir": self.out_dir, "advisor": self.advisor,
            "input_kind": self.input_kind, "ratios": list(self.ratios), "salt": self.salt,
            "counts": dict(self.counts), "groups": dict(self.groups),
            "manifest": self.manifest, "tokens": self.tokens, "truncated": self.truncated,
            "fields": self.fields, "fields_by_split": self.fields_by_split,
            "leakage": self.leakage.to_dict(), "fingerprints": dict(self.fingerprints),
            "fingerprint": self.fingerprint, "warnings": list(self.warnings),
            "seconds": self.seconds,
        }


@dataclass
class _Row:
    job_id: str
    group: str
    split: str
    output: dict[str, Any]
    record: dict[str, Any]  # the JSONL row as written
    image_src: Path | None = None
    image_name: str | None = None


def _read_manifest(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line_no, row in read_jsonl(path, DatasetError):
        if not isinstance(row, dict) or not isinstance(row.get("job_id"), str):
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


def _collect(manifest: list[dict[str, Any]], advisor: Advisor, data_root: Path | None,
             ratios: tuple[float, float, float], salt: str
             ) -> tuple[list[_Row], dict[str, Any]]:
    """Rows to write, and what happened to every manifest row."""
    rejected: Counter[str] = Counter()
    dropped: dict[str, list[str]] = {}
    other: Counter[str] = Counter()
    group_mismatch = 0
    seen: set[str] = set()
    rows: list[_Row] = []
    sha_cache: dict[Path, str] = {}

    def drop(reason: str, job_id: str) -> None:
        dropped.setdefault(reason, []).append(job_id)

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
            drop(f"unknown_status:{status}", job_id)
            continue
        if job_id in seen:
            drop("duplicate_job_id", job_id)
            continue
        inp, output = m.get("input"), m.get("output")
        if not isinstance(inp, dict):
            drop("missing_input", job_id)
            continue
        # Upstream normalized it already; a row that breaks the contract must not be taught.
        if not isinstance(output, dict) or advisor.violations(output):
            drop("contract_violation", job_id)
            continue
        text = inp.get("text")
        text = text if isinstance(text, str) and text.strip() else None
        user: Any
        image_src = image_name = None
        if advisor.input_kind == "image":
            rel = inp.get("image")
            if not isinstance(rel, str) or not rel:
                drop("missing_image", job_id)
                continue
            src = (data_root / rel).resolve()
            if not _inside(src, data_root):
                drop("image_outside_data_root", job_id)
                continue
            if not src.is_file():
                drop("image_missing", job_id)
                continue
            if src not in sha_cache:
                sha_cache[src] = file_sha256(src)
            group = sha_cache[src]  # the bytes we ship are what groups rows, not the record
            if inp.get("image_sha256") not in (None, group):
                drop("image_changed", job_id)  # the file is no longer what the job saw
                continue
            image_src, image_name = src, f"{group}{src.suffix.lower() or '.png'}"
            # Explicit parts, image first: see the module docstring.
            user = [{"type": "image"}] + ([{"type": "text", "text": text}] if text else [])
            record: dict[str, Any] = {"images": [f"{IMAGES}/{image_name}"]}
        else:
            if text is None:
                drop("missing_text", job_id)
                continue
            group = text_group(text)
            user = text
            record = {}
        if m.get("group") not in (None, group):
            group_mismatch += 1  # we use our own; counted so an upstream bug is visible
        seen.add(job_id)
        record["messages"] = [
            {"role": "system", "content": advisor.system_prompt},
            {"role": "user", "content": user},
            {"role": "assistant", "content": advisor.render(output)},
        ]
        rows.append(_Row(job_id, group, split_of(group, ratios, salt), output, record,
                         image_src, image_name))

    answers: dict[str, set[str]] = {}
    for r in rows:
        answers.setdefault(r.group, set()).add(r.record["messages"][-1]["content"])
    info = {
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
    return rows, info


def _json_line(obj: Any) -> str:
    # ASCII-only: mlx-lm opens the files without an encoding, so it must not depend on locale.
    return json.dumps(obj, ensure_ascii=True, separators=(", ", ": ")) + "\n"


def _write_jsonl(path: Path, objs: Iterable[Any]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for obj in objs:
            f.write(_json_line(obj))


def _place_image(src: Path, dst: Path) -> None:
    """Hard-link when possible (no copy of big photos), else copy."""
    if dst.exists():
        return
    try:
        os.link(src, dst)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
            raise
        shutil.copyfile(src, dst)


# --- statistics -------------------------------------------------------------------------------


def _summary(values: list[int | float]) -> dict[str, Any]:
    if not values:
        return {"count": 0}
    s = sorted(values)

    def rank(q: float) -> int | float:  # nearest-rank percentile: always an observed value
        return s[max(0, math.ceil(q * len(s)) - 1)]

    return {"count": len(s), "min": s[0], "mean": round(sum(s) / len(s), 2),
            "p50": rank(0.5), "p95": rank(0.95), "max": s[-1]}


def _chat_text_only(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Messages with image parts dropped and text parts joined: what a text tokenizer sees."""
    out = []
    for m in messages:
        c = m["content"]
        if isinstance(c, list):
            c = "".join(p.get("text", "") for p in c if p.get("type") == "text")
        out.append({"role": m["role"], "content": c})
    return out


def _token_stats(rows_by_split: dict[str, list[_Row]], tokenizer_path: str | None,
                 max_seq_length: int, image_kind: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    if tokenizer_path is None:
        note = "skipped: no tokenizer_path given"
        return {"note": note}, {"note": note, "max_seq_length": max_seq_length}
    path = Path(tokenizer_path).expanduser()
    if not path.is_dir():
        # mlx-lm would treat a missing path as a hub repo id and try to download it.
        raise DatasetError(f"tokenizer_path {tokenizer_path}: no such model folder")
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(path)
    tokens: dict[str, Any] = {
        "tokenizer": str(path),
        "note": ("text tokens only: image parts are dropped before the chat template is "
                 "applied; each image adds vision tokens that depend on its resolution "
                 "(the model's image processor decides)") if image_kind else
                "whole conversation through the tokenizer's chat template, as mlx-lm trains",
    }
    truncated: dict[str, Any] = {"max_seq_length": max_seq_length}
    for split, rows in rows_by_split.items():
        full, answer, long_ids = [], [], []
        for r in rows:
            msgs = _chat_text_only(r.record["messages"]) if image_kind else r.record["messages"]
            # The same calls mlx-lm's ChatDataset makes (return_dict=False: transformers 5
            # otherwise returns a dict), so lengths and the prompt mask match training.
            n = len(tok.apply_chat_template(msgs, return_dict=False))
            prompt = len(tok.apply_chat_template(msgs[:-1], add_generation_prompt=True,
                                                 return_dict=False))
            full.append(n)
            answer.append(n - prompt)
            if n > max_seq_length:  # mlx-lm's iterate_batches cuts these
                long_ids.append(r.job_id)
        tokens[split] = {"total": _summary(full), "answer": _summary(answer)}
        truncated[split] = {"count": len(long_ids), "job_ids": long_ids}
    return tokens, truncated


def _field_kind(prop: dict[str, Any], values: list[Any]) -> str:
    t = prop.get("type")
    if isinstance(t, list):
        t = next((x for x in t if x != "null"), None)
    if t is None and values:
        v = values[0]
        t = ("boolean" if isinstance(v, bool) else "number" if isinstance(v, (int, float))
             else "array" if isinstance(v, list) else "string" if isinstance(v, str) else "other")
    if t in ("number", "integer"):
        return "number"
    if t == "string":
        return "enum" if "enum" in prop else "string"
    return t if t in ("boolean", "array") else "other"


def _value_key(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, sort_keys=True)


def _counts(values: Iterable[Any]) -> dict[str, int]:
    c = Counter(_value_key(v) for v in values)
    return dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))


def _field_stats(advisor: Advisor, outputs: list[dict[str, Any]]) -> dict[str, Any]:
    props = advisor.schema.get("properties", {})
    names = list(advisor.fields)
    names += sorted({k for o in outputs for k in o} - set(names))
    out: dict[str, Any] = {}
    for name in names:
        values = [o[name] for o in outputs if name in o]
        kind = _field_kind(props.get(name, {}), values)
        d: dict[str, Any] = {"kind": kind, "present": len(values),
                             "absent": len(outputs) - len(values)}
        if kind == "boolean":
            d["counts"] = {"true": sum(1 for v in values if v is True),
                           "false": sum(1 for v in values if v is False)}
        elif kind == "number":
            nums = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
            if nums:
                d.update(min=min(nums), mean=round(sum(nums) / len(nums), 3), max=max(nums))
        elif kind == "array":
            lists = [v for v in values if isinstance(v, list)]
            d["lengths"] = {str(k): n for k, n in sorted(Counter(map(len, lists)).items())}
            d["values"] = _counts(x for v in lists for x in v)
        elif kind == "enum":
            d["values"] = _counts(values)
        else:  # free text (or anything else): distinct count, top values, lengths
            counts = _counts(values)
            d["distinct"] = len(counts)
            d["top"] = dict(list(counts.items())[:_TOP_STRINGS])
            lengths = [len(v) for v in values if isinstance(v, str)]
            if lengths:
                d["chars"] = {"min": min(lengths), "mean": round(sum(lengths) / len(lengths), 1),
                              "max": max(lengths)}
        out[name] = d
    return out


def _markdown(r: DatasetReport) -> str:
    total = sum(r.counts.values())
    m = r.manifest
    lines = [
        f"# Dataset: {r.advisor} ({r.input_kind})", "",
        f"- fingerprint: `{r.fingerprint}`",
        f"- ratios train/valid/test: {'/'.join(f'{x:g}' for x in r.ratios)}, salt `{r.salt}`",
        f"- manifest: {m['rows']} rows, {m['linked']} used, "
        f"{m['rejected_upstream_total']} rejected upstream, "
        f"{sum(d['count'] for d in m['dropped'].values())} dropped here, "
        f"{sum(m['other_advisors'].values())} for other advisors", "",
        "## Splits", "", "| split | rows | share | groups |", "|---|---:|---:|---:|",
    ]
    for s in SPLITS:
        share = r.counts[s] / total if total else 0.0
        lines.append(f"| {s} | {r.counts[s]} | {share:.1%} | {r.groups[s]} |")
    lines.append(f"| total | {total} | | {sum(r.groups.values())} |")
    lines += ["", "## Rejected upstream (by reason)", ""]
    lines += [f"- {k}: {v}" for k, v in m["rejected_upstream"].items()] or ["- none"]
    lines += ["", "## Dropped here (by reason)", ""]
    lines += [f"- {k}: {v['count']} ({', '.join(v['job_ids'][:10])}"
              f"{', ...' if v['count'] > 10 else ''})" for k, v in m["dropped"].items()] or ["- none"]
    if m["group_mismatch"]:
        lines.append(f"- note: {m['group_mismatch']} manifest `group` values differed from the "
                     "recomputed ones (the recomputed ones were used)")
    if m["conflicting_groups"]:
        lines.append(f"- note: {m['conflicting_groups']} group(s) have more than one distinct answer")
    lines += ["", "## Token lengths", ""]
    if "train" not in r.tokens:
        lines.append(f"{r.tokens['note']}.")
    else:
        lines += [f"Tokenizer `{r.tokens['tokenizer']}`: {r.tokens['note']}.", "",
                  "| split | part | min | mean | p50 | p95 | max |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for s in SPLITS:
            for part in ("total", "answer"):
                t = r.tokens[s][part]
                if t["count"]:
                    lines.append(f"| {s} | {part} | {t['min']} | {t['mean']} | {t['p50']} | "
                                 f"{t['p95']} | {t['max']} |")
                else:
                    lines.append(f"| {s} | {part} | | | | | |")
    lines += ["", f"## Truncation (max_seq_length {r.truncated['max_seq_length']})", ""]
    if "train" not in r.truncated:
        lines.append(f"{r.truncated['note']}.")
    else:
        for s in SPLITS:
            t = r.truncated[s]
            ids = ", ".join(t["job_ids"][:20]) + (", ..." if t["count"] > 20 else "")
            lines.append(f"- {s}: {t['count']}" + (f" ({ids})" if t["count"] else ""))
    lines += ["", "## Output fields (all rows)", ""]
    for name, d in r.fields.items():
        head = f"- **{name}** ({d['kind']}): present {d['present']}, absent {d['absent']}"
        if d["kind"] == "boolean":
            head += f"; true {d['counts']['true']}, false {d['counts']['false']}"
        elif d["kind"] == "number" and "min" in d:
            head += f"; min {d['min']}, mean {d['mean']}, max {d['max']}"
        elif d["kind"] == "array":
            head += f"; lengths {d['lengths']}; values {d['values']}"
        elif d["kind"] == "enum":
            head += f"; values {d['values']}"
        elif "distinct" in d:
            head += f"; {d['distinct']} distinct; chars {d.get('chars')}"
        lines.append(head)
    lines += ["", "## Leakage check", "", f"- {r.leakage.summary()} (key: {r.leakage.key})"]
    lines += ["", "## Fingerprints (sha256)", ""]
    lines += [f"- {k}: `{v}`" for k, v in r.fingerprints.items()]
    if r.warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in r.warnings]
    return "\n".join(lines) + "\n"


# --- atomic output ----------------------------------------------------------------------------


def _is_ours(folder: Path) -> bool:
    try:
        return json.loads((folder / STATS_JSON).read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def build_dataset(
    manifest_dir: str | os.PathLike[str],
    advisor: Advisor,
    out_dir: str | os.PathLike[str],
    data_root: str | os.PathLike[str] | None = None,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    salt: str = DEFAULT_SALT,
    tokenizer_path: str | None = None,
    max_seq_length: int = 2048,
) -> DatasetReport:
    """Write the advisor's train/valid/test JSONL (and stats) from a link manifest.

    `data_root` is where the manifest's relative image paths live (image advisors need it).
    Raises DatasetError (a ValueError) on bad options or an unusable manifest, LeakageError
    if the written files leak; in both cases an existing `out_dir` is left as it was.
    """
    start = time.perf_counter()
    r = validate_ratios(ratios)
    if not isinstance(salt, str) or not salt:
        raise ValueError("salt must be a non-empty string")
    if isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int) or max_seq_length < 2:
        raise ValueError(f"max_seq_length must be an integer >= 2, got {max_seq_length!r}")
    manifest_path = Path(manifest_dir) / "manifest.jsonl"
    if not manifest_path.is_file():
        raise DatasetError(f"{manifest_dir}: no manifest.jsonl (run the link step first)")
    root = None
    if advisor.input_kind == "image":
        if data_root is None or not Path(data_root).is_dir():
            raise DatasetError(f"advisor '{advisor.name}' takes images: data_root must be the "
                               f"folder the manifest's image paths are relative to, got {data_root!r}")
        root = Path(data_root).resolve()
    target = Path(out_dir).resolve()
    if target.exists() and not (target.is_dir() and (_is_ours(target) or not any(target.iterdir()))):
        # Never replace a folder this module did not write: out_dir could be a typo'd home dir.
        raise DatasetError(f"{target} exists and is not a dataset built by mondrian.dataset.build")

    manifest = _read_manifest(manifest_path)
    rows, info = _collect(manifest, advisor, root, r, salt)
    by_split: dict[str, list[_Row]] = {s: [] for s in SPLITS}
    for row in rows:
        by_split[row.split].append(row)
    for s in SPLITS:
        by_split[s].sort(key=lambda x: (x.group, x.job_id))  # stable, input-order independent
    if not by_split["train"]:
        raise DatasetError(f"no training rows for advisor '{advisor.name}' in {manifest_path} "
                           f"({info['linked']} usable of {info['rows']} manifest rows)")
    warnings = [f"the {s} split is empty ({info['linked']} rows in all): too few rows for "
                f"ratio {ratio:g}" for s, ratio in zip(SPLITS, r, strict=True)
                if ratio > 0 and not by_split[s]]

    with atomic_folder(target) as tmp:
        images: dict[str, str] = {}  # file name -> sha256
        if any(row.image_src for row in rows):
            (tmp / IMAGES).mkdir()
            for row in rows:
                if row.image_src is not None and row.image_name is not None:
                    _place_image(row.image_src, tmp / IMAGES / row.image_name)
                    images[f"{IMAGES}/{row.image_name}"] = row.group
        for s in SPLITS:
            _write_jsonl(tmp / f"{s}.jsonl", (row.record for row in by_split[s]))
        _write_jsonl(tmp / INDEX, ({"split": s, "line": i, "job_id": row.job_id, "group": row.group}
                                   for s in SPLITS for i, row in enumerate(by_split[s], 1)))

        leakage = check_leakage(tmp)
        if not leakage.ok:
            raise LeakageError(leakage)

        tokens, truncated = _token_stats(by_split, tokenizer_path, max_seq_length,
                                         advisor.input_kind == "image")
        files = {f"{s}.jsonl": file_sha256(tmp / f"{s}.jsonl") for s in SPLITS}
        fingerprints = {**files, INDEX: file_sha256(tmp / INDEX),
                        "manifest.jsonl": file_sha256(manifest_path)}
        if images:
            # Image files are content-addressed: their listing stands for their bytes.
            fingerprints[IMAGES] = folder_fingerprint(images)
        report = DatasetReport(
            out_dir=str(target), advisor=advisor.name, input_kind=advisor.input_kind,
            ratios=r, salt=salt, counts={s: len(by_split[s]) for s in SPLITS},
            groups=dict(leakage.groups), manifest=info, tokens=tokens, truncated=truncated,
            fields=_field_stats(advisor, [row.output for row in rows]),
            fields_by_split={s: _field_stats(advisor, [row.output for row in by_split[s]])
                             for s in SPLITS},
            leakage=leakage, fingerprints=fingerprints,
            fingerprint=folder_fingerprint({**files, **images}), warnings=warnings)
        stats = report.to_dict()
        stats.pop("seconds")  # the files stay byte-identical from run to run
        (tmp / STATS_JSON).write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
        (tmp / STATS_MD).write_text(_markdown(report), encoding="utf-8")
    report.seconds = round(time.perf_counter() - start, 3)
    return report
