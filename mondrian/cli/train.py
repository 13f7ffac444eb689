"""`mondrian train` and `mondrian runs ...` (the runs it and `mondrian eval` record)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from mondrian.cli.common import RUNS_DB_OPTION, echo_json, fail, open_run_store
from mondrian.core.config import ConfigError
from mondrian.train.config import load_config
from mondrian.train.loop import TrainError, TrainResult
from mondrian.train.plots import loss_curve_svg
from mondrian.train.run import train


@click.command("train")
@click.option("--config", "config_path", required=True,
              type=click.Path(exists=True, dir_okay=False),
              help="Training YAML (mlx-lm LoRA keys, plus mondrian's).")
@click.option("--resume", is_flag=True,
              help="Continue the run in adapter_path from its last checkpoint.")
@click.option("--iters", type=click.IntRange(1),
              help="Override iters; a cosine lr_schedule is replanned to the new count (warmup in "
                   "proportion) so the run still ends at its last rate.")
@click.option("--adapter-path", help="Override adapter_path.")
@click.option("--init-adapter", type=click.Path(file_okay=False, exists=True),
              help="Start a new run from this adapter folder's LoRA weights (e.g. a registry "
                   "version: retrain production on new data); its layout must be the config's.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def train_cmd(config_path: str, resume: bool, iters: int | None, adapter_path: str | None, init_adapter: str | None,
              no_progress: bool, as_json: bool) -> None:
    """Train a LoRA adapter (text advisors via mlx-lm, vision advisors via mlx-vlm)."""
    overrides = {k: v for k, v in (("iters", iters), ("adapter_path", adapter_path), ("init_adapter", init_adapter))
                 if v is not None}
    try:
        cfg = load_config(config_path, overrides)
        result = train(cfg, resume=resume, progress=not (no_progress or as_json))
    except (ConfigError, TrainError) as exc:
        fail(exc)
    if result.rank != 0:  # under mlx.launch rank 0 reports for the world
        sys.exit(0 if result.status == "completed" else 3)
    if as_json:
        echo_json(result.to_dict())
        return
    _print_result(result)
    if result.status != "completed":
        sys.exit(3)


def _print_result(result: TrainResult) -> None:
    best = (f"{result.best_val_loss:.4f} at step {result.best_step}"
            if result.best_val_loss is not None else "-")
    first = f"{result.first_val_loss:.4f}" if result.first_val_loss is not None else "-"
    early = " (stopped early)" if result.stopped_early else ""
    ranks = f", {result.world_size} ranks" if result.world_size > 1 else ""
    click.echo(f"run {result.run_id}: {result.status} after {result.steps} steps "
               f"({result.seconds:.0f} s, {result.tokens_per_s:.0f} tokens/s{ranks})")
    click.echo(f"validation loss {first} -> best {best}{early}")
    click.echo(f"adapter: {result.adapter_path} (the best by validation loss; last step in last/)")


@click.group()
def runs() -> None:
    """Training and evaluation runs recorded in SQLite."""


@runs.command("list")
@RUNS_DB_OPTION
@click.option("--kind", help="train or eval.")
@click.option("--advisor")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def runs_list(db_path: str, kind: str | None, advisor: str | None, as_json: bool) -> None:
    """List runs, newest first."""
    store = open_run_store(db_path)
    rows = store.list(kind=kind, advisor=advisor)
    store.close()
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo("no runs yet")
    for r in rows:
        summ = r["summary"] or {}
        best = summ.get("best_val_loss")
        click.echo(f"{r['run_id']:34} {r['kind']:5} {r['advisor'] or '-':13} {r['status']:11} "
                   f"{r['started_at']}  steps {summ.get('steps', '-'):>5}  "
                   f"best val {best if best is None else round(best, 4)}")


@runs.command("show")
@click.argument("run_id")
@RUNS_DB_OPTION
@click.option("--svg", type=click.Path(dir_okay=False), help="Write the loss curve here.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def runs_show(run_id: str, db_path: str, svg: str | None, as_json: bool) -> None:
    """One run: config, fingerprints, status, metrics."""
    store = open_run_store(db_path)
    run = store.get(run_id)
    if run is None:
        store.close()
        fail(KeyError(f"no run '{run_id}' in {db_path}"))
    metrics = store.metrics(run_id)
    store.close()
    series: dict[str, list] = {}
    for step, name, value in metrics:
        series.setdefault(name, []).append((step, value))
    if svg:
        losses = {k: v for k, v in series.items() if k.endswith("_loss")}
        Path(svg).write_text(loss_curve_svg(losses, run_id))
    if as_json:
        echo_json(run | {"metrics": series})
        return
    for key in ("run_id", "kind", "advisor", "status", "started_at", "ended_at", "base_model",
                "base_model_fingerprint", "dataset_fingerprint", "adapter_path", "error"):
        if run.get(key) is not None:
            click.echo(f"{key:24} {run[key]}")
    for key, value in (run["summary"] or {}).items():
        click.echo(f"{'summary.' + key:24} {value}")
    for name in ("train_loss", "val_loss"):
        pts = series.get(name, [])
        if pts:
            click.echo(f"{name:24} " + "  ".join(f"{s}:{v:.3f}" for s, v in pts[-12:]))
