"""The CLI surface: help everywhere, JSON where a script wants it, clear errors."""

import json

import pytest
from click.testing import CliRunner

from mondrian.cli import cli

COMMANDS = [[], ["info"], ["models"], ["models", "import"], ["models", "list"], ["models", "show"],
            ["generate"], ["demo"], ["demo-data"], ["link"], ["dataset"], ["train"], ["runs"],
            ["runs", "list"], ["runs", "show"], ["adapters"], ["adapters", "publish"],
            ["adapters", "import"], ["adapters", "list"], ["adapters", "show"], ["adapters", "verify"],
            ["adapters", "alias"], ["adapters", "rollback"], ["adapters", "export"], ["eval"],
            ["serve"], ["service"], ["service", "state"], ["service", "load"], ["service", "activate"],
            ["service", "rollback"], ["service", "reload"], ["ab"], ["ab", "report"]]


def test_service_client_says_when_the_service_is_unreachable():
    res = CliRunner().invoke(cli, ["service", "state", "--url", "http://127.0.0.1:9"])
    assert res.exit_code != 0 and "cannot reach the service at http://127.0.0.1:9" in res.output


def test_serve_refuses_an_unknown_advisor(tmp_path):
    res = CliRunner().invoke(cli, ["serve", "--advisor", "nope", "--model", "tiny:llama", "--db", "",
                                   "--root", str(tmp_path)])
    assert res.exit_code != 0 and "unknown advisor 'nope'" in res.output


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a) or "mondrian")
def test_every_command_has_help(args):
    res = CliRunner().invoke(cli, [*args, "--help"])
    assert res.exit_code == 0, res.output
    assert "Usage:" in res.output


def test_models_import_list_show_json(tiny_llama):
    runner = CliRunner()
    res = runner.invoke(cli, ["models", "import", "tiny:llama", "--json"])
    assert res.exit_code == 0, res.output
    card = json.loads(res.output)
    assert card["fingerprint"] == tiny_llama.fingerprint
    listed = json.loads(runner.invoke(cli, ["models", "list", "--json"]).output)
    assert "tiny-llama" in [c["name"] for c in listed["imported"]]
    assert "smollm2-135m" in listed["available"]
    shown = json.loads(runner.invoke(cli, ["models", "show", "tiny-llama", "--json", "--files"]).output)
    assert shown["config"]["model_type"] == "llama"
    assert "model.safetensors" in shown["files"]


def test_generate_json_on_tiny_model(tiny_llama):
    res = CliRunner().invoke(cli, ["generate", "--model", "tiny:llama", "--prompt", "wind in kent",
                                   "--max-tokens", "5", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["model"] == "tiny-llama" and isinstance(out["answer"], str)


def test_errors_exit_nonzero_with_message():
    res = CliRunner().invoke(cli, ["models", "show", "./no/such/folder"])
    assert res.exit_code == 1
    assert "no such file or folder" in res.output
    res = CliRunner().invoke(cli, ["generate", "--model", "tiny:llama"])
    assert res.exit_code == 2 and "--prompt" in res.output
