"""The inference engine: one worker thread per base model, LoRA versions hot-swapped in place.

A `ModelWorker` owns one base model (loaded once, in its own thread: MLX streams belong to the
thread that made them) and every LoRA version loaded for it. Requests reach it through a
queue. The worker activates the version of the oldest waiting request and opens a batch for
it (greedy, mlx-lm's `BatchGenerator` through `mondrian.generation.Decoder`); requests for
that version join the running batch between decode steps as they arrive (continuous
batching) until one for another version has waited `max_wait_s`; then the batch drains and
the next version is swapped in. A swap therefore only ever happens between batches, never
inside a generation, and every answer carries the version that was active while it was
decoded: the service records that, not what it asked for. Controls (loading a version,
`call`) also wait for the running batch to drain.

A swap is `model.load_weights(pairs, strict=False)` plus each LoRA layer's `scale`: the base
weights never move. Versions whose LoRA layout differs (rank, keys, layers) re-wrap the base
Linear layers first (still no base reload). The base model is the installed layers at scale
0, which gives the base logits bit for bit. Loading a version verifies it through the
registry (checksums, base-model fingerprint), checks every tensor's shape against the
installed layers (`strict=False` does not), and runs a smoke generation whose logits must be
finite; a version failing any of these is refused and what was serving keeps serving.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from mondrian.generation import Decoder, Generation, chat_prompt, generate_batch

SMOKE_PROMPT = [{"role": "user", "content": "hello"}]


class EngineError(ValueError):
    """A version or request the engine cannot serve; the message says which and why."""


@dataclass(frozen=True)
class LoraLayout:
    """What `linear_to_lora_layers` was called with: versions with the same layout swap by
    weights alone."""

    num_layers: int
    rank: int
    keys: tuple[str, ...] | None
    fine_tune_type: str = "lora"


@dataclass
class LoadedVersion:
    advisor: str
    version: str
    path: Path
    layout: LoraLayout
    scale: float
    weights: list  # (name, mx.array) pairs, kept in memory: a swap copies nothing
    loaded_at: float = field(default_factory=time.time)
    smoke: str = ""


@dataclass
class Answer:
    """What the worker returns for one request."""

    generation: Generation
    version: str | None  # the version that was active while decoding; None = the base model
    prompt_tokens: int
    queue_s: float
    batch_size: int


@dataclass
class _Job:
    key: tuple[str, str] | None  # (advisor, version) or None for the base model
    prompt: list[int]
    max_tokens: int
    processor: Callable | None
    future: Future
    enqueued: float = field(default_factory=time.perf_counter)
    admitted: float = 0.0


@dataclass
class _Control:
    fn: Callable
    future: Future


def read_layout(config: dict, where: str) -> tuple[LoraLayout, float]:
    """The LoRA layout and scale an adapter_config.json asks for."""
    ftype = config.get("fine_tune_type", "lora")
    if ftype != "lora":
        raise EngineError(f"{where}: fine_tune_type {ftype!r}; the service hot-swaps LoRA adapters only "
                          "(DoRA's scale 0 is not the base model; full fine-tunes are separate models)")
    params = config.get("lora_parameters") or {}
    try:
        rank, scale, num_layers = int(params["rank"]), float(params["scale"]), int(config["num_layers"])
    except (KeyError, TypeError, ValueError) as exc:
        raise EngineError(f"{where}: adapter_config.json lacks a usable {exc} "
                          "(needs num_layers and lora_parameters.rank/scale)") from None
    keys = params.get("keys")
    return LoraLayout(num_layers, rank, tuple(keys) if keys else None), scale


class ModelWorker:
    """One base model and its LoRA versions, owned by one thread."""

    def __init__(self, name: str, path: str | Path, fingerprint: str, *, max_batch: int = 8,
                 max_versions: int = 8, max_wait_s: float = 0.5):
        self.name, self.path, self.fingerprint = name, Path(path), fingerprint
        self.max_batch, self.max_versions, self.max_wait_s = max_batch, max_versions, max_wait_s
        self.versions: dict[tuple[str, str], LoadedVersion] = {}
        self.active: tuple[str, str] | None = None
        self.layout: LoraLayout | None = None
        self._lora_cache: list | None = None
        self.swaps = 0
        self.batches = 0  # batches opened: runs of one version (requests join them as they arrive)
        self.steps = 0  # decode steps, and rows decoded summed over them (finished batches)
        self.row_steps = 0
        self._queue: queue.Queue = queue.Queue()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=f"model-{name}", daemon=True)
        self._thread.start()

    # ---- public API (any thread)

    def wait_ready(self, timeout: float | None = None) -> None:
        if not self._ready.wait(timeout):
            raise EngineError(f"model {self.name}: not loaded after {timeout} s")
        if self._error:
            raise EngineError(f"model {self.name} ({self.path}) failed to load: {self._error}") from self._error

    def submit(self, key: tuple[str, str] | None, prompt: list[int], max_tokens: int,
               processor: Callable | None = None) -> Future:
        """Queue one prompt for `key` (advisor, version) or the base model (None)."""
        fut: Future = Future()
        self._queue.put(_Job(key, list(prompt), max_tokens, processor, fut))
        return fut

    def call(self, fn: Callable, timeout: float | None = 300) -> object:
        """Run fn(worker) on the worker thread, between batches."""
        fut: Future = Future()
        self._queue.put(_Control(fn, fut))
        return fut.result(timeout)

    def load(self, advisor: str, version: str, path: str | Path) -> LoadedVersion:
        """Load a verified adapter folder as (advisor, version): shape checks and a smoke
        generation on the worker; on any failure the version is not kept and nothing changes."""
        return self.call(lambda w: w._load(advisor, version, Path(path)))

    def unload(self, advisor: str, version: str) -> bool:
        return self.call(lambda w: w.versions.pop((advisor, version), None) is not None)

    def prompt_tokens(self, messages: list[dict]) -> list[int]:
        return chat_prompt(self.tokenizer, messages)

    def close(self) -> None:
        if self._stop:
            return
        self._stop = True
        self._queue.put(None)
        self._thread.join(timeout=30)

    # ---- the worker thread

    def _run(self) -> None:
        try:
            from mlx_lm import load

            self.model, self.tokenizer = load(str(self.path))
            self.model.eval()
        except BaseException as exc:  # noqa: BLE001 - reported through wait_ready
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        pending: list[_Job] = []
        controls: list[_Control] = []
        dec: Decoder | None = None
        while not self._stop:
            busy = bool(pending or controls or dec)
            try:
                item = self._queue.get_nowait() if busy else self._queue.get(timeout=0.05)
            except queue.Empty:
                item = False
            items = [] if item is False else [item]
            while True:  # drain what has arrived
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            for it in items:
                if it is None:
                    self._stop = True
                elif isinstance(it, _Control):
                    controls.append(it)
                else:
                    pending.append(it)
            if self._stop:
                break
            if dec is not None and not len(dec):
                dec = self._finish(dec)
            if dec is None:  # between batches: controls (loads, swaps) run now, then the next version
                for c in controls:
                    self._control(c)
                controls = []
                if pending:
                    dec, pending = self._start(pending)
            if dec is not None:
                pending = self._admit(dec, pending, closed=bool(controls))
                self._step(dec)
        gone = EngineError(f"model {self.name}: the service is shutting down")
        for f in [j.future for j in pending] + [c.future for c in controls] + \
                 ([j.future for j in dec.tags()] if dec is not None else []):
            if not f.done():
                f.set_exception(gone)

    def _control(self, item: _Control) -> None:
        try:
            item.future.set_result(item.fn(self))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            item.future.set_exception(exc)

    def _start(self, pending: list[_Job]) -> tuple[Decoder | None, list[_Job]]:
        """Activate the oldest request's version and open a batch for it (its requests join
        in `_admit`). A version that cannot be activated fails its requests."""
        key = pending[0].key
        try:
            self._activate(key)
        except BaseException as exc:  # noqa: BLE001 - each caller gets the error
            for job in pending:
                if job.key == key and not job.future.done():
                    job.future.set_exception(exc)
            return None, [j for j in pending if j.key != key]
        self.batches += 1
        return Decoder(self.model, self.tokenizer, self.max_batch), pending

    def _admit(self, dec: Decoder, pending: list[_Job], closed: bool) -> list[_Job]:
        """Requests for the active version join the running batch between two decode steps
        (continuous batching), while there is room, unless admission is closed: a control is
        waiting, or a request for another version has waited `max_wait_s` (it goes next,
        once this batch drains). A batch with no rows yet is always open."""
        now = time.perf_counter()
        if len(dec):  # a batch just opened takes what waits for its version, whatever else waits
            closed = closed or any(j.key != self.active and now - j.enqueued > self.max_wait_s for j in pending)
        if closed or len(dec) >= self.max_batch:
            return pending
        rest = []
        for job in pending:
            if job.key != self.active or len(dec) >= self.max_batch:
                rest.append(job)
            elif job.future.set_running_or_notify_cancel():  # a cancelled request is dropped
                job.admitted = now
                dec.add(job.prompt, job.max_tokens, job.processor, tag=job)
        return rest

    def _step(self, dec: Decoder) -> None:
        """One decode step of the running batch; finished rows get their answers."""
        version = self.active[1] if self.active else None
        try:
            for job, gen, peak in dec.step():
                job.future.set_result(Answer(gen, version, len(job.prompt), job.admitted - job.enqueued, peak))
        except BaseException as exc:  # noqa: BLE001 - each caller in the batch gets the error
            for job in dec.tags():
                if not job.future.done():
                    job.future.set_exception(exc)
            dec.clear()

    def _finish(self, dec: Decoder) -> None:
        self.steps += dec.steps
        self.row_steps += dec.row_steps
        dec.close()

    # ---- LoRA slots (worker thread only)

    def _lora_modules(self) -> list:
        """The installed LoRA layers (cached per layout: walking the module tree is most of a swap)."""
        if self._lora_cache is None:
            self._lora_cache = [m for _, m in self.model.named_modules() if hasattr(m, "lora_a") and hasattr(m, "scale")]
        return self._lora_cache

    def _install(self, layout: LoraLayout) -> None:
        """Wrap the base Linear layers for `layout` (unwrapping a previous layout first)."""
        from mlx.utils import tree_unflatten
        from mlx_lm.tuner.utils import linear_to_lora_layers

        wrapped = [(n, m.linear) for n, m in self.model.named_modules() if hasattr(m, "lora_a")]
        if wrapped:
            self.model.update_modules(tree_unflatten(wrapped))
        self.model.freeze()  # what stays trainable after wrapping is exactly the LoRA tensors
        params = {"rank": layout.rank, "scale": 0.0, "dropout": 0.0}
        if layout.keys:
            params["keys"] = list(layout.keys)
        layers = self.model.layers if hasattr(self.model, "layers") else self.model.model.layers
        n = len(layers) if layout.num_layers == -1 else layout.num_layers
        if n > len(layers):
            raise EngineError(f"the adapter wants LoRA on {n} layers; the model has {len(layers)}")
        linear_to_lora_layers(self.model, n, params)
        self._lora_cache = None
        self.model.eval()  # new Dropout modules start in training mode
        self.layout = layout
        self._expected = {k: v.shape for k, v in _flat(self.model.trainable_parameters())}

    def _activate(self, key: tuple[str, str] | None, force: bool = False) -> None:
        """Put `key`'s weights and scale in (None: the base model, scale 0). `force` re-applies
        the active key too (its weights may just have been reloaded or re-wrapped)."""
        if key == self.active and not force:
            return
        if key is None:
            for m in self._lora_modules():
                m.scale = 0.0
        else:
            v = self.versions.get(key)
            if v is None:
                raise EngineError(f"{key[0]} {key[1]} is not loaded on model {self.name}")
            if v.layout != self.layout:
                self._install(v.layout)
            self.model.load_weights(v.weights, strict=False)
            for m in self._lora_modules():
                m.scale = v.scale
        self.active = key
        self.swaps += 1

    def _load(self, advisor: str, version: str, path: Path) -> LoadedVersion:
        import json

        import mlx.core as mx

        where = f"{advisor} {version} ({path})"
        try:
            config = json.loads((path / "adapter_config.json").read_text())
            arrays = mx.load(str(path / "adapters.safetensors"))
        except (OSError, ValueError, RuntimeError) as exc:
            raise EngineError(f"{where}: cannot read the adapter ({exc})") from None
        layout, scale = read_layout(config, where)
        previous_active, previous_layout = self.active, self.layout
        try:
            if layout != self.layout:
                self._install(layout)
            expected = self._expected
            bad = [f"{k} {tuple(v.shape)} (layer wants {tuple(expected[k])})" for k, v in arrays.items()
                   if k in expected and tuple(v.shape) != tuple(expected[k])]
            unknown = sorted(set(arrays) - set(expected))
            missing = sorted(set(expected) - set(arrays))
            if bad or unknown or missing:
                raise EngineError(f"{where}: does not fit {self.name}: "
                                  + "; ".join(filter(None, [
                                      f"wrong shapes: {', '.join(bad[:3])}" if bad else "",
                                      f"tensors with no LoRA layer: {', '.join(unknown[:3])}" if unknown else "",
                                      f"LoRA layers with no tensor: {', '.join(missing[:3])}" if missing else ""])))
            loaded = LoadedVersion(advisor, version, path, layout, scale, list(arrays.items()))
            self.versions[(advisor, version)] = loaded
            self._activate((advisor, version), force=True)
            loaded.smoke = self._smoke(where)
        except BaseException:
            self.versions.pop((advisor, version), None)
            self._restore(previous_active, previous_layout)
            raise
        self._restore(previous_active, previous_layout)
        while len(self.versions) > self.max_versions:  # forget the oldest loaded, never the active
            oldest = min((k for k in self.versions if k != self.active), key=lambda k: self.versions[k].loaded_at)
            del self.versions[oldest]
        return loaded

    def _restore(self, key: tuple[str, str] | None, layout: LoraLayout | None) -> None:
        if key is not None and key in self.versions:
            self._activate(key, force=True)
        else:
            if layout is not None and layout != self.layout:
                self._install(layout)
            self._activate(None, force=True)

    def _smoke(self, where: str) -> str:
        """A forward pass with finite logits and a few generated tokens."""
        import mlx.core as mx

        prompt = chat_prompt(self.tokenizer, SMOKE_PROMPT)
        logits = self.model(mx.array([prompt]))
        if not mx.all(mx.isfinite(logits)).item():
            raise EngineError(f"{where}: refused: the smoke test's logits are not finite (NaN or inf weights?)")
        gens, _ = generate_batch(self.model, self.tokenizer, [prompt], batch_size=1, max_tokens=4)
        return gens[0].text


def _flat(tree) -> list:
    from mlx.utils import tree_flatten

    return tree_flatten(tree)
