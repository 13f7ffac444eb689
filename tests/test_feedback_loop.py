"""Closing the loop on real SQLite files: request payloads as `log_payloads` says, feedback
(idempotent per user, history kept, corrections checked against the contract), and `mondrian
harvest` turning judged requests into jobs that `link` and `dataset` take like any other
(conserved counts, incremental, a correction outranking an earlier job in its split).
tests/test_service.py covers the same over the real HTTP service."""

from __future__ import annotations

import io
import json
import sqlite3
from pathlib import Path

import pytest
from PIL import Image

from mondrian.core.contracts import load_advisors
from mondrian.core.db import create_jobs_table, open_db
from mondrian.core.image_store import ImageStore
from mondrian.core.workspace import load_workspace
from mondrian.dataset.build import build_dataset
from mondrian.dataset.splits import split_of
from mondrian.link.harvest import harvest
from mondrian.link.linker import link_workspace, text_group
from mondrian.serve.config import ServiceConfig
from mondrian.serve.errors import ServiceError
from mondrian.serve.feedback import FeedbackStore, Verdict
from mondrian.serve.requests_log import RequestLog, now_iso, payload_fields
from tests.helpers import run_cli

ADV = "fit-query"
CONTRACTS = load_advisors()
WIND = {"query_type": "search", "technology": "Wind"}


def _row(request_id: str, text: str, answer: str, mode: str = "full", **kw) -> dict:
    return {"request_id": request_id, "received_at": now_iso(), "advisor": ADV, "endpoint": "analyze",
            "arm": "control", "assigned_version": "v1", "served_version": "v1", "base_fingerprint": "fp",
            "status": 200, "contract_ok": 1, **payload_fields(mode, text, None, answer), **kw}


def _log(db: Path, *rows: dict) -> None:
    with RequestLog(db) as log:
        for row in rows:
            log.write(row)


def test_payload_modes_keep_what_they_say(tmp_path):
    full = payload_fields("full", "solar in devon", "ab" * 32, '{"query_type":"search"}')
    assert full["input_text"] == "solar in devon" and full["answer_text"] == '{"query_type":"search"}'
    assert len(full["input_sha256"]) == len(full["answer_sha256"]) == 64 and full["image_sha256"] == "ab" * 32
    hashed = payload_fields("hash", "solar in devon", None, "x")
    assert hashed["input_sha256"] == full["input_sha256"] and "input_text" not in hashed
    assert "answer_text" not in hashed and hashed["payloads"] == "hash"
    assert payload_fields("off", "solar in devon", "ab" * 32, "x") == {"payloads": "off"}
    with pytest.raises(ValueError, match="log_payloads must be one of full, hash, off"):
        payload_fields("most", "x", None, "y")
    with pytest.raises(ValueError, match="log_payloads must be one of full, hash, off"):
        ServiceConfig(log_payloads="most")  # the service refuses it before it starts
    # the rows go through the real log, and an older table gains the columns
    db = tmp_path / "r.db"
    _log(db, _row("req-1", "solar in devon", "{}"), _row("req-2", "solar in devon", "{}", mode="hash"))
    got = dict(sqlite3.connect(db).execute("SELECT request_id, coalesce(input_text, input_sha256) FROM requests"))
    assert got == {"req-1": "solar in devon", "req-2": full["input_sha256"]}


def test_image_store_keeps_each_image_once(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, "PNG")
    store = ImageStore(tmp_path / "images")
    assert store.path("ff" * 32) is None
    first = store.keep(buf.getvalue(), "ff" * 32)
    assert first.name == f"{'ff' * 32}.png" and first.read_bytes() == buf.getvalue()
    mtime = first.stat().st_mtime_ns
    assert store.keep(buf.getvalue(), "ff" * 32) == first and first.stat().st_mtime_ns == mtime
    assert [p.name for p in (tmp_path / "images").iterdir()] == [first.name]  # no temp files left


def test_feedback_is_idempotent_per_user_and_keeps_history(tmp_path):
    db = tmp_path / "r.db"
    _log(db, _row("req-a", "wind in kent", json.dumps(WIND)),
         _row("req-a:shadow", "wind in kent", "{}", shadow_of="req-a"),
         _row("req-err", "wind in kent", None, status=500, error="boom"))
    store = FeedbackStore(db, CONTRACTS)
    try:
        first = store.record("req-a", Verdict("accepted", user="ann"))
        assert first["changed"] and first["revision"] == 1 and first["verdict"] == "accepted"
        again = store.record("req-a", Verdict("accepted", user="ann"))
        assert not again["changed"] and again["revision"] == 1
        fixed = {"query_type": "search", "technology": "Wind", "postcode_patterns": ["ME", "CT", "TN", "DA", "BR"]}
        later = store.record("req-a", Verdict("corrected", fixed, "ann"))
        assert later["changed"] and later["revision"] == 2 and later["answer"] == fixed
        store.record("req-a", Verdict("rejected", user="bob"))  # another user: another row
        with pytest.raises(ServiceError) as bad:
            store.record("req-a", Verdict("corrected", {"query_type": "search", "capacity_min_kw": -5}, "ann"))
        assert bad.value.status == 422 and "$.capacity_min_kw" in bad.value.message
        for rid, status in (("req-nope", 404), ("req-a:shadow", 404), ("req-err", 409)):
            with pytest.raises(ServiceError) as err:
                store.record(rid, Verdict("accepted"))
            assert err.value.status == status, rid
    finally:
        store.close()
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT user, verdict, revision FROM feedback ORDER BY user").fetchall() == [
        ("ann", "corrected", 2), ("bob", "rejected", 1)]
    assert conn.execute("SELECT verdict FROM feedback_history WHERE user = 'ann' ORDER BY revision").fetchall() == [
        ("accepted",), ("corrected",)]  # the 422 wrote nothing


