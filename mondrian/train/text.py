"""LoRA training for text advisors, in-process on mlx-lm's model and LoRA layers.

What mlx-lm's `train()` lacks, and this loop adds:
- exact resume: a checkpoint holds the adapter, the optimizer state and the step; the
  batch order is a pure function of (seed, epoch), so the data position is the step.
  A run killed with -9 and resumed ends with the same adapter as an uninterrupted one;
- the best adapter by validation loss is kept, with optional early stopping;
- errors before the first step: splits smaller than the batch, rows that would be
  truncated, a tokenizer that does not fit the model, LoRA layers that do not exist;
- every run recorded in SQLite (`runs`, `run_metrics`) with a loss-curve SVG;
- speed: logits only where the loss is taken (answer tokens with mask_prompt), and padding
  to a multiple of 8 instead of 32. Length bucketing is there (`bucket_batches`) but off by
  default: it cost quality (README, Training).

`mondrian.train.run.train` is the entry point; it sends image data to mondrian/train/vision.py.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map

from mondrian.core.adapters import AdapterError, lora_targets, transformer_blocks, write_adapter
from mondrian.core.jsonl import read_jsonl
from mondrian.models import cpu_kernels, upstream
from mondrian.train import loop
from mondrian.train.config import TrainConfig, make_optimizer
from mondrian.train.distributed import World, fault_injection
from mondrian.train.loop import Hooks, TrainError, TrainResult

# --------------------------------------------------------------------------------------------
# data


@dataclass
class Split:
    name: str
    tokens: list[list[int]]
    offsets: list[int]  # the last answer (the loss) starts at this token (0 without mask_prompt)
    # answer_turns all: each row's earlier answers, as [start, end) token spans that carry loss too
    earlier: list[list[tuple[int, int]]] | None = None
    shapes: list[str] | None = None  # each row's answer shape (answer_shape), for the data mix

    def __len__(self) -> int:
        return len(self.tokens)


def load_split(folder: Path, name: str, tokenizer, mask_prompt: bool, all_turns: bool = False) -> Split:
    from mlx_lm.tuner.datasets import ChatDataset, CompletionsDataset, TextDataset  # noqa: PLC0415 - heavy: mlx_lm import costs ~1 s; CLI --help stays fast

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
    shapes = [answer_shape(row) for row in rows]
    if not (all_turns and mask_prompt and "messages" in rows[0]):
        return Split(name, tokens, offsets, shapes=shapes)
    earlier = [answer_spans(tokenizer, row["messages"], toks, f"{path}:{i + 1}")
               for i, (row, toks) in enumerate(zip(rows, tokens, strict=True))]
    return Split(name, tokens, offsets, earlier, shapes)


def answer_shape(row: dict) -> str:
    """The fields a row's answer holds ("capacity_min_kw,query_type,technology"), or "" when
    the answer is not a JSON object."""
    answer = row["messages"][-1].get("content") if row.get("messages") else row.get("completion")
    try:
        value = json.loads(answer) if isinstance(answer, str) else None
    except ValueError:
        value = None
    return ",".join(sorted(value)) if isinstance(value, dict) else ""


def _shape_counts(shapes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Each row's shape number and each shape's row count (shapes in sorted order)."""
    _, index, counts = np.unique(np.array(shapes, dtype=object), return_inverse=True, return_counts=True)
    return index, counts


def mix_weights(shapes: list[str], alpha: float) -> np.ndarray | None:
    """Per-row draw probabilities giving each shape a share proportional to count**alpha
    (None: alpha 1, the data's own mix)."""
    if alpha == 1:
        return None
    index, counts = _shape_counts(shapes)
    per_row = counts[index].astype(np.float64) ** (alpha - 1.0)
    return per_row / per_row.sum()


def answer_spans(tokenizer, messages: list[dict], tokens: list[int], where: str) -> list[tuple[int, int]]:
    """[start, end) token spans of every assistant turn but the last, measured the way mlx-lm's
    ChatDataset measures the last one (the chat up to a turn with the generation prompt, then
    with the turn). Refused when a template does not render earlier turns as prefixes."""
    spans = []
    for i, message in enumerate(messages[:-1]):
        if message.get("role") != "assistant":
            continue
        start = len(tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, return_dict=False))
        upto = list(tokenizer.apply_chat_template(messages[:i + 1], return_dict=False))
        if tokens[:len(upto)] != upto or not start < len(upto):
            raise TrainError(f"{where}: the chat template does not render turn {i + 1} as a prefix of the "
                             "row, so its answer cannot be located (use answer_turns: last)")
        spans.append((start, len(upto)))
    return spans


