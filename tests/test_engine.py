"""The model worker on a tiny llama: LoRA versions in slots of one model, requests of any
version joining one running batch between decode steps (continuous, mixed-version batching)
and still answering exactly what they answer alone; a slot's logits bit-identical to a fresh
`mlx_lm.load(base, adapter_path)`; refusals that change nothing; controls waiting for the
batch."""

from __future__ import annotations

import json
import time

import mlx.core as mx
import numpy as np
import pytest

from mondrian.models.decode import Decoder
from mondrian.serve.engine import EngineError, ModelWorker
from tests.helpers import write_random_adapter

ADV = "fit-query"
PROMPTS = [[1, 5, 9, 14, 3], [1, 7, 7, 2, 30, 11], [1, 40, 2], [1, 3, 5, 7, 11, 13, 17]]


class Slow:
    """A logits processor that keeps a row going (no stop token) and slows each step, so a
    test can tell which rows decoded together. Greedy over the other tokens is unchanged."""

    def __init__(self, eos: list[int], delay_s: float = 0.01):
        self.eos, self.delay_s = eos, delay_s

    def __call__(self, context, logits):
        time.sleep(self.delay_s)
        mask = mx.zeros(logits.shape[-1], dtype=mx.bool_)
        mask[self.eos] = True
        return mx.where(mask, mx.array(-float("inf"), dtype=logits.dtype), logits)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_llama):
    tmp = tmp_path_factory.mktemp("engine")
    return {  # v3: another rank and more layers, so slots of different shapes share a batch
        "v1": write_random_adapter(tmp / "v1", str(tiny_llama.path), seed=1, amplitude=0.2),
        "v2": write_random_adapter(tmp / "v2", str(tiny_llama.path), seed=2, amplitude=0.2),
        "v3": write_random_adapter(tmp / "v3", str(tiny_llama.path), seed=3, amplitude=0.2, num_layers=3,
                                   lora={"rank": 8, "scale": 10.0, "dropout": 0.0}),
    }


@pytest.fixture(scope="module")
def worker(tiny_llama, adapters):
    w = ModelWorker("tiny", tiny_llama.path, tiny_llama.fingerprint, max_batch=4)
    w.wait_ready(120)
    for v, path in adapters.items():
        w.load(ADV, v, path)
    yield w
    w.close()


def eos(worker) -> list[int]:
    return sorted(worker.tokenizer.eos_token_ids)


def alone(worker, key, prompt, max_tokens):
    """The answer of one request with nothing else in the queue."""
    return worker.submit(key, prompt, max_tokens, Slow(eos(worker), 0)).result(60)


def wait_running(fut, worker, timeout=30):
    """Until the worker has taken the request into a batch (it is decoding)."""
    deadline = time.time() + timeout
    while worker._queue.qsize() and time.time() < deadline:
        time.sleep(0.005)
    time.sleep(0.1)
    assert not fut.done(), "the long request finished before the test could join it"


def test_slot_logits_are_bit_identical_to_mlx_lm_load(worker, adapters, tiny_llama):
    from mlx_lm import load

    prompt = mx.array([PROMPTS[3]])
    for v in ("v1", "v3", None):
        fresh, _ = load(str(tiny_llama.path), adapter_path=str(adapters[v]) if v else None)
        want = np.array(fresh(prompt))
        slot = worker.versions[(ADV, v)].slot if v else 0
        got = worker.call(lambda w, s=slot: np.array(_logits(w, s, prompt)))
        assert np.array_equal(got, want), (v, float(np.abs(got - want).max()))


def _logits(w, slot, prompt):
    with w.rows.use([slot]):
        return w.model(prompt)


def test_mixed_version_batch_answers_as_each_version_alone(worker):
    keys = [(ADV, "v1"), (ADV, "v2"), (ADV, "v3"), None]
    solo = {(k, i): alone(worker, k, p, 12).generation.text for k in keys for i, p in enumerate(PROMPTS)}
    assert len({solo[(k, 0)] for k in keys}) == 4  # every version answers differently: a mix-up would show
    before = worker.stats()["mixed_version_calls"]
    long = worker.submit(keys[0], PROMPTS[0], 150, Slow(eos(worker)))
    wait_running(long, worker)
    jobs = [(k, i, worker.submit(k, p, 12, Slow(eos(worker), 0))) for k in keys for i, p in enumerate(PROMPTS)]
    for k, i, fut in jobs:
        a = fut.result(60)
        assert (a.version, a.generation.text) == ((k[1] if k else None), solo[(k, i)]), (k, i)
    assert any(fut.result().batch_size == 4 for *_, fut in jobs)  # rows of several versions decoded together
    assert long.result(60).generation.tokens == 150
    assert worker.stats()["mixed_version_calls"] > before


