"""Vision LoRA training on the tiny Qwen2-VL through mlx-vlm's trainer machinery: the loss
falls, the run is in SQLite, the adapter folder loads with mlx-vlm and is really applied,
best/ holds the lowest validation loss, resume is exact, and bad inputs fail before step one."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest

from mondrian.core.adapters import AdapterError, lora_targets
from mondrian.train import loop
from mondrian.train.config import TrainConfig
from mondrian.train.loop import TrainError
from mondrian.train.runs import RunStore
from mondrian.train.vision import _run, train_vision
from tests.helpers import pipeline_dataset


@pytest.fixture(scope="module")
def vision_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A photo-critic dataset from the real pipeline: demo workspace -> link -> dataset."""
    root = tmp_path_factory.mktemp("train_vlm") / "ws"
    out = pipeline_dataset(root, "photo-critic", n_fit=0, n_photo=60, image_size=64)
    counts = json.loads((out / "dataset_stats.json").read_text())["counts"]
    assert counts["train"] >= 16 and counts["valid"] >= 4
    return out


def _cfg(data: Path, out: Path, **kw: Any) -> TrainConfig:
    base = {"model": "tiny:qwen2-vl", "data": str(data), "adapter_path": str(out), "advisor": "photo-critic",
            "num_layers": 2, "batch_size": 4, "iters": 16, "learning_rate": 1e-2, "mask_prompt": True,
            "max_seq_length": 512, "lora_parameters": {"rank": 8, "scale": 4.0, "dropout": 0.05},
            "steps_per_report": 2, "steps_per_eval": 4, "val_batches": 2, "save_every": 8, "seed": 1}
    return TrainConfig(**(base | kw))


@pytest.fixture(scope="module")
def trained(vision_data: Path, tmp_path_factory: pytest.TempPathFactory):
    cfg = _cfg(vision_data, tmp_path_factory.mktemp("run") / "adapter")
    result, model, processor = _run(cfg, resume=False, progress=False, stop_after=None)
    return cfg, result, model, processor


def _metrics(db: Path, run_id: str, name: str) -> list[tuple[int, float]]:
    store = RunStore(db)
    try:
        return [(s, v) for s, _, v in store.metrics(run_id, name)]
    finally:
        store.close()


def _db(data: Path) -> Path:
    return data.parent.parent / "mondrian.db"  # the workspace's, as mondrian/train/loop.py's runs_db picks


def test_loss_falls_and_the_run_is_recorded(trained, vision_data):
    cfg, result, _, _ = trained
    assert result.status == "completed" and result.steps == cfg.iters
    train_loss = _metrics(_db(vision_data), result.run_id, "train_loss")
    val_loss = _metrics(_db(vision_data), result.run_id, "val_loss")
    assert [s for s, _ in train_loss] == list(range(2, cfg.iters + 1, 2))
    assert [s for s, _ in val_loss] == [0, 4, 8, 12, 16]
    # The tiny model's frozen random head bounds how low it can go; the fall is still clear.
    assert train_loss[-1][1] < train_loss[0][1] - 0.1, train_loss
    assert val_loss[-1][1] < val_loss[0][1] - 0.2, val_loss
    assert result.first_val_loss == val_loss[0][1]
    assert result.tokens > result.loss_tokens > 0 and result.tokens_per_s > 0

    store = RunStore(_db(vision_data))
    run = store.get(result.run_id)
    store.close()
    assert run["kind"] == "train" and run["status"] == "completed" and run["error"] is None
    assert run["advisor"] == "photo-critic" and run["base_model"] == "tiny:qwen2-vl"
    assert run["config"]["lora_parameters"]["rank"] == 8 and run["config"]["trainer"] == "mlx-vlm"
    stats = json.loads((vision_data / "dataset_stats.json").read_text())
    assert run["dataset_fingerprint"] == stats["fingerprint"]
    assert len(run["base_model_fingerprint"]) == 64
    assert run["summary"]["best_step"] == result.best_step
    svg = (Path(cfg.adapter_path) / "loss_curve.svg").read_text()
    assert svg.startswith("<svg") and svg.count("<polyline") == 2


