"""Link production jobs into training pairs: every job ends linked or rejected with a reason.

Linking goes through the job records, never through file names: in the original
system analyses were stored under hash ids that do not match the image names.
Each job is checked in a fixed order and gets exactly one outcome, so counts are
conserved: total = linked + rejected, printed and stored in the manifest summary.

The manifest folder holds `manifest.jsonl` (one row per job, in table order) and
`summary.json` (counts, reasons, fingerprints); it is written under a temporary
name and renamed into place, so a failed run never leaves a half manifest.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image
from tqdm import tqdm

import mondrian
from mondrian.core.atomic import atomic_folder
from mondrian.core.contracts import Advisor, load_advisors, loads_strict, lone_surrogate
from mondrian.core.db import connect, count_jobs, create_link_cache_tables, open_db, read_jobs
from mondrian.core.workspace import Workspace
from mondrian.link.files import FileProblem, check_regular, file_stat, pil_pixel_limit, read_regular
from mondrian.link.harvest import RETRACTED

# Reason codes, in the order the checks run. One job, one reason: the first that applies.
REASONS = {
    "job_id_missing": "the job has no id",
    "duplicate_job_id": "the job id repeats an earlier row's",
    "unknown_advisor": "no contract for the job's advisor",
    "not_completed": "the job's status is not a completed one",
    "input_missing": "no input text (text advisor) or no image path (image advisor)",
    "input_invalid": "the input text is not UTF-8 text",
    "path_outside_root": "a path resolves outside the data root (traversal, absolute path, symlink)",
    "image_missing": "the image file does not exist",
    "image_unreadable": "the image is not a readable regular file, or empty, truncated, corrupt, not an image",
    "image_file_too_large": "the image file is larger than max_image_bytes (refused unread)",
    "image_too_large": "the image declares more pixels than allowed (decompression bomb)",
    "image_hash_mismatch": "the image's sha256 differs from the one production recorded",
    "analysis_missing": "no analysis inline or on disk",
    "analysis_unreadable": "the analysis path is not a readable regular file (FIFO, socket, loop, bad name)",
    "analysis_too_large": "the analysis is larger than allowed",
    "invalid_json": "the analysis is not a UTF-8 JSON object",
    "contract_violation": "the analysis breaks the advisor's JSON Schema",
    "superseded": "a user's correction (a harvested job) answers the same input: the correction wins",
    "duplicate": "same input and same answer as an earlier linked job",
    "duplicate_conflict": "same input as an earlier linked job but a different answer",
    "internal_error": "mondrian failed on this record (a bug: please report the detail); the run went on",
}


# FileProblem kinds -> reasons (any other kind: the file is not readable as an image)
_IMAGE_REASONS = {"missing": "image_missing", "too_large": "image_file_too_large"}


class Reject(Exception):
    def __init__(self, reason: str, detail: str = ""):
        assert reason in REASONS, reason
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


def normalize_text(text: str) -> str:
    """The form under which two inputs count as the same question (dedup and leakage)."""
    return " ".join(text.lower().split())


def text_group(text: str) -> str:
    return hashlib.sha256(normalize_text(text).encode()).hexdigest()


@dataclass
class LinkSummary:
    total: int = 0
    linked: int = 0
    rejected: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    by_advisor: dict[str, dict] = field(default_factory=dict)
    fingerprints: dict = field(default_factory=dict)
    cache: dict = field(default_factory=lambda: {"hits": 0, "misses": 0})
    workspace: str = ""
    data_root: str = ""
    manifest: str = ""
    created_at: str = ""
    mondrian_version: str = mondrian.__version__
    seconds: float = 0.0

    @property
    def conserved(self) -> bool:
        return self.total == self.linked + self.rejected == self.linked + sum(self.by_reason.values())

    def line(self) -> str:
        """The conservation line every link run prints."""
        ok = "conserved" if self.conserved else "NOT CONSERVED"
        return f"{self.total} jobs = {self.linked} linked + {self.rejected} rejected ({ok})"

    def to_dict(self) -> dict:
        return asdict(self) | {"conserved": self.conserved}


class LinkCache:
    """What earlier runs learned, so a relink of unchanged data is fast:
    - images, keyed by (real path, size, mtime): sha256, size in pixels, or why unreadable;
    - contract verdicts, keyed by sha256(contract fingerprint + analysis bytes).
    """

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = connect(path, create=True)
        create_link_cache_tables(self.conn)
        self.images = {r[0]: r[1:] for r in self.conn.execute("SELECT * FROM images")}
        self.verdicts = dict(self.conn.execute("SELECT key, detail FROM verdicts"))
        self.new_images: dict[str, tuple] = {}
        self.new_verdicts: dict[bytes, str | None] = {}
        self.hits = self.misses = 0

    def image(self, path: str, st: os.stat_result, max_pixels: int) -> tuple | None:
        row = self.images.get(path)
        if row and row[0] == st.st_size and row[1] == st.st_mtime_ns and row[7] == max_pixels:
            self.hits += 1
            return row
        self.misses += 1
        return None

    def put_image(self, path: str, row: tuple) -> None:
        self.images[path] = self.new_images[path] = row

    def verdict(self, key: bytes) -> tuple[bool, str | None]:
        """(known, violation detail or None when the analysis meets the contract)."""
        if key in self.verdicts:
            return True, self.verdicts[key]
        return False, None

    def put_verdict(self, key: bytes, detail: str | None) -> None:
        self.verdicts[key] = self.new_verdicts[key] = detail

    def save(self) -> None:
        with self.conn:
            self.conn.executemany("INSERT OR REPLACE INTO images VALUES (?,?,?,?,?,?,?,?,?)",
                                  [(k, *v) for k, v in self.new_images.items()])
            self.conn.executemany("INSERT OR REPLACE INTO verdicts VALUES (?,?)",
                                  list(self.new_verdicts.items()))
        self.conn.close()


class Linker:
    def __init__(self, ws: Workspace, advisors: dict[str, Advisor], cache: LinkCache):
        self.ws, self.advisors, self.cache = ws, advisors, cache
        self.root = os.path.realpath(ws.data_path)
        self.completed = {s.strip().lower() for s in ws.completed_status}
        self.seen_ids: set[str] = set()
        self.seen_inputs: dict[tuple[str, str], tuple[str, str]] = {}  # (advisor, group) -> (job, out sha)
        self.corrections: dict[tuple[str, str], str] = {}  # (advisor, group) -> the correction's job id

    # -- paths ---------------------------------------------------------------------------------
    def resolve(self, rel, what: str) -> str:
        """The real path of `rel` (relative to the data root), refused if it escapes the root."""
        if not isinstance(rel, str) or "\x00" in rel:
            raise Reject("path_outside_root", f"{what} path {rel!r} is not a valid path")
        real = os.path.realpath(os.path.join(self.root, rel))
        if real != self.root and not real.startswith(self.root + os.sep):
            raise Reject("path_outside_root", f"{what} path {rel!r} resolves to {real}, outside {self.root}")
        return real

    # -- images --------------------------------------------------------------------------------
    def image(self, rel: str, recorded_sha) -> tuple[str, str]:
        real = self.resolve(rel, "image")
        label = f"image {rel!r}"
        try:
            st = file_stat(real, label)
            check_regular(st, label, self.ws.max_image_bytes)  # refused from stat, never read
        except FileProblem as exc:
            raise Reject(_IMAGE_REASONS.get(exc.kind, "image_unreadable"), exc.detail) from None
        row = self.cache.image(real, st, self.ws.max_image_pixels)
        if row is None:
            row = (st.st_size, st.st_mtime_ns, *self._inspect(real, rel), self.ws.max_image_pixels)
            self.cache.put_image(real, row)
        _, _, sha, _, _, reason, detail, _ = row
        if reason:
            raise Reject(reason, detail)
        if recorded_sha and str(recorded_sha).strip().lower() != sha:
            raise Reject("image_hash_mismatch",
                         f"image {rel!r} has sha256 {sha[:12]}..., production recorded {str(recorded_sha)[:12]}...")
        return real, sha

    def _inspect(self, real: str, rel: str) -> tuple:
        """(sha256, width, height, reason, detail): hash the bytes, check the declared size
        before decoding anything (a bomb is refused unread), then decode fully."""
        try:
            data = read_regular(real, f"image {rel!r}", self.ws.max_image_bytes)
        except FileProblem as exc:  # changed since the stat: refused, and not cached
            raise Reject(_IMAGE_REASONS.get(exc.kind, "image_unreadable"), exc.detail) from None
        sha = hashlib.sha256(data).hexdigest()
        if not data:
            return sha, None, None, "image_unreadable", f"image {rel!r} is empty (0 bytes)"
        limit = self.ws.max_image_pixels
        try:
            # Our header check refuses anything over the limit before decoding; Pillow's own
            # check (an error at twice its MAX_IMAGE_PIXELS) stays as the backstop, set from
            # our limit so that it never caps a larger max_image_pixels at Pillow's default.
            with warnings.catch_warnings(), pil_pixel_limit(limit):
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data))
                w, h = img.size  # from the header only
                if w * h > limit:
                    return (sha, w, h, "image_too_large",
                            f"image {rel!r} declares {w}x{h} = {w * h:,} pixels (limit {limit:,})")
                img.load()
        except Image.DecompressionBombError as exc:
            return sha, None, None, "image_too_large", f"image {rel!r}: {exc}"
        except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError...)
            return sha, None, None, "image_unreadable", f"image {rel!r}: {type(exc).__name__}: {exc}"
        return sha, w, h, None, None

    # -- analyses ------------------------------------------------------------------------------
    def analysis(self, job: dict) -> tuple[dict, bytes]:
        raw = job.get("analysis_json")
        limit = self.ws.max_analysis_bytes
        if raw is not None and (raw.strip() if isinstance(raw, str | bytes) else True):
            where = "inline analysis"
            if isinstance(raw, str):
                raw = raw.encode("utf-8", "surrogatepass")
            elif not isinstance(raw, bytes):
                raise Reject("invalid_json", f"inline analysis is a {type(raw).__name__}, not JSON text")
            if len(raw) > limit:
                raise Reject("analysis_too_large", f"inline analysis is {len(raw):,} bytes (limit {limit:,})")
        elif job.get("analysis_path"):
            rel = job["analysis_path"]
            real = self.resolve(rel, "analysis")
            where = f"analysis {rel!r}"
            try:
                raw = read_regular(real, where, limit)
            except FileProblem as exc:
                reason = {"missing": "analysis_missing", "folder": "analysis_missing",
                          "too_large": "analysis_too_large"}.get(exc.kind, "analysis_unreadable")
                raise Reject(reason, exc.detail) from None
        else:
            raise Reject("analysis_missing", "the job has neither analysis_json nor analysis_path")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise Reject("invalid_json", f"{where} is not UTF-8 (byte {exc.start})") from None
        try:
            obj = loads_strict(text)
        except json.JSONDecodeError as exc:
            raise Reject("invalid_json", f"{where}: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
        except (ValueError, RecursionError) as exc:  # NaN, duplicate keys, absurd nesting
            raise Reject("invalid_json", f"{where}: {type(exc).__name__}: {str(exc)[:200]}") from None
        if not isinstance(obj, dict):
            raise Reject("invalid_json", f"{where} is a JSON {type(obj).__name__}, not an object")
        bad = lone_surrogate(text, obj)
        if bad:
            raise Reject("invalid_json", f"{where} holds a lone surrogate {bad}, which is not text")
        return obj, raw

    # -- one job -------------------------------------------------------------------------------
    def link(self, job: dict) -> dict:
        job_id = job.get("job_id")
        if job_id is None or (isinstance(job_id, str) and not job_id.strip()):
            raise Reject("job_id_missing", f"row {job.get('_rowid')} has no job id")
        key = job_key(job_id)
        if key in self.seen_ids:
            raise Reject("duplicate_job_id", f"job id {job_id!r} appeared in an earlier row")
        self.seen_ids.add(key)
        advisor = self.advisors.get(job.get("advisor"))
        if advisor is None:
            raise Reject("unknown_advisor", f"advisor {job.get('advisor')!r} has no contract "
                                            f"(known: {', '.join(sorted(self.advisors))})")
        status = job.get("status")
        if not isinstance(status, str) or status.strip().lower() not in self.completed:
            raise Reject("not_completed", f"status {status!r} (completed: {', '.join(sorted(self.completed))})")
        inp: dict = {"text": None, "image": None, "image_sha256": None}
        if advisor.input_kind == "text":
            text = job.get("input_text")
            if isinstance(text, bytes):
                try:
                    text = text.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise Reject("input_invalid", f"input text is not UTF-8 (byte {exc.start})") from None
            if text is not None and not isinstance(text, str):
                raise Reject("input_invalid", f"input text is a {type(text).__name__}")
            if not text or not text.strip():
                raise Reject("input_missing", "the text advisor's job has no input_text")
            inp["text"] = text.strip()
            group = text_group(text)
        else:
            rel = job.get("image_path")
            if rel is None or (isinstance(rel, str) and not rel.strip()):
                raise Reject("input_missing", "the image advisor's job has no image_path")
            _, sha = self.image(rel, job.get("image_sha256"))
            inp["image"], inp["image_sha256"] = rel, sha
            group = sha
        obj, raw = self.analysis(job)
        # Schema validation dominates a relink; the verdict for these exact bytes is cached.
        key = hashlib.sha256(advisor.fingerprint.encode() + b"\0" + raw).digest()
        known, violation = self.cache.verdict(key)
        if not known:
            problems = advisor.violations(obj)
            more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
            violation = f"{problems[0]}{more}" if problems else None
            self.cache.put_verdict(key, violation)
        if violation:
            raise Reject("contract_violation", violation)
        output = advisor.normalize(obj)
        out_sha = hashlib.sha256(advisor.render(output).encode()).hexdigest()
        correction = self.corrections.get((advisor.name, group))
        if correction is not None and correction != job_key(job_id):
            raise Reject("superseded", f"job {correction!r} is a user's correction for the same input")
        first = self.seen_inputs.get((advisor.name, group))
        if first is not None:
            kind = "duplicate" if first[1] == out_sha else "duplicate_conflict"
            raise Reject(kind, f"same input as job {first[0]!r}" + (" with a different answer"
                                                                     if kind == "duplicate_conflict" else ""))
        self.seen_inputs[(advisor.name, group)] = (job_key(job_id), out_sha)
        return {"input": inp, "output": output, "output_sha256": out_sha, "group": group}


def harvested_corrections(db, ws: Workspace, contracts: dict[str, Advisor]) -> dict[tuple[str, str], str]:
    """(advisor, leakage group) -> job id of the first live correction `mondrian harvest` wrote
    for that input; they outrank every other job with the same input."""
    table = ws.jobs_table
    if table not in db.table_names() or "harvest_verdict" not in db[table].columns_dict:
        return {}
    c = ws.columns
    cols = ", ".join(f'"{name}"' if name else "NULL" for name in (c.job_id, c.advisor, c.input_text, c.image_sha256))
    out: dict[tuple[str, str], str] = {}
    rows = db.execute(f'SELECT {cols} FROM "{table}" WHERE harvest_verdict = \'corrected\' '
                      f'AND "{c.status}" <> ? ORDER BY rowid', (RETRACTED,))
    for job_id, advisor, text, image_sha in rows:
        contract = contracts.get(advisor)
        if contract is None:
            continue
        group = text_group(text or "") if contract.input_kind == "text" else (image_sha or "").lower()
        out.setdefault((advisor, group), job_key(job_id))
    return out


def job_key(job_id) -> str | None:
    """The job id as the manifest writes it: text (an INTEGER id 7 becomes "7")."""
    if job_id is None:
        return None
    return _json_safe(job_id) if isinstance(job_id, bytes) else str(job_id)


def _json_safe(value):
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _outcome(linker: Linker, job: dict, safe: dict) -> tuple[dict, str]:
    """The job's manifest row and JSON line: linked, or rejected with a reason. Nothing a
    record holds may stop the run, so an unforeseen failure on one record is that record's
    `internal_error`, with the exception named."""
    try:
        row = {**safe, "status": "linked", **linker.link(job)}
        line = json.dumps(row, ensure_ascii=False) + "\n"
        line.encode()  # strict UTF-8 here, so a string no file can hold is this record's problem
        return row, line
    except Reject as rej:
        reason, detail = rej.reason, rej.detail
    except Exception as exc:
        reason, detail = "internal_error", f"{type(exc).__name__}: {str(exc)[:300]}"
    row = {**safe, "status": "rejected", "reason": reason, "detail": detail}
    return row, json.dumps(row) + "\n"  # ASCII: escapes whatever the detail quotes


def link_workspace(ws: Workspace, out_dir: str | Path | None = None, advisors: list[str] | None = None,
                   progress: bool = True) -> LinkSummary:
    """Link every job of the workspace (or of the named advisors) into a manifest folder."""
    t0 = time.perf_counter()
    contracts = load_advisors([ws.advisors_path])
    if advisors:
        unknown = sorted(set(advisors) - set(contracts))
        if unknown:
            raise ValueError(f"unknown advisor(s) {', '.join(unknown)} (known: {', '.join(sorted(contracts))})")
    out = Path(out_dir) if out_dir else Path(ws.root) / "manifest"
    db = open_db(ws.db_path)
    cache = LinkCache(Path(ws.root) / ".mondrian" / "link_cache.sqlite")
    linker = Linker(ws, contracts, cache)
    linker.corrections = harvested_corrections(db, ws, contracts)
    summary = LinkSummary(workspace=ws.root, data_root=str(ws.data_path), manifest=str(out.resolve()))
    jobs_hash, manifest_hash = hashlib.sha256(), hashlib.sha256()
    try:
        total = count_jobs(db, ws.jobs_table)
        with atomic_folder(out) as tmp, open(tmp / "manifest.jsonl", "w", encoding="utf-8") as mf:
            bar = tqdm(read_jobs(db, ws.jobs_table, ws.columns), total=total, desc="link", unit="job",
                       disable=not progress, mininterval=0.5)
            for job in bar:
                if advisors and job.get("advisor") not in advisors:
                    continue
                safe = {"job_id": job_key(job.get("job_id")), "advisor": _json_safe(job.get("advisor"))}
                jobs_hash.update(json.dumps([_json_safe(v) for v in job.values()], default=str).encode())
                row, line = _outcome(linker, job, safe)
                summary.total += 1
                per = summary.by_advisor.setdefault(str(safe["advisor"]), {"total": 0, "linked": 0, "rejected": 0})
                per["total"] += 1
                if row["status"] == "linked":
                    summary.linked += 1
                    per["linked"] += 1
                else:
                    summary.rejected += 1
                    per["rejected"] += 1
                    summary.by_reason[row["reason"]] = summary.by_reason.get(row["reason"], 0) + 1
                manifest_hash.update(line.encode())
                mf.write(line)
            cache.save()
            summary.cache = {"hits": cache.hits, "misses": cache.misses}
            summary.fingerprints = {
                "manifest_sha256": manifest_hash.hexdigest(),
                "jobs_sha256": jobs_hash.hexdigest(),
                "contracts": {n: a.fingerprint for n, a in sorted(contracts.items())},
            }
            summary.by_reason = dict(sorted(summary.by_reason.items(), key=lambda kv: list(REASONS).index(kv[0])))
            summary.created_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            summary.seconds = round(time.perf_counter() - t0, 3)
            if not summary.conserved:  # cannot happen by construction; refuse to publish if it does
                raise RuntimeError(f"link counts are not conserved: {summary.line()}")
            (tmp / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
    finally:
        db.conn.close()
    return summary
