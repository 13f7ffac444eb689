"""Seeded generator of fit-query examples: UK Feed-in-Tariff questions -> filter objects.

A question is composed from *phrases*; each phrase is its text plus the answer fields that text
implies, so every answer is right by construction. The phrase builders (``technology``,
``place``, ``capacity_min``, ...) and ``compose`` are public, so tests can build an exact
question from fixed slots, e.g.::

    compose("search", technology("wind"), "sites", capacity_min(100), place("berkshire"))
    -> ("wind sites over 100kw in berkshire",
        {"query_type": "search", "technology": "Wind", "capacity_min_kw": 100,
         "postcode_patterns": ["RG", "SL"]})

Size words map to fixed ranges (the bands of the original FIT plan, bounds inclusive):
small -> capacity_max_kw 50; medium -> 50..500; large / big -> capacity_min_kw 500.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

Fields = dict[str, Any]
Phrase = tuple[str, Fields]  # (text, answer fields the text implies)
Part = str | Phrase  # a bare string implies nothing

TECHNOLOGIES = ("Wind", "Photovoltaic", "Hydro", "Anaerobic digestion", "Micro CHP")

TECHNOLOGY_SYNONYMS: dict[str, str] = {
    "wind": "Wind",
    "turbine": "Wind",
    "turbines": "Wind",
    "wind turbines": "Wind",
    "wind farm": "Wind",
    "wind farms": "Wind",
    "wind power": "Wind",
    "solar": "Photovoltaic",
    "PV": "Photovoltaic",
    "solar PV": "Photovoltaic",
    "photovoltaic": "Photovoltaic",
    "solar panels": "Photovoltaic",
    "solar farms": "Photovoltaic",
    "hydro": "Hydro",
    "hydroelectric": "Hydro",
    "hydropower": "Hydro",
    "water power": "Hydro",
    "AD": "Anaerobic digestion",
    "anaerobic": "Anaerobic digestion",
    "anaerobic digestion": "Anaerobic digestion",
    "biogas": "Anaerobic digestion",
    "CHP": "Micro CHP",
    "micro CHP": "Micro CHP",
    "combined heat and power": "Micro CHP",
}
# Plural synonyms already name the installations, so no noun ("sites") follows them.
NOUN_SYNONYMS = frozenset(
    {"turbines", "wind turbines", "wind farms", "solar panels", "solar farms"}
)

# Real UK postcode areas; answers keep each tuple's order.
PLACES: dict[str, tuple[str, ...]] = {
    "Berkshire": ("RG", "SL"),
    "Berks": ("RG", "SL"),
    "Yorkshire": ("YO", "HU", "DN", "HD", "WF", "LS", "BD"),
    "Yorks": ("YO", "HU", "DN", "HD", "WF", "LS", "BD"),
    "Scotland": tuple("AB DD DG EH FK G HS IV KA KW KY ML PA PH TD ZE".split()),
    "the Highlands": ("IV", "KW", "PH"),
    "Aberdeenshire": ("AB",),
    "Edinburgh": ("EH",),
    "Glasgow": ("G",),
    "Cornwall": ("TR", "PL"),
    "Devon": ("EX", "PL", "TQ"),
    "London": ("E", "EC", "N", "NW", "SE", "SW", "W", "WC"),
    "Wales": ("CF", "LD", "LL", "NP", "SA"),
    "Cardiff": ("CF",),
    "Kent": ("CT", "DA", "ME", "TN"),
    "Norfolk": ("NR",),
    "Suffolk": ("IP",),
    "Essex": ("CM", "CO", "SS"),
    "East Anglia": ("NR", "IP", "CB"),
    "Manchester": ("M",),
    "Greater Manchester": ("M", "BL", "OL", "SK", "WN"),
    "Birmingham": ("B",),
    "Liverpool": ("L",),
    "Leeds": ("LS",),
    "Sheffield": ("S",),
    "Bristol": ("BS",),
    "Somerset": ("BA", "TA"),
    "Dorset": ("BH", "DT"),
    "Wiltshire": ("SN", "SP"),
    "Hampshire": ("SO", "PO"),
    "Sussex": ("BN", "RH"),
    "Surrey": ("GU", "KT"),
    "Oxfordshire": ("OX",),
    "Gloucestershire": ("GL",),
    "Cambridgeshire": ("CB", "PE"),
    "Lincolnshire": ("LN", "PE"),
    "Derbyshire": ("DE",),
    "Nottinghamshire": ("NG",),
    "Leicestershire": ("LE",),
    "Shropshire": ("SY", "TF"),
    "Lancashire": ("PR", "BB", "FY", "LA"),
    "Cumbria": ("CA", "LA"),
    "Northumberland": ("NE",),
    "County Durham": ("DH", "DL"),
    "North East England": ("NE", "SR", "DH", "TS", "DL"),
    "South West England": ("TR", "PL", "EX", "TQ", "TA", "BA", "BS", "DT", "GL"),
    "Northern Ireland": ("BT",),
}
POSTCODE_AREAS: tuple[str, ...] = tuple(sorted({a for areas in PLACES.values() for a in areas}))

# Bands from the original plan: small (<50kW), medium (50-500kW), large (>500kW).
SIZE_CLASSES: dict[str, Fields] = {
    "small": {"capacity_max_kw": 50},
    "small-scale": {"capacity_max_kw": 50},
    "medium": {"capacity_min_kw": 50, "capacity_max_kw": 500},
    "medium-sized": {"capacity_min_kw": 50, "capacity_max_kw": 500},
    "large": {"capacity_min_kw": 500},
    "big": {"capacity_min_kw": 500},
    "large-scale": {"capacity_min_kw": 500},
}

MIN_WORDS = ("over", "above", "more than", "at least", "greater than", "bigger than")
MAX_WORDS = ("under", "below", "less than", "up to", "smaller than", "no more than")
_KW_UNITS = {
    "kw": 1,
    "kilowatt": 1,
    "kilowatts": 1,
    "mw": 1000,
    "megawatt": 1000,
    "megawatts": 1000,
}

FIELD_ORDER = (
    "query_type",
    "technology",
    "technologies",
    "exclude_technologies",
    "capacity_min_kw",
    "capacity_max_kw",
    "postcode_patterns",
    "fit_id",
    "aggregation",
    "include_regional",
    "include_revenue",
)

_TECH_KEYS = {k.lower(): v for k, v in TECHNOLOGY_SYNONYMS.items()}
_PLACE_KEYS = {k.lower(): k for k in PLACES}


@dataclass(frozen=True)
class Example:
    question: str
    answer: Fields
    category: str


# --- phrase builders -------------------------------------------------------------------------


def technology(word: str) -> Phrase:
    return word, {"technology": _TECH_KEYS[word.lower()]}


def _join(words: Sequence[str], joiner: str) -> str:
    if len(words) == 1:
        return words[0]
    return f"{', '.join(words[:-1])} {joiner} {words[-1]}"


def technologies(words: Sequence[str], joiner: str = "and") -> Phrase:
    """Two or more technologies in the order mentioned: "wind and solar", "AD vs CHP"."""
    canon = [_TECH_KEYS[w.lower()] for w in words]
    if len(set(canon)) != len(canon) or len(canon) < 2:
        raise ValueError(f"need >= 2 distinct technologies, got {words}")
    return _join(words, joiner), {"technologies": canon}


def excluding(words: Sequence[str], lead: str = "excluding", joiner: str = "and") -> Phrase:
    """Ruled-out technologies: "excluding wind and hydro"; a lead ending in "-" glues on
    ("non-wind")."""
    canon = [_TECH_KEYS[w.lower()] for w in words]
    if len(set(canon)) != len(canon):
        raise ValueError(f"repeated technology in {words}")
    sep = "" if lead.endswith("-") else " "
    return f"{lead}{sep}{_join(words, joiner)}", {"exclude_technologies": canon}


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
    kw = Decimal(str(value)) * _KW_UNITS[unit.strip().lower()]
    return int(kw) if kw == kw.to_integral_value() else float(kw)


def capacity_min(value: str | int | float, unit: str = "kw", word: str = "over") -> Phrase:
    return f"{word} {value}{unit}", {"capacity_min_kw": to_kw(value, unit)}


def capacity_max(value: str | int | float, unit: str = "kw", word: str = "under") -> Phrase:
    return f"{word} {value}{unit}", {"capacity_max_kw": to_kw(value, unit)}


_RANGE_STYLES = {
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
    text = _RANGE_STYLES[style].format(lo=f"{lo}{lo_unit}", hi=f"{hi}{unit}")
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
    question = " ".join(" ".join(texts).split())
    return question, {k: fields[k] for k in FIELD_ORDER if k in fields}


# --- random slot pickers ---------------------------------------------------------------------

_NOUNS = ("sites", "sites", "installations", "projects", "schemes", "systems")
_GENERIC = (
    "sites",
    "installations",
    "renewable sites",
    "FIT installations",
    "projects",
    "renewable installations",
    "generators",
)
_LEADS = (
    "",
    "",
    "",
    "show me",
    "show",
    "find",
    "find all",
    "list",
    "list all",
    "search for",
    "give me",
    "get",
    "I want",
    "looking for",
    "all",
    "are there any",
    "where are the",
)
_PREPS = ("in", "in", "in", "located in", "based in", "across", "within")
_KW_VALUES = (5, 10, 20, 25, 30, 50, 75, 100, 150, 200, 250, 300, 400, 500, 750)
_MW_VALUES = ("0.5", "1", "1.5", "2", "2.5", "3", "5", "10")
_KW_SPELLINGS = ("kw", "kw", "kW", " kw", " kW", " kilowatts")
_MW_SPELLINGS = ("mw", "MW", " MW", " mw", " megawatts")
_TECH_WORDS = tuple(TECHNOLOGY_SYNONYMS)
_ADJ_TECH_WORDS = tuple(w for w in TECHNOLOGY_SYNONYMS if w not in NOUN_SYNONYMS)


def _tech_noun(rng: random.Random) -> list[Part]:
    # Technology first, then a synonym: Wind has the most synonyms but no extra weight.
    (word,) = _distinct_techs(rng, 1)
    return [technology(word)] if word in NOUN_SYNONYMS else [technology(word), rng.choice(_NOUNS)]


def _distinct_techs(rng: random.Random, k: int, words: Sequence[str] = _TECH_WORDS) -> list[str]:
    """k synonyms naming k different technologies."""
    picked: list[str] = []
    for canon in rng.sample(TECHNOLOGIES, k):
        picked.append(rng.choice([w for w in words if TECHNOLOGY_SYNONYMS[w] == canon]))
    return picked


def _place(rng: random.Random) -> Phrase:
    return place(rng.choice(tuple(PLACES)), rng.choice(_PREPS))


def _amount(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.75:
        return str(rng.choice(_KW_VALUES)), rng.choice(_KW_SPELLINGS)
    value, unit = rng.choice(_MW_VALUES), rng.choice(_MW_SPELLINGS)
    if value == "1" and unit.endswith("s"):  # "1 megawatt", not "1 megawatts"
        unit = unit[:-1]
    return value, unit


def _capacity(rng: random.Random) -> list[Part]:
    prefix = rng.choice(("", "", "", "with capacity", "with a capacity", "rated"))
    kind = rng.random()
    if kind < 0.4:
        phrase = capacity_min(*_amount(rng), word=rng.choice(MIN_WORDS))
    elif kind < 0.75:
        phrase = capacity_max(*_amount(rng), word=rng.choice(MAX_WORDS))
    elif rng.random() < 0.8:
        lo, hi = sorted(rng.sample(_KW_VALUES, 2))
        phrase = capacity_between(
            lo, hi, rng.choice(_KW_SPELLINGS), style=rng.choice(tuple(_RANGE_STYLES))
        )
    else:  # mixed units: "between 500kw and 2mw"
        lo_unit, hi_unit = rng.choice(_KW_SPELLINGS), rng.choice(_MW_SPELLINGS)
        phrase = capacity_between(
            rng.choice((250, 500, 750)), rng.choice(("1.5", "2", "5")), hi_unit, lo_unit
        )
    return [prefix, phrase]


# --- category templates: rng -> (question, answer) ---------------------------------------------


def _t_technology(rng: random.Random) -> tuple[str, Fields]:
    return compose("search", rng.choice(_LEADS), *_tech_noun(rng))


def _t_location(rng: random.Random) -> tuple[str, Fields]:
    subject: list[Part] = _tech_noun(rng) if rng.random() < 0.7 else [rng.choice(_GENERIC)]
    if rng.random() < 0.2:  # "Cornwall solar sites"
        name = rng.choice(tuple(PLACES))
        return compose("search", rng.choice(_LEADS), place(name, prep=""), *subject)
    return compose("search", rng.choice(_LEADS), *subject, _place(rng))


def _t_postcode(rng: random.Random) -> tuple[str, Fields]:
    subject: list[Part] = _tech_noun(rng) if rng.random() < 0.6 else [rng.choice(_GENERIC)]
    codes = rng.sample(POSTCODE_AREAS, rng.choice((1, 1, 2)))
    templates = ["with postcodes starting {}", "in postcode area {}", "in {} postcodes"]
    if len(codes) == 1:
        templates += ["in the {} postcode area", "in the {} area"]
    return compose(
        "search", rng.choice(_LEADS), *subject, postcode_areas(codes, rng.choice(templates))
    )


def _t_capacity(rng: random.Random) -> tuple[str, Fields]:
    subject: list[Part] = _tech_noun(rng) if rng.random() < 0.8 else [rng.choice(_GENERIC)]
    return compose("search", rng.choice(_LEADS), *subject, *_capacity(rng))


def _t_size(rng: random.Random) -> tuple[str, Fields]:
    parts: list[Part] = [
        rng.choice(_LEADS),
        size(rng.choice(tuple(SIZE_CLASSES))),
        *_tech_noun(rng),
    ]
    if rng.random() < 0.5:
        parts.append(_place(rng))
    return compose("search", *parts)


def _t_combined(rng: random.Random) -> tuple[str, Fields]:
    cap, where = _capacity(rng), [_place(rng)]
    tail = cap + where if rng.random() < 0.6 else where + cap
    return compose("search", rng.choice(_LEADS), *_tech_noun(rng), *tail)


def _t_fit_rate(rng: random.Random) -> tuple[str, Fields]:
    fid = fit_id(
        rng.randint(1, 99999),
        rng.choice(("fit id", "fit id", "FIT ID", "fit", "FIT", "installation", "site", "id")),
    )
    choice = rng.randrange(8)
    if choice == 0:
        return compose("fit_rate", "what is the fit rate for", fid)
    if choice == 1:
        return compose("fit_rate", "fit rate for", fid)
    if choice == 2:
        return compose("fit_rate", "what's the tariff for", fid)
    if choice == 3:
        return compose("fit_rate", "show the feed-in tariff rate of", fid)
    if choice == 4:
        return compose("fit_rate", "look up the fit rate of", fid)
    if choice == 5:
        return compose("fit_rate", "what tariff does", fid, "get")
    if choice == 6:
        return compose(
            "fit_rate", "what", revenue(rng.choice(("revenue", "income"))), "does", fid, "earn"
        )
    return compose("fit_rate", rng.choice(("", "show the")), regional(), "fit rate for", fid)


def _t_comparison(rng: random.Random) -> tuple[str, Fields]:
    k = 3 if rng.random() < 0.15 else 2
    words = _distinct_techs(rng, k)
    choice = rng.randrange(5)
    if k == 3 or choice == 0:
        parts: list[Part] = ["compare", technologies(words)]
    elif choice == 1:
        parts = [technologies(words, rng.choice(("vs", "versus", "vs.")))]
    elif choice == 2:
        parts = ["how does", technologies(words, rng.choice(("compare with", "compare to")))]
    elif choice == 3:
        agg = rng.choice(
            (
                ("total_capacity", "the total capacity of"),
                ("count", "the number of"),
                ("average_capacity", "the average capacity of"),
            )
        )
        parts = ["compare", aggregation(*agg), technologies(words)]
    else:
        parts = ["which performs better,", technologies(words, "or")]
    if rng.random() < 0.6:
        parts.append(_place(rng))
    if rng.random() < 0.2:
        parts += _capacity(rng)
    return compose("comparison", *parts)


def _t_aggregation(rng: random.Random) -> tuple[str, Fields]:
    subject: list[Part] = _tech_noun(rng) if rng.random() < 0.8 else [rng.choice(_GENERIC)]
    where: list[Part] = [_place(rng)] if rng.random() < 0.7 else []
    extra: list[Part] = _capacity(rng) if rng.random() < 0.2 else []
    kind = rng.randrange(3)
    if kind == 0:
        lead = rng.choice(("how many", "count", "count the", "number of", "total number of"))
        tail = ["are there"] if lead == "how many" and rng.random() < 0.5 else []
        return compose("aggregation", aggregation("count", lead), *subject, *tail, *where, *extra)
    if kind == 1:
        lead = rng.choice(
            (
                "total capacity of",
                "what is the total capacity of",
                "total installed capacity of",
                "combined capacity of",
                "sum of capacity for",
            )
        )
        return compose("aggregation", aggregation("total_capacity", lead), *subject, *where, *extra)
    lead = rng.choice(
        (
            "average capacity of",
            "what is the average capacity of",
            "mean capacity of",
            "what's the average size of",
            "typical capacity of",
        )
    )
    return compose("aggregation", aggregation("average_capacity", lead), *subject, *where, *extra)


def _t_regional_revenue(rng: random.Random) -> tuple[str, Fields]:
    both, reg_only = rng.random() < 0.5, rng.random() < 0.5
    reg = regional(
        rng.choice(("regional", "regional adjusted", "regionally adjusted", "region-adjusted"))
    )
    rev = revenue(rng.choice(("revenue", "revenue", "income", "earnings")))
    if both:
        flags: list[Part] = [reg, rev]
    elif reg_only:
        flags = [reg, rng.choice(("rates", "tariffs", "adjustments", "figures"))]
    else:
        flags = [rev]
    where: list[Part] = [_place(rng)] if rng.random() < 0.4 else []
    if rng.random() < 0.7:  # "show regional adjusted revenue for all wind farms"
        lead = rng.choice(("show", "show me", "get", "calculate", "what is the", ""))
        return compose(
            "search", lead, *flags, "for", rng.choice(("all", "all", "")), *_tech_noun(rng), *where
        )
    return compose("search", rng.choice(_LEADS), *_tech_noun(rng), *where, "with", *flags)


def _t_or(rng: random.Random) -> tuple[str, Fields]:
    words = _distinct_techs(rng, 3 if rng.random() < 0.2 else 2, _ADJ_TECH_WORDS)
    lead = rng.choice(_LEADS + ("either",) * 3)
    parts: list[Part] = [lead, technologies(words, "or"), rng.choice(_NOUNS)]
    if rng.random() < 0.6:
        parts.append(_place(rng))
    if rng.random() < 0.3:
        parts += _capacity(rng)
    return compose("search", *parts)


def _t_not(rng: random.Random) -> tuple[str, Fields]:
    where: list[Part] = [_place(rng)] if rng.random() < 0.6 else []
    extra: list[Part] = _capacity(rng) if rng.random() < 0.25 else []
    if rng.random() < 0.25:  # "non-wind sites in Kent"
        word = rng.choice(_ADJ_TECH_WORDS)
        return compose(
            "search",
            rng.choice(_LEADS),
            excluding([word], "non-"),
            rng.choice(_NOUNS),
            *where,
            *extra,
        )
    words = _distinct_techs(rng, rng.choice((1, 1, 2)))
    lead = rng.choice(
        ("excluding", "except", "but not", "other than", "that are not", "not including")
    )
    joiner = "or" if lead in ("that are not", "but not") else "and"
    tail: list[Part] = [excluding(words, lead, joiner)]
    body = where + extra + tail if rng.random() < 0.7 else tail + where + extra
    return compose("search", rng.choice(_LEADS), rng.choice(_GENERIC), *body)


Template = Callable[[random.Random], tuple[str, Fields]]
# Category -> (weight, template); weights follow the original plan's mix, roughly.
CATEGORIES: dict[str, tuple[float, Template]] = {
    "technology": (8, _t_technology),
    "location": (14, _t_location),
    "postcode": (5, _t_postcode),
    "capacity": (10, _t_capacity),
    "size": (6, _t_size),
    "combined": (15, _t_combined),
    "fit_rate": (7, _t_fit_rate),
    "comparison": (8, _t_comparison),
    "aggregation": (8, _t_aggregation),
    "regional_revenue": (7, _t_regional_revenue),
    "or": (6, _t_or),
    "not": (6, _t_not),
}


# --- surface noise: casing, punctuation, typos -----------------------------------------------

_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")


def _keyboard_neighbours() -> dict[str, str]:
    # Rows are staggered: the row below sits half a key right, so its neighbours are c-1 and c.
    out: dict[str, str] = {}
    for r, row in enumerate(_ROWS):
        for c, ch in enumerate(row):
            near = [row[i] for i in (c - 1, c + 1) if 0 <= i < len(row)]
            if r > 0:
                near += [_ROWS[r - 1][i] for i in (c, c + 1) if i < len(_ROWS[r - 1])]
            if r < 2:
                near += [_ROWS[r + 1][i] for i in (c - 1, c) if 0 <= i < len(_ROWS[r + 1])]
            out[ch] = "".join(near)
    return out


KEYBOARD_NEIGHBOURS = _keyboard_neighbours()
TYPO_KINDS = ("neighbour", "missing", "double")
# Only words of 4+ letters get typos: numbers, units (kw/MW), postcodes and and/or/not stay
# intact, so a typo can never change the answer.
_TYPO_WORD = re.compile(r"[A-Za-z]{4,}")


def add_typo(text: str, rng: random.Random, kind: str | None = None) -> str:
    """One keyboard-neighbour substitution, missing letter or doubled letter in one word."""
    words = list(_TYPO_WORD.finditer(text))
    if not words:
        return text
    m = rng.choice(words)
    word, i = m.group(), rng.randrange(len(m.group()))
    kind = kind or rng.choice(TYPO_KINDS)
    if kind == "neighbour":
        sub = rng.choice(KEYBOARD_NEIGHBOURS[word[i].lower()])
        new = word[:i] + (sub.upper() if word[i].isupper() else sub) + word[i + 1 :]
    elif kind == "missing":
        new = word[:i] + word[i + 1 :]
    elif kind == "double":
        new = word[:i] + word[i] + word[i:]
    else:
        raise ValueError(f"unknown typo kind {kind!r}")
    return text[: m.start()] + new + text[m.end() :]


_QUESTION_STARTS = ("how", "what", "which", "where", "are", "is", "do")


def _restyle(question: str, rng: random.Random) -> str:
    r = rng.random()
    if r < 0.55:
        question = question.lower()
    elif r < 0.75:
        question = question[0].upper() + question[1:]
    elif r < 0.78:
        question = question.upper()
    if question.split()[0].lower() in _QUESTION_STARTS and rng.random() < 0.7:
        question += "?"
    return question


def generate(n: int, seed: int = 0, typo_rate: float = 0.2) -> list[Example]:
    """n examples, identical for the same (n, seed). Typos draw from their own stream, so
    typo_rate changes questions only, never answers or categories."""
    names = list(CATEGORIES)
    weights = [CATEGORIES[c][0] for c in names]
    master = random.Random(seed)
    out: list[Example] = []
    for _ in range(n):
        ex_seed = master.getrandbits(64)
        rng, noise = random.Random(ex_seed), random.Random(ex_seed ^ 0x5EED)
        category = rng.choices(names, weights)[0]
        question, answer = CATEGORIES[category][1](rng)
        question = _restyle(question, noise)
        if noise.random() < typo_rate:
            question = add_typo(question, noise)
            if noise.random() < 0.3:
                question = add_typo(question, noise)
        out.append(Example(question, answer, category))
    return out
