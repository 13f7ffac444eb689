"""LoRA training for text advisors, in-process on mlx-lm's model and LoRA layers.

What mlx-lm's `train()` lacks, and this loop adds:
- exact resume: a checkpoint holds the adapter, the optimizer state and the step; the
  batch order is a pure function of (seed, epoch), so the data position is the step.
  A run killed with -9 and resumed ends with the same adapter as an uninterrupted one;
- the best adapter by validation loss is kept, with optional early stopping;
- errors before the first step: splits smaller than the batch, rows that would be
  truncated, a tokenizer that does not fit the model, unknown config keys;
- every run recorded in SQLite (`runs`, `run_metrics`) with a loss-curve SVG;
- speed: logits only where the loss is taken (answer tokens with mask_prompt), and
  length bucketing with padding to a multiple of 8 instead of 32.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from mondrian.core.config import ConfigError, from_dict, load_yaml
from mondrian.core.jsonl import read_jsonl
from mondrian.train import loop
from mondrian.train.loop import Hooks, TrainError, TrainResult  # noqa: F401 - re-exported for callers

# mlx-lm config keys that have no effect here; accepted so an mlx-lm config just works.
MLX_LM_IGNORED = ("train", "test", "test_batches", "report_to", "project_name", "config",
                  "clear_cache_threshold", "trust_remote_code")


@dataclass
class TrainConfig:
    # -- keys shared with mlx-lm's LoRA config (same names, same meaning) --
    model: str = "smollm2-135m"
    data: str = "workspace/datasets/fit-query"
    adapter_path: str = "adapters"
    fine_tune_type: str = "lora"
    num_layers: int = 16
    lora_parameters: dict = field(default_factory=lambda: {"rank": 8, "dropout": 0.0, "scale": 20.0})
    batch_size: int = 4
    iters: int = 1000
    learning_rate: float = 1e-5
    lr_schedule: dict | None = None
    optimizer: str = "adam"
    optimizer_config: dict = field(default_factory=dict)
    mask_prompt: bool = False
    max_seq_length: int = 2048
    grad_checkpoint: bool = False
    grad_accumulation_steps: int = 1
    seed: int = 0
    steps_per_report: int = 10
    steps_per_eval: int = 200
    val_batches: int = 25
    save_every: int = 100
    resume_adapter_file: str | None = None
    hf_dataset: dict | None = None
    train: bool = True
    test: bool = False
    test_batches: int = 500
    report_to: str | None = None
    project_name: str | None = None
    config: str | None = None
    clear_cache_threshold: int = 0
    trust_remote_code: bool = False
    # -- mondrian's own keys --
    advisor: str | None = None  # recorded with the run
    db: str | None = None  # runs database [the data's workspace mondrian.db, else ./mondrian.db]
    early_stopping_patience: int = 0  # stop after this many evaluations without improvement
    keep_checkpoints: int = 2
    answer_only_logits: bool = True  # project to the vocabulary only where the loss is taken
    bucket_batches: int = 8  # length-bucketing window, in batches (1 = no bucketing)

    def check(self) -> None:
        if self.fine_tune_type != "lora":
            raise ConfigError(f"fine_tune_type '{self.fine_tune_type}': only 'lora' is supported")
        if self.hf_dataset:
            raise ConfigError("hf_dataset: datasets come from local folders (mondrian dataset)")
        if self.resume_adapter_file:
            raise ConfigError("resume_adapter_file: use `mondrian train --resume`, which restores "
                              "the optimizer state and data position too")
        if self.optimizer not in ("adam", "adamw", "sgd"):
            raise ConfigError(f"optimizer '{self.optimizer}' must be adam, adamw or sgd")
        if self.num_layers != -1 and (not isinstance(self.num_layers, int) or self.num_layers < 1):
            raise ConfigError(f"num_layers must be a positive integer or -1 for all layers "
                              f"(got {self.num_layers!r})")
        for key in ("batch_size", "iters", "steps_per_report", "steps_per_eval",
                    "save_every", "max_seq_length", "grad_accumulation_steps", "bucket_batches",
                    "keep_checkpoints"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ConfigError(f"{key} must be a positive integer (got {getattr(self, key)!r})")
        unknown = sorted(set(self.lora_parameters) - {"rank", "scale", "dropout", "keys"})
        if unknown:
            raise ConfigError(f"lora_parameters: unknown key(s) {', '.join(unknown)} "
                              "(known: dropout, keys, rank, scale; mlx-lm wants scale, not alpha)")


def load_config(path: str | Path, overrides: dict | None = None) -> TrainConfig:
    data = load_yaml(path) | (overrides or {})
    cfg = from_dict(TrainConfig, data, str(path))
    cfg.check()
    return cfg


# --------------------------------------------------------------------------------------------
# data


@dataclass
class Split:
    name: str
    tokens: list[list[int]]
    offsets: list[int]  # loss starts at this token (0 without mask_prompt)

    def __len__(self) -> int:
        return len(self.tokens)


def load_split(folder: Path, name: str, tokenizer, mask_prompt: bool) -> Split:
    from mlx_lm.tuner.datasets import ChatDataset, CompletionsDataset, TextDataset

    path = folder / f"{name}.jsonl"
    if not path.is_file():
        raise TrainError(f"{path}: missing (build it with `mondrian dataset`)")
    rows = [row for _, row in read_jsonl(path, TrainError)]
    if not rows:
        return Split(name, [], [])
    # mlx-lm's own dataset classes, so tokenization and prompt masking are exactly theirs.
    if "messages" in rows[0]:
        ds = ChatDataset(rows, tokenizer, mask_prompt=mask_prompt)
    elif "prompt" in rows[0]:
        ds = CompletionsDataset(rows, tokenizer, "prompt", "completion", mask_prompt)
    elif "text" in rows[0]:
        ds = TextDataset(rows, tokenizer)
    else:
        raise TrainError(f"{path}: rows need 'messages', 'prompt'/'completion' or 'text'")
    tokens, offsets = [], []
    for row in rows:
        out = ds.process(row)
        toks, off = out if isinstance(out, tuple) else (out, 0)
        tokens.append(list(toks))
        offsets.append(int(off))
    return Split(name, tokens, offsets)


def batch_plan(lengths: list[int], batch_size: int, seed: int, epoch: int, bucket: int) -> list[list[int]]:
    """The batches of one epoch, a pure function of its arguments (so resume can replay it).

    Rows are shuffled, then sorted by length inside windows of `bucket` batches (less
    padding), cut into batches, and the batch order shuffled. A short last batch is
    filled from the start of the epoch so every row trains once per epoch.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths)).tolist()
    if len(order) % batch_size:
        order += order[: batch_size - len(order) % batch_size]
    window = batch_size * bucket
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def make_batch(split: Split, idx: list[int], max_seq_length: int) -> tuple[mx.array, mx.array]:
    """Padded token ids (B, L+1) and per-row (loss start, length) as mlx-lm's loss expects."""
    seqs = [split.tokens[i][:max_seq_length] for i in idx]
    longest = max(len(s) for s in seqs)
    width = min(8 * math.ceil(longest / 8), max_seq_length) if longest > 1 else 2
    arr = np.zeros((len(seqs), max(width, longest)), np.int32)
    for j, s in enumerate(seqs):
        arr[j, :len(s)] = s
    lengths = [[split.offsets[i], len(s)] for i, s in zip(idx, seqs, strict=True)]
    return mx.array(arr), mx.array(lengths)