def test_best_last_and_root_layout(trained, vision_data):
    cfg, result, _, _ = trained
    out = Path(cfg.adapter_path)
    val_loss = _metrics(_db(vision_data), result.run_id, "val_loss")
    best_step, best_val = min(val_loss, key=lambda sv: sv[1])
    best = json.loads((out / "best" / "best.json").read_text())
    assert (best["step"], best["val_loss"]) == (best_step, best_val) == (result.best_step, result.best_val_loss)
    for name in ("adapters.safetensors", "adapter_config.json", "mondrian_adapter.json"):
        assert (out / name).read_bytes() == (out / "best" / name).read_bytes()
    assert json.loads((out / "last" / "mondrian_adapter.json").read_text())["step"] == cfg.iters
    conf = json.loads((out / "adapter_config.json").read_text())
    # What mlx-vlm 0.7.10 reads back: scale = alpha / rank, qualified module names.
    assert conf["fine_tune_type"] == "lora"
    assert conf["lora_parameters"] | {"keys": None} == {"rank": 8, "scale": 4.0, "dropout": 0.05, "keys": None}
    assert len(conf["lora_parameters"]["keys"]) == 14  # 7 Linear x 2 language layers
    assert all(k.startswith("language_model.model.layers.") for k in conf["lora_parameters"]["keys"])
    names = mx.load(str(out / "adapters.safetensors"))
    assert len(names) == 28 and all(k.endswith((".lora_a", ".lora_b")) for k in names)
    assert not list(out.glob(".*"))  # no temporary leftovers


def _logits(model, processor, data: Path) -> mx.array:
    """Logits on three validation rows (images included), as the training loss computes them."""
    from mlx_vlm.trainer.datasets.loading import RawSplit
    from mlx_vlm.trainer.vlm.sft.dataset import VisionDataset
    from mlx_vlm.trainer.vlm.sft.runtime import collate_vlm_batch, forward_vlm_logits

    rows = [json.loads(x) for x in (data / "valid.jsonl").read_text().splitlines()[:3]]
    ds = VisionDataset(RawSplit(rows, data), model.config, processor)
    batch = collate_vlm_batch([ds[i] for i in range(len(ds))], 512)
    model.eval()
    out = forward_vlm_logits(model, batch["input_ids"], batch["attention_mask"], batch)
    mx.eval(out)
    return out


def test_adapter_loads_with_mlx_vlm_and_is_applied(trained, vision_data):
    import mlx_vlm

    from mondrian.models.sources import resolve

    cfg, _, model, processor = trained
    out, base_path = Path(cfg.adapter_path), resolve("tiny:qwen2-vl").path
    base = _logits(*mlx_vlm.load(base_path), vision_data)
    in_memory = _logits(model, processor, vision_data)  # the model as training left it (= last)
    last = _logits(*mlx_vlm.load(base_path, adapter_path=str(out / "last")), vision_data)
    root = _logits(*mlx_vlm.load(base_path, adapter_path=str(out)), vision_data)
    assert float(mx.abs(last - base).max()) > 0.05  # the adapter changes the model ...
    assert float(mx.abs(root - base).max()) > 0.05
    np.testing.assert_allclose(np.array(last), np.array(in_memory), atol=1e-4, rtol=1e-4)  # ... exactly
    best = _logits(*mlx_vlm.load(base_path, adapter_path=str(out / "best")), vision_data)
    np.testing.assert_array_equal(np.array(root), np.array(best))


