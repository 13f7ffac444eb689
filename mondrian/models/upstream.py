"""The one door to private internals of mlx-lm and mlx-vlm.

mondrian uses a private function of a peer library only where no public one does the job,
and only through this module, so an upgrade breaks in one place. The versions these were
checked against are pinned in pyproject.toml; tests/test_upstream.py fails loudly if the
installed versions or the behaviour we rely on change.
"""

from __future__ import annotations

from collections.abc import Mapping
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
