"""The built-in text the tiny tokenizers are trained on: deterministic, ~3k lines.

Energy-record questions and JSON, composition descriptions and plain English from small word
lists, so the BPE learns the words the tests and demos use as well as ordinary suffixes.
"""

from __future__ import annotations

import json
import random
from typing import Any

_TECHS = [
    "wind",
    "solar",
    "solar photovoltaic",
    "photovoltaic",
    "hydro",
    "micro hydro",
    "anaerobic digestion",
    "micro chp",
    "heat pump",
    "biomass",
]
_PLACES = [
    "Berkshire",
    "Yorkshire",
    "North Yorkshire",
    "West Yorkshire",
    "Cornwall",
    "Devon",
    "Kent",
    "Cumbria",
    "Norfolk",
    "Highland",
    "Aberdeenshire",
    "Gwynedd",
    "London",
    "Reading",
    "Leeds",
    "York",
]
_POSTCODES = ["RG1", "RG14", "YO1", "LS6", "HU17", "TR1", "EX4", "CT2", "AB10", "LL55", "SW1A"]
_COLOURS = ["red", "green", "blue", "yellow", "white", "black", "grey", "orange", "purple"]
_SHAPES = ["square", "circle", "triangle", "stripe", "rectangle", "line", "grid"]
_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "How many wind installations are there in Berkshire?",
    "What is the total capacity of solar photovoltaic sites in Yorkshire?",
    "List the hydro schemes above 1.5 MW commissioned after 2012.",
    "Anaerobic digestion plants turn food waste and slurry into biogas.",
    "A feed-in tariff pays a fixed rate for every kWh of electricity generated.",
    "Capacity is declared in kW; large sites are quoted in MW.",
    "The postcode district tells you roughly where an installation is.",
    "Describe the composition of the painting: colour, balance and rhythm.",
    "The colour balance of the image is warm, with a strong red block in the corner.",
    "Mondrian used primary colours, black lines and white space.",
    "Answer with a single JSON object and nothing else.",
    "Return an empty list when no record matches the question.",
    "Count the records, then sum the declared net capacity.",
    "The installation date, tariff code and export status are optional fields.",
    "Which technology has the highest average capacity in North Yorkshire?",
    "Show me domestic solar installations under 4 kW in postcode RG1.",
    "Is there any wind capacity in Cornwall above 500 kW?",
    "Please give the answer in kilowatts, rounded to one decimal place.",
    "I'm not sure; it's either wind or hydro, isn't it? We'll see, they've said.",
]
# Plain English from small word lists, so the BPE learns ordinary words and suffixes too.
_NOUNS = (
    "site scheme farm turbine panel roof field river valley village town city county region "
    "district street house school hospital church station factory warehouse office market "
    "record table column row field value answer question query report survey summary list "
    "number total average count sum date year month week day hour minute meter reading "
    "tariff rate price cost payment export import generator owner operator developer council "
    "grid network cable substation transformer inverter battery storage pump boiler engine "
    "picture painting image photo canvas frame border corner edge centre shape block line "
    "colour light shadow pattern texture surface artist gallery museum style rhythm balance "
    "composition contrast harmony space weight direction movement structure order system "
    "model adapter dataset example prompt response token message assistant user version test"
).split()
_VERBS = (
    "shows lists counts finds returns describes measures compares reports records generates "
    "exports installs connects supplies produces stores converts heats powers reduces increases "
    "contains includes matches filters sorts groups selects changes updates checks explains "
    "paints draws fills divides balances separates frames crosses repeats follows answers"
).split()
_ADJECTIVES = (
    "small large new old local national public private domestic commercial community rural "
    "urban northern southern eastern western total average annual monthly daily maximum minimum "
    "bright dark primary secondary simple complex vertical horizontal thick thin strong weak "
    "balanced asymmetric geometric abstract modern famous quiet busy renewable green clean "
    "accurate exact approximate valid invalid empty missing optional required first last"
).split()
_WORDS_EXTRA = (
    "January February March April May June July August September October November December "
    "Monday Tuesday Wednesday Thursday Friday Saturday Sunday one two three four five six seven "
    "eight nine ten eleven twelve twenty thirty hundred thousand million kilowatt megawatt "
    "kilowatts megawatts hour hours electricity energy power heat gas biogas methane slurry "
    "England Scotland Wales Ireland Britain Lancashire Derbyshire Hampshire Wiltshire "
    "Oxfordshire Somerset Dorset Essex Suffolk Lincolnshire Northumberland Durham Surrey Sussex"
).split()


