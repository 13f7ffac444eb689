"""Linking, record by record: a hostile job table never crashes the linker or loses a job."""

import io
import json
import os
import socket
import sqlite3
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from mondrian.core.config import ConfigError
from mondrian.core.contracts import get_advisor, load_advisors
from mondrian.core.db import DBError, connect, create_jobs_table, open_db
from mondrian.core.workspace import load_workspace
from mondrian.dataset.build import build_dataset
from mondrian.demo.images import generate_image
from mondrian.link.linker import REASONS, link_workspace

FIT = {"query_type": "search", "technology": "Wind", "capacity_min_kw": 100.0,
       "postcode_patterns": ["RG", "SL"]}


def _png(seed: int, size: int = 48) -> tuple[bytes, dict]:
    img, analysis = generate_image(seed, size=size)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue(), analysis


def _write(path, data: bytes | str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


@pytest.fixture
def hostile(tmp_path):
    """A workspace whose job table holds every kind of bad record, and what each must become."""
    data = tmp_path / "data"
    jobs, expect = [], []

    def job(expected: str, **kw):
        jobs.append({"job_id": f"j{len(jobs):03d}", "advisor": "photo-critic", "status": "completed"} | kw)
        expect.append(expected)

    good_png, good_analysis = _png(1)
    _write(data / "img" / "good.png", good_png)
    _write(data / "out" / "a1.json", json.dumps(good_analysis))
    job("linked", image_path="img/good.png", analysis_path="out/a1.json")
    # the same id again, on an otherwise good record
    uni_png, uni_analysis = _png(2)
    _write(data / "img" / "café 東京 ☀.png", uni_png)
    _write(data / "out" / "a2.json", json.dumps(uni_analysis))
    job("duplicate_job_id", job_id="j000", image_path="img/café 東京 ☀.png", analysis_path="out/a2.json")
    job("linked", image_path="img/café 東京 ☀.png", analysis_path="out/a2.json")  # unicode name
    job("path_outside_root", image_path="../../etc/passwd", analysis_path="out/a1.json")
    job("path_outside_root", image_path="/etc/hostname", analysis_path="out/a1.json")
    os.symlink("/etc/hostname", data / "img" / "escape.png")
    job("path_outside_root", image_path="img/escape.png", analysis_path="out/a1.json")
    job("path_outside_root", image_path="img/good.png", analysis_path="../../../etc/passwd")
    _write(data / "img" / "zero.png", b"")
    job("image_unreadable", image_path="img/zero.png", analysis_path="out/a1.json")
    trunc_png, trunc_analysis = _png(3)
    _write(data / "img" / "trunc.png", trunc_png[: len(trunc_png) // 2])
    job("image_unreadable", image_path="img/trunc.png", analysis_path="out/a1.json")
    _write(data / "img" / "text.png", "this is not an image")
    job("image_unreadable", image_path="img/text.png", analysis_path="out/a1.json")
    (data / "img" / "folder.png").mkdir()
    job("image_unreadable", image_path="img/folder.png", analysis_path="out/a1.json")
    bomb = io.BytesIO()
    Image.new("1", (9000, 9000)).save(bomb, format="PNG")  # 81 Mpx in ~10 kB
    _write(data / "img" / "bomb.png", bomb.getvalue())
    job("image_too_large", image_path="img/bomb.png", analysis_path="out/a1.json")
    job("image_missing", image_path="img/nope.png", analysis_path="out/a1.json")
    p4, a4 = _png(4)
    _write(data / "img" / "p4.png", p4)
    _write(data / "out" / "a4.json", json.dumps(a4))
    job("image_hash_mismatch", image_path="img/p4.png", analysis_path="out/a4.json", image_sha256="0" * 64)
    job("analysis_missing", image_path="img/p4.png")
    job("analysis_missing", image_path="img/p4.png", analysis_path="out/missing.json")
    job("analysis_missing", image_path="img/p4.png", analysis_path="out")
    _write(data / "out" / "big.json", b'{"comment": "' + b"x" * (50 * 1024 * 1024) + b'"}')
    job("analysis_too_large", image_path="img/p4.png", analysis_path="out/big.json")
    _write(data / "out" / "latin1.json", '{"comment": "café"}'.encode("latin-1"))
    job("invalid_json", image_path="img/p4.png", analysis_path="out/latin1.json")
    for name, text in [("cut", '{"dominant_color": "red", "prim'), ("single", "{'a': 1}"),
                       ("nan", '{"composition_score": NaN}'), ("array", "[1, 2]"),
                       ("dupkey", '{"balance": "balanced", "balance": "left-heavy"}'),
                       ("deep", "[" * 200000 + "]" * 200000), ("trailing", json.dumps(a4) + " garbage")]:
        _write(data / "out" / f"{name}.json", text)
        job("invalid_json", image_path="img/p4.png", analysis_path=f"out/{name}.json")
    _write(data / "out" / "bad.json", json.dumps(a4 | {"composition_score": 11.5}))
    job("contract_violation", image_path="img/p4.png", analysis_path="out/bad.json")
    job("linked", image_path="img/p4.png", analysis_path="out/a4.json")
    job("duplicate", image_path="img/p4.png", analysis_path="out/a4.json")
    _write(data / "out" / "other.json", json.dumps(a4 | {"comment": "Something else."}))
    job("duplicate_conflict", image_path="img/p4.png", analysis_path="out/other.json")
    job("not_completed", status="failed", image_path="img/p4.png", analysis_path="out/a4.json")
    job("not_completed", status=None, image_path="img/p4.png", analysis_path="out/a4.json")
    job("input_missing", image_path=None, analysis_path="out/a4.json")
    job("unknown_advisor", advisor="legacy-critic", image_path="img/p4.png", analysis_path="out/a4.json")
    job("job_id_missing", job_id=None, image_path="img/p4.png", analysis_path="out/a4.json")
    # text advisor
    job("linked", advisor="fit-query", input_text="wind sites over 100kw in berkshire",
        analysis_json=json.dumps(FIT))
    job("duplicate", advisor="fit-query", input_text="  Wind sites OVER 100kw in Berkshire ",
        analysis_json=json.dumps(FIT | {"capacity_min_kw": 100}))
    job("input_missing", advisor="fit-query", input_text="   ", analysis_json=json.dumps(FIT))
    job("input_invalid", advisor="fit-query", input_text=b"caf\xe9 wind", analysis_json=json.dumps(FIT))
    job("contract_violation", advisor="fit-query", input_text="wind in kent",
        analysis_json=json.dumps({"query_type": "search", "technology": "wind"}))
    job("invalid_json", advisor="fit-query", input_text="solar in kent", analysis_json=b"\xff\xfe{}")
    job("analysis_too_large", advisor="fit-query", input_text="hydro in kent",
        analysis_json="{" + " " * 2_000_000 + "}")
    # files no record may make the linker hang on or crash over
    os.mkfifo(data / "out" / "fifo.json")  # open() would block forever
    job("analysis_unreadable", image_path="img/p4.png", analysis_path="out/fifo.json")
    os.symlink("loop2.json", data / "out" / "loop1.json")
    os.symlink("loop1.json", data / "out" / "loop2.json")
    job("analysis_unreadable", image_path="img/p4.png", analysis_path="out/loop1.json")
    job("analysis_missing", image_path="img/p4.png", analysis_path="out/a4.json/inner.json")
    job("analysis_unreadable", image_path="img/p4.png", analysis_path="out/" + "x" * 5000 + ".json")
    cwd = os.getcwd()
    os.chdir(data / "out")  # a unix socket path must be short: bind it relative
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind("sock.json")
    finally:
        os.chdir(cwd)
    job("analysis_unreadable", image_path="img/p4.png", analysis_path="out/sock.json")
    job("image_unreadable", image_path="out/fifo.json", analysis_path="out/a4.json")
    _write(data / "out" / "surrogate.json", json.dumps(a4 | {"comment": "\ud800 broken"}))  # JSON escape
    job("invalid_json", image_path="img/p4.png", analysis_path="out/surrogate.json")
    with open(data / "img" / "sparse.png", "wb") as f:  # 65 MiB of nothing, no disk used
        f.truncate(65 * 1024 * 1024)
    job("image_file_too_large", image_path="img/sparse.png", analysis_path="out/a4.json")
    job("input_invalid", job_id="text-not-utf8", advisor="fit-query", input_text=None,
        analysis_json=json.dumps(FIT))  # made TEXT with invalid UTF-8 below
    job("linked", job_id=7, advisor="fit-query", input_text="wave in cornwall",
        analysis_json=json.dumps(FIT))  # an INTEGER id
    # a user's correction harvested from feedback outranks the earlier job with the same question
    job("superseded", advisor="fit-query", input_text="solar farms in devon", analysis_json=json.dumps(FIT))
    job("linked", job_id="req-1", advisor="fit-query", input_text="Solar farms in Devon",
        analysis_json=json.dumps({"query_type": "search", "technology": "Photovoltaic",
                                  "postcode_patterns": ["EX", "PL", "TQ"]}),
        harvested_from="req-1", served_version="v1", harvest_verdict="corrected")

    db = open_db(tmp_path / "mondrian.db", create=True)
    create_jobs_table(db)
    db["jobs"].insert_all(jobs, alter=True)  # alter: the harvest columns
    # TEXT holding invalid UTF-8: sqlite3 raises when it decodes such a value
    db.execute("UPDATE jobs SET input_text = CAST(x'6361ff20776176' AS TEXT) WHERE job_id = 'text-not-utf8'")
    db.conn.commit()
    db.conn.close()
    return load_workspace(tmp_path), expect


def _rows(summary):
    with open(os.path.join(summary.manifest, "manifest.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_every_hostile_record_gets_its_reason(hostile):
    ws, expect = hostile
    summary = link_workspace(ws, progress=False)
    rows = _rows(summary)
    assert len(rows) == summary.total == len(expect)  # nothing silently dropped
    assert summary.conserved and summary.linked + summary.rejected == len(expect)
    got = ["linked" if r["status"] == "linked" else r["reason"] for r in rows]
    assert got == expect
    assert all(r["detail"] for r in rows if r["status"] == "rejected")
    # the fixture covers every reason but the one for a bug (see the test below)
    assert set(summary.by_reason) == set(REASONS) - {"internal_error"}
    assert summary.linked == expect.count("linked")


def test_violations_name_the_json_path(hostile):
    ws, _ = hostile
    rows = _rows(link_workspace(ws, progress=False))
    details = [r["detail"] for r in rows if r.get("reason") == "contract_violation"]
    assert any(d.startswith("$.composition_score:") for d in details)
    assert any(d.startswith("$.technology:") for d in details)


def test_linked_rows_are_normalized_and_grouped(hostile):
    ws, _ = hostile
    rows = [r for r in _rows(link_workspace(ws, progress=False)) if r["status"] == "linked"]
    fit = next(r for r in rows if r["advisor"] == "fit-query")
    assert fit["output"] == {"query_type": "search", "technology": "Wind", "capacity_min_kw": 100,
                             "postcode_patterns": ["RG", "SL"]}
    assert list(fit["output"]) == [k for k in load_advisors()["fit-query"].fields if k in fit["output"]]
    photo = [r for r in rows if r["advisor"] == "photo-critic"]
    assert all(r["group"] == r["input"]["image_sha256"] for r in photo)


def test_relink_uses_the_hash_cache_and_sees_changes(hostile):
    ws, _ = hostile
    first = link_workspace(ws, progress=False)
    assert first.cache["misses"] > 0
    again = link_workspace(ws, progress=False)
    assert again.cache["misses"] == 0 and again.cache["hits"] == first.cache["misses"] + first.cache["hits"]
    assert again.fingerprints["manifest_sha256"] == first.fingerprints["manifest_sha256"]
    # replace an image's content: the cache must notice (size/mtime) and the answer changes
    png, _ = _png(99)
    (ws.data_path / "img" / "good.png").write_bytes(png)
    third = link_workspace(ws, progress=False)
    assert third.cache["misses"] == 1
    assert third.fingerprints["manifest_sha256"] != first.fingerprints["manifest_sha256"]


def test_failed_link_keeps_the_previous_manifest(hostile, monkeypatch):
    ws, _ = hostile
    summary = link_workspace(ws, progress=False)
    before = (ws.path("manifest") / "manifest.jsonl").read_bytes()
    from mondrian.link import linker as link_mod

    def boom(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(link_mod.LinkCache, "save", boom)  # the run fails, not one record
    with pytest.raises(OSError):
        link_workspace(ws, progress=False)
    assert (ws.path("manifest") / "manifest.jsonl").read_bytes() == before
    assert not [p for p in ws.path(".").iterdir() if p.name.startswith(".manifest")]
    assert summary.conserved


def test_an_unforeseen_failure_is_that_records_rejection(hostile, monkeypatch):
    """A bug that one record trips becomes that record's `internal_error`; the run goes on."""
    ws, expect = hostile
    from mondrian.link import linker as link_mod

    real = link_mod.Linker.link

    def flaky(self, job):
        if job["job_id"] == "j002":
            raise KeyError("a field the code did not expect")
        return real(self, job)

    monkeypatch.setattr(link_mod.Linker, "link", flaky)
    summary = link_workspace(ws, progress=False)
    rows = _rows(summary)
    assert summary.conserved and summary.total == len(expect)
    assert rows[2]["reason"] == "internal_error" and "KeyError" in rows[2]["detail"]
    assert [r["status"] for r in rows[3:]] == [r["status"] for r in _rows_expected(expect)[3:]]


def _rows_expected(expect):
    return [{"status": "linked" if e == "linked" else "rejected"} for e in expect]


def test_duplicates_name_the_earlier_job_and_the_dataset_takes_the_manifest(hostile):
    ws, _ = hostile
    summary = link_workspace(ws, progress=False)
    rows = _rows(summary)
    dups = [r for r in rows if r.get("reason") in ("duplicate", "duplicate_conflict")]
    assert dups and all(r["detail"].startswith("same input as job '") for r in dups)
    by_id = {r["job_id"]: r for r in rows}
    for r in dups:
        earlier = r["detail"].split("'")[1]
        assert by_id[earlier]["status"] == "linked"  # the job, not a cache digest
    assert by_id["7"]["status"] == "linked"  # an INTEGER id is written as text
    assert any(r["job_id"] is None for r in rows)  # the job_id_missing row
    report = build_dataset(summary.manifest, get_advisor("fit-query"), ws.path("ds"), ratios=(0.5, 0.25, 0.25))
    assert sum(report.counts.values()) == sum(r["status"] == "linked" and r["advisor"] == "fit-query" for r in rows)


def test_pillow_follows_our_pixel_limit_not_its_own(tmp_path):
    """Above Pillow's 89.5 Mpx default, the workspace's max_image_pixels still decides."""
    data = tmp_path / "data"
    big = io.BytesIO()
    Image.new("1", (9600, 9600)).save(big, format="PNG")  # 92 Mpx, a few kB
    _write(data / "big.png", big.getvalue())
    _, analysis = _png(5)
    _write(data / "a.json", json.dumps(analysis))
    (tmp_path / "mondrian.yaml").write_text("max_image_pixels: 100000000\n")
    db = open_db(tmp_path / "mondrian.db", create=True)
    create_jobs_table(db)
    db["jobs"].insert({"job_id": "big", "advisor": "photo-critic", "status": "completed",
                       "image_path": "big.png", "analysis_path": "a.json"})
    db.conn.close()
    ws = load_workspace(tmp_path)
    assert _rows(link_workspace(ws, progress=False))[0]["status"] == "linked"
    (tmp_path / "mondrian.yaml").write_text("max_image_pixels: 90000000\n")
    row = _rows(link_workspace(load_workspace(tmp_path), progress=False))[0]
    assert row["reason"] == "image_too_large" and "90,000,000" in row["detail"]


def test_a_killed_runs_temporary_folders_are_removed_next_time(hostile):
    ws, _ = hostile
    dead = _dead_pid()
    stale = ws.path(".") / f".manifest.tmp-{dead}-abc"
    live = ws.path(".") / f".manifest.tmp-{os.getppid()}-xyz"  # a writer that is still running
    for folder in (stale, live):
        folder.mkdir()
        (folder / "manifest.jsonl").write_text("half\n")
    link_workspace(ws, progress=False)
    assert not stale.exists() and live.exists()


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid  # reaped: no process has this pid now (until the system reuses it)


def test_column_mapping_reads_a_foreign_schema(tmp_path):
    conn = sqlite3.connect(tmp_path / "legacy.db")
    conn.execute("CREATE TABLE analysis_jobs (uid TEXT, kind TEXT, state TEXT, question TEXT, result TEXT)")
    conn.execute("INSERT INTO analysis_jobs VALUES ('a', 'fit-query', 'DONE', 'solar in kent', ?)",
                 (json.dumps({"query_type": "search", "technology": "Photovoltaic",
                              "postcode_patterns": ["BR", "CT", "DA", "ME", "TN"]}),))
    conn.commit()
    conn.close()
    cfg = {"db": "legacy.db", "jobs_table": "analysis_jobs", "completed_status": ["done"],
           "columns": {"job_id": "uid", "advisor": "kind", "status": "state", "input_text": "question",
                       "analysis_json": "result", "image_path": None, "image_sha256": None,
                       "analysis_path": None, "model": None, "created_at": None, "completed_at": None}}
    (tmp_path / "mondrian.yaml").write_text(json.dumps(cfg))
    summary = link_workspace(load_workspace(tmp_path), progress=False)
    assert (summary.total, summary.linked) == (1, 1)

    cfg["columns"]["input_text"] = "query"
    (tmp_path / "mondrian.yaml").write_text(json.dumps(cfg))
    with pytest.raises(DBError, match="input_text -> 'query'.*question"):
        link_workspace(load_workspace(tmp_path), progress=False)
    cfg["columns"]["qestion"] = "x"
    (tmp_path / "mondrian.yaml").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="unknown key\\(s\\) qestion"):
        load_workspace(tmp_path)


def test_a_user_advisor_needs_no_code(tmp_path):
    (tmp_path / "advisors").mkdir()
    (tmp_path / "advisors" / "sentiment.yaml").write_text(
        "name: sentiment\ninput_kind: text\nsystem_prompt: Classify the review.\n"
        "schema:\n  type: object\n  additionalProperties: false\n  required: [label]\n"
        "  properties:\n    label: {type: string, enum: [positive, negative]}\n")
    db = open_db(tmp_path / "mondrian.db", create=True)
    create_jobs_table(db)
    db["jobs"].insert_all([
        {"job_id": "1", "advisor": "sentiment", "status": "completed", "input_text": "great",
         "analysis_json": '{"label": "positive"}'},
        {"job_id": "2", "advisor": "sentiment", "status": "completed", "input_text": "meh",
         "analysis_json": '{"label": "neutral"}'},
    ])
    db.conn.close()
    summary = link_workspace(load_workspace(tmp_path), progress=False)
    assert (summary.linked, summary.by_reason) == (1, {"contract_violation": 1})

    (tmp_path / "advisors" / "broken.yaml").write_text("name: broken\ninput_kind: audio\n"
                                                       "system_prompt: x\nschema: {type: object}\n")
    with pytest.raises(ConfigError, match="broken.yaml: input_kind 'audio'"):
        link_workspace(load_workspace(tmp_path), progress=False)


# --- mondrian.core.db.connect: the one way every module opens SQLite ---


def test_connect_refuses_missing_and_unusable_files(tmp_path):
    missing = tmp_path / "none.db"
    with pytest.raises(DBError, match="none.db: no such database file"):
        connect(missing)
    with pytest.raises(DBError, match="no such database file"):
        connect(missing, read_only=True)
    assert not missing.exists()  # neither mode creates the file
    with pytest.raises(ValueError, match="read-only"):
        connect(missing, create=True, read_only=True)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database, just some bytes " * 4)
    for kw in ({}, {"read_only": True}, {"create": True}):
        with pytest.raises(DBError, match="junk.db: not a usable SQLite database"):
            connect(junk, **kw)


def test_connect_settings_for_writers_and_readers(tmp_path):
    path = tmp_path / "new.db"
    conn = connect(path, create=True, timeout=2.5)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 2500
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: the default
    assert conn.isolation_level == ""
    conn.execute("CREATE TABLE t (x INTEGER)")
    conn.commit()
    conn.close()
    writer = connect(path, autocommit=True)  # the request log's group-commit writer
    assert writer.isolation_level is None
    assert writer.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    writer.execute("INSERT INTO t VALUES (1)")  # committed at once
    reader = connect(path, read_only=True)
    assert reader.execute("SELECT x FROM t").fetchall() == [(1,)]
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        reader.execute("INSERT INTO t VALUES (2)")
    reader.close()
    writer.close()
    db = open_db(path)  # sqlite_utils on top of connect, usable from any thread
    assert db.journal_mode == "wal" and db["t"].count == 1
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(lambda: db["t"].count).result() == 1
    db.conn.close()
