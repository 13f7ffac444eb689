"""The decode loop's speed-ups change no answer: prefix cache, grammar fast-forward, gathered
output projection, mask/forward overlap, each against the plain loop (all off), on the tiny
llama and on SmolLM2."""

import json

import mlx.core as mx
import numpy as np
import pytest

from mondrian.core.contracts import get_advisor
from mondrian.demo.questions import generate
from mondrian.models import constrained, upstream
from mondrian.models.decode import DecodeOptions, PrefixCache, gathered_argmax
from mondrian.models.generation import chat_prompt, generate_batch

FIT = get_advisor("fit-query")
PLAIN = DecodeOptions(fast_forward=False, gather_max=0, overlap=False)


def _prompts(tok, n: int, seed: int) -> list[list[int]]:
    return [chat_prompt(tok, [{"role": "system", "content": FIT.system_prompt},
                              {"role": "user", "content": ex.question}]) for ex in generate(n, seed=seed)]


def _both(model, tok, prompts, constraint, *, batch_size: int, max_tokens: int, every: int = 1):
    """The same prompts through the plain loop (no prefix cache) and with every speed-up on;
    rows `i % every == 0` constrained, the others free."""
    def run(options, cache):
        procs = [constraint.processor() if i % every == 0 else None for i in range(len(prompts))]
        out, _ = generate_batch(model, tok, prompts, batch_size=batch_size, max_tokens=max_tokens,
                                logits_processors=procs, options=options, prefix_cache=cache)
        return out

    return run(PLAIN, False), run(DecodeOptions(gather_max=1 << 30), True)


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    from mlx_lm import load

    model, tok = load(tiny_llama.path)
    return model, tok, constrained.SchemaConstraint(FIT.schema, tok, max_items={"postcode_patterns": 8})


@pytest.mark.parametrize("every", [1, 2], ids=["all-constrained", "mixed-free-and-constrained"])
def test_speedups_change_no_answer_on_the_tiny_model(tiny, every):
    model, tok, constraint = tiny
    prompts = _prompts(tok, 10, seed=5)
    plain, fast = _both(model, tok, prompts, constraint, batch_size=4, max_tokens=60, every=every)
    assert [g.text for g in fast] == [g.text for g in plain]
    assert [g.finish_reason for g in fast] == [g.finish_reason for g in plain]
    assert [g.tokens for g in fast] == [g.tokens for g in plain]
    # the speed-ups did happen: forced tokens without a model call, prompts started from the cache
    assert all(g.model_calls == g.tokens and g.forced == 0 and g.prefix_hit == 0 for g in plain)
    assert sum(g.forced for g in fast) > 0
    assert all(g.model_calls + g.forced == g.tokens for g in fast)
    assert sum(g.prefix_hit > 0 for g in fast) >= len(prompts) - 4  # all but the first batch's rows


def test_speedups_change_no_answer_on_smollm2(smollm2_loaded):
    model, tok = smollm2_loaded
    constraint = constrained.SchemaConstraint(FIT.schema, tok, max_items={"postcode_patterns": 16})
    prompts = _prompts(tok, 6, seed=21)
    plain, fast = _both(model, tok, prompts, constraint, batch_size=3, max_tokens=48)
    assert [g.text for g in fast] == [g.text for g in plain]
    for g in fast:
        if g.finish_reason == "stop":  # the base model may run out of tokens inside a long fit_id
            assert not FIT.violations(json.loads(g.text)), g.text
    assert sum(g.forced for g in fast) > 0
    assert all(g.model_calls + g.forced == g.tokens for g in fast)
    assert sum(g.model_calls for g in fast) < sum(g.model_calls for g in plain)


def test_gathered_projection_is_the_full_masked_argmax(smollm2_loaded):
    """On real hidden states (every position of two prompts) and masks of 1 to 20,000 tokens:
    the gathered argmax equals the argmax of the full projection with the others at -inf."""
    model, tok = smollm2_loaded
    body, head, weight = upstream.split_head(model)
    hidden = mx.concatenate([body(mx.array([p]))[0] for p in _prompts(tok, 2, seed=3)])
    logits = head(hidden)
    rng = np.random.default_rng(0)
    vocab = weight.shape[0]
    checked = 0
    for pos in range(hidden.shape[0]):
        for size in (1, 7, 300, 20_000):
            allowed = np.zeros(vocab, dtype=bool)
            allowed[rng.choice(vocab, size, replace=False)] = True
            ids, best = gathered_argmax(hidden[pos], weight, allowed)
            want = mx.argmax(mx.where(mx.array(allowed), logits[pos], -mx.inf)).item()
            assert int(ids[best.item()]) == want
            checked += 1
    assert checked > 100


