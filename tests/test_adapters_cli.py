"""`mondrian adapters ...` over a real training run: publish, verify, alias, rollback, tamper."""

import json
import os
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from mondrian.cli import cli
from tests.helpers import pipeline_dataset


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters") / "ws"
    pipeline_dataset(root, "fit-query", n_fit=200, n_photo=0, seed=2)
    cfg = {"model": "tiny:llama", "data": str(root / "datasets" / "fit-query"),
           "adapter_path": str(root / "runs" / "r1"), "advisor": "fit-query", "num_layers": 2,
           "batch_size": 4, "iters": 4, "learning_rate": 1e-3, "mask_prompt": True,
           "max_seq_length": 1024, "val_batches": 1, "steps_per_eval": 4}
    (root / "train.yaml").write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(cli, ["train", "--config", str(root / "train.yaml"), "--json"])
    assert res.exit_code == 0, res.output
    return root, json.loads(res.output)["run_id"]


def test_publish_verify_alias_rollback_tamper(trained_run, tmp_path):
    root, run_id = trained_run
    reg = str(tmp_path / "registry")
    db = str(root / "mondrian.db")
    runner = CliRunner()

    def ok(*args):
        res = runner.invoke(cli, list(args))
        assert res.exit_code == 0, res.output
        return res.output

    v1 = json.loads(ok("adapters", "publish", "--run", run_id, "--db", db, "--alias", "production",
                       "--root", reg, "--json"))
    assert v1["version"] == "v1" and "production" in v1["aliases"]
    v2 = json.loads(ok("adapters", "publish", "--run", run_id, "--db", db, "--root", reg, "--json"))
    assert v2["version"] == "v2" and v2["card"]["parent"] == "v1"
    assert v2["card"]["run_id"] == run_id and len(v2["card"]["base_model_fingerprint"]) == 64
    ok("adapters", "alias", "fit-query", "production", "v2", "--root", reg)
    assert "production   -> v2" in ok("adapters", "alias", "fit-query", "--root", reg)
    assert "production -> v1" in ok("adapters", "rollback", "fit-query", "--root", reg)
    listed = json.loads(ok("adapters", "list", "fit-query", "--root", reg, "--json"))
    assert [v["version"] for v in listed] == ["v1", "v2"]
    assert "v1: ok" in ok("adapters", "verify", "fit-query", "--root", reg)

    weights = Path(reg) / "fit-query" / "v1" / "adapters.safetensors"
    os.chmod(weights.parent, 0o755)
    os.chmod(weights, 0o644)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte in the tensor data
    weights.write_bytes(bytes(data))
    res = runner.invoke(cli, ["adapters", "verify", "fit-query", "--root", reg])
    assert res.exit_code == 1 and "v1: FAILED" in res.output and "checksum" in res.output
    assert "v2: ok" in res.output
    res = runner.invoke(cli, ["adapters", "alias", "fit-query", "candidate", "v1", "--root", reg])
    assert res.exit_code == 1 and "checksum" in res.output  # never point an alias at a damaged version
    res = runner.invoke(cli, ["eval", "--adapter", "fit-query:v1", "--root", reg, "--limit", "4"])
    assert res.exit_code == 1 and "checksum" in res.output  # and no loader takes it either


def test_eval_a_published_version(trained_run, tmp_path):
    root, run_id = trained_run
    reg = str(tmp_path / "registry")
    runner = CliRunner()
    res = runner.invoke(cli, ["adapters", "publish", "--run", run_id, "--db", str(root / "mondrian.db"),
                              "--root", reg, "--alias", "production"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["eval", "--adapter", "fit-query:production", "--root", reg, "--limit", "6",
                              "--max-tokens", "12", "--batch-size", "3", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    # constrained arms by default (the contract's grammar), free arms only with --unconstrained
    assert summary["rows"] == 6 and {"base", "adapter", "base_constrained", "adapter_constrained"} <= set(summary)
    assert (Path(summary["out_dir"]) / "report.md").is_file()
    res = runner.invoke(cli, ["eval", "--adapter", "fit-query:production", "--root", reg, "--limit", "6",
                              "--max-tokens", "12", "--batch-size", "3", "--json", "--unconstrained"])
    assert res.exit_code == 0, res.output
    free = json.loads(res.output)
    assert {"base", "adapter"} <= set(free) and not any(k.endswith("_constrained") for k in free)
    from mondrian.train.runs import RunStore

    store = RunStore(root / "mondrian.db")
    run = store.get(summary["run_id"])
    store.close()
    assert run["kind"] == "eval" and run["status"] == "completed"


def test_publish_errors(trained_run, tmp_path):
    root, _ = trained_run
    res = CliRunner().invoke(cli, ["adapters", "publish", "--run", "nope", "--db", str(root / "mondrian.db"),
                                   "--root", str(tmp_path)])
    assert res.exit_code == 1 and "no run 'nope'" in res.output
    res = CliRunner().invoke(cli, ["adapters", "publish", "--root", str(tmp_path)])
    assert res.exit_code == 2 and "--run" in res.output
