"""LoRA training for image advisors, on mlx-vlm 0.7.10's trainer machinery.

`train_vision(cfg)` takes the text trainer's `TrainConfig` (the mlx-lm-compatible YAML keys)
and trains with mlx-vlm's own parts: `prepare_model_for_training` (LoRA layers and the
adapter metadata), `VisionDataset` (chat template, image processor, completion mask),
`iterate_batch_indices` + `collate_vlm_batch` (length-grouped batches), `vlm_sft_loss`,
`apply_gradient_step` and `evaluate_vlm`. The loop around them is ours, as in mondrian/train/text.py:
errors before step one, runs in SQLite, best-by-validation adapter, exact resume.

What mlx-vlm needs, and how the config keys map onto it:
- `lora_parameters.scale` is mlx-lm's update scale; mlx-vlm takes `alpha` and uses
  scale = alpha / rank, so alpha = scale * rank is passed.
- `num_layers` / `lora_parameters.keys` keep mlx-lm's meaning (every Linear, or the keys, in
  the last `num_layers` blocks of the language model) and are turned into qualified module
  names (`language_model.model.layers.1.mlp.up_proj`): mlx-vlm records them in
  `adapter_config.json` and re-creates exactly those layers when it loads the adapter.
- An adapter folder is `adapters.safetensors` (the trainable tensors under their qualified
  names) + `adapter_config.json` ({fine_tune_type, num_layers, lora_parameters {rank,
  scale, dropout, keys}} as recorded by mlx-vlm). `mlx_vlm.load(path, adapter_path=)` loads
  the weights with strict=False and checks nothing, so the names must be exactly these.
- `mask_prompt` is mlx-vlm's `train_on_completions` (the dataset's completion mask).
- `answer_only_logits` and `bucket_batches` are text-trainer options; mlx-vlm's loss takes
  full logits and its batches are length-grouped its own way.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mondrian.core.config import ConfigError
from mondrian.core.jsonl import read_jsonl
from mondrian.train import loop
from mondrian.train.loop import TrainError, TrainResult
from mondrian.train.text import TrainConfig, make_optimizer

ADAPTER_WEIGHTS = "adapters.safetensors"  # the names mlx-vlm's _read_checkpoint looks for
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_INFO = "mondrian_adapter.json"  # our provenance, beside (mlx-vlm ignores it)
# Splits this large are not held preprocessed in memory (pixel values add up).
FULL_CACHE_ROWS = 2000
LRU_CACHE_ROWS = 64


# --------------------------------------------------------------------------------------------
# data


def load_vision_split(folder: Path, name: str):
    """One split's rows as mlx-vlm's RawSplit (base_path = the folder, where image paths are
    relative), refused with the line number if a row is not JSON or has no image."""
    from mlx_vlm.trainer.datasets.loading import RawSplit

    path = folder / f"{name}.jsonl"
    if not path.is_file():
        raise TrainError(f"{path}: missing (build it with `mondrian dataset`)")
    rows = []
    for i, row in read_jsonl(path, TrainError):
        if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
            raise TrainError(f"{path}:{i}: rows need 'messages' (mlx-vlm chat rows)")
        images = row.get("images", row.get("image"))
        images = [images] if isinstance(images, str) else images
        if not images:
            # Why refuse: a text-only row is not what a vision advisor learns from, and
            # Qwen2-VL reuses the previous batch's cached M-RoPE positions when a batch
            # has no pixel values.
            raise TrainError(f"{path}:{i}: the row has no image; train_vision trains image "
                             "advisors (text advisors train with mondrian.train.text.train)")
        for img in images:
            if not isinstance(img, str):
                raise TrainError(f"{path}:{i}: image entries must be paths, got {img!r}")
            if not (folder / img).is_file():
                raise TrainError(f"{path}:{i}: image {img} does not exist under {folder}")
        rows.append(row)
    return RawSplit(rows, folder)


def make_dataset(rows: Any, model: nn.Module, processor: Any, cfg: TrainConfig):
    """mlx-vlm's VisionDataset behind its CacheDataset (which also gives lengths for batching)."""
    from mlx_vlm.trainer.datasets.loading import CacheDataset
    from mlx_vlm.trainer.vlm.sft.dataset import VisionDataset

    ds = VisionDataset(rows, model.config, processor,
                       config={"train_on_completions": cfg.mask_prompt})
    size = None if len(rows) <= FULL_CACHE_ROWS else LRU_CACHE_ROWS
    return CacheDataset(ds, max_size=size, process=False)