def test_split_head_is_the_model(tiny_llama):
    from mlx_lm import load

    from mondrian.models.sources import resolve

    for path in (tiny_llama.path, resolve("tiny:qwen2").path):
        model, _ = load(path)
        body, head, weight = upstream.split_head(model)
        x = mx.array([[1, 5, 9, 14, 3]])
        assert mx.array_equal(model(x), head(body(x))).item()
        assert weight is not None and weight.shape[0] == model.args.vocab_size


def test_ragged_rows_equal_rows_alone(tiny):
    """Rows of different lengths in one right-padded call (fast-forward's shape) leave each row's
    cache as if it had been fed alone: the next step's hidden states match."""
    model, _, _ = tiny
    body = model.model
    rows = [[1, 5, 9, 14, 3], [1, 7], [2, 6, 8]]
    feeds = [[11, 12, 13], [21], [31, 32]]
    cache = upstream.batch_cache(model, [None] * 3)
    upstream.pad_right(cache, [5 - len(r) for r in rows])
    body(mx.array([r + [0] * (5 - len(r)) for r in rows]), cache=cache)
    upstream.unpad(cache)
    upstream.pad_right(cache, [3 - len(f) for f in feeds])
    h = body(mx.array([f + [0] * (3 - len(f)) for f in feeds]), cache=cache)
    upstream.unpad(cache)
    nxt = body(mx.array([[40], [41], [42]]), cache=cache)
    for i, (r, f) in enumerate(zip(rows, feeds, strict=True)):
        alone = body(mx.array([r + f + [40 + i]]))[0]
        assert mx.allclose(h[i, :len(f)], alone[len(r):len(r) + len(f)], atol=1e-5).item()
        assert mx.allclose(nxt[i, 0], alone[-1], atol=1e-5).item()


def _kv(n: int, value: float = 0.0) -> list:
    return [(mx.full((1, 2, n, 4), value), mx.full((1, 2, n, 4), value)) for _ in range(3)]


def test_prefix_cache_longest_prefix_per_key_lru_and_drop():
    cache = PrefixCache(max_bytes=3 * _bytes(_kv(10)))
    cache.insert("v1", list(range(10)), _kv(10, 1.0))
    assert cache.lookup("v2", list(range(10))) == (0, None)  # another version's entries never serve
    n, kv = cache.lookup("v1", [0, 1, 2, 3, 99])
    assert n == 4 and kv[0][0].shape == (1, 2, 4, 4) and mx.all(kv[0][0] == 1.0).item()
    assert cache.lookup("v1", list(range(10)))[0] == 9  # never the whole prompt: its last logits are needed
    assert cache.lookup("v1", list(range(12)))[0] == 10
    assert cache.covers("v1", list(range(6))) and not cache.covers("v1", list(range(11)))
    cache.insert("v1", list(range(6)), _kv(6))  # already covered: not kept twice
    assert len(cache) == 1
    for k in ("v2", "v3", "v4"):  # the byte bound drops the least recently used
        cache.insert(k, list(range(10)), _kv(10))
    assert len(cache) == 3 and cache.lookup("v1", list(range(10)))[0] == 0
    assert cache.bytes <= cache.max_bytes
    assert cache.drop("v3") == 1 and cache.lookup("v3", list(range(5)))[0] == 0
    assert cache.lookup("v4", list(range(5)))[0] == 4


def _bytes(kv) -> int:
    return sum(k.nbytes + v.nbytes for k, v in kv)


def test_an_mlx_lm_logits_processor_sees_its_row_only(tiny):
    """A row may carry a plain mlx-lm processor fn(context, logits): it gets its own row's
    context and logits, and the other rows decode as they would alone."""
    model, tok, _ = tiny
    banned = []

    def ban_first(context, logits):  # never the row's unconstrained first choice
        if not banned:
            banned.append(int(mx.argmax(logits[0]).item()))
        mask = mx.arange(logits.shape[-1]) == banned[0]
        return mx.where(mask, mx.array(-float("inf"), dtype=logits.dtype), logits)

    prompts = [[1, 5, 9], [1, 7, 40]]
    alone = [generate_batch(model, tok, [p], max_tokens=3)[0][0].text for p in prompts]
    both, _ = generate_batch(model, tok, prompts, max_tokens=3, logits_processors=[None, ban_first])
    assert both[0].text == alone[0]
    assert banned and banned[0] not in tok.encode(both[1].text, add_special_tokens=False)
