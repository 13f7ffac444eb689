"""LoRA training for image advisors, on mlx-vlm 0.7.10's trainer machinery.

`train_vision(cfg)` takes the shared `TrainConfig` (the mlx-lm-compatible YAML keys)
and trains with mlx-vlm's own parts: `prepare_model_for_training` (LoRA layers and the
adapter metadata), `VisionDataset` (chat template, image processor, completion mask),
`iterate_batch_indices` + `collate_vlm_batch` (length-grouped batches), `vlm_sft_loss`,
`apply_gradient_step` and `evaluate_vlm`. The loop around them is ours, as in mondrian/train/text.py:
errors before step one, runs in SQLite, best-by-validation adapter, exact resume.

What mlx-vlm needs, and how the config keys map onto it:
- `lora_parameters.scale` is mlx-lm's update scale; mlx-vlm takes `alpha` and uses
  scale = alpha / rank, so alpha = scale * rank is passed.
- `num_layers` / `lora_parameters.keys` keep mlx-lm's meaning (every Linear, or the keys, in
  the last `num_layers` blocks of the language model: `core.adapters.lora_targets`) and are
  turned into qualified module names (`language_model.model.layers.1.mlp.up_proj`): mlx-vlm
  records them in `adapter_config.json` and re-creates exactly those layers when it loads
  the adapter.
- An adapter folder (mondrian/core/adapters.py) is `adapters.safetensors` (the trainable
  tensors under their qualified names) + `adapter_config.json` ({fine_tune_type, num_layers,
  lora_parameters {rank, scale, dropout, keys}} as recorded by mlx-vlm).
  `mlx_vlm.load(path, adapter_path=)` loads the weights with strict=False and checks
  nothing, so the names must be exactly these.
- `mask_prompt` is mlx-vlm's `train_on_completions` (the dataset's completion mask).
- `answer_only_logits` and `bucket_batches` are text-trainer options; mlx-vlm's loss takes
  full logits and its batches are length-grouped its own way.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mondrian.core.adapters import AdapterError, lora_targets, read_config, write_adapter
from mondrian.core.config import ConfigError
from mondrian.core.jsonl import read_jsonl
from mondrian.models.upstream import image_token_id
from mondrian.train import loop
from mondrian.train.config import TrainConfig, make_optimizer
from mondrian.train.distributed import ALONE, World, fault_injection
from mondrian.train.loop import TrainError, TrainResult

ADAPTER_INFO = "mondrian_adapter.json"  # our provenance, beside (mlx-vlm ignores it)
# Splits this large are not held preprocessed in memory (pixel values add up).
FULL_CACHE_ROWS = 2000
LRU_CACHE_ROWS = 64


# --------------------------------------------------------------------------------------------
# data


def load_vision_split(folder: Path, name: str):
    """One split's rows as mlx-vlm's RawSplit (base_path = the folder, where image paths are
    relative), refused with the line number if a row is not JSON or has no image."""
    from mlx_vlm.trainer.datasets.loading import RawSplit  # noqa: PLC0415 - heavy: mlx_vlm loads transformers

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
                             "advisors (text advisors train with mondrian.train.text.train_text)")
        for img in images:
            if not isinstance(img, str):
                raise TrainError(f"{path}:{i}: image entries must be paths, got {img!r}")
            if not (folder / img).is_file():
                raise TrainError(f"{path}:{i}: image {img} does not exist under {folder}")
        rows.append(row)
    return RawSplit(rows, folder)


def make_dataset(rows: Any, model: nn.Module, processor: Any, cfg: TrainConfig):
    """mlx-vlm's VisionDataset behind its CacheDataset (which also gives lengths for batching)."""
    from mlx_vlm.trainer.datasets.loading import CacheDataset  # noqa: PLC0415 - heavy: mlx_vlm loads transformers
    from mlx_vlm.trainer.vlm.sft.dataset import VisionDataset  # noqa: PLC0415 - heavy: mlx_vlm loads transformers

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
    from mlx_vlm.trainer.common.utils import iterate_batch_indices  # noqa: PLC0415 - heavy: mlx_vlm loads transformers

    it = iterate_batch_indices(len(ds), cfg.batch_size, length_key=ds.itemlen,
                               group_key=ds.media_signature, train=True, rank=0, world_size=1,
                               seed=cfg.seed)
    for _ in range(skip):
        next(it)
    return it