def check_split(name: str, ds: Any, cfg: TrainConfig) -> list[int]:
    """Process every row once (mlx-vlm's batcher needs every length anyway) and refuse what
    would fail or be truncated later; returns the lengths."""
    if len(ds) < cfg.batch_size:
        raise TrainError(f"the {name} split has {len(ds)} rows, fewer than batch_size "
                         f"{cfg.batch_size}: lower batch_size or add data")
    lengths = []
    for i in range(len(ds)):
        try:
            lengths.append(ds.itemlen(i))
        except Exception as exc:  # mlx-vlm's processor / template errors, made specific
            raise TrainError(f"{name}.jsonl row {i + 1}: mlx-vlm cannot prepare it: "
                             f"{type(exc).__name__}: {exc}") from exc
    long = [i + 1 for i, n in enumerate(lengths) if n > cfg.max_seq_length]
    if long:
        raise TrainError(f"{len(long)} {name} rows are longer than max_seq_length {cfg.max_seq_length} "
                         f"(image tokens included) and would be truncated (rows {long[:10]}, longest "
                         f"{max(lengths)}); raise max_seq_length or use smaller images")
    return lengths


def batch_indices(ds: Any, cfg: TrainConfig, skip: int = 0) -> Iterator[list[int]]:
    """mlx-vlm's training batch order (length groups, shuffled per epoch from `seed`): a pure
    function of (data, batch_size, seed), so resume replays `skip` batches without data work."""
    from mlx_vlm.trainer.common.utils import iterate_batch_indices

    it = iterate_batch_indices(len(ds), cfg.batch_size, length_key=ds.itemlen,
                               group_key=ds.media_signature, train=True, rank=0, world_size=1,
                               seed=cfg.seed)
    for _ in range(skip):
        next(it)
    return it


def collate(ds: Any, idx: list[int], cfg: TrainConfig, pad_id: int) -> dict[str, Any]:
    from mlx_vlm.trainer.vlm.sft.runtime import _image_token_id, collate_vlm_batch

    return collate_vlm_batch([ds[i] for i in idx], cfg.max_seq_length, pad_token_id=pad_id,
                             image_token_id=_image_token_id(ds))


# --------------------------------------------------------------------------------------------
# model and adapters


def _language_blocks(model: nn.Module) -> tuple[str, list]:
    """The qualified name and the list of the language model's transformer blocks."""
    lm = getattr(model, "language_model", model)
    blocks = getattr(lm, "layers", None)
    if blocks is None and hasattr(lm, "model"):
        blocks = getattr(lm.model, "layers", None)
    if not blocks:
        raise TrainError(f"{type(model).__name__}: cannot find the language model's layers")
    first = blocks[0]
    for name, module in model.named_modules():
        if module is first:
            return name.rsplit(".", 1)[0], blocks
    raise TrainError(f"{type(model).__name__}: the language model's layers are not modules of the model")


def lora_targets(model: nn.Module, num_layers: int, keys: list[str] | None) -> list[str]:
    """Qualified Linear names in the last `num_layers` blocks (mlx-lm's num_layers / keys)."""
    prefix, blocks = _language_blocks(model)
    if num_layers > len(blocks):
        raise TrainError(f"num_layers {num_layers} > the model's {len(blocks)} language layers")
    linear = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear))}
    out = []
    for b in range(len(blocks) - num_layers, len(blocks)):
        block = f"{prefix}.{b}."
        if keys is None:
            out += sorted(n for n in linear if n.startswith(block))
            continue
        for key in keys:
            if block + key not in linear:
                raise TrainError(f"lora_parameters.keys: no Linear '{key}' in block {block[:-1]} "
                                 f"(there: {sorted(n[len(block):] for n in linear if n.startswith(block))})")
            out.append(block + key)
    if not out:
        raise TrainError("no Linear layers to put LoRA on in the chosen language layers")
    return out


