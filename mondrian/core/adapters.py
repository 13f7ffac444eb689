"""The adapter folder: mlx-lm's format, read and checked in one place, without MLX.

An adapter folder holds `adapters.safetensors` (the LoRA tensors, `<layer>.lora_a` (in, r)
and `<layer>.lora_b` (r, out), under qualified module names) and `adapter_config.json`
(`fine_tune_type`, `num_layers`, `lora_parameters {rank, scale, dropout, keys?}`).
mlx-lm and mlx-vlm both read this format; mondrian's trainers write it, the registry checks
it, the engines load it. Importing it loads no MLX (the registry and the CLI's registry
commands stay light): the functions that touch tensors or models (`read_adapter`,
`write_adapter`, `load_trainable`, `lora_targets`) import MLX when called.

The LoRA targeting rule lives here once (`lora_targets`): in the last `num_layers`
transformer blocks of the language model (-1, or any value <= 0 as mlx-lm slices it, = all),
`lora_parameters.keys` (names relative to a block) or else every Linear layer. It picks the
layers mlx-lm's `linear_to_lora_layers` and mlx-vlm's loader pick (tests/test_adapters.py
compares them).
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import mlx.core as mx
    import mlx.nn as nn

WEIGHTS = "adapters.safetensors"
CONFIG = "adapter_config.json"
FILES = (WEIGHTS, CONFIG)

_FLOAT_DTYPES = {"F32", "F16", "BF16"}  # safetensors dtype names an adapter tensor may have
_MAX_HEADER = 100 << 20  # a longer safetensors header is a corrupt file, not an adapter


class AdapterError(ValueError):
    """An adapter folder (or a LoRA layout for a model) that cannot be used; says why."""


@dataclass(frozen=True)
class LoraLayout:
    """Which Linear layers get LoRA (the last `num_layers` blocks, -1 = all; `keys` or every
    Linear there) and the rank: what decides the LoRA layers, not their weights or scale."""

    num_layers: int
    rank: int
    keys: tuple[str, ...] | None


# --------------------------------------------------------------------------------------------
# reading


def read_config(folder: str | Path, where: str | None = None) -> dict:
    """The folder's adapter_config.json as a dict; AdapterError if it is not a JSON object."""
    where = where or str(folder)
    try:
        config = json.loads((Path(folder) / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{where}: {CONFIG} is not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise AdapterError(f"{where}: {CONFIG} is not a JSON object")
    return config


def read_layout(config: dict, where: str) -> tuple[LoraLayout, float]:
    """The LoRA layout and scale an adapter_config.json asks for (LoRA only)."""
    ftype = config.get("fine_tune_type", "lora")
    if ftype != "lora":
        raise AdapterError(f"{where}: fine_tune_type {ftype!r}; only LoRA adapters can be hot-swapped "
                           "(DoRA's scale 0 is not the base model; full fine-tunes are separate models)")
    params = config.get("lora_parameters") or {}
    try:
        rank, scale, num_layers = int(params["rank"]), float(params["scale"]), int(config["num_layers"])
    except (KeyError, TypeError, ValueError) as exc:
        raise AdapterError(f"{where}: {CONFIG} lacks a usable {exc} "
                           "(needs num_layers and lora_parameters.rank/scale)") from None
    keys = params.get("keys")
    return LoraLayout(num_layers, rank, tuple(keys) if keys else None), scale


# --------------------------------------------------------------------------------------------
# checking a folder without loading it


def safetensors_header(path: str | Path) -> dict:
    """The tensor table of a safetensors file, checked against the file's size (a truncated
    or non-safetensors file is refused here, without loading any tensor)."""
    size = Path(path).stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("too short to be a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _MAX_HEADER):
            raise ValueError("not a safetensors file (header length beyond the file)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"not a safetensors file (header is not JSON: {exc})") from exc
    if not isinstance(header, dict):
        raise ValueError("not a safetensors file (header is not an object)")
    header.pop("__metadata__", None)
    end = 0
    for name, info in header.items():
        try:
            start, stop = info["data_offsets"]
            shape, _ = info["shape"], info["dtype"]
            ok = 0 <= start <= stop and all(isinstance(d, int) and d >= 0 for d in shape)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"tensor {name}: malformed header entry") from exc
        if not ok:
            raise ValueError(f"tensor {name}: malformed header entry")
        end = max(end, stop)
    if 8 + n + end != size:
        raise ValueError(f"truncated or padded: the header describes {8 + n + end} bytes, "
                         f"the file has {size}")
    return header


def check_adapter(folder: str | Path) -> dict:
    """Check that `folder` is an mlx-lm LoRA/DoRA adapter folder; return its adapter_config.

    What `mlx_lm.load(..., adapter_path=)` needs and would otherwise fail on late (or, for
    tensors, on the wrong model, not at all): both files, the config keys
    `linear_to_lora_layers` reads, a readable safetensors file of paired lora_a / lora_b
    tensors whose rank is the config's.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterError(f"{folder}: not a folder")
    missing = [n for n in FILES if not (folder / n).is_file()]
    if missing:
        raise AdapterError(f"{folder}: not an mlx-lm adapter folder: {', '.join(missing)} missing")
    config = read_config(folder)
    problems, rank = _config_problems(config)
    try:
        header = safetensors_header(folder / WEIGHTS)
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{folder}: {WEIGHTS}: {exc}"
                           + (f"; also {'; '.join(problems)}" if problems else "")) from exc
    problems += _tensor_problems(header, config, rank)
    if problems:
        raise AdapterError(f"{folder}: not a usable mlx-lm adapter: " + "; ".join(problems))
    return config


def _config_problems(config: dict) -> tuple[list[str], int | None]:
    """What is wrong with an adapter_config.json, and its rank when that is usable."""
    problems: list[str] = []
    ftype = config.get("fine_tune_type")
    if ftype is None:
        problems.append(f"{CONFIG} has no fine_tune_type")
    elif ftype not in ("lora", "dora"):
        problems.append(f"fine_tune_type '{ftype}' is not an adapter (lora or dora)")
    num_layers = config.get("num_layers")
    if not isinstance(num_layers, int) or isinstance(num_layers, bool):
        problems.append(f"{CONFIG} needs an integer num_layers")
    params = config.get("lora_parameters")
    rank = None
    if not isinstance(params, dict):
        problems.append(f"{CONFIG} needs lora_parameters {{rank, scale, dropout}}")
        return problems, rank
    for key in ("rank", "scale", "dropout"):
        if not isinstance(params.get(key), int | float) or isinstance(params.get(key), bool):
            problems.append(f"lora_parameters.{key} is missing or not a number")
    if isinstance(params.get("rank"), int) and params["rank"] > 0:
        rank = params["rank"]
    elif "rank" in params:
        problems.append("lora_parameters.rank must be a positive integer")
    return problems, rank


def _tensor_problems(header: dict, config: dict, rank: int | None) -> list[str]:
    """What is wrong with the tensors a safetensors header lists, for this config."""
    problems: list[str] = []
    if not header:
        problems.append(f"{WEIGHTS} holds no tensors")
    allowed = ("lora_a", "lora_b", "m") if config.get("fine_tune_type") == "dora" else ("lora_a", "lora_b")
    foreign = sorted(n for n in header if n.rsplit(".", 1)[-1] not in allowed)
    if foreign:
        problems.append(f"{WEIGHTS} holds tensors that are not adapter weights "
                        f"({', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''})")
    bad_dtype = sorted(n for n, t in header.items() if t["dtype"] not in _FLOAT_DTYPES)
    if bad_dtype:
        problems.append(f"non-float adapter tensors ({', '.join(bad_dtype[:3])})")
    for name in sorted(n for n in header if n.endswith(".lora_a")):
        b_name = name[:-1] + "b"
        a_shape = header[name]["shape"]
        b_shape = header.get(b_name, {}).get("shape")
        if b_shape is None:
            problems.append(f"{name} has no {b_name}")
        elif len(a_shape) != 2 or len(b_shape) != 2 or a_shape[1] != b_shape[0]:
            problems.append(f"{name} {a_shape} and {b_name} {b_shape} do not pair")
        elif rank is not None and a_shape[1] != rank:
            problems.append(f"{name} has rank {a_shape[1]}, the config says {rank}")
    orphans = sorted(n for n in header if n.endswith(".lora_b") and n[:-1] + "a" not in header)
    if orphans:
        problems.append(f"{orphans[0]} has no lora_a")
    layers = {m.group(1) for n in header if (m := re.search(r"(?:^|\.)layers\.(\d+)\.", n))}
    num_layers = config.get("num_layers")
    if isinstance(num_layers, int) and num_layers > 0 and len(layers) > num_layers:
        problems.append(f"tensors for {len(layers)} layers but num_layers is {num_layers}")
    return problems


# --------------------------------------------------------------------------------------------
# tensors and models (MLX)


# --------------------------------------------------------------------------------------------
# adapter tensors


def read_adapter(folder: str | Path, where: str | None = None) -> tuple[dict, dict, LoraLayout, float]:
    """An adapter folder's config, tensors (name -> mx.array), LoRA layout and scale."""
    import mlx.core as mx  # noqa: PLC0415 - heavy: MLX; the registry reads folders without it

    folder = Path(folder)
    where = where or str(folder)
    try:
        config = json.loads((folder / CONFIG).read_text())
        arrays = mx.load(str(folder / WEIGHTS))
    except (OSError, ValueError, RuntimeError) as exc:
        raise AdapterError(f"{where}: cannot read the adapter ({exc})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{where}: {CONFIG} is not a JSON object")
    layout, scale = read_layout(config, where)
    return config, arrays, layout, scale


def write_adapter(folder: str | Path, weights: Mapping[str, mx.array], config: dict) -> None:
    """Write both files into `folder` (make it atomic with core.atomic.atomic_folder)."""
    import mlx.core as mx  # noqa: PLC0415 - heavy: MLX; the registry reads folders without it

    folder = Path(folder)
    mx.save_safetensors(str(folder / WEIGHTS), dict(weights))
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def load_trainable(model: nn.Module, folder: str | Path) -> None:
    """Load a folder's tensors into the model's LoRA layers after checking that names and
    shapes are exactly the trainable ones (load_weights(strict=False), which LoRA layers
    need, checks neither: a misnamed tensor would be silently ignored)."""
    import mlx.core as mx  # noqa: PLC0415 - heavy: MLX; the registry reads folders without it
    from mlx.utils import tree_flatten  # noqa: PLC0415 - heavy: MLX; the registry reads folders without it

    path = Path(folder) / WEIGHTS
    saved = mx.load(str(path))
    want = dict(tree_flatten(model.trainable_parameters()))
    if set(saved) != set(want):
        raise AdapterError(f"{path}: tensors do not match the LoRA layers (missing "
                           f"{sorted(set(want) - set(saved))[:5]}, extra {sorted(set(saved) - set(want))[:5]})")
    bad = [k for k in want if saved[k].shape != want[k].shape]
    if bad:
        raise AdapterError(f"{path}: shapes differ for {bad[:5]}")
    model.load_weights(list(saved.items()), strict=False)


# --------------------------------------------------------------------------------------------
# which layers get LoRA


def transformer_blocks(model: nn.Module) -> tuple[str, list]:
    """The qualified name prefix of the language model's transformer blocks, and the blocks,
    for mlx-lm models (`model.layers`) and mlx-vlm models (`language_model.model.layers`)."""
    lm = getattr(model, "language_model", model)
    blocks = getattr(lm, "layers", None)
    if blocks is None and hasattr(lm, "model"):
        blocks = getattr(lm.model, "layers", None)
    if not blocks:
        raise AdapterError(f"{type(model).__name__}: cannot find the language model's layers")
    first = blocks[0]
    for name, module in model.named_modules():
        if module is first:
            return name.rsplit(".", 1)[0], list(blocks)
    raise AdapterError(f"{type(model).__name__}: the language model's layers are not modules of the model")


def _block_layers(block: nn.Module, unwrap: Callable[[nn.Module], nn.Module] | None) -> dict[str, nn.Module]:
    """Every module of a block by relative name, a wrapper (unwrap(m) is not m) standing for
    the layer it wraps and hiding its own submodules."""
    modules = [(n, m) for n, m in block.named_modules() if n]
    bases = {n: unwrap(m) if unwrap else m for n, m in modules}
    wrappers = [n for n, m in modules if bases[n] is not m]
    return {n: bases[n] for n, _ in modules if not any(n.startswith(w + ".") for w in wrappers)}


def lora_targets(model: nn.Module, num_layers: int, keys: Sequence[str] | None = None, *,
                 unwrap: Callable[[nn.Module], nn.Module] | None = None) -> dict[str, nn.Module]:
    """The Linear layers LoRA goes on, by qualified name, block by block (sorted names inside
    a block, or the order of `keys`): in the last `num_layers` blocks (<= 0: all, as mlx-lm's
    `model.layers[-max(num_layers, 0):]`), `keys` (block-relative names) or every Linear.

    `unwrap(module)` returns the layer a wrapper module stands for (itself otherwise), so a
    model whose Linear layers are already wrapped (the engine's slot layers) maps to the
    same names and base layers."""
    import mlx.nn as nn  # noqa: PLC0415 - heavy: MLX; the registry reads folders without it

    prefix, blocks = transformer_blocks(model)
    n = len(blocks) if num_layers <= 0 else num_layers
    if n > len(blocks):
        raise AdapterError(f"num_layers {num_layers} > the model's {len(blocks)} language layers")
    out: dict[str, nn.Module] = {}
    for b in range(len(blocks) - n, len(blocks)):
        block = f"{prefix}.{b}"
        layers = _block_layers(blocks[b], unwrap)
        linear = sorted(k for k, m in layers.items() if isinstance(m, (nn.Linear, nn.QuantizedLinear)))
        if keys is None:
            embedding = sorted(k for k, m in layers.items() if isinstance(m, (nn.Embedding, nn.QuantizedEmbedding)))
            if embedding:  # mlx-lm would put LoRA on it; mondrian's loaders take Linear only
                raise AdapterError(f"LoRA on {block}.{embedding[0]} ({type(layers[embedding[0]]).__name__}): "
                                   "only Linear layers take LoRA here")
            out |= {f"{block}.{k}": layers[k] for k in linear}
            continue
        for key in keys:
            if key not in linear:
                raise AdapterError(f"lora_parameters.keys: no Linear '{key}' in block {block} "
                                   f"(there: {linear})")
            out[f"{block}.{key}"] = layers[key]
    if not out:
        raise AdapterError("no Linear layers to put LoRA on in the chosen language layers")
    return out
