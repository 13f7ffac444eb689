"""Generation on an MLX model: chat prompts, batched greedy decoding, LoRA layers on/off, and
JSON-Schema-constrained decoding. Shared by evaluation (`mondrian.evaluate.run`) and the service
(`mondrian.serve.engine`), so an evaluated answer and a served answer come from the same code.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


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


def lora_layers(model) -> list:
    """The LoRA layers installed in `model` (whatever their type), in module order."""
    from mlx_lm.tuner.dora import DoRAEmbedding, DoRALinear

    found = [m for _, m in model.named_modules() if hasattr(m, "lora_a") and hasattr(m, "scale")]
    if any(isinstance(m, (DoRALinear, DoRAEmbedding)) for m in found):
        raise GenerationError("DoRA layers: scale 0 is not the base model there; evaluate LoRA adapters")
    return found


class AdapterSwitch:
    """Turns the LoRA layers of a loaded model on (their trained scale) and off (scale 0:
    bit-identical base logits) without reloading anything."""

    def __init__(self, model):
        self.layers = lora_layers(model)
        self.scales = [m.scale for m in self.layers]

    def set(self, on: bool) -> None:
        for m, s in zip(self.layers, self.scales, strict=True):
            m.scale = s if on else 0.0


def chat_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """The prompt tokens of a chat: what mlx-lm's ChatDataset masks as the prompt in training."""
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))


class Decoder:
    """A running continuous batch: greedy decoding of up to `batch_size` rows together, where
    rows can be added at any time and a finished row's slot goes to the next one (mlx-lm's
    `BatchGenerator`, with the same stop tokens as its `batch_generate`). `step()` advances
    every row by one token (and starts the prompt processing of rows added since) and returns
    the rows that finished, with per-row latency (prompt start to last token) and per-row
    logits processors (one grammar state per row)."""

    def __init__(self, model, tokenizer, batch_size: int = 16, row_slots=None):
        from mlx_lm.generate import BatchGenerator

        self.tokenizer, self.batch_size = tokenizer, batch_size
        self._slot_of: dict[int, int] = {}
        if row_slots is not None:  # a model with `lora_slots.SlotLoRALinear` layers: each row has its slot
            model = _RowSlotModel(model, row_slots, self._slot_of)
        self._gen = BatchGenerator(model, stop_tokens=[[t] for t in tokenizer.eos_token_ids],
                                   completion_batch_size=batch_size, prefill_batch_size=batch_size)
        self._rows: dict[int, dict] = {}  # uid -> tag, tokens, steps, start
        self.steps = 0  # decode steps taken
        self.row_steps = 0  # rows decoded, summed over steps (mean occupancy = row_steps / steps)

    def __len__(self) -> int:
        """Rows added and not finished."""
        return len(self._rows)

    def add(self, prompt: list[int], max_tokens: int, processor: Callable | None = None, tag: Any = None,
            slot: int = 0) -> None:
        """Queue a row; it starts at the next step. `slot`: its LoRA slot (with `row_slots`)."""
        (uid,) = self._gen.insert([list(prompt)], [max_tokens],
                                  logits_processors=[[processor] if processor else []])
        self._slot_of[uid] = slot
        self._rows[uid] = {"tag": tag, "tokens": [], "steps": 0, "start": None, "peak": 0}

    def step(self) -> list[tuple[Any, Generation, int]]:
        """One step; returns (tag, answer, most rows decoded together while it decoded) for
        each row that finished."""
        if not self._rows:
            return []
        t = time.perf_counter()
        prompt_resps, gen_resps = self._gen.next()
        now = time.perf_counter()
        if not prompt_resps and not gen_resps:
            raise GenerationError(f"generation stalled with {len(self._rows)} rows unfinished")
        for r in prompt_resps:
            row = self._rows[r.uid]
            if row["start"] is None:
                row["start"] = t
        if gen_resps:
            self.steps += 1
            self.row_steps += len(gen_resps)
        done = []
        for r in gen_resps:
            row = self._rows[r.uid]
            row["steps"] += 1
            row["peak"] = max(row["peak"], len(gen_resps))
            if r.finish_reason != "stop":
                row["tokens"].append(r.token)
            if r.finish_reason is not None:
                del self._rows[r.uid]
                self._slot_of.pop(r.uid, None)
                gen = Generation(self.tokenizer.decode(row["tokens"]), row["steps"],
                                 now - (row["start"] or t), r.finish_reason)
                done.append((row["tag"], gen, row["peak"]))
        return done

    def tags(self) -> list:
        """The tags of the rows not finished."""
        return [row["tag"] for row in self._rows.values()]

    def clear(self) -> None:
        """Forget the unfinished rows (after a failed step: their callers were told)."""
        self._rows.clear()

    def close(self) -> None:
        import mlx.core as mx

        mx.synchronize(self._gen.stream)  # the step mlx-lm already started for the rows that finished
        self._gen.close()