def prepare_model(model: nn.Module, cfg: TrainConfig) -> dict:
    """Freeze the base and attach LoRA through mlx-vlm; returns the adapter config it recorded."""
    from mlx_vlm.trainer.common.model import prepare_model_for_training

    lp = cfg.lora_parameters
    rank, scale = int(lp.get("rank", 8)), float(lp.get("scale", 20.0))
    targets = lora_targets(model, cfg.num_layers, lp.get("keys"))
    try:
        prepare_model_for_training(model, train_type="lora", lora_rank=rank,
                                   lora_alpha=scale * rank,  # mlx-vlm: scale = alpha / rank
                                   lora_dropout=float(lp.get("dropout", 0.0)),
                                   target_modules=targets, verbose=False)
    except ValueError as exc:
        raise TrainError(f"mlx-vlm refused the LoRA settings: {exc}") from exc
    return adapter_config(model)


def adapter_config(model: nn.Module) -> dict:
    """The adapter_config.json mlx-vlm wrote itself (save_trainable_weights' source)."""
    conf = getattr(model, "_vlm_adapter_config", None)
    if conf is None:
        conf = getattr(getattr(model, "config", None), "lora", None)
    if not isinstance(conf, dict):
        raise TrainError("mlx-vlm recorded no adapter config on the model")
    return copy.deepcopy(conf)


def save_vision_adapter(folder: Path, model: nn.Module, info: dict) -> None:
    """An adapter folder `mlx_vlm.load(base, adapter_path=folder)` restores exactly."""
    weights = dict(tree_flatten(model.trainable_parameters()))
    mx.save_safetensors(str(folder / ADAPTER_WEIGHTS), weights)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(model), indent=2, sort_keys=True) + "\n")
    (folder / ADAPTER_INFO).write_text(json.dumps(info, indent=2, default=str) + "\n")


def _load_adapter_weights(model: nn.Module, path: Path) -> None:
    """Load trainable tensors after checking names and shapes (load_weights(strict=False),
    which the LoRA layers need, checks neither)."""
    saved = mx.load(str(path))
    want = dict(tree_flatten(model.trainable_parameters()))
    if set(saved) != set(want):
        raise TrainError(f"{path}: tensors do not match the LoRA layers (missing "
                         f"{sorted(set(want) - set(saved))[:5]}, extra {sorted(set(saved) - set(want))[:5]})")
    bad = [k for k in want if saved[k].shape != want[k].shape]
    if bad:
        raise TrainError(f"{path}: shapes differ for {bad[:5]}")
    model.load_weights(list(saved.items()), strict=False)


# --------------------------------------------------------------------------------------------
# the run


def evaluate(model: nn.Module, ds: Any, cfg: TrainConfig, pad_id: int) -> float:
    """Token-weighted validation loss over the first val_batches length-sorted batches."""
    from mlx_vlm.trainer.vlm.sft.runtime import evaluate_vlm, vlm_sft_loss

    try:
        return evaluate_vlm(model, ds, cfg.batch_size, cfg.val_batches if cfg.val_batches > 0 else -1,
                            cfg.max_seq_length, loss_fn=vlm_sft_loss,
                            train_on_completions=cfg.mask_prompt, pad_token_id=pad_id)
    finally:
        model.train()  # evaluate_vlm leaves the model in eval mode


def train_vision(cfg: TrainConfig, resume: bool = False, progress: bool = True,
                 stop_after: int | None = None) -> TrainResult:
    """Train a LoRA adapter for an image advisor as configured. `stop_after` ends the work
    after that many steps, as a kill would (to test resume); the run stays resumable."""
    return _run(cfg, resume, progress, stop_after)[0]


