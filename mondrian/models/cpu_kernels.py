"""Attention, SiLU and cross-entropy that run fast on MLX's CPU backend.

Why: the Linux `mlx-cpu` wheel computes `exp` (and `sigmoid`, `tanh`) at ~16-23 ns an
element, about 11x numpy, while `mx.power` takes ~6-8 (scripts/bench_cpu_kernels.py). A large
share of a SmolLM2 training step on a CPU is exp: the softmax over every attention score and
the SiLU of every MLP gate. And `mx.fast.scaled_dot_product_attention` has no fused CPU kernel: it scores the
whole L x L matrix, the masked half of a causal one included.

So, in float32 on the CPU device:
- `exp(x)` is `power(e, x)`, with exp's own gradient (cotangent x output);
- causal attention scores queries block by block, each block against the keys up to its
  last query only, and takes the softmax through that exp;
- SiLU and cross-entropy's log-sum-exp go through it too.

Results equal the stock ops to float32 rounding (tests/test_cpu_kernels.py: values and
gradients). `mondrian.models.upstream.load_lm` routes mlx-lm's llama / qwen2 attention and
SwiGLU here; `MONDRIAN_CPU_KERNELS=off` turns it off. On Metal or CUDA nothing changes.
"""

from __future__ import annotations

import math
import os

import mlx.core as mx
import mlx.nn as nn

BLOCK = 128  # query rows per attention block: 50..200 measured alike on SmolLM2 (batch 8 x 400)
_NEG = float(mx.finfo(mx.float32).min)  # masked scores: finite, so a fully masked row is not NaN


def active() -> bool:
    """True where these kernels replace the stock ones: the CPU device, unless switched off."""
    return (os.environ.get("MONDRIAN_CPU_KERNELS", "on") != "off"
            and mx.default_device().type == mx.DeviceType.cpu)


@mx.custom_function
def exp(x: mx.array) -> mx.array:
    """e**x through `mx.power` (~2.8x faster than `mx.exp` on the Linux CPU backend)."""
    return mx.power(math.e, x)


@exp.vjp
def _exp_vjp(x, cotangent, output):
    return cotangent * output


def softmax(x: mx.array) -> mx.array:
    # the shift cancels out of the softmax and of its gradient: no gradient through the max
    e = exp(x - mx.stop_gradient(x.max(axis=-1, keepdims=True)))
    return e / e.sum(axis=-1, keepdims=True)


@mx.custom_function
def silu(x: mx.array) -> mx.array:
    """x * sigmoid(x)."""
    return x / (1.0 + mx.power(math.e, -x))


@silu.vjp
def _silu_vjp(x, cotangent, output):  # one input: the primal is the array itself
    s = 1.0 / (1.0 + mx.power(math.e, -x))
    return cotangent * (s * (1.0 + x * (1.0 - s)))


def swiglu(gate: mx.array, x: mx.array) -> mx.array:
    return silu(gate) * x


def cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Per-position cross-entropy, as `nn.losses.cross_entropy(logits, targets)`."""
    if not active() or logits.dtype != mx.float32:
        return nn.losses.cross_entropy(logits, targets)
    m = mx.stop_gradient(logits.max(axis=-1, keepdims=True))
    lse = mx.log(exp(logits - m).sum(axis=-1)) + m.squeeze(-1)
    return lse - mx.take_along_axis(logits, mx.expand_dims(targets, -1), axis=-1).squeeze(-1)


def _grouped_mask(mask: mx.array, heads: int, kv_heads: int) -> mx.array | None:
    """An attention mask broadcastable to (B, heads, L, S) as one to (B, kv_heads, repeats, L, S);
    None for a layout not handled here."""
    if mask.ndim <= 2:
        return mask
    if mask.ndim == 4 and mask.shape[1] == 1:
        return mx.expand_dims(mask, 2)
    if mask.ndim == 4 and mask.shape[1] == heads:
        return mask.reshape(mask.shape[0], kv_heads, heads // kv_heads, *mask.shape[2:])
    return None


def supports(queries: mx.array, keys: mx.array, mask) -> bool:
    """Whether `attention` takes these inputs (else the caller keeps the stock kernel)."""
    if queries.dtype != mx.float32 or not active():
        return False
    if mask is None or isinstance(mask, str):
        return mask in (None, "causal")
    return _grouped_mask(mask, queries.shape[1], keys.shape[1]) is not None


def attention(queries: mx.array, keys: mx.array, values: mx.array, scale: float,
              mask: mx.array | str | None = None, block: int = BLOCK) -> mx.array:
    """`mx.fast.scaled_dot_product_attention(queries, keys, values, scale=, mask=)` for
    queries (B, H, L, D) and keys / values (B, K, S, D), H a multiple of K (grouped-query).
    A "causal" mask aligns the queries with the last L keys, as the stock kernel does."""
    b, heads, length, dim = queries.shape
    kv_heads, width = keys.shape[1], keys.shape[2]
    q = (queries * scale).reshape(b, kv_heads, heads // kv_heads, length, dim)
    k_t = mx.expand_dims(keys.swapaxes(-1, -2), 2)
    v = mx.expand_dims(values, 2)
    causal = isinstance(mask, str)
    grouped = None if causal or mask is None else _grouped_mask(mask, heads, kv_heads)
    if grouped is None and not causal and mask is not None:
        raise ValueError(f"attention mask of shape {mask.shape} not supported")
    offset = width - length
    step = block if causal else length
    outs = []
    for start in range(0, length, step):
        stop = min(length, start + step)
        end = offset + stop if causal else width  # keys a causal block can see
        scores = q[:, :, :, start:stop] @ k_t[..., :end]
        if causal:
            rows = mx.arange(offset + start, offset + stop)[:, None]
            scores = mx.where(rows >= mx.arange(end)[None], scores, _NEG)
        elif grouped is not None:  # one block: the whole mask
            scores = mx.where(grouped, scores, _NEG) if grouped.dtype == mx.bool_ else scores + grouped
        outs.append(softmax(scores) @ v[:, :, :, :end])
    out = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=3)
    return out.reshape(b, heads, length, dim)
