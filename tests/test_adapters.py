"""The adapter folder format (mondrian/core/adapters.py) and its MLX side (mondrian/core/adapters.py):
the LoRA targeting rule picks exactly the layers mlx-lm and mlx-vlm put LoRA on, and folders
round-trip, are read and are checked; the format module loads no MLX."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from mondrian.core.adapters import (
    CONFIG,
    FILES,
    WEIGHTS,
    AdapterError,
    LoraLayout,
    check_adapter,
    load_trainable,
    lora_targets,
    read_adapter,
    read_config,
    read_layout,
    transformer_blocks,
    write_adapter,
)
from tests.helpers import LORA, write_random_adapter

KEYS = ["self_attn.q_proj", "mlp.down_proj"]


def _lora_names(model: nn.Module) -> set[str]:
    """Qualified names of the modules LoRA layers replaced (they carry lora_a)."""
    return {n for n, m in model.named_modules() if hasattr(m, "lora_a")}


@pytest.fixture(scope="module")
def llama_path(tiny_llama) -> str:
    return tiny_llama.path


@pytest.mark.parametrize("num_layers", [-1, 0, 1, 4, 6])
@pytest.mark.parametrize("keys", [None, KEYS])
def test_targets_are_what_mlx_lm_wraps(llama_path, num_layers, keys):
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = load(llama_path)
    targets = lora_targets(model, num_layers, keys)
    linear_to_lora_layers(model, num_layers, LORA | ({"keys": keys} if keys else {}))
    assert set(targets) == _lora_names(model)
    n = 6 if num_layers <= 0 else num_layers
    assert len(targets) == n * (len(keys) if keys else 7)
    assert all(isinstance(m, nn.Linear) for m in targets.values())


@pytest.mark.parametrize(("num_layers", "keys"), [(-1, None), (1, None), (2, KEYS)])
def test_targets_are_what_mlx_vlm_wraps(num_layers, keys):
    import mlx_vlm

    from mondrian.models.sources import resolve
    from mondrian.models.upstream import apply_vlm_lora_layers

    model, _ = mlx_vlm.load(resolve("tiny:qwen2-vl").path)
    targets = lora_targets(model, num_layers, keys)
    assert all(n.startswith("language_model.model.layers.") for n in targets)
    params = {"rank": 4, "scale": 1.0, "dropout": 0.0} | ({"keys": keys} if keys else {})
    if keys:  # mlx-vlm resolves keys as qualified names (what the vision trainer records)
        params["keys"] = list(targets)
    apply_vlm_lora_layers(model, {"fine_tune_type": "lora", "num_layers": num_layers, "lora_parameters": params})
    assert set(targets) == _lora_names(model)


def test_target_order_and_blocks(llama_path):
    from mlx_lm import load

    model, _ = load(llama_path)
    prefix, blocks = transformer_blocks(model)
    assert prefix == "model.layers" and len(blocks) == 6
    assert list(lora_targets(model, 2, KEYS)) == [f"model.layers.{b}.{k}" for b in (4, 5) for k in KEYS]
    last = list(lora_targets(model, 1))
    assert last == sorted(last) and all(n.startswith("model.layers.5.") for n in last)


class _Wrapper(nn.Module):
    """Stands for a Linear it holds, as the engine's slot layers do."""

    def __init__(self, linear: nn.Module):
        super().__init__()
        self.linear = linear
        self.extra = nn.Linear(2, 2)  # a wrapper's own submodules are not targets


def test_unwrap_sees_through_wrappers(llama_path):
    from mlx_lm import load

    model, _ = load(llama_path)
    before = lora_targets(model, 2)
    wrapped = [(name, _Wrapper(m)) for name, m in before.items() if name.endswith("q_proj")]
    model.update_modules(tree_unflatten(wrapped))
    after = lora_targets(model, 2, unwrap=lambda m: m.linear if isinstance(m, _Wrapper) else m)
    assert list(after) == list(before)
    assert all(after[n] is before[n] for n in before)
    with pytest.raises(AdapterError, match="no Linear 'self_attn.q_proj'"):
        lora_targets(model, 2, ["self_attn.q_proj"])  # without unwrap, a wrapper is no Linear


def test_targeting_errors(llama_path):
    from mlx_lm import load

    model, _ = load(llama_path)
    with pytest.raises(AdapterError, match="num_layers 7 > the model's 6 language layers"):
        lora_targets(model, 7)
    with pytest.raises(AdapterError, match=r"no Linear 'self_attn.nope' in block model.layers.5 \(there: "):
        lora_targets(model, 1, ["self_attn.nope"])
    with pytest.raises(AdapterError, match="no Linear 'mlp'"):
        lora_targets(model, 1, ["mlp"])  # a module, not a Linear

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(4, 4)
            self.proj = nn.Linear(4, 4)

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = [Block(), Block()]

    with pytest.raises(AdapterError, match=r"LoRA on layers.1.embed \(Embedding\)"):
        lora_targets(Toy(), 1)
    assert list(lora_targets(Toy(), 1, ["proj"])) == ["layers.1.proj"]
    with pytest.raises(AdapterError, match="cannot find the language model's layers"):
        lora_targets(nn.Linear(2, 2), 1)


