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
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import random
import struct
import time
import uuid
import zlib
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from mondrian.core.atomic import atomic_folder
from mondrian.core.contracts import Advisor, load_advisors
from mondrian.core.db import create_jobs_table, open_db
from mondrian.core.workspace import CONFIG_NAME, Workspace
from mondrian.demo import questions as fitquery_questions
from mondrian.demo.images import generate_image

PHOTO = "photo-critic"
FIT = "fit-query"
LEGACY = "legacy-critic"  # an advisor with no contract: its jobs are `unknown_advisor`
LINKED = "linked"

# Reason codes, exactly as the linker emits them.
REASONS = (
    "not_completed",
    "duplicate_job_id",
    "image_missing",
    "image_unreadable",
    "image_too_large",
    "image_hash_mismatch",
    "analysis_missing",
    "invalid_json",
    "contract_violation",
    "duplicate",
    "duplicate_conflict",
    "input_missing",
    "unknown_advisor",
    "path_outside_root",
)
IMAGE_ONLY = ("image_missing", "image_unreadable", "image_too_large", "image_hash_mismatch",
              "path_outside_root")
SHARED = ("not_completed", "duplicate_job_id", "analysis_missing", "invalid_json",
          "contract_violation", "duplicate", "duplicate_conflict", "input_missing")
# Kinds that point back at an earlier good job (its job id or its input).
DEPENDENT = ("duplicate_job_id", "duplicate", "duplicate_conflict")
# Relative frequency of each defect within an advisor's defect budget (after one of each).
WEIGHTS = {
    "not_completed": 3.0, "duplicate_job_id": 1.0, "image_missing": 1.5,
    "image_unreadable": 1.0, "image_too_large": 0.5, "image_hash_mismatch": 1.0,
    "analysis_missing": 1.5, "invalid_json": 1.5, "contract_violation": 2.0, "duplicate": 2.0,
    "duplicate_conflict": 1.0, "input_missing": 1.0, "path_outside_root": 0.5,
}
MODELS = {PHOTO: ("photo-critic-base", "photo-critic-v1"), FIT: ("fit-query-v0", "fit-query-v1"),
          LEGACY: ("legacy-critic-0.3",)}
NOT_COMPLETED = ("failed", "running", "failed", "pending")
# Escapes from the data root: some exist (a linker must not read them), some do not.
OUTSIDE_PATHS = ("../../etc/passwd", "/etc/passwd", "../mondrian.yaml", "images/../../README.md",
                 "/var/tmp/uploads/IMG_20240301_0042.png")
BOMB_SIZE = (8000, 6000)  # 48 Mpx > Workspace.max_image_pixels, < PIL's own bomb limit
SHA_RECORDED = 0.85  # share of photo jobs whose row records image_sha256
FIT_IN_FILE = 0.2  # share of fit-query answers stored in an analysis file, not inline


@dataclass(frozen=True)
class _Image:
    seed: int
    png: bytes
    analysis: dict[str, Any]
    sha256: str


@dataclass(eq=False)
class _Job:
    advisor: str
    kind: str  # LINKED or a reason code
    variant: int = 0  # which flavour of the defect (the n-th job of its kind)
    original: _Job | None = None  # DEPENDENT kinds: the earlier good job they repeat
    sample: Any = None  # _Image (photo / legacy) or fitquery_questions.Example
    row: dict[str, Any] = field(default_factory=dict)


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


# --- plan: how many jobs of each kind, in which order -------------------------------------------


