"""mondrian's decode loop: continuous batching with prefix reuse, grammar fast-forward and a
masked output projection. Greedy, like everything mondrian generates.

A `Decoder` holds the running rows and one batch KV cache (mlx-lm's `BatchKVCache`, through
`upstream`). Each `step()`:
1. starts waiting rows, oldest first, while there is room: each row's prompt is looked up in
   the `PrefixCache` (the KV state of the longest prompt prefix already computed for the
   row's cache key, e.g. its LoRA version), only the rest is prefilled, the new rows
   together, and their first token is chosen from the prefill's last position;
2. runs one model call for the running rows. A row feeds the token it chose last plus every
   token its grammar forces after it (`processor.forced()`: the rules allow exactly one
   token, so greedy decoding would pick it whatever the logits say): rows of different
   lengths go in one call, right-padded, and the padding becomes masked left padding after
   it. Answers equal token-by-token constrained decoding; only the number of model calls
   changes;
3. projects only each row's last position onto the vocabulary, and when the call's grammars
   allow few tokens (`gather_max` together) only onto those tokens' rows of the output
   matrix: a masked argmax over a gathered matrix is the argmax over the full masked logits. The
   grammar masks are computed while the model call runs (`mx.async_eval`), off the critical
   path.

Rows carry a LoRA slot (`row_slots`, see mondrian.serve.slots); every model call runs inside
`row_slots.use(<the call's rows' slots, in order>)`.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mondrian.models import upstream

NEG_INF = -float("inf")


class GenerationError(ValueError):
    """Generation cannot run as asked (DoRA layers, an unusable schema, a stalled batch)."""


@dataclass
class Generation:
    """One answer as generated: its text, generated tokens (stop token included), seconds from
    the start of its prompt processing to its last token, why it ended, the model calls it
    took (prefill included) and how many of its tokens its grammar forced."""

    text: str
    tokens: int = 0
    latency_s: float | None = None
    finish_reason: str | None = None
    model_calls: int = 0
    forced: int = 0
    prefix_hit: int = 0  # prompt tokens whose KV state came from the prefix cache


class RowSlotChooser(Protocol):
    """What a `Decoder` tells which LoRA slot each row of a model call uses
    (`mondrian.serve.slots.RowSlots`)."""

    def use(self, slots: list[int]) -> AbstractContextManager: ...


@dataclass
class DecodeOptions:
    """The decoder's speed-ups, each one switchable (tests and benchmarks compare on/off)."""

    fast_forward: bool = True  # append grammar-forced tokens without a model call of their own
    # project onto the allowed tokens' rows only when a call's rows allow <= this many together
    # (0: never); 8,192: where one gathered row stops being cheaper than the full projection
    # on SmolLM2 here (scripts/bench_latency.py --parts crossover)
    gather_max: int = 8192
    overlap: bool = True  # compute grammar masks while the model call runs