# Each helper draws from `rng` in a fixed order: the corpus (hence every tiny vocab) depends on it.


def _plain_english(rng: random.Random) -> list[str]:
    lines = []
    for _ in range(1500):
        n1, n2 = rng.choice(_NOUNS), rng.choice(_NOUNS)
        lines.append(
            rng.choice(
                [
                    f"The {rng.choice(_ADJECTIVES)} {n1} {rng.choice(_VERBS)} the {n2}.",
                    f"Each {n1} {rng.choice(_VERBS)} a {rng.choice(_ADJECTIVES)} {n2} in {rng.choice(_WORDS_EXTRA)}.",
                    f"Why does the {n1} need a {rng.choice(_ADJECTIVES)} {n2}?",
                    f"{n1.capitalize()}s and {n2}s are {rng.choice(_ADJECTIVES)}.",
                ]
            )
        )
    return lines


def _energy_records(rng: random.Random) -> list[str]:
    lines = []
    for _ in range(1200):
        tech, place = rng.choice(_TECHS), rng.choice(_PLACES)
        kw = round(rng.uniform(0.5, 5000.0), rng.choice([0, 1, 2]))
        year = rng.randint(2009, 2025)
        code = rng.choice(_POSTCODES)
        unit = rng.choice(["kW", "kw", "MW", "mw"])
        lines.append(
            rng.choice(
                [
                    f"How much {tech} capacity is installed in {place}?",
                    f"A {kw} {unit} {tech} installation in {place} ({code}) since {year}.",
                    f"Find {tech} sites near postcode {code} with capacity over {kw} {unit}.",
                    f"In {year}, {place} added {kw} {unit} of {tech}.",
                    f"What is the average {tech} capacity in {place} for {year}?",
                ]
            )
        )
        record: dict[str, Any] = {
            "technology": tech,
            "region": place,
            "postcode": code,
            "capacity_kw": kw,
            "year": year,
        }
        if rng.random() < 0.3:
            record["count"] = rng.randint(0, 400)
        lines.append(json.dumps(record, sort_keys=True, separators=(",", ":")))
    return lines


def _compositions(rng: random.Random) -> list[str]:
    lines = []
    for _ in range(600):
        c1, c2, shape = rng.choice(_COLOURS), rng.choice(_COLOURS), rng.choice(_SHAPES)
        lines.append(
            rng.choice(
                [
                    f"A {c1} {shape} on a {c2} background.",
                    f"The composition is balanced: a {c1} {shape} sits beside a {c2} {shape}.",
                    f"Colour: {c1}. Shape: {shape}. Balance: {rng.choice(['left', 'right', 'even'])}.",
                    json.dumps({"colour": c1, "shape": shape, "count": rng.randint(1, 9)}),
                ]
            )
        )
    return lines


def tiny_corpus() -> list[str]:
    """The built-in training text for the tiny tokenizers (deterministic, ~3k lines)."""
    rng = random.Random(1234)  # fixed: the corpus (hence the vocab) never depends on `seed`
    lines: list[str] = list(_SENTENCES)
    lines.append(" ".join(_WORDS_EXTRA))
    lines += _plain_english(rng)
    lines.append("0 1 2 3 4 5 6 7 8 9 10 11 12 20 50 100 250 500 1000 2024 2025 3.14 0.5 1.5 99.9")
    lines.append('{ } [ ] : , " . - + = ( ) / % & # @ ! ? ; * _ < > | ~ ^')
    lines += _energy_records(rng)
    lines += _compositions(rng)
    return lines
