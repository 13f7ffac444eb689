"""From job records to datasets: `mondrian demo-data`, `mondrian link`, `mondrian dataset`."""

from __future__ import annotations

from pathlib import Path

import click

from mondrian.cli.common import WORKSPACE_OPTION, echo_json, fail, open_workspace
from mondrian.core.config import ConfigError
from mondrian.core.contracts import get_advisor
from mondrian.core.db import DBError
from mondrian.dataset.build import build_dataset
from mondrian.demo.workspace import write_demo_workspace
from mondrian.link.linker import REASONS, link_workspace
from mondrian.models.sources import ModelError, resolve


@click.command("demo-data")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--n-fit", default=2000, show_default=True, type=click.IntRange(0),
              help="fit-query jobs.")
@click.option("--n-photo", default=300, show_default=True, type=click.IntRange(0),
              help="photo-critic jobs.")
@click.option("--image-size", default=128, show_default=True, type=click.IntRange(32, 1024))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--force", is_flag=True, help="Replace FOLDER if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def demo_data(folder: str, n_fit: int, n_photo: int, image_size: int, seed: int, force: bool,
              as_json: bool) -> None:
    """Write a realistic demo workspace: job DB, images, hash-named analyses, defects."""
    try:
        info = write_demo_workspace(folder, n_fit=n_fit, n_photo=n_photo, seed=seed,
                                    image_size=image_size, progress=not as_json, overwrite=force)
    except (FileExistsError, ValueError) as exc:
        fail(exc)
    if as_json:
        echo_json(info)
        return
    click.echo(f"wrote {info['folder']}: {info['jobs']} jobs "
               + ", ".join(f"{k} {v}" for k, v in info["by_advisor"].items()))


@click.command()
@WORKSPACE_OPTION
@click.option("--advisor", "advisors", multiple=True,
              help="Only this advisor's jobs (repeatable).")
@click.option("--out", type=click.Path(file_okay=False),
              help="Manifest folder [WORKSPACE/manifest].")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def link(workspace: str, advisors: tuple[str, ...], out: str | None, as_json: bool) -> None:
    """Link jobs into training pairs; every job is linked or rejected with a reason."""
    ws = open_workspace(workspace)
    try:
        summary = link_workspace(ws, out, list(advisors) or None, progress=not as_json)
    except (DBError, ValueError) as exc:
        fail(exc)
    if as_json:
        echo_json(summary.to_dict())
        return
    for name, per in sorted(summary.by_advisor.items()):
        click.echo(f"  {name:20} {per['total']:7} jobs {per['linked']:7} linked "
                   f"{per['rejected']:6} rejected")
    for reason, n in summary.by_reason.items():
        click.echo(f"  rejected {reason:22} {n:6}  {REASONS[reason]}")
    click.echo(f"manifest: {summary.manifest}")
    click.echo(summary.line())


@click.command()
@WORKSPACE_OPTION
@click.option("--advisor", required=True, help="The advisor to build a dataset for.")
@click.option("--manifest", type=click.Path(file_okay=False),
              help="Manifest folder [WORKSPACE/manifest].")
@click.option("--out", type=click.Path(file_okay=False),
              help="Dataset folder [WORKSPACE/datasets/ADVISOR].")
@click.option("--ratios", default="0.8,0.1,0.1", show_default=True,
              help="train,valid,test fractions.")
@click.option("--model", "model_spec", default="smollm2-135m", show_default=True,
              help="Base model whose tokenizer measures token lengths ('none' to skip).")
@click.option("--max-seq-length", default=2048, show_default=True, type=click.IntRange(1))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def dataset(workspace: str, advisor: str, manifest: str | None, out: str | None, ratios: str,
            model_spec: str, max_seq_length: int, as_json: bool) -> None:
    """Build leakage-free train/valid/test files from a link manifest."""
    ws = open_workspace(workspace)
    try:
        contract = get_advisor(advisor, [ws.advisors_path])
        split = tuple(float(x) for x in ratios.split(","))
        tokenizer = None if model_spec.lower() == "none" else resolve(model_spec).path
        report = build_dataset(Path(manifest) if manifest else Path(ws.root) / "manifest", contract,
                               Path(out) if out else Path(ws.root) / "datasets" / advisor,
                               data_root=ws.data_path, ratios=split, tokenizer_path=tokenizer,
                               max_seq_length=max_seq_length)
    except (ConfigError, ModelError, ValueError, FileNotFoundError) as exc:
        fail(exc)
    data = report.to_dict()
    if as_json:
        echo_json(data)
        return
    _print_dataset_report(data, max_seq_length)


def _print_dataset_report(data: dict, max_seq_length: int) -> None:
    counts = data["counts"]
    click.echo("  ".join(f"{k} {counts[k]}" for k in ("train", "valid", "test"))
               + f"  ({sum(counts[k] for k in ('train', 'valid', 'test'))} rows)")
    leak = data["leakage"]
    click.echo(f"leakage check: {'ok' if leak['ok'] else 'FAILED'} "
               f"({len(leak['leaked'])} groups in more than one split)")
    tokens = data["tokens"]
    train = tokens.get("train", {}).get("total") if isinstance(tokens, dict) else None
    if train:
        over = sum(data["truncated"][k]["count"] for k in ("train", "valid", "test"))
        click.echo(f"tokens (train): p50 {train['p50']}, p95 {train['p95']}, max {train['max']}; "
                   f"{over} rows over max_seq_length {max_seq_length}")
    for warning in data["warnings"]:
        click.echo(f"warning: {warning}")
    click.echo(f"stats: {Path(data['out_dir']) / 'dataset_stats.md'}")
