"""Contract-constrained decoding: an advisor's JSON Schema as per-row logits processors.

llguidance compiles the schema (rewritten by `grammar_schema` into what it implements) and
masks every token that would leave it. Two rules llguidance does not implement are ours:
- uniqueItems on arrays of strings: a token that would close an item equal to one already in
  the list is masked, so a list cannot loop ("KW","KY","KW",...);
- a length cap per list (`max_items`: from the contract's maxItems, else from the data, e.g.
  the longest list in the training split), written into the grammar as maxItems.
Used by evaluation and the service alike, so an evaluated answer and a served one are decoded
under the same rules.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import llguidance
import llguidance.numpy as lnp
import mlx.core as mx
import numpy as np

from mondrian.models.decode import GenerationError

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


def unique_string_arrays(schema: dict) -> set[str]:
    """Top-level properties (also inside anyOf branches) that are arrays of strings with
    uniqueItems: the lists whose repeats the processor masks."""
    out: set[str] = set()
    for node in [schema, *(schema.get("anyOf") or [])]:
        for name, sub in (node.get("properties") or {}).items():
            if isinstance(sub, dict) and sub.get("type") == "array" and sub.get("uniqueItems") \
                    and (sub.get("items") or {}).get("type", "string") == "string":
                out.add(name)
    return out


def list_caps(answers: Iterable[dict]) -> dict[str, int]:
    """The longest list per top-level field over `answers` (e.g. a training split's): a cap the
    data justifies when the contract gives none."""
    caps: dict[str, int] = {}
    for obj in answers:
        for key, value in obj.items():
            if isinstance(value, list):
                caps[key] = max(caps.get(key, 0), len(value))
    return caps


def with_caps(schema: dict, max_items: Mapping[str, int]) -> dict:
    """`schema` with maxItems on the named top-level arrays (never loosening the contract's)."""
    s = copy.deepcopy(schema)
    props = s.get("properties") or {}
    for name, cap in max_items.items():
        sub = props.get(name)
        if isinstance(sub, dict) and sub.get("type") == "array":
            sub["maxItems"] = min(int(cap), sub.get("maxItems", int(cap)))
    return s


def open_list(text: str) -> tuple[str | None, list[str], str | None]:
    """Where a compact JSON object prefix stands: (the top-level key whose array of strings the
    text is inside, its items so far, the unfinished item's characters or None between items).
    (None, [], None) outside such an array. The prefix is grammar-conforming JSON, so a
    small scanner is enough; escapes inside items are kept as written."""
    key = last = None
    depth, items, buf, in_str, esc = 0, [], None, False, False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
                if depth == 2:
                    items.append(buf)
                elif depth == 1:
                    last = buf
                buf = None
                continue
            if buf is not None:
                buf += ch
        elif ch == '"':
            in_str, buf = True, ""
        elif ch in "[{":
            depth += 1
            if depth == 2 and ch == "[":
                key, items = last, []
        elif ch in "]}":
            depth -= 1
            key = None if depth < 2 else key
    if depth != 2 or key is None:
        return None, [], None
    return key, items, (buf if in_str else None)


class SchemaConstraint:
    """JSON-Schema-constrained decoding with llguidance, as mlx-lm logits processors.

    The grammar comes from the advisor's schema through `grammar_schema` (conditionals and
    exclusions as anyOf branches), compact (no whitespace, "," and ":"), so a constrained
    answer is written exactly as `Advisor.render` writes training answers. uniqueItems on
    lists of strings is enforced by the processor (see the module docstring); `max_items`
    caps list lengths. The mask is llguidance's bitmask computed into a numpy array and
    applied with `mx.where`: no Metal kernel, so it runs on Linux (CPU) as well as on a Mac.
    One `processor()` per row: each holds its own matcher state.
    """

    OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":", "lenient": True}

    def __init__(self, schema: dict, tokenizer: Any, max_items: Mapping[str, int] | None = None):
        import llguidance.hf  # noqa: PLC0415 - heavy: imports transformers (~1 s)

        hf = getattr(tokenizer, "_tokenizer", tokenizer)
        eos = sorted(tokenizer.eos_token_ids) if hasattr(tokenizer, "eos_token_ids") else None
        self.lltok = llguidance.hf.from_tokenizer(hf, eos_token=eos[0] if eos and len(eos) == 1 else eos)
        self.schema, self.rewrites = grammar_schema(with_caps(schema, max_items or {}))
        self.grammar = llguidance.LLMatcher.grammar_from_json_schema(self.schema, overrides=self.OPTIONS)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(self.grammar, self.lltok)
        if is_error:
            raise GenerationError(f"llguidance cannot compile the schema: {messages[0] if messages else '?'}")
        # llguidance warns that it ignores uniqueItems; for lists of strings the processor holds it
        self.unique = unique_string_arrays(self.schema)
        self.warnings = [m for m in messages if not (self.unique and "uniqueItems" in m)]
        self.vocab = self.lltok.vocab_size
        self.eos = eos or [self.lltok.eos_token]
        self.decode = tokenizer.decode
        # per unique list: its enum (an item can only become one of these) or None (a pattern)
        self.enums = {k: _item_enum(self.schema, k) for k in self.unique}
        self.texts: list[str] = []  # every token's text, by id
        self.plain = np.zeros(self.vocab, dtype=bool)  # tokens with no '"' (an item goes on)
        if self.unique:
            self._index_tokens(hf)

    def _index_tokens(self, hf: Any) -> None:
        """Every token's text, once (~0.6 s for a 49k vocabulary)."""
        self.texts = [""] * self.vocab
        vocab = hf.get_vocab() if hasattr(hf, "get_vocab") else {}
        ids = [i for i in vocab.values() if i < self.vocab]
        for i, text in zip(ids, hf.batch_decode([[i] for i in ids]), strict=True):
            self.texts[i] = text
            self.plain[i] = '"' not in text
        self.plain[[e for e in self.eos if e < self.vocab]] = False

    def processor(self) -> Callable:
        return _MaskProcessor(llguidance.LLMatcher(self.lltok, self.grammar, log_level=0), self)


def _item_enum(schema: dict, key: str) -> list[str] | None:
    """The enum of list `key`'s items (in any anyOf branch), or None."""
    for node in [schema, *(schema.get("anyOf") or [])]:
        items = ((node.get("properties") or {}).get(key) or {}).get("items")
        if isinstance(items, dict) and isinstance(items.get("enum"), list):
            return [str(v) for v in items["enum"]]
    return None


def item_after(partial: str | None, text: str) -> tuple[str, bool] | None:
    """The list item a token writes: (its text so far, whether the token closes it), given the
    unfinished item (`partial`) or None between items; None if the token writes no item."""
    if partial is None:
        text = text.lstrip(",")
        if not text.startswith('"'):
            return None
        text = text[1:]
        partial = ""
    if '"' in text:
        return partial + text.split('"', 1)[0], True
    return partial + text, False


class _MaskProcessor:
    """A per-row logits processor: feeds the row's new tokens to its matcher, then keeps only
    the tokens the grammar allows (EOS once the object is complete), less those that would
    repeat an item of a uniqueItems list."""

    def __init__(self, matcher, constraint: SchemaConstraint):
        self.matcher, self.c = matcher, constraint
        self.vocab, self.eos = constraint.vocab, constraint.eos
        self.seen: int | None = None  # context length already fed to the matcher
        self.answer: list[int] = []  # the row's generated tokens (for the list scanner)
        self.words = np.zeros((1, (self.vocab + 31) // 32), dtype=np.int32)
        self.failed: str | None = None

    def _grammar_mask(self, words: np.ndarray) -> np.ndarray:
        """The tokens the matcher allows next, as a bool vector over the vocabulary."""
        lnp.fill_next_token_bitmask(self.matcher, words, 0)
        return np.unpackbits(words.view(np.uint8), bitorder="little").astype(bool)[: self.vocab]

    def _allowed(self, width: int):
        if self.matcher.is_error():
            allowed = np.zeros(width, dtype=bool)
            allowed[[e for e in self.eos if e < width]] = True  # end the answer; the contract check will fail it
            return allowed
        bits = self._grammar_mask(self.words)
        if width > bits.size:  # the model's output layer can be wider than the tokenizer
            bits = np.concatenate([bits, np.zeros(width - bits.size, dtype=bool)])
        bits = bits[:width]
        if self.c.unique and self.answer:
            key, items, partial = open_list(self.c.decode(self.answer))
            if key in self.c.unique and items:
                banned = [t for t in np.flatnonzero(bits) if self._repeats(t, key, items, partial)]
                bits[banned] = False
                if not bits.any():  # nothing left but repeats: end the answer; the contract fails it
                    bits[[e for e in self.eos if e < width]] = True
        return bits

    def _repeats(self, token: int, key: str, items: list[str], partial: str | None) -> bool:
        """Whether `token` closes an item equal to one in `items`, or leaves an unfinished item
        that can only end as one: every enum value it can still become is taken, or (a pattern)
        it equals a taken item and the grammar lets it only close."""
        after = item_after(partial, self.c.texts[token]) if token < len(self.c.texts) else None
        if after is None:
            return False
        item, closed = after
        if closed:
            return item in items
        enum = self.c.enums.get(key)
        if enum is not None:
            could = [v for v in enum if v.startswith(item)]
            return bool(could) and all(v in items for v in could)
        return item in items and self._only_closes_after(token)

    def _only_closes_after(self, token: int) -> bool:
        """Whether, after `token`, the grammar allows no token that continues the item."""
        if not self.matcher.consume_token(token):
            return False
        try:
            nxt = self._grammar_mask(np.zeros_like(self.words))
            return not (nxt & self.c.plain[: nxt.size]).any()
        finally:
            self.matcher.rollback(1)

    # ---- the protocol `decode.Decoder` drives (no logits needed to know the mask)

    def feed(self, tokens: list[int]) -> None:
        """The row's next tokens (chosen by the model or forced), in order."""
        self.answer += tokens
        if not self.matcher.consume_tokens(tokens) and self.failed is None:
            self.failed = self.matcher.get_error()

    def allowed(self, width: int) -> np.ndarray:
        """The tokens allowed next, as a bool vector of `width` (the model's output size)."""
        return self._allowed(width)

    def forced(self) -> int | None:
        """The one token the rules allow next, or None when there is a choice (or the grammar
        is in error: `allowed` then ends the answer). A forced token is what greedy decoding
        under `allowed` picks whatever the logits say, so appending it without a model step
        changes no answer. Cheap: one grammar mask, and the repeat check for that one token."""
        if self.matcher.is_error():
            return None
        lnp.fill_next_token_bitmask(self.matcher, self.words, 0)
        words = self.words.view(np.uint32)[0]
        nz = np.flatnonzero(words)
        if nz.size != 1:
            return None
        word = int(words[nz[0]])
        if word & (word - 1):
            return None
        token = int(nz[0]) * 32 + word.bit_length() - 1
        if token >= self.vocab:
            return None
        if self.c.unique and self.answer and token not in self.eos:
            key, items, partial = open_list(self.c.decode(self.answer))
            if key in self.c.unique and items and self._repeats(token, key, items, partial):
                return None  # the repeat is masked: `allowed` decides what remains
        return token

    def __call__(self, context, logits):
        n = int(context.shape[-1])
        if self.seen is None:
            self.seen = n  # the first call sees the prompt only
        elif n > self.seen:
            new = context.reshape(-1)[self.seen:].tolist()
            self.seen = n
            self.answer += new
            if not self.matcher.consume_tokens(new) and self.failed is None:
                self.failed = self.matcher.get_error()
        allowed = mx.array(self._allowed(logits.shape[-1]))
        return mx.where(allowed, logits, mx.array(-math.inf, dtype=logits.dtype))
