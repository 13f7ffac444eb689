"""The demo workspace: loads, is reproducible, carries exactly the defects it claims, builds atomically.

`_classify` below is an independent reference check: for every row it collects *all* the
defects the row has (not the first one found), so "exactly one defect per rejected row" and the
exact `expected` counts hold whatever order a linker checks things in.
"""

import hashlib
import io
import json
import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from mondrian.core.contracts import load_advisors
from mondrian.core.db import JOB_COLUMNS, open_db, read_jobs
from mondrian.core.workspace import load_workspace
from mondrian.demo import workspace as demo_workspace
from mondrian.demo.images import analyze_image
from mondrian.demo.job_plan import REASONS, plan_jobs
from mondrian.demo.workspace import write_demo_workspace

SMALL = {"n_fit": 300, "n_photo": 60, "image_size": 64}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _rows(folder: Path) -> list[tuple]:
    db = open_db(folder / "mondrian.db")
    try:
        return list(db.execute("SELECT * FROM jobs ORDER BY id"))
    finally:
        db.conn.close()


def _file_hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): _sha(p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "mondrian.db"}


def _jobs(folder: Path) -> list[dict]:
    db = open_db(folder / "mondrian.db")
    try:
        return list(read_jobs(db))
    finally:
        db.conn.close()


def _answer_text(job: dict, data: Path) -> str | None:
    if job["analysis_json"] is not None:
        return job["analysis_json"]
    if job["analysis_path"] and (data / job["analysis_path"]).is_file():
        return (data / job["analysis_path"]).read_text()
    return None


def _classify(folder: Path) -> list[tuple[dict, set[str]]]:
    """Every defect of every row, computed from the rows and files alone."""
    ws = load_workspace(folder)
    data = ws.data_path
    advisors = load_advisors()
    seen_ids: set[str] = set()
    linked: dict[tuple[str, str], str] = {}  # (advisor, input key) -> rendered answer
    out = []
    for job in _jobs(folder):
        d: set[str] = set()
        adv = advisors.get(job["advisor"])
        if job["status"] not in ws.completed_status:
            d.add("not_completed")
        if job["job_id"] in seen_ids:
            d.add("duplicate_job_id")
        seen_ids.add(job["job_id"])
        if adv is None:
            d.add("unknown_advisor")
        key = None
        if adv is not None and adv.input_kind == "text":
            if not job["input_text"]:
                d.add("input_missing")
            key = job["input_text"]
        elif job["image_path"] is None:
            d.add("input_missing")
        else:
            path = (data / job["image_path"]).resolve()
            if not path.is_relative_to(data):
                d.add("path_outside_root")
            elif not path.is_file():
                d.add("image_missing")
            else:
                raw = path.read_bytes()
                key = _sha(raw)
                if job["image_sha256"] and job["image_sha256"] != key:
                    d.add("image_hash_mismatch")
                try:
                    with Image.open(io.BytesIO(raw)) as im:
                        if im.width * im.height > ws.max_image_pixels:
                            d.add("image_too_large")
                        else:
                            im.load()
                except OSError:
                    d.add("image_unreadable")
        text = _answer_text(job, data)
        answer = None
        if text is None:
            d.add("analysis_missing")
        else:
            try:
                answer = json.loads(text)
            except json.JSONDecodeError:
                d.add("invalid_json")
            else:
                if adv is not None and adv.violations(answer):
                    d.add("contract_violation")
                    answer = None
        if adv is not None and key and answer is not None:
            prev = linked.get((adv.name, key))
            if prev is not None:
                d.add("duplicate" if prev == adv.render(answer) else "duplicate_conflict")
            elif not d:
                linked[(adv.name, key)] = adv.render(answer)
        out.append((job, d))
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("demo") / "ws"
    return folder, write_demo_workspace(folder, seed=0, **SMALL)


def test_loads_with_canonical_columns_and_counts(built) -> None:
    folder, summary = built
    ws = load_workspace(folder)
    assert ws.db_path == (folder / "mondrian.db").resolve() and ws.data_path.is_dir()
    db = open_db(ws.db_path)
    try:
        assert set(JOB_COLUMNS) <= set(db["jobs"].columns_dict)
        per_advisor = dict(db.execute("SELECT advisor, count(*) FROM jobs GROUP BY advisor"))
        total = db.execute("SELECT count(*) FROM jobs").fetchone()[0]
    finally:
        db.conn.close()
    assert per_advisor == summary["by_advisor"]
    assert summary["by_advisor"]["photo-critic"] == 60 and summary["by_advisor"]["fit-query"] == 300
    assert total == summary["jobs"] == sum(summary["by_advisor"].values())
    expected = summary["expected"]
    assert expected["linked"] + sum(expected["rejected"].values()) == summary["jobs"]
    assert set(expected["rejected"]) == set(REASONS)
    assert all(n >= 1 for n in expected["rejected"].values()), expected
    assert len(summary["rejected_rows"]) == sum(expected["rejected"].values())
    assert (folder / "README.md").read_text().startswith("# mondrian demo workspace")
    assert not list(folder.parent.glob(".ws.building-*"))


def test_every_row_has_exactly_the_claimed_defect(built) -> None:
    folder, summary = built
    got = Counter()
    for job, defects in _classify(folder):
        claimed = summary["rejected_rows"].get(job["_rowid"], "linked")
        assert len(defects) <= 1, (job, defects)
        assert (next(iter(defects)) if defects else "linked") == claimed, (job, defects)
        got[claimed] += 1
    assert got["linked"] == summary["expected"]["linked"]
    assert {r: got[r] for r in REASONS} == summary["expected"]["rejected"]


