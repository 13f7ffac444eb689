"""mondrian.evaluate (metrics, stats, cases, report, rows, run): metrics on hand-made answers, paired statistics against scipy,
critical cases with a stub model, and the real thing end to end on the tiny llama with a LoRA
adapter (scale 0 == base logits bit for bit, batched == one-at-a-time greedy, report files,
the eval run in SQLite, JSON-Schema-constrained decoding)."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from mondrian.core.contracts import get_advisor
from mondrian.evaluate import cases as crit_cases
from mondrian.evaluate import metrics, stats
from mondrian.evaluate import report as rep
from mondrian.evaluate import rows as ev_rows
from mondrian.evaluate import run as ev
from mondrian.models import constrained
from mondrian.models import generation as gen
from mondrian.train.runs import RunStore

FIT = get_advisor("fit-query")


# ---------------------------------------------------------------------------------------------
# metrics on hand-made answers

REFS = [
    {"query_type": "search", "technology": "Wind", "capacity_min_kw": 100, "postcode_patterns": ["RG", "SL"]},
    {"query_type": "fit_rate", "fit_id": "1585"},
    {"query_type": "search", "capacity_max_kw": 50},
    {"query_type": "comparison", "technologies": ["Wind", "Photovoltaic"]},
    {"query_type": "search", "capacity_min_kw": 1000, "postcode_patterns": ["YO", "HU", "LS"]},
]
ANSWERS = [
    # exact: 100.0 is 100, key order does not matter
    '  {"postcode_patterns":["RG","SL"],"query_type":"search","technology":"Wind","capacity_min_kw":100.0}\n',
    '{"query_type":"fit_rate","fit_id":1585}',  # JSON, breaks the contract (fit_id must be a string)
    '{"query_type":"search","capacity_max_kw":52,"technology":"Hydro"}',  # compliant; invents technology
    "Wind and solar are both popular.",  # not JSON
    '{"query_type":"search","capacity_min_kw":1500,"postcode_patterns":["LS","YO"]}',  # compliant, two wrong
]


def _scores():
    return [metrics.score_answer(FIT, r, a) for r, a in zip(REFS, ANSWERS, strict=True)]


def test_score_answer_statuses():
    s = _scores()
    assert [x.parsed for x in s] == [True, True, True, False, True]
    assert [x.compliant for x in s] == [True, False, True, False, True]
    assert [x.exact for x in s] == [True, False, False, False, False]
    assert s[1].fields["fit_id"].status == "wrong"  # "1585" != 1585: type-strict
    assert any("fit_id" in v for v in s[1].violations)
    assert s[2].fields["technology"].status == "invented"
    assert s[2].fields["capacity_max_kw"].status == "wrong" and s[2].fields["capacity_max_kw"].within_tol
    assert s[3].fields["technologies"].status == "missing" and s[3].fields["query_type"].status == "missing"
    assert s[4].fields["capacity_min_kw"].within_tol is False
    assert s[4].fields["postcode_patterns"].f1 == pytest.approx(0.8)
    assert s[0].fields["fit_id"].status == "absent"
    problems = " | ".join(s[2].problems())
    assert "technology: invented \"Hydro\"" in problems and "capacity_max_kw: expected 50, got 52" in problems
    assert s[3].problems()[0].startswith("not JSON")
    assert s[3].severity > s[1].severity > s[4].severity > s[0].severity


def test_score_answer_edge_cases():
    ref = {"query_type": "search", "include_revenue": True}
    assert metrics.score_answer(FIT, ref, '{"query_type":"search","include_revenue":1}').fields["include_revenue"].status == "wrong"
    arr = metrics.score_answer(FIT, ref, "[1, 2]")
    assert arr.parsed and not arr.compliant and not arr.exact and arr.fields["query_type"].status == "missing"
    extra = metrics.score_answer(FIT, ref, '{"query_type":"search","include_revenue":true,"colour":"red"}')
    assert extra.extra_keys == ["colour"] and not extra.compliant and not extra.exact
    for bad in ('{"query_type":"search","query_type":"search"}', '{"query_type":NaN}', ""):
        assert not metrics.score_answer(FIT, ref, bad).parsed


def test_arm_metrics_known_values():
    gens = [gen.Generation(a, tokens=10 + i, latency_s=float(i + 1)) for i, a in enumerate(ANSWERS)]
    m = metrics.arm_metrics(FIT, _scores(), gens, wall_s=2.0, generated=5, generated_tokens=60)
    assert (m["parse_rate"], m["compliance"], m["exact_match"]) == (0.8, 0.6, 0.2)
    assert m["field_accuracy"] == pytest.approx(7 / 14)
    f = m["fields"]
    assert (f["query_type"]["n"], f["query_type"]["accuracy"], f["query_type"]["missing"]) == (5, 0.8, 1)
    assert (f["technology"]["support"], f["technology"]["n"], f["technology"]["invented"]) == (1, 2, 1)
    assert f["technology"]["accuracy"] == 0.5
    cmin = f["capacity_min_kw"]
    assert (cmin["accuracy"], cmin["tol_accuracy"], cmin["mae"]) == (0.5, 0.5, 250.0)
    assert cmin["r2"] == pytest.approx(1 - 500**2 / (2 * 450**2))
    cmax = f["capacity_max_kw"]
    assert (cmax["accuracy"], cmax["tol_accuracy"], cmax["mae"], cmax["r2"]) == (0.0, 1.0, 2.0, None)
    assert f["postcode_patterns"]["f1"] == pytest.approx(0.9) and f["postcode_patterns"]["accuracy"] == 0.5
    assert f["technologies"]["f1"] == 0.0 and f["fit_id"]["accuracy"] == 0.0
    assert f["aggregation"]["n"] == 0 and f["aggregation"]["accuracy"] is None
    assert m["latency_p50_s"] == 3.0 and m["latency_p95_s"] == pytest.approx(4.8)
    assert (m["answers_per_s"], m["tokens_per_s"]) == (2.5, 30.0)
    assert (m["mean_tokens"], m["longest_tokens"]) == (12.0, 14)


# ---------------------------------------------------------------------------------------------
# statistics


@pytest.mark.parametrize("a_only,b_only", [(0, 3), (1, 7), (5, 5), (0, 24), (12, 0), (3, 20)])
def test_mcnemar_exact_matches_scipy_binomtest(a_only, b_only):
    from scipy.stats import binomtest

    a = [True] * a_only + [False] * b_only + [True] * 7 + [False] * 4
    b = [False] * a_only + [True] * b_only + [True] * 7 + [False] * 4
    res = stats.mcnemar(a, b)
    assert (res.a_only, res.b_only, res.both, res.neither, res.method) == (a_only, b_only, 7, 4, "exact")
    assert res.p_value == pytest.approx(binomtest(a_only, a_only + b_only, 0.5).pvalue, rel=1e-12)


def test_mcnemar_chi2_for_many_discordant_pairs_and_none():
    from scipy.stats import chi2

    a = [True] * 30 + [False] * 12
    b = [False] * 30 + [True] * 12
    res = stats.mcnemar(a, b)
    assert res.method == "chi2" and res.statistic == pytest.approx((18 - 1) ** 2 / 42)
    assert res.p_value == pytest.approx(chi2.sf(res.statistic, 1), rel=1e-9)
    same = stats.mcnemar([True, False], [True, False])
    assert (same.method, same.p_value) == ("none", 1.0)
    with pytest.raises(ValueError):
        stats.mcnemar([True], [True, False])


def test_bootstrap_interval_contains_truth_and_is_seeded():
    rng = np.random.default_rng(7)
    n = 400
    u = rng.random(n)
    a = (u < 0.5).astype(float)  # P(a) = 0.5
    b = (u < 0.8).astype(float)  # P(b) = 0.8, paired with a: true difference 0.3
    ones = np.ones(n)
    ci = stats.bootstrap_diff(a, ones, b, ones, resamples=2000, seed=3)
    assert ci.low < 0.3 < ci.high and ci.high - ci.low < 0.15
    assert ci.estimate == pytest.approx(b.mean() - a.mean())
    assert stats.bootstrap_diff(a, ones, b, ones, resamples=2000, seed=3) == ci
    assert stats.bootstrap_diff(a, ones, b, ones, resamples=2000, seed=4) != ci
    # a ratio statistic (field accuracy): correct / relevant per row
    den = rng.integers(1, 4, n).astype(float)
    r = stats.bootstrap_diff(np.minimum(a * 3, den), den, np.minimum(b * 3, den), den, seed=0)
    assert r.low <= r.estimate <= r.high


def test_small_helpers():
    assert stats.set_f1(["a", "b"], ["a", "b", "c"]) == pytest.approx(0.8)
    assert stats.set_f1([], []) == 1.0 and stats.set_f1(["x"], ["y"]) == 0.0
    assert stats.r2([1, 2, 3], [1, 2, 3]) == 1.0 and stats.r2([1, 1], [2, 2]) is None
    assert stats.binom_two_sided_p(5, 10) == 1.0 and stats.binom_two_sided_p(0, 0) == 1.0


# ---------------------------------------------------------------------------------------------
# critical cases with a stub model


def test_critical_cases_are_the_generators_phrases():
    from mondrian.demo.questions import (
        PLACES,
        capacity_min,
        compose,
        fit_id,
        place,
        technologies,
        technology,
    )

    built = [
        compose("search", technology("wind"), "sites", capacity_min(100), place("berkshire")),
        compose("fit_rate", "what is the fit rate for", fit_id(1585)),
        compose("comparison", "compare", technologies(["wind", "solar"]), place("Yorkshire")),
    ]
    cases = FIT.cases
    assert [c.input for c in cases] == [q for q, _ in built]
    for case, (_, answer) in zip(cases, built, strict=True):
        assert all(answer[k] == v for k, v in case.expect.items())
    assert cases[2].expect["postcode_patterns"] == list(PLACES["Yorkshire"])
    assert get_advisor("photo-critic").cases == ()


def test_critical_cases_with_a_stub_model():
    right = {
        "wind sites over 100kw in berkshire":
            '{"query_type":"search","technology":"Wind","capacity_min_kw":100,"postcode_patterns":["RG","SL"]}',
        "what is the fit rate for fit id 1585": '{"query_type":"fit_rate","fit_id":"1585"}',
        "compare wind and solar in Yorkshire": '{"query_type":"comparison","technologies":["Wind","Photovoltaic"],'
                                               '"postcode_patterns":["YO","HU","DN","HD","WF","LS","BD"]}',
    }
    asked = []

    def stub(questions):
        asked.extend(questions)
        return [right[q] for q in questions]

    results = crit_cases.run_critical_cases(FIT, stub)
    assert asked == list(right) and all(r["passed"] for r in results)

    wrong = dict(right)
    wrong["what is the fit rate for fit id 1585"] = '{"query_type":"fit_rate","fit_id":1585}'  # not a string
    wrong["compare wind and solar in Yorkshire"] = '{"query_type":"comparison","technologies":["Wind","Photovoltaic"],"postcode_patterns":["LS"]}'
    # only the named fields (and compliance) count: an extra valid field does not fail case 1
    wrong["wind sites over 100kw in berkshire"] = ('{"query_type":"search","technology":"Wind","capacity_min_kw":100,'
                                                    '"postcode_patterns":["RG","SL"],"include_revenue":false}')
    results = crit_cases.run_critical_cases(FIT, lambda qs: [wrong[q] for q in qs])
    assert [r["passed"] for r in results] == [True, False, False]
    assert not results[1]["compliant"] and results[1]["checks"]["fit_id"]["ok"] is False
    assert results[2]["compliant"] and any("postcode_patterns" in p for p in results[2]["problems"])


# ---------------------------------------------------------------------------------------------
# the report, from hand-made arms


def _rows(n: int = 5) -> list[ev_rows.EvalRow]:
    return [ev_rows.EvalRow(i, i + 1, f"question {i}", REFS[i], [{"role": "user", "content": f"question {i}"}])
            for i in range(n)]


def test_report_sections_from_hand_made_arms(tmp_path):
    rendered = [FIT.render(r) for r in REFS]
    answers = {"base": ["no idea"] * 5, "adapter": [ANSWERS[0], rendered[1], ANSWERS[2], rendered[3], ANSWERS[4]]}
    crit = {"base": ["nope"] * 3, "adapter": ['{"query_type":"fit_rate","fit_id":"1585"}'] * 3}
    report = rep.evaluate_answers(FIT, _rows(), answers, critical=crit, walls={"base": (1.0, 8, 80)},
                                 config={"split": "test", "batch_size": 4, "max_tokens": 64})
    c = report.comparison("base", "adapter")
    assert c["exact_match"]["b"] == 0.6 and c["exact_match"]["mcnemar"]["b_only"] == 3
    assert c["compliance"]["mcnemar"]["p_value"] == pytest.approx(stats.binom_two_sided_p(0, 5))
    assert [r["passed"] for r in report.critical["adapter"]] == [False, True, False]
    out = rep.write_report(report, tmp_path / "out")
    md = (out / "report.md").read_text()
    for section in ("## Summary", "## Per field", "## Critical cases", "## Worst failures of the adapter arm",
                    "## Where base and adapter differ", "| exact match | 0.0% | 60.0% |"):
        assert section in md, section
    assert "capacity_min_kw: expected 1000, got 1500" in md  # what was wrong, in words
    data = json.loads((out / "report.json").read_text())
    assert data["arms"]["adapter"]["exact_match"] == 0.6 and len(data["rows"]) == 5
    assert data["arms"]["base"]["answers_per_s"] == 8.0
    assert json.loads((out / "metrics.json").read_text())["adapter"]["exact_match"] == 0.6
    assert report.metric_rows()["adapter_vs_base.exact_match.diff"] == pytest.approx(0.6)


# ---------------------------------------------------------------------------------------------
# end to end on the tiny llama with a LoRA adapter


@pytest.fixture(scope="module")
def tiny_setup(tiny_llama, tmp_path_factory):
    """The tiny llama, a LoRA adapter with random non-zero weights (so it changes the answers)
    in mlx-lm's folder format, and a small fit-query dataset folder."""
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from mondrian.demo.questions import generate

    root = tmp_path_factory.mktemp("evaluate")
    adapter = root / "adapter"
    adapter.mkdir()
    params = {"rank": 4, "scale": 10.0, "dropout": 0.0}
    model, _ = load(tiny_llama.path)
    model.freeze()
    linear_to_lora_layers(model, 2, params)
    mx.random.seed(11)
    weights = {k: 0.05 * mx.random.normal(v.shape) for k, v in tree_flatten(model.trainable_parameters())}
    mx.save_safetensors(str(adapter / "adapters.safetensors"), weights)
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"model": tiny_llama.path, "fine_tune_type": "lora", "num_layers": 2, "lora_parameters": params}))
    data = root / "data"
    data.mkdir()
    for split, n, seed in (("train", 4, 1), ("test", 6, 2)):
        lines = [json.dumps({"messages": [{"role": "system", "content": FIT.system_prompt},
                                          {"role": "user", "content": ex.question},
                                          {"role": "assistant", "content": FIT.render(ex.answer)}]})
                 for ex in generate(n, seed=seed)]
        (data / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return tiny_llama.path, adapter, data


@pytest.fixture(scope="module")
def tiny_loaded(tiny_setup):
    from mlx_lm import load

    base_path, adapter, _ = tiny_setup
    return load(base_path, adapter_path=str(adapter))


def test_scale_zero_is_the_base_model_bit_for_bit(tiny_setup, tiny_loaded):
    from mlx_lm import load

    base_path, _, _ = tiny_setup
    plain, tok = load(base_path)
    model, _ = tiny_loaded
    switch = gen.AdapterSwitch(model)
    assert len(switch.layers) > 0 and all(s == 10.0 for s in switch.scales)
    tokens = mx.array([gen.chat_prompt(tok, [{"role": "user", "content": "wind sites over 100kw in kent"}])])
    want = plain(tokens)
    switch.set(True)
    on = model(tokens)
    switch.set(False)
    off = model(tokens)
    switch.set(True)
    assert not mx.array_equal(on, want).item()  # the adapter does something
    assert mx.array_equal(off, want).item()  # and scale 0 is exactly the base
    assert mx.array_equal(model(tokens), on).item()  # switching back restores it


@pytest.mark.parametrize("on", [False, True], ids=["base", "adapter"])
def test_batched_answers_equal_one_at_a_time(tiny_setup, tiny_loaded, on):
    from mlx_lm import batch_generate, generate

    _, _, data = tiny_setup
    model, tok = tiny_loaded
    switch = gen.AdapterSwitch(model)
    rows = ev_rows.load_rows(data, "test", FIT)
    prompts = [gen.chat_prompt(tok, r.messages) for r in rows]
    assert len({len(p) for p in prompts}) > 1  # different lengths: padding is exercised
    try:
        switch.set(on)
        gens, wall = gen.generate_batch(model, tok, prompts, batch_size=4, max_tokens=12)  # 6 rows: slots refill
        singles = [generate(model, tok, p, max_tokens=12) for p in prompts]
        peer = batch_generate(model, tok, prompts, max_tokens=12).texts
    finally:
        switch.set(True)
    texts = [g.text for g in gens]
    assert texts == peer
    # mlx_lm.generate's streaming detokenizer drops a leading space of the first token
    # (trim_space in mlx_lm.tokenizer_utils); batch_generate keeps it, as we do
    assert [t.removeprefix(" ") for t in texts] == [t.removeprefix(" ") for t in singles]
    assert wall > 0 and all(g.latency_s > 0 and 1 <= g.tokens <= 12 for g in gens)


def test_evaluate_end_to_end_on_a_tiny_model(tiny_setup, tmp_path):
    base_path, adapter, data = tiny_setup
    db = tmp_path / "runs.db"
    report = ev.evaluate(base_path, adapter, data, FIT, limit=5, batch_size=3, max_tokens=10, db=db,
                         out_dir=tmp_path / "out", resamples=200)
    assert list(report.arms) == ["base", "adapter"] and len(report.rows) == 5
    assert report.arms["base"]["parse_rate"] == 0.0  # random weights babble
    assert report.arms["adapter"]["answers_per_s"] > 0 and report.arms["base"]["latency_p95_s"] > 0
    assert set(report.critical) == {"base", "adapter"} and len(report.critical["adapter"]) == 3
    differ = [r for r in report.rows if r["arms"]["base"]["answer"] != r["arms"]["adapter"]["answer"]]
    assert differ  # same rows, different arms
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Summary" in md and "## Critical cases" in md and "wind sites over 100kw in berkshire" in md
    assert json.loads((tmp_path / "out" / "report.json").read_text())["run_id"] == report.run_id

    store = RunStore(db)
    run = store.get(report.run_id)
    metrics = {n: v for _, n, v in store.metrics(report.run_id)}
    steps = {s for s, _, _ in store.metrics(report.run_id)}
    store.close()
    from mondrian.core.fingerprint import file_sha256

    assert run["kind"] == "eval" and run["status"] == "completed" and run["advisor"] == "fit-query"
    assert run["dataset_fingerprint"] == file_sha256(data / "test.jsonl")
    assert len(run["base_model_fingerprint"]) == 64 and run["adapter_path"] == str(adapter.resolve())
    assert run["config"]["batch_size"] == 3 and run["summary"]["adapter"]["parse_rate"] == 0.0
    assert "adapter_vs_base" in run["summary"] and steps == {0}
    assert metrics["base.parse_rate"] == 0.0 and "adapter_vs_base.exact_match.p_value" in metrics


def test_evaluate_refuses_what_it_cannot_do(tiny_setup, tmp_path):
    base_path, adapter, data = tiny_setup
    with pytest.raises(ev.EvalError, match="valid.jsonl: missing"):
        ev.evaluate(base_path, adapter, data, FIT, split="valid", db=tmp_path / "r.db")
    with pytest.raises(ev.EvalError, match="does not exist"):
        ev.evaluate(base_path, tmp_path / "nope", data, FIT, db=tmp_path / "r.db")
    dora = tmp_path / "dora"
    dora.mkdir()
    (dora / "adapters.safetensors").write_bytes((adapter / "adapters.safetensors").read_bytes())
    cfg = json.loads((adapter / "adapter_config.json").read_text()) | {"fine_tune_type": "dora"}
    (dora / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ev.EvalError, match="only LoRA"):
        ev.evaluate(base_path, dora, data, FIT, db=tmp_path / "r.db")


def test_constrained_decoding_makes_a_random_model_write_the_contract(tiny_loaded, tmp_path):
    """llguidance's mask through numpy + mx.where: even random weights write valid objects."""
    from mondrian.core.contracts import Advisor, load_advisor

    model, tok = tiny_loaded
    schema = {"type": "object", "additionalProperties": False, "required": ["kind", "ok"],
              "properties": {"kind": {"type": "string", "enum": ["wind", "solar", "hydro"]},
                             "ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}}}
    import yaml

    small = tmp_path / "small.yaml"

    small.write_text(yaml.safe_dump({"name": "small", "input_kind": "text", "system_prompt": "answer", "schema": schema}))
    adv: Advisor = load_advisor(small)
    constraint = constrained.SchemaConstraint(adv.schema, tok)
    prompts = [gen.chat_prompt(tok, [{"role": "user", "content": q}]) for q in ("wind in kent", "solar", "hydro?")]
    free, _ = gen.generate_batch(model, tok, prompts, batch_size=2, max_tokens=40)
    held, _ = gen.generate_batch(model, tok, prompts, batch_size=2, max_tokens=40,
                                logits_processors=[constraint.processor() for _ in prompts])
    assert not any(metrics.score_answer(adv, {"kind": "wind", "ok": True}, g.text).parsed for g in free)
    for g in held:
        s = metrics.score_answer(adv, {"kind": "wind", "ok": True}, g.text)
        assert s.compliant and g.finish_reason == "stop", g.text
        assert " " not in g.text  # compact, as Advisor.render writes training answers


def test_evaluate_constrained_arms(tiny_setup, tmp_path):
    base_path, adapter, data = tiny_setup
    report = ev.evaluate(base_path, adapter, data, FIT, limit=3, batch_size=3, max_tokens=8, db=tmp_path / "r.db",
                         out_dir=tmp_path / "out", constrained=True, resamples=100)
    assert list(report.arms) == ["base", "adapter", "base_constrained", "adapter_constrained"]
    assert [(c["a"], c["b"]) for c in report.comparisons] == [
        ("base", "adapter"), ("base_constrained", "adapter_constrained"),
        ("base", "base_constrained"), ("adapter", "adapter_constrained")]
    for row in report.rows:  # 8 tokens cannot finish an object, but every token so far fits the grammar
        assert row["arms"]["adapter_constrained"]["answer"].startswith('{"query_type":"')
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Constrained decoding" in md and "uniqueItems" in md


def _answers_and_breakers() -> tuple[list[dict], list[dict]]:
    from mondrian.demo.questions import generate

    good = [ex.answer for ex in generate(300, seed=5)]
    bad = [{"query_type": "fit_rate"}, {"query_type": "comparison", "technology": "Wind"},
           {"query_type": "aggregation", "technology": "Hydro"},
           {"query_type": "search", "technology": "Wind", "technologies": ["Wind", "Hydro"]},
           {"query_type": "comparison", "technologies": ["Wind", "Hydro"], "technology": "Wind"},
           {"query_type": "search", "exclude_technologies": ["Wind", "Hydro", "Wind", "Hydro", "Wind", "Hydro"]}]
    return good, bad


def test_grammar_schema_says_what_the_contract_says():
    """The rewrite for llguidance (if/then and not -> anyOf branches) accepts exactly what
    the contract accepts, on every generated answer and on answers that break the rules."""
    import jsonschema

    rewritten, notes = constrained.grammar_schema(FIT.schema)
    assert len(rewritten["anyOf"]) == 7 and any("anyOf" in n for n in notes)  # 4 query types x 2 exclusions, less comparison-without-technologies
    check = jsonschema.Draft202012Validator(rewritten)
    good, bad = _answers_and_breakers()
    assert {a["query_type"] for a in good} == {"search", "fit_rate", "comparison", "aggregation"}
    for obj in good + bad:
        assert check.is_valid(obj) == (not FIT.violations(obj)), obj
    assert sum(check.is_valid(b) for b in bad) == 0
    assert constrained.grammar_schema({"type": "object", "properties": {"a": {"type": "string"}}})[1] == []


def test_grammar_takes_every_contract_answer_and_refuses_inconsistent_ones(tiny_loaded):
    import llguidance

    _, tok = tiny_loaded
    constraint = constrained.SchemaConstraint(FIT.schema, tok)
    # llguidance ignores uniqueItems; the processor holds it for every list of strings
    assert constraint.unique == {"technologies", "exclude_technologies", "postcode_patterns"}
    assert not any("uniqueItems" in w for w in constraint.warnings)
    good, bad = _answers_and_breakers()
    for obj in good[:120]:
        ids = tok.encode(FIT.render(obj), add_special_tokens=False)
        m = llguidance.LLMatcher(constraint.lltok, constraint.grammar, log_level=0)
        assert m.consume_tokens(ids) and m.is_accepting(), FIT.render(obj)
    for obj in bad[:5]:  # the last one only breaks uniqueItems, which the processor (not the grammar) holds
        ids = tok.encode(FIT.render(obj), add_special_tokens=False)
        m = llguidance.LLMatcher(constraint.lltok, constraint.grammar, log_level=0)
        assert not (m.consume_tokens(ids) and m.is_accepting()), FIT.render(obj)