def stratified_order(shapes: list[str], alpha: float, rng: np.random.Generator) -> list[int]:
    """An epoch of len(shapes) draws: each shape's quota is its count**alpha share (largest
    remainders), its draws spread evenly through the epoch (draw j of m at (j + U) / m), its
    rows taken without replacement (a fresh permutation per pass), so any run of steps holds
    each shape's share to within about one row."""
    index, counts = _shape_counts(shapes)
    share = counts.astype(np.float64) ** alpha
    exact = len(shapes) * share / share.sum()
    quota = np.floor(exact).astype(int)
    quota[np.argsort(-(exact - quota), kind="stable")[: len(shapes) - quota.sum()]] += 1
    keys, rows = [], []
    for g in range(len(counts)):
        if quota[g] == 0:  # cannot happen for alpha <= 1 (each quota >= count**alpha >= 1)
            continue
        members = np.flatnonzero(index == g)
        passes = -(-quota[g] // len(members))
        rows.append(np.concatenate([rng.permutation(members) for _ in range(passes)])[: quota[g]])
        keys.append((np.arange(quota[g]) + rng.random(quota[g])) / quota[g])
    rows_all, keys_all = np.concatenate(rows), np.concatenate(keys)
    return rows_all[np.argsort(keys_all, kind="stable")].tolist()


def batch_plan(lengths: list[int], batch_size: int, seed: int, epoch: int, bucket: int,
               weights: np.ndarray | None = None, strata: tuple[list[str], float] | None = None
               ) -> list[list[int]]:
    """The batches of one epoch, a pure function of its arguments (so resume can replay it).

    Rows are shuffled, then sorted by length inside windows of `bucket` batches (less
    padding; bucket 1 keeps every batch a random draw), cut into batches, and the batch order
    shuffled. A short last batch is filled from the start of the epoch so every row trains
    once per epoch. With `weights` (the data mix), an epoch is as many rows drawn with
    replacement by those probabilities; with `strata` (shapes, alpha: the stratified mix) it is
    `stratified_order`, and the batches keep that order (shuffling them would undo the spread;
    length windows only reorder rows inside a window).
    """
    rng = np.random.default_rng([seed, epoch])
    if strata is not None:
        order = stratified_order(strata[0], strata[1], rng)
    elif weights is not None:
        order = rng.choice(len(lengths), size=len(lengths), p=weights).tolist()
    else:
        order = rng.permutation(len(lengths)).tolist()
    if len(order) % batch_size:
        order += order[: batch_size - len(order) % batch_size]
    window = batch_size * bucket
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return batches if strata is not None else [batches[i] for i in rng.permutation(len(batches))]


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


def make_loss(model, answer_only: bool):
    """Masked mean cross-entropy over (offset, length], as mlx-lm's default_loss.

    With answer_only, hidden states are gathered at the positions that carry loss before
    the vocabulary projection: with a masked prompt most positions carry none, and the
    projection (49,152 x 576 on SmolLM2) is a fifth of the forward pass. The body / head
    split is the decoder's (`upstream.split_head`): models not known to be built that way
    take the full loss.
    """
    split = upstream.split_head(model) if answer_only else None
    head = split[1] if split else None

    def full(model, batch, lengths, positions=None, valid=None):
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits = model(inputs)
        if positions is not None:  # the loss positions (several answers per row with answer_turns all)
            logits = logits.reshape(-1, logits.shape[-1])[positions]
            ce = cpu_kernels.cross_entropy(logits, targets.reshape(-1)[positions]) * valid
            return ce.astype(mx.float32).sum() / valid.sum(), valid.sum()
        steps = mx.arange(1, targets.shape[1] + 1)
        mask = mx.logical_and(steps >= lengths[:, 0:1], steps <= lengths[:, 1:])
        ce = cpu_kernels.cross_entropy(logits, targets) * mask
        ntoks = mask.sum()
        return ce.astype(mx.float32).sum() / ntoks, ntoks

    def gathered(model, batch, lengths, positions, valid):
        # positions: (K,) flat indices into (B*T); valid: (K,) 1 where real.
        inputs, targets = batch[:, :-1], batch[:, 1:]
        hidden = model.model(inputs)
        flat = hidden.reshape(-1, hidden.shape[-1])[positions]
        logits = head(flat)
        tgt = targets.reshape(-1)[positions]
        ce = cpu_kernels.cross_entropy(logits, tgt) * valid
        ntoks = valid.sum()
        return ce.astype(mx.float32).sum() / ntoks, ntoks

    return gathered if head is not None else full


def loss_positions(lengths: np.ndarray, width: int, earlier: list[list[tuple[int, int]]] | None = None
                   ) -> tuple[mx.array, mx.array]:
    """Flat (row * (width-1) + t) indices of target positions inside (offset, length], and
    inside each row's `earlier` answer spans, padded to a multiple of 32 so compiled shapes
    repeat."""
    t = width - 1
    idx = []
    for row, (off, n) in enumerate(lengths.tolist()):
        for s, e in (earlier[row] if earlier else ()):  # target j predicts token j+1
            idx.extend(row * t + j for j in range(s - 1, min(e, n) - 1))
        start = max(off, 1) - 1  # loss on steps >= off
        idx.extend(row * t + j for j in range(start, n - 1))
    k = len(idx)
    padded = 32 * math.ceil(max(k, 1) / 32)
    valid = np.zeros(padded, np.float32)
    valid[:k] = 1
    idx += [0] * (padded - k)
    return mx.array(np.array(idx, np.int32)), mx.array(valid)


# --------------------------------------------------------------------------------------------
# checkpoints


def save_adapter(folder: Path, model: nn.Module, cfg: TrainConfig, base_path: str) -> None:
    """The trainable (LoRA) tensors and mlx-lm's adapter_config.json, plus the run's settings."""
    write_adapter(folder, dict(tree_flatten(model.trainable_parameters())), cfg.adapter_config(base_path))


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


def evaluate(model, loss_fn, split: Split, cfg: TrainConfig, w: World) -> float:
    """Validation loss (token-weighted) over `val_batches(...)`, in a fixed order; each rank
    scores its shard of every batch and the sums are the world's."""
    model.eval()
    total, count = mx.array(0.0), mx.array(0.0)
    for idx in val_batches(split, cfg.batch_size, cfg.val_batches):
        batch, lengths = make_batch(split, w.shard(idx), cfg.max_seq_length)
        loss, toks = loss_fn(model, batch, lengths, *loss_positions(np.array(lengths), batch.shape[1]))
        total += loss * toks
        count += toks
        mx.eval(total, count)
    total, count = w.sum(total), w.sum(count)
    w.check(lambda: mx.eval(total, count))
    model.train()
    return (total / count).item()


def prepare_model(model: nn.Module, cfg: TrainConfig) -> None:
    """Freeze the base and put mlx-lm's LoRA layers on the layers `lora_targets` names
    (refused before step one when num_layers or a key does not fit the model)."""
    from mlx_lm.tuner.utils import linear_to_lora_layers  # noqa: PLC0415 - heavy: mlx_lm import costs ~1 s; CLI --help stays fast

    model.freeze()
    try:
        lora_targets(model, cfg.num_layers, cfg.lora_parameters.get("keys"))
        blocks = transformer_blocks(model)[1]
    except AdapterError as exc:
        raise TrainError(str(exc)) from None
    linear_to_lora_layers(model, cfg.num_layers, cfg.lora_parameters)
    if cfg.grad_checkpoint:
        from mlx_lm.tuner.trainer import grad_checkpoint  # noqa: PLC0415 - heavy: mlx_lm import costs ~1 s; CLI --help stays fast

        grad_checkpoint(blocks[0])


def make_step(model: nn.Module, optimizer, loss_fn: Callable, split: Split,
              cfg: TrainConfig, w: World) -> Callable[[int], tuple[float, int, int]]:
    """Training step n -> (mean loss, loss tokens, tokens), a pure function of (seed, n) for
    the data and the dropout noise, so a resumed run repeats an uninterrupted one. Under
    `mlx.launch` each rank takes its shard of the global batch and every number returned is
    the world's (mondrian.train.distributed)."""
    loss_value_and_grad = nn.value_and_grad(model, loss_fn)
    accum = cfg.grad_accumulation_steps
    compiled_state = [model.state, optimizer.state, mx.random.state]

    def step_fn(batch, lengths, positions, valid, prev_grad, do_update, n_accumulated):
        (lvalue, toks), grad = loss_value_and_grad(model, batch, lengths, positions, valid)
        lvalue, toks, grad = w.token_mean(lvalue, toks, grad)
        if prev_grad is not None:
            grad = tree_map(lambda a, b: a + b, grad, prev_grad)
        if do_update:
            if n_accumulated > 1:
                grad = tree_map(lambda g: g / n_accumulated, grad)
            optimizer.update(model, grad)
            grad = None
        return lvalue, toks, grad

    if os.environ.get("MONDRIAN_COMPILE", "1") == "1":
        step_fn = partial(mx.compile, inputs=compiled_state, outputs=compiled_state)(step_fn)

    lengths_all = [len(t) for t in split.tokens]
    strata = (split.shapes, cfg.mix_alpha) if split.shapes and cfg.mix_draw == "stratified" else None
    weights = mix_weights(split.shapes, cfg.mix_alpha) if split.shapes and strata is None else None
    per_epoch = math.ceil(len(split) / cfg.batch_size)
    plans: dict[int, list[list[int]]] = {}
    grads = [None]  # gradient carried across accumulation steps

    def one_step(step: int) -> tuple[float, int, int]:
        nonlocal plans
        epoch, pos = divmod(step - 1, per_epoch)
        if epoch not in plans:
            plans = {epoch: batch_plan(lengths_all, cfg.batch_size, cfg.seed, epoch, cfg.bucket_batches,
                                        weights, strata)}
        fault_injection(w, step)
        idx = w.shard(plans[epoch][pos])
        batch, lengths = make_batch(split, idx, cfg.max_seq_length)
        earlier = [split.earlier[i] for i in idx] if split.earlier else None
        positions, valid = loss_positions(np.array(lengths), batch.shape[1], earlier)
        mx.random.seed(cfg.seed * 1_000_003 + step)  # dropout noise depends on the step only
        # the last step also updates: an incomplete accumulation still counts (as mlx-vlm's does)
        update = step % accum == 0 or step == cfg.iters
        n_accumulated = (step - 1) % accum + 1
        lvalue, toks, grads[0] = step_fn(batch, lengths, positions, valid, grads[0], update, n_accumulated)
        n_tokens = w.sum(mx.array(int(np.sum(np.minimum(np.array(lengths)[:, 1], cfg.max_seq_length)))))
        w.check(lambda: mx.eval(lvalue, toks, n_tokens, model.trainable_parameters(), optimizer.state))
        return lvalue.item(), int(toks.item()), int(n_tokens.item())

    return one_step


def train_text(cfg: TrainConfig, resume: bool = False, progress: bool = True,
               stop_after: int | None = None) -> TrainResult:
    """Train a LoRA adapter for a text advisor as configured. `stop_after` ends the process's
    work after that many steps, as a kill would (used to test resume); the run stays resumable."""
    data = Path(cfg.data)
    if not data.is_dir():
        raise TrainError(f"data folder {data} does not exist (a path is never looked up on the hub)")
    out = Path(cfg.adapter_path)
    checkpoint = loop.check_output(out, resume)
    card = loop.base_model(cfg.model)

    w = loop.join_world(cfg.batch_size)
    mx.random.seed(cfg.seed)
    model, tokenizer = upstream.load_lm(card.path)
    train_split = load_split(data, "train", tokenizer, cfg.mask_prompt, cfg.answer_turns == "all")
    valid_split = load_split(data, "valid", tokenizer, cfg.mask_prompt)  # scored on the last answer
    preflight(cfg, model, tokenizer, train_split, valid_split)
    prepare_model(model, cfg)
    optimizer = make_optimizer(cfg)
    loss_fn = make_loss(model, cfg.answer_only_logits)

    session = loop.begin(cfg, data, out, card.fingerprint, checkpoint, w=w)
    loop.start_weights(model, cfg, checkpoint)
    if checkpoint is not None:
        loop.restore_optimizer(optimizer, checkpoint)
    mx.eval(model.parameters())
    hooks = Hooks(step=make_step(model, optimizer, loss_fn, train_split, cfg, w),
                  evaluate=lambda: evaluate(model, loss_fn, valid_split, cfg, w),
                  save_adapter=lambda folder, info: save_adapter(folder, model, cfg, card.path))
    model.train()
    return loop.run(cfg, session, out, hooks, optimizer, progress=progress, stop_after=stop_after)
