"""What mondrian relies on in mlx-lm's and mlx-vlm's internals (mondrian/models/upstream.py),
checked against the installed versions: a version bump that changes any of it fails here, in
one place, instead of somewhere in serving or training."""

from __future__ import annotations

from importlib.metadata import version
from types import SimpleNamespace

import mlx.nn as nn
import numpy as np
import pytest

from mondrian.models import upstream

NEVER = [10**9]  # a stop token no model emits: rows end at their max_tokens


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


# ---- mlx-lm: the batch objects generation.Decoder drives


class Recorder:
    """The model, recording each call's input tokens."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __getattr__(self, name: str):  # layers, make_cache: the model's own
        return getattr(self.model, name)

    def __call__(self, inputs, cache=None):
        self.calls.append(np.array(inputs))
        return self.model(inputs, cache=cache)


@pytest.fixture(scope="module")
def llama(tiny_llama):
    from mlx_lm import load

    model, _ = load(str(tiny_llama.path))
    return model


def _alone(model, prompt: list[int], max_tokens: int) -> list[int]:
    batch = upstream.start_rows(model, [0], [prompt], [max_tokens], [None], NEVER)
    out = []
    while len(batch):
        out += [r.token for r in batch.next()]
    return out


def test_batch_rows_are_uids_in_order_through_joins_and_leaves(llama):
    import mlx.core as mx

    prompts = {10: [1, 5, 9, 14, 3], 11: [1, 7, 40], 12: [2], 13: [1, 3, 5, 7, 11, 13, 17], 14: [4, 8]}
    limits = {10: 6, 11: 2, 12: 4, 13: 5, 14: 3}
    model = Recorder(llama)
    got: dict[int, list[int]] = {u: [] for u in prompts}
    with mx.stream(upstream.decode_stream()):
        batch = upstream.start_rows(model, [10, 11, 12], [prompts[u] for u in (10, 11, 12)],
                                    [limits[u] for u in (10, 11, 12)], [None] * 3, NEVER)
        assert batch.uids == [10, 11, 12]
        assert model.calls[-1].tolist() == [[3], [40], [2]]  # the first step: each row's last prompt token
        step = 0
        while len(batch):
            order = list(batch.uids)
            n_calls = len(model.calls)
            responses = batch.next()
            assert len(model.calls) == n_calls + 1 and model.calls[-1].shape == (len(order), 1)
            assert [r.uid for r in responses] == order  # one response per row, in the call's row order
            assert model.calls[-1][:, 0].tolist() == [r.token for r in responses]
            for r in responses:
                got[r.uid].append(r.token)
                assert (r.finish_reason == "length") == (len(got[r.uid]) == limits[r.uid])
            assert batch.uids == [r.uid for r in responses if r.finish_reason is None]  # leavers drop out
            step += 1
            if step in (1, 3):  # rows join mid-decode, after the running ones
                new = [13] if step == 1 else [14]
                batch.extend(upstream.start_rows(model, new, [prompts[u] for u in new], [limits[u] for u in new],
                                                 [None], NEVER))
                assert batch.uids[-1] == new[0]
    mx.synchronize(upstream.decode_stream())
    # each row generated what it generates alone: row i of every call was uids[i]
    assert got == {u: _alone(llama, prompts[u], limits[u]) for u in prompts}
    assert len({tuple(v) for v in got.values()}) > 1


def test_start_rows_applies_each_rows_logits_processor(llama):
    banned = []

    def ban_first(context, logits):  # one row's processor: never its unconstrained first choice
        import mlx.core as mx

        if not banned:
            banned.append(int(mx.argmax(logits[0]).item()))
        mask = mx.arange(logits.shape[-1]) == banned[0]
        return mx.where(mask, mx.array(-float("inf"), dtype=logits.dtype), logits)

    prompts = [[1, 5, 9], [1, 7, 40]]
    plain = [_alone(llama, p, 3) for p in prompts]
    batch = upstream.start_rows(llama, [0, 1], prompts, [3, 3], [None, ban_first], NEVER)
    got = {0: [], 1: []}
    while len(batch):
        for r in batch.next():
            got[r.uid].append(r.token)
    assert got[0] == plain[0] and banned[0] not in got[1]
