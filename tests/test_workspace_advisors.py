"""An advisor a user adds as a YAML file (no code) reaches every command: `mondrian eval` finds
it in the advisors folder of the workspace holding the data (where `mondrian dataset` found it)
or in --advisors-dir, and `mondrian serve --advisors-dir` serves it over real HTTP."""

from __future__ import annotations

import json

import yaml

from tests.helpers import ServeProcess, run_cli

ADVISOR = {
    "name": "tech-tagger",
    "input_kind": "text",
    "system_prompt": "Name the technology of the question as JSON.",
    "schema": {"type": "object", "additionalProperties": False, "required": ["technology"],
               "properties": {"technology": {"type": "string", "enum": ["Wind", "Hydro"]}}},
}


def _workspace(tmp_path):
    ws = tmp_path / "ws"
    (ws / "advisors").mkdir(parents=True)
    (ws / "mondrian.yaml").write_text("db: mondrian.db\n")
    (ws / "advisors" / "tech-tagger.yaml").write_text(yaml.safe_dump(ADVISOR))
    (ws / "datasets" / "tech-tagger").mkdir(parents=True)
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"input": q, "expected": {"technology": t}}) + "\n"
                                 for q, t in (("turbines in kent", "Wind"), ("small hydro", "Hydro"))))
    return ws, questions


def test_eval_finds_the_workspace_advisor(tmp_path, tiny_llama):
    ws, questions = _workspace(tmp_path)
    args = ["eval", "--model", "tiny:llama", "--advisor", "tech-tagger", "--questions", str(questions),
            "--max-tokens", "4", "--arms", "base", "--no-progress", "--json"]
    out = run_cli(*args, "--data", str(ws / "datasets" / "tech-tagger"), "--out", str(tmp_path / "r1"))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["rows"] == 2

    elsewhere = tmp_path / "loose"
    elsewhere.mkdir()
    out = run_cli(*args, "--data", str(elsewhere), "--out", str(tmp_path / "r2"))
    assert out.returncode != 0 and "unknown advisor 'tech-tagger'" in out.stderr and "--advisors-dir" in out.stderr
    out = run_cli(*args, "--data", str(elsewhere), "--out", str(tmp_path / "r3"),
                  "--advisors-dir", str(ws / "advisors"))
    assert out.returncode == 0, out.stderr


def test_serve_takes_advisors_dir(tmp_path, tiny_llama):
    ws, _ = _workspace(tmp_path)
    server = ServeProcess(tmp_path, "--advisor", "tech-tagger", "--model", "tiny:llama",
                          "--advisors-dir", str(ws / "advisors"), "--db", str(tmp_path / "r.db"),
                          "--root", str(tmp_path / "adapters"), constrained=True, timeout=300)
    try:
        status, body = server.call("POST", "/v1/advisors/tech-tagger/analyze", {"text": "wind in kent"})
    finally:
        server.stop()
    assert status == 200, body
    assert body["contract_ok"] is True and body["answer"]["technology"] in ("Wind", "Hydro")  # the grammar's

    (ws / "advisors" / "broken.yaml").write_text("name: broken\n")
    out = run_cli("serve", "--advisors-dir", str(ws / "advisors"), "--port", "0", "--db", "")
    assert out.returncode != 0 and "broken.yaml" in out.stderr and "Traceback" not in out.stderr
