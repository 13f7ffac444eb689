"""The training loop both trainers share (text: mondrian/train/text.py, vision: mondrian/train/vision.py).

A trainer brings its model-specific parts as `Hooks` (one optimizer step, the
validation loss, how to write an adapter folder); this module owns everything
around them, once: the base model lookup, the run record and resume bookkeeping
(adapter and optimizer restored from a checkpoint), the progress bar and metric
reports, evaluation on schedule with the best adapter kept, early stopping,
checkpoints (adapter + optimizer state + trainer state), SIGINT/SIGTERM
handling, the final adapter files and the loss curve. The dataset's retrieval index (if it has
one) is read when the run starts and written beside the final adapter, so the adapter folder
carries the examples its prompts were built from (mondrian.core.retrieval).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten
from tqdm import tqdm

from mondrian.core.adapters import AdapterError, load_trainable, read_config
from mondrian.core.atomic import atomic_folder
from mondrian.core.contracts import PROMPT_FILE
from mondrian.core.fingerprint import file_sha256, folder_fingerprint
from mondrian.core.retrieval import INDEX_FILE
from mondrian.core.workspace import holding
from mondrian.models.sources import ModelCard, ModelError, resolve
from mondrian.train.distributed import ALONE, PeerLost, World, check_batch, world
from mondrian.train.plots import loss_curve_svg
from mondrian.train.runs import RunStore


class TrainError(ValueError):
    """Training cannot start (or go on); the message says why and what to change."""


@dataclass
class TrainResult:
    run_id: str
    status: str
    adapter_path: str
    steps: int
    best_val_loss: float | None
    best_step: int | None
    final_train_loss: float | None
    first_val_loss: float | None
    tokens: int
    loss_tokens: int
    seconds: float
    tokens_per_s: float
    stopped_early: bool = False
    world_size: int = 1  # ranks under mlx.launch (tokens and tokens_per_s are the world's)
    rank: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Hooks:
    step: Callable[[int], tuple[float, int, int]]  # train step n -> (mean loss, loss tokens, tokens)
    evaluate: Callable[[], float]  # validation loss
    save_adapter: Callable[[Path, dict], None]  # write the adapter files into a folder (+ run info)


@dataclass
class Session:
    """One run in the runs database, new or resumed from `checkpoint`."""

    store: RunStore | ReadOnlyRank
    run_id: str
    start: int
    state: dict
    meta: dict
    checkpoint: Path | None
    world: World = ALONE


class ReadOnlyRank:
    """The run store of a rank other than 0: rank 0 alone writes the run's records."""

    def __getattr__(self, name: str):
        if name in ("start", "resume", "log", "truncate_metrics", "finish", "close"):
            return lambda *a, **k: None
        if name == "metrics":
            return lambda *a, **k: []
        raise AttributeError(name)


def runs_db(cfg, data: Path) -> Path:
    """`db` from the config, else the mondrian.db of the workspace that holds the data."""
    if cfg.db:
        return Path(cfg.db)
    folder = holding(data)
    return folder / "mondrian.db" if folder is not None else Path("mondrian.db")


def dataset_fingerprint(data: Path) -> str:
    stats = data / "dataset_stats.json"
    if stats.is_file():
        fp = json.loads(stats.read_text()).get("fingerprint")
        if fp:
            return fp
    return folder_fingerprint({n: file_sha256(data / n) for n in ("train.jsonl", "valid.jsonl")
                               if (data / n).is_file()})


def latest_checkpoint(root: Path) -> Path | None:
    done = [p for p in sorted(root.glob("step-*")) if (p / "trainer_state.json").is_file()]
    return done[-1] if done else None


