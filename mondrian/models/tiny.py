"""Tiny random-weight text models (llama, qwen2), built offline in seconds, for tests.

No model hub is reachable here and real checkpoints are big, so tests build their own: an
mlx-lm text model with a real byte-level BPE tokenizer trained on a small built-in corpus and a
ChatML chat template (`tiny_tokenizer`). The weights are random (the models babble), but every
file is in the format the real loaders expect, and the same seed gives byte-identical files.
The Qwen2-VL builder is `tiny_vlm`.
"""

from __future__ import annotations

import importlib
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
from mondrian.models.tiny_tokenizer import (
    CHATML_SPECIALS,
    CHATML_TEMPLATE,
    ENDOFTEXT,
    IM_END,
    write_tokenizer,
)

TEXT_ARCHS = ("llama", "qwen2")


def _text_config(arch: str, hidden_size: int, num_layers: int, num_heads: int, num_kv_heads: int,
                 intermediate_size: int, tie_word_embeddings: bool, vocab_size: int,
                 ids: dict[str, int]) -> dict[str, Any]:
    """config.json of a llama / qwen2 model, with that family's usual norm and rope settings."""
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"],
        "model_type": arch,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "intermediate_size": intermediate_size,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "vocab_size": vocab_size,  # must equal the tokenizer's size (mlx-lm detokenizer)
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": None,
        "eos_token_id": ids[IM_END],
        "pad_token_id": ids[ENDOFTEXT],
        "torch_dtype": "float32",
    }
    if arch == "llama":
        config.update(
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            head_dim=hidden_size // num_heads,
            attention_bias=False,
            mlp_bias=False,
        )
    else:
        config.update(
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            use_sliding_window=False,
            sliding_window=4096,
        )
    return config


def build_tiny_text(
    path: str | os.PathLike[str],
    arch: str = "llama",
    seed: int = 0,
    hidden_size: int = 256,
    num_layers: int = 6,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    vocab_target: int = 1536,
    tie_word_embeddings: bool | None = None,
) -> Path:
    """Build (or reuse) a tiny random-weight mlx-lm model folder at `path`; return its path.

    `arch` is "llama" or "qwen2". Defaults give ~5M parameters. `intermediate_size` defaults
    to 8/3 * hidden rounded up to a multiple of 16 (688 for 256). `tie_word_embeddings`
    defaults to False for llama (an lm_head exists) and True for qwen2 (as Qwen2-0.5B).
    `vocab_target` is the BPE trainer's target; config `vocab_size` is the size it reaches.
    """
    if arch not in TEXT_ARCHS:
        raise ValueError(f"arch must be one of {TEXT_ARCHS}, not {arch!r}")
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError("hidden_size must divide by num_heads, num_heads by num_kv_heads")
    if intermediate_size is None:
        intermediate_size = -(-hidden_size * 8 // 3 // 16) * 16
    if tie_word_embeddings is None:
        tie_word_embeddings = arch == "qwen2"
    spec = {
        "kind": "text",
        "arch": arch,
        "seed": seed,
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "intermediate_size": intermediate_size,
        "vocab_target": vocab_target,
        "tie_word_embeddings": tie_word_embeddings,
        "format": 1,
    }

    def fill(folder: Path) -> None:
        vocab_size, ids = write_tokenizer(folder, CHATML_SPECIALS, vocab_target, CHATML_TEMPLATE)
        config = _text_config(arch, hidden_size, num_layers, num_heads, num_kv_heads,
                              intermediate_size, tie_word_embeddings, vocab_size, ids)
        write_json(folder / "config.json", config)
        write_json(
            folder / "generation_config.json",
            {"eos_token_id": ids[IM_END], "pad_token_id": ids[ENDOFTEXT]},
        )
        # Instantiate mlx-lm's own class so names/shapes are exactly what its loader checks
        # (imported by name here: mlx_lm costs ~1 s to import, and only a build needs it).
        module = importlib.import_module(f"mlx_lm.models.{arch}")
        model = module.Model(module.ModelArgs.from_dict(config))
        save_weights(folder, random_weights(param_shapes(model), seed))

    return atomic_build(path, spec, fill)
