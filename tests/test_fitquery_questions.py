"""fit-query question generator (demo.questions, question_phrases, fit_vocabulary, question_noise):
contract validity, exact critical cases, determinism, noise."""

import random
import re
from collections import Counter

import pytest

from mondrian.core.contracts import Advisor, load_advisors
from mondrian.demo.fit_vocabulary import FIELD_ORDER, PLACES, TECHNOLOGY_SYNONYMS
from mondrian.demo.question_noise import TYPO_KINDS, add_typo
from mondrian.demo.question_phrases import (
    capacity_between,
    capacity_max,
    capacity_min,
    compose,
    excluding,
    fit_id,
    place,
    regional,
    revenue,
    size,
    technologies,
    technology,
)
from mondrian.demo.questions import CATEGORIES, Example, generate

YORKSHIRE = ["YO", "HU", "DN", "HD", "WF", "LS", "BD"]


@pytest.fixture(scope="module")
def contract() -> Advisor:
    """Through the project's one contract loader (which also checks the schema itself)."""
    return load_advisors()["fit-query"]


@pytest.fixture(scope="module")
def sample() -> list[Example]:
    return generate(1000, seed=0)


def test_contract_shape(contract: Advisor) -> None:
    assert contract.name == "fit-query"
    assert contract.input_kind == "text"
    assert contract.schema["additionalProperties"] is False
    # The field names are taught by the solved examples every prompt shows (retrieval), not
    # by a list in the system prompt: that list was 60 of a row's ~325 tokens (README, Training).
    assert contract.retrieval is not None and contract.retrieval.k >= 1
    assert "kW" in contract.system_prompt  # the one convention no single example states


def test_contract_rejects_bad_answers(contract: Advisor) -> None:
    bad = [
        {"technology": "Wind"},  # no query_type
        {"query_type": "search", "technology": "wind"},  # wrong case
        {"query_type": "search", "postcode_patterns": ["rg"]},
        {"query_type": "search", "capacity_min_kw": -1},
        {"query_type": "search", "colour": "red"},
        {"query_type": "fit_rate"},  # fit_rate without fit_id
        {"query_type": "comparison", "technologies": ["Wind"]},
        {"query_type": "search", "technology": "Wind", "technologies": ["Wind", "Hydro"]},
        {"query_type": "fit_rate", "fit_id": "12a"},
    ]
    for answer in bad:
        assert contract.violations(answer), answer


def test_every_answer_meets_contract(contract: Advisor) -> None:
    for ex in generate(1500, seed=7):
        errors = contract.violations(ex.answer)
        assert not errors, (ex, errors[0].message)


@pytest.mark.parametrize(
    ("parts", "question", "answer"),
    [
        (
            (
                "search",
                technology("wind"),
                "sites",
                capacity_min(100, "kw", "over"),
                place("berkshire"),
            ),
            "wind sites over 100kw in berkshire",
            {
                "query_type": "search",
                "technology": "Wind",
                "capacity_min_kw": 100,
                "postcode_patterns": ["RG", "SL"],
            },
        ),
        (
            ("fit_rate", "what is the fit rate for", fit_id(1585, "fit id")),
            "what is the fit rate for fit id 1585",
            {"query_type": "fit_rate", "fit_id": "1585"},
        ),
        (
            ("comparison", "compare", technologies(["wind", "solar"]), place("Yorkshire")),
            "compare wind and solar in Yorkshire",
            {
                "query_type": "comparison",
                "technologies": ["Wind", "Photovoltaic"],
                "postcode_patterns": YORKSHIRE,
            },
        ),
        (
            (
                "search",
                "show",
                regional("regional adjusted"),
                revenue(),
                "for all",
                technology("wind farms"),
            ),
            "show regional adjusted revenue for all wind farms",
            {
                "query_type": "search",
                "technology": "Wind",
                "include_regional": True,
                "include_revenue": True,
            },
        ),
        (
            ("search", "all sites in", place("Devon", ""), excluding(["solar"])),
            "all sites in Devon excluding solar",
            {
                "query_type": "search",
                "exclude_technologies": ["Photovoltaic"],
                "postcode_patterns": ["EX", "PL", "TQ"],
            },
        ),
        (
            ("search", technologies(["wind", "hydro"], "or"), "sites", place("Wales")),
            "wind or hydro sites in Wales",
            {
                "query_type": "search",
                "technologies": ["Wind", "Hydro"],
                "postcode_patterns": ["CF", "LD", "LL", "NP", "SA"],
            },
        ),
    ],
)
def test_critical_cases_exact(parts: tuple, question: str, answer: dict) -> None:
    q, a = compose(*parts)
    assert q == question
    assert a == answer
    assert list(a) == list(answer)  # key order is canonical too