def check_output(out: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from (None for a new run); refuses to mix runs in one folder."""
    last = latest_checkpoint(out / "checkpoints")
    if resume and last is None:
        raise TrainError(f"--resume: no checkpoint under {out / 'checkpoints'}")
    if not resume and last is not None:
        raise TrainError(f"{out} already holds a run's checkpoints: use --resume to continue it, "
                         "or pick another adapter_path")
    return last


def join_world(batch_size: int) -> World:
    """This process's world (mlx.launch's ranks, or one), refused before any work when the
    global batch does not split over it."""
    w = world()
    problem = check_batch(batch_size, w)
    if problem:
        raise TrainError(problem)
    return w


def begin(cfg, data: Path, out: Path, base_fingerprint: str, checkpoint: Path | None,
          config_extra: dict | None = None, w: World = ALONE) -> Session:
    """Start the run record, or reopen it from `checkpoint` after checking that the data and
    the base model are the ones the run started with. Under `mlx.launch` only rank 0 keeps
    the record; a checkpoint written by another world size resumes exactly (the global batch
    and its order do not depend on the world size), and the new size is recorded."""
    store = RunStore(runs_db(cfg, data)) if w.writer else ReadOnlyRank()
    dataset_fp = dataset_fingerprint(data)
    state = {"best_val_loss": None, "best_step": None, "evals_without_improvement": 0,
             "first_val_loss": None, "tokens": 0, "loss_tokens": 0, "train_seconds": 0.0}
    meta = {"dataset_fingerprint": dataset_fp, "base_model_fingerprint": base_fingerprint, "world_size": w.size}
    if checkpoint is None:
        extra = (config_extra or {}) | ({"world_size": w.size} if w.size > 1 else {})
        run_id = store.start("train", cfg.advisor, asdict(cfg) | extra, dataset_fp,
                             cfg.model, base_fingerprint, str(out.resolve())) or f"rank-{w.rank}"
        return Session(store, run_id, 0, state, meta | {"run_id": run_id}, None, w)
    saved = json.loads((checkpoint / "trainer_state.json").read_text())
    problem = None
    if saved.get("dataset_fingerprint") != dataset_fp:
        problem = f"the data in {data} changed since the checkpoint was written"
    elif saved.get("base_model_fingerprint") != base_fingerprint:
        problem = f"the base model {cfg.model} is not the one the run started with"
    elif saved["step"] >= cfg.iters:
        problem = f"run {saved['run_id']} already reached iters {cfg.iters}; raise iters to train further"
    if problem:
        store.close()
        raise TrainError(f"--resume: {problem}")
    store.resume(saved["run_id"])
    store.truncate_metrics(saved["run_id"], saved["step"])
    return Session(store, saved["run_id"], saved["step"], {k: saved.get(k, v) for k, v in state.items()},
                   meta | {"run_id": saved["run_id"]}, checkpoint, w)


def base_model(spec: str) -> ModelCard:
    """The base model a config names, resolved (imported or built once); TrainError if not."""
    try:
        return resolve(spec)
    except ModelError as exc:
        raise TrainError(str(exc)) from exc


def restore_adapter(model, checkpoint: Path) -> None:
    """A checkpoint's adapter tensors into the model's LoRA layers, names and shapes checked."""
    try:
        load_trainable(model, checkpoint)
    except AdapterError as exc:
        raise TrainError(str(exc)) from None


def start_weights(model, cfg, checkpoint: Path | None) -> None:
    """A new run with `init_adapter` starts from that adapter's LoRA weights (names and shapes
    checked against the config's layout); a resumed run takes its checkpoint's instead."""
    if checkpoint is not None:
        restore_adapter(model, checkpoint)
    elif cfg.init_adapter:
        folder = Path(cfg.init_adapter)
        if not (folder / "adapters.safetensors").is_file():
            raise TrainError(f"init_adapter {folder}: no adapters.safetensors there")
        try:
            theirs = read_config(folder)
        except (AdapterError, OSError) as exc:
            raise TrainError(f"init_adapter {folder}: {exc}") from None
        mine = {"num_layers": cfg.num_layers, **{k: cfg.lora_parameters.get(k) for k in ("rank", "scale", "keys")}}
        got = {"num_layers": theirs.get("num_layers"),
               **{k: (theirs.get("lora_parameters") or {}).get(k) for k in ("rank", "scale", "keys")}}
        differ = [f"{k} {got[k]!r} (config: {mine[k]!r})" for k in mine if got[k] != mine[k]]
        if differ:
            raise TrainError(f"init_adapter {folder}: its LoRA layout is not this config's: {', '.join(differ)}")
        restore_adapter(model, folder)


def restore_optimizer(optimizer, checkpoint: Path) -> None:
    optimizer.state = tree_unflatten(list(mx.load(str(checkpoint / "optimizer.safetensors")).items()))


def save_checkpoint(root: Path, step: int, hooks: Hooks, optimizer, state: dict, keep: int) -> Path:
    """checkpoints/step-NNNNNNN: adapter + optimizer state + trainer state, written atomically;
    older ones beyond `keep` are removed."""
    target = root / f"step-{step:07d}"
    with atomic_folder(target) as tmp:
        hooks.save_adapter(tmp, {"step": step})
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
        (tmp / "trainer_state.json").write_text(json.dumps(state | {"step": step}, indent=2) + "\n")
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


class Interrupt:
    """SIGTERM/SIGINT -> finish the current step, checkpoint, stop as 'interrupted'."""

    def __init__(self):
        self.hit = False
        self.old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.hit:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.hit = True

    def __exit__(self, *exc):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)


def _lr(optimizer) -> float:
    lr = optimizer.learning_rate
    return float(lr.item() if isinstance(lr, mx.array) else lr)


def _window() -> dict:
    """Counters for the steps since the last report."""
    return {"loss": 0.0, "weight": 0, "tokens": 0, "steps": 0, "t": time.perf_counter()}


def _evaluate(session: Session, out: Path, hooks: Hooks, bar: tqdm, step: int) -> None:
    """Validation loss logged; a new best is written to out/best (with best.json)."""
    state, run_id = session.state, session.run_id
    val = hooks.evaluate()
    if state["first_val_loss"] is None:
        state["first_val_loss"] = val
    session.store.log(run_id, step, {"val_loss": val})
    if state["best_val_loss"] is None or val < state["best_val_loss"]:
        state.update(best_val_loss=val, best_step=step, evals_without_improvement=0)
        if not session.world.writer:
            return
        with atomic_folder(out / "best") as tmp:
            hooks.save_adapter(tmp, {"step": step, "val_loss": val})
            (tmp / "best.json").write_text(json.dumps({"step": step, "val_loss": val,
                                                       "run_id": run_id}) + "\n")
    elif step > 0:
        state["evals_without_improvement"] += 1
    bar.set_postfix_str(f"val {val:.3f} (best {state['best_val_loss']:.3f} @ {state['best_step']})")


def _report(session: Session, window: dict, step: int, optimizer, bar: tqdm) -> float:
    """Log the window's training metrics; returns its (token-weighted) training loss."""
    dt = time.perf_counter() - window["t"]
    session.state["train_seconds"] += dt
    train_loss = window["loss"] / max(window["weight"], 1)
    metrics = {"train_loss": train_loss, "tokens_per_s": window["tokens"] / dt,
               "loss_tokens_per_s": window["weight"] / dt,
               "steps_per_s": window["steps"] / dt, "learning_rate": _lr(optimizer),
               "peak_memory_gb": mx.get_peak_memory() / 1e9}
    session.store.log(session.run_id, step, metrics)
    bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}",
                    mem=f"{metrics['peak_memory_gb']:.2f}GB")
    return train_loss


