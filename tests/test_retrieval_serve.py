"""Retrieval from training to serving, with real parts: a real training run on the tiny llama
copies its dataset's index into the adapter, the published version's card names it, new jobs
about a new place are linked into the SQLite job table, `mondrian adapters reindex` publishes
the same weights with the rebuilt index, and the running service (real HTTP) shows that
place's solved example to the model: without retraining."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import yaml

from mondrian.core.contracts import PROMPT_FILE, get_advisor, read_prompt
from mondrian.core.fingerprint import file_sha256
from mondrian.core.retrieval import INDEX_FILE, RetrievalIndex
from mondrian.core.workspace import load_workspace
from mondrian.dataset.build import build_dataset
from mondrian.link.linker import link_workspace
from mondrian.registry.store import Registry
from mondrian.train.config import load_config
from mondrian.train.run import train
from tests.helpers import ServeProcess, pipeline_dataset, run_cli

ADV = "fit-query"
NEW_PLACE = {"query_type": "search", "technology": "Wind", "postcode_patterns": ["ZE"]}
NEW_QUESTIONS = [f"wind turbines on the {w} isles" for w in ("zetland", "zetland north", "outer zetland",
                                                              "far zetland", "zetland south", "west zetland")]


def _add_jobs(ws: Path) -> None:
    """New production jobs in the workspace's own job table, written with plain sqlite3."""
    answer = get_advisor(ADV).render(NEW_PLACE)
    with sqlite3.connect(ws / "mondrian.db") as conn:
        for i, q in enumerate(NEW_QUESTIONS):
            conn.execute("INSERT INTO jobs (job_id, advisor, status, input_text, analysis_json, model, "
                         "created_at, completed_at) VALUES (?, ?, 'completed', ?, ?, 'prod-model', "
                         "'2026-12-01T10:00:00Z', '2026-12-01T10:00:05Z')",
                         (f"zetland-{i}", ADV, q, answer))


def _ask(server: ServeProcess, text: str, version: str) -> dict:
    status, body = server.call("POST", f"/v1/advisors/{ADV}/analyze",
                               {"text": text, "version": version, "max_tokens": 4})
    assert status == 200, body
    return body


def _examples(db: Path, request_id: str) -> list[str] | None:
    with sqlite3.connect(db) as conn:
        got = conn.execute("SELECT examples FROM requests WHERE request_id = ?", (request_id,)).fetchone()[0]
    return None if got is None else json.loads(got)


def test_train_publish_relink_reindex_serve(tmp_path, tiny_llama):
    ws = tmp_path / "ws"
    data = pipeline_dataset(ws, ADV, retrieval=True, n_fit=160, n_photo=0, seed=4)
    first_index = file_sha256(data / INDEX_FILE)

    # a real (short) training run carries the index it was trained with
    cfg = {"model": "tiny:llama", "data": str(data), "adapter_path": str(tmp_path / "run"), "advisor": ADV,
           "num_layers": 2, "batch_size": 2, "iters": 2, "learning_rate": 1e-3, "mask_prompt": True,
           "max_seq_length": 1024, "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0},
           "steps_per_report": 1, "steps_per_eval": 2, "val_batches": 1, "save_every": 2}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    result = train(load_config(tmp_path / "cfg.yaml"), progress=False)
    assert file_sha256(Path(result.adapter_path) / INDEX_FILE) == first_index
    # ... and the prompt its rows were built with
    assert read_prompt(result.adapter_path) == read_prompt(data) == get_advisor(ADV).prompt_settings()

    root = tmp_path / "adapters"
    reg = Registry(root)
    v1 = reg.publish(result.adapter_path, ADV, base_model="tiny:llama",
                     base_model_fingerprint=tiny_llama.fingerprint)
    assert v1.card.retrieval_index == first_index
    assert v1.card.files[PROMPT_FILE] == file_sha256(data / PROMPT_FILE)
    reg.set_alias(ADV, "production", "v1")

    # new jobs about a place no training row mentions: link, rebuild the dataset (and its index)
    _add_jobs(ws)
    link_workspace(load_workspace(ws), progress=False)
    build_dataset(ws / "manifest", get_advisor(ADV), data, data_root=load_workspace(ws).data_path)
    new_index = RetrievalIndex.load(data / INDEX_FILE)
    new_ids = {e.job_id for e in new_index.examples if e.job_id.startswith("zetland-")}
    assert new_ids, "no zetland question landed in the train split"
    assert new_index.fingerprint != first_index

    out = run_cli("adapters", "reindex", ADV, "production", "--data", str(data), "--alias", "production",
                  "--root", str(root), "--json")
    assert out.returncode == 0, out.stderr
    v2 = reg.show(ADV, "v2")
    assert (v2.card.parent, v2.card.origin, v2.card.retrieval_index) == ("v1", "reindex", new_index.fingerprint)
    assert v2.card.files["adapters.safetensors"] == v1.card.files["adapters.safetensors"]  # not retrained
    assert v2.card.files[PROMPT_FILE] == v1.card.files[PROMPT_FILE]  # still asked as it was taught
    assert reg.aliases(ADV)["production"] == "v2"

    db = tmp_path / "requests.db"
    server = ServeProcess(tmp_path, "--advisor", ADV, "--model", "tiny:llama", "--root", str(root),
                          "--db", str(db), timeout=300)
    try:
        question = "wind turbines in zetland"
        old = _ask(server, question, "v1")
        new = _ask(server, question, "v2")
        base = _ask(server, question, "base")
    finally:
        server.stop()
    assert not set(_examples(db, old["request_id"])) & new_ids  # v1 serves the index it was trained with
    shown = _examples(db, new["request_id"])
    assert len(shown) == get_advisor(ADV).retrieval.k and shown[0] in new_ids  # the new place's example, nearest first
    assert _examples(db, base["request_id"]) is None  # the base model shows no examples
    with sqlite3.connect(db) as conn:
        tokens = dict(conn.execute("SELECT served_version, prompt_tokens FROM requests").fetchall())
    assert tokens[None] < tokens["v1"]  # examples make the prompt longer


def test_reindex_refuses_a_version_trained_without_retrieval(tmp_path, tiny_llama):
    from tests.helpers import write_random_adapter

    root = tmp_path / "adapters"
    src = write_random_adapter(tmp_path / "plain", str(tiny_llama.path))
    Registry(root).publish(src, ADV, base_model="tiny:llama", base_model_fingerprint=tiny_llama.fingerprint)
    index = tmp_path / "ds"
    index.mkdir()
    RetrievalIndex([], 4).save(index / INDEX_FILE)
    out = run_cli("adapters", "reindex", ADV, "v1", "--data", str(index), "--root", str(root))
    assert out.returncode != 0
    assert "trained without retrieval" in out.stderr
    assert [v.version for v in Registry(root).list(ADV)] == ["v1"]