def test_lists_said_word_by_word() -> None:
    # "non-" glues onto every word, and a comparison may repeat its joiner: people type both
    assert excluding(["wind", "PV"], "non-", " ") == (
        "non-wind non-PV", {"exclude_technologies": ["Wind", "Photovoltaic"]})
    assert excluding(["hydro", "biogas"], "non-", ",")[0] == "non-hydro, non-biogas"
    assert excluding(["hydro", "biogas"], "non-")[0] == "non-hydro and non-biogas"
    assert excluding(["hydro", "biogas"], "except")[0] == "except hydro and biogas"
    assert technologies(["hydro", "wind", "PV"], "versus", repeat=True) == (
        "hydro versus wind versus PV", {"technologies": ["Hydro", "Wind", "Photovoltaic"]})
    assert technologies(["hydro", "wind", "PV"], "vs")[0] == "hydro, wind vs PV"
    # ... and the generator emits each shape, with its answer
    examples = generate(3000, seed=2, typo_rate=0.0)
    shapes = {
        "not": re.compile(r"\bnon-[a-z ]+(,| and)? non-"),
        "comparison": re.compile(r"\b(vs\.?|versus) .+ \b(vs\.?|versus) "),
        "aggregation": re.compile(r"^how many .*\b(in total|total|altogether)\b"),
    }
    for category, shape in shapes.items():
        hits = [e for e in examples if e.category == category and shape.search(e.question.lower())]
        assert hits, category
    assert all(len(e.answer["exclude_technologies"]) == 2 for e in examples
               if e.category == "not" and shapes["not"].search(e.question.lower()))
    assert all(len(e.answer["technologies"]) == 3 for e in examples
               if e.category == "comparison" and shapes["comparison"].search(e.question.lower()))
    assert all(e.answer["aggregation"] == "count" for e in examples
               if e.category == "aggregation" and shapes["aggregation"].search(e.question.lower()))


def test_word_orders_people_type() -> None:
    # flags trailing the subject, revenue asked as what sites earn, no technology with a place
    # and a bound, and "or" without a noun: each emitted, each with its answer
    examples = generate(3000, seed=2, typo_rate=0.0)

    def hits(category: str, pattern: str) -> list[Example]:
        found = [e for e in examples
                 if e.category == category and re.search(pattern, e.question.lower())]
        assert found, (category, pattern)
        return found

    trailing = hits("regional_revenue", r", (regionally adjusted|regional adjusted|region-adjusted"
                                        r"|adjusted for region|with regional adjustment)$")
    assert all(e.answer.get("include_regional") for e in trailing)
    assert any(e.answer.get("include_revenue") for e in trailing)
    earns = hits("regional_revenue", r"\b(make|earn|bring in) the most")
    assert all(e.answer.get("include_revenue") and "aggregation" not in e.answer for e in earns)
    # the place may come first: "devon wind revenue, ..."
    assert any(e.question.split()[0].lower() in {p.lower() for p in PLACES} for e in trailing + earns)
    plain = [e for e in examples if e.category == "combined"
             and "technology" not in e.answer and "technologies" not in e.answer]
    assert plain and all("postcode_patterns" in e.answer and
                         {"capacity_min_kw", "capacity_max_kw"} & set(e.answer) for e in plain)
    nouns = re.compile(r"\b(sites|installations|projects|schemes|systems)\b")
    bare = [e for e in examples if e.category == "or" and not nouns.search(e.question.lower())]
    assert bare and all(len(e.answer["technologies"]) >= 2 for e in bare)


def test_generator_uses_the_critical_shape() -> None:
    # "<tech> <noun> over <n>kw in <place>" must be a shape the generator emits, lowercase and clean.
    questions = [e.question for e in generate(3000, seed=1, typo_rate=0.0)]
    shape = re.compile(r"[a-z ]+ (over|above|more than|at least) \d+ ?kw in [a-z ]+")
    assert any(shape.fullmatch(q) for q in questions)


def test_unit_conversions() -> None:
    assert capacity_min("1.5", " MW")[1] == {"capacity_min_kw": 1500}
    assert capacity_max("1.1", "mw")[1] == {"capacity_max_kw": 1100}
    assert capacity_min(1, " megawatt")[1] == {"capacity_min_kw": 1000}
    assert capacity_min("0.5", "MW")[1] == {"capacity_min_kw": 500}
    assert capacity_max(250, " kilowatts")[1] == {"capacity_max_kw": 250}
    # template words put the amount first: the bound is still the word's, not its position's
    assert capacity_min(5, "mw", "{} and up") == ("5mw and up", {"capacity_min_kw": 5000})
    assert capacity_max(100, " kw", "{} or less") == ("100 kw or less", {"capacity_max_kw": 100})
    assert capacity_max(4, "kw", "<") == ("< 4kw", {"capacity_max_kw": 4})
    assert capacity_min("3.5", "kw")[1] == {"capacity_min_kw": 3.5}
    text, fields = capacity_between(500, "2", "mw", lo_unit="kw")
    assert text == "between 500kw and 2mw"
    assert fields == {"capacity_min_kw": 500, "capacity_max_kw": 2000}
    assert type(capacity_min("1.5", "MW")[1]["capacity_min_kw"]) is int
    with pytest.raises(ValueError):
        capacity_between(2, 1, "mw")


