"""Retrieval-augmented prompts: the index, the dataset rows that carry examples, the leakage
check over the index, and the advisor YAML that turns it on."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from mondrian.core.config import ConfigError
from mondrian.core.contracts import RETRIEVAL_METHODS, Retrieval, get_advisor, load_advisor
from mondrian.core.fingerprint import file_sha256
from mondrian.core.retrieval import (
    BY_NAME,
    COVER,
    COVER_SHOWN,
    INDEX_FILE,
    NEAREST,
    NEAREST_SHOWN,
    Example,
    RetrievalError,
    RetrievalIndex,
    prompt_messages,
)
from mondrian.dataset.leakage import check_leakage
from mondrian.link.linker import normalize_text, text_group
from tests.helpers import pipeline_dataset

ADV = "fit-query"
PLACES = {"berkshire": ["RG", "SL"], "yorkshire": ["YO", "HU", "DN", "HD", "WF", "LS", "BD"],
          "kent": ["CT", "ME", "TN", "DA", "BR"], "cornwall": ["TR", "PL"]}


def _example(question: str, answer: dict) -> Example:
    advisor = get_advisor(ADV)
    return Example(question, advisor.render(answer), text_group(question), f"job-{len(question)}-{question[:5]}")


def _index(k: int = 2) -> RetrievalIndex:
    """The default method: questions compared as typed, no advisor's view needed."""
    rows = [(f"{tech} sites in {place}", {"query_type": "search", "technology": t, "postcode_patterns": pc})
            for place, pc in PLACES.items() for tech, t in (("wind", "Wind"), ("solar", "Photovoltaic"))]
    rows.append(("what is the fit rate for fit id 12", {"query_type": "fit_rate", "fit_id": "12"}))
    return RetrievalIndex([_example(q, a) for q, a in rows], k)


def test_nearest_survives_typos_abbreviations_and_short_inputs():
    index = _index(k=2)
    # an abbreviation, a typo and a two-word question each find their place's examples
    for question, place in [("wind farms in berks", "berkshire"), ("solar in yorkshrie", "yorkshire"),
                            ("kent", "kent"), ("cornwal solar", "cornwall")]:
        got = index.nearest(question)
        assert len(got) == 2
        assert place in got[0].input, (question, [e.input for e in got])
        assert json.loads(got[0].answer)["postcode_patterns"] == PLACES[place]
    assert "fit rate" in index.nearest("fit id 99 rate?")[0].input
    assert RetrievalIndex([], 2).fit().nearest("kent") == []  # an empty index loads and finds none


def test_nearest_never_returns_an_excluded_group():
    index = _index(k=3)
    own = text_group("wind sites in kent")
    got = index.nearest("wind sites in kent", exclude_groups={own})
    assert len(got) == 3 and all(e.group != own for e in got)
    assert index.nearest("wind sites in kent")[0].group == own  # without the exclusion it comes first


def test_cover_shows_each_part_of_the_question_where_nearest_shows_one_part_four_times():
    # near-copies of "wind sites in kent" outrank the one example that knows yorkshire's areas
    rows = [("wind sites in kent", "Wind", "kent"), ("wind farms in kent", "Wind", "kent"),
            ("wind sites in kent please", "Wind", "kent"), ("list wind sites in kent", "Wind", "kent"),
            ("solar panels in cornwall", "Photovoltaic", "cornwall"), ("solar in berkshire", "Photovoltaic", "berkshire"),
            ("hydro schemes across yorkshire", "Hydro", "yorkshire"), ("wind in cornwall", "Wind", "cornwall")]
    examples = [_example(q, {"query_type": "search", "technology": t, "postcode_patterns": PLACES[p]})
                for q, t, p in rows]
    question = "wind sites in yorks"
    nearest = RetrievalIndex(examples, 2, NEAREST).nearest(question)
    cover = RetrievalIndex(examples, 2, COVER).nearest(question)
    assert RetrievalIndex(examples, 2).method == COVER  # the default
    assert all("kent" in e.input for e in nearest), [e.input for e in nearest]
    # the -shown methods choose as their typed twins do, over the shown text ("yorks" reads
    # "yorkshire"; these examples' questions read as typed)
    advisor = get_advisor(ADV)
    for asked in (question, "Hydro sites in Kent"):  # the second: nearest and cover differ
        shown = advisor.shown(asked)
        for method, typed in ((NEAREST_SHOWN, NEAREST), (COVER_SHOWN, COVER)):
            got = RetrievalIndex(examples, 2, method).viewed_as(advisor.fingerprint, advisor.shown).nearest(asked)
            assert got == RetrievalIndex(examples, 2, typed).nearest(shown), (asked, method)
    assert advisor.shown(question) == "wind sites in yorkshire"
    assert [e.input for e in cover] == ["wind sites in kent", "hydro schemes across yorkshire"]  # most similar first
    assert json.loads(cover[1].answer)["postcode_patterns"] == PLACES["yorkshire"]
    # the excluded group is never a candidate for coverage either
    assert "hydro schemes across yorkshire" not in [
        e.input for e in RetrievalIndex(examples, 2, COVER).nearest(question, exclude_groups={examples[6].group})]