class _RowSlotModel:
    """The model as `BatchGenerator` sees it: each call first tells the LoRA slot layers which
    slot every row of the calling batch uses. mlx-lm's batch objects (PromptProcessingBatch,
    GenerationBatch) call `self.model(inputs, cache=...)` with their rows in `self.uids` order;
    the caller's `uids` are read from its frame, and a caller without them (an mlx-lm change)
    is an error, never a silent guess."""

    def __init__(self, model, row_slots, slot_of: dict[int, int]):
        self._model, self._rows, self._slot_of = model, row_slots, slot_of

    def __getattr__(self, name: str):  # layers, make_cache, ...: the model's own
        return getattr(self._model, name)

    def __call__(self, inputs, *args, **kwargs):
        import sys

        batch = sys._getframe(1).f_locals.get("self")
        uids = getattr(batch, "uids", None)
        if uids is None or len(uids) != inputs.shape[0]:
            raise GenerationError(f"cannot tell which rows a model call of shape {tuple(inputs.shape)} is for "
                                  f"(caller {type(batch).__name__}); mlx-lm's batching changed")
        with self._rows.use([self._slot_of[u] for u in uids]):
            return self._model(inputs, *args, **kwargs)


def generate_batch(model, tokenizer, prompts: Sequence[list[int]], *, batch_size: int = 16,
                   max_tokens: int | Sequence[int] = 256,
                   logits_processors: Sequence[Callable] | None = None,
                   progress: Callable[[int], None] | None = None,
                   row_slots=None, slots: Sequence[int] | None = None) -> tuple[list[Generation], float]:
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


MAX_BRANCHES = 64


def _tighten_arrays(node) -> None:
    """uniqueItems over an enum (or const) can hold at most that many items: say so with
    maxItems, which llguidance enforces (it does not implement uniqueItems)."""
    if isinstance(node, list):
        for x in node:
            _tighten_arrays(x)
        return
    if not isinstance(node, dict):
        return
    items = node.get("items")
    if node.get("uniqueItems") and isinstance(items, dict):
        n = len(items["enum"]) if isinstance(items.get("enum"), list) else 1 if "const" in items else None
        if n is not None:
            node["maxItems"] = min(node.get("maxItems", n), n)
    for v in node.values():
        _tighten_arrays(v)


def _conditional(entry) -> tuple[str, Any, list[str]] | None:
    """`if: {properties: {K: {const: v}}}, then: {required: [...]}` -> (K, v, required)."""
    if not isinstance(entry, dict) or set(entry) != {"if", "then"}:
        return None
    cond, then = entry["if"], entry["then"]
    if not isinstance(cond, dict) or set(cond) != {"properties"} or len(cond["properties"]) != 1:
        return None
    (key, sub), = cond["properties"].items()
    if not isinstance(sub, dict) or set(sub) != {"const"} or not isinstance(then, dict) or set(then) != {"required"}:
        return None
    return key, sub["const"], list(then["required"])


def _exclusion(entry) -> list[str] | None:
    """`not: {required: [A, B, ...]}` -> [A, B, ...] (not all of them together)."""
    if isinstance(entry, dict) and set(entry) == {"not"} and isinstance(entry["not"], dict) \
            and set(entry["not"]) == {"required"} and len(entry["not"]["required"]) >= 2:
        return list(entry["not"]["required"])
    return None


def grammar_schema(schema: dict) -> tuple[dict, list[str]]:
    """The advisor's schema rewritten into an equivalent (or tighter-where-implied) one that
    llguidance can enforce, and what was rewritten.

    - arrays: uniqueItems over an enum -> maxItems = the enum's size;
    - top-level `allOf` of `if {K: const v} then {required}` conditionals on one required enum
      discriminator K and `not {required: [A, B]}` exclusions (the fit-query contract's
      self-consistency rules) -> `anyOf` branches, one per (value of K, field left out of
      each exclusion), each with K fixed and its required fields. llguidance implements
      neither if/then nor not; the branches say the same thing in what it does implement.

    Anything else is left as it is (llguidance then ignores it leniently and the contract
    still checks it after decoding)."""
    import copy
    import itertools

    s = copy.deepcopy(schema)
    notes = []
    before = json.dumps(s, sort_keys=True)
    _tighten_arrays(s)
    if json.dumps(s, sort_keys=True) != before:
        notes.append("uniqueItems over an enum bounded by maxItems")
    all_of = s.get("allOf")
    props = s.get("properties")
    if not isinstance(all_of, list) or not isinstance(props, dict):
        return s, notes
    conds = [c for c in map(_conditional, all_of) if c]
    excls = [x for x in map(_exclusion, all_of) if x]
    rest = [e for e in all_of if not _conditional(e) and not _exclusion(e)]
    keys = {k for k, _, _ in conds}
    if len(keys) > 1 or (not conds and not excls):
        return s, notes
    values: list = [None]
    if conds:
        (key,) = keys
        enum = (props.get(key) or {}).get("enum")
        if key not in s.get("required", []) or not isinstance(enum, list) or any(v not in enum for _, v, _ in conds):
            return s, notes
        values = enum
    combos = list(itertools.product(*excls))
    if len(values) * len(combos) > MAX_BRANCHES:
        return s, notes
    common = {k: v for k, v in s.items() if k not in ("allOf", "properties", "required", "$schema", "title")}
    branches = []
    for value in values:
        required = list(s.get("required", []))
        for _key, v, req in conds:
            if v == value:
                required += [r for r in req if r not in required]
        for dropped in combos:
            if any(d in required for d in dropped):
                continue  # this branch would need a field it leaves out
            bprops = {}
            for name, sub in props.items():
                if name in dropped:
                    if s.get("additionalProperties") is not False:
                        bprops[name] = False
                    continue
                bprops[name] = ({**sub, "const": value} if conds and name == key else sub)
            branch = {**common, "properties": bprops, "required": required}
            if rest:
                branch["allOf"] = rest
            branches.append(branch)
    out = {k: s[k] for k in ("$schema", "title") if k in s} | {"anyOf": branches}
    notes.append(f"if/then and not rewritten as {len(branches)} anyOf branches")
    return out, notes


