"""Export a version fused into its base model: an mlx-lm model folder (mlx-lm's own fuse)."""

from __future__ import annotations

import json
from pathlib import Path

from mondrian.core.atomic import atomic_folder
from mondrian.registry.records import RegistryError, now
from mondrian.registry.store import Registry


def export_fused(registry: Registry, advisor: str, version_or_alias: str,
                 base_model_path: str | Path, out_dir: str | Path, *, base_model_fingerprint: str,
                 dequantize: bool = False, overwrite: bool = False) -> Path:
    """Fuse a verified version into its base model with mlx-lm's own fuse code; write an
    mlx-lm model folder that `mlx_lm.load` loads (atomically, with mondrian_export.json).

    A quantized base stays quantized unless `dequantize`: the fused weights are then
    re-quantized, so outputs differ slightly from base + adapter."""
    adapter = registry.resolve(advisor, version_or_alias, base_model_fingerprint)
    version = adapter.name
    base = Path(base_model_path)
    if not (base / "config.json").is_file():
        # mlx_lm.load treats a path that does not exist as a hub repo id.
        raise RegistryError(f"{base}: not a local model folder (no config.json)")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise RegistryError(f"{out} already exists: pick another folder or pass overwrite")

    # heavy: only export needs MLX; the registry itself never loads it (tests/test_registry.py)
    from mlx.utils import tree_unflatten  # noqa: PLC0415 - heavy: MLX, only for fusing
    from mlx_lm.utils import dequantize_model, load, save  # noqa: PLC0415 - heavy: mlx_lm, only for fusing

    model, tokenizer, config = load(str(base), adapter_path=str(adapter), return_config=True)
    fused = [(n, m.fuse(dequantize=dequantize)) for n, m in model.named_modules()
             if hasattr(m, "fuse")]  # as mlx_lm/fuse.py main()
    if not fused:
        raise RegistryError(f"{advisor} {version}: no LoRA layers to fuse")
    model.update_modules(tree_unflatten(fused))
    if dequantize:
        model = dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    card = registry.read_card(adapter)
    with atomic_folder(out) as tmp:
        save(tmp, str(base), model, tokenizer, config, donate_model=False)
        (tmp / "mondrian_export.json").write_text(json.dumps({
            "advisor": advisor, "version": version, "adapter_card_sha256": card.card_sha256,
            "base_model": card.base_model, "base_model_fingerprint": card.base_model_fingerprint,
            "base_model_path": str(base.resolve()), "dequantized": dequantize,
            "created_at": now()}, indent=2) + "\n")
    return out