# --------------------------------------------------------------------------------------------
# loss


def _output_head(model):
    """The vocabulary projection of mlx-lm llama-family models, or None if unknown."""
    inner = getattr(model, "model", None)
    args = getattr(model, "args", None)
    if inner is None or args is None or not hasattr(inner, "embed_tokens"):
        return None
    if getattr(args, "tie_word_embeddings", False):
        return inner.embed_tokens.as_linear
    return getattr(model, "lm_head", None)


def make_loss(model, answer_only: bool):
    """Masked mean cross-entropy over (offset, length], as mlx-lm's default_loss.

    With answer_only, hidden states are gathered at the positions that carry loss before
    the vocabulary projection: with a masked prompt most positions carry none, and the
    projection (49,152 x 576 on SmolLM2) is a fifth of the forward pass.
    """
    head = _output_head(model) if answer_only else None

    def full(model, batch, lengths, positions=None, valid=None):
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits = model(inputs)
        steps = mx.arange(1, targets.shape[1] + 1)
        mask = mx.logical_and(steps >= lengths[:, 0:1], steps <= lengths[:, 1:])
        ce = nn.losses.cross_entropy(logits, targets) * mask
        ntoks = mask.sum()
        return ce.astype(mx.float32).sum() / ntoks, ntoks

    def gathered(model, batch, lengths, positions, valid):
        # positions: (K,) flat indices into (B*T); valid: (K,) 1 where real.
        inputs, targets = batch[:, :-1], batch[:, 1:]
        hidden = model.model(inputs)
        flat = hidden.reshape(-1, hidden.shape[-1])[positions]
        logits = head(flat)
        tgt = targets.reshape(-1)[positions]
        ce = nn.losses.cross_entropy(logits, tgt) * valid
        ntoks = valid.sum()
        return ce.astype(mx.float32).sum() / ntoks, ntoks

    return gathered if head is not None else full


