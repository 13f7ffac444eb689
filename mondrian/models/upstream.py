"""The one door to private internals of mlx-lm and mlx-vlm.

mondrian uses a private function of a peer library only where no public one does the job,
and only through this module, so an upgrade breaks in one place. The same goes for
undocumented building blocks whose behaviour we rely on (mlx-lm's model classes and batch KV cache). The versions these were
checked against are pinned in pyproject.toml; tests/test_upstream.py fails loudly if the
installed versions or the behaviour we rely on change.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mondrian.models import cpu_kernels

# What tests/test_upstream.py holds these wrappers to; pyproject.toml pins the same versions.
CHECKED = {"mlx-lm": "0.32.2", "mlx-vlm": "0.7.10"}


def load_lm(path: str, adapter_path: str | None = None) -> tuple[nn.Module, Any]:
    """`mlx_lm.load(path, adapter_path=)`, with the model's attention and SwiGLU routed
    through mondrian.models.cpu_kernels (`use_cpu_kernels`). The one way mondrian loads an
    mlx-lm model; `path` is a local folder (never a hub id: callers resolve it first)."""
    from mlx_lm import load  # noqa: PLC0415 - heavy: mlx_lm import ~1.5 s

    model, tokenizer = load(path, adapter_path=adapter_path)
    use_cpu_kernels(model)
    return model, tokenizer


# mlx-lm model modules whose attention calls the module-level `scaled_dot_product_attention(
# queries, keys, values, cache=, scale=, mask=[, sinks=])` and whose MLP calls `swiglu(gate,
# x)`: tests/test_cpu_kernels.py checks logits and greedy answers against the stock ones.
CPU_KERNEL_MODELS = frozenset({"llama", "qwen2"})


def use_cpu_kernels(model: nn.Module) -> bool:
    """Route `model`'s attention and SwiGLU through cpu_kernels wherever those take the inputs
    (float32 on the CPU device, MONDRIAN_CPU_KERNELS not "off"; checked at each call), and the
    stock functions elsewhere. Patches the model's module once for the whole process (every
    model of that type); returns whether the model's type is one patched."""
    if getattr(getattr(model, "args", None), "model_type", None) not in CPU_KERNEL_MODELS:
        return False
    module = sys.modules[type(model).__module__]
    if getattr(module, "_mondrian_cpu_kernels", False):
        return True
    stock_attention, stock_swiglu = module.scaled_dot_product_attention, module.swiglu

    def attention(queries, keys, values, cache, scale, mask, sinks=None):
        if sinks is None and not hasattr(cache, "bits") and cpu_kernels.supports(queries, keys, mask):
            return cpu_kernels.attention(queries, keys, values, scale, mask)
        return stock_attention(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)

    def swiglu(gate, x):
        if gate.dtype == mx.float32 and cpu_kernels.active():
            return cpu_kernels.swiglu(gate, x)
        return stock_swiglu(gate, x)

    module.scaled_dot_product_attention, module.swiglu = attention, swiglu
    module._mondrian_cpu_kernels = True
    return True


def apply_vlm_lora_layers(model: nn.Module, config: dict) -> nn.Module:
    """Wrap `model`'s Linear layers with mlx-vlm's LoRA layers as an adapter_config.json
    (`fine_tune_type`, `num_layers`, `lora_parameters`) asks: exactly what `mlx_vlm.load(...,
    adapter_path=)` does to a fresh model, but on a model already loaded (hot-swap). mlx-vlm
    has no public function for this."""
    from mlx_vlm.trainer.peft.utils import (  # noqa: PLC0415 - heavy: mlx_vlm loads transformers
        _apply_lora_layers,
    )

    return _apply_lora_layers(model, config)


def image_token_id(dataset: Any) -> int | None:
    """The image placeholder token of a vision dataset's model config, as mlx-vlm's private
    `_image_token_id` reads it (collate_vlm_batch needs it): `image_token_index`, else
    `image_token_id`. Ours, so training never imports the private helper; the test checks
    both agree."""
    config = getattr(dataset, "config", None)
    get = config.get if isinstance(config, Mapping) else lambda k: getattr(config, k, None)
    value = get("image_token_index")
    if value is None:
        value = get("image_token_id")
    return None if value is None else int(value)


