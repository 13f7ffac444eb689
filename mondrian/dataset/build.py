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
- `retrieval_index.json` (advisors with `retrieval:`): the train split's solved examples that
  every row's prompt draws its k examples from (`mondrian.dataset.examples`,
  `mondrian.core.retrieval`); training copies it into the adapter folder.
- `prompt.json`: the advisor's system prompt and input settings the rows were built with
  (`mondrian.core.contracts`); training copies it into the adapter folder too, so every
  version is asked as it was taught, whatever the advisor YAML says later.
- `index.jsonl`: split, line, job_id and group of every row (links eval results to jobs).
- `dataset_stats.json` / `dataset_stats.md`: counts, upstream rejections, token lengths,
  truncation, output field distributions, the leakage check and fingerprints.

Splits come from a stable hash of `salt + group` (`splits.py`): adding jobs never moves an
existing row, and every row of a leakage group (same normalized question / same image bytes)
lands in the same split. `leakage.check_leakage` re-reads the written files and proves it; a
build that leaks raises and leaves the previous output untouched.

Modules: `rows` (manifest -> chat rows), `splits`, `leakage`, `stats` (token lengths, output
fields), `report` (dataset_stats.json / .md); this one writes the folder.

Peer-loader pitfalls (mlx-lm 0.32.2, mlx-vlm 0.7.10):
- mlx-lm opens the JSONL without an encoding, so rows are written ASCII-only (\\u escapes).
- mlx-vlm has two `VisionDataset` classes. `mlx_vlm.trainer.vlm.sft.dataset.VisionDataset`
  (what `Trainer` / `python -m mlx_vlm.train` use) resolves relative image paths against the
  loaded split's folder; the older `mlx_vlm.trainer.datasets.VisionDataset` passes them to the
  processor as they are, i.e. relative to the process's working directory.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from mondrian.core.atomic import atomic_folder
from mondrian.core.contracts import PROMPT_FILE, Advisor, write_prompt
from mondrian.core.fingerprint import file_sha256, folder_fingerprint
from mondrian.core.retrieval import INDEX_FILE
from mondrian.dataset.examples import TWIN, add_examples, build_index, held_out_twins
from mondrian.dataset.leakage import LeakageReport, check_leakage
from mondrian.dataset.report import FORMAT, DatasetReport, render_markdown
from mondrian.dataset.rows import IMAGES, DatasetError, Row, collect_rows, read_manifest
from mondrian.dataset.splits import DEFAULT_RATIOS, DEFAULT_SALT, SPLITS, validate_ratios
from mondrian.dataset.stats import field_stats, token_stats

STATS_JSON = "dataset_stats.json"
STATS_MD = "dataset_stats.md"
INDEX = "index.jsonl"


class LeakageError(DatasetError):
    """A built dataset has a group in more than one split."""

    def __init__(self, report: LeakageReport):
        self.report = report
        super().__init__(f"leakage: {report.summary()}")


# --- writing ------------------------------------------------------------------------------------


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


def _write_rows(tmp: Path, rows: list[Row], by_split: dict[str, list[Row]]) -> dict[str, str]:
    """Images, split files and index into `tmp`; returns {image file: sha256}."""
    images: dict[str, str] = {}
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
    return images


# --- the build ----------------------------------------------------------------------------------


