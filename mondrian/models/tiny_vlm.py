"""A tiny random-weight Qwen2-VL that mlx-vlm loads offline, built in seconds, for tests.

Same recipe as `tiny` (real tokenizer, random weights, byte-identical for a seed), plus the
vision special tokens, Qwen2-VL's chat template and the processor files whose absence would
make the loader ask the hub for them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mondrian.models.tiny_build import (
    atomic_build,
    param_shapes,
    random_weights,
    save_weights,
    write_json,
)
from mondrian.models.tiny_tokenizer import CHATML_SPECIALS, ENDOFTEXT, IM_END, write_tokenizer

VISION_SPECIALS = [
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2-VL's own template (minus its default system prompt, like tiny_tokenizer's ChatML): image parts render as
# <|vision_start|><|image_pad|><|vision_end|>; the processor then expands <|image_pad|>.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _mrope_section(head_dim: int) -> list[int]:
    # M-RoPE splits head_dim/2 rotary frequencies over (time, height, width); Qwen2-VL uses
    # [16, 24, 24] of 64, i.e. a quarter / three eighths / three eighths.
    half = head_dim // 2
    return [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]


def _vision_config(hidden_size: int, vision_embed_dim: int, vision_depth: int,
                   vision_heads: int) -> dict[str, Any]:
    return {
        "model_type": "qwen2_vl",
        "depth": vision_depth,
        "embed_dim": vision_embed_dim,
        "hidden_size": hidden_size,  # the merger projects into the text model's width
        "num_heads": vision_heads,
        "mlp_ratio": 2,  # must be an int: mlx-vlm and HF both use it in int() sizes
        "in_channels": 3,
        "in_chans": 3,
        "patch_size": 14,
        "spatial_patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "hidden_act": "quick_gelu",
    }


def _config(hidden_size: int, num_layers: int, num_heads: int, num_kv_heads: int,
            vocab_size: int, ids: dict[str, int], vision_config: dict[str, Any]) -> dict[str, Any]:
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "intermediate_size": -(-hidden_size * 8 // 3 // 16) * 16,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": _mrope_section(hidden_size // num_heads)},
        "max_position_embeddings": 4096,
        "vocab_size": vocab_size,
        "tie_word_embeddings": True,
        "use_sliding_window": False,
        "sliding_window": 4096,
        "bos_token_id": None,
        "eos_token_id": ids[IM_END],
        "pad_token_id": ids[ENDOFTEXT],
        # The real model's ids are ~151k; ours are the tokenizer's.
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_config": vision_config,
        "torch_dtype": "float32",
    }


def _write_processor_files(folder: Path, max_pixels: int) -> None:
    image_processor = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor",
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "min_pixels": 56 * 56,
        "max_pixels": max_pixels,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_convert_rgb": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
    }
    # Each of these files, if missing, makes the loader ask the hub for it.
    write_json(folder / "preprocessor_config.json", image_processor)
    write_json(folder / "video_preprocessor_config.json", image_processor)
    write_json(
        folder / "processor_config.json",
        {"processor_class": "Qwen2VLProcessor", "chat_template": QWEN2_VL_CHAT_TEMPLATE},
    )
    write_json(folder / "chat_template.json", {"chat_template": QWEN2_VL_CHAT_TEMPLATE})


def _save_random_weights(folder: Path, config: dict[str, Any], vision_config: dict[str, Any],
                         seed: int) -> None:
    from mlx_vlm.models import qwen2_vl  # noqa: PLC0415 - heavy: mlx_vlm pulls in transformers (seconds); only a build needs it

    model_config = qwen2_vl.ModelConfig.from_dict(json.loads(json.dumps(config)))
    model_config.text_config = qwen2_vl.TextConfig.from_dict(model_config.text_config)
    model_config.vision_config = qwen2_vl.VisionConfig.from_dict(vision_config)
    model = qwen2_vl.Model(model_config)
    # mlx-vlm's native names (vision_tower.*, language_model.*) pass its sanitize unchanged;
    # the patch conv is saved in mlx layout (out, t, h, w, in), which sanitize keeps as is.
    save_weights(folder, random_weights(param_shapes(model), seed))


def build_tiny_qwen2_vl(
    path: str | os.PathLike[str],
    seed: int = 0,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vision_embed_dim: int = 64,
    vision_depth: int = 2,
    vision_heads: int = 2,
    vocab_target: int = 1536,
    max_pixels: int = 224 * 224,
) -> Path:
    """Build (or reuse) a tiny random-weight Qwen2-VL folder that mlx-vlm loads; return its path.

    Patch 14, merge 2: an 84x84 image is a 6x6 patch grid, merged 2x2 into 9 image tokens.
    `max_pixels` caps what the image processor resizes to (keeps the vision tower cheap).
    """
    head_dim = hidden_size // num_heads
    if hidden_size % num_heads or head_dim % 4 or num_heads % num_kv_heads:
        raise ValueError("hidden_size/num_heads must be a multiple of 4 (M-RoPE sections)")
    if vision_embed_dim % vision_heads or (vision_embed_dim // vision_heads) % 4:
        raise ValueError("vision head dim must be a multiple of 4 (2-D vision RoPE)")
    spec = {
        "kind": "qwen2_vl",
        "seed": seed,
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "vision_embed_dim": vision_embed_dim,
        "vision_depth": vision_depth,
        "vision_heads": vision_heads,
        "vocab_target": vocab_target,
        "max_pixels": max_pixels,
        "format": 1,
    }

    def fill(folder: Path) -> None:
        vocab_size, ids = write_tokenizer(
            folder,
            CHATML_SPECIALS + VISION_SPECIALS,
            vocab_target,
            QWEN2_VL_CHAT_TEMPLATE,
            extra_config={"processor_class": "Qwen2VLProcessor"},
        )
        vision_config = _vision_config(hidden_size, vision_embed_dim, vision_depth, vision_heads)
        config = _config(hidden_size, num_layers, num_heads, num_kv_heads, vocab_size, ids,
                         vision_config)
        write_json(folder / "config.json", config)
        write_json(
            folder / "generation_config.json",
            {"eos_token_id": ids[IM_END], "pad_token_id": ids[ENDOFTEXT]},
        )
        _write_processor_files(folder, max_pixels)
        _save_random_weights(folder, config, vision_config, seed)

    return atomic_build(path, spec, fill)