def decode_stream() -> Any:
    """The (thread-local) stream mlx-lm's generators run on; `Decoder` decodes on it too."""
    from mlx_lm.generate import (  # noqa: PLC0415 - heavy: mlx_lm import ~1.5 s
        generation_stream,
    )

    return generation_stream


# mlx-lm text models whose __call__ is exactly `head(model.model(inputs, cache))`: tied
# embeddings -> `model.model.embed_tokens.as_linear`, else `model.lm_head` (no logit scaling,
# no soft-capping). tests/test_decode.py checks it on llama and qwen2, and checks that rows fed
# right-padded through `batch_cache` / `pad_right` / `unpad` equal rows fed alone.
SPLIT_HEAD_MODELS = frozenset({"llama", "qwen2", "qwen3", "mistral"})


def split_head(model: nn.Module) -> tuple[Callable, Callable, mx.array | None] | None:
    """(body, head, head weight) with `model(x, cache) == head(body(x, cache))`, or None for a
    model type not known to be built that way. The weight (vocab, hidden) is None where it
    cannot be gathered row by row (a quantized head): the decoder then projects in full."""
    args = getattr(model, "args", None)
    if getattr(args, "model_type", None) not in SPLIT_HEAD_MODELS or not hasattr(model, "model"):
        return None
    if getattr(args, "tie_word_embeddings", False):
        emb = model.model.embed_tokens
        weight = emb.weight if type(emb) is nn.Embedding else None
        return model.model, emb.as_linear, weight
    head = model.lm_head
    weight = head.weight if type(head) is nn.Linear and "bias" not in head else None
    return model.model, head, weight


def batch_cache(model: nn.Module, prefixes: Sequence[list[tuple[mx.array, mx.array]] | None]) -> list:
    """A batch KV cache (one mlx-lm `BatchKVCache` per layer) for rows starting from the given
    per-layer (keys, values) prefixes (None: an empty row); rows are left-padded to the
    longest. GenerationError-free: a model whose cache is not a plain KVCache raises ValueError."""
    from mlx_lm.models.cache import (  # noqa: PLC0415 - heavy: mlx_lm import ~1.5 s
        BatchKVCache,
        KVCache,
        make_prompt_cache,
    )

    layers = make_prompt_cache(model)
    if not all(type(c) is KVCache for c in layers):
        raise ValueError(f"{type(model).__name__}: its cache is not a plain KVCache; batched decoding needs one")
    out = []
    for i in range(len(layers)):
        rows = []
        for prefix in prefixes:
            c = KVCache()
            if prefix is not None:
                c.keys, c.values = prefix[i]
                c.offset = c.keys.shape[2]
            rows.append(c)
        out.append(BatchKVCache.merge(rows))
    return out


def pad_right(caches: list, padding: Sequence[int]) -> None:
    """The next model call's inputs are right-padded by `padding` per row (as mlx-lm's prompt
    processing does it); `unpad` afterwards turns the padding into masked left padding."""
    for c in caches:
        c.prepare(right_padding=list(padding))


def unpad(caches: list) -> None:
    for c in caches:
        c.finalize()


def row_kv(caches: list, row: int) -> list[tuple[mx.array, mx.array]]:
    """Row `row`'s keys and values per layer, padding dropped (`BatchKVCache.extract`)."""
    out = []
    for c in caches:
        kv = c.extract(row)
        out.append((kv.keys, kv.values))
    return out


def keep_rows(caches: list, rows: Sequence[int]) -> None:
    """Keep only `rows` of a batch cache, in that order (`BatchKVCache.filter`)."""
    for c in caches:
        c.filter(list(rows))


def join(caches: list, other: list) -> list:
    """`other`'s rows appended after `caches`' (`BatchKVCache.extend`); returns the joined cache."""
    if not caches:
        return other
    for a, b in zip(caches, other, strict=True):
        a.extend(b)
    return caches