def test_write_read_check_round_trip(tmp_path):
    weights = {"model.layers.1.mlp.up_proj.lora_a": mx.ones((8, 4)),
               "model.layers.1.mlp.up_proj.lora_b": mx.zeros((4, 16))}
    config = {"fine_tune_type": "lora", "num_layers": 1,
              "lora_parameters": {"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": ["mlp.up_proj"]}}
    write_adapter(tmp_path, weights, config)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FILES) == sorted([WEIGHTS, CONFIG])
    assert check_adapter(tmp_path) == config == read_config(tmp_path)
    got, arrays, layout, scale = read_adapter(tmp_path)
    assert got == config and scale == 2.0 and layout == LoraLayout(1, 4, ("mlp.up_proj",))
    assert set(arrays) == set(weights) and mx.array_equal(arrays[next(iter(weights))], mx.ones((8, 4)))


def test_read_errors(tmp_path):
    with pytest.raises(AdapterError, match="where: cannot read the adapter"):
        read_adapter(tmp_path, "where")
    (tmp_path / CONFIG).write_text("[1]")
    with pytest.raises(AdapterError, match=f"{tmp_path}: adapter_config.json is not a JSON object"):
        read_config(tmp_path)
    (tmp_path / CONFIG).write_text("{oops")
    with pytest.raises(AdapterError, match="adapter_config.json is not valid JSON"):
        read_config(tmp_path)
    with pytest.raises(AdapterError, match="x: fine_tune_type 'dora'"):
        read_layout({"fine_tune_type": "dora", "num_layers": 1, "lora_parameters": {"rank": 1, "scale": 1}}, "x")
    with pytest.raises(AdapterError, match="x: adapter_config.json lacks a usable 'scale'"):
        read_layout({"num_layers": 1, "lora_parameters": {"rank": 1, "alpha": 1}}, "x")
    assert read_layout({"num_layers": -1, "lora_parameters": {"rank": 2, "scale": 3}}, "x") == \
        (LoraLayout(-1, 2, None), 3.0)


def test_check_adapter_refuses_what_loaders_would(tmp_path, llama_path):
    good = write_random_adapter(tmp_path / "good", llama_path)
    assert check_adapter(good)["num_layers"] == 2
    with pytest.raises(AdapterError, match="not a folder"):
        check_adapter(tmp_path / "nothing")
    (good / WEIGHTS).write_bytes((good / WEIGHTS).read_bytes()[:-1])
    with pytest.raises(AdapterError, match=f"{WEIGHTS}: truncated or padded"):
        check_adapter(good)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / CONFIG).write_text(json.dumps({"num_layers": 1}))
    with pytest.raises(AdapterError, match="adapters.safetensors missing"):
        check_adapter(tmp_path / "half")


def test_load_trainable_checks_names_and_shapes(tmp_path, llama_path):
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    folder = write_random_adapter(tmp_path / "a", llama_path, num_layers=2)
    model, _ = load(llama_path)
    model.freeze()
    linear_to_lora_layers(model, 2, LORA)
    load_trainable(model, folder)
    saved = mx.load(str(folder / WEIGHTS))
    assert all(mx.array_equal(v, saved[k]) for k, v in tree_flatten(model.trainable_parameters()))
    renamed = {k.replace("layers.5", "layers.3"): v for k, v in saved.items()}
    mx.save_safetensors(str(folder / WEIGHTS), renamed)
    with pytest.raises(AdapterError, match="do not match the LoRA layers"):
        load_trainable(model, folder)
    reshaped = {k: (v[:, :2] if k.endswith("lora_a") else v) for k, v in saved.items()}
    mx.save_safetensors(str(folder / WEIGHTS), reshaped)
    with pytest.raises(AdapterError, match="shapes differ"):
        load_trainable(model, folder)


def test_a_wrong_where_is_the_folder(tmp_path: Path):
    """Without `where`, messages name the folder."""
    with pytest.raises(AdapterError, match=str(tmp_path)):
        read_adapter(tmp_path)


def test_the_format_module_loads_no_mlx():
    """The registry checks adapters through core.adapters and must stay free of MLX."""
    import subprocess
    import sys

    from tests.helpers import ROOT

    code = ("import sys, mondrian.core.adapters; bad = [m for m in sys.modules if m.split('.')[0] in "
            "('mlx', 'mlx_lm', 'mlx_vlm')]; assert not bad, bad")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