def test_adapter_names_are_checked_where_mlx_vlm_does_not(trained, tmp_path):
    """mlx-vlm loads with strict=False: mlx-lm-style names would be silently ignored."""
    cfg, _, model, _ = trained
    weights = mx.load(str(Path(cfg.adapter_path) / "adapters.safetensors"))
    renamed = {k.removeprefix("language_model."): v for k, v in weights.items()}
    mx.save_safetensors(str(tmp_path / "adapters.safetensors"), renamed)
    with pytest.raises(TrainError, match="do not match the LoRA layers"):
        loop.restore_adapter(model, tmp_path)


def test_resume_matches_an_uninterrupted_run(trained, vision_data, tmp_path):
    """Stopped after step 8 (its checkpoint), resumed: the same adapters as one straight run."""
    straight_cfg, straight, _, _ = trained
    cfg = replace(straight_cfg, adapter_path=str(tmp_path / "adapter"))
    first = train_vision(cfg, progress=False, stop_after=8)
    assert first.status == "interrupted" and first.steps == 8
    assert not (tmp_path / "adapter" / "last").exists()
    with pytest.raises(TrainError, match="already holds a run's checkpoints"):
        train_vision(cfg, progress=False)
    again = train_vision(cfg, resume=True, progress=False)
    assert again.run_id == first.run_id and again.status == "completed" and again.steps == 16
    assert (again.best_step, again.best_val_loss) == (straight.best_step, straight.best_val_loss)
    for folder in ("last", "best"):
        a = mx.load(str(Path(straight_cfg.adapter_path) / folder / "adapters.safetensors"))
        b = mx.load(str(tmp_path / "adapter" / folder / "adapters.safetensors"))
        for k in a:
            np.testing.assert_array_equal(np.array(a[k]), np.array(b[k]), err_msg=k)
    assert [v for _, v in _metrics(_db(vision_data), again.run_id, "train_loss")] == \
        [v for _, v in _metrics(_db(vision_data), straight.run_id, "train_loss")]
    with pytest.raises(TrainError, match="already reached iters"):
        train_vision(cfg, resume=True, progress=False)
    assert _run_row(vision_data, tmp_path / "adapter")["status"] == "completed"  # left as it was


def _run_row(data: Path, out: Path) -> dict:
    store = RunStore(_db(data))
    try:
        return next(r for r in store.list() if r["adapter_path"] == str(out.resolve()))
    finally:
        store.close()


