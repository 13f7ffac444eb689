"""Model-spec resolution: local folders, typos, hub ids offline, names."""

import json
import shutil

import pytest

from mondrian.models.sources import ModelError, resolve
from tests.helpers import run_cli


def test_mistyped_path_is_an_error_not_a_download(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for spec in ("./modles/smol", "/no/such/model", "models/smollm2", "~/nope-model", "x/y/z"):
        with pytest.raises(ModelError, match="no such file or folder"):
            resolve(spec)
    with pytest.raises(ModelError, match="no such GGUF file"):
        resolve("weights/missing.gguf")


def test_local_folder_is_checked(tmp_path, tiny_llama):
    good = tmp_path / "good"
    shutil.copytree(tiny_llama.path, good)
    card = resolve(str(good))
    assert card.model_type == "llama" and card.fingerprint == tiny_llama.fingerprint

    for missing, message in (("tokenizer.json", "no tokenizer"), ("config.json", "config.json is missing"),
                             ("model.safetensors", "no \\*.safetensors")):
        broken = tmp_path / f"no-{missing}"
        shutil.copytree(tiny_llama.path, broken)
        (broken / missing).unlink()
        if missing == "tokenizer.json":
            (broken / "tokenizer_config.json").unlink()
        with pytest.raises(ModelError, match=message):
            resolve(str(broken))


def test_fingerprint_changes_with_any_byte(tmp_path, tiny_llama):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama.path, copy)
    (copy / "mondrian_model.json").unlink()
    before = resolve(str(copy)).fingerprint
    cfg = json.loads((copy / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5 if cfg.get("rms_norm_eps") != 1e-5 else 1e-6
    (copy / "config.json").write_text(json.dumps(cfg))
    assert resolve(str(copy)).fingerprint != before


def test_hub_id_offline_fails_fast_and_clearly():
    with pytest.raises(ModelError, match="HF_HUB_OFFLINE is set") as err:
        resolve("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert "smollm2-135m" in str(err.value)


def test_hub_unreachable_fails_clearly():
    # A closed port on loopback stands in for "no network"; nothing leaves the machine.
    res = run_cli("models", "show", "some-org/some-model",
                  env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert res.returncode == 1
    assert "unreachable" in res.stderr and "some-org/some-model" in res.stderr


def test_unknown_name_lists_known_ones():
    with pytest.raises(ModelError, match="unknown model 'smollm3'.*smollm2-135m.*tiny:llama"):
        resolve("smollm3")
    with pytest.raises(ModelError, match="unknown tiny model"):
        resolve("tiny:gpt5")
    with pytest.raises(ModelError, match="empty"):
        resolve("  ")