class SchemaConstraint:
    """JSON-Schema-constrained decoding with llguidance, as mlx-lm logits processors.

    The grammar comes from the advisor's schema through `grammar_schema` (conditionals and
    exclusions as anyOf branches), compact (no whitespace, "," and ":"), so a constrained
    answer is written exactly as `Advisor.render` writes training answers; keys llguidance
    still cannot enforce (uniqueItems) are listed in `warnings` and checked by the contract
    after decoding. The mask is llguidance's bitmask computed into a numpy array and applied
    with `mx.where`: no Metal kernel, so it runs on Linux (CPU) as well as on a Mac. One
    `processor()` per row: each holds its own matcher state.
    """

    OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":", "lenient": True}

    def __init__(self, schema: dict, tokenizer):
        import llguidance
        import llguidance.hf

        hf = getattr(tokenizer, "_tokenizer", tokenizer)
        eos = sorted(tokenizer.eos_token_ids) if hasattr(tokenizer, "eos_token_ids") else None
        self.lltok = llguidance.hf.from_tokenizer(hf, eos_token=eos[0] if eos and len(eos) == 1 else eos)
        self.schema, self.rewrites = grammar_schema(schema)
        self.grammar = llguidance.LLMatcher.grammar_from_json_schema(self.schema, overrides=self.OPTIONS)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(self.grammar, self.lltok)
        if is_error:
            raise GenerationError(f"llguidance cannot compile the schema: {messages[0] if messages else '?'}")
        self.warnings = list(messages)
        self.vocab = self.lltok.vocab_size
        self.eos = eos or [self.lltok.eos_token]

    def processor(self) -> Callable:
        import llguidance

        return _MaskProcessor(llguidance.LLMatcher(self.lltok, self.grammar, log_level=0), self.vocab, self.eos)


class _MaskProcessor:
    """A per-row logits processor: feeds the row's new tokens to its matcher, then keeps only
    the tokens the grammar allows (EOS once the object is complete)."""

    def __init__(self, matcher, vocab: int, eos: list[int]):
        import numpy as np

        self.matcher, self.vocab, self.eos = matcher, vocab, eos
        self.seen: int | None = None  # context length already fed to the matcher
        self.words = np.zeros((1, (vocab + 31) // 32), dtype=np.int32)
        self.failed: str | None = None

    def _allowed(self, width: int):
        import llguidance.numpy as lnp
        import numpy as np

        if self.matcher.is_error():
            allowed = np.zeros(width, dtype=bool)
            allowed[[e for e in self.eos if e < width]] = True  # end the answer; the contract check will fail it
            return allowed
        lnp.fill_next_token_bitmask(self.matcher, self.words, 0)
        bits = np.unpackbits(self.words.view(np.uint8), bitorder="little").astype(bool)[: self.vocab]
        if width > bits.size:  # the model's output layer can be wider than the tokenizer
            bits = np.concatenate([bits, np.zeros(width - bits.size, dtype=bool)])
        return bits[:width]

    def __call__(self, context, logits):
        import mlx.core as mx

        n = int(context.shape[-1])
        if self.seen is None:
            self.seen = n  # the first call sees the prompt only
        elif n > self.seen:
            new = context.reshape(-1)[self.seen:].tolist()
            self.seen = n
            if not self.matcher.consume_tokens(new) and self.failed is None:
                self.failed = self.matcher.get_error()
        allowed = mx.array(self._allowed(logits.shape[-1]))
        return mx.where(allowed, logits, mx.array(-math.inf, dtype=logits.dtype))