def test_rows_join_and_leave_mid_decode_keep_their_slots(worker):
    """The decoder's own loop, driven step by step: rows of four slots join while others decode
    (more than fit, so some wait for a place) and leave at different steps; the row order of
    the model calls changes at each join and leave, and every row still answers exactly what
    its version answers alone."""
    keys = [(ADV, "v1"), None, (ADV, "v3"), (ADV, "v2"), (ADV, "v1"), (ADV, "v3"), None, (ADV, "v2")]
    limits = [9, 3, 7, 5, 2, 8, 6, 4]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(keys))]
    solo = [alone(worker, k, p, n).generation.text for k, p, n in zip(keys, prompts, limits, strict=True)]
    joins = {0: [0, 1, 2], 2: [3, 4], 3: [5], 5: [6, 7]}  # step -> rows added before it

    def run(w):
        dec = Decoder(w.model, w.tokenizer, 3, w.rows)
        mixed, out, peaks, step = w.rows.mixed_calls, {}, {}, 0
        while step in joins or len(dec):
            for i in joins.get(step, []):
                slot = w.versions[keys[i]].slot if keys[i] else 0
                dec.add(prompts[i], limits[i], Slow(eos(w), 0), tag=i, slot=slot)
            for i, gen, peak in dec.step():
                out[i], peaks[i] = gen, peak
            step += 1
        dec.close()
        return out, peaks, w.rows.mixed_calls - mixed

    out, peaks, mixed = worker.call(run)
    assert [out[i].text for i in range(len(keys))] == solo
    assert [out[i].tokens for i in range(len(keys))] == limits
    assert max(peaks.values()) == 3 and mixed > 0


def test_controls_wait_for_the_running_batch(worker):
    long = worker.submit((ADV, "v1"), PROMPTS[0], 40, Slow(eos(worker)))
    wait_running(long, worker)
    seen = worker.call(lambda w: long.done())  # runs only once the batch drained
    assert seen is True
    assert long.result(1).generation.tokens == 40


def test_refused_versions_change_nothing(worker, adapters, tmp_path):
    before = alone(worker, (ADV, "v2"), PROMPTS[1], 10).generation.text
    slots = {k: v.slot for k, v in worker.versions.items()}
    nan = tmp_path / "nan"
    nan.mkdir()
    (nan / "adapter_config.json").write_text((adapters["v1"] / "adapter_config.json").read_text())
    w = mx.load(str(adapters["v1"] / "adapters.safetensors"))
    mx.save_safetensors(str(nan / "adapters.safetensors"), {k: v * float("nan") for k, v in w.items()})
    with pytest.raises(EngineError, match="not finite"):
        worker.load(ADV, "v2", nan)  # a reload of v2 with NaN weights: refused, v2 keeps its own
    shapes = tmp_path / "shapes"
    shapes.mkdir()
    cfg = json.loads((adapters["v1"] / "adapter_config.json").read_text())
    (shapes / "adapter_config.json").write_text(json.dumps(cfg))
    first = sorted(w)[0]
    mx.save_safetensors(str(shapes / "adapters.safetensors"), {**w, first: mx.zeros((3, 3))})
    with pytest.raises(EngineError, match=f"wrong shapes: {first.rsplit('.', 1)[0]}"):
        worker.load(ADV, "v9", shapes)
    mx.save_safetensors(str(shapes / "adapters.safetensors"), {**w, "model.layers.0.mlp.gate_proj.lora_a": w[first]})
    with pytest.raises(EngineError, match="tensors with no LoRA layer: model.layers.0.mlp.gate_proj.lora_a"):
        worker.load(ADV, "v9", shapes)
    mx.save_safetensors(str(shapes / "adapters.safetensors"), {k: v for k, v in w.items() if k != first})
    with pytest.raises(EngineError, match=f"LoRA layers with no tensor: {first}"):
        worker.load(ADV, "v9", shapes)
    assert {k: v.slot for k, v in worker.versions.items()} == slots
    assert alone(worker, (ADV, "v2"), PROMPTS[1], 10).generation.text == before


def test_unload_frees_the_slot_and_unknown_versions_fail(worker, adapters):
    answer = alone(worker, (ADV, "v1"), PROMPTS[2], 10).generation.text
    slot = worker.versions[(ADV, "v1")].slot
    assert worker.unload(ADV, "v1")
    with pytest.raises(EngineError, match="v1 is not loaded"):
        alone(worker, (ADV, "v1"), PROMPTS[2], 10)
    again = worker.load(ADV, "v1", adapters["v1"])
    assert again.slot == slot  # the freed slot is reused
    assert alone(worker, (ADV, "v1"), PROMPTS[2], 10).generation.text == answer


def test_prefix_cache_is_per_version_and_a_reload_drops_it(worker, adapters):
    """Prompts are cached per version (LoRA layers change k/v): a version reloaded with other
    weights under the same name drops its entries, so its next answer is the new weights'
    answer, never one decoded on the old weights' prefix."""
    cache = worker.prefix_cache
    prompt = PROMPTS[3]
    v2_answer = alone(worker, (ADV, "v2"), prompt, 10).generation.text
    worker.load(ADV, "vx", adapters["v1"])
    first = alone(worker, (ADV, "vx"), prompt, 10)
    again = alone(worker, (ADV, "vx"), prompt, 10)
    assert again.generation.prefix_hit == len(prompt) - 1 and again.generation.text == first.generation.text
    assert first.generation.text != v2_answer  # the two adapters answer differently
    worker.load(ADV, "vx", adapters["v2"])  # same name, other weights
    reloaded = alone(worker, (ADV, "vx"), prompt, 10)
    assert reloaded.generation.prefix_hit == 0 and reloaded.generation.text == v2_answer
    assert worker.unload(ADV, "vx")
    assert cache.drop((ADV, "vx")) == 0  # unloading dropped the new entries too
    assert worker.stats()["prefix_cache"]["hits"] >= 1
