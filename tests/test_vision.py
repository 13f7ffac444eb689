"""The vision worker on the tiny Qwen2-VL: answers equal a fresh mlx-vlm load of each adapter,
token for token, across swaps, layouts and threads; bad adapters are refused while the previous
version keeps serving; a bad image fails only its own request."""

from __future__ import annotations

import io
import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import pytest
from PIL import Image

from mondrian.serve.engine import EngineError
from mondrian.serve.vision import VisionRequest, VisionWorker
from tests.helpers import write_random_vision_adapter

MAX_TOKENS = 10
MESSAGES = [{"role": "system", "content": "You critique Mondrian-style compositions."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How is the balance?"}]}]
V1, V2, V3 = ("critic", "v1"), ("critic", "v2"), ("critic", "v3")
KEYS = (None, V1, V2, V3)


def _png(size: int, blocks: list[tuple[tuple[int, int, int, int], tuple[int, int, int]]]) -> bytes:
    img = Image.new("RGB", (size, size), (246, 244, 236))
    for box, colour in blocks:
        img.paste(colour, box)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def base(mondrian_home) -> str:
    from mondrian.models.sources import resolve

    return resolve("tiny:qwen2-vl").path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, tuple[bytes, Path]]:
    """Two small PNGs (84x84 -> 9 image tokens, 56x56 -> 4), as bytes and as files."""
    folder = tmp_path_factory.mktemp("vision_images")
    out = {}
    for name, data in {
        "red": _png(84, [((0, 0, 42, 42), (212, 32, 39)), ((50, 50, 84, 84), (24, 72, 160))]),
        "yellow": _png(56, [((0, 28, 56, 56), (247, 208, 32)), ((0, 0, 20, 20), (22, 22, 22))]),
    }.items():
        (folder / f"{name}.png").write_bytes(data)
        out[name] = (data, folder / f"{name}.png")
    return out


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory) -> dict:
    """v1, v2: the same layout (every Linear of both language layers, rank 4); v3 another
    layout (rank 8, two keys, last layer only)."""
    folder = tmp_path_factory.mktemp("vision_adapters")
    return {V1: write_random_vision_adapter(folder / "v1", base, seed=1),
            V2: write_random_vision_adapter(folder / "v2", base, seed=2),
            V3: write_random_vision_adapter(folder / "v3", base, seed=3, num_layers=1, rank=8, scale=6.0,
                                            keys=["self_attn.q_proj", "mlp.down_proj"])}


@pytest.fixture(scope="module")
def worker(base, adapters):
    w = VisionWorker("tiny-vl", base, "fp-test")
    w.wait_ready(120)
    for key, path in adapters.items():
        w.load(*key, path)
    yield w
    w.close()


@pytest.fixture(scope="module")
def prompt(worker) -> str:
    return worker.vision_prompt(MESSAGES)


def _reference(base: str, adapter: Path | None, prompt: str, image: Path, **kw) -> dict:
    """What mlx-vlm alone answers: a fresh load (with adapter_path) and greedy `generate`."""
    import mlx_vlm

    model, processor = mlx_vlm.load(base, adapter_path=str(adapter) if adapter else None)
    r = mlx_vlm.generate(model, processor, prompt, image=[str(image)], max_tokens=MAX_TOKENS,
                         temperature=0.0, **kw)
    return {"ids": tuple(r.token_ids), "text": r.text, "prompt_tokens": r.prompt_tokens,
            "finish_reason": r.finish_reason}


@pytest.fixture(scope="module")
def refs(base, adapters, images, prompt) -> dict:
    return {(key, name): _reference(base, adapters.get(key), prompt, path)
            for key in KEYS for name, (_, path) in images.items()}


def _check(answer, ref: dict, key) -> None:
    gen = answer.generation
    assert answer.version == (key[1] if key else None)
    assert gen.token_ids == ref["ids"], (key, gen.text, ref["text"])
    assert (gen.text, gen.tokens, gen.finish_reason) == (ref["text"], len(ref["ids"]), ref["finish_reason"])
    assert answer.prompt_tokens == ref["prompt_tokens"] and answer.batch_size == 1
    assert gen.latency_s > 0 and answer.queue_s >= 0


def _ask(worker, key, prompt, image: bytes, **kw):
    return worker.submit(key, VisionRequest(prompt, image), MAX_TOKENS, **kw).result(60)


def test_prompt_and_prompt_tokens(worker, prompt, refs, base):
    import mlx_vlm
    from mlx_vlm.prompt_utils import apply_chat_template

    model, processor = mlx_vlm.load(base)
    assert prompt == apply_chat_template(processor, model.config, MESSAGES, add_generation_prompt=True, num_images=1)
    assert prompt.count("<|image_pad|>") == 1 and prompt.endswith("<|im_start|>assistant\n")
    text_only = len(processor.tokenizer.encode(prompt))
    # the real input length counts the image's tokens: 84x84 -> 9 (the marker becomes 9), 56x56 -> 4
    assert refs[(None, "red")]["prompt_tokens"] == text_only + 8
    assert refs[(None, "yellow")]["prompt_tokens"] == text_only + 3


