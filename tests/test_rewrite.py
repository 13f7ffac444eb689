"""How a typed question is shown to the model (mondrian.core.rewrite): amounts in one unit,
misspelt words mended from the index's questions, phrases as canonical words; pinned with the
prompt, refused when broken."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mondrian.core.config import ConfigError
from mondrian.core.contracts import (
    PROMPT_FILE,
    get_advisor,
    load_advisor,
    read_prompt,
    write_prompt,
)
from mondrian.core.retrieval import Example, RetrievalIndex, prompt_messages
from mondrian.core.rewrite import MIN_COUNT, Speller, Synonyms, Units

FIT = get_advisor("fit-query")
KW = Units.check({"to": "kw", "factors": {"kw": 1, "kilowatts": 1, "mw": 1000, "megawatts": 1000, "megawatt": 1000}},
                 "test")


@pytest.mark.parametrize("typed, shown", [
    ("hydro bigger than 1MW", "hydro bigger than 1000 kw"),
    ("pv in cornwall 1.5 MW or more", "pv in cornwall 1500 kw or more"),
    ("0.5mw or less", "500 kw or less"),
    ("ad plants between 0.5 and 1.2 MW", "ad plants between 500 and 1200 kw"),  # the range shares its unit
    ("from 5 to 10 mw", "from 5000 to 10000 kw"),
    ("pv 50-100kw derbyshire", "pv 50-100 kw derbyshire"),
    ("between 10kW and 0.25MW", "between 10 kw and 250 kw"),
    ("at least 1,500 kW", "at least 1500 kw"),
    ("three megawatt plus wind", "3000 kw plus wind"),  # number words first (text2num)
    ("2.5 megawatts in the highlands", "2500 kw in the highlands"),
    ("fit id 1585", "fit id 1585"),  # no unit: not an amount
    ("solar 100kwh", "solar 100kwh"),  # another unit: left alone
    ("any one of them", "any one of them"),
])
def test_units_show_every_amount_in_one_unit(typed, shown):
    assert KW.rewrite(typed) == shown


@given(st.lists(st.one_of(st.from_regex(r"\A[0-9]{1,5}(\.[0-9]{1,3})?\Z"), st.sampled_from(
    ["kw", "mw", "MW", "megawatts", " ", "and", "-", "to", "solar", ",", "1,500", "0.25"])), max_size=12))
def test_units_rewrite_is_idempotent(parts):
    once = KW.rewrite(" ".join(parts))
    assert KW.rewrite(once) == once


@pytest.mark.parametrize("bad, match", [
    ({"to": "kw"}, "must be a mapping of to"),
    ({"to": "", "factors": {"kw": 1}}, "to must be a unit"),
    ({"to": "kw", "factors": {}}, "factors must map"),
    ({"to": "kw", "factors": {"k w": 1}}, "is not a word"),
    ({"to": "kw", "factors": {"mw": 0}}, "not a positive number"),
    ({"to": "kw", "factors": {"mw": True}}, "not a positive number"),
])
def test_units_refuse_a_bad_setting(bad, match):
    with pytest.raises(ValueError, match=match):
        Units.check(bad, "input_units")


BOUNDS = Synonyms.check({"max": ["under", "less than", "up to", "no more than", "at most", "<", "<=", "max",
                                  "{} or less"],
                          "min": ["over", "more than", "at least", ">", "min", "{} plus", "{}+"]}, "test")


@pytest.mark.parametrize("typed, shown", [
    ("wind at most 2500 kw in yorkshire", "wind max 2500 kw in yorkshire"),
    ("no more than 5 kw", "max 5 kw"),  # the longer phrase wins over "more than"
    ("more than 5 kw", "min 5 kw"),
    ("pv 100 kw or less in kent", "pv max 100 kw in kent"),  # "{}": the amount moves after the word
    ("100 or less", "max 100"),
    ("5000 kw plus", "min 5000 kw"),
    ("20kw+ wind", "min 20kw wind"),
    ("solar <20kw", "solar max 20kw"),  # a symbol next to a number is spaced from it
    ("solar<=20kw", "solar max 20kw"),
    ("Solar UNDER 5 kW", "Solar max 5 kW"),  # any case; the rest as typed
    ("at  least   1 mw", "min   1 mw"),  # any spacing within a phrase; the rest as typed
    ("overall, underground moreover", "overall, underground moreover"),  # whole words only
    ("between 5 and 10 kw", "between 5 and 10 kw"),
    ("fit id 1585", "fit id 1585"),
])
def test_synonyms_show_each_phrase_as_its_word(typed, shown):
    assert BOUNDS.rewrite(typed) == shown


@given(st.lists(st.sampled_from(["5", "100", "kw", "or", "less", "plus", "+", "<", "under", "no", "more",
                                 "than", "at", "most", "max", "solar", " "]), max_size=12))
def test_synonyms_rewrite_is_idempotent(parts):
    once = BOUNDS.rewrite(" ".join(parts))
    assert BOUNDS.rewrite(once) == once
    assert FIT.shown(FIT.shown(" ".join(parts))) == FIT.shown(" ".join(parts))


@pytest.mark.parametrize("bad, match", [
    ([], "must map canonical words"),
    ({}, "must map canonical words"),
    ({"max": []}, "must be a list of phrases"),
    ({"max": "under"}, "must be a list of phrases"),
    ({"max": ["under", 5]}, "5 is not a phrase"),
    ({"max": ["{} or {}"]}, "is not a phrase"),
    ({"max": ["{}"]}, "is not a phrase"),
    ({"{}": ["under"]}, "is not a canonical word"),
    ({"max": ["under"], "min": ["UNDER"]}, "listed under both 'max' and 'min'"),
    ({"max": ["under"], "min": ["max"]}, "'max' is a canonical word and a phrase of 'min'"),
])
def test_synonyms_refuse_a_bad_setting(bad, match):
    with pytest.raises(ValueError, match=match):
        Synonyms.check(bad, "input_synonyms")


def test_fit_query_shows_bounds_money_and_places_in_one_word_each():
    assert FIT.shown("Wind power sites in County Durham at most 100 kW") == "wind power sites in county durham max 100 kw"
    assert FIT.shown("three megawatt plus wind in wales") == "min 3000 kw wind in wales"  # units first
    assert FIT.shown("pv in cornwall 1.5 MW or more") == "pv in cornwall min 1500 kw"
    assert FIT.shown("sites not over 5 mw") == "sites max 5000 kw"
    assert FIT.shown("which solar farms make the most money") == "which solar farms make the most money"
    assert FIT.shown("regionally adjusted income, and earnings") == "regionally adjusted revenue, and revenue"
    assert FIT.shown("Notts PV over 30 kW") == "nottinghamshire pv min 30 kw"
    assert FIT.shown("wind turbines in N. Ireland or co durham") == "wind turbines in northern ireland or county durham"
    assert FIT.shown("the ne postcode area; glossop") == "the ne postcode area; glossop"  # whole phrases only


def _questions() -> list[str]:
    common = ["wind sites in kent", "solar and wind in leeds", "and what about lincolnshire wind",
              "power stations in lincolnshire", "solar power in kent", "wind power in leeds"]
    return common * MIN_COUNT + ["solar in kenf", "lower than 5 kw power"]


def test_speller_mends_rare_unknown_words_from_common_ones():
    sp = Speller(_questions())
    assert sp.mend("Wind in Kenf") == "Wind in kent"  # seen once, one edit from a common word
    assert sp.mend("eeds wnd") == "leeds wind"  # a dropped letter beats a changed one ("and")
    assert sp.mend("lincolnshre") == "lincolnshire"
    assert sp.mend("lower power") == "lower power"  # an English word stays, however rare here
    assert sp.mend("pv ad xyzzy") == "pv ad xyzzy"  # short words, and words near nothing, stay
    assert sp.mend("kennt") == "kent"
    assert Speller([]).mend("kenf") == "kenf"  # an empty index knows no words


def _advisor(tmp_path, **extra) -> object:
    path = tmp_path / "a.yaml"
    body = {"name": "a", "input_kind": "text", "system_prompt": "s",
            "schema": {"type": "object", "properties": {"x": {"type": "string"}}}, **extra}
    path.write_text(json.dumps(body))
    return load_advisor(path)


def test_advisor_yaml_settings_are_checked(tmp_path):
    adv = _advisor(tmp_path, retrieval={"k": 2}, input_units=KW.to_dict(), input_spelling=True)
    assert adv.input_units == KW and adv.input_spelling
    assert adv.fingerprint != replace(adv, input_units=None).fingerprint != replace(adv, input_spelling=False).fingerprint
    plain = _advisor(tmp_path)
    assert plain.input_units is None and not plain.input_spelling
    with pytest.raises(ConfigError, match=r"a\.yaml: input_spelling mends words from the retrieval index"):
        _advisor(tmp_path, input_spelling=True)
    with pytest.raises(ConfigError, match=r"a\.yaml: input_units: factors: mw: 'x' is not a positive number"):
        _advisor(tmp_path, input_units={"to": "kw", "factors": {"mw": "x"}})
    with pytest.raises(ConfigError, match="input_spelling must be true or false"):
        _advisor(tmp_path, retrieval={"k": 2}, input_spelling="yes")
    with pytest.raises(ConfigError, match="rewrite typed text"):
        _advisor(tmp_path, input_kind="image", input_units=KW.to_dict())
    with pytest.raises(ConfigError, match="rewrite typed text"):
        _advisor(tmp_path, input_kind="image", input_synonyms=BOUNDS.to_dict())
    with pytest.raises(ConfigError, match=r"a\.yaml: input_synonyms: max: 5 is not a phrase"):
        _advisor(tmp_path, input_synonyms={"max": [5]})
    syn = _advisor(tmp_path, input_synonyms=BOUNDS.to_dict())
    assert syn.input_synonyms == BOUNDS and syn.rewrites_input and not plain.rewrites_input
    assert syn.fingerprint != plain.fingerprint and syn.shown("Under 5 kw") == "max 5 kw"


def test_prompt_shows_question_and_examples_rewritten_and_retrieves_as_typed():
    index = RetrievalIndex([Example(q, '{"query_type":"search"}', f"g{i}") for i, q in enumerate(_questions())], 2)
    messages, shown = prompt_messages(FIT, "Wind in KENF over 0.5 MW", index)
    assert messages[-1]["content"] == "wind in kent min 500 kw"
    assert [m["content"] for m in messages[1:-1:2]] == [FIT.shown(e.input, index.speller) for e in reversed(shown)]
    assert shown == index.nearest("Wind in KENF over 0.5 MW")  # retrieval saw the question as typed
    asked = FIT.asked_as({**FIT.prompt_settings(), "input_units": None, "input_spelling": False,
                          "input_synonyms": None})
    assert prompt_messages(asked, "Wind in KENF over 0.5 MW", index)[0][-1]["content"] == "wind in kenf over 0.5 mw"


def test_pinned_settings_round_trip_and_older_files_read_as_off(tmp_path):
    write_prompt(tmp_path, FIT)
    assert read_prompt(tmp_path) == FIT.prompt_settings() and FIT.asked_as(read_prompt(tmp_path)) is FIT
    older = {k: FIT.prompt_settings()[k] for k in ("advisor", "system_prompt", "input_case")}
    (tmp_path / PROMPT_FILE).write_text(json.dumps(older))
    asked = FIT.asked_as(read_prompt(tmp_path))  # pinned before these settings: asked without them
    assert asked.input_units is None and not asked.input_spelling and asked.input_synonyms is None
    assert asked.shown("wind at most 5 kw") == "wind at most 5 kw"
    assert asked.shown("Solar 1 MW in Kenf", Speller(_questions())) == "solar 1 mw in kenf"
    for bad, match in (({"input_units": {"to": "kw"}}, "must be a mapping of to"),
                       ({"input_spelling": "yes"}, "input_spelling must be true or false"),
                       ({"input_synonyms": {"max": "under"}}, "must be a list of phrases"),
                       ({"input_other": 1}, "optionally input_units")):
        (tmp_path / PROMPT_FILE).write_text(json.dumps({**older, **bad}))
        with pytest.raises(ConfigError, match=match):
            read_prompt(tmp_path)
