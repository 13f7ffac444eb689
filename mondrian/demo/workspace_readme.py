"""The demo workspace's README.md and mondrian.yaml: its layout and defect mix, with counts."""

from __future__ import annotations

from typing import Any

from mondrian.core.workspace import Workspace
from mondrian.demo.job_plan import LEGACY


def config_text(seed: int) -> str:
    ws = Workspace()
    return (f"# Demo workspace written by mondrian.demo.workspace (seed {seed}).\n"
            f"db: {ws.db}\n"
            f"data_root: {ws.data_root}\n"
            f"jobs_table: {ws.jobs_table}\n"
            f"completed_status: [{', '.join(ws.completed_status)}]\n"
            f"max_image_pixels: {ws.max_image_pixels}\n")


_DEFECTS_DOC = {
    "not_completed": "status failed / running / pending (inputs and output otherwise fine)",
    "duplicate_job_id": "repeats an earlier good row's job_id (the earlier row links)",
    "image_missing": "image_path names a file that does not exist",
    "image_unreadable": "zero-byte file, PNG cut off half way, or a text file named .png",
    "image_too_large": "a tiny 1-bit PNG declaring 48 Mpx (> max_image_pixels)",
    "image_hash_mismatch": "recorded image_sha256 differs from the file's sha256",
    "analysis_missing": "no analysis_path and no analysis_json, or a path to a missing file",
    "invalid_json": "cut-off JSON, a Python repr with single quotes, or trailing garbage",
    "contract_violation": "valid JSON breaking the advisor's schema (enum, range, missing/extra field)",
    "duplicate": "same input as an earlier good job (image bytes / question text), same answer",
    "duplicate_conflict": "same input as an earlier good job, a different valid answer",
    "input_missing": "photo-critic without image_path, fit-query with NULL or empty input_text",
    "unknown_advisor": f"advisor '{LEGACY}' has no contract",
    "path_outside_root": "image_path escapes data/ (../../etc/passwd, absolute paths)",
}


def readme(seed: int, n_jobs: int, by_advisor: dict[str, int], expected: dict[str, Any],
            files: dict[str, int], n_orphans: int) -> str:
    lines = [
        "# mondrian demo workspace",
        "",
        f"Written by `mondrian.demo.workspace.write_demo_workspace` (seed {seed}); the same seed",
        "writes the same rows and byte-identical files.",
        "",
        "| path | holds |",
        "|---|---|",
        "| `mondrian.yaml` | workspace config: database, data root, completed status |",
        f"| `mondrian.db` | SQLite (WAL), table `jobs`: {n_jobs} production job records |",
        f"| `data/images/` | {files.get('images', 0)} input images (camera / upload names) |",
        f"| `data/analyses/` | {files.get('analyses', 0)} analysis outputs (hash-named JSON) |",
        "",
        "Jobs per advisor: " + ", ".join(f"{a} {n}" for a, n in by_advisor.items()) + ".",
        "",
        "Image and analysis file names never match: a job's row is the only link",
        "(`image_path`, `analysis_path` relative to `data/`). fit-query answers are mostly",
        "inline in `analysis_json`; a fifth are in analysis files. Answers are production",
        "output (key order varies, whole numbers sometimes written as floats).",
        f"{n_orphans} image(s) and analysis file(s) belong to no job.",
        "",
        f"## Defects: {n_jobs - expected['linked']} rows, one defect each",
        "",
        "| reason | rows | what |",
        "|---|---|---|",
        *(f"| `{r}` | {n} | {_DEFECTS_DOC[r]} |" for r, n in expected["rejected"].items()),
        "",
        f"A correct linker links {expected['linked']} rows and rejects the rest with these reasons.",
        "",
    ]
    return "\n".join(lines)
