"""How a typed input is shown to the model: amounts in one unit, misspelt words mended.

Two optional settings of a text advisor's YAML, both pinned with its prompt (PROMPT_FILE), since
they change the text a model is taught on:

- `input_units: {to: kw, factors: {kw: 1, mw: 1000, megawatts: 1000, ...}}`: number words
  become digits (text2num: "three megawatt" -> "3 megawatt"), then every amount with a listed
  unit is shown in `to` ("1.5 MW" -> "1500 kw", "between 0.5 and 1.2mw" -> "between 500 and
  1200 kw", "1,500 kW" -> "1500 kw"). A small model copies digits well and multiplies them
  badly: "0.5mw or less" came out as 5000 (README, Training).
- `input_spelling: true`: a word that is in at most one of the retrieval index's questions and
  is not an English word (symspellpy's list) is replaced by a word one edit away (symspellpy,
  Damerau-OSA) that is in at least MIN_COUNT of them: "lincolnshre" -> "lincolnshire", "kenf"
  -> "kent", while "lower" or "notts" stay as typed. Among words one edit away, a letter
  dropped or doubled wins over one changed ("wnd" -> "wind", not "and"), then the commoner
  word. The words are the index's, so the speller travels with the version, and a place only
  newly linked jobs name is known once it is in MIN_COUNT of their questions (reindex).

- `input_synonyms: {max: [under, "up to", "{} or less", ...], min: [over, "{} plus", ...]}`: each
  listed phrase (any case, whole words) is shown as its canonical word; "{}" stands for an
  amount, so "100 kw or less" -> "max 100 kw". Like a search engine's synonym filter: a small
  model learns one word per meaning from all the rows that say it any way, instead of each way
  from its own few rows ("at most" was in 7 of 1,456 training questions; README, Training).

Retrieval still matches the question as typed (its character n-grams survive typos, and its
measured numbers stay true); only what the model reads is rewritten.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from functools import cache, cached_property
from importlib import resources
from typing import Any

MIN_COUNT = 4  # a word in this many indexed questions is spelt right (the demo data repeats some typos 3 times)
MIN_LENGTH = 3  # shorter words (postcode areas, "pv", "ad") are never touched
_WORD = re.compile(r"[A-Za-z]+")
_NUMBER = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d*\.\d+|\d+"


@dataclass(frozen=True)
class Units:
    """The advisor YAML's `input_units`: the unit amounts are shown in, and each unit word's
    factor to it (lower-case; matched in any case, right after the number or one space on)."""

    to: str
    factors: dict

    def to_dict(self) -> dict:
        return {"to": self.to, "factors": dict(self.factors)}

    @classmethod
    def check(cls, value: object, where: str) -> Units:
        """`value` (a YAML or PROMPT_FILE mapping) as Units; ValueError naming `where` otherwise."""
        if not isinstance(value, dict) or set(value) != {"to", "factors"}:
            raise ValueError(f"{where}: must be a mapping of to (a unit) and factors (unit: number)")
        to, factors = value["to"], value["factors"]
        if not isinstance(to, str) or not to.strip():
            raise ValueError(f"{where}: to must be a unit name such as kw")
        if not isinstance(factors, dict) or not factors:
            raise ValueError(f"{where}: factors must map unit words to numbers")
        for unit, factor in factors.items():
            if not (isinstance(unit, str) and _WORD.fullmatch(unit)):
                raise ValueError(f"{where}: factors: {unit!r} is not a word")
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
                raise ValueError(f"{where}: factors: {unit}: {factor!r} is not a positive number")
        return cls(to.strip(), {str(u).lower(): factors[u] for u in factors})

    @cached_property
    def _pattern(self) -> re.Pattern:
        return _amounts(tuple(sorted(self.factors, key=len, reverse=True)))

    def rewrite(self, text: str) -> str:
        """`text` with number words as digits and every amount in a listed unit shown in `to`."""
        from text_to_num import alpha2digit  # noqa: PLC0415 - heavy: text2num loads its language tables; only advisors with input_units pay

        text = alpha2digit(text, "en")

        def shown(m: re.Match) -> str:
            factor = Decimal(str(self.factors[m["unit"].lower()]))
            head = ""
            if m["first"] is not None:  # "0.5 and 1.2 mw": the first number takes the unit too
                head = _times(m["first"], factor) + m.string[m.end("first"):m.start("amount")]
            return head + _times(m["amount"], factor) + " " + self.to

        return self._pattern.sub(shown, text)


@cache
def _amounts(units: tuple[str, ...]) -> re.Pattern:
    return re.compile(rf"(?<![\w.,])(?:(?P<first>{_NUMBER})\s*(?:-|–|to|and)\s*)?(?P<amount>{_NUMBER})\s?"
                      rf"(?P<unit>{'|'.join(map(re.escape, units))})\b", re.IGNORECASE)


def _times(number: str, factor: Decimal) -> str:
    try:
        value = Decimal(number.replace(",", "")) * factor
    except InvalidOperation:  # the pattern only matches numbers; kept as typed all the same
        return number
    return format(value.normalize(), "f")


_AMOUNT = rf"(?P<amount>(?:{_NUMBER})(?:\s?[A-Za-z]+)?)"  # "{}" of a synonym: "100 kw", "5mw", "20"


@dataclass(frozen=True)
class Synonyms:
    """The advisor YAML's `input_synonyms`: canonical word -> the phrases shown as it."""

    table: dict

    def to_dict(self) -> dict:
        return {word: list(phrases) for word, phrases in self.table.items()}

    @classmethod
    def check(cls, value: object, where: str) -> Synonyms:
        """`value` (a YAML or PROMPT_FILE mapping) as Synonyms; ValueError naming `where` otherwise."""
        if not isinstance(value, dict) or not value:
            raise ValueError(f"{where}: must map canonical words to lists of phrases")
        seen: dict[str, str] = {}
        for word, phrases in value.items():
            if not (isinstance(word, str) and word.strip()) or "{}" in word:
                raise ValueError(f"{where}: {word!r} is not a canonical word")
            if not isinstance(phrases, list) or not phrases:
                raise ValueError(f"{where}: {word}: must be a list of phrases")
            for phrase in phrases:
                if not isinstance(phrase, str) or not phrase.replace("{}", "").strip() or phrase.count("{}") > 1:
                    raise ValueError(f"{where}: {word}: {phrase!r} is not a phrase (text, at most one {{}})")
                key = " ".join(phrase.lower().split())
                if seen.setdefault(key, word) != word:
                    raise ValueError(f"{where}: {phrase!r} is listed under both {seen[key]!r} and {word!r}")
        for word in value:  # a word shown as another would undo, or cycle
            other = seen.get(" ".join(word.lower().split()), word)
            if other != word:
                raise ValueError(f"{where}: {word!r} is a canonical word and a phrase of {other!r}")
        return cls({word.strip(): tuple(phrases) for word, phrases in value.items()})

    @cached_property
    def _pattern(self) -> tuple[re.Pattern, dict[str, str]]:
        # One alternation, longest phrase first, so "no more than" wins over "more than".
        named: dict[str, str] = {}
        parts = []
        for word, phrases in self.table.items():
            for phrase in phrases:
                name = f"p{len(named)}"
                named[name] = word
                parts.append((len(phrase), f"(?P<{name}>{_phrase(phrase, name)})"))
        body = "|".join(p for _, p in sorted(parts, key=lambda p: -p[0]))
        # Every phrase starts after a non-word character or with one (`_phrase`): saying so once
        # up front skips the positions inside words, instead of trying each phrase there.
        return re.compile(rf"(?:(?<!\w)|(?=[^\w\s]|_))(?:{body})", re.IGNORECASE), named

    def rewrite(self, text: str) -> str:
        """`text` with each listed phrase shown as its canonical word (until nothing changes)."""
        pattern, named = self._pattern

        def shown(m: re.Match) -> str:
            group = str(m.lastgroup)  # the phrase's group: it closes after its amount's
            amount = m.groupdict().get(f"{group}a")
            out = f"{named[group]} {amount}" if amount else named[group]
            before = m.string[m.start() - 1:m.start()]
            after = m.string[m.end():m.end() + 1]
            return (" " if before.isalnum() else "") + out + (" " if after.isalnum() else "")

        # A pass can leave a phrase to show ("5 5 kw max" -> "5 max 5 kw"): each moves a word
        # left past an amount, so as many passes as words reach the fixed point.
        for _ in range(len(text.split()) + 1):
            done = pattern.sub(shown, text)
            if done == text:
                break
            text = done
        return text