class PrefixCache:
    """KV states of prompts already processed, per cache key (a LoRA version changes k/v, so
    its prompts are cached apart), least recently used dropped first beyond `max_bytes`. A
    lookup returns the longest common prefix of the prompt with any cached prompt of the
    same key (the system prompt, the chat template's opening, ...): what mlx_lm.server's
    prompt cache does, per version."""

    def __init__(self, max_bytes: int = 256 << 20):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[int, tuple[Hashable, np.ndarray, list, int]] = OrderedDict()
        self._next = 0
        self.bytes = 0
        self.hits = self.misses = 0
        self.hit_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key: Hashable, prompt: list[int]) -> tuple[int, list | None]:
        """(n, per-layer (keys, values) of the first n tokens) for the longest cached prefix of
        `prompt` under `key`, at most len(prompt) - 1 (the last token's logits are needed);
        (0, None) on a miss."""
        want = np.asarray(prompt, dtype=np.int64)
        best, best_n = None, 0
        for eid, (k, tokens, _, _) in self._entries.items():
            if k != key:
                continue
            m = min(len(tokens), len(want) - 1)
            diff = np.flatnonzero(tokens[:m] != want[:m])
            n = int(diff[0]) if diff.size else m
            if n > best_n:
                best, best_n = eid, n
        if best is None:
            self.misses += 1
            return 0, None
        self._entries.move_to_end(best)
        self.hits += 1
        self.hit_tokens += best_n
        kv = self._entries[best][2]
        return best_n, [(k[:, :, :best_n, :], v[:, :, :best_n, :]) for k, v in kv]

    def covers(self, key: Hashable, prompt: list[int]) -> bool:
        """Whether a cached prompt of `key` starts with all of `prompt`."""
        tokens = np.asarray(prompt, dtype=np.int64)
        return any(k == key and len(cached) >= len(tokens) and np.array_equal(cached[:len(tokens)], tokens)
                   for k, cached, _, _ in self._entries.values())

    def insert(self, key: Hashable, prompt: list[int], kv: list) -> None:
        """Keep `prompt`'s KV state unless a cached prompt of `key` already starts with it."""
        if self.covers(key, prompt):
            return
        tokens = np.asarray(prompt, dtype=np.int64)
        size = sum(k.nbytes + v.nbytes for k, v in kv)
        if size > self.max_bytes:
            return
        self._entries[self._next] = (key, tokens, kv, size)
        self._next += 1
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, _, _, dropped) = self._entries.popitem(last=False)
            self.bytes -= dropped

    def drop(self, key: Hashable) -> int:
        """Forget every prompt of `key` (its version was loaded again or unloaded)."""
        gone = [eid for eid, e in self._entries.items() if e[0] == key]
        for eid in gone:
            self.bytes -= self._entries.pop(eid)[3]
        return len(gone)

    def stats(self) -> dict:
        return {"entries": len(self), "bytes": self.bytes, "hits": self.hits, "misses": self.misses,
                "hit_tokens": self.hit_tokens}


def gathered_argmax(h: mx.array, weight: mx.array, allowed: np.ndarray) -> tuple[np.ndarray, mx.array]:
    """The greedy choice among the `allowed` tokens for hidden state `h` (hidden,), from only
    their rows of the output matrix `weight` (vocab, hidden): (the allowed ids, the lazy
    position of the best among them). Nothing allowed: the first id 0 (the answer's contract
    check fails it, as the full projection's all -inf logits would)."""
    ids = np.flatnonzero(allowed)
    if ids.size == 0:
        ids = np.zeros(1, dtype=np.int64)
    return ids, mx.argmax(h @ weight[mx.array(ids)].T)


@dataclass
class _Row:
    tag: Any
    prompt: list[int]
    max_tokens: int
    processor: Callable | None
    slot: int
    key: Hashable
    tokens: list[int] = field(default_factory=list)  # generated, stop token excluded
    pending: list[int] = field(default_factory=list)  # fed to the next model call
    calls: int = 0
    forced: int = 0
    hit: int = 0
    start: float = 0.0
    peak: int = 0
    finish: str | None = None

    @property
    def guided(self) -> bool:
        return hasattr(self.processor, "allowed")