def collate(ds: Any, idx: list[int], cfg: TrainConfig, pad_id: int) -> dict[str, Any]:
    from mlx_vlm.trainer.vlm.sft.runtime import collate_vlm_batch  # noqa: PLC0415 - heavy: mlx_vlm loads transformers

    return collate_vlm_batch([ds[i] for i in idx], cfg.max_seq_length, pad_token_id=pad_id,
                             image_token_id=image_token_id(ds))


# --------------------------------------------------------------------------------------------
# model and adapters


def prepare_model(model: nn.Module, cfg: TrainConfig) -> dict:
    """Freeze the base and attach LoRA through mlx-vlm; returns the adapter config it recorded."""
    from mlx_vlm.trainer.common.model import prepare_model_for_training  # noqa: PLC0415 - heavy: mlx_vlm loads transformers

    lp = cfg.lora_parameters
    rank, scale = int(lp.get("rank", 8)), float(lp.get("scale", 20.0))
    try:
        targets = list(lora_targets(model, cfg.num_layers, lp.get("keys")))
    except AdapterError as exc:
        raise TrainError(str(exc)) from None
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
    write_adapter(folder, dict(tree_flatten(model.trainable_parameters())), adapter_config(model))
    (folder / ADAPTER_INFO).write_text(json.dumps(info, indent=2, default=str) + "\n")


# --------------------------------------------------------------------------------------------
# the run


def evaluate(model: nn.Module, ds: Any, cfg: TrainConfig, pad_id: int) -> float:
    """Token-weighted validation loss over the first val_batches length-sorted batches."""
    from mlx_vlm.trainer.vlm.sft.runtime import evaluate_vlm, vlm_sft_loss  # noqa: PLC0415 - heavy: mlx_vlm loads transformers

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





def _inputs(cfg: TrainConfig, resume: bool) -> tuple[Path, Path, Path | None, Any, Any]:
    """What can be refused before the model loads: the config, the data folder and its rows,
    the output folder. Returns (data, out, the checkpoint to resume, train rows, valid rows)."""
    try:
        cfg.check()
    except ConfigError as exc:
        raise TrainError(str(exc)) from exc
    if cfg.answer_turns != "last":  # mlx-vlm's completion mask is the last answer's
        raise TrainError("answer_turns: all is for text advisors; the vision trainer scores the last answer")
    if cfg.mix_alpha != 1:  # mlx-vlm draws its own batches
        raise TrainError("mix_alpha is for text advisors; the vision trainer keeps the data's mix")
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
    return data, out, checkpoint, train_rows, valid_rows


def _load_model(cfg: TrainConfig, path: str, train_rows: Any,
                valid_rows: Any) -> tuple[nn.Module, Any, int, Any, Any]:
    """The base model and processor, the pad token id, and both splits as checked datasets."""
    import mlx_vlm  # noqa: PLC0415 - heavy: mlx_vlm loads transformers
    from mlx_vlm.trainer.common.utils import resolve_pad_token_id  # noqa: PLC0415 - heavy: mlx_vlm loads transformers

    mx.random.seed(cfg.seed)  # the LoRA A matrices' initialization
    model, processor = mlx_vlm.load(path)
    if not hasattr(model, "vision_tower") and not hasattr(model, "vision_model"):
        raise TrainError(f"{cfg.model} is not a vision-language model mlx-vlm can train")
    tokenizer = getattr(processor, "tokenizer", processor)
    pad_id = resolve_pad_token_id(tokenizer)
    train_ds = make_dataset(train_rows, model, processor, cfg)
    valid_ds = make_dataset(valid_rows, model, processor, cfg)
    check_split("train", train_ds, cfg)
    check_split("valid", valid_ds, cfg)
    return model, processor, pad_id, train_ds, valid_ds