def test_versions_answer_differently(refs):
    """Otherwise a missed swap could go unnoticed."""
    for name in ("red", "yellow"):
        answers = [refs[(key, name)]["ids"] for key in KEYS]
        assert len(set(answers)) == len(KEYS), answers
    assert refs[(V1, "red")]["ids"] != refs[(V1, "yellow")]["ids"]  # and the image matters


def test_answers_match_mlx_vlm_across_swaps(worker, prompt, images, refs):
    order = [V1, V2, V1, None, V2, V1, V3, V1, None, V3, V2, None, V1]
    for i, key in enumerate(order):
        name = "red" if i % 2 == 0 else "yellow"
        swaps = worker.swaps
        _check(_ask(worker, key, prompt, images[name][0]), refs[(key, name)], key)
        assert worker.active == key
        if i and key != order[i - 1]:
            assert worker.swaps == swaps + 1
    # same version twice in a row: no swap
    swaps = worker.swaps
    _check(_ask(worker, V1, prompt, images["red"][0]), refs[(V1, "red")], V1)
    assert worker.swaps == swaps


def test_interleaved_threads(worker, prompt, images, refs):
    jobs = [(KEYS[(t + i) % 4], ("red", "yellow")[(t * i) % 2]) for t in range(4) for i in range(6)]
    batches, steps = worker.batches, worker.steps

    def run(job):
        key, name = job
        return job, worker.submit(key, VisionRequest(prompt, images[name][0]), MAX_TOKENS)

    with ThreadPoolExecutor(4) as pool:
        submitted = list(pool.map(run, jobs))
    for (key, name), fut in submitted:
        _check(fut.result(60), refs[(key, name)], key)
    assert worker.batches == batches + len(jobs)
    assert worker.steps - steps == sum(len(refs[j]["ids"]) for j in jobs)
    assert worker.row_steps == worker.steps  # batch 1: one row per step


def test_stop_token_and_logits_processor(worker, base, adapters, prompt, images):
    """A processor forcing EOS after 3 tokens: finish 'stop', the stop token counted, as mlx-vlm."""
    eos = worker.model.config.eos_token_id

    def force_eos_after(n):
        calls = {"n": 0}

        def processor(tokens, logits):
            calls["n"] += 1
            if calls["n"] <= n:
                return logits
            return mx.where(mx.arange(logits.shape[-1]) == eos, 0.0, -float("inf")).astype(logits.dtype)[None]
        return processor

    ref = _reference(base, adapters[V2], prompt, images["red"][1], logits_processors=[force_eos_after(3)])
    answer = _ask(worker, V2, prompt, images["red"][0], processor=force_eos_after(3))
    assert ref["finish_reason"] == "stop" and len(ref["ids"]) == 4 and ref["ids"][-1] == eos
    _check(answer, ref, V2)
    assert answer.generation.tokens == 4 and answer.generation.finish_reason == "stop"


def _edit_adapter(src: Path, dest: Path, edit) -> Path:
    shutil.copytree(src, dest)
    arrays = mx.load(str(dest / "adapters.safetensors"))
    edit(arrays)
    mx.save_safetensors(str(dest / "adapters.safetensors"), arrays)
    return dest


def test_bad_adapters_are_refused_and_the_active_version_keeps_serving(worker, base, adapters, prompt, images,
                                                                        refs, tmp_path):
    _check(_ask(worker, V1, prompt, images["red"][0]), refs[(V1, "red")], V1)  # v1 (rank 4) active
    before = dict(worker.versions)
    name = "language_model.model.layers.1.mlp.up_proj.lora_b"

    # NaN weights in another layout (rank 6): re-wrapped for the check, then v1's layout restored
    nan = write_random_vision_adapter(tmp_path / "nan", base, seed=9, rank=6)
    nan = _edit_adapter(nan, tmp_path / "nan2", lambda a: a.update({name: a[name] * float("nan")}))
    with pytest.raises(EngineError, match=f"critic bad.*{name}.*not finite"):
        worker.load("critic", "bad", nan)

    # finite but huge weights: the smoke generation's logits overflow
    huge = write_random_vision_adapter(tmp_path / "huge", base, seed=9, amplitude=1e18)
    with pytest.raises(EngineError, match="critic huge.*smoke test's logits are not finite"):
        worker.load("critic", "huge", huge)

    shape = _edit_adapter(adapters[V2], tmp_path / "shape", lambda a: a.update({name: mx.zeros((5, 256))}))
    with pytest.raises(EngineError, match=f"critic shape.*wrong shapes: {name} \\(5, 256\\)"):
        worker.load("critic", "shape", shape)

    def rename(a):
        a[name.removeprefix("language_model.")] = a.pop(name)  # an mlx-lm-style name: mlx-vlm would skip it
    renamed = _edit_adapter(adapters[V2], tmp_path / "renamed", rename)
    with pytest.raises(EngineError, match=f"tensors with no LoRA layer: {name.removeprefix('language_model.')}"
                                          f".*LoRA layers with no tensor: {name}"):
        worker.load("critic", "renamed", renamed)

    dora = tmp_path / "dora"
    shutil.copytree(adapters[V2], dora)
    conf = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps(conf | {"fine_tune_type": "dora"}))
    with pytest.raises(EngineError, match="fine_tune_type 'dora'"):
        worker.load("critic", "dora", dora)

    bad_keys = tmp_path / "keys"
    shutil.copytree(adapters[V2], bad_keys)
    conf["lora_parameters"]["keys"] = ["language_model.model.layers.1.mlp.nope"]
    (bad_keys / "adapter_config.json").write_text(json.dumps(conf))
    with pytest.raises(EngineError, match="critic keys.*cannot put LoRA layers"):
        worker.load("critic", "keys", bad_keys)

    assert worker.versions == before and worker.active == V1
    for key in (V1, V3, None, V2, V1):
        _check(_ask(worker, key, prompt, images["yellow"][0]), refs[(key, "yellow")], key)