def test_shown_methods_compare_questions_as_the_advisor_shows_them():
    """The model reads "berks" as "berkshire" (fit-query's input_synonyms): a SHOWN index finds
    the example the model will read alike, where typed text finds one that merely looks alike."""
    advisor = get_advisor(ADV)
    examples = [_example("wind farms in bucks", {"query_type": "search", "technology": "Wind"}),
                _example("wind turbines in berkshire", {"query_type": "search", "technology": "Wind",
                                                        "postcode_patterns": PLACES["berkshire"]})]
    question = "wind farms in berks"
    typed = RetrievalIndex(examples, 1, NEAREST)
    shown = RetrievalIndex(examples, 1, NEAREST_SHOWN)
    with pytest.raises(RetrievalError, match="compares questions as an advisor shows them"):
        shown.nearest(question)  # without the advisor's view it cannot know what alike means
    view = lambda t: advisor.shown(t)  # noqa: E731
    assert typed.viewed_as(advisor.fingerprint, view).nearest(question)[0].input == "wind farms in bucks"
    assert shown.viewed_as(advisor.fingerprint, view).nearest(question)[0].input == "wind turbines in berkshire"
    # prompt_messages gives the index its advisor's view; the shots are shown rewritten
    messages, got = prompt_messages(advisor, question, RetrievalIndex(examples, 1, COVER_SHOWN))
    assert [e.input for e in got] == ["wind turbines in berkshire"]
    assert messages[-1]["content"] == "wind farms in berkshire"
    # the YAML names both ways; an index written with the typed method is still asked as typed
    assert {BY_NAME[m] for m in RETRIEVAL_METHODS} == {COVER, NEAREST, COVER_SHOWN, NEAREST_SHOWN}
    _, got = prompt_messages(advisor, question, RetrievalIndex(examples, 1, NEAREST))
    assert [e.input for e in got] == ["wind farms in bucks"]


def test_an_index_keeps_the_method_it_was_written_with(tmp_path):
    """A version trained on k-nearest prompts is served with k-nearest prompts."""
    old = RetrievalIndex(_index().examples, 2, NEAREST)
    old.save(tmp_path / INDEX_FILE)
    again = RetrievalIndex.load(tmp_path / INDEX_FILE)
    assert again.method == NEAREST and again.fingerprint == old.fingerprint
    data = json.loads((tmp_path / INDEX_FILE).read_text())
    data["method"] = "bm25"
    (tmp_path / "other.json").write_text(json.dumps(data))
    with pytest.raises(RetrievalError, match=r"other.json: retrieval method 'bm25' is not known"):
        RetrievalIndex.load(tmp_path / "other.json")


