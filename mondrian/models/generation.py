"""Generation on an MLX model: chat prompts, batched greedy decoding, LoRA layers on/off.
Shared by evaluation (`mondrian.evaluate.run`) and the service (`mondrian.serve.engine`), so an
evaluated answer and a served answer come from the same code. Contract-constrained decoding
(the logits processors) is mondrian.models.constrained.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import mlx.nn as nn

from mondrian.models.decode import (
    DecodeOptions,
    Decoder,
    Generation,
    GenerationError,
    PrefixCache,
    RowSlotChooser,
)

__all__ = ["AdapterSwitch", "Generation", "GenerationError", "chat_prompt", "generate_batch", "lora_layers"]


# ---------------------------------------------------------------------------------------------
# the model side: one load, adapter on/off, batched greedy generation, constrained decoding


def lora_layers(model: nn.Module) -> list[nn.Module]:
    """The LoRA layers installed in `model` (whatever their type), in module order."""
    from mlx_lm.tuner.dora import (  # noqa: PLC0415 - heavy: mlx_lm import ~1.5 s
        DoRAEmbedding,
        DoRALinear,
    )

    found = [m for _, m in model.named_modules() if hasattr(m, "lora_a") and hasattr(m, "scale")]
    if any(isinstance(m, (DoRALinear, DoRAEmbedding)) for m in found):
        raise GenerationError("DoRA layers: scale 0 is not the base model there; evaluate LoRA adapters")
    return found


class AdapterSwitch:
    """Turns the LoRA layers of a loaded model on (their trained scale) and off (scale 0:
    bit-identical base logits) without reloading anything."""

    def __init__(self, model: nn.Module):
        self.layers = lora_layers(model)
        self.scales = [m.scale for m in self.layers]

    def set(self, on: bool) -> None:
        for m, s in zip(self.layers, self.scales, strict=True):
            m.scale = s if on else 0.0


def chat_prompt(tokenizer: Any, messages: list[dict]) -> list[int]:
    """The prompt tokens of a chat: what mlx-lm's ChatDataset masks as the prompt in training."""
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))


def generate_batch(model: nn.Module, tokenizer: Any, prompts: Sequence[list[int]], *, batch_size: int = 16,
                   max_tokens: int | Sequence[int] = 256,
                   logits_processors: Sequence[Callable] | None = None,
                   progress: Callable[[int], None] | None = None,
                   row_slots: RowSlotChooser | None = None, slots: Sequence[int] | None = None,
                   options: DecodeOptions | None = None,
                   prefix_cache: PrefixCache | None | bool = True) -> tuple[list[Generation], float]:
    """Greedy answers to `prompts` through one `Decoder`, `batch_size` sequences decoding
    together. Returns the answers and the wall-clock seconds. `max_tokens` is one limit for all
    or one per prompt; `slots` the LoRA slot per prompt (a model with `row_slots`);
    `prefix_cache`: True for one kept for this call (prompts share their system prompt),
    False for none, or a cache to use."""
    if not prompts:
        return [], 0.0
    n = len(prompts)
    limits = [max_tokens] * n if isinstance(max_tokens, int) else list(max_tokens)
    procs = list(logits_processors) if logits_processors is not None else [None] * n
    t0 = time.perf_counter()
    cache = PrefixCache() if prefix_cache is True else prefix_cache if isinstance(prefix_cache, PrefixCache) else None
    dec = Decoder(model, tokenizer, batch_size, row_slots, cache, options)
    out: list[Generation | None] = [None] * n
    try:
        for i, p in enumerate(prompts):
            dec.add(p, limits[i], procs[i], tag=i, slot=slots[i] if slots else 0)
        while len(dec):
            for i, gen, _ in dec.step():
                out[i] = gen
                if progress:
                    progress(1)
    finally:
        dec.close()
    return out, time.perf_counter() - t0
