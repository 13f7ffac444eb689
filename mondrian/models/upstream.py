"""The one door to private internals of mlx-lm and mlx-vlm.

mondrian uses a private function of a peer library only where no public one does the job,
and only through this module, so an upgrade breaks in one place. The same goes for
undocumented building blocks whose behaviour we rely on (mlx-lm's batch objects). The versions these were
checked against are pinned in pyproject.toml; tests/test_upstream.py fails loudly if the
installed versions or the behaviour we rely on change.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import mlx.nn as nn

# What tests/test_upstream.py holds these wrappers to; pyproject.toml pins the same versions.
CHECKED = {"mlx-lm": "0.32.2", "mlx-vlm": "0.7.10"}


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


def start_rows(model: nn.Module, uids: Sequence[int], prompts: Sequence[list[int]],
               max_tokens: Sequence[int], processors: Sequence[Callable | None],
               stop_tokens: Sequence[int]) -> Any:
    """New rows as mlx-lm's `GenerationBatch`: their prompts processed together (right-padded,
    as `BatchGenerator` does it) and their first decode step started, greedy, each row stopping
    at any of `stop_tokens` or after its `max_tokens`; one logits processor (or None) per row.

    What `generation.Decoder` relies on (tests/test_upstream.py checks it): every model call
    this makes, and each later `batch.next()` makes, has the batch's rows in `batch.uids`
    order, the order given here; `next()` returns one response per row in that order (`uid`,
    `token`, `finish_reason`) and drops the finished rows, keeping the others' order;
    `batch.extend(other)` appends `other`'s rows. `BatchGenerator` is made of these
    objects; it does not say which rows each model call is for, so we drive them ourselves."""
    from mlx_lm.generate import (  # noqa: PLC0415 - heavy: mlx_lm import ~1.5 s
        PromptProcessingBatch,
        StopSequences,
    )
    from mlx_lm.models.cache import (  # noqa: PLC0415 - heavy: mlx_lm import ~1.5 s
        make_prompt_cache,
    )

    n = len(uids)
    stop = StopSequences([[t] for t in stop_tokens])
    batch = PromptProcessingBatch(
        model, list(uids), [make_prompt_cache(model) for _ in range(n)], samplers=[None] * n,
        logits_processors=[[p] if p else [] for p in processors], stop_sequences=[stop] * n,
        max_tokens=list(max_tokens))
    return batch.generate([list(p) for p in prompts])  # all but the last token prefilled, then one step
