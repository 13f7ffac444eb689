"""mondrian.models.cpu_kernels equals the stock MLX ops (values and gradients), and
upstream.load_lm routes mlx-lm's llama / qwen2 through it without changing what they answer."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mondrian.models import cpu_kernels, upstream
from tests.helpers import run_cli


def close(a, b, tol=2e-5):
    a, b = np.array(a), np.array(b)
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, float(np.abs(b).max())))


def test_active_on_cpu_and_switched_off_by_env(monkeypatch):
    assert cpu_kernels.active()  # these machines have only the CPU device
    monkeypatch.setenv("MONDRIAN_CPU_KERNELS", "off")
    assert not cpu_kernels.active()


def test_exp_and_its_gradient_equal_mx_exp():
    # power(e, x) uses e rounded to float32 (relative 2.9e-8): a relative error of ~2.9e-8 |x|
    # (2.3e-6 at x = 80) against the exact value; softmax and log-sum-exp see x <= 0, mostly > -20
    x = mx.concatenate([mx.linspace(-87, 88, 20001), mx.array([-mx.inf, -100.0])])
    ours, exact = np.array(cpu_kernels.exp(x)), np.exp(np.array(x, np.float64))
    normal = exact > 1.2e-38  # float32 denormals carry fewer digits
    err = np.abs(ours[normal] - exact[normal]) / exact[normal]
    assert (err <= 4e-8 * np.abs(np.array(x)[normal]) + 2e-7).all(), err.max()
    assert ours[-2] == 0.0 and ours[-1] < 1e-43
    assert cpu_kernels.exp(mx.array([-mx.inf])).item() == 0.0
    g = mx.grad(lambda v: (cpu_kernels.exp(v) * mx.arange(4)).sum())(mx.array([0.5, -1.0, 2.0, 0.0]))
    close(g, mx.exp(mx.array([0.5, -1.0, 2.0, 0.0])) * mx.arange(4), 1e-6)


def test_silu_and_cross_entropy_equal_the_stock_ones_with_gradients():
    x = mx.random.normal((64, 33)) * 6
    w = mx.random.normal((64, 33))
    close(cpu_kernels.silu(x), nn.silu(x))
    close(mx.grad(lambda v: (cpu_kernels.silu(v) * w).sum())(x), mx.grad(lambda v: (nn.silu(v) * w).sum())(x))
    t = mx.random.randint(0, 33, (64,))
    close(cpu_kernels.cross_entropy(x, t), nn.losses.cross_entropy(x, t))
    close(mx.grad(lambda v: cpu_kernels.cross_entropy(v, t).mean())(x),
          mx.grad(lambda v: nn.losses.cross_entropy(v, t).mean())(x))


def _padding_mask(b, length, width):
    """What mlx-lm's BatchKVCache masks look like: causal, rows left-padded by different amounts."""
    left = mx.array([0, 3, 7][:b])
    rows, cols = mx.arange(width - length, width)[:, None], mx.arange(width)[None]
    return (rows >= cols) & (mx.expand_dims(left, (1, 2, 3)) <= cols)


@pytest.mark.parametrize("case", ["causal-long", "causal-offset", "decode", "bool-mask", "additive-mask",
                                  "per-head-mask"])
def test_attention_equals_fast_sdpa_values_and_gradients(case):
    mx.random.seed(1)
    b, heads, kv_heads, dim = 3, 6, 2, 16
    length, width = {"causal-long": (300, 300), "causal-offset": (45, 70), "decode": (1, 70)}.get(case, (20, 29))
    q = mx.random.normal((b, heads, length, dim))
    k = mx.random.normal((b, kv_heads, width, dim))
    v = mx.random.normal((b, kv_heads, width, dim))
    mask = {"causal-long": "causal", "causal-offset": "causal", "decode": None}.get(case)
    if case == "bool-mask":
        mask = _padding_mask(b, length, width)
    elif case == "additive-mask":
        mask = mx.where(_padding_mask(b, length, width), 0.0, -1e9)
    elif case == "per-head-mask":
        mask = mx.random.uniform(shape=(b, heads, length, width)) > 0.3
    assert cpu_kernels.supports(q, k, mask)

    def ours(q, k, v):
        return cpu_kernels.attention(q, k, v, 0.25, mask, block=64)

    def stock(q, k, v):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)

    close(ours(q, k, v), stock(q, k, v))
    weights = mx.random.normal((b, heads, length, dim))
    g_ours = mx.grad(lambda *a: (ours(*a) * weights).sum(), argnums=(0, 1, 2))(q, k, v)
    g_stock = mx.grad(lambda *a: (stock(*a) * weights).sum(), argnums=(0, 1, 2))(q, k, v)
    for a, s in zip(g_ours, g_stock, strict=True):
        close(a, s, 5e-5)


def test_unsupported_inputs_are_left_to_the_stock_kernel():
    q, k = mx.zeros((1, 4, 3, 8)), mx.zeros((1, 2, 3, 8))
    assert not cpu_kernels.supports(q.astype(mx.float16), k, "causal")
    assert not cpu_kernels.supports(q, k, mx.zeros((1, 3, 3), mx.bool_))  # 3-D: layout unknown
    assert not cpu_kernels.supports(q, k, "sliding")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_load_lm_answers_as_the_stock_model(arch, monkeypatch):
    from mlx_lm import generate

    from mondrian.models.sources import resolve

    model, tokenizer = upstream.load_lm(resolve(f"tiny:{arch}").path)
    assert upstream.use_cpu_kernels(model)
    tokens = mx.array([list(range(5, 45)), list(range(50, 90))])
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "wind sites in kent"}],
                                           add_generation_prompt=True)
    fast_logits = model(tokens)
    fast_answer = generate(model, tokenizer, prompt, max_tokens=24)
    monkeypatch.setenv("MONDRIAN_CPU_KERNELS", "off")  # the patched module calls the stock kernels
    close(fast_logits, model(tokens), 1e-4)
    assert generate(model, tokenizer, prompt, max_tokens=24) == fast_answer


def test_smollm2_logits_equal_the_stock_ones(smollm2, monkeypatch):
    model, _ = upstream.load_lm(smollm2.path)
    tokens = mx.array([list(range(100, 400))])
    fast = model(tokens)
    monkeypatch.setenv("MONDRIAN_CPU_KERNELS", "off")
    stock = model(tokens)
    close(fast, stock, 1e-4)
    assert (mx.argmax(fast, -1) == mx.argmax(stock, -1)).all().item()


def test_info_reports_the_kernels():
    assert json.loads(run_cli("info", "--json").stdout)["cpu_kernels"] is True
    assert json.loads(run_cli("info", "--json", env={"MONDRIAN_CPU_KERNELS": "off"}).stdout)["cpu_kernels"] is False