@pytest.mark.parametrize("body, message", [
    ({"verdict": "fine"}, "field 'verdict' must be one of accepted, rejected, corrected"),
    ({"verdict": "corrected"}, "field 'answer' (a JSON object: the right answer) is required"),
    ({"verdict": "accepted", "answer": {}}, "field 'answer' goes with verdict 'corrected' only"),
    ({"verdict": "accepted", "user": 7}, "field 'user' must be a string"),
    ({"verdict": "accepted", "why": "x"}, "unknown field(s) why"),
])
def test_feedback_bodies_are_checked(body, message):
    with pytest.raises(ServiceError) as exc:
        Verdict.from_body(body)
    assert exc.value.status == 400 and message in exc.value.message


def _workspace(tmp_path: Path, jobs: list[tuple[str, str, dict]]) -> Path:
    """A workspace whose job DB holds `jobs` (job id, question, answer) and is also the
    service's requests DB (as in the demo)."""
    ws = tmp_path / "ws"
    (ws / "data").mkdir(parents=True)
    db = open_db(ws / "mondrian.db", create=True)
    create_jobs_table(db)
    db["jobs"].insert_all({"job_id": j, "advisor": ADV, "status": "completed", "input_text": q,
                           "analysis_json": json.dumps(a)} for j, q, a in jobs)
    db.conn.close()
    return ws


def _question_in(split: str) -> str:
    return next(q for q in (f"wind farms in kent number {i}" for i in range(1000))
                if split_of(text_group(q)) == split)


def test_harvest_is_conserved_incremental_and_feeds_link_and_dataset(tmp_path):
    test_q = _question_in("test")
    wrong = {"query_type": "search", "technology": "Photovoltaic"}
    ws_dir = _workspace(tmp_path, [("job-1", test_q, wrong), ("job-2", "solar in devon", wrong)])
    db = ws_dir / "mondrian.db"
    fixed = {"query_type": "search", "technology": "Wind", "postcode_patterns": ["ME", "CT", "TN", "DA", "BR"]}
    _log(db, _row("req-ok", "hydro in wales", json.dumps({"query_type": "search", "technology": "Hydro"})),
         _row("req-fix", test_q.upper() + "  ", json.dumps(wrong)),  # the same question, as typed
         _row("req-no", "wind", json.dumps(WIND)),
         _row("req-none", "solar", json.dumps(WIND)),
         _row("req-hash", "wind in fife", json.dumps(WIND), mode="hash"),
         _row("req-bad", "micro chp", "not json", contract_ok=0),
         _row("req-split", "hydro", json.dumps(WIND)))
    store = FeedbackStore(db, CONTRACTS)
    for rid, v in (("req-ok", Verdict("accepted")), ("req-fix", Verdict("corrected", fixed)),
                   ("req-no", Verdict("rejected")), ("req-hash", Verdict("accepted")),
                   ("req-bad", Verdict("accepted")), ("req-split", Verdict("accepted", user="a")),
                   ("req-split", Verdict("rejected", user="b"))):
        store.record(rid, v)
    ws = load_workspace(ws_dir)
    s = harvest(ws, CONTRACTS)
    assert s.conserved and s.seen == 7 and s.harvested == 2
    assert s.skipped == {"no_feedback": 1, "rejected": 1, "disagreement": 1, "payload_not_logged": 1,
                         "answer_invalid": 1}
    assert s.by_verdict == {"accepted": 1, "corrected": 1}
    assert s.line().startswith("7 requests seen = 2 harvested + 0 updated + 0 retracted + 0 unchanged + 5 skipped")
    jobs = {r[0]: r[1:] for r in sqlite3.connect(db).execute(
        "SELECT job_id, analysis_json, harvested_from, served_version, harvest_verdict, model FROM jobs "
        "WHERE harvested_from IS NOT NULL")}
    assert jobs["req-fix"] == (json.dumps(fixed, separators=(",", ":")), "req-fix", "v1", "corrected", "correction")
    assert jobs["req-ok"][1:4] == ("req-ok", "v1", "accepted")

    again = harvest(ws, CONTRACTS)  # a second run adds nothing
    assert again.harvested == again.updated == 0 and again.unchanged == 2 and again.conserved
    store.record("req-ok", Verdict("rejected"))  # a changed mind retracts the job
    store.record("req-no", Verdict("corrected", WIND))  # and a new correction adds one
    store.close()
    third = harvest(ws, CONTRACTS)
    assert (third.harvested, third.retracted, third.unchanged) == (1, 1, 1) and third.conserved
    assert harvest(ws, CONTRACTS).retracted == 0  # retracted once

    # link: the correction outranks the earlier job with the same question; the retracted job
    # is not completed; the others link as usual
    summary = link_workspace(ws, progress=False)
    assert summary.conserved
    rows = {r["job_id"]: r for r in map(json.loads, (ws_dir / "manifest" / "manifest.jsonl").read_text().splitlines())}
    assert rows["job-1"]["reason"] == "superseded" and "req-fix" in rows["job-1"]["detail"]
    assert rows["req-fix"]["status"] == "linked" and rows["req-ok"]["reason"] == "not_completed"
    assert rows["req-no"]["status"] == "linked" and rows["job-2"]["status"] == "linked"
    # dataset: the corrected question lands in the test split (its group's), nowhere else
    out = tmp_path / "ds"
    build_dataset(ws_dir / "manifest", CONTRACTS[ADV], out, data_root=ws.data_path)
    test_rows = [json.loads(line) for line in (out / "test.jsonl").read_text().splitlines()]
    assert any(r["messages"][-1]["content"] == CONTRACTS[ADV].render(fixed) for r in test_rows)
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert {r["split"] for r in index if r["job_id"] == "req-fix"} == {"test"}