def _publish(out: Path, hooks: Hooks, step: int, carried: dict[str, bytes]) -> None:
    """The final files: out/last holds the last step; the adapter files in `out` itself are
    the best by validation loss (the last step's where there is no best); `carried` are the
    dataset's files the adapter keeps, as the run found them (name -> bytes)."""
    with atomic_folder(out / "last") as tmp:
        hooks.save_adapter(tmp, {"step": step})
        for name, data in carried.items():
            (tmp / name).write_bytes(data)
    best = out / "best"
    for name in [n.name for n in (out / "last").iterdir() if n.is_file()]:
        src = best / name if (best / name).exists() else out / "last" / name
        tmp_file = out / f".{name}.tmp"
        tmp_file.write_bytes(src.read_bytes())
        os.replace(tmp_file, out / name)


def _carried(data: Path) -> dict[str, bytes]:
    """What the rows' prompts were built with (the retrieval index, the pinned prompt), read at
    the start: the adapter keeps them, so it is asked as it was taught. Resume checks the
    dataset fingerprint, which covers both."""
    return {name: (data / name).read_bytes() for name in (INDEX_FILE, PROMPT_FILE) if (data / name).is_file()}


def _account(state: dict, window: dict, loss: float, weight: int, tokens: int) -> None:
    """One step's loss and token counts into the run totals and the report window."""
    state["tokens"] += tokens
    state["loss_tokens"] += weight
    window["loss"] += loss * weight  # token-weighted, as both peers report it
    window["weight"] += weight
    window["tokens"] += tokens
    window["steps"] += 1