def make_step(model: nn.Module, optimizer: Any, ds: Any, cfg: TrainConfig, pad_id: int,
              start: int, w: World = ALONE) -> Callable[[int], tuple[float, int, int]]:
    """Training step n -> (mean loss, loss tokens, tokens) on mlx-vlm's batches and loss;
    resuming at `start` replays the batch order without data work. Under `mlx.launch` each
    rank takes its shard of the global batch and the gradient is the world's token-weighted
    mean (mondrian.train.distributed); validation runs whole on every rank."""
    from mlx_vlm.trainer.common.utils import (  # noqa: PLC0415 - heavy: mlx_vlm loads transformers
        apply_final_accumulated_gradients,
        apply_gradient_step,
    )
    from mlx_vlm.trainer.vlm.sft.runtime import vlm_sft_loss  # noqa: PLC0415 - heavy: mlx_vlm loads transformers

    loss_fn = partial(vlm_sft_loss, train_on_completions=cfg.mask_prompt)
    local_value_and_grad = nn.value_and_grad(model, loss_fn)

    def value_and_grad(model, batch):
        (loss, metrics), grad = local_value_and_grad(model, batch)
        loss, weight, grad = w.token_mean(loss, metrics["weight"], grad)
        return (loss, metrics | {"weight": weight,
                                 "num_processed_tokens": w.sum(metrics["num_processed_tokens"])}), grad

    accum = cfg.grad_accumulation_steps
    batches = batch_indices(ds, cfg, skip=start)
    grads = [None]  # gradient carried across accumulation steps

    def one_step(step: int) -> tuple[float, int, int]:
        fault_injection(w, step)
        batch = collate(ds, w.shard(next(batches)), cfg, pad_id)
        mx.random.seed(cfg.seed * 1_000_003 + step)  # dropout noise depends on the step only
        lvalue, metrics, grads[0] = apply_gradient_step(model, optimizer, value_and_grad, batch, grads[0],
                                                        update=step % accum == 0, accumulation_steps=accum)
        if step == cfg.iters:  # a last, incomplete accumulation still counts
            apply_final_accumulated_gradients(model, optimizer, grads[0], step, accum)
            grads[0] = None
        w.check(lambda: mx.eval(lvalue, metrics, model.trainable_parameters(), optimizer.state, grads[0]))
        return lvalue.item(), int(metrics["weight"].item()), int(metrics["num_processed_tokens"].item())

    return one_step


def _run(cfg: TrainConfig, resume: bool, progress: bool,
         stop_after: int | None) -> tuple[TrainResult, nn.Module, Any]:
    """train_vision, also returning the trained model and processor (tests compare them
    with what mlx-vlm loads from the written adapter)."""
    w = loop.join_world(cfg.batch_size)
    data, out, checkpoint, train_rows, valid_rows = _inputs(cfg, resume)
    card = loop.base_model(cfg.model)
    model, processor, pad_id, train_ds, valid_ds = _load_model(cfg, card.path, train_rows, valid_rows)
    lora_config = prepare_model(model, cfg)
    if cfg.grad_checkpoint:
        from mlx_vlm.trainer.common.utils import enable_model_gradient_checkpointing  # noqa: PLC0415 - heavy: mlx_vlm loads transformers

        enable_model_gradient_checkpointing(model)
    optimizer = make_optimizer(cfg)

    if checkpoint is not None and read_config(checkpoint) != json.loads(json.dumps(lora_config)):
        raise TrainError("--resume: lora_parameters / num_layers differ from the checkpoint's")
    session = loop.begin(cfg, data, out, card.fingerprint, checkpoint, {"trainer": "mlx-vlm"}, w=w)
    loop.start_weights(model, cfg, checkpoint)
    if checkpoint is not None:
        loop.restore_optimizer(optimizer, checkpoint)
    info = session.meta | {"base_model": cfg.model, "base_model_path": card.path,
                           "advisor": cfg.advisor, "trainer": "mlx-vlm"}

    mx.eval(model.parameters())
    hooks = loop.Hooks(step=make_step(model, optimizer, train_ds, cfg, pad_id, session.start, w),
                       evaluate=lambda: evaluate(model, valid_ds, cfg, pad_id),
                       save_adapter=lambda folder, extra: save_vision_adapter(folder, model, info | extra))
    model.train()
    result = loop.run(cfg, session, out, hooks, optimizer, progress=progress, stop_after=stop_after)
    return result, model, processor
