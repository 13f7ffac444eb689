"""The inference engine: one worker thread per base model, many LoRA versions served at once.

A `ModelWorker` owns one base model (loaded once, in its own thread: MLX streams belong to the
thread that made them) and every LoRA version loaded for it. Each loaded version has a slot
in the model's `slots.SlotLoRALinear` layers (slot 0 = the base model), so one running
batch decodes requests for different versions together: requests join it between decode
steps as they arrive (continuous batching, `decode.Decoder`: mondrian's own loop, which
knows the rows of every model call and tells the slot layers their slots), each row with its
version's slot, and starts from the longest prompt prefix already computed for its version
(the worker's `PrefixCache`, emptied of a version's entries when it is loaded again or
unloaded). No weights move for traffic; the
version a row decodes with is fixed when it joins, and every answer carries it: the service
records that, not what it asked for.

Loading a version (a control, run between batches: controls wait for the running batch to
drain) puts its tensors in a slot; the base weights never move and the base is never
reloaded. It is verified through the registry by the caller (checksums, base-model
fingerprint), then here: its tensors must be exactly the LoRA pairs its adapter_config.json
implies (mlx-lm's num_layers/keys rules) with the shapes of the Linear layers they adapt,
and a smoke generation's logits must be finite. A version failing any of these is refused
and nothing that was serving changes.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from mondrian.core.adapters import AdapterError, LoraLayout, lora_targets, read_adapter
from mondrian.models import upstream
from mondrian.models.decode import DecodeOptions, Decoder, Generation, PrefixCache
from mondrian.models.generation import chat_prompt, generate_batch
from mondrian.serve.slots import RowSlots, SlotLoRALinear

SMOKE_PROMPT = [{"role": "user", "content": "hello"}]
THREADS = {"started": False}  # whether a worker thread ran MLX in this process (see cli.main)


class EngineError(ValueError):
    """A version or request the engine cannot serve; the message says which and why."""


@dataclass
class LoadedVersion:
    advisor: str
    version: str
    path: Path
    layout: LoraLayout
    scale: float
    slot: int
    pairs: dict  # qualified Linear name -> (lora_a, lora_b), kept in memory
    loaded_at: float = field(default_factory=time.time)
    smoke: str = ""


@dataclass
class Answer:
    """What the worker returns for one request."""

    generation: Generation
    version: str | None  # the version the answer was decoded with; None = the base model
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
class Control:
    """A function to run on the worker thread, between batches (`call`)."""

    fn: Callable
    future: Future


def read_version(path: Path, where: str) -> tuple[dict, dict, LoraLayout, float]:
    """An adapter folder's config, tensors, LoRA layout and scale (`core.adapters.read_adapter`);
    an unusable one is an EngineError."""
    try:
        return read_adapter(path, where)
    except AdapterError as exc:
        raise EngineError(str(exc)) from None


class ModelThread:
    """What both workers share: the thread that owns the model (everything MLX runs there),
    its queue, its readiness and the controls run on it."""

    name: str
    path: Path

    def _start_thread(self, prefix: str) -> None:
        self._queue: queue.Queue = queue.Queue()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=f"{prefix}-{self.name}", daemon=True)
        THREADS["started"] = True
        self._thread.start()

    def _run(self) -> None:
        raise NotImplementedError

    def wait_ready(self, timeout: float | None = None) -> None:
        if not self._ready.wait(timeout):
            raise EngineError(f"model {self.name}: not loaded after {timeout} s")
        if self._error:
            raise EngineError(f"model {self.name} ({self.path}) failed to load: {self._error}") from self._error

    def _control(self, item: Control) -> None:
        if not item.future.set_running_or_notify_cancel():
            return
        try:
            item.future.set_result(item.fn(self))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            item.future.set_exception(exc)


Key = tuple[str, str]  # (advisor, version)


def make_room(versions: dict, max_versions: int, key: Key, keep: set[Key]) -> None:
    """Before loading `key`: refuse (EngineError) when every slot holds a version a routing
    plan serves, rather than evict one of those (its requests would fail until the next plan)."""
    if key not in versions and len(versions) >= max_versions and all(k in keep for k in versions):
        raise EngineError(f"no free slot for {key[0]} {key[1]}: all {max_versions} hold versions the routing "
                          "plans serve (start the service with a larger --max-versions)")


def over_limit(versions: dict, max_versions: int, keep: set[Key]) -> list[Key]:
    """The oldest loaded versions to forget to get back to `max_versions`, never a kept one."""
    spare = sorted((k for k in versions if k not in keep), key=lambda k: versions[k].loaded_at)
    return spare[:max(0, len(versions) - max_versions)]


class ModelWorker(ModelThread):
    """One base model and its LoRA versions, owned by one thread."""

    def __init__(self, name: str, path: str | Path, fingerprint: str, *, max_batch: int = 8,
                 max_versions: int = 8, prefix_cache_mb: float = 256, options: DecodeOptions | None = None):
        self.name, self.path, self.fingerprint = name, Path(path), fingerprint
        self.max_batch, self.max_versions = max_batch, max_versions
        # prompt prefixes' KV state per version; a version loaded again or unloaded drops its own
        self.prefix_cache = PrefixCache(int(prefix_cache_mb * (1 << 20))) if prefix_cache_mb > 0 else None
        self.options = options or DecodeOptions()
        self.versions: dict[tuple[str, str], LoadedVersion] = {}
        self.keep: Callable[[], set[Key]] = set  # what the routing plans serve: never evicted
        self.rows = RowSlots()
        self._layers: dict[str, SlotLoRALinear] = {}  # qualified Linear name -> its slot layer
        self.batches = 0  # batches opened (requests of any version join a running one)
        self.steps = 0  # decode steps, and rows decoded summed over them
        self.row_steps = 0
        self.loads = 0
        self._start_thread("model")

    # ---- public API (any thread)

    def submit(self, key: tuple[str, str] | None, prompt: list[int], max_tokens: int,
               processor: Callable | None = None) -> Future:
        """Queue one prompt for `key` (advisor, version) or the base model (None)."""
        fut: Future = Future()
        self._queue.put(_Job(key, list(prompt), max_tokens, processor, fut))
        return fut

    def call(self, fn: Callable, timeout: float | None = 300) -> object:
        """Run fn(worker) on the worker thread, between batches."""
        fut: Future = Future()
        self._queue.put(Control(fn, fut))
        return fut.result(timeout)

    def load(self, advisor: str, version: str, path: str | Path) -> LoadedVersion:
        """Load a verified adapter folder as (advisor, version) into a slot: tensor checks and a
        smoke generation on the worker; on any failure the version is not kept and nothing changes."""
        return self.call(lambda w: w._load(advisor, version, Path(path)))

    def unload(self, advisor: str, version: str) -> bool:
        return self.call(lambda w: w._unload((advisor, version)))

    def prompt_tokens(self, messages: list[dict]) -> list[int]:
        return chat_prompt(self.tokenizer, messages)

    def stats(self) -> dict:
        return {"batches": self.batches, "decode_steps": self.steps, "decoded_rows": self.row_steps,
                "model_calls": self.rows.calls, "mixed_version_calls": self.rows.mixed_calls,
                "loads": self.loads, "prefix_cache": self.prefix_cache.stats() if self.prefix_cache else None}

    def close(self) -> None:
        if self._stop:
            return
        self._stop = True
        self._queue.put(None)
        self._thread.join(timeout=30)

    # ---- the worker thread

    def _run(self) -> None:
        try:
            self.model, self.tokenizer = upstream.load_lm(str(self.path))
            self.model.eval()
            self.model.freeze()
        except BaseException as exc:  # noqa: BLE001 - reported through wait_ready
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        pending: list[_Job] = []
        controls: list[Control] = []
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
                elif isinstance(it, Control):
                    controls.append(it)
                else:
                    pending.append(it)
            if self._stop:
                break
            if dec is not None and not len(dec):
                dec.close()
                dec = None
            if dec is None:  # between batches: controls (loads, unloads) run now
                for c in controls:
                    self._control(c)
                controls = []
                if pending:
                    dec = Decoder(self.model, self.tokenizer, self.max_batch, self.rows, self.prefix_cache,
                                  self.options)
                    self.batches += 1
            if dec is not None:
                if not controls:  # a waiting control closes the batch to new rows: it drains, then the control runs
                    pending = self._admit(dec, pending)
                self._step(dec)
        gone = EngineError(f"model {self.name}: the service is shutting down")
        for f in [j.future for j in pending] + [c.future for c in controls] + \
                 ([j.future for j in dec.tags()] if dec is not None else []):
            if not f.done():
                f.set_exception(gone)

    def _admit(self, dec: Decoder, pending: list[_Job]) -> list[_Job]:
        """Waiting requests join the running batch, oldest first, while there is room; each row
        decodes with its version's slot."""
        rest = []
        now = time.perf_counter()
        for job in pending:
            if len(dec) >= self.max_batch:
                rest.append(job)
                continue
            if not job.future.set_running_or_notify_cancel():  # a cancelled request is dropped
                continue
            if job.key is None:
                slot = 0
            elif job.key in self.versions:
                slot = self.versions[job.key].slot
            else:
                job.future.set_exception(EngineError(f"{job.key[0]} {job.key[1]} is not loaded on model {self.name}"))
                continue
            job.admitted = now
            dec.add(job.prompt, job.max_tokens, job.processor, tag=job, slot=slot, cache_key=job.key)
        return rest

    def _step(self, dec: Decoder) -> None:
        """One decode step of the running batch; finished rows get their answers."""
        steps, rows = dec.steps, dec.row_steps
        try:
            finished = dec.step()
            self.steps += dec.steps - steps
            self.row_steps += dec.row_steps - rows
            for job, gen, peak in finished:
                version = job.key[1] if job.key else None
                job.future.set_result(Answer(gen, version, len(job.prompt), job.admitted - job.enqueued, peak))
        except BaseException as exc:  # noqa: BLE001 - each caller in the batch gets the error
            for job in dec.tags():
                if not job.future.done():
                    job.future.set_exception(exc)
            dec.clear()

    # ---- LoRA slots (worker thread only)

    def _targets(self, layout: LoraLayout, where: str) -> dict[str, nn.Module]:
        """The Linear layers mlx-lm puts LoRA on for `layout`, by qualified name (a slot layer
        stands for the Linear it wraps)."""
        try:
            return lora_targets(self.model, layout.num_layers, layout.keys, unwrap=_unwrap_slot)
        except AdapterError as exc:
            raise EngineError(f"{where}: {exc}") from None

    def _wrap(self, name: str, linear: nn.Module) -> SlotLoRALinear:
        layer = self._layers.get(name)
        if layer is None:
            layer = SlotLoRALinear(linear, self.rows)
            self.model.update_modules(tree_unflatten([(name, layer)]))
            self._layers[name] = layer
        return layer

    def _load(self, advisor: str, version: str, path: Path) -> LoadedVersion:
        where = f"{advisor} {version} ({path})"
        _, arrays, layout, scale = read_version(path, where)
        targets = self._targets(layout, where)
        bad, pairs = [], {}
        for name, linear in targets.items():
            out_dims, in_dims = linear.weight.shape
            if isinstance(linear, nn.QuantizedLinear):
                in_dims = in_dims * 32 // linear.bits
            a, b = arrays.get(f"{name}.lora_a"), arrays.get(f"{name}.lora_b")
            if a is None or b is None:
                continue
            if tuple(a.shape) != (in_dims, layout.rank) or tuple(b.shape) != (layout.rank, out_dims):
                bad.append(f"{name}.lora_a/b {tuple(a.shape)}/{tuple(b.shape)} (layer wants "
                           f"{(in_dims, layout.rank)}/{(layout.rank, out_dims)})")
            pairs[name] = (a, b)
        wanted = {f"{n}.{ab}" for n in targets for ab in ("lora_a", "lora_b")}
        unknown, missing = sorted(set(arrays) - wanted), sorted(wanted - set(arrays))
        if bad or unknown or missing:
            raise EngineError(f"{where}: does not fit {self.name}: " + "; ".join(filter(None, [
                f"wrong shapes: {', '.join(bad[:3])}" if bad else "",
                f"tensors with no LoRA layer: {', '.join(unknown[:3])}" if unknown else "",
                f"LoRA layers with no tensor: {', '.join(missing[:3])}" if missing else ""])))
        key = (advisor, version)
        make_room(self.versions, self.max_versions, key, self.keep())
        self._forget_prefixes(key)
        old = self.versions.get(key)
        used = {v.slot for k, v in self.versions.items() if k != key}
        slot = old.slot if old else next(s for s in range(1, len(self.versions) + 2) if s not in used)
        previous = {n: layer._slots.get(slot) for n, layer in self._layers.items()}
        for name in pairs:
            self._wrap(name, targets[name])
        self._place(slot, pairs, scale)
        loaded = LoadedVersion(advisor, version, path, layout, scale, slot, pairs)
        try:
            loaded.smoke = self._smoke(where, slot)
        except BaseException:
            for name, layer in self._layers.items():  # put back what the slot held (a reload) or nothing
                prev = previous.get(name)
                layer.set_slot(slot, prev.a if prev else None, prev.b if prev else None, prev.scale if prev else 0.0)
            raise
        self.versions[key] = loaded
        self.loads += 1
        for oldest in over_limit(self.versions, self.max_versions, self.keep() | {key}):
            self._unload(oldest)
        return loaded

    def _forget_prefixes(self, key: Key) -> None:
        """Drop the cached prompt prefixes of `key`: its weights change or leave."""
        if self.prefix_cache is not None:
            self.prefix_cache.drop(key)

    def _place(self, slot: int, pairs: dict[str, tuple], scale: float) -> None:
        """Put a version's (lora_a, lora_b) pairs in `slot` of every slot layer (none where it
        has none; its layers are wrapped already)."""
        for name, layer in self._layers.items():
            a, b = pairs.get(name, (None, None))
            layer.set_slot(slot, a, b, scale)

    def _unload(self, key: tuple[str, str]) -> bool:
        v = self.versions.pop(key, None)
        if v is None:
            return False
        self._forget_prefixes(key)
        for layer in self._layers.values():
            layer.set_slot(v.slot, None)
        return True

    def _smoke(self, where: str, slot: int) -> str:
        """A forward pass with finite logits and a few generated tokens, in `slot`."""
        prompt = chat_prompt(self.tokenizer, SMOKE_PROMPT)
        with self.rows.use([slot]):
            logits = self.model(mx.array([prompt]))
            finite = mx.all(mx.isfinite(logits)).item()
        if not finite:
            raise EngineError(f"{where}: refused: the smoke test's logits are not finite (NaN or inf weights?)")
        gens, _ = generate_batch(self.model, self.tokenizer, [prompt], batch_size=1, max_tokens=4,
                                 row_slots=self.rows, slots=[slot])
        return gens[0].text


def _unwrap_slot(module: nn.Module) -> nn.Module:
    """The Linear a slot layer wraps (any other module stands for itself)."""
    return module.linear if isinstance(module, SlotLoRALinear) else module