def run(cfg, session: Session, out: Path, hooks: Hooks, optimizer, progress: bool = True,
        stop_after: int | None = None) -> TrainResult:
    """Steps start+1 .. iters with reports, evaluations, checkpoints; then the final files.
    `stop_after` ends this process's work after that many steps, as a kill would (tests)."""
    t_start = time.perf_counter()
    store, run_id, state, start = session.store, session.run_id, session.state, session.start
    carried = _carried(Path(cfg.data))
    writer = session.world.writer  # under mlx.launch, rank 0 alone writes files
    bar = tqdm(total=cfg.iters, initial=start, desc=f"train {cfg.advisor or ''}".strip(), unit="step",
               disable=not progress or not writer, dynamic_ncols=True)
    window = _window()
    last_train_loss, status, error, stopped_early, step = None, "completed", None, False, start
    want_save = False

    def result(status: str) -> TrainResult:
        secs = state["train_seconds"]
        return TrainResult(run_id=run_id, status=status, adapter_path=str(out), steps=step,
                           best_val_loss=state["best_val_loss"], best_step=state["best_step"],
                           final_train_loss=last_train_loss, first_val_loss=state["first_val_loss"],
                           tokens=state["tokens"], loss_tokens=state["loss_tokens"],
                           seconds=round(time.perf_counter() - t_start, 2),
                           tokens_per_s=round(state["tokens"] / secs, 1) if secs else 0.0,
                           stopped_early=stopped_early, world_size=session.world.size,
                           rank=session.world.rank)

    try:
        with Interrupt() as interrupt:
            if start == 0:
                _evaluate(session, out, hooks, bar, 0)
            for step in range(start + 1, cfg.iters + 1):
                _account(state, window, *hooks.step(step))
                bar.update(1)
                if step % cfg.steps_per_report == 0 or step == cfg.iters:
                    last_train_loss = _report(session, window, step, optimizer, bar)
                    window = _window()
                # Checkpoints only at update boundaries (mid-accumulation the partial gradient is
                # in memory only): a save asked for in between waits for the next boundary.
                boundary = step % cfg.grad_accumulation_steps == 0 or step == cfg.iters
                # a SIGINT/SIGTERM validates the step it stops at, so the adapter kept as the
                # best is never one only step 0 was measured against
                if step % cfg.steps_per_eval == 0 or step == cfg.iters or (interrupt.hit and boundary):
                    _evaluate(session, out, hooks, bar, step)
                    window["t"] = time.perf_counter()  # evaluation time is not training throughput
                    if (cfg.early_stopping_patience
                            and state["evals_without_improvement"] >= cfg.early_stopping_patience):
                        stopped_early = True
                want_save = want_save or step % cfg.save_every == 0 or stopped_early or interrupt.hit
                if want_save and boundary and writer:
                    save_checkpoint(out / "checkpoints", step, hooks, optimizer, state | session.meta,
                                    cfg.keep_checkpoints)
                    want_save = False
                if stop_after is not None and step - start >= stop_after:  # then as a kill would
                    bar.close()
                    store.close()
                    return result("interrupted")
                if not boundary:
                    continue
                if stopped_early:
                    break
                if interrupt.hit:
                    status = "interrupted"
                    break
        if writer:
            _publish(out, hooks, step, carried)
    except KeyboardInterrupt:
        status, error = "interrupted", "KeyboardInterrupt"
    except PeerLost as exc:  # another rank died: resumable from the last checkpoint
        status, error = "interrupted", str(exc)
    except Exception as exc:
        store.finish(run_id, "failed", {"steps": step}, f"{type(exc).__name__}: {exc}")
        store.close()
        raise
    finally:
        bar.close()
    res = result(status)
    _close_run(session, res, error, out, cfg.advisor)
    return res


def _close_run(session: Session, res: TrainResult, error: str | None, out: Path, advisor: str | None) -> None:
    """The run's record finished and its loss curve drawn (rank 0's work)."""
    store, run_id = session.store, session.run_id
    store.finish(run_id, res.status, res.to_dict(), error)
    if session.world.writer:
        series = {name: [(s, v) for s, n, v in store.metrics(run_id) if n == name]
                  for name in ("train_loss", "val_loss")}
        (out / "loss_curve.svg").write_text(loss_curve_svg(series, f"{advisor or 'train'} {run_id}"))
    store.close()