def loss_positions(lengths: np.ndarray, width: int) -> tuple[mx.array, mx.array]:
    """Flat (row * (width-1) + t) indices of target positions inside (offset, length], padded
    to a multiple of 32 so compiled shapes repeat."""
    t = width - 1
    idx = []
    for row, (off, n) in enumerate(lengths.tolist()):
        start = max(off, 1) - 1  # target index j predicts token j+1; loss on steps >= off
        idx.extend(row * t + j for j in range(start, n - 1))
    k = len(idx)
    padded = 32 * math.ceil(max(k, 1) / 32)
    valid = np.zeros(padded, np.float32)
    valid[:k] = 1
    idx += [0] * (padded - k)
    return mx.array(np.array(idx, np.int32)), mx.array(valid)


# --------------------------------------------------------------------------------------------
# checkpoints


def _adapter_config(cfg: TrainConfig, base_path: str) -> dict:
    """mlx-lm's adapter_config.json: what `mlx_lm.load(..., adapter_path=)` needs, plus the run."""
    out = asdict(cfg) | {"model": base_path, "fine_tune_type": "lora"}
    return {k: v for k, v in out.items() if k not in ("db",)}


def save_adapter(folder: Path, model, cfg: TrainConfig, base_path: str) -> None:
    weights = dict(tree_flatten(model.trainable_parameters()))
    mx.save_safetensors(str(folder / "adapters.safetensors"), weights)
    (folder / "adapter_config.json").write_text(json.dumps(_adapter_config(cfg, base_path), indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# the run


def preflight(cfg: TrainConfig, model, tokenizer, train: Split, valid: Split) -> None:
    """Everything that would fail (or silently go wrong) later, refused before step one."""
    vocab_rows = None
    if hasattr(model, "model") and hasattr(model.model, "embed_tokens"):
        vocab_rows = model.model.embed_tokens.weight.shape[0]
    if vocab_rows is not None:
        if len(tokenizer.vocab) > vocab_rows:
            raise TrainError(f"tokenizer has {len(tokenizer.vocab)} tokens but the model embeds only "
                             f"{vocab_rows}: tokenizer and model do not match")
        top = max((max(t) for t in train.tokens + valid.tokens if t), default=0)
        if top >= vocab_rows:
            raise TrainError(f"the data holds token id {top}, beyond the model's {vocab_rows} embeddings: "
                             "tokenizer and model do not match")
    for split in (train, valid):
        if len(split) < cfg.batch_size:
            raise TrainError(f"the {split.name} split has {len(split)} rows, fewer than batch_size "
                             f"{cfg.batch_size}: lower batch_size or add data")
        long = [i + 1 for i, t in enumerate(split.tokens) if len(t) > cfg.max_seq_length]
        if long:
            raise TrainError(f"{len(long)} {split.name} rows are longer than max_seq_length "
                             f"{cfg.max_seq_length} and would be truncated (lines {long[:10]}); raise "
                             "max_seq_length or shorten them")
        empty = [i + 1 for i, (t, o) in enumerate(zip(split.tokens, split.offsets, strict=True))
                 if len(t) - max(o, 1) < 1]
        if empty:
            raise TrainError(f"{split.name} rows {empty[:10]} have no tokens to learn from "
                             "(the prompt mask covers the whole row)")


def make_optimizer(cfg: TrainConfig):
    lr = cfg.learning_rate
    if cfg.lr_schedule:
        from mlx_lm.tuner.utils import build_schedule

        lr = build_schedule(cfg.lr_schedule)
    kwargs = dict(cfg.optimizer_config.get(cfg.optimizer, {})) if cfg.optimizer_config else {}
    cls = {"adam": optim.Adam, "adamw": optim.AdamW, "sgd": optim.SGD}[cfg.optimizer]
    return cls(learning_rate=lr, **kwargs)


def val_batches(split: Split, batch_size: int, n: int) -> list[list[int]]:
    """The validation batches: length-sorted (little padding), and when only `n` of them are
    wanted, `n` spread evenly over the length range. Taking the first `n` would measure only
    the shortest rows, which are the easiest: a loss that looks better than the model is."""
    order = sorted(range(len(split)), key=lambda i: (len(split.tokens[i]), i))
    batches = [order[b * batch_size:(b + 1) * batch_size] for b in range(len(order) // batch_size)]
    if 0 < n < len(batches):
        batches = [batches[round(k * (len(batches) - 1) / (n - 1))] for k in range(n)] if n > 1 \
            else [batches[len(batches) // 2]]
    return batches


def evaluate(model, loss_fn, split: Split, cfg: TrainConfig) -> float:
    """Validation loss (token-weighted) over `val_batches(...)`, in a fixed order."""
    model.eval()
    total, count = mx.array(0.0), mx.array(0.0)
    for idx in val_batches(split, cfg.batch_size, cfg.val_batches):
        batch, lengths = make_batch(split, idx, cfg.max_seq_length)
        loss, toks = loss_fn(model, batch, lengths, *loss_positions(np.array(lengths), batch.shape[1]))
        total += loss * toks
        count += toks
        mx.eval(total, count)
    model.train()
    return (total / count).item()


def _is_vision_data(data: Path) -> bool:
    """Rows with "images" are mlx-vlm rows: the vision trainer takes them."""
    path = data / "train.jsonl"
    if not path.is_file():
        return False
    with open(path, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), "")
    try:
        return "images" in json.loads(first)
    except json.JSONDecodeError:
        return False


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True,
          stop_after: int | None = None) -> TrainResult:
    """Train a LoRA adapter as configured (vision data goes to `mondrian.train.vision`). `stop_after` ends the process's work after that
    many steps, as a kill would (used to test resume); the run stays resumable."""
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from mondrian.models.sources import ModelError, resolve

    data = Path(cfg.data)
    if not data.is_dir():
        raise TrainError(f"data folder {data} does not exist (a path is never looked up on the hub)")
    if _is_vision_data(data):
        from mondrian.train.vision import train_vision

        return train_vision(cfg, resume=resume, progress=progress, stop_after=stop_after)
    out = Path(cfg.adapter_path)
    checkpoint = loop.check_output(out, resume)
    try:
        card = resolve(cfg.model)
    except ModelError as exc:
        raise TrainError(str(exc)) from exc

    mx.random.seed(cfg.seed)
    model, tokenizer = load(card.path)
    train_split = load_split(data, "train", tokenizer, cfg.mask_prompt)
    valid_split = load_split(data, "valid", tokenizer, cfg.mask_prompt)
    preflight(cfg, model, tokenizer, train_split, valid_split)

    model.freeze()
    layers = getattr(model, "layers", None) or model.model.layers
    num_layers = len(layers) if cfg.num_layers == -1 else cfg.num_layers
    if num_layers > len(layers):
        raise TrainError(f"num_layers {cfg.num_layers} > the model's {len(layers)} layers")
    linear_to_lora_layers(model, num_layers, cfg.lora_parameters)
    if cfg.grad_checkpoint:
        from mlx_lm.tuner.trainer import grad_checkpoint

        grad_checkpoint(layers[0])
    optimizer = make_optimizer(cfg)
    loss_fn = make_loss(model, cfg.answer_only_logits)

    session = loop.begin(cfg, data, out, card.fingerprint, checkpoint)
    if checkpoint is not None:
        model.load_weights(str(checkpoint / "adapters.safetensors"), strict=False)
        loop.restore_optimizer(optimizer, checkpoint)
    mx.eval(model.parameters())
    loss_value_and_grad = nn.value_and_grad(model, loss_fn)
    accum = cfg.grad_accumulation_steps
    compiled_state = [model.state, optimizer.state, mx.random.state]

    def step_fn(batch, lengths, positions, valid, prev_grad, do_update):
        (lvalue, toks), grad = loss_value_and_grad(model, batch, lengths, positions, valid)
        if prev_grad is not None:
            grad = tree_map(lambda a, b: a + b, grad, prev_grad)
        if do_update:
            if accum > 1:
                grad = tree_map(lambda g: g / accum, grad)
            optimizer.update(model, grad)
            grad = None
        return lvalue, toks, grad

    if os.environ.get("MONDRIAN_COMPILE", "1") == "1":
        step_fn = partial(mx.compile, inputs=compiled_state, outputs=compiled_state)(step_fn)

    lengths_all = [len(t) for t in train_split.tokens]
    per_epoch = math.ceil(len(train_split) / cfg.batch_size)
    plans: dict[int, list[list[int]]] = {}
    grads = [None]  # gradient carried across accumulation steps

    def one_step(step: int) -> tuple[float, int, int]:
        nonlocal plans
        epoch, pos = divmod(step - 1, per_epoch)
        if epoch not in plans:
            plans = {epoch: batch_plan(lengths_all, cfg.batch_size, cfg.seed, epoch, cfg.bucket_batches)}
        batch, lengths = make_batch(train_split, plans[epoch][pos], cfg.max_seq_length)
        positions, valid = loss_positions(np.array(lengths), batch.shape[1])
        mx.random.seed(cfg.seed * 1_000_003 + step)  # dropout noise depends on the step only
        lvalue, toks, grads[0] = step_fn(batch, lengths, positions, valid, grads[0], step % accum == 0)
        mx.eval(lvalue, toks, model.trainable_parameters(), optimizer.state)
        n_tokens = int(np.sum(np.minimum(np.array(lengths)[:, 1], cfg.max_seq_length)))
        return lvalue.item(), int(toks.item()), n_tokens

    hooks = Hooks(step=one_step, evaluate=lambda: evaluate(model, loss_fn, valid_split, cfg),
                  save_adapter=lambda folder, info: save_adapter(folder, model, cfg, card.path))
    model.train()
    return loop.run(cfg, session, out, hooks, optimizer, progress=progress, stop_after=stop_after)