def test_size_classes() -> None:
    assert size("small")[1] == {"capacity_max_kw": 50}
    assert size("medium")[1] == {"capacity_min_kw": 50, "capacity_max_kw": 500}
    assert size("large")[1] == {"capacity_min_kw": 500}


def test_tables() -> None:
    assert PLACES["Berkshire"] == ("RG", "SL")
    assert PLACES["Yorkshire"] == tuple(YORKSHIRE)
    assert PLACES["Cornwall"] == ("TR", "PL")
    assert set(PLACES["London"]) == {"E", "EC", "N", "NW", "SE", "SW", "W", "WC"}
    assert len(PLACES["Scotland"]) == 16
    assert len(PLACES) >= 25
    for word, canon in {
        "turbines": "Wind",
        "PV": "Photovoltaic",
        "water power": "Hydro",
        "biogas": "Anaerobic digestion",
        "combined heat and power": "Micro CHP",
    }.items():
        assert TECHNOLOGY_SYNONYMS[word] == canon


def test_compose_rejects_conflicting_fields() -> None:
    with pytest.raises(ValueError):
        compose("search", technology("wind"), technology("solar"))
    with pytest.raises(ValueError):
        technologies(["wind", "turbines"])  # one technology twice


def test_deterministic_and_seed_sensitive() -> None:
    assert generate(200, seed=3) == generate(200, seed=3)
    assert [e.question for e in generate(200, seed=3)] != [
        e.question for e in generate(200, seed=4)
    ]
    assert generate(50, seed=3) == generate(200, seed=3)[:50]


def test_every_category_appears(sample: list[Example]) -> None:
    counts = Counter(e.category for e in sample)
    assert set(counts) == set(CATEGORIES)
    assert min(counts.values()) >= 20
    types = Counter(e.answer["query_type"] for e in sample)
    assert set(types) == {"search", "fit_rate", "comparison", "aggregation"}


def test_answers_are_consistent(sample: list[Example]) -> None:
    for ex in sample:
        a = ex.answer
        for key in ("capacity_min_kw", "capacity_max_kw"):
            if key in a:  # ints when whole: 100, not 100.0
                assert isinstance(a[key], int) or not float(a[key]).is_integer(), ex
        if "capacity_min_kw" in a and "capacity_max_kw" in a:
            assert a["capacity_min_kw"] < a["capacity_max_kw"], ex
        if ex.category == "fit_rate":
            assert a["fit_id"] in ex.question, ex
        assert list(a) == [k for k in FIELD_ORDER if k in a]


def test_typos_keep_answers() -> None:
    clean = generate(400, seed=5, typo_rate=0.0)
    noisy = generate(400, seed=5, typo_rate=1.0)
    changed = 0
    for c, n in zip(clean, noisy, strict=True):
        assert (c.answer, c.category) == (n.answer, n.category)
        # Typos touch letters only: numbers (capacities, fit ids) and word count survive.
        assert re.findall(r"\d+(?:\.\d+)?", c.question) == re.findall(r"\d+(?:\.\d+)?", n.question)
        assert len(c.question.split()) == len(n.question.split())
        assert abs(len(c.question) - len(n.question)) <= 2
        changed += c.question != n.question
    assert changed > 0.9 * len(clean)


@pytest.mark.parametrize("kind", TYPO_KINDS)
def test_add_typo_kinds(kind: str) -> None:
    text = "wind sites over 100kw in Berkshire"
    for s in range(50):
        out = add_typo(text, random.Random(s), kind)
        assert out != text
        assert "100kw" in out and "in" in out.split()
        delta = len(out) - len(text)
        assert delta == {"neighbour": 0, "missing": -1, "double": 1}[kind]
    assert add_typo("AD or CHP 5", random.Random(0)) == "AD or CHP 5"  # nothing long enough


def test_share_of_typos() -> None:
    clean = generate(500, seed=9, typo_rate=0.0)
    default = generate(500, seed=9)
    share = sum(c.question != d.question for c, d in zip(clean, default, strict=True)) / 500
    assert 0.1 < share < 0.3
