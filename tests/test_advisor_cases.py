"""Critical cases live in the advisor YAML (`cases:`): the loader reads and validates them, the
shipped fit-query cases keep their exact expectations, and a user's own advisor gets its cases
evaluated with no code."""

from __future__ import annotations

import pytest
import yaml

from mondrian.core.config import ConfigError
from mondrian.core.contracts import Case, get_advisor, load_advisor, load_advisors
from mondrian.evaluate.cases import run_critical_cases
from mondrian.evaluate.report import evaluate_answers
from mondrian.evaluate.rows import EvalRow

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["kind"],
          "properties": {"kind": {"type": "string", "enum": ["wind", "solar"]},
                         "kw": {"type": "number", "minimum": 0},
                         "where": {"$ref": "#/$defs/area"}},
          "$defs": {"area": {"type": "string", "pattern": "^[A-Z]{1,2}$"}}}


def _write(tmp_path, cases, name: str = "mine") -> object:
    path = tmp_path / f"{name}.yaml"
    doc = {"name": name, "input_kind": "text", "system_prompt": "answer", "schema": SCHEMA}
    if cases is not None:
        doc["cases"] = cases
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_fit_query_cases_are_pinned():
    cases = get_advisor("fit-query").cases
    assert len(cases) == 3
    assert all(isinstance(c, Case) for c in cases)
    assert [c.name for c in cases] == ["berkshire wind over 100kw", "fit rate by id",
                                       "compare wind and solar in Yorkshire"]
    assert cases[0] == Case("berkshire wind over 100kw", "wind sites over 100kw in berkshire",
                            {"technology": "Wind", "capacity_min_kw": 100, "postcode_patterns": ["RG", "SL"]})
    assert cases[1].input == "what is the fit rate for fit id 1585"
    assert cases[1].expect == {"query_type": "fit_rate", "fit_id": "1585"}
    assert type(cases[1].expect["fit_id"]) is str and type(cases[0].expect["capacity_min_kw"]) is int
    assert cases[2].expect == {"query_type": "comparison", "technologies": ["Wind", "Photovoltaic"],
                               "postcode_patterns": ["YO", "HU", "DN", "HD", "WF", "LS", "BD"]}
    assert list(cases[2].expect) == ["query_type", "technologies", "postcode_patterns"]  # the report's order


def test_advisors_without_cases_have_none(tmp_path):
    assert load_advisors()["photo-critic"].cases == ()
    assert load_advisor(_write(tmp_path, None)).cases == ()
    assert load_advisor(_write(tmp_path, [])).cases == ()


def test_cases_do_not_change_the_fingerprint(tmp_path):
    bare = load_advisor(_write(tmp_path, None, "a"))
    with_cases = load_advisor(_write(tmp_path, [{"name": "x", "input": "wind", "expect": {"kind": "wind"}}], "a"))
    assert with_cases.cases and bare.fingerprint == with_cases.fingerprint


def test_a_valid_case_with_a_ref_field(tmp_path):
    adv = load_advisor(_write(tmp_path, [{"name": "kent wind", "input": "wind in kent over 5kw",
                                          "expect": {"kind": "wind", "kw": 5, "where": "ME"}}]))
    assert adv.cases == (Case("kent wind", "wind in kent over 5kw", {"kind": "wind", "kw": 5, "where": "ME"}),)


@pytest.mark.parametrize(("cases", "message"), [
    ({"name": "x"}, "cases must be a list"),
    (["just a question"], "case 1: expected a mapping"),
    ([{"name": "x", "input": "q", "expect": {"kind": "wind"}, "why": "typo"}], r"case 'x': unknown key\(s\) why"),
    ([{"name": "x", "expect": {"kind": "wind"}}], r"case 'x': missing key\(s\) input"),
    ([{"input": "q", "expect": {"kind": "wind"}}], r"case 1: missing key\(s\) name"),
    ([{"name": "x", "input": "", "expect": {"kind": "wind"}}], "case 'x': input must be a non-empty string"),
    ([{"name": 3, "input": "q", "expect": {"kind": "wind"}}], "case 1: name must be a non-empty string"),
    ([{"name": "x", "input": "q", "expect": {}}], "case 'x': expect must be a non-empty mapping"),
    ([{"name": "x", "input": "q", "expect": ["kind"]}], "case 'x': expect must be a non-empty mapping"),
    ([{"name": "x", "input": "q", "expect": {"kind": "wind", "colour": "red"}}],
     "case 'x': expect names colour, not field"),
    ([{"name": "x", "input": "q", "expect": {"kind": "tidal"}}], "case 'x': expect kind: 'tidal' is not one of"),
    ([{"name": "x", "input": "q", "expect": {"where": "kent"}}], "case 'x': expect where: 'kent' does not match"),
    ([{"name": "x", "input": "q", "expect": {"kind": "wind"}},
      {"name": "x", "input": "r", "expect": {"kind": "solar"}}], "case 'x': two cases have this name"),
])
def test_bad_cases_are_refused_naming_file_and_case(tmp_path, cases, message):
    path = _write(tmp_path, cases)
    with pytest.raises(ConfigError, match=message) as err:
        load_advisor(path)
    assert str(err.value).startswith(f"{path}: ")


def test_a_users_advisor_gets_its_cases_evaluated_with_no_code(tmp_path):
    folder = tmp_path / "advisors"
    folder.mkdir()
    _write(folder, [{"name": "solar", "input": "solar farms", "expect": {"kind": "solar"}},
                    {"name": "big wind", "input": "wind over 5kw", "expect": {"kind": "wind", "kw": 5}}])
    adv = get_advisor("mine", [folder])
    asked = []

    def stub(questions: list[str]) -> list[str]:
        asked.extend(questions)
        return ['{"kind":"solar","kw":3}', '{"kind":"wind","kw":6}']

    results = run_critical_cases(adv, stub)
    assert asked == ["solar farms", "wind over 5kw"]
    assert [r["passed"] for r in results] == [True, False]
    assert results[1]["problems"] == ["kw: expected 5, got 6"]
    rows = [EvalRow(0, 1, "wind", {"kind": "wind"}, [{"role": "user", "content": "wind"}])]
    report = evaluate_answers(adv, rows, {"base": ['{"kind":"wind"}']},
                              critical={"base": ['{"kind":"solar"}', '{"kind":"wind","kw":5.0}']})
    assert [c["question"] for c in report.critical["base"]] == ["solar farms", "wind over 5kw"]
    assert [c["passed"] for c in report.critical["base"]] == [True, True]
    assert report.summary()["base"]["critical_total"] == 2
    assert "## Critical cases" in report.to_markdown()
