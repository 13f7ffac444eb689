"""Property: whatever the job table and the files it names hold, link finishes, accounts for
every job, and the dataset step accepts its manifest.

Rows are made with plain sqlite3 against the documented `jobs` schema (not the project's
fixtures), and the files they point at are drawn from every kind that has stopped a run
before: FIFOs, unix sockets, symlink loops, paths through a plain file, over-long names,
folders, traversal, invalid UTF-8 and lone surrogates, in TEXT and BLOB columns.
"""

import io
import json
import os
import socket
import sqlite3
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mondrian.core.contracts import get_advisor
from mondrian.core.db import create_jobs_table, open_db
from mondrian.core.workspace import load_workspace
from mondrian.dataset.rows import collect_rows, read_manifest
from mondrian.dataset.splits import DEFAULT_RATIOS, DEFAULT_SALT
from mondrian.link.linker import REASONS, link_workspace
from tests.helpers import run_cli

FIT = {"query_type": "search", "technology": "Wind", "capacity_min_kw": 100.0, "postcode_patterns": ["RG"]}


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


# What a path column can name. Each kind is made on disk by `_make` before the row is inserted.
FILE_KINDS = ["json", "png", "garbage", "empty", "missing", "fifo", "socket", "loop", "through_file",
              "long_name", "folder", "traversal", "absolute", "surrogate_json", "latin1", "nul"]

texts = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["wind in kent", "solar under 50kw in berks", "  ", "", "WIND IN KENT"]),
    st.binary(max_size=12).map(lambda b: ("bytes", b)),      # a BLOB
    st.binary(min_size=1, max_size=12).map(lambda b: ("text_bytes", b + b"\xff")),  # invalid UTF-8 TEXT
)
scalars = st.one_of(st.none(), st.integers(-3, 3), st.sampled_from(["j1", "j2", "", " "]), texts)
analyses = st.one_of(
    st.none(),
    st.just(json.dumps(FIT)),
    st.just(json.dumps(FIT | {"technology": "wind"})),   # a contract violation
    st.just('{"comment": "\\udc80"}'),                   # a lone surrogate, escaped
    st.just("[" * 5000),
    texts,
)
jobs = st.fixed_dictionaries({
    "job_id": scalars,
    "advisor": st.one_of(st.sampled_from(["fit-query", "photo-critic", "nope"]), scalars),
    "status": st.one_of(st.sampled_from(["completed", "COMPLETED ", "failed"]), scalars),
    "input_text": texts,
    "image_path": st.one_of(st.none(), st.sampled_from(FILE_KINDS)),
    "analysis_path": st.one_of(st.none(), st.sampled_from(FILE_KINDS)),
    "analysis_json": analyses,
})


def _make(data: Path, kind: str, n: int) -> str:
    """Create a file of this kind under the data root; the path a record would hold."""
    name = f"f{n}"
    p = data / name
    if kind == "json":
        p.write_text(json.dumps(FIT))
    elif kind == "png":
        p.write_bytes(_png())
    elif kind == "garbage":
        p.write_bytes(os.urandom(64))
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "fifo":
        os.mkfifo(p)
    elif kind == "socket":
        cwd = os.getcwd()
        os.chdir(data)  # unix socket paths are short: bind relative
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.bind(name)
        finally:
            os.chdir(cwd)
    elif kind == "loop":
        os.symlink(f"{name}b", p)
        os.symlink(name, data / f"{name}b")
    elif kind == "through_file":
        p.write_text("{}")
        return f"{name}/inner.json"
    elif kind == "long_name":
        return "x" * 5000 + ".json"
    elif kind == "folder":
        p.mkdir()
    elif kind == "traversal":
        return "../../../etc/passwd"
    elif kind == "absolute":
        return "/etc/hostname"
    elif kind == "surrogate_json":
        p.write_text('{"comment": "\\ud800"}')
    elif kind == "latin1":
        p.write_bytes('{"comment": "café"}'.encode("latin-1"))
    elif kind == "nul":
        return "a\x00b"
    return name  # "missing" too: nothing was made


