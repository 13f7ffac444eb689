"""The demo's `jobs` rows and the files they point to, one job at a time.

Files get random-looking names (camera-style or uuid images, 40-hex analysis files) that never
match each other: a job's row is the only link, which is what the linker has to get right.
"""

from __future__ import annotations

import hashlib
import json
import random
import uuid
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from mondrian.core.contracts import Advisor
from mondrian.demo.defects import (
    bomb_png,
    broken_json,
    conflicting,
    edited_sha,
    production_json,
    unreadable,
    violation,
)
from mondrian.demo.job_plan import FIT, LEGACY, PHOTO, Job

MODELS = {PHOTO: ("photo-critic-base", "photo-critic-v1"), FIT: ("fit-query-v0", "fit-query-v1"),
          LEGACY: ("legacy-critic-0.3",)}
NOT_COMPLETED = ("failed", "running", "failed", "pending")
# Escapes from the data root: some exist (a linker must not read them), some do not.
OUTSIDE_PATHS = ("../../etc/passwd", "/etc/passwd", "../mondrian.yaml", "images/../../README.md",
                 "/var/tmp/uploads/IMG_20240301_0042.png")
BOMB_SIZE = (8000, 6000)  # 48 Mpx > Workspace.max_image_pixels, < PIL's own bomb limit
SHA_RECORDED = 0.85  # share of photo jobs whose row records image_sha256
FIT_IN_FILE = 0.2  # share of fit-query answers stored in an analysis file, not inline


class JobFiles:
    """Writes under data/; hands out unique, random-looking names from the seeded rng."""

    def __init__(self, data: Path, rng: random.Random):
        self.data, self.rng = data, rng
        self.names: set[str] = set()
        (data / "images").mkdir(parents=True)
        (data / "analyses").mkdir()
        self.count = Counter[str]()

    def _unique(self, make) -> str:
        while (name := make()) in self.names:
            pass
        self.names.add(name)
        return name

    def image_name(self, when: datetime) -> str:
        def make() -> str:
            if self.rng.random() < 0.7:  # camera-style, dated the day of the job
                return f"images/IMG_{when:%Y%m%d}_{self.rng.randrange(10000):04d}.png"
            return f"images/{uuid.UUID(int=self.rng.getrandbits(128), version=4)}.png"
        return self._unique(make)

    def analysis_name(self) -> str:
        return self._unique(lambda: f"analyses/{self.rng.getrandbits(160):040x}.json")

    def put(self, rel: str, data: bytes) -> str:
        (self.data / rel).write_bytes(data)
        self.count[rel.split("/")[0]] += 1
        return rel

    def put_image(self, data: bytes, when: datetime) -> str:
        return self.put(self.image_name(when), data)

    def put_analysis(self, text: str) -> str:
        return self.put(self.analysis_name(), text.encode())


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def base_row(job: Job, rng: random.Random, created: datetime, job_id: str) -> dict[str, Any]:
    status = NOT_COMPLETED[job.variant % len(NOT_COMPLETED)] if job.kind == "not_completed" \
        else "completed"
    done = created + timedelta(seconds=rng.uniform(0.8, 40.0))
    models = MODELS[job.advisor]
    return {"job_id": job_id, "advisor": job.advisor, "status": status,
            "image_path": None, "image_sha256": None, "input_text": None,
            "analysis_path": None, "analysis_json": None,
            "model": models[0] if rng.random() < 0.75 else models[-1],
            "created_at": _iso(created),
            "completed_at": None if status in ("pending", "running") else _iso(done)}


def _analysis_text(job: Job, answer: dict[str, Any], row: dict[str, Any], files: JobFiles,
                   rng: random.Random, advisor: Advisor, in_file: bool) -> str | None:
    """The analysis a job stores, by its defect kind (both advisors); None when it has none
    (analysis_missing: half of those point at a file that is never written)."""
    kind, v = job.kind, job.variant
    if kind == "analysis_missing":
        if v % 2:
            row["analysis_path"] = files.analysis_name()  # never written
        return None
    if kind == "invalid_json":
        return broken_json(answer, v)
    if kind == "contract_violation":
        return json.dumps(violation(advisor, answer, v))
    if kind == "duplicate_conflict":
        return json.dumps(conflicting(advisor, answer))
    return production_json(answer, rng, in_file)


def photo_row(job: Job, row: dict[str, Any], files: JobFiles, rng: random.Random,
               advisor: Advisor, created: datetime) -> None:
    kind, v, sample = job.kind, job.variant, job.sample
    answer = sample.analysis
    recorded = sample.sha256 if rng.random() < SHA_RECORDED else None
    # Input.
    if kind == "input_missing":
        pass
    elif kind == "path_outside_root":
        row["image_path"] = OUTSIDE_PATHS[v % len(OUTSIDE_PATHS)]
    elif kind == "image_missing":
        row["image_path"], row["image_sha256"] = files.image_name(created), recorded
    elif kind in ("image_unreadable", "image_too_large"):
        data = unreadable(sample, v, rng) if kind == "image_unreadable" \
            else bomb_png(BOMB_SIZE[0] + 8 * v, BOMB_SIZE[1])
        row["image_path"] = files.put_image(data, created)
        row["image_sha256"] = hashlib.sha256(data).hexdigest() if recorded else None  # the hash itself is right
    elif kind == "image_hash_mismatch":
        row["image_path"], row["image_sha256"] = files.put_image(sample.png, created), \
            edited_sha(sample)
    elif kind in ("duplicate", "duplicate_conflict") and v % 3 == 2:
        row["image_path"], row["image_sha256"] = job.original.row["image_path"], recorded
    else:  # good-looking input; duplicates re-upload the same bytes under a new name
        row["image_path"], row["image_sha256"] = files.put_image(sample.png, created), recorded
    # Output: always a file for photo-critic.
    text = _analysis_text(job, answer, row, files, rng, advisor, in_file=True)
    if text is not None:
        row["analysis_path"] = files.put_analysis(text)


def fit_row(job: Job, row: dict[str, Any], files: JobFiles, rng: random.Random,
             advisor: Advisor) -> None:
    kind, v = job.kind, job.variant
    question, answer = job.sample.question, job.sample.answer
    row["input_text"] = (None, "")[v % 2] if kind == "input_missing" else question
    in_file = rng.random() < FIT_IN_FILE
    text = _analysis_text(job, answer, row, files, rng, advisor, in_file)
    if text is None:
        return
    if in_file:
        row["analysis_path"] = files.put_analysis(text)
    else:
        row["analysis_json"] = text