def _run(cfg: TrainConfig, resume: bool, progress: bool,
         stop_after: int | None) -> tuple[TrainResult, nn.Module, Any]:
    """train_vision, also returning the trained model and processor (tests compare them
    with what mlx-vlm loads from the written adapter)."""
    import mlx_vlm
    from mlx_vlm.trainer.common.utils import (
        apply_final_accumulated_gradients,
        apply_gradient_step,
        resolve_pad_token_id,
    )
    from mlx_vlm.trainer.vlm.sft.runtime import vlm_sft_loss

    from mondrian.models.sources import ModelError, resolve

    try:
        cfg.check()
    except ConfigError as exc:
        raise TrainError(str(exc)) from exc
    data = Path(cfg.data)
    if not data.is_dir():  # mlx-vlm's loader would take a missing folder for a hub dataset id
        raise TrainError(f"data folder {data} does not exist (a path is never looked up on the hub)")
    out = Path(cfg.adapter_path)
    checkpoint = loop.check_output(out, resume)
    train_rows = load_vision_split(data, "train")
    valid_rows = load_vision_split(data, "valid")
    for name, rows in (("train", train_rows), ("valid", valid_rows)):
        if len(rows) < cfg.batch_size:  # before the model loads: the cheapest refusal first
            raise TrainError(f"the {name} split has {len(rows)} rows, fewer than batch_size "
                             f"{cfg.batch_size}: lower batch_size or add data")
    try:
        card = resolve(cfg.model)
    except ModelError as exc:
        raise TrainError(str(exc)) from exc

    mx.random.seed(cfg.seed)  # the LoRA A matrices' initialization
    model, processor = mlx_vlm.load(card.path)
    if not hasattr(model, "vision_tower") and not hasattr(model, "vision_model"):
        raise TrainError(f"{cfg.model} is not a vision-language model mlx-vlm can train")
    tokenizer = getattr(processor, "tokenizer", processor)
    pad_id = resolve_pad_token_id(tokenizer)
    train_ds = make_dataset(train_rows, model, processor, cfg)
    valid_ds = make_dataset(valid_rows, model, processor, cfg)
    check_split("train", train_ds, cfg)
    check_split("valid", valid_ds, cfg)

    lora_config = prepare_model(model, cfg)
    if cfg.grad_checkpoint:
        from mlx_vlm.trainer.common.utils import enable_model_gradient_checkpointing

        enable_model_gradient_checkpointing(model)
    optimizer = make_optimizer(cfg)

    if checkpoint is not None and json.loads((checkpoint / ADAPTER_CONFIG).read_text()) != \
            json.loads(json.dumps(lora_config)):
        raise TrainError("--resume: lora_parameters / num_layers differ from the checkpoint's")
    session = loop.begin(cfg, data, out, card.fingerprint, checkpoint, {"trainer": "mlx-vlm"})
    if checkpoint is not None:
        _load_adapter_weights(model, checkpoint / ADAPTER_WEIGHTS)
        loop.restore_optimizer(optimizer, checkpoint)
    info = session.meta | {"base_model": cfg.model, "base_model_path": card.path,
                           "advisor": cfg.advisor, "trainer": "mlx-vlm"}

    mx.eval(model.parameters())
    loss_fn = partial(vlm_sft_loss, train_on_completions=cfg.mask_prompt)
    value_and_grad = nn.value_and_grad(model, loss_fn)
    accum = cfg.grad_accumulation_steps
    batches = batch_indices(train_ds, cfg, skip=session.start)
    grads = [None]  # gradient carried across accumulation steps

    def one_step(step: int) -> tuple[float, int, int]:
        batch = collate(train_ds, next(batches), cfg, pad_id)
        mx.random.seed(cfg.seed * 1_000_003 + step)  # dropout noise depends on the step only
        lvalue, metrics, grads[0] = apply_gradient_step(model, optimizer, value_and_grad, batch, grads[0],
                                                        update=step % accum == 0, accumulation_steps=accum)
        if step == cfg.iters:  # a last, incomplete accumulation still counts
            apply_final_accumulated_gradients(model, optimizer, grads[0], step, accum)
            grads[0] = None
        mx.eval(lvalue, metrics, model.trainable_parameters(), optimizer.state, grads[0])
        return lvalue.item(), int(metrics["weight"].item()), int(metrics["num_processed_tokens"].item())

    hooks = loop.Hooks(step=one_step, evaluate=lambda: evaluate(model, valid_ds, cfg, pad_id),
                       save_adapter=lambda folder, extra: save_vision_adapter(folder, model, info | extra))
    model.train()
    result = loop.run(cfg, session, out, hooks, optimizer, progress=progress, stop_after=stop_after)
    return result, model, processor