def test_reload_failure_keeps_the_loaded_version(worker, adapters, prompt, images, refs, tmp_path):
    """Loading a broken folder under an existing (advisor, version) leaves the loaded one."""
    name = "language_model.model.layers.0.self_attn.q_proj.lora_a"
    broken = _edit_adapter(adapters[V2], tmp_path / "b", lambda a: a.update({name: a[name][:, :2]}))
    with pytest.raises(EngineError, match=name):
        worker.load(*V2, broken)
    _check(_ask(worker, V2, prompt, images["red"][0]), refs[(V2, "red")], V2)


def test_bad_images_fail_only_their_request(worker, prompt, images, refs):
    good = images["red"][0]
    for bad in (b"not an image at all", good[: len(good) // 2], b""):
        with pytest.raises(EngineError, match="image"):
            _ask(worker, V1, prompt, bad)
        _check(_ask(worker, V1, prompt, good), refs[(V1, "red")], V1)
    with pytest.raises(EngineError, match="not loaded"):
        _ask(worker, ("critic", "v9"), prompt, good)
    _check(_ask(worker, V3, prompt, images["yellow"][0]), refs[(V3, "yellow")], V3)


def test_unload_call_and_close(base, adapters, prompt, images, refs):
    w = VisionWorker("tiny-vl-2", base, "fp-test", max_versions=2)
    w.wait_ready(120)
    try:
        assert w.kind == "vision" and w.max_batch == 1
        assert w.call(lambda x: threading.current_thread().name) == "vision-tiny-vl-2"
        for key in (V1, V2, V3):
            loaded = w.load(*key, adapters[key])
            assert loaded.smoke is not None and (loaded.advisor, loaded.version) == key
        assert set(w.versions) == {V2, V3} and w.active is None  # the oldest went; load restores the base
        _check(_ask(w, V3, prompt, images["red"][0]), refs[(V3, "red")], V3)
        assert w.unload(*V3) and not w.unload(*V3) and w.active is None
        _check(_ask(w, None, prompt, images["red"][0]), refs[(None, "red")], None)
        with pytest.raises(EngineError, match="not loaded"):
            _ask(w, V3, prompt, images["red"][0])
    finally:
        w.close()
    w.close()  # idempotent
    with pytest.raises(EngineError, match="shutting down"):
        _ask(w, None, prompt, images["red"][0])


def test_a_base_that_cannot_load(tmp_path):
    w = VisionWorker("missing", tmp_path / "nothing-here", "fp")
    with pytest.raises(EngineError, match="failed to load"):
        w.wait_ready(60)
    fut = w.submit(None, VisionRequest("x", b"y"), 4)
    with pytest.raises(EngineError, match="failed to load"):
        fut.result(10)
    w.close()


def test_stopping_criteria_left_changed_on_the_processor_are_reset(worker, prompt, images, refs):
    """mlx-vlm keeps stop tokens on the shared processor (`generate(eos_tokens=...)` adds to
    them for good): each request stops at the model's EOS only, as `mlx_vlm.generate` does."""
    ref = refs[(V1, "red")]
    worker.call(lambda w: w.processor.tokenizer.stopping_criteria.add_eos_token_ids([ref["ids"][1]]))
    _check(_ask(worker, V1, prompt, images["red"][0]), ref, V1)


def test_close_fails_what_still_waits(base, prompt, images):
    """close() lets the running item finish; requests still queued fail, none hangs."""
    import time

    w = VisionWorker("tiny-vl-3", base, "fp-test")
    w.wait_ready(120)
    inside, gate = threading.Event(), threading.Event()
    blocker = threading.Thread(target=lambda: w.call(lambda _: (inside.set(), gate.wait(30))))
    blocker.start()
    assert inside.wait(30)
    futures = [w.submit(None, VisionRequest(prompt, images["red"][0]), MAX_TOKENS) for _ in range(3)]
    closer = threading.Thread(target=w.close)
    closer.start()
    while not w._stop:
        time.sleep(0.001)
    gate.set()
    closer.join(60)
    blocker.join(60)
    assert not closer.is_alive() and not w._thread.is_alive()
    for fut in futures:
        with pytest.raises(EngineError, match="shutting down"):
            fut.result(0)
