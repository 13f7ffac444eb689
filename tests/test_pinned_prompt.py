"""A version is asked with the prompt it was trained with: the dataset pins the advisor's system
prompt and input settings (prompt.json), training carries it into the adapter
(tests/test_retrieval_serve.py), publishing into the version, and the service and `mondrian
eval` ask each version with its own, whatever the advisor YAML says now."""

from __future__ import annotations

import json
import shutil
import sqlite3
from dataclasses import replace

import pytest
from mlx_lm.utils import load_tokenizer

from mondrian.core.config import ConfigError
from mondrian.core.contracts import PROMPT_FILE, get_advisor, read_prompt, write_prompt
from mondrian.evaluate import run as ev
from mondrian.models.generation import chat_prompt
from mondrian.registry.records import RegistryError
from mondrian.registry.store import Registry
from tests.helpers import ServeProcess, run_cli, write_random_adapter

ADV = "fit-query"
FIT = get_advisor(ADV)
# what an older YAML said: another system prompt, questions shown as typed
OLD = replace(FIT, system_prompt="You turn questions about UK Feed-in-Tariff installations into a JSON "
                                 "filter. Capacities are always in kW. Write only the JSON object.",
              input_case="as_typed", input_units=None, input_spelling=False, input_synonyms=None)


def test_prompt_settings_round_trip_and_damage(tmp_path):
    write_prompt(tmp_path, OLD)
    assert read_prompt(tmp_path) == {"advisor": ADV, "system_prompt": OLD.system_prompt, "input_case": "as_typed",
                                     "input_units": None, "input_spelling": False, "input_synonyms": None}
    assert read_prompt(tmp_path / "nowhere") is None
    asked = FIT.asked_as(read_prompt(tmp_path))
    assert asked.schema == FIT.schema and asked.cases == FIT.cases and asked.retrieval == FIT.retrieval
    assert asked.messages("WIND in Kent") == [{"role": "system", "content": OLD.system_prompt},
                                              {"role": "user", "content": "WIND in Kent"}]
    assert FIT.messages("WIND in Kent")[-1]["content"] == "wind in kent"  # the YAML's own: lower-cased
    assert FIT.asked_as(None) is FIT and FIT.asked_as(FIT.prompt_settings()) is FIT
    with pytest.raises(ConfigError, match="advisor 'photo-critic'"):
        FIT.asked_as({**FIT.prompt_settings(), "advisor": "photo-critic"})
    for bad in ("{", json.dumps({"advisor": ADV}), json.dumps({**OLD.prompt_settings(), "input_case": "upper"}),
                json.dumps({**OLD.prompt_settings(), "system_prompt": 3})):
        (tmp_path / PROMPT_FILE).write_text(bad)
        with pytest.raises(ConfigError, match=PROMPT_FILE):
            read_prompt(tmp_path)


def test_publish_keeps_the_prompt_and_refuses_a_bad_one(tmp_path, tiny_llama):
    src = write_random_adapter(tmp_path / "a", str(tiny_llama.path))
    write_prompt(src, OLD)
    reg = Registry(tmp_path / "adapters")
    v1 = reg.publish(src, ADV, base_model="tiny:llama", base_model_fingerprint=tiny_llama.fingerprint)
    assert read_prompt(v1.path) == OLD.prompt_settings() and PROMPT_FILE in v1.card.files
    out = run_cli("adapters", "show", ADV, "v1", "--root", str(tmp_path / "adapters"), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["prompt"] == OLD.prompt_settings()

    (src / PROMPT_FILE).write_text(json.dumps({**OLD.prompt_settings(), "advisor": "photo-critic"}))
    with pytest.raises(RegistryError, match="advisor 'photo-critic'"):
        reg.publish(src, ADV, base_model="tiny:llama", base_model_fingerprint=tiny_llama.fingerprint)
    (src / PROMPT_FILE).write_text("not json")
    with pytest.raises(RegistryError, match="not readable JSON"):
        reg.publish(src, ADV, base_model="tiny:llama", base_model_fingerprint=tiny_llama.fingerprint)
    assert [v.version for v in reg.list(ADV)] == ["v1"]  # nothing half-published


def test_service_asks_each_version_with_its_own_prompt(tmp_path, tiny_llama):
    """v1 pins an older prompt, v2 pins none (published before prompts were pinned), the base
    has the YAML's: the requests table's prompt_tokens are exactly each one's chat."""
    root = tmp_path / "adapters"
    reg = Registry(root)
    pinned = write_random_adapter(tmp_path / "pinned", str(tiny_llama.path))
    write_prompt(pinned, OLD)
    reg.publish(pinned, ADV, base_model="tiny:llama", base_model_fingerprint=tiny_llama.fingerprint)
    reg.publish(write_random_adapter(tmp_path / "older", str(tiny_llama.path), seed=1), ADV,
                base_model="tiny:llama", base_model_fingerprint=tiny_llama.fingerprint)
    db = tmp_path / "requests.db"
    server = ServeProcess(tmp_path, "--advisor", ADV, "--model", "tiny:llama", "--root", str(root),
                          "--db", str(db), timeout=300)
    question = "WIND turbines in Kent over 50 kW"
    try:
        for version in ("v1", "v2", "base"):
            status, body = server.call("POST", f"/v1/advisors/{ADV}/analyze",
                                       {"text": question, "version": version, "max_tokens": 2})
            assert status == 200, body
    finally:
        server.stop()
    with sqlite3.connect(db) as conn:
        tokens = dict(conn.execute("SELECT assigned_version, prompt_tokens FROM requests").fetchall())
    tok = load_tokenizer(tiny_llama.path)
    assert tokens["v1"] == len(chat_prompt(tok, OLD.messages(question)))
    assert tokens["v2"] == tokens[None] == len(chat_prompt(tok, FIT.messages(question)))
    assert tokens["v1"] > tokens[None]  # the two prompts differ, so the check above can fail


def test_eval_asks_the_adapter_with_its_pinned_prompt(tmp_path, tiny_llama):
    adapter = write_random_adapter(tmp_path / "a", str(tiny_llama.path))
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"input": "WIND in Kent", "expected": {"query_type": "search",
                                     "technology": "Wind", "postcode_patterns": ["CT", "DA", "ME", "TN"]}}) + "\n")
    data = tmp_path / "data"
    data.mkdir()
    kwargs = {"questions": questions, "batch_size": 2, "max_tokens": 2, "resamples": 10, "db": tmp_path / "r.db"}

    report = ev.evaluate(tiny_llama.path, adapter, data, FIT, out_dir=tmp_path / "none", **kwargs)
    assert report.config["prompt"] == FIT.prompt_settings()
    assert any("pins no prompt" in n for n in report.notes)

    write_prompt(adapter, OLD)
    report = ev.evaluate(tiny_llama.path, adapter, data, FIT, out_dir=tmp_path / "old", **kwargs)
    assert report.config["prompt"] == OLD.prompt_settings()
    assert report.config["advisor_fingerprint"] == FIT.fingerprint  # scored by the contract as it is
    assert not any("prompt" in n for n in report.notes)
    shutil.rmtree(tmp_path / "old")
