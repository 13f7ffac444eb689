"""What the tiny model builders share: random weights, JSON files, and the atomic build.

A build happens in a temp sibling folder renamed into place, with a marker file written last
that records the spec: a folder with a matching marker is complete and is reused.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from mlx.utils import tree_flatten
from safetensors.numpy import save_file

from mondrian.core.atomic import atomic_folder

_MARKER = ".tiny-model.json"  # written last inside the temp folder: "this folder is complete"
_WEIGHT_STD = 0.02  # the usual transformer init; keeps random logits small and finite


def write_json(path: Path, obj: Any) -> None:
    """Indented, key-sorted JSON: the same object always gives the same bytes."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def random_weights(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    """Deterministic float32 weights: N(0, 0.02) matrices, ones for norm scales, zero biases."""
    rng = np.random.Generator(np.random.PCG64(seed))
    out: dict[str, np.ndarray] = {}
    for name in sorted(shapes):  # sorted: the draw order (hence the bytes) is fixed
        shape = shapes[name]
        if name.endswith(".bias"):
            out[name] = np.zeros(shape, dtype=np.float32)
        elif len(shape) == 1:  # only norm layers have 1-D weights
            out[name] = np.ones(shape, dtype=np.float32)
        else:
            out[name] = rng.standard_normal(shape, dtype=np.float32) * np.float32(_WEIGHT_STD)
    return out


def param_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of an mlx module (shapes only: nothing is evaluated)."""
    return {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}


def save_weights(folder: Path, weights: dict[str, np.ndarray]) -> None:
    """model.safetensors as mlx-lm writes it."""
    # {"format": "mlx"} is what mlx-lm itself writes; the header is key-sorted, so bytes are stable.
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "mlx"})


def atomic_build(
    path: str | os.PathLike[str], spec: dict[str, Any], fill: Callable[[Path], None]
) -> Path:
    """Build into a temp sibling folder, then rename it into place.

    Readers never see a half-written model; a target with a matching marker is reused; one
    built from a different spec is replaced; a non-empty folder we did not build is an error.
    """
    target = Path(path).resolve()
    if _is_built(target, spec):
        return target
    if target.exists() and not _is_ours(target) and any(target.iterdir()):
        raise FileExistsError(f"{target} exists and is not a tiny model built by mondrian.models.tiny")
    try:
        with atomic_folder(target) as tmp:
            fill(tmp)
            write_json(tmp / _MARKER, spec)  # last: its presence means every other file is there
            for f in tmp.iterdir():  # safetensors writes 0600 files: open them up to read
                f.chmod(0o644)
    except OSError:
        # Lost a race with a concurrent builder: fine if it built the same thing.
        if _is_built(target, spec):
            return target
        raise
    return target


def _is_ours(folder: Path) -> bool:
    return (folder / _MARKER).is_file()


def _is_built(folder: Path, spec: dict[str, Any]) -> bool:
    try:
        return json.loads((folder / _MARKER).read_text(encoding="utf-8")) == spec
    except (OSError, ValueError):
        return False
