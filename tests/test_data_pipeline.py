"""The data pipeline through the real CLI: demo workspace -> link -> dataset, both advisors."""

import json
import re

import pytest
from click.testing import CliRunner

from mondrian.cli import cli
from tests.helpers import run_cli


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ws") / "demo"
    res = CliRunner().invoke(cli, ["demo-data", str(folder), "--n-fit", "400", "--n-photo", "60",
                                   "--image-size", "64", "--json"])
    assert res.exit_code == 0, res.output
    return folder, json.loads(res.output)


def test_link_prints_conservation_and_every_defect_reason(workspace):
    folder, info = workspace
    res = run_cli("link", "-w", str(folder))
    assert res.returncode == 0, res.stderr
    total, linked = info["jobs"], info["expected"]["linked"]
    expected = {k: v for k, v in info["expected"]["rejected"].items() if v}
    assert f"{total} jobs = {linked} linked + {total - linked} rejected (conserved)" in res.stdout
    for reason, n in expected.items():
        assert re.search(rf"^  rejected {reason} +{n}  ", res.stdout, re.M), (reason, n)
    summary = json.loads((folder / "manifest" / "summary.json").read_text())
    assert summary["by_reason"] == expected  # every defect kind shows up as its own reason
    assert summary["conserved"] and summary["total"] == total
    rows = (folder / "manifest" / "manifest.jsonl").read_text().splitlines()
    assert len(rows) == total


def test_link_json_and_advisor_filter(workspace):
    folder, info = workspace
    res = CliRunner().invoke(cli, ["link", "-w", str(folder), "--advisor", "fit-query", "--json",
                                   "--out", str(folder / "fq-manifest")])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    assert set(summary["by_advisor"]) == {"fit-query"}
    assert summary["total"] == info["by_advisor"]["fit-query"] and summary["conserved"]


@pytest.mark.parametrize("advisor,model", [("fit-query", "tiny:llama"), ("photo-critic", "tiny:qwen2-vl")])
def test_dataset_builds_leakage_free_splits(workspace, advisor, model):
    folder, _ = workspace
    assert CliRunner().invoke(cli, ["link", "-w", str(folder), "--json"]).exit_code == 0
    res = CliRunner().invoke(cli, ["dataset", "-w", str(folder), "--advisor", advisor,
                                   "--model", model, "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["leakage"]["ok"]
    out = folder / "datasets" / advisor
    for split in ("train", "valid", "test"):
        lines = (out / f"{split}.jsonl").read_text().splitlines()
        assert len(lines) == report["counts"][split] > 0
    assert (out / "dataset_stats.md").is_file()


def test_errors_are_clear(tmp_path, workspace):
    folder, _ = workspace
    res = CliRunner().invoke(cli, ["link", "-w", str(tmp_path)])
    assert res.exit_code == 1 and "no such database file" in res.output
    res = CliRunner().invoke(cli, ["dataset", "-w", str(folder), "--advisor", "nope"])
    assert res.exit_code == 1 and "unknown advisor 'nope'" in res.output
    res = CliRunner().invoke(cli, ["demo-data", str(folder)])
    assert res.exit_code == 1 and "not empty" in res.output
