"""Generation on an MLX model: chat prompts, batched greedy decoding, LoRA layers on/off.
Shared by evaluation (`mondrian.evaluate.run`) and the service (`mondrian.serve.engine`), so an
evaluated answer and a served answer come from the same code. Contract-constrained decoding
(the logits processors) is mondrian.models.constrained.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import mlx.core as mx
import mlx.nn as nn

from mondrian.models import upstream


class GenerationError(ValueError):
    """Generation cannot run as asked (DoRA layers, an unusable schema, a stalled batch)."""


@dataclass
class Generation:
    """One answer as generated: its text, generated tokens (stop token included), seconds from
    the start of its prompt processing to its last token, and why it ended."""

    text: str
    tokens: int = 0
    latency_s: float | None = None
    finish_reason: str | None = None


# ---------------------------------------------------------------------------------------------
# the model side: one load, adapter on/off, batched greedy generation, constrained decoding


def lora_layers(model: nn.Module) -> list[nn.Module]:
    """The LoRA layers installed in `model` (whatever their type), in module order."""
    from mlx_lm.tuner.dora import (  # noqa: PLC0415 - heavy: mlx_lm import ~1.5 s
        DoRAEmbedding,
        DoRALinear,
    )

    found = [m for _, m in model.named_modules() if hasattr(m, "lora_a") and hasattr(m, "scale")]
    if any(isinstance(m, (DoRALinear, DoRAEmbedding)) for m in found):
        raise GenerationError("DoRA layers: scale 0 is not the base model there; evaluate LoRA adapters")
    return found


class AdapterSwitch:
    """Turns the LoRA layers of a loaded model on (their trained scale) and off (scale 0:
    bit-identical base logits) without reloading anything."""

    def __init__(self, model: nn.Module):
        self.layers = lora_layers(model)
        self.scales = [m.scale for m in self.layers]

    def set(self, on: bool) -> None:
        for m, s in zip(self.layers, self.scales, strict=True):
            m.scale = s if on else 0.0


def chat_prompt(tokenizer: Any, messages: list[dict]) -> list[int]:
    """The prompt tokens of a chat: what mlx-lm's ChatDataset masks as the prompt in training."""
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))


@dataclass
class _Row:
    """A row of a `Decoder`: what it was added with, and what it has generated so far."""

    tag: Any
    prompt: list[int]
    max_tokens: int
    processor: Callable | None
    slot: int
    tokens: list[int] = field(default_factory=list)
    steps: int = 0
    start: float | None = None
    peak: int = 0


class RowSlotChooser(Protocol):
    """What a `Decoder` tells which LoRA slot each row of a model call uses
    (`mondrian.serve.slots.RowSlots`)."""

    def use(self, slots: list[int]) -> AbstractContextManager: ...