def _is_ours(folder: Path) -> bool:
    try:
        return json.loads((folder / STATS_JSON).read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _checked_paths(manifest_dir: str | os.PathLike[str], advisor: Advisor,
                   out_dir: str | os.PathLike[str], data_root: str | os.PathLike[str] | None
                   ) -> tuple[Path, Path | None, Path]:
    """(manifest file, resolved data root or None, resolved target), or a DatasetError."""
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
    return manifest_path, root, target


def _by_split(rows: list[Row], info: dict[str, Any], advisor: Advisor, manifest_path: Path,
              ratios: tuple[float, float, float]) -> tuple[dict[str, list[Row]], list[str]]:
    """Rows per split in a stable order, and a warning for each empty split."""
    by_split: dict[str, list[Row]] = {s: [] for s in SPLITS}
    for row in rows:
        by_split[row.split].append(row)
    for s in SPLITS:
        by_split[s].sort(key=lambda x: (x.group, x.job_id))  # stable, input-order independent
    if not by_split["train"]:
        raise DatasetError(f"no training rows for advisor '{advisor.name}' in {manifest_path} "
                           f"({info['linked']} usable of {info['rows']} manifest rows)")
    warnings = [f"the {s} split is empty ({info['linked']} rows in all): too few rows for "
                f"ratio {ratio:g}" for s, ratio in zip(SPLITS, ratios, strict=True)
                if ratio > 0 and not by_split[s]]
    return by_split, warnings


def _drop(rows: list[Row], by_split: dict[str, list[Row]], info: dict[str, Any], gone: list[Row],
          reason: str) -> list[Row]:
    """`rows` less `gone`, which the manifest outcome counts as dropped here for `reason`."""
    if not gone:
        return rows
    ids = {id(r) for r in gone}
    for s in SPLITS:
        by_split[s] = [r for r in by_split[s] if id(r) not in ids]
    info["linked"] -= len(gone)
    info["dropped"] = dict(sorted({**info["dropped"], reason: {
        "count": len(gone), "job_ids": sorted(r.job_id for r in gone)}}.items()))
    return [r for r in rows if id(r) not in ids]


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
    manifest_path, root, target = _checked_paths(manifest_dir, advisor, out_dir, data_root)
    rows, info = collect_rows(read_manifest(manifest_path), advisor, root, r, salt)
    by_split, warnings = _by_split(rows, info, advisor, manifest_path, r)
    index = build_index(advisor, by_split["train"]) if advisor.retrieval else None
    if index is not None:
        twins = held_out_twins(advisor, index, rows)
        rows = _drop(rows, by_split, info, twins, TWIN)
        warnings += [f"{len(twins)} valid/test row(s) dropped: {TWIN}"] if twins else []
        add_examples(advisor, rows, index)

    with atomic_folder(target) as tmp:
        images = _write_rows(tmp, rows, by_split)
        retrieval = None
        if index is not None:
            retrieval = {"k": index.k, "method": index.method, "examples": len(index.examples),
                         "file": INDEX_FILE, "fingerprint": index.save(tmp / INDEX_FILE)}
        write_prompt(tmp, advisor)  # how the rows ask: travels with each adapter trained on them
        leakage = check_leakage(tmp)  # reads the prompt: it keys the index as the rows read
        if not leakage.ok:
            raise LeakageError(leakage)
        tokens, truncated = token_stats(by_split, tokenizer_path, max_seq_length,
                                        advisor.input_kind == "image")
        files = {f"{s}.jsonl": file_sha256(tmp / f"{s}.jsonl") for s in SPLITS}
        files[PROMPT_FILE] = file_sha256(tmp / PROMPT_FILE)
        if retrieval:
            files[INDEX_FILE] = retrieval["fingerprint"]
        fingerprints = {**files, INDEX: file_sha256(tmp / INDEX),
                        "manifest.jsonl": file_sha256(manifest_path)}
        if images:
            # Image files are content-addressed: their listing stands for their bytes.
            fingerprints[IMAGES] = folder_fingerprint(images)
        report = DatasetReport(
            out_dir=str(target), advisor=advisor.name, input_kind=advisor.input_kind,
            ratios=r, salt=salt, counts={s: len(by_split[s]) for s in SPLITS},
            groups=dict(leakage.groups), manifest=info, tokens=tokens, truncated=truncated,
            fields=field_stats(advisor, [row.output for row in rows]),
            fields_by_split={s: field_stats(advisor, [row.output for row in by_split[s]])
                             for s in SPLITS},
            leakage=leakage, fingerprints=fingerprints,
            fingerprint=folder_fingerprint({**files, **images}), warnings=warnings,
            retrieval=retrieval)
        stats = report.to_dict()
        stats.pop("seconds")  # the files stay byte-identical from run to run
        (tmp / STATS_JSON).write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
        (tmp / STATS_MD).write_text(render_markdown(report), encoding="utf-8")
    report.seconds = round(time.perf_counter() - start, 3)
    return report