def test_file_conventions_and_good_answers(built) -> None:
    folder, summary = built
    data = folder / "data"
    image_stems = {p.stem for p in (data / "images").iterdir()}
    analysis_stems = {p.stem for p in (data / "analyses").iterdir()}
    assert image_stems and analysis_stems and not image_stems & analysis_stems
    assert all(re.fullmatch(r"[0-9a-f]{40}", s) for s in analysis_stems)
    assert all(re.fullmatch(r"IMG_\d{8}_\d{4}|[0-9a-f-]{36}", s) for s in image_stems)
    photo = load_advisors()["photo-critic"]
    rejected = summary["rejected_rows"]
    good_photo = [j for j in _jobs(folder)
                  if j["advisor"] == "photo-critic" and j["_rowid"] not in rejected]
    assert len(good_photo) == summary["expected_by_advisor"]["photo-critic"]["linked"]
    hashes = set()
    for job in good_photo:
        assert job["image_path"].startswith("images/") and job["analysis_json"] is None
        assert job["analysis_path"].startswith("analyses/")
        raw = (data / job["image_path"]).read_bytes()
        hashes.add(_sha(raw))
        answer = json.loads((data / job["analysis_path"]).read_text())
        assert photo.violations(answer) == []
        # The stored critique is what the pixels say.
        assert photo.render(answer) == photo.render(analyze_image(Image.open(io.BytesIO(raw))))
    assert len(hashes) == len(good_photo)  # no two good jobs share image bytes
    assert sum(j["image_sha256"] is not None for j in good_photo) > len(good_photo) // 2
    violating = [j for j in _jobs(folder) if rejected.get(j["_rowid"]) == "contract_violation"]
    assert {j["advisor"] for j in violating} == {"photo-critic", "fit-query"}
    for job in violating:
        adv = load_advisors()[job["advisor"]]
        assert adv.violations(json.loads(_answer_text(job, data)))


def test_fit_query_rows(built) -> None:
    folder, summary = built
    fit = [j for j in _jobs(folder) if j["advisor"] == "fit-query"]
    good = [j for j in fit if j["_rowid"] not in summary["rejected_rows"]]
    inline = sum(j["analysis_json"] is not None for j in good)
    in_file = sum(j["analysis_path"] is not None for j in good)
    assert inline + in_file == len(good) and inline > in_file > 0  # both storage paths used
    assert len({j["input_text"] for j in good}) == len(good)
    assert all(re.fullmatch(r"job-\d{6}", j["job_id"]) for j in fit)
    for j in good:
        assert j["model"].startswith("fit-query-") and j["status"] == "completed"
        assert j["created_at"].endswith("Z") and j["completed_at"] > j["created_at"]


def test_reproducible_by_seed(built, tmp_path) -> None:
    folder, summary = built
    again = write_demo_workspace(tmp_path / "again", seed=0, **SMALL)
    assert _rows(tmp_path / "again") == _rows(folder)
    assert _file_hashes(tmp_path / "again") == _file_hashes(folder)
    assert again["expected"] == summary["expected"]
    assert again["rejected_rows"] == summary["rejected_rows"]
    write_demo_workspace(tmp_path / "other", seed=1, **SMALL)
    assert _rows(tmp_path / "other") != _rows(folder)
    # Different images and answers; a few files may coincide (a 64px composition, an empty file).
    mine = {h for p, h in _file_hashes(folder).items() if p.startswith("data/")}
    other = set(_file_hashes(tmp_path / "other").values())
    assert len(other & mine) < 0.05 * len(mine)


def test_every_reason_at_the_smallest_promised_size() -> None:
    plan = plan_jobs(200, 50, 0.08)
    kinds = Counter()
    for counts in plan.values():
        kinds.update(counts)
    assert all(kinds[r] >= 1 for r in REASONS)
    assert sum(plan["photo-critic"].values()) == 50 and sum(plan["fit-query"].values()) == 200
    assert plan_jobs(100, 20, 0.0) == {"photo-critic": {"linked": 20},
                                       "fit-query": {"linked": 100}}


def test_refuses_non_empty_folder(tmp_path) -> None:
    target = tmp_path / "busy"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        write_demo_workspace(target, **SMALL)
    # overwrite only ever replaces a workspace, never an arbitrary folder
    with pytest.raises(FileExistsError, match="not a mondrian workspace"):
        write_demo_workspace(target, overwrite=True, **SMALL)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]


def test_empty_folder_and_overwrite(tmp_path) -> None:
    target = tmp_path / "ws"
    target.mkdir()
    write_demo_workspace(target, seed=3, **SMALL)
    first = _rows(target)
    summary = write_demo_workspace(target, seed=4, overwrite=True, **SMALL)
    assert _rows(target) != first and summary["folder"] == str(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ws"]


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(demo_workspace, "_write_db", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        write_demo_workspace(tmp_path / "ws", **SMALL)
    assert list(tmp_path.iterdir()) == []
    # an interrupted overwrite keeps the old workspace as it was
    monkeypatch.undo()
    write_demo_workspace(tmp_path / "ws", seed=5, **SMALL)
    before = _rows(tmp_path / "ws")
    monkeypatch.setattr(demo_workspace, "_write_db", boom)
    with pytest.raises(RuntimeError):
        write_demo_workspace(tmp_path / "ws", seed=6, overwrite=True, **SMALL)
    assert _rows(tmp_path / "ws") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ws"]


def test_progress_bars(tmp_path, capsys) -> None:
    write_demo_workspace(tmp_path / "ws", n_fit=40, n_photo=10, image_size=64, progress=True)
    err = capsys.readouterr().err
    assert "images" in err and "jobs" in err
