"""The image-advisor worker: one thread owns a Qwen2-VL-family base model (mlx-vlm) and hot-swaps
its LoRA versions in place, like `mondrian.serve.engine` does for text models.

A `VisionWorker` loads the base with `mlx_vlm.load` in its own thread (MLX streams belong to
the thread that made them) and serves requests from a queue, one at a time, in arrival order:
before each, the request's version is activated, so a swap never happens inside a generation
and every answer carries the version that was active while it was decoded. Controls (`load`,
`unload`, `call`) wait in the same queue and run between requests.

LoRA layers are installed with mlx-vlm's own code (`upstream.apply_vlm_lora_layers`, what
`mlx_vlm.load(base, adapter_path=...)` runs), so the model has exactly the structure mlx-vlm
builds for that adapter folder. A swap is `model.load_weights(pairs, strict=False)` plus each
LoRA layer's `scale`; the base model is every LoRA layer at scale 0 (bit-identical logits).
A version with another layout (rank, keys, num_layers) unwraps the installed LoRA layers back
to their base Linear and wraps again: the base is never reloaded. mlx-vlm's loader checks
nothing (strict=False), so loading a version here checks every tensor's name and shape
against the installed layers, refuses non-finite tensors, and runs a smoke generation on a
synthetic image whose log-probabilities must be finite; a refused version is not kept and
what was serving keeps serving.

Decoding is greedy through mlx-vlm's `stream_generate`, with the stopping criteria reset per
request exactly as `mlx_vlm.generate` does (it keeps them on the shared processor), so an
answer is what `mlx_vlm.generate(..., temperature=0)` gives for the same prompt and image.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from PIL import Image

from mondrian.core.adapters import LoraLayout
from mondrian.models.generation import Generation, lora_layers
from mondrian.models.upstream import apply_vlm_lora_layers
from mondrian.serve.engine import (
    Answer,
    Control,
    EngineError,
    Key,
    LoadedVersion,
    ModelThread,
    make_room,
    over_limit,
    read_version,
)

SMOKE_TOKENS = 4
SMOKE_IMAGE_SIZE = 56  # the tiny Qwen2-VL processor's minimum (56 x 56 pixels)


@dataclass(frozen=True)
class VisionRequest:
    """One image-advisor request: the chat-templated prompt (`VisionWorker.vision_prompt`)
    and the raw uploaded image bytes (decoded on the worker)."""

    prompt: str
    image: bytes


@dataclass
class VisionGeneration(Generation):
    """A `Generation` that also keeps the generated token ids (stop token included)."""

    token_ids: tuple[int, ...] = ()


@dataclass
class _Job:
    key: tuple[str, str] | None  # (advisor, version) or None for the base model
    request: VisionRequest
    max_tokens: int
    processor: Callable | None
    future: Future
    enqueued: float = field(default_factory=time.perf_counter)


class VisionWorker(ModelThread):
    """One vision-language base model and its LoRA versions, owned by one thread."""

    kind = "vision"
    max_batch = 1

    def __init__(self, name: str, path: str | Path, fingerprint: str, *, max_versions: int = 8):
        self.name, self.path, self.fingerprint = name, Path(path), fingerprint
        self.max_versions = max_versions
        self.versions: dict[tuple[str, str], LoadedVersion] = {}
        self.keep: Callable[[], set[Key]] = set  # what the routing plans serve: never evicted
        self.active: tuple[str, str] | None = None
        self.layout: LoraLayout | None = None
        self.swaps = 0
        self.batches = 0  # requests decoded (a batch is one request here)
        self.steps = 0  # generated tokens, and rows decoded summed over steps (equal at batch 1)
        self.row_steps = 0
        self.model = self.processor = None
        self._lora_cache: list | None = None
        self._expected: dict[str, tuple[int, ...]] = {}
        self._lock = threading.Lock()  # orders puts against close()
        self._start_thread("vision")

    # ---- public API (any thread)

    def vision_prompt(self, messages: list[dict]) -> str:
        """The chat-templated prompt for `messages` (no assistant turn) with one image, as
        mlx-vlm's trainer renders training rows."""
        from mlx_vlm.prompt_utils import (  # noqa: PLC0415 - heavy: mlx_vlm import ~2 s
            apply_chat_template,
        )

        self.wait_ready(0)
        return apply_chat_template(self.processor, self.model.config, messages,
                                   add_generation_prompt=True, num_images=1)

    def submit(self, key: tuple[str, str] | None, prompt: VisionRequest, max_tokens: int,
               processor: Callable | None = None) -> Future:
        """Queue one request for `key` (advisor, version) or the base model (None); the future
        gets an `Answer`. `processor` is a logits processor f(tokens, logits) -> logits."""
        if not isinstance(prompt, VisionRequest):
            raise TypeError(f"a vision request is a VisionRequest, got {type(prompt).__name__}")
        fut: Future = Future()
        self._put(_Job(key, prompt, int(max_tokens), processor, fut), fut)
        return fut

    def call(self, fn: Callable, timeout: float | None = 300) -> object:
        """Run fn(worker) on the worker thread, between requests."""
        fut: Future = Future()
        self._put(Control(fn, fut), fut)
        return fut.result(timeout)

    def load(self, advisor: str, version: str, path: str | Path) -> LoadedVersion:
        """Load an adapter folder (mlx-vlm format) as (advisor, version): layout, name, shape
        and finiteness checks and a smoke generation on the worker; on any failure the version
        is not kept and what was active before is active again."""
        return self.call(lambda w: w._load(advisor, version, Path(path)))

    def unload(self, advisor: str, version: str) -> bool:
        return self.call(lambda w: w._unload((advisor, version)))

    def stats(self) -> dict:
        return {"batches": self.batches, "decode_steps": self.steps, "decoded_rows": self.row_steps,
                "swaps": self.swaps, "active": "@".join(self.active) if self.active else None}

    def close(self) -> None:
        """Stop after the request being decoded (if any); requests still queued fail."""
        with self._lock:
            if self._stop:
                return
            self._stop = True
            self._queue.put(None)
        self._thread.join(timeout=30)
        self._fail_queued()

    # ---- the worker thread

    def _put(self, item: _Job | Control, fut: Future) -> None:
        with self._lock:
            if not self._stop:
                self._queue.put(item)
                return
        fut.set_exception(EngineError(f"model {self.name}: the service is shutting down"))

    def _fail_queued(self, why: str | None = None) -> None:
        err = EngineError(why or f"model {self.name}: the service is shutting down")
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None and not item.future.done():
                item.future.set_exception(err)

    def _run(self) -> None:
        try:
            import mlx_vlm  # noqa: PLC0415 - heavy: mlx_vlm import ~2 s

            self.model, self.processor = mlx_vlm.load(str(self.path))
            self.model.eval()
        except BaseException as exc:  # noqa: BLE001 - reported through wait_ready
            self._error = exc
            self._ready.set()
            why = f"model {self.name} ({self.path}) failed to load: {exc}"
            while (item := self._queue.get()) is not None:  # answer whatever arrives until close()
                if not item.future.done():
                    item.future.set_exception(EngineError(why))
            return
        self._ready.set()
        while True:
            item = self._queue.get()
            if item is None or self._stop:  # closing: what still waits is failed by close()
                if item is not None and not item.future.done():
                    item.future.set_exception(EngineError(f"model {self.name}: the service is shutting down"))
                break
            if isinstance(item, Control):
                self._control(item)
            else:
                self._serve(item)

    def _serve(self, job: _Job) -> None:
        """One request: decode its image, activate its version, generate. Any failure fails
        this request only."""
        if not job.future.set_running_or_notify_cancel():  # cancelled while queued
            return
        queue_s = time.perf_counter() - job.enqueued
        try:
            image = decode_image(job.request.image)
            self._activate(job.key)
            gen, prompt_tokens = self._generate(job.request.prompt, image, job.max_tokens, job.processor)
            self.batches += 1
            self.steps += gen.tokens
            self.row_steps += gen.tokens
            version = self.active[1] if self.active else None
            job.future.set_result(Answer(generation=gen, version=version, prompt_tokens=prompt_tokens,
                                         queue_s=queue_s, batch_size=1))
        except BaseException as exc:  # noqa: BLE001 - the caller gets the error
            job.future.set_exception(exc)

    def _generate(self, prompt: str, image, max_tokens: int, processor: Callable | None = None,
                  where: str | None = None) -> tuple[VisionGeneration, int]:
        """Greedy decoding of one prompt + image (a PIL image). `where` set: the smoke test,
        which also requires every step's log-probabilities to be finite."""
        from mlx_vlm import (  # noqa: PLC0415 - heavy: mlx_vlm import ~2 s
            stream_generate,
        )

        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        # What mlx_vlm.generate does before each call: stop at the model's EOS only (the
        # criteria live on the shared processor; a previous call may have changed them).
        tokenizer.stopping_criteria.reset(self.model.config.eos_token_id)
        kwargs: dict = {"max_tokens": max_tokens, "temperature": 0.0}
        if processor is not None:
            kwargs["logits_processors"] = [processor]
        parts, last = [], None
        start = time.perf_counter()
        for r in stream_generate(self.model, self.processor, prompt, image=[image], **kwargs):
            if where is not None and r.logprobs is not None and not mx.all(mx.isfinite(r.logprobs)).item():
                raise EngineError(f"{where}: refused: the smoke test's logits are not finite "
                                  "(NaN or inf weights, or activations overflowing)")
            parts.append(r.text)
            last = r
        latency = time.perf_counter() - start
        text = "".join(parts)
        clean = getattr(self.processor, "clean_output", None)
        if callable(clean):
            text = clean(text)
        if last is None:  # stream_generate always yields at least once; be safe
            return VisionGeneration(text, 0, latency, "length"), 0
        ids = tuple(int(t) for t in (last.token_ids or ()))
        return VisionGeneration(text, int(last.generation_tokens), latency, last.finish_reason, token_ids=ids), \
            int(last.prompt_tokens)

    # ---- LoRA layers and versions (worker thread only)

    def _lora_modules(self) -> list:
        if self._lora_cache is None:
            self._lora_cache = lora_layers(self.model)
        return self._lora_cache

    def _unwrap(self) -> None:
        """Put every installed LoRA layer's base Linear back."""
        wrapped = [(n, m.linear) for n, m in self.model.named_modules() if hasattr(m, "lora_a")]
        if wrapped:
            self.model.update_modules(tree_unflatten(wrapped))
        self.layout, self._lora_cache, self._expected = None, None, {}

    def _install(self, layout: LoraLayout, where: str) -> None:
        """Wrap the base Linear layers for `layout` with mlx-vlm's own LoRA code (unwrapping a
        previous layout first). On failure the model is left with no LoRA layers."""
        self._unwrap()
        self.model.freeze()  # what is trainable after wrapping is exactly the LoRA tensors
        params: dict = {"rank": layout.rank, "scale": 0.0, "dropout": 0.0}
        if layout.keys:
            params["keys"] = list(layout.keys)
        config = {"fine_tune_type": "lora", "num_layers": layout.num_layers, "lora_parameters": params}
        try:
            apply_vlm_lora_layers(self.model, config)
        except (AttributeError, IndexError, KeyError, TypeError, ValueError) as exc:
            self._unwrap()
            raise EngineError(f"{where}: cannot put LoRA layers on {self.name} as the adapter asks "
                              f"(rank {layout.rank}, num_layers {layout.num_layers}, keys "
                              f"{list(layout.keys) if layout.keys else 'all Linear'}): "
                              f"{type(exc).__name__}: {exc}") from None
        self._lora_cache = None
        self.model.eval()  # new Dropout modules start in training mode
        self.layout = layout
        self._expected = {k: tuple(v.shape) for k, v in tree_flatten(self.model.trainable_parameters())}
        if not self._expected:
            self._unwrap()
            raise EngineError(f"{where}: the adapter's layout puts no LoRA layer on {self.name}")

    def _activate(self, key: tuple[str, str] | None, force: bool = False) -> None:
        """Put `key`'s weights and scale in (None: the base model, every LoRA scale 0).
        `force` re-applies the active key too (its weights may have been reloaded or re-wrapped)."""
        if key == self.active and not force:
            return
        if key is None:
            for m in self._lora_modules():
                m.scale = 0.0
        else:
            v = self.versions.get(key)
            if v is None:
                raise EngineError(f"{key[0]} {key[1]} is not loaded on model {self.name}")
            try:
                if v.layout != self.layout:
                    self._install(v.layout, f"{key[0]} {key[1]}")
                # the version's own arrays, kept in memory: a swap copies nothing
                self.model.load_weights([(f"{name}.lora_{ab}", t) for name, pair in v.pairs.items()
                                         for ab, t in zip("ab", pair, strict=True)], strict=False)
            except BaseException:  # half swapped: serve the base model until the next activation
                for m in self._lora_modules():
                    m.scale = 0.0
                self.active = None
                raise
            for m in self._lora_modules():
                m.scale = v.scale
        self.active = key
        self.swaps += 1

    def _unload(self, key: tuple[str, str]) -> bool:
        if self.versions.pop(key, None) is None:
            return False
        if self.active == key:
            self._activate(None, force=True)
        return True

    def _check_base_quantization(self, config: dict, where: str) -> None:
        """mlx-vlm would quantize base layers an adapter was trained on quantized; a hot-swap
        never changes the base, so the base must already be exactly that."""
        wanted = config.get("base_quantization") or {}
        if not wanted:
            return
        modules = dict(self.model.named_modules())
        for name, params in wanted.items():
            layer = modules.get(name)
            if isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
                actual = {"group_size": layer.group_size, "bits": layer.bits,
                          "mode": getattr(layer, "mode", "affine")}
                if actual == params:
                    continue
            raise EngineError(f"{where}: trained on a base quantized as {params} at {name}; "
                              f"model {self.name} is not (load the matching base)")

    def _load(self, advisor: str, version: str, path: Path) -> LoadedVersion:
        key = (advisor, version)
        where = f"{advisor} {version} ({path})"
        config, arrays, layout, scale = read_version(path, where)
        self._check_base_quantization(config, where)
        make_room(self.versions, self.max_versions, key, self.keep())
        previous_active, previous_layout = self.active, self.layout
        replaced = self.versions.get(key)
        # A slot number per version (0 = the base), as the text engine reports them; here it is
        # a name only: one version is active at a time.
        used = {v.slot for k, v in self.versions.items() if k != key}
        slot = replaced.slot if replaced else next(s for s in range(1, len(used) + 2) if s not in used)
        try:
            if layout != self.layout:
                self._install(layout, where)
            self._check_tensors(arrays, where)
            pairs = {k.removesuffix(".lora_a"): (v, arrays[k.removesuffix("a") + "b"])
                     for k, v in arrays.items() if k.endswith(".lora_a")}
            loaded = LoadedVersion(advisor, version, path, layout, scale, slot, pairs)
            self.versions[key] = loaded
            self._activate(key, force=True)
            loaded.smoke = self._smoke(where)
        except BaseException:
            if replaced is not None:
                self.versions[key] = replaced
            else:
                self.versions.pop(key, None)
            self._restore(previous_active, previous_layout)
            raise
        self._restore(previous_active, previous_layout)
        for oldest in over_limit(self.versions, self.max_versions, self.keep() | {key, self.active}):
            del self.versions[oldest]  # the oldest loaded, never the active one or a kept one
        return loaded

    def _check_tensors(self, arrays: dict, where: str) -> None:
        """Every tensor must be a LoRA tensor of the installed layers with its exact shape,
        every LoRA tensor must be there, and all values finite (load_weights(strict=False)
        would take anything)."""
        expected = self._expected
        bad = [f"{k} {tuple(v.shape)} (layer wants {expected[k]})" for k, v in sorted(arrays.items())
               if k in expected and tuple(v.shape) != expected[k]]
        unknown = sorted(set(arrays) - set(expected))
        missing = sorted(set(expected) - set(arrays))
        if bad or unknown or missing:
            raise EngineError(f"{where}: does not fit {self.name}: " + "; ".join(filter(None, [
                f"wrong shapes: {', '.join(bad[:3])}" if bad else "",
                f"tensors with no LoRA layer: {', '.join(unknown[:3])}" if unknown else "",
                f"LoRA layers with no tensor: {', '.join(missing[:3])}" if missing else ""])))
        for k, v in sorted(arrays.items()):
            if not mx.all(mx.isfinite(v)).item():
                raise EngineError(f"{where}: refused: tensor {k} has values that are not finite (NaN or inf)")

    def _restore(self, key: tuple[str, str] | None, layout: LoraLayout | None) -> None:
        if key is not None and key in self.versions:
            self._activate(key, force=True)
        else:
            if layout is not None and layout != self.layout:
                self._install(layout, f"model {self.name}: restoring the previous layout")
            self._activate(None, force=True)

    def _smoke(self, where: str) -> str:
        """A few greedy tokens on a synthetic image; every step's logits must be finite."""
        prompt = self.vision_prompt([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hello"}]}])
        gen, _ = self._generate(prompt, smoke_image(), SMOKE_TOKENS, where=where)
        return gen.text


def decode_image(data: bytes) -> Image.Image:
    """The request's image as mlx-vlm reads an image file (EXIF orientation applied, RGB),
    decoded now: bytes PIL cannot read raise an EngineError."""
    from mlx_vlm.utils import (  # noqa: PLC0415 - heavy: mlx_vlm import ~2 s
        load_image,
    )

    if not isinstance(data, (bytes, bytearray, memoryview)) or not len(data):
        raise EngineError("the request's image is empty or not bytes")
    try:
        image = load_image(BytesIO(bytes(data)))
        image.load()
    except Exception as exc:  # PIL raises many kinds (OSError, SyntaxError, DecompressionBombError...)
        raise EngineError(f"the request's image cannot be decoded: {type(exc).__name__}: {exc}") from None
    return image


def smoke_image(size: int = SMOKE_IMAGE_SIZE) -> Image.Image:
    """A small synthetic picture: four coloured quadrants."""
    img = Image.new("RGB", (size, size), (246, 244, 236))
    half = size // 2
    img.paste((212, 32, 39), (0, 0, half, half))
    img.paste((24, 72, 160), (half, half, size, size))
    img.paste((247, 208, 32), (half, 0, size, half))
    return img

