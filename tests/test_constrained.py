"""Contract-constrained decoding (mondrian.models.constrained): lists cannot repeat an item or
run past their cap, on SmolLM2's real tokenizer and a real decode."""

import json
import math

import llguidance
import mlx.core as mx
import numpy as np
import pytest

from mondrian.core.contracts import get_advisor
from mondrian.models import constrained
from mondrian.models.generation import chat_prompt, generate_batch

FIT = get_advisor("fit-query")
SCOT = '{"query_type":"search","technology":"Hydro","postcode_patterns":["KW","KY"'


@pytest.mark.parametrize(("text", "want"), [
    ('{"query_type":"search"', (None, [], None)),
    ('{"query_type":"search","postcode_patterns":[', ("postcode_patterns", [], None)),
    ('{"postcode_patterns":["KW","K', ("postcode_patterns", ["KW"], "K")),
    ('{"postcode_patterns":["KW","KY",', ("postcode_patterns", ["KW", "KY"], None)),
    ('{"postcode_patterns":["KW"],"technology":"Wi', (None, [], None)),
    ('{"technologies":["Wind","Hydro"],"postcode_patterns":["A\\"B', ("postcode_patterns", [], 'A\\"B')),
])
def test_open_list_finds_the_list_being_written(text, want):
    assert constrained.open_list(text) == want


def test_list_caps_are_the_longest_lists_in_the_data():
    answers = [{"postcode_patterns": ["RG", "SL"], "technologies": ["Wind", "Hydro"]},
               {"postcode_patterns": ["NR", "IP", "CB"]}, {"query_type": "search"}]
    assert constrained.list_caps(answers) == {"postcode_patterns": 3, "technologies": 2}


@pytest.fixture(scope="module")
def fit_constraint(smollm2_loaded):
    _, tok = smollm2_loaded
    return constrained.SchemaConstraint(FIT.schema, tok, max_items={"postcode_patterns": 16})


def _masked_after(constraint, tok, prefix: str) -> mx.array:
    """The processor's logits (all zeros in) after the answer `prefix`."""
    proc = constraint.processor()
    prompt = mx.array(chat_prompt(tok, [{"role": "user", "content": "hydro in scotland"}]))
    vocab = constraint.vocab
    proc(prompt, mx.zeros((1, vocab)))
    answer = mx.array(tok.encode(prefix, add_special_tokens=False))
    return proc(mx.concatenate([prompt, answer]), mx.zeros((1, vocab)))[0]


def test_a_token_that_would_repeat_an_item_is_masked(smollm2_loaded, fit_constraint):
    _, tok = smollm2_loaded
    assert fit_constraint.unique == {"technologies", "exclude_technologies", "postcode_patterns"}
    logits = _masked_after(fit_constraint, tok, SCOT + ',"K')
    finite = {i for i, v in enumerate(logits.tolist()) if not math.isinf(v)}
    letter = {c: tok.encode(c, add_special_tokens=False) for c in "AWY"}
    assert all(len(ids) == 1 for ids in letter.values())
    # "K" + W or + Y would be an item already there (and two letters must close): masked;
    # "K" + A is new, and "K" alone closed by '"' or '","' is new
    assert letter["W"][0] not in finite and letter["Y"][0] not in finite
    assert letter["A"][0] in finite
    assert [t for t, text in enumerate(fit_constraint.texts) if text.startswith('"') and t in finite]


def test_a_whole_item_in_one_token_is_masked_when_it_repeats(smollm2_loaded, fit_constraint):
    _, tok = smollm2_loaded
    logits = _masked_after(fit_constraint, tok, SCOT + ",")
    finite = {i for i, v in enumerate(logits.tolist()) if not math.isinf(v)}
    whole = {t: text.split('"')[1] for t, text in enumerate(fit_constraint.texts) if text.count('"') >= 2}
    assert not [t for t, item in whole.items() if item in ("KW", "KY") and t in finite]