def _allocate(n: int, rate: float, mandatory: tuple[str, ...],
              optional: tuple[str, ...]) -> dict[str, int]:
    """Defect counts for one advisor: one of each mandatory kind, the rest by WEIGHTS."""
    if n == 0 or rate <= 0:
        return {}
    # At least half the jobs stay good, so every dependent defect has its own original.
    budget = min(max(round(rate * n), len(mandatory)), n // 2)
    counts = Counter({k: 1 for k in mandatory[:budget]})
    kinds = [*mandatory, *optional]
    left = budget - sum(counts.values())
    total_w = sum(WEIGHTS[k] for k in kinds)
    quotas = {k: left * WEIGHTS[k] / total_w for k in kinds}
    for k in kinds:
        counts[k] += math.floor(quotas[k])
    rest = left - sum(math.floor(q) for q in quotas.values())
    # Largest remainder, ties by REASONS order: deterministic.
    for k in sorted(kinds, key=lambda k: (-(quotas[k] % 1), REASONS.index(k)))[:rest]:
        counts[k] += 1
    return {k: counts[k] for k in REASONS if counts[k]}


def _plan(n_fit: int, n_photo: int, rate: float) -> dict[str, dict[str, int]]:
    """{advisor: {kind: count}}, LINKED included; rows of each advisor sum to its n."""
    # Text jobs cannot carry image defects; shared kinds go mostly to fit-query, the bigger set,
    # but photo-critic always gets a byte-level duplicate and a violation in an analysis file.
    photo_mandatory = IMAGE_ONLY + (SHARED if n_fit == 0 else ("duplicate", "contract_violation"))
    photo = _allocate(n_photo, rate, photo_mandatory, SHARED if n_fit else ())
    fit = _allocate(n_fit, rate, SHARED, ())
    plan = {PHOTO: {LINKED: n_photo - sum(photo.values()), **photo},
            FIT: {LINKED: n_fit - sum(fit.values()), **fit}}
    n = n_fit + n_photo
    if rate > 0 and n:
        plan[LEGACY] = {"unknown_advisor": max(1, round(rate * n / len(REASONS)))}
    return plan


def _order(plan: dict[str, dict[str, int]], rng: random.Random) -> list[_Job]:
    """Interleave all jobs in production order; each dependent job after its original."""
    base: list[_Job] = []
    dependent: list[_Job] = []
    for advisor, counts in plan.items():
        for kind, count in counts.items():
            for v in range(count):
                (dependent if kind in DEPENDENT else base).append(_Job(advisor, kind, v))
    rng.shuffle(base)
    pos = {id(j): i for i, j in enumerate(base)}
    keys: dict[int, tuple[float, int, int]] = {id(j): (float(i), 0, 0) for i, j in enumerate(base)}
    for advisor in plan:
        deps = [j for j in dependent if j.advisor == advisor]
        goods = [j for j in base if j.advisor == advisor and j.kind == LINKED]
        # Distinct originals: no good job is repeated twice, so "the earlier good job" is unique.
        for seq, (job, orig) in enumerate(zip(deps, rng.sample(goods, len(deps)), strict=True)):
            job.original = orig
            keys[id(job)] = (rng.uniform(pos[id(orig)], len(base)), 1, seq)
    return sorted(base + dependent, key=lambda j: keys[id(j)])


# --- inputs: distinct images and questions ---------------------------------------------------


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _render_images(n: int, size: int, rng: random.Random, advisor: Advisor,
                   progress: bool) -> list[_Image]:
    """n compositions with pairwise different bytes (distinct seeds can still collide)."""
    out: list[_Image] = []
    seen: set[str] = set()
    tries = 0
    with tqdm(total=n, desc="images", unit="img", disable=not progress) as bar:
        while len(out) < n:
            tries += 1
            if tries > 20 * n + 1000:
                raise ValueError(f"could not render {n} distinct {size}px images; use a larger size")
            s = rng.getrandbits(32)
            img, analysis = generate_image(s, size)
            png = _png(img)
            digest = _sha(png)
            # A good job must pass its contract, or `expected` would be wrong.
            if digest in seen or advisor.violations(analysis):
                continue
            seen.add(digest)
            out.append(_Image(s, png, analysis, digest))
            bar.update()
    return out


def _question_key(question: str) -> str:
    # Looser than exact text, so no two fresh questions are near-duplicates either.
    return " ".join(question.lower().split()).rstrip("?").strip()


def _questions(n: int, seed: int, advisor: Advisor) -> list[fitquery_questions.Example]:
    """n examples whose questions differ (the generator repeats some by chance)."""
    out: list[fitquery_questions.Example] = []
    seen: set[str] = set()
    rounds = 0
    while len(out) < n:
        sub_seed = random.Random(f"mondrian-demo:{seed}:questions:{rounds}").getrandbits(63)
        for ex in fitquery_questions.generate(int((n - len(out)) * 1.1) + 16, seed=sub_seed):
            key = _question_key(ex.question)
            if key not in seen and not advisor.violations(ex.answer):
                seen.add(key)
                out.append(ex)
        rounds += 1
        if rounds > 50:
            raise ValueError(f"could not generate {n} distinct questions")
    return out[:n]


# --- answers: production serialization and defective variants ---------------------------------


def _production_json(answer: dict[str, Any], rng: random.Random, in_file: bool = False) -> str:
    """What production wrote: plain json.dumps, keys sometimes reordered, whole kW as floats."""
    obj = dict(answer)
    if rng.random() < 0.3:
        keys = list(obj)
        rng.shuffle(keys)
        obj = {k: obj[k] for k in keys}
    if rng.random() < 0.25:
        obj = {k: float(v) if k.startswith("capacity_") and isinstance(v, int) else v
               for k, v in obj.items()}
    return json.dumps(obj, indent=2 if in_file and rng.random() < 0.3 else None)


def _broken_json(answer: dict[str, Any], variant: int) -> str:
    text = json.dumps(answer)
    broken = (text[: len(text) * 2 // 3],  # cut off mid-write
              str(answer),  # a Python repr: single quotes
              text + "\n--- end of output ---")[variant % 3]  # trailing garbage
    try:
        json.loads(broken)
    except json.JSONDecodeError:
        return broken
    raise AssertionError(f"meant to be invalid JSON: {broken!r}")


def _violation(advisor: Advisor, answer: dict[str, Any], variant: int) -> dict[str, Any]:
    """Valid JSON that breaks the contract in one of a few realistic ways."""
    obj = dict(answer)
    if advisor.name == PHOTO:
        edits = (("composition_score", 11.5), ("dominant_color", "green"), ("comment", None),
                 ("confidence", 0.93), ("block_count", 0), ("primary_colors", ["purple"]))
    else:
        cap = obj.get("capacity_min_kw", 50)
        edits = (("technology", "wind"), ("capacity_min_kw", -abs(cap) or -50),
                 ("query_type", None), ("region", "south east"), ("query_type", "lookup"),
                 ("postcode_patterns", ["rg"]))
    key, value = edits[variant % len(edits)]
    if value is None:
        del obj[key]  # a missing required field
    else:
        obj[key] = value
    if not advisor.violations(obj):
        raise AssertionError(f"meant to violate {advisor.name}: {obj}")
    return obj


def _conflicting(advisor: Advisor, answer: dict[str, Any]) -> dict[str, Any]:
    """A different answer that still meets the contract (the model changed its mind)."""
    obj = dict(answer)
    if advisor.name == PHOTO:
        score = obj["composition_score"]
        obj["composition_score"] = round(score - 2.5 if score >= 2.5 else score + 2.5, 1)
    elif obj.pop("include_revenue", None) is None:
        obj["include_revenue"] = True
    if advisor.violations(obj) or advisor.render(obj) == advisor.render(answer):
        raise AssertionError(f"meant to be a valid, different answer: {obj}")
    return obj


# --- broken image files ----------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width x height: a few kB on disk, tens of Mpx once decoded."""
    row = bytes(1 + (width + 7) // 8)  # filter byte + packed bits, all zero
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(row * height, 9)) + _png_chunk(b"IEND", b""))


def _unreadable(sample: _Image, variant: int, rng: random.Random) -> bytes:
    if variant == 0:
        return b""  # one zero-byte upload; the others differ from each other
    if variant % 2:
        return sample.png[: len(sample.png) // 2]  # upload cut off half way
    return f"upload failed: storage quota exceeded (request {rng.getrandbits(64):016x})\n".encode()


def _edited_sha(sample: _Image) -> str:
    """sha256 of the image production saw: one pixel differs from the file now on disk."""
    img = Image.open(io.BytesIO(sample.png)).convert("RGB")
    r, g, b = img.getpixel((0, 0))
    img.putpixel((0, 0), (255 - r, g, b))
    return _sha(_png(img))


# --- writing ---------------------------------------------------------------------------------


class _Files:
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


def _base_row(job: _Job, rng: random.Random, created: datetime, job_id: str) -> dict[str, Any]:
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


def _analysis_text(job: _Job, answer: dict[str, Any], row: dict[str, Any], files: _Files,
                   rng: random.Random, advisor: Advisor, in_file: bool) -> str | None:
    """The analysis a job stores, by its defect kind (both advisors); None when it has none
    (analysis_missing: half of those point at a file that is never written)."""
    kind, v = job.kind, job.variant
    if kind == "analysis_missing":
        if v % 2:
            row["analysis_path"] = files.analysis_name()  # never written
        return None
    if kind == "invalid_json":
        return _broken_json(answer, v)
    if kind == "contract_violation":
        return json.dumps(_violation(advisor, answer, v))
    if kind == "duplicate_conflict":
        return json.dumps(_conflicting(advisor, answer))
    return _production_json(answer, rng, in_file)


def _photo_row(job: _Job, row: dict[str, Any], files: _Files, rng: random.Random,
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
        data = _unreadable(sample, v, rng) if kind == "image_unreadable" \
            else _bomb_png(BOMB_SIZE[0] + 8 * v, BOMB_SIZE[1])
        row["image_path"] = files.put_image(data, created)
        row["image_sha256"] = _sha(data) if recorded else None  # the hash itself is right
    elif kind == "image_hash_mismatch":
        row["image_path"], row["image_sha256"] = files.put_image(sample.png, created), \
            _edited_sha(sample)
    elif kind in ("duplicate", "duplicate_conflict") and v % 3 == 2:
        row["image_path"], row["image_sha256"] = job.original.row["image_path"], recorded
    else:  # good-looking input; duplicates re-upload the same bytes under a new name
        row["image_path"], row["image_sha256"] = files.put_image(sample.png, created), recorded
    # Output: always a file for photo-critic.
    text = _analysis_text(job, answer, row, files, rng, advisor, in_file=True)
    if text is not None:
        row["analysis_path"] = files.put_analysis(text)


def _fit_row(job: _Job, row: dict[str, Any], files: _Files, rng: random.Random,
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
    plan = _plan(n_fit, n_photo, rate)
    jobs = _order(plan, rng)

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

    files = _Files(root / "data", random.Random(f"mondrian-demo:{seed}:names"))
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
        row = job.row = {"id": rowid, **_base_row(job, rng, t, job_id)}
        if job.advisor == FIT:
            _fit_row(job, row, files, rng, fit_adv)
        else:
            _photo_row(job, row, files, rng, photo_adv, t)
        rows.append(row)
        if job.kind != LINKED:
            rejected_rows[rowid] = job.kind
    # Uploads and outputs no job refers to: linking must start from jobs, not from files.
    for sample in images[len(image_jobs):]:
        files.put_image(sample.png, t)
        files.put_analysis(_production_json(sample.analysis, rng, in_file=True))

    _write_db(root / "mondrian.db", rows)
    counts = Counter(j.kind for j in jobs)
    by_advisor = {a: sum(c.values()) for a, c in plan.items()}
    expected = {"linked": counts[LINKED], "rejected": {r: counts[r] for r in REASONS}}
    expected_by_advisor = {a: {"linked": c.get(LINKED, 0),
                               "rejected": {r: n for r, n in c.items() if r != LINKED}}
                           for a, c in plan.items()}
    (root / CONFIG_NAME).write_text(_config_text(seed))
    (root / "README.md").write_text(_readme(seed, len(rows), by_advisor, expected,
                                            dict(files.count), n_orphans))
    return {"jobs": len(rows), "by_advisor": by_advisor, "expected": expected,
            "expected_by_advisor": expected_by_advisor, "rejected_rows": rejected_rows,
            "files": dict(files.count)}


def _config_text(seed: int) -> str:
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


def _readme(seed: int, n_jobs: int, by_advisor: dict[str, int], expected: dict[str, Any],
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


def main(argv: list[str] | None = None) -> None:
    """`python -m mondrian.demo.workspace FOLDER [--seed N ...]`."""
    import argparse

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