def test_harvest_and_feedback_cli(tmp_path):
    ws_dir = _workspace(tmp_path, [])
    db = ws_dir / "mondrian.db"
    _log(db, _row("req-1", "wind in kent", json.dumps(WIND)))
    bad = run_cli("feedback", "req-1", "--verdict", "corrected", "--answer", '{"query_type": "nope"}',
                  "--db", str(db))
    assert bad.returncode == 1 and "422" in bad.stderr and "$.query_type" in bad.stderr
    ok = run_cli("feedback", "req-1", "--verdict", "accepted", "--user", "ann", "--db", str(db), "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["revision"] == 1
    missing = run_cli("feedback", "req-x", "--verdict", "accepted", "--db", str(db))
    assert missing.returncode == 1 and "404" in missing.stderr
    nofile = run_cli("feedback", "req-1", "--verdict", "corrected", "--answer", f"@{tmp_path}/nope.json", "--db", str(db))
    assert nofile.returncode == 1 and "nope.json: cannot read it" in nofile.stderr
    out = run_cli("harvest", "-w", str(ws_dir), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) | {"by_verdict": None} == {
        "seen": 1, "harvested": 1, "updated": 0, "retracted": 0, "unchanged": 0, "skipped": {},
        "by_verdict": None, "conserved": True}
    text = run_cli("harvest", "-w", str(ws_dir))
    assert "1 requests seen = 0 harvested + 0 updated + 0 retracted + 1 unchanged + 0 skipped (none) (conserved)" \
        in text.stdout


def test_harvest_names_a_database_it_cannot_use(tmp_path):
    ws_dir = _workspace(tmp_path, [])
    missing = run_cli("harvest", "-w", str(ws_dir), "--requests-db", str(tmp_path / "nope.db"))
    assert missing.returncode == 1 and "nope.db: no such database" in missing.stderr
    bare = run_cli("harvest", "-w", str(ws_dir))  # the job database, which no service wrote to
    assert bare.returncode == 1 and "no 'requests' table" in bare.stderr


def test_harvest_keeps_an_image_advisors_images_in_the_data_root(tmp_path):
    import hashlib

    from tests.test_link import _png

    ws_dir = _workspace(tmp_path, [])
    db = ws_dir / "mondrian.db"
    png, analysis = _png(5)
    sha = hashlib.sha256(png).hexdigest()
    ImageStore(ws_dir / "request-images").keep(png, sha)  # what the service kept
    rows = [_row(rid, None, json.dumps(analysis), advisor="photo-critic") | payload_fields("full", None, s, json.dumps(analysis))
            for rid, s in (("req-img", sha), ("req-lost", "ab" * 32))]
    _log(db, *rows)
    store = FeedbackStore(db, CONTRACTS)
    store.record("req-img", Verdict("accepted"))
    store.record("req-lost", Verdict("accepted"))
    store.close()
    ws = load_workspace(ws_dir)
    s = harvest(ws, CONTRACTS)
    assert (s.harvested, s.skipped) == (1, {"image_not_kept": 1}) and s.conserved
    kept = ws.data_path / "harvested" / f"{sha}.png"
    assert kept.read_bytes() == png
    summary = link_workspace(ws, progress=False)
    rows = {r["job_id"]: r for r in map(json.loads, (ws_dir / "manifest" / "manifest.jsonl").read_text().splitlines())}
    assert rows["req-img"]["status"] == "linked" and rows["req-img"]["input"]["image_sha256"] == sha
    assert summary.conserved