class Decoder:
    """A running continuous batch: greedy decoding of up to `batch_size` rows together, where
    rows can be added at any time and a finished row's place goes to the next one. `step()`
    decodes one token of every row, then starts the rows waiting while there is room (their
    prompts processed together, their first token started), and returns the rows that
    finished, with per-row latency (prompt start to last token) and per-row logits processors
    (one grammar state per row). Stop tokens are the tokenizer's EOS ids, as mlx-lm's
    `batch_generate` has them.

    The loop is ours, over mlx-lm's batch objects (`upstream.start_rows`): we know the rows of
    every model call, in order (the batch's `uids`), so with `row_slots` each call is made
    inside `row_slots.use(<the rows' slots>)`."""

    def __init__(self, model: nn.Module, tokenizer: Any, batch_size: int = 16,
                 row_slots: RowSlotChooser | None = None):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self._row_slots = row_slots
        self._stop_tokens = sorted(tokenizer.eos_token_ids)
        self._stream = upstream.decode_stream()
        self._rows: dict[int, _Row] = {}  # uid -> row, added and not finished
        self._waiting: deque[int] = deque()  # uids not started, oldest first
        self._batch = None  # mlx-lm's GenerationBatch of the started rows
        self._next_uid = 0
        self.steps = 0  # decode steps taken
        self.row_steps = 0  # rows decoded, summed over steps (mean occupancy = row_steps / steps)

    def __len__(self) -> int:
        """Rows added and not finished."""
        return len(self._rows)

    def add(self, prompt: list[int], max_tokens: int, processor: Callable | None = None, tag: Any = None,
            slot: int = 0) -> None:
        """Queue a row; it starts at the next step. `slot`: its LoRA slot (with `row_slots`)."""
        if not prompt:
            raise GenerationError("an empty prompt")
        if max_tokens < 1:
            raise GenerationError(f"max_tokens {max_tokens}: a row generates at least one token")
        uid, self._next_uid = self._next_uid, self._next_uid + 1
        self._rows[uid] = _Row(tag, list(prompt), max_tokens, processor, slot)
        self._waiting.append(uid)

    def step(self) -> list[tuple[Any, Generation, int]]:
        """One step; returns (tag, answer, most rows decoded together while it decoded) for
        each row that finished."""
        if not self._rows:
            return []
        with mx.stream(self._stream):
            done = self._decode() if self._batch is not None and len(self._batch) else []
            started = self._start_waiting()
        if not done and not started and not (self._batch is not None and len(self._batch)):
            raise GenerationError(f"generation stalled with {len(self._rows)} rows unfinished")
        return done

    def _slots_for(self, uids: list[int]) -> AbstractContextManager:
        """The LoRA slots of a model call's rows, in the call's row order."""
        if self._row_slots is None:
            return nullcontext()
        return self._row_slots.use([self._rows[u].slot for u in uids])

    def _decode(self) -> list[tuple[Any, Generation, int]]:
        t = time.perf_counter()
        with self._slots_for(self._batch.uids):  # the rows of this call, in its order
            responses = self._batch.next()  # finished rows leave the batch, the rest keep their order
        now = time.perf_counter()
        self.steps += 1
        self.row_steps += len(responses)
        if self.steps % 512 == 0:
            mx.clear_cache()  # as mlx-lm's BatchGenerator does
        done = []
        for r in responses:
            row = self._rows[r.uid]
            row.steps += 1
            row.peak = max(row.peak, len(responses))
            if r.finish_reason != "stop":
                row.tokens.append(r.token)
            if r.finish_reason is not None:
                del self._rows[r.uid]
                gen = Generation(self.tokenizer.decode(row.tokens), row.steps, now - (row.start or t),
                                 r.finish_reason)
                done.append((row.tag, gen, row.peak))
        return done

    def _start_waiting(self) -> int:
        """Start waiting rows, oldest first, while the batch has room; returns how many."""
        room = self.batch_size - (len(self._batch) if self._batch is not None else 0)
        uids = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
        if not uids:
            return 0
        t = time.perf_counter()
        rows = [self._rows[u] for u in uids]
        for row in rows:
            row.start = t
        with self._slots_for(uids):  # prompt processing and the first decode step, rows in `uids` order
            new = upstream.start_rows(self.model, uids, [r.prompt for r in rows], [r.max_tokens for r in rows],
                                      [r.processor for r in rows], self._stop_tokens)
        if self._batch is None or not len(self._batch):
            self._batch = new
        else:
            self._batch.extend(new)  # the new rows follow the running ones
        return len(uids)

    def tags(self) -> list:
        """The tags of the rows not finished."""
        return [row.tag for row in self._rows.values()]

    def clear(self) -> None:
        """Forget the unfinished rows (after a failed step: their callers were told)."""
        self._rows.clear()
        self._waiting.clear()
        self._batch = None

    def close(self) -> None:
        mx.synchronize(self._stream)  # the step mlx-lm already started for the rows that finished


def generate_batch(model: nn.Module, tokenizer: Any, prompts: Sequence[list[int]], *, batch_size: int = 16,
                   max_tokens: int | Sequence[int] = 256,
                   logits_processors: Sequence[Callable] | None = None,
                   progress: Callable[[int], None] | None = None,
                   row_slots: RowSlotChooser | None = None, slots: Sequence[int] | None = None) -> tuple[list[Generation], float]:
    """Greedy answers to `prompts` through one `Decoder`, `batch_size` sequences decoding
    together. Returns the answers and the wall-clock seconds. `max_tokens` is one limit for all
    or one per prompt; `slots` the LoRA slot per prompt (a model with `row_slots`)."""
    if not prompts:
        return [], 0.0
    n = len(prompts)
    limits = [max_tokens] * n if isinstance(max_tokens, int) else list(max_tokens)
    procs = list(logits_processors) if logits_processors is not None else [None] * n
    t0 = time.perf_counter()
    dec = Decoder(model, tokenizer, batch_size, row_slots)
    out: list[Generation | None] = [None] * n
    try:
        for i, p in enumerate(prompts):
            dec.add(p, limits[i], procs[i], tag=i, slot=slots[i] if slots else 0)
        while len(dec):
            for i, gen, _ in dec.step():
                out[i] = gen
                if progress:
                    progress(1)
    finally:
        dec.close()
    return out, time.perf_counter() - t0