def test_index_file_round_trip_fingerprint_and_errors(tmp_path):
    index = _index()
    fp = index.save(tmp_path / INDEX_FILE)
    assert fp == file_sha256(tmp_path / INDEX_FILE) == index.fingerprint
    again = RetrievalIndex.load(tmp_path / INDEX_FILE)
    assert again.fingerprint == fp and again.k == index.k
    assert [e.input for e in again.nearest("solar in kent")] == [e.input for e in index.nearest("solar in kent")]

    data = json.loads((tmp_path / INDEX_FILE).read_text())
    data["examples"][3]["answer"] = ""
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(RetrievalError, match=r"bad.json: example 4: input, answer and group"):
        RetrievalIndex.load(tmp_path / "bad.json")
    data = json.loads((tmp_path / INDEX_FILE).read_text()) | {"k": 0}
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(RetrievalError, match="k must be an integer"):
        RetrievalIndex.load(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(RetrievalError, match="not a readable retrieval index"):
        RetrievalIndex.load(tmp_path / "bad.json")


def test_prompt_messages_puts_the_most_similar_example_next_to_the_question():
    advisor, index = get_advisor(ADV), _index(k=2)
    messages, shown = prompt_messages(advisor, "wind in berkshire", index)
    roles = [m["role"] for m in messages]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user"]
    assert messages[-1]["content"] == "wind in berkshire"
    # fit-query shows inputs lower-cased (input_case: lower) and rewritten (mondrian.core.rewrite,
    # tests/test_rewrite.py); answers exactly as written
    assert messages[-3]["content"] == advisor.shown(shown[0].input, index.speller)
    assert messages[-2]["content"] == shown[0].answer
    assert messages[1]["content"] == advisor.shown(shown[1].input, index.speller)
    # no index, or an image: the plain prompt
    assert prompt_messages(advisor, "wind in berkshire")[0] == advisor.messages("wind in berkshire")
    assert prompt_messages(advisor, "x", index, image=True)[1] == []


def test_advisor_yaml_retrieval_block(tmp_path):
    assert get_advisor(ADV).retrieval == Retrieval(k=3, method="cover")
    assert get_advisor("photo-critic").retrieval is None
    src = (Path(get_advisor(ADV).source)).read_text()
    # retrieval is how prompts are built, not what an answer is: the contract's identity stays
    plain = tmp_path / "plain.yaml"
    plain.write_text(src.replace("retrieval: {k: 3}\n", "").replace("input_spelling: true\n", ""))
    assert load_advisor(plain).retrieval is None
    assert load_advisor(plain).fingerprint == replace(get_advisor(ADV), input_spelling=False).fingerprint
    plain.write_text(src.replace("retrieval: {k: 3}\n", ""))  # mending words needs the index's words
    with pytest.raises(ConfigError, match="input_spelling mends words from the retrieval index"):
        load_advisor(plain)
    for bad, message in [("retrieval: {k: 0}", "k must be an integer in 1..32"),
                         ("retrieval: {k: 4, metric: cosine}", "unknown key"),
                         ("retrieval: {k: 4, method: bm25}", "method must be one of cover, nearest, cover-shown"),
                         ("retrieval: 4", "must be a mapping")]:
        path = tmp_path / "bad.yaml"
        path.write_text(src.replace("retrieval: {k: 3}", bad))
        with pytest.raises(ConfigError, match=message):
            load_advisor(path)
    photo = Path(get_advisor("photo-critic").source).read_text()
    path = tmp_path / "photo.yaml"
    path.write_text(photo + "\nretrieval: {k: 2}\n")
    with pytest.raises(ConfigError, match="only text advisors"):
        load_advisor(path)


def test_input_case_lower_shows_typed_inputs_lower_cased_and_is_part_of_the_identity(tmp_path):
    advisor, index = get_advisor(ADV), _index(k=2)
    assert advisor.input_case == "lower" and get_advisor("photo-critic").input_case == "as_typed"
    shouted, shown = prompt_messages(advisor, "WIND IN BERKSHIRE", index)
    typed, _ = prompt_messages(advisor, "wind in berkshire", index)
    assert shouted == typed  # same examples, same text: a shouted question reads as a typed one
    assert [m["content"] for m in shouted[1:-1:2]] == [advisor.shown(e.input, index.speller) for e in reversed(shown)]
    assert all(m["content"] == m["content"].lower() for m in shouted[1:-1:2])
    assert [m["content"] for m in shouted[2:-1:2]] == [e.answer for e in reversed(shown)]  # answers untouched
    assert any(e.answer != e.answer.lower() for e in shown)  # so the line above can fail
    src = Path(advisor.source).read_text()
    plain = tmp_path / "plain.yaml"
    plain.write_text(src.replace("input_case: lower\n", ""))
    as_typed = load_advisor(plain)
    assert as_typed.input_case == "as_typed"
    assert as_typed.messages("WIND IN BERKSHIRE")[-1]["content"] == "WIND IN BERKSHIRE"
    # the text a model is taught on changes, so the contract's identity does
    assert as_typed.fingerprint != advisor.fingerprint
    bad = tmp_path / "bad.yaml"
    bad.write_text(src.replace("input_case: lower", "input_case: upper"))
    with pytest.raises(ConfigError, match="input_case 'upper' must be one of as_typed, lower"):
        load_advisor(bad)


# ---- the dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return pipeline_dataset(tmp_path_factory.mktemp("ws"), ADV, retrieval=True, n_fit=240, n_photo=0)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_dataset_writes_the_index_and_every_row_shows_k_examples_not_its_own(dataset):
    stats = json.loads((dataset / "dataset_stats.json").read_text())
    index = RetrievalIndex.load(dataset / INDEX_FILE)
    assert stats["retrieval"]["fingerprint"] == file_sha256(dataset / INDEX_FILE) == index.fingerprint
    assert stats["fingerprints"][INDEX_FILE] == index.fingerprint
    k = get_advisor(ADV).retrieval.k
    assert stats["retrieval"]["k"] == k and stats["leakage"]["index_examples"] == len(index.examples)
    assert stats["retrieval"]["method"] == index.method == COVER  # the advisor's `method: cover` (default)
    assert f"retrieval: k={k}" in (dataset / "dataset_stats.md").read_text()
    train = _rows(dataset / "train.jsonl")
    # one example per distinct train question, and nothing else (rows show questions rewritten)
    advisor = get_advisor(ADV)
    assert {normalize_text(advisor.shown(e.input, index.speller)) for e in index.examples} == \
        {normalize_text(r["messages"][-2]["content"]) for r in train}
    for split in ("train", "valid", "test"):
        for row in _rows(dataset / f"{split}.jsonl"):
            msgs = row["messages"]
            assert [m["role"] for m in msgs] == ["system"] + ["user", "assistant"] * (k + 1)
            question = normalize_text(msgs[-2]["content"])
            shown = [normalize_text(m["content"]) for m in msgs[1:-2:2]]
            assert question not in shown  # never its own answer, nor a re-asked copy
            answers = {advisor.shown(e.input, index.speller): e.answer for e in index.examples}  # as shown
            assert all(answers[m["content"]] == a["content"] for m, a in zip(msgs[1:-2:2], msgs[2:-2:2], strict=True))
    held_out = {normalize_text(r["messages"][-2]["content"])
                for s in ("valid", "test") for r in _rows(dataset / f"{s}.jsonl")}
    assert held_out and not held_out & {normalize_text(advisor.shown(e.input, index.speller)) for e in index.examples}


def test_leakage_check_reads_the_index(dataset, tmp_path):
    import shutil

    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy)
    assert check_leakage(copy).ok
    test_q = _rows(copy / "test.jsonl")[0]["messages"][-2]["content"]
    data = json.loads((copy / INDEX_FILE).read_text())
    data["examples"].append({"input": test_q.upper() + "  ", "answer": "{}", "group": "g", "job_id": "x"})
    (copy / INDEX_FILE).write_text(json.dumps(data))
    report = check_leakage(copy)
    assert not report.ok
    assert [g.key for g in report.leaked] == [normalize_text(test_q)]
    assert report.leaked[0].splits == {"train": 1, "test": 1}
    # an example typed with another bound word reads as the test row does: a leak too
    bounded = next(r["messages"][-2]["content"] for r in _rows(copy / "test.jsonl")
                   if " max " in f' {r["messages"][-2]["content"]} ')
    data["examples"][-1]["input"] = f' {bounded} '.replace(" max ", " no more than ").strip()
    (copy / INDEX_FILE).write_text(json.dumps(data))
    assert [g.key for g in check_leakage(copy).leaked] == [normalize_text(bounded)]
    (copy / INDEX_FILE).write_text("[]")
    report = check_leakage(copy)
    assert not report.ok and "format must be" in report.problems[0]
