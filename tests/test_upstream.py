"""What mondrian relies on in mlx-lm's and mlx-vlm's internals (mondrian/models/upstream.py),
checked against the installed versions: a version bump that changes any of it fails here, in
one place, instead of somewhere in serving or training."""

from __future__ import annotations

from importlib.metadata import version
from types import SimpleNamespace

import mlx.nn as nn
import pytest

from mondrian.models import upstream


@pytest.mark.parametrize("package", sorted(upstream.CHECKED))
def test_installed_versions_are_the_checked_ones(package):
    assert version(package) == upstream.CHECKED[package], (
        f"{package} {version(package)} is installed; mondrian/models/upstream.py was checked against "
        f"{upstream.CHECKED[package]}. Before bumping it (pyproject.toml pins it too), re-check what "
        "upstream.py wraps: mlx-vlm's _apply_lora_layers (which Linear layers num_layers/keys wrap) and "
        "_image_token_id; mlx-lm's PromptProcessingBatch/GenerationBatch (constructor arguments, "
        "`uids` as the row order of every model call, next/extend) and generation_stream; then "
        "update CHECKED and run this file, tests/test_engine.py and tests/test_vision.py.")


# ---- mlx-vlm


@pytest.fixture(scope="module")
def qwen2_vl(mondrian_home) -> str:
    from mondrian.models.sources import resolve

    return resolve("tiny:qwen2-vl").path


def _fresh_vlm(path: str):
    import mlx_vlm

    model, _ = mlx_vlm.load(path)
    model.freeze()
    return model


def _blocks(model) -> tuple[str, int]:
    """The qualified name prefix of the language model's blocks, and how many there are."""
    blocks = model.language_model.model.layers
    prefix = next(n for n, m in model.named_modules() if m is blocks[0]).rsplit(".", 1)[0]
    return prefix, len(blocks)


def _linear(model) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear))}


def _wrapped(model) -> dict[str, tuple[int, ...]]:
    return {n: tuple(m.lora_a.shape) for n, m in model.named_modules() if hasattr(m, "lora_a")}


def _config(num_layers: int, rank: int, keys: list[str] | None = None) -> dict:
    params = {"rank": rank, "scale": 2.0, "dropout": 0.0} | ({"keys": keys} if keys else {})
    return {"fine_tune_type": "lora", "num_layers": num_layers, "lora_parameters": params}


def test_apply_vlm_lora_layers_wraps_the_last_blocks_linear_layers(qwen2_vl):
    model = _fresh_vlm(qwen2_vl)
    prefix, n = _blocks(model)
    last = {x for x in _linear(model) if x.startswith(f"{prefix}.{n - 1}.")}
    assert len(last) >= 7  # q, k, v, o, gate, up, down
    assert upstream.apply_vlm_lora_layers(model, _config(1, 4)) is model
    wrapped = _wrapped(model)
    assert set(wrapped) == last  # every Linear of the last block, nothing in the vision tower
    assert all(shape[1] == 4 for shape in wrapped.values())
    model = _fresh_vlm(qwen2_vl)
    every = {x for x in _linear(model) if x.startswith(f"{prefix}.")}
    upstream.apply_vlm_lora_layers(model, _config(-1, 2))  # -1: every block
    assert set(_wrapped(model)) == every


def test_apply_vlm_lora_layers_with_keys_wraps_exactly_those(qwen2_vl):
    model = _fresh_vlm(qwen2_vl)
    prefix, n = _blocks(model)
    keys = [f"{prefix}.{n - 1}.self_attn.q_proj", f"{prefix}.{n - 1}.mlp.down_proj"]  # as training writes them
    upstream.apply_vlm_lora_layers(model, _config(1, 8, keys))
    assert _wrapped(model) == {keys[0]: (model.language_model.model.layers[-1].self_attn.q_proj.linear
                                         .weight.shape[1], 8),
                               keys[1]: (model.language_model.model.layers[-1].mlp.down_proj.linear
                                         .weight.shape[1], 8)}


@pytest.mark.parametrize("config", [
    {"image_token_id": 151655},
    {"image_token_index": 32000, "image_token_id": 151655},
    {"image_token_index": None, "image_token_id": 7},
    {},
    SimpleNamespace(image_token_id=151655),
    SimpleNamespace(image_token_index=5, image_token_id=6),
    SimpleNamespace(),
    None,
])
def test_image_token_id_agrees_with_mlx_vlm(config):
    from mlx_vlm.trainer.vlm.sft.runtime import _image_token_id

    dataset = SimpleNamespace(config=config)
    assert upstream.image_token_id(dataset) == _image_token_id(dataset)
