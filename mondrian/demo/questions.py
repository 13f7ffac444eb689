"""Seeded generator of fit-query examples: UK Feed-in-Tariff questions -> filter objects.

A question is composed from *phrases* (`question_phrases`): each phrase is its text plus the
answer fields that text implies, so every answer is right by construction. This module picks
the slots at random per category, then adds surface noise (`question_noise`). The words and
tables they are written in are in `fit_vocabulary`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mondrian.demo.fit_vocabulary import (
    MAX_WORDS,
    MIN_WORDS,
    NOUN_SYNONYMS,
    PLACES,
    POSTCODE_AREAS,
    SIZE_CLASSES,
    TECHNOLOGIES,
    TECHNOLOGY_SYNONYMS,
    Fields,
)
from mondrian.demo.question_noise import add_typo, restyle
from mondrian.demo.question_phrases import (
    RANGE_STYLES,
    Part,
    Phrase,
    aggregation,
    capacity_between,
    capacity_max,
    capacity_min,
    compose,
    excluding,
    fit_id,
    place,
    postcode_areas,
    regional,
    revenue,
    size,
    technologies,
    technology,
)


@dataclass(frozen=True)
class Example:
    question: str
    answer: Fields
    category: str


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
_IN_TOTAL = ("in total", "total", "altogether", "are there in total")
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
            lo, hi, rng.choice(_KW_SPELLINGS), style=rng.choice(tuple(RANGE_STYLES))
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
    lead, subject = rng.choice(_LEADS), _tech_noun(rng)
    # no technology: "installations in devon under 2mw"; drawn last, so the other rows keep
    # the text they had before this shape was added
    if rng.random() < 0.2:
        subject = [rng.choice(_GENERIC)]
    return compose("search", lead, *subject, *tail)


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
    if choice == 1:  # "wind vs solar", "solar vs ad vs chp"
        parts: list[Part] = [technologies(words, rng.choice(("vs", "versus", "vs.")), repeat=True)]
    elif k == 3 or choice == 0:
        parts = ["compare", technologies(words)]
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
        tail = []
        if lead == "how many":  # "how many wind turbines are there", "... in total"
            r = rng.random()
            tail = ["are there"] if r < 0.5 else [rng.choice(_IN_TOTAL)] if r < 0.75 else []
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
        asked = compose(
            "search", lead, *flags, "for", rng.choice(("all", "all", "")), *_tech_noun(rng), *where
        )
    else:
        asked = compose("search", rng.choice(_LEADS), *_tech_noun(rng), *where, "with", *flags)
    # two word orders people type and the forms above miss, drawn last so the other rows keep
    # their text: the flags trailing the subject, and revenue asked as what a site earns
    shape = rng.random()
    if shape < 0.2:
        return _flags_trailing(rng)
    if shape < 0.3:
        return _earnings(rng)
    return asked


_EARNS = ("make the most money", "earn the most", "earn the most money", "make the most",
          "bring in the most")


def _subject_where(rng: random.Random) -> list[Part]:
    """A technology (or generic) subject with an optional place before or after it."""
    subject: list[Part] = _tech_noun(rng) if rng.random() < 0.8 else [rng.choice(_GENERIC)]
    where = rng.random()
    if where < 0.3:  # "devon wind farms"
        return [place(rng.choice(tuple(PLACES)), prep=""), *subject]
    return [*subject, _place(rng)] if where < 0.7 else subject


def _flags_trailing(rng: random.Random) -> tuple[str, Fields]:
    """"devon wind revenue, regionally adjusted", "hydro sites in kent, regional adjusted"."""
    reg = regional(rng.choice(("regionally adjusted", "regional adjusted", "region-adjusted",
                               "adjusted for region", "with regional adjustment")))
    rev = revenue(rng.choice(("revenue", "income", "earnings")))
    kind = rng.randrange(3)
    if kind == 0:  # both: "<subject> revenue, regionally adjusted"
        return compose("search", *_subject_where(rng), rev, ",", reg)
    if kind == 1:
        return compose("search", *_subject_where(rng), ",", reg)
    return compose("search", *_subject_where(rng), rng.choice((",", "", "and")), rev)


def _earnings(rng: random.Random) -> tuple[str, Fields]:
    """Revenue asked as a verb: "which solar farms in devon earn the most"."""
    lead = rng.choice(("which", "which", "what", "show the", "find the"))
    that = "that" if lead.endswith("the") else ""
    return compose("search", lead, *_subject_where(rng), that, revenue(rng.choice(_EARNS)))


def _t_or(rng: random.Random) -> tuple[str, Fields]:
    words = _distinct_techs(rng, 3 if rng.random() < 0.2 else 2, _ADJ_TECH_WORDS)
    lead = rng.choice(_LEADS + ("either",) * 3)
    parts: list[Part] = [lead, technologies(words, "or"), rng.choice(_NOUNS)]
    if rng.random() < 0.6:
        parts.append(_place(rng))
    if rng.random() < 0.3:
        parts += _capacity(rng)
    # without the noun when a place or size follows: "hydro or wind in kent"; drawn last, so
    # the other rows keep their text
    if len(parts) > 3 and rng.random() < 0.3:
        del parts[2]
    return compose("search", *parts)


def _t_not(rng: random.Random) -> tuple[str, Fields]:
    where: list[Part] = [_place(rng)] if rng.random() < 0.6 else []
    extra: list[Part] = _capacity(rng) if rng.random() < 0.25 else []
    if rng.random() < 0.25:  # "non-wind sites in Kent", "non-hydro non-wind sites"
        word = rng.choice(_ADJ_TECH_WORDS)
        words = [word]
        if rng.random() < 0.35:
            words += [w for w in _distinct_techs(rng, 2, _ADJ_TECH_WORDS)
                      if TECHNOLOGY_SYNONYMS[w] != TECHNOLOGY_SYNONYMS[word]][:1]
        return compose(
            "search",
            rng.choice(_LEADS),
            excluding(words, "non-", rng.choice((" ", ",", "and"))),
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
        question = restyle(question, noise)
        if noise.random() < typo_rate:
            question = add_typo(question, noise)
            if noise.random() < 0.3:
                question = add_typo(question, noise)
        out.append(Example(question, answer, category))
    return out
