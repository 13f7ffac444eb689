"""Adapter registry: immutable checksummed versions, aliases, import, fused export, kill -9."""

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from mondrian.core.adapters import check_adapter
from mondrian.core.fingerprint import file_sha256
from mondrian.registry.fuse import export_fused
from mondrian.registry.records import CARD, RegistryError
from mondrian.registry.store import Registry
from tests.helpers import LORA, ROOT, write_random_adapter

ADV = "fit-query"
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_llama) -> Path:
    """Shaped like a training run's adapter_path: the adapter, a loss curve, and the folders
    a version must not carry (best/, last/, checkpoints/)."""
    out = write_random_adapter(tmp_path_factory.mktemp("run") / "run", tiny_llama.path)
    (out / "loss_curve.svg").write_text("<svg/>")
    for sub in ("best", "last", "checkpoints/step-0000004"):
        (out / sub).mkdir(parents=True)
        shutil.copy(out / "adapters.safetensors", out / sub / "adapters.safetensors")
    return out


def _publish(reg: Registry, src: Path, fp: str, **kw):
    return reg.publish(src, ADV, base_model="tiny:llama", base_model_fingerprint=fp, **kw)


def _files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _writable(path: Path) -> None:
    path.chmod(path.stat().st_mode | stat.S_IWUSR)


def test_publish_list_show_verify_and_immutability(tmp_path, run_dir, tiny_llama):
    reg = Registry(tmp_path / "adapters")
    assert reg.list() == [] and reg.advisors() == []
    v1 = _publish(reg, run_dir, tiny_llama.fingerprint, dataset_fingerprint="d" * 64, run_id="train-1",
                  metrics={"exact_match": 0.85})
    assert v1.version == "v1" and v1.path == tmp_path / "adapters" / ADV / "v1"
    assert sorted(p.name for p in v1.path.iterdir()) == [
        "adapter_config.json", "adapters.safetensors", CARD, "loss_curve.svg"]  # no best/ last/ checkpoints/
    card = json.loads((v1.path / CARD).read_text())
    assert card["files"] == {n: file_sha256(v1.path / n) for n in
                             ("adapter_config.json", "adapters.safetensors", "loss_curve.svg")}
    assert card["base_model_fingerprint"] == tiny_llama.fingerprint
    assert card["dataset_fingerprint"] == "d" * 64 and card["run_id"] == "train-1"
    assert card["metrics"] == {"exact_match": 0.85} and card["parent"] is None
    assert card["config"]["lora_parameters"] == LORA  # from adapter_config.json when not given
    assert card["source"] == str(run_dir.resolve()) and card["created_at"].endswith("Z")
    # Read-only: files and the folder (so nothing can be added or removed either).
    for p in [v1.path, *v1.path.iterdir()]:
        assert p.stat().st_mode & 0o222 == 0, p

    report = reg.verify(ADV, "v1")
    assert report.ok and sorted(report.ok_files) == sorted(card["files"]), report.describe()
    assert reg.resolve(ADV, "v1", tiny_llama.fingerprint) == v1.path

    before = _files(v1.path)
    reg.set_alias(ADV, "production", "v1")
    v2 = _publish(reg, run_dir, tiny_llama.fingerprint)
    assert v2.version == "v2" and v2.card.parent == "v1"  # production at publish time
    assert _publish(reg, run_dir, tiny_llama.fingerprint, parent="v2").card.parent == "v2"
    assert _files(v1.path) == before
    assert [v.version for v in reg.list(ADV)] == ["v1", "v2", "v3"] == [v.version for v in reg.list()]
    shown = reg.show(ADV, "production")
    assert shown.version == "v1" and shown.aliases == ("production",) and shown.card.run_id == "train-1"
    with pytest.raises(RegistryError, match="fit-query v9: no such version \\(published: v1, v2, v3\\)"):
        reg.show(ADV, "v9")
    with pytest.raises(RegistryError, match="'staging' is neither a version .* \\(aliases: production\\)"):
        reg.resolve(ADV, "staging")