def test_failed_and_interrupted_runs_are_recorded(vision_data, tmp_path, monkeypatch):
    import os
    import signal

    from mondrian.train import vision as train_vlm

    real, calls = train_vlm.collate, {"n": 0, "at": 3, "do": None}

    def collate(*args: Any, **kw: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == calls["at"]:
            calls["do"]()
        return real(*args, **kw)

    def boom() -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(train_vlm, "collate", collate)
    calls["do"] = boom
    failed = tmp_path / "failed"
    with pytest.raises(RuntimeError, match="disk on fire"):
        train_vision(_cfg(vision_data, failed, iters=6, steps_per_eval=100, val_batches=1), progress=False)
    run = _run_row(vision_data, failed)
    assert run["status"] == "failed" and run["error"] == "RuntimeError: disk on fire"

    # Ctrl-C / SIGTERM: the step finishes, a checkpoint is written, the run ends 'interrupted'.
    calls.update(n=0, at=2, do=lambda: os.kill(os.getpid(), signal.SIGINT))
    stopped = tmp_path / "stopped"
    cfg = _cfg(vision_data, stopped, iters=6, steps_per_eval=100, val_batches=1)
    result = train_vision(cfg, progress=False)
    assert result.status == "interrupted" and result.steps == 2
    assert _run_row(vision_data, stopped)["status"] == "interrupted"
    assert (stopped / "checkpoints" / "step-0000002" / "optimizer.safetensors").is_file()
    assert (stopped / "adapters.safetensors").is_file()  # best so far (step 0) is published
    again = train_vision(cfg, resume=True, progress=False)
    assert (again.status, again.steps, again.run_id) == ("completed", 6, result.run_id)
    assert _run_row(vision_data, stopped)["status"] == "completed"


def _copy(data: Path, dest: Path) -> Path:
    shutil.copytree(data, dest)
    return dest


def test_errors_before_training(vision_data, tmp_path):
    out = tmp_path / "adapter"
    with pytest.raises(TrainError, match="does not exist .*never looked up on the hub"):
        train_vision(_cfg(tmp_path / "nope", out), progress=False)
    with pytest.raises(TrainError, match="no checkpoint under"):
        train_vision(_cfg(vision_data, out), resume=True, progress=False)

    n_valid = len((vision_data / "valid.jsonl").read_text().splitlines())
    with pytest.raises(TrainError, match=f"valid split has {n_valid} rows, fewer than batch_size 16"):
        train_vision(_cfg(vision_data, out, batch_size=16), progress=False)

    no_valid = _copy(vision_data, tmp_path / "no_valid")
    (no_valid / "valid.jsonl").unlink()
    with pytest.raises(TrainError, match="valid.jsonl: missing"):
        train_vision(_cfg(no_valid, out), progress=False)

    text = _copy(vision_data, tmp_path / "text")
    rows = (text / "train.jsonl").read_text().splitlines()
    row = json.loads(rows[2])
    row.pop("images")
    row["messages"][1]["content"] = "a question without a picture"
    rows[2] = json.dumps(row)
    (text / "train.jsonl").write_text("\n".join(rows) + "\n")
    with pytest.raises(TrainError, match="train.jsonl:3: the row has no image"):
        train_vision(_cfg(text, out), progress=False)

    gone = _copy(vision_data, tmp_path / "gone")
    first = json.loads((gone / "train.jsonl").read_text().splitlines()[0])
    (gone / first["images"][0]).unlink()
    with pytest.raises(TrainError, match=r"train.jsonl:1: image images/\w+.png does not exist"):
        train_vision(_cfg(gone, out), progress=False)

    with pytest.raises(TrainError, match="longer than max_seq_length 64 .image tokens included"):
        train_vision(_cfg(vision_data, out, max_seq_length=64), progress=False)
    with pytest.raises(TrainError, match="num_layers 3 > the model's 2 language layers"):
        train_vision(_cfg(vision_data, out, num_layers=3), progress=False)
    with pytest.raises(TrainError, match="no Linear 'self_attn.nope'"):  # core's rule, the trainer's error
        train_vision(_cfg(vision_data, out, lora_parameters={"rank": 8, "scale": 4.0, "dropout": 0.0,
                                                             "keys": ["self_attn.nope"]}), progress=False)
    with pytest.raises(TrainError, match="fine_tune_type 'dora'"):
        train_vision(_cfg(vision_data, out, fine_tune_type="dora"), progress=False)
    with pytest.raises(TrainError, match="answer_turns: all is for text advisors"):
        train_vision(_cfg(vision_data, out, mask_prompt=True, answer_turns="all"), progress=False)
    with pytest.raises(TrainError, match="mix_alpha is for text advisors"):
        train_vision(_cfg(vision_data, out, mix_alpha=0.5), progress=False)
    assert not out.exists()  # nothing written by a refused run


def test_num_layers_and_keys_keep_mlx_lm_meaning():
    import mlx_vlm

    from mondrian.models.sources import resolve

    model, _ = mlx_vlm.load(resolve("tiny:qwen2-vl").path)
    last = list(lora_targets(model, 1, None))
    assert len(last) == 7 and all(n.startswith("language_model.model.layers.1.") for n in last)
    assert list(lora_targets(model, 2, ["self_attn.q_proj", "mlp.up_proj"])) == [
        "language_model.model.layers.0.self_attn.q_proj", "language_model.model.layers.0.mlp.up_proj",
        "language_model.model.layers.1.self_attn.q_proj", "language_model.model.layers.1.mlp.up_proj"]
    with pytest.raises(AdapterError, match="no Linear 'self_attn.nope'"):
        lora_targets(model, 1, ["self_attn.nope"])
