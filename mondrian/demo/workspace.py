"""A seeded, realistic demo workspace: a production-like `jobs` table plus the files it points to.

``write_demo_workspace(folder)`` writes::

    folder/
      mondrian.yaml            workspace config (defaults spelled out)
      mondrian.db              SQLite, WAL; table `jobs` (mondrian.core.db.create_jobs_table)
      README.md                this layout and the defect mix, with counts
      data/images/*.png        photo-critic inputs, camera/upload names (IMG_20240312_4821.png, uuids)
      data/analyses/*.json     analysis outputs under 40-hex ids that match no image name

Jobs link to their files only through their rows (`image_path`, `analysis_path`, relative to
`data/`, forward slashes), never through file names: that is what the linker has to get right.
A share of the jobs (``defect_rate``) carries exactly one defect each, of the kinds in
``REASONS``; the function returns how many rows the linker must link and reject per reason, and
which rows those are, so a linker can be tested row by row.

Everything derives from ``seed`` (including timestamps), so the same seed writes the same rows
and byte-identical files. The folder is built under a temporary sibling and renamed into place:
an interrupted build leaves nothing behind.

Modules: `job_plan` (how many jobs of each kind, in which order), `defects` (broken answers and
files), `job_rows` (each job's row and files), `workspace_readme`; this one puts them together.
"""


from __future__ import annotations

import argparse
import hashlib
import json
import random
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mondrian.core.atomic import atomic_folder
from mondrian.core.contracts import Advisor, load_advisors
from mondrian.core.db import create_jobs_table, open_db
from mondrian.core.workspace import CONFIG_NAME
from mondrian.demo.defects import production_json
from mondrian.demo.images import generate_image, png_bytes
from mondrian.demo.job_plan import FIT, LINKED, PHOTO, REASONS, ImageSample, order_jobs, plan_jobs
from mondrian.demo.job_rows import JobFiles, base_row, fit_row, photo_row
from mondrian.demo.questions import Example, generate
from mondrian.demo.workspace_readme import config_text, readme


def write_demo_workspace(folder: str | Path, n_fit: int = 2000, n_photo: int = 300, seed: int = 0,
                         image_size: int = 128, defect_rate: float = 0.08, progress: bool = False,
                         overwrite: bool = False) -> dict[str, Any]:
    """Write a demo workspace into `folder` (absent or empty; or an old workspace if overwrite).

    `n_fit` / `n_photo` are the numbers of fit-query / photo-critic rows, defects included;
    a few `legacy-critic` rows (`unknown_advisor`) come on top. Returns a summary: folder,
    jobs, by_advisor, expected {"linked", "rejected" {reason: n}}, expected_by_advisor,
    rejected_rows {row id: reason}, files, seconds.
    """
    start = time.perf_counter()
    if n_fit < 0 or n_photo < 0:
        raise ValueError(f"n_fit and n_photo must be >= 0 (got {n_fit}, {n_photo})")
    if not 0 <= defect_rate <= 0.5:
        raise ValueError(f"defect_rate must be within 0..0.5 (got {defect_rate})")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 (got {image_size})")
    folder = Path(folder).absolute()
    _check_target(folder, overwrite)  # fail before any work
    with atomic_folder(folder) as tmp:
        summary = _build(tmp, n_fit, n_photo, seed, image_size, defect_rate, progress)
        _check_target(folder, overwrite)  # again: someone may have written there meanwhile
    return {"folder": str(folder), **summary, "seconds": round(time.perf_counter() - start, 3)}


# --- target folder ---------------------------------------------------------------------------


def _looks_like_workspace(folder: Path) -> bool:
    return (folder / CONFIG_NAME).is_file() or (folder / "mondrian.db").is_file()


def _check_target(folder: Path, overwrite: bool) -> None:
    if not folder.exists():
        return
    if not folder.is_dir():
        raise FileExistsError(f"{folder}: exists and is not a folder; pick another path")
    if not any(folder.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"{folder}: folder exists and is not empty; pick an empty or new "
                              "folder, or pass overwrite=True to replace a demo workspace")
    # overwrite deletes the folder: only ever a workspace, never a folder that merely exists.
    if not _looks_like_workspace(folder):
        raise FileExistsError(f"{folder}: not a mondrian workspace (no {CONFIG_NAME} or "
                              "mondrian.db); refusing to overwrite it")


# --- inputs: distinct images and questions ---------------------------------------------------


def _render_images(n: int, size: int, rng: random.Random, advisor: Advisor,
                   progress: bool) -> list[ImageSample]:
    """n compositions with pairwise different bytes (distinct seeds can still collide)."""
    out: list[ImageSample] = []
    seen: set[str] = set()
    tries = 0
    with tqdm(total=n, desc="images", unit="img", disable=not progress) as bar:
        while len(out) < n:
            tries += 1
            if tries > 20 * n + 1000:
                raise ValueError(f"could not render {n} distinct {size}px images; use a larger size")
            s = rng.getrandbits(32)
            img, analysis = generate_image(s, size)
            png = png_bytes(img)
            digest = hashlib.sha256(png).hexdigest()
            # A good job must pass its contract, or `expected` would be wrong.
            if digest in seen or advisor.violations(analysis):
                continue
            seen.add(digest)
            out.append(ImageSample(s, png, analysis, digest))
            bar.update()
    return out