def _phrase(phrase: str, name: str) -> str:
    """A synonym phrase as a pattern: whole words, any spacing, "{}" an amount (group name+"a")."""
    def words(part: str) -> str:
        return r"\s+".join(map(re.escape, part.split()))

    head, _, tail = phrase.strip().partition("{}")
    body = words(head) if "{}" not in phrase else \
        r"\s*".join(p for p in (words(head), _AMOUNT.replace("amount", f"{name}a"), words(tail)) if p)
    text = phrase.strip()
    return (r"(?<!\w)" if text[0].isalnum() or text.startswith("{}") else "") + body + \
        (r"(?!\w)" if text[-1].isalnum() or text.endswith("{}") else "")


def show(text: str, *, lower: bool = False, units: Units | None = None, speller: Speller | None = None,
         synonyms: Synonyms | None = None) -> str:
    """A typed input as a model reads it: lower-cased, misspellings mended, amounts in one
    unit, then phrases as their canonical words (each step only where asked). Idempotent."""
    if lower:
        text = text.lower()
    if speller is not None:
        text = speller.mend(text)
    if units is not None:
        text = units.rewrite(text)
    if synonyms is not None:
        text = synonyms.rewrite(text)
    return text


class Speller:
    """The words of the indexed questions and how often each occurs; `mend` rewrites a text."""

    def __init__(self, questions: Iterable[str]):
        self.counts: Counter = Counter()
        for q in questions:
            self.counts.update({w.lower() for w in _WORD.findall(q)})
        self._symspell: Any = None
        self._mended: dict[str, str] = {}

    def _lookup(self) -> Any:
        if self._symspell is None:
            from symspellpy import SymSpell  # noqa: PLC0415 - heavy: symspellpy; only advisors with input_spelling pay

            self._symspell = SymSpell(max_dictionary_edit_distance=1)
            for w, n in self.counts.items():
                if n >= MIN_COUNT and len(w) >= MIN_LENGTH:
                    self._symspell.create_dictionary_entry(w, n)
        return self._symspell

    def warm(self) -> Speller:
        """Load what mending needs now (a loader does, so no request pays it)."""
        self._lookup()
        _english()
        return self

    def word(self, word: str) -> str:
        """`word` (lower-case) as the index spells it: itself unless it is rare in the index,
        not an English word, and one edit from a word common in the index."""
        if len(word) < MIN_LENGTH or self.counts[word] > 1 or word in _english():
            return word
        if word not in self._mended:
            from symspellpy import Verbosity  # noqa: PLC0415 - heavy: see _lookup

            near = self._lookup().lookup(word, Verbosity.ALL, max_edit_distance=1)
            # a letter dropped or doubled before one changed or swapped, then the commoner word
            near.sort(key=lambda s: (len(s.term) == len(word), -s.count, s.term))
            self._mended[word] = near[0].term if near else word
        return self._mended[word]

    def mend(self, text: str) -> str:
        """`text` with each word `word` would change changed (lower-case), the rest as typed."""
        def one(m: re.Match) -> str:
            got = self.word(m[0].lower())
            return m[0] if got == m[0].lower() else got

        return _WORD.sub(one, text)


@cache
def _english() -> frozenset[str]:
    """The English words symspellpy ships (82,765, from Google Books n-grams): a word in it is
    typed on purpose ("lower", "three"), however rare it is in the index."""
    words = resources.files("symspellpy") / "frequency_dictionary_en_82_765.txt"
    return frozenset(line.split(" ", 1)[0] for line in words.read_text(encoding="utf-8").splitlines())