def _sql_value(v):
    """What plain sqlite3 stores: a BLOB for bytes, invalid UTF-8 as TEXT via CAST."""
    if isinstance(v, tuple):
        kind, b = v
        return ("blob", b) if kind == "bytes" else ("text", b)
    return ("plain", v)


def _insert(conn: sqlite3.Connection, row: dict) -> None:
    cols, marks, args = [], [], []
    for col, value in row.items():
        kind, v = _sql_value(value)
        cols.append(col)
        marks.append("CAST(? AS TEXT)" if kind == "text" else "?")
        args.append(v)
    conn.execute(f"INSERT INTO jobs ({', '.join(cols)}) VALUES ({', '.join(marks)})", args)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(jobs, min_size=1, max_size=12))
def test_link_accounts_for_every_job_whatever_the_table_holds(rows):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = root / "data"
        data.mkdir()
        db = open_db(root / "mondrian.db", create=True)
        create_jobs_table(db)  # the documented schema; rows go in through plain sqlite3
        db.conn.close()
        with sqlite3.connect(root / "mondrian.db") as conn:
            for i, job in enumerate(rows):
                job = dict(job)
                for col in ("image_path", "analysis_path"):
                    if job[col] is not None:
                        job[col] = _make(data, job[col], 2 * i + (col == "analysis_path"))
                _insert(conn, job)
        ws = load_workspace(root)
        summary = link_workspace(ws, progress=False)
        assert summary.conserved and summary.total == len(rows)
        assert set(summary.by_reason) <= set(REASONS) - {"internal_error"}  # no record hit a bug
        manifest = read_manifest(Path(summary.manifest) / "manifest.jsonl")  # the dataset step's reader
        assert len(manifest) == len(rows)
        for name in ("fit-query", "photo-critic"):
            collect_rows(manifest, get_advisor(name), ws.data_path, DEFAULT_RATIOS, DEFAULT_SALT)


def test_link_and_dataset_cli_on_a_table_of_every_kind(tmp_path):
    """The acceptance run: one table holding every kind, through the CLI: link exits 0 and
    accounts for every job, and `mondrian dataset` builds from its manifest."""
    data = tmp_path / "data"
    data.mkdir()
    db = open_db(tmp_path / "mondrian.db", create=True)
    create_jobs_table(db)
    db.conn.close()
    n = 0
    with sqlite3.connect(tmp_path / "mondrian.db") as conn:
        for i, kind in enumerate(FILE_KINDS):
            for text in (("text_bytes", b"wind\xff"), None, "x"):
                _insert(conn, {"job_id": f"k{n}", "advisor": "photo-critic", "status": "completed",
                               "input_text": text, "image_path": _make(data, kind, 100 + n),
                               "analysis_path": _make(data, FILE_KINDS[-1 - i], 200 + n)})
                n += 1
        for i in range(20):  # enough good text rows for three splits
            _insert(conn, {"job_id": f"t{i}", "advisor": "fit-query", "status": "completed",
                           "input_text": f"wind over {100 + i}kw in kent",
                           "analysis_json": json.dumps(FIT | {"capacity_min_kw": 100.0 + i})})
            n += 1
        _insert(conn, {"job_id": None, "advisor": "fit-query", "status": "completed",
                       "input_text": ("text_bytes", b"caf\xe9"), "analysis_json": ('text_bytes', b"{\xff")})
        n += 1
    out = run_cli("link", "-w", str(tmp_path), "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["conserved"] and summary["total"] == n and summary["linked"] == 20
    ds = run_cli("dataset", "-w", str(tmp_path), "--advisor", "fit-query", "--model", "none", "--json")
    assert ds.returncode == 0, ds.stderr
    assert sum(json.loads(ds.stdout)["counts"].values()) == 20