def test_publish_from_a_training_run_then_mlx_lm_generate(tmp_path, tiny_llama):
    """A real (4-step) training run, published from its runs row; mlx-lm's CLI loads the version."""
    from mondrian.train.config import load_config
    from mondrian.train.run import train
    from mondrian.train.runs import RunStore

    data = tmp_path / "data"
    data.mkdir()
    for split, n in (("train", 8), ("valid", 4)):
        rows = [{"messages": [{"role": "user", "content": f"wind sites over {i}00kw"},
                              {"role": "assistant", "content": f'{{"capacity_min_kw": {i}00}}'}]}
                for i in range(n)]
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"model": "tiny:llama", "data": str(data), "adapter_path": str(tmp_path / "run"),
           "advisor": ADV, "db": str(tmp_path / "mondrian.db"), "num_layers": 2, "batch_size": 2,
           "iters": 4, "learning_rate": 1e-3, "lora_parameters": LORA, "steps_per_report": 4,
           "steps_per_eval": 4, "val_batches": 1, "save_every": 4}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    result = train(load_config(tmp_path / "c.yaml"), progress=False)
    store = RunStore(tmp_path / "mondrian.db")
    run = store.get(result.run_id)
    store.close()

    reg = Registry(tmp_path / "adapters")
    v = reg.publish_run(run, metrics={"val_loss": result.best_val_loss})
    assert (v.advisor, v.version) == (ADV, "v1")
    assert v.card.run_id == run["run_id"] and v.card.config["iters"] == 4
    assert v.card.dataset_fingerprint == run["dataset_fingerprint"]
    assert v.card.base_model_fingerprint == tiny_llama.fingerprint == run["base_model_fingerprint"]
    assert set(v.card.files) == {"adapters.safetensors", "adapter_config.json", "loss_curve.svg"}
    assert file_sha256(v.path / "adapters.safetensors") == file_sha256(tmp_path / "run" / "best" / "adapters.safetensors")

    path = reg.resolve(ADV, "v1", tiny_llama.fingerprint)
    res = subprocess.run([sys.executable, "-m", "mlx_lm", "generate", "--model", tiny_llama.path,
                          "--adapter-path", str(path), "--prompt", "wind in kent", "--max-tokens", "3"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Generation:" in res.stdout  # mlx-lm's statistics line: it generated

    with pytest.raises(RegistryError, match="only a finished run"):
        reg.publish_run(run | {"status": "failed"})


def test_a_flipped_byte_fails_verify_and_every_load(tmp_path, run_dir, tiny_llama):
    from mlx_lm import load

    reg = Registry(tmp_path / "adapters")
    for _ in range(4):
        _publish(reg, run_dir, tiny_llama.fingerprint)
    reg.set_alias(ADV, "production", "v1")
    weights = tmp_path / "adapters" / ADV / "v1" / "adapters.safetensors"
    _writable(weights)
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0x01  # inside the last tensor's data: the header still parses
    weights.write_bytes(bytes(raw))
    load(tiny_llama.path, adapter_path=str(weights.parent))  # mlx-lm alone would load it silently

    report = reg.verify(ADV, "v1")
    assert not report.ok and [c[0] for c in report.changed] == ["adapters.safetensors"]
    assert report.changed[0][2] == file_sha256(weights)
    for ref in ("v1", "production"):
        with pytest.raises(RegistryError, match="refused to load fit-query v1: adapters.safetensors "
                                                "fails its checksum"):
            reg.resolve(ADV, ref, tiny_llama.fingerprint)

    v2 = tmp_path / "adapters" / ADV / "v2"  # an extra file
    _writable(v2)
    (v2 / "notes.txt").write_text("hi")
    assert reg.verify(ADV, "v2").extra == ["notes.txt"]
    with pytest.raises(RegistryError, match="notes.txt is not in the card"):
        reg.resolve(ADV, "v2")

    v3 = tmp_path / "adapters" / ADV / "v3"  # a missing file
    _writable(v3)
    (v3 / "adapter_config.json").unlink()
    assert reg.verify(ADV, "v3").missing == ["adapter_config.json"]
    with pytest.raises(RegistryError, match="fit-query v3: adapter_config.json is missing"):
        reg.resolve(ADV, "v3")

    card = tmp_path / "adapters" / ADV / "v4" / CARD  # the card edited (metrics inflated)
    _writable(card)
    data = json.loads(card.read_text())
    card.write_text(json.dumps(data | {"metrics": {"exact_match": 1.0}}))
    with pytest.raises(RegistryError, match="fit-query v4: card.json was changed after publishing"):
        reg.resolve(ADV, "v4")
    assert reg.show(ADV, "v4").card is None and "changed" in reg.show(ADV, "v4").error

    with pytest.raises(RegistryError, match="refused to point fit-query 'candidate' at v1"):
        reg.set_alias(ADV, "candidate", "v1")  # an alias never points at a damaged version


def test_wrong_base_model_is_refused(tmp_path, run_dir, tiny_llama):
    reg = Registry(tmp_path / "adapters")
    _publish(reg, run_dir, tiny_llama.fingerprint)
    other = "ab" * 32
    with pytest.raises(RegistryError) as exc:
        reg.resolve(ADV, "v1", other)
    msg = str(exc.value)
    assert "refused to load fit-query v1" in msg and "tiny:llama" in msg
    assert f"fingerprint {tiny_llama.fingerprint[:12]}" in msg and f"fingerprint {other[:12]}" in msg
    with pytest.raises(RegistryError, match="refused to load fit-query v1"):
        export_fused(reg, ADV, "v1", tiny_llama.path, tmp_path / "fused", base_model_fingerprint=other)
    assert not (tmp_path / "fused").exists()
    with pytest.raises(RegistryError, match="is not a sha256"):
        _publish(reg, run_dir, "tiny:llama")


def test_aliases_set_rollback_and_history(tmp_path, run_dir, tiny_llama):
    reg = Registry(tmp_path / "adapters")
    for _ in range(3):
        _publish(reg, run_dir, tiny_llama.fingerprint)
    with pytest.raises(RegistryError, match="no earlier version to roll back to"):
        reg.rollback(ADV)
    for v in ("v1", "v2", "v3"):
        reg.set_alias(ADV, "production", v)
    reg.set_alias(ADV, "production", "v3")  # not a move: no history entry
    reg.set_alias(ADV, "candidate", "v1")
    assert reg.aliases(ADV) == {"production": "v3", "candidate": "v1"}
    assert reg.rollback(ADV) == "v2"
    assert reg.resolve(ADV, "production") == tmp_path / "adapters" / ADV / "v2"
    assert reg.rollback(ADV, "production") == "v1"
    with pytest.raises(RegistryError, match="alias 'production' has no earlier version .* points at v1"):
        reg.rollback(ADV)
    assert reg.aliases(ADV) == {"production": "v1", "candidate": "v1"}
    assert reg.show(ADV, "v1").aliases == ("candidate", "production")
    history = reg.alias_history(ADV)
    assert [(h["alias"], h["action"], h["from"], h["to"]) for h in history] == [
        ("production", "set", None, "v1"), ("production", "set", "v1", "v2"),
        ("production", "set", "v2", "v3"), ("candidate", "set", None, "v1"),
        ("production", "rollback", "v3", "v2"), ("production", "rollback", "v2", "v1")]
    reg.set_alias(ADV, "production", "v3")
    assert reg.rollback(ADV) == "v1"  # back to where it was before the last move
    for bad in ("v2", "Production", "1st", "prod/x", ""):
        with pytest.raises(RegistryError, match="aliases are lower-case names"):
            reg.set_alias(ADV, bad, "v1")
    with pytest.raises(RegistryError, match="fit-query v7: no such version"):
        reg.set_alias(ADV, "production", "v7")
    assert not list((tmp_path / "adapters" / ADV).glob(".aliases*"))  # no temp files left


def test_import_a_plain_mlx_lm_adapter_and_refuse_broken_ones(tmp_path, tiny_llama):
    # The real thing: `python -m mlx_lm lora` leaves the final adapter, its config (all of
    # lora.py's arguments) and numbered checkpoints side by side in --adapter-path.
    data = tmp_path / "data"
    data.mkdir()
    for split, n in (("train", 4), ("valid", 2)):
        rows = [{"messages": [{"role": "user", "content": f"wind {i}"},
                              {"role": "assistant", "content": f"ok {i}"}]} for i in range(n)]
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plain = tmp_path / "plain"
    res = subprocess.run([sys.executable, "-m", "mlx_lm", "lora", "--model", tiny_llama.path, "--train",
                          "--data", str(data), "--iters", "2", "--batch-size", "2", "--num-layers", "2",
                          "--adapter-path", str(plain), "--save-every", "1", "--val-batches", "1"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (plain / "0000002_adapters.safetensors").is_file()
    reg = Registry(tmp_path / "adapters")
    v = reg.import_adapter(plain, ADV, base_model="tiny:llama", base_model_fingerprint=tiny_llama.fingerprint)
    assert v.card.origin == "import" and v.card.config["iters"] == 2 and v.card.config["num_layers"] == 2
    assert sorted(v.card.files) == ["adapter_config.json", "adapters.safetensors"]  # no checkpoint
    assert reg.verify(ADV, "v1").ok

    def broken(name: str, change) -> Path:
        folder = tmp_path / name
        shutil.copytree(plain, folder)
        change(folder)
        return folder

    def edit_config(**kw):
        def change(folder):
            cfg = json.loads((folder / "adapter_config.json").read_text()) | kw
            (folder / "adapter_config.json").write_text(json.dumps({k: v for k, v in cfg.items()
                                                                    if v is not None}))
        return change

    def write_tensors(tensors):
        def change(folder):
            import mlx.core as mx

            mx.save_safetensors(str(folder / "adapters.safetensors"), tensors)
        return change

    import mlx.core as mx

    a = "model.layers.5.self_attn.q_proj.lora_a"
    cases = {
        "no_config": (lambda f: (f / "adapter_config.json").unlink(), "adapter_config.json missing"),
        "no_weights": (lambda f: (f / "adapters.safetensors").unlink(), "adapters.safetensors missing"),
        "no_num_layers": (edit_config(num_layers=None), "needs an integer num_layers"),
        "no_lora_params": (edit_config(lora_parameters=None), "needs lora_parameters"),
        "alpha_not_scale": (edit_config(lora_parameters={"rank": 8, "alpha": 16, "dropout": 0}),
                            "lora_parameters.scale is missing"),
        "full": (edit_config(fine_tune_type="full"), "fine_tune_type 'full' is not an adapter"),
        "not_safetensors": (lambda f: (f / "adapters.safetensors").write_bytes(b"\x00" * 64),
                            "adapters.safetensors: not a safetensors file"),
        "truncated": (lambda f: (f / "adapters.safetensors").write_bytes(
            (f / "adapters.safetensors").read_bytes()[:-10]), "truncated or padded"),
        "base_weights": (write_tensors({"model.layers.5.self_attn.q_proj.weight": mx.zeros((4, 4))}),
                         "not adapter weights \\(model.layers.5.self_attn.q_proj.weight\\)"),
        "unpaired": (write_tensors({a: mx.zeros((256, 4))}), f"{a} has no .*lora_b"),
        "wrong_rank": (write_tensors({a: mx.zeros((256, 4)), a[:-1] + "b": mx.zeros((4, 256))}),
                       "has rank 4, the config says 8"),
    }
    for name, (change, message) in cases.items():
        with pytest.raises(RegistryError, match=message):
            reg.import_adapter(broken(name, change), ADV, base_model="tiny:llama",
                               base_model_fingerprint=tiny_llama.fingerprint)
    assert [x.version for x in reg.list(ADV)] == ["v1"]  # nothing half-made, no number used
    assert not list((tmp_path / "adapters" / ADV).glob(".publish-*"))
    assert check_adapter(plain)["num_layers"] == 2


def test_export_fused_matches_base_plus_adapter(tmp_path, run_dir, tiny_llama):
    import mlx.core as mx
    from mlx_lm import generate, load

    reg = Registry(tmp_path / "adapters")
    _publish(reg, run_dir, tiny_llama.fingerprint)
    reg.set_alias(ADV, "production", "v1")
    out = export_fused(reg, ADV, "production", tiny_llama.path, tmp_path / "fused",
                           base_model_fingerprint=tiny_llama.fingerprint)
    assert json.loads((out / "mondrian_export.json").read_text())["version"] == "v1"

    fused, ftok = load(str(out))
    adapted, tok = load(tiny_llama.path, adapter_path=str(reg.resolve(ADV, "v1")))
    base, _ = load(tiny_llama.path)
    messages = [{"role": "user", "content": "wind sites over 100kw in berkshire"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert ftok.apply_chat_template(messages, add_generation_prompt=True) == prompt  # template kept
    ids = mx.array([prompt])
    lf, la, lb = fused(ids), adapted(ids), base(ids)
    assert mx.allclose(lf, la, atol=1e-4).item()
    assert not mx.allclose(lb, la, atol=1e-2).item()  # the adapter matters: the check has teeth
    assert generate(fused, ftok, prompt, max_tokens=8) == generate(adapted, tok, prompt, max_tokens=8)
    with pytest.raises(RegistryError, match="already exists"):
        export_fused(reg, ADV, "v1", tiny_llama.path, out, base_model_fingerprint=tiny_llama.fingerprint)


def test_kill_9_mid_publish_leaves_no_version(tmp_path, run_dir, tiny_llama):
    root = tmp_path / "adapters"
    reg = Registry(root)
    _publish(reg, run_dir, tiny_llama.fingerprint)
    before = [v.to_dict() for v in reg.list()]
    big = tmp_path / "big"
    big.mkdir()
    for p in run_dir.iterdir():
        if p.is_file():
            shutil.copy(p, big / p.name)
    size = 200_000_000
    with open(big / "zz_zeros.bin", "wb") as f:
        f.truncate(size)  # sparse: instant to make, but publish copies all 200 MB
    code = (f"from mondrian.registry.store import Registry; Registry({str(root)!r}).publish({str(big)!r}, "
            f"{ADV!r}, base_model='tiny:llama', base_model_fingerprint={tiny_llama.fingerprint!r})")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not [p for p in (root / ADV).glob(".publish-*/zz_zeros.bin") if p.stat().st_size > 0]:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = list((root / ADV).glob(".publish-*/zz_zeros.bin"))
    assert len(partial) == 1 and 0 < partial[0].stat().st_size < size  # killed while copying
    assert sorted(p.name for p in (root / ADV).iterdir() if not p.name.startswith(".")) == ["v1"]
    assert [v.to_dict() for v in reg.list()] == before

    v2 = _publish(reg, run_dir, tiny_llama.fingerprint)
    assert v2.version == "v2" and reg.verify(ADV, "v2").ok
    assert not list((root / ADV).glob(".publish-*"))  # the dead publish's leftovers are gone


def test_concurrent_publishes_get_distinct_versions(tmp_path, run_dir, tiny_llama):
    reg = Registry(tmp_path / "adapters")
    errors = []

    def one():
        try:
            _publish(Registry(tmp_path / "adapters"), run_dir, tiny_llama.fingerprint)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [v.version for v in reg.list(ADV)] == ["v1", "v2", "v3", "v4"]
    assert all(reg.verify(ADV, v.version).ok for v in reg.list(ADV))


def test_a_deleted_version_number_is_never_reused(tmp_path, run_dir, tiny_llama):
    reg = Registry(tmp_path / "adapters")
    _publish(reg, run_dir, tiny_llama.fingerprint)
    _publish(reg, run_dir, tiny_llama.fingerprint)
    reg.set_alias(ADV, "production", "v2")
    v2 = tmp_path / "adapters" / ADV / "v2"
    for p in [v2, *v2.iterdir()]:
        _writable(p)
    shutil.rmtree(v2)  # by hand: the registry has no delete
    assert _publish(reg, run_dir, tiny_llama.fingerprint).version == "v3"


def test_the_registry_does_not_import_lora_or_mlx():
    """The service imports the registry; arrows point one way (DESIGN)."""
    code = ("import sys, mondrian.registry.store; bad = [m for m in sys.modules if m.split('.')[0] in "
            "('lora', 'mlx', 'mlx_lm', 'torch')]; assert not bad, bad")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