def test_an_enum_list_never_starts_an_item_that_can_only_repeat(smollm2_loaded, fit_constraint):
    _, tok = smollm2_loaded
    taken = ["Micro CHP", "Wind"]
    logits = _masked_after(fit_constraint, tok, '{"query_type":"search","exclude_technologies":["Micro CHP","Wind",')
    finite = [i for i, v in enumerate(logits.tolist()) if not math.isinf(v)]
    assert finite
    enum = fit_constraint.enums["exclude_technologies"]
    for t in finite:
        after = constrained.item_after(None, fit_constraint.texts[t])
        if after:  # whatever item it starts can still become a value not taken
            assert any(v.startswith(after[0]) and v not in taken for v in enum), fit_constraint.texts[t]


def test_when_only_repeats_are_left_the_answer_ends(smollm2_loaded, fit_constraint):
    _, tok = smollm2_loaded
    # reached only if a repeat was already typed (2 letters: only '"' may follow)
    logits = _masked_after(fit_constraint, tok, SCOT + ',"KW')
    finite = [i for i, v in enumerate(logits.tolist()) if not math.isinf(v)]
    assert finite and set(finite) <= set(fit_constraint.eos)


def test_the_cap_is_in_the_grammar(smollm2_loaded):
    _, tok = smollm2_loaded
    capped = constrained.SchemaConstraint(FIT.schema, tok, max_items={"postcode_patterns": 2})
    ok = FIT.render({"query_type": "search", "postcode_patterns": ["RG", "SL"]})
    over = FIT.render({"query_type": "search", "postcode_patterns": ["RG", "SL", "OX"]})
    for text, accepted in ((ok, True), (over, False)):
        m = llguidance.LLMatcher(capped.lltok, capped.grammar, log_level=0)
        ids = tok.encode(text, add_special_tokens=False)
        assert (m.consume_tokens(ids) and m.is_accepting()) is accepted, text
    # the contract's own maxItems is never loosened by a larger cap
    schema = {"type": "object", "properties": {"a": {"type": "array", "maxItems": 1}}}
    assert constrained.with_caps(schema, {"a": 5})["properties"]["a"]["maxItems"] == 1


def test_a_number_cannot_run_on(smollm2_loaded, fit_constraint):
    """An undertrained adapter wrote "capacity_max_kw":5000000000... to the token cap; the
    contract's maximum (10 GW in kW) is in the grammar, so such a number cannot be written."""
    _, tok = smollm2_loaded
    for value, accepted in ((9_500_000, True), (50_000_000, False), (5 * 10**30, False)):
        text = f'{{"query_type":"search","capacity_max_kw":{value}}}'
        m = llguidance.LLMatcher(fit_constraint.lltok, fit_constraint.grammar, log_level=0)
        ids = tok.encode(text, add_special_tokens=False)
        assert (m.consume_tokens(ids) and m.is_accepting()) is accepted, text
    assert FIT.violations({"query_type": "search", "capacity_max_kw": 50_000_000})


def test_a_looping_model_cannot_loop(smollm2_loaded, fit_constraint):
    """A model pushed to write the same item again and again (what an undertrained adapter did
    on Scotland questions): with the uniqueness rule off, the list repeats an item up to its
    cap; with it on, every item is unique and the answer is a valid contract answer."""
    model, tok = smollm2_loaded
    push = tok.encode('postcode_patterns":["KW","', add_special_tokens=False)

    def loop(_context, logits):
        bias = np.zeros(logits.shape[-1], dtype=np.float32)
        bias[push] = 30.0
        return logits + mx.array(bias)

    prompt = chat_prompt(tok, [{"role": "system", "content": FIT.system_prompt},
                               {"role": "user", "content": "hydro schemes in scotland"}])

    def decode(constraint):
        proc = constraint.processor()
        out, _ = generate_batch(model, tok, [prompt], max_tokens=120,
                                logits_processors=[lambda c, x: proc(c, loop(c, x))])
        return out[0]

    off = constrained.SchemaConstraint(FIT.schema, tok, max_items={"postcode_patterns": 16})
    off.unique = set()
    looped = json.loads(decode(off).text)["postcode_patterns"]
    assert max(looped.count(x) for x in looped) > 3, looped  # the push works: it loops

    answer = decode(fit_constraint)
    obj = json.loads(answer.text)
    assert obj["postcode_patterns"], answer.text
    for key in fit_constraint.unique & set(obj):
        assert len(obj[key]) == len(set(obj[key])), answer.text
    assert not FIT.violations(obj), answer.text
