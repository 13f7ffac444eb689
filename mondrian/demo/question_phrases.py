"""Phrase builders for fit-query questions: each phrase is its text plus the answer fields that
text implies, so a question composed from phrases has a right answer by construction.

    compose("search", technology("wind"), "sites", capacity_min(100), place("berkshire"))
    -> ("wind sites over 100kw in berkshire",
        {"query_type": "search", "technology": "Wind", "capacity_min_kw": 100,
         "postcode_patterns": ["RG", "SL"]})
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal

from mondrian.demo.fit_vocabulary import (
    FIELD_ORDER,
    KW_UNITS,
    PLACES,
    POSTCODE_AREAS,
    SIZE_CLASSES,
    TECHNOLOGY_SYNONYMS,
    Fields,
)

Phrase = tuple[str, Fields]  # (text, answer fields the text implies)
Part = str | Phrase  # a bare string implies nothing

_TECH_KEYS = {k.lower(): v for k, v in TECHNOLOGY_SYNONYMS.items()}
_PLACE_KEYS = {k.lower(): k for k in PLACES}


# --- phrase builders -------------------------------------------------------------------------


def technology(word: str) -> Phrase:
    return word, {"technology": _TECH_KEYS[word.lower()]}


def _join(words: Sequence[str], joiner: str, repeat: bool = False) -> str:
    """"a, b and c"; with `repeat`, the joiner between every pair: "a vs b vs c"."""
    if len(words) == 1:
        return words[0]
    if repeat:
        return f" {joiner} ".join(words)
    return f"{', '.join(words[:-1])} {joiner} {words[-1]}"


def technologies(words: Sequence[str], joiner: str = "and", repeat: bool = False) -> Phrase:
    """Two or more technologies in the order mentioned: "wind and solar", "AD vs CHP",
    "solar vs AD vs CHP" (`repeat`)."""
    canon = [_TECH_KEYS[w.lower()] for w in words]
    if len(set(canon)) != len(canon) or len(canon) < 2:
        raise ValueError(f"need >= 2 distinct technologies, got {words}")
    return _join(words, joiner, repeat), {"technologies": canon}


def excluding(words: Sequence[str], lead: str = "excluding", joiner: str = "and") -> Phrase:
    """Ruled-out technologies: "excluding wind and hydro"; a lead ending in "-" glues onto
    each word ("non-wind", "non-hydro non-wind", "non-wind and non-solar")."""
    canon = [_TECH_KEYS[w.lower()] for w in words]
    if len(set(canon)) != len(canon):
        raise ValueError(f"repeated technology in {words}")
    if lead.endswith("-"):
        sep = {" ": " ", ",": ", "}.get(joiner, f" {joiner} ")
        return sep.join(f"{lead}{w}" for w in words), {"exclude_technologies": canon}
    return f"{lead} {_join(words, joiner)}", {"exclude_technologies": canon}


def place(name: str, prep: str = "in") -> Phrase:
    areas = PLACES[_PLACE_KEYS[name.lower()]]
    return f"{prep} {name}".strip(), {"postcode_patterns": list(areas)}


def postcode_areas(codes: Sequence[str], template: str = "in the {} postcode area") -> Phrase:
    """Explicit areas: template gets the codes joined with "or" ("RG or SL")."""
    bad = [c for c in codes if c.upper() not in POSTCODE_AREAS]
    if bad or len(set(codes)) != len(codes):
        raise ValueError(f"bad postcode areas {codes}")
    return template.format(_join(codes, "or")), {"postcode_patterns": [c.upper() for c in codes]}


def to_kw(value: str | int | float, unit: str) -> int | float:
    """kW or MW amount -> kW; Decimal keeps 1.1 MW at exactly 1100, ints when whole."""
    kw = Decimal(str(value)) * KW_UNITS[unit.strip().lower()]
    return int(kw) if kw == kw.to_integral_value() else float(kw)


def _bound(word: str, amount: str) -> str:
    """"over 5mw", or with a template word, "5mw and up" ("{} and up")."""
    return word.format(amount) if "{}" in word else f"{word} {amount}"


def capacity_min(value: str | int | float, unit: str = "kw", word: str = "over") -> Phrase:
    return _bound(word, f"{value}{unit}"), {"capacity_min_kw": to_kw(value, unit)}


def capacity_max(value: str | int | float, unit: str = "kw", word: str = "under") -> Phrase:
    return _bound(word, f"{value}{unit}"), {"capacity_max_kw": to_kw(value, unit)}


RANGE_STYLES = {  # capacity range phrasings
    "between": "between {lo} and {hi}",
    "from": "from {lo} to {hi}",
    "dash": "{lo}-{hi}",
    "to": "{lo} to {hi}",
}


def capacity_between(
    lo: str | int | float,
    hi: str | int | float,
    unit: str = "kw",
    lo_unit: str = "",
    style: str = "between",
) -> Phrase:
    """A range; the unit is written once at the end unless lo_unit is given ("500kw and 2mw")."""
    lo_kw, hi_kw = to_kw(lo, lo_unit or unit), to_kw(hi, unit)
    if not lo_kw < hi_kw:
        raise ValueError(f"empty range {lo}{lo_unit or unit}..{hi}{unit}")
    text = RANGE_STYLES[style].format(lo=f"{lo}{lo_unit}", hi=f"{hi}{unit}")
    return text, {"capacity_min_kw": lo_kw, "capacity_max_kw": hi_kw}


def size(word: str) -> Phrase:
    return word, dict(SIZE_CLASSES[word.lower()])


def fit_id(number: str | int, label: str = "fit id") -> Phrase:
    return f"{label} {number}", {"fit_id": str(number)}


def aggregation(kind: str, text: str) -> Phrase:
    return text, {"aggregation": kind}


def regional(text: str = "regional") -> Phrase:
    return text, {"include_regional": True}


def revenue(text: str = "revenue") -> Phrase:
    return text, {"include_revenue": True}


def compose(query_type: str, *parts: Part) -> tuple[str, Fields]:
    """Join the parts' texts into a question and merge their fields into the answer."""
    texts: list[str] = []
    fields: Fields = {"query_type": query_type}
    for part in parts:
        text, implied = (part, {}) if isinstance(part, str) else part
        texts.append(text)
        for key, value in implied.items():
            if key in fields:  # two phrases claiming one field is a template bug
                raise ValueError(f"field {key!r} set twice in {parts}")
            fields[key] = value
    question = " ".join(" ".join(texts).split()).replace(" ,", ",")  # a "," part ends a word
    return question, {k: fields[k] for k in FIELD_ORDER if k in fields}