def _question_key(question: str) -> str:
    # Looser than exact text, so no two fresh questions are near-duplicates either.
    return " ".join(question.lower().split()).rstrip("?").strip()


def _questions(n: int, seed: int, advisor: Advisor) -> list[Example]:
    """n examples whose questions differ (the generator repeats some by chance)."""
    out: list[Example] = []
    seen: set[str] = set()
    rounds = 0
    while len(out) < n:
        sub_seed = random.Random(f"mondrian-demo:{seed}:questions:{rounds}").getrandbits(63)
        for ex in generate(int((n - len(out)) * 1.1) + 16, seed=sub_seed):
            key = _question_key(ex.question)
            if key not in seen and not advisor.violations(ex.answer):
                seen.add(key)
                out.append(ex)
        rounds += 1
        if rounds > 50:
            raise ValueError(f"could not generate {n} distinct questions")
    return out[:n]


def _write_db(path: Path, rows: list[dict[str, Any]]) -> None:
    db = open_db(path, create=True)
    try:
        create_jobs_table(db)
        # One transaction for all rows: fast, and a reader never sees half a table.
        with db.atomic():
            db["jobs"].insert_all(rows, batch_size=1000)
    finally:
        db.conn.close()  # the last close checkpoints WAL into the file


def _build(root: Path, n_fit: int, n_photo: int, seed: int, image_size: int, rate: float,
           progress: bool) -> dict[str, Any]:
    advisors = load_advisors()
    photo_adv, fit_adv = advisors[PHOTO], advisors[FIT]
    rng = random.Random(f"mondrian-demo:{seed}")  # str seeds hash the same in every process
    plan = plan_jobs(n_fit, n_photo, rate)
    jobs = order_jobs(plan, rng)

    # Fresh inputs for every job except the duplicates, which reuse their original's.
    repeats = ("duplicate", "duplicate_conflict")
    image_jobs = [j for j in jobs if j.advisor != FIT and j.kind not in repeats]
    text_jobs = [j for j in jobs if j.advisor == FIT and j.kind not in repeats]
    n_orphans = max(1, n_photo // 100) if n_photo else 0
    images = _render_images(len(image_jobs) + n_orphans, image_size,
                            random.Random(f"mondrian-demo:{seed}:images"), photo_adv, progress)
    for job, sample in zip(image_jobs, images, strict=False):
        job.sample = sample
    for job, ex in zip(text_jobs, _questions(len(text_jobs), seed, fit_adv), strict=True):
        job.sample = ex
    for job in jobs:
        if job.kind in repeats:
            job.sample = job.original.sample

    files = JobFiles(root / "data", random.Random(f"mondrian-demo:{seed}:names"))
    t = datetime(2024, 1, 8, 7, 30, tzinfo=UTC) + timedelta(days=rng.randrange(120))
    rows: list[dict[str, Any]] = []
    rejected_rows: dict[int, str] = {}
    next_id = rng.randrange(1000, 5000)  # production ids do not start at 1
    for rowid, job in enumerate(tqdm(jobs, desc="jobs", unit="job", disable=not progress), 1):
        t += timedelta(seconds=rng.expovariate(1 / 75))
        if job.kind == "duplicate_job_id":
            job_id = job.original.row["job_id"]
        else:
            job_id, next_id = f"job-{next_id:06d}", next_id + 1
        row = job.row = {"id": rowid, **base_row(job, rng, t, job_id)}
        if job.advisor == FIT:
            fit_row(job, row, files, rng, fit_adv)
        else:
            photo_row(job, row, files, rng, photo_adv, t)
        rows.append(row)
        if job.kind != LINKED:
            rejected_rows[rowid] = job.kind
    # Uploads and outputs no job refers to: linking must start from jobs, not from files.
    for sample in images[len(image_jobs):]:
        files.put_image(sample.png, t)
        files.put_analysis(production_json(sample.analysis, rng, in_file=True))

    _write_db(root / "mondrian.db", rows)
    counts = Counter(j.kind for j in jobs)
    by_advisor = {a: sum(c.values()) for a, c in plan.items()}
    expected = {"linked": counts[LINKED], "rejected": {r: counts[r] for r in REASONS}}
    expected_by_advisor = {a: {"linked": c.get(LINKED, 0),
                               "rejected": {r: n for r, n in c.items() if r != LINKED}}
                           for a, c in plan.items()}
    (root / CONFIG_NAME).write_text(config_text(seed))
    (root / "README.md").write_text(readme(seed, len(rows), by_advisor, expected,
                                            dict(files.count), n_orphans))
    return {"jobs": len(rows), "by_advisor": by_advisor, "expected": expected,
            "expected_by_advisor": expected_by_advisor, "rejected_rows": rejected_rows,
            "files": dict(files.count)}


def main(argv: list[str] | None = None) -> None:
    """`python -m mondrian.demo.workspace FOLDER [--seed N ...]`."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder")
    p.add_argument("--n-fit", type=int, default=2000)
    p.add_argument("--n-photo", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--defect-rate", type=float, default=0.08)
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    out = write_demo_workspace(a.folder, a.n_fit, a.n_photo, a.seed, a.image_size,
                               a.defect_rate, progress=True, overwrite=a.overwrite)
    out.pop("rejected_rows")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