class Decoder:
    """A running continuous batch of up to `batch_size` rows; rows can be added at any time and
    a finished row's place goes to the next one. `step()` returns the rows that finished, as
    (tag, Generation, most rows decoded together while it decoded). Stop tokens are the
    tokenizer's EOS ids. A row's processor is either a guide (`feed`/`forced`/`allowed`:
    mondrian.models.constrained) or an mlx-lm logits processor `fn(context, logits)`."""

    def __init__(self, model: nn.Module, tokenizer: Any, batch_size: int = 16,
                 row_slots: RowSlotChooser | None = None, prefix_cache: PrefixCache | None = None,
                 options: DecodeOptions | None = None):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.options = options or DecodeOptions()
        self._row_slots = row_slots
        self.prefix_cache = prefix_cache
        self._stop = set(tokenizer.eos_token_ids)
        self._stream = upstream.decode_stream()
        split = upstream.split_head(model)
        self._body, self._head, self._weight = split if split else (None, None, None)
        self._rows: dict[int, _Row] = {}  # uid -> row, added and not finished
        self._waiting: deque[int] = deque()
        self._running: list[int] = []  # uids in batch-cache row order
        self._cache: list = []
        self._next_uid = 0
        self.steps = 0  # decode calls (prefills not counted)
        self.row_steps = 0  # rows decoded, summed over decode calls

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, prompt: list[int], max_tokens: int, processor: Callable | None = None, tag: Any = None,
            slot: int = 0, cache_key: Hashable = None) -> None:
        """Queue a row; it starts at the next step. `slot`: its LoRA slot (with `row_slots`);
        `cache_key`: whose prefix-cache entries it may use and fill, e.g. its LoRA version
        (rows with different weights must have different keys; default: its slot)."""
        if not prompt:
            raise GenerationError("an empty prompt")
        if max_tokens < 1:
            raise GenerationError(f"max_tokens {max_tokens}: a row generates at least one token")
        uid, self._next_uid = self._next_uid, self._next_uid + 1
        key = cache_key if cache_key is not None else ("slot", slot)
        self._rows[uid] = _Row(tag, list(prompt), max_tokens, processor, slot, key)
        self._waiting.append(uid)

    def step(self) -> list[tuple[Any, Generation, int]]:
        if not self._rows:
            return []
        with mx.stream(self._stream):
            done = self._call(self._running, self._cache) if self._running else []
            done += self._start_waiting()
        self._running = [u for u in self._running if u in self._rows]
        if not self._running and self._rows and not self._waiting:
            raise GenerationError(f"generation stalled with {len(self._rows)} rows unfinished")
        return done

    # ---- a model call over some rows

    def _slots_for(self, uids: list[int]) -> AbstractContextManager:
        if self._row_slots is None:
            return nullcontext()
        return self._row_slots.use([self._rows[u].slot for u in uids])

    def _call(self, uids: list[int], cache: list, prefill: bool = False) -> list[tuple[Any, Generation, int]]:
        """Feed each row's pending tokens (right-padded to the longest) through the model and
        choose each row's next token from its last position; returns the rows that finished
        (and drops them from `cache`)."""
        rows = [self._rows[u] for u in uids]
        lens = [len(r.pending) for r in rows]
        width = max(lens)
        ragged = min(lens) < width
        inputs = mx.array([r.pending + [0] * (width - n) for r, n in zip(rows, lens, strict=True)])
        if ragged:
            upstream.pad_right(cache, [width - n for n in lens])
        with self._slots_for(uids):
            if self._body is not None:
                h = self._body(inputs, cache=cache)
                last = h[mx.arange(len(rows)), mx.array(lens) - 1]  # (B, hidden)
            else:
                logits = self.model(inputs, cache=cache)
                last = logits[mx.arange(len(rows)), mx.array(lens) - 1]  # (B, vocab)
        if ragged:
            upstream.unpad(cache)
        if self.options.overlap:
            mx.async_eval(last)
        masks = [r.processor.allowed(self._width()) if r.guided else None for r in rows]
        chosen = self._choose(rows, last, masks)
        if prefill and self.prefix_cache is not None:
            for i, row in enumerate(rows):
                if not self.prefix_cache.covers(row.key, row.prompt):
                    kv = upstream.row_kv(cache, i)
                    mx.async_eval(kv)  # copied now, off the critical path; the batch buffer is not held
                    self.prefix_cache.insert(row.key, row.prompt, kv)
        if not prefill:
            self.steps += 1
            self.row_steps += len(rows)
            if self.steps % 512 == 0:
                mx.clear_cache()  # as mlx-lm's BatchGenerator does
        now = time.perf_counter()
        done, keep = [], []
        for i, (row, token) in enumerate(zip(rows, chosen, strict=True)):
            row.calls += 1
            row.peak = max(row.peak, len(rows))
            row.pending = []
            self._take(row, token, forced=False)
            if row.finish is None and self.options.fast_forward and row.guided:
                self._fast_forward(row)
            if row.finish is None:
                keep.append(i)
                continue
            del self._rows[uids[i]]
            gen = Generation(self.tokenizer.decode(row.tokens), len(row.tokens) + (row.finish == "stop"),
                             now - row.start, row.finish, row.calls, row.forced, row.hit)
            done.append((row.tag, gen, row.peak))
        if len(keep) < len(rows) and keep:
            upstream.keep_rows(cache, keep)
        if not prefill:
            self._cache = cache if keep else []
        return done

    def _width(self) -> int:
        if self._weight is not None:
            return int(self._weight.shape[0])
        return int(self.model.args.vocab_size)

    def _choose(self, rows: list[_Row], last: mx.array, masks: list[np.ndarray | None]) -> list[int]:
        """Each row's greedy token from its last position: gathered projections when every row
        is guided and they allow few tokens together, else one full projection (masked where
        guided); one eval."""
        picks: list = [None] * len(rows)
        full = []
        gather_max = self.options.gather_max if self._weight is not None else 0
        # One full projection serves every row of the call for about the price of one (it reads
        # the whole matrix once), so rows are gathered only when all of them are and the rows
        # they read together stay under the measured crossover.
        if gather_max and all(m is not None for m in masks) and sum(int(m.sum()) for m in masks) <= gather_max:
            picks = [gathered_argmax(last[i], self._weight, m) for i, m in enumerate(masks)]
        else:
            full = list(range(len(rows)))
        if full:
            sel = mx.array(full)
            logits = self._head(last[sel]) if self._body is not None else last[sel]
            if any(rows[i].processor is not None and not rows[i].guided for i in full):
                logits = self._plain_processors(rows, full, logits)
            if any(masks[i] is not None for i in full):
                allow = np.ones((len(full), logits.shape[-1]), dtype=bool)
                for j, i in enumerate(full):
                    if masks[i] is not None:
                        allow[j] = False
                        allow[j, :masks[i].size] = masks[i]
                logits = mx.where(mx.array(allow), logits, mx.array(NEG_INF, dtype=logits.dtype))
            best = mx.argmax(logits, axis=-1)
            for j, i in enumerate(full):
                picks[i] = (None, best[j])
        mx.eval([p[1] for p in picks])
        return [int(p[1].item()) if p[0] is None else int(p[0][p[1].item()]) for p in picks]

    def _plain_processors(self, rows: list[_Row], full: list[int], logits: mx.array) -> mx.array:
        """Rows with an mlx-lm logits processor: it sees the row's context and its logits."""
        out = []
        for j, i in enumerate(full):
            row, one = rows[i], logits[j:j + 1]
            if row.processor is not None and not row.guided:
                one = row.processor(mx.array(row.prompt + row.tokens), one)
            out.append(one)
        return mx.concatenate(out, axis=0)

    def _take(self, row: _Row, token: int, forced: bool) -> None:
        """Append `token` to the row (or end it); it is fed to the next model call."""
        if token in self._stop:
            row.finish = "stop"
            return
        row.tokens.append(token)
        row.pending.append(token)
        row.forced += forced
        if row.guided:
            row.processor.feed([token])
        if len(row.tokens) >= row.max_tokens:
            row.finish = "length"

    def _fast_forward(self, row: _Row) -> None:
        """Append every token the row's grammar forces next."""
        while row.finish is None:
            token = row.processor.forced()
            if token is None:
                return
            if token in self._stop:
                row.forced += 1
            self._take(row, token, forced=True)

    # ---- starting rows

    def _start_waiting(self) -> list[tuple[Any, Generation, int]]:
        room = self.batch_size - len(self._running)
        uids = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
        if not uids:
            return []
        t = time.perf_counter()
        prefixes = []
        for u in uids:
            row = self._rows[u]
            row.start = t
            n, kv = self.prefix_cache.lookup(row.key, row.prompt) if self.prefix_cache else (0, None)
            row.hit = n
            row.pending = row.prompt[n:]
            prefixes.append(kv)
        cache = upstream.batch_cache(self.model, prefixes)
        done = self._call(uids, cache, prefill=True)
        live = [u for u in uids if u in self._rows]
        if live:
            self._cache = upstream.join(self._cache, cache)
            self._running += live
        return done

    def tags(self) -> list:
        return [row.tag for row in self._rows.values()]

    def clear(self) -> None:
        self._rows.clear()
        self._waiting.clear()
        self._running, self._cache = [], []

    def close(self) -> None:
        mx.synchronize(self._stream)
