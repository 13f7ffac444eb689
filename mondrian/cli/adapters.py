"""`mondrian adapters ...`: the adapter registry (immutable versions, aliases, verification)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from mondrian.cli.common import (
    ROOT_OPTION,
    RUNS_DB_OPTION,
    base_model,
    echo_json,
    fail,
    open_run_store,
    registry_call,
)
from mondrian.core.config import ConfigError
from mondrian.core.contracts import read_prompt
from mondrian.core.retrieval import INDEX_FILE
from mondrian.registry.fuse import export_fused
from mondrian.registry.records import Version
from mondrian.registry.store import Registry


@click.group()
def adapters() -> None:
    """The adapter registry: immutable versions, aliases, verification."""


def _version_line(v: Version) -> str:
    card = v.card
    metrics = card.metrics if card else {}
    adapter = next((metrics[a] for a in ("adapter", "adapter_constrained")
                    if isinstance(metrics.get(a), dict)), None)
    if adapter:  # a `mondrian eval` metrics.json: the adapter arm's headline numbers
        head = ", ".join(f"{k.replace('_', ' ')} {adapter[k]:.1%}"
                         for k in ("compliance", "exact_match")
                         if isinstance(adapter.get(k), (int, float)))
    else:
        head = ", ".join(f"{k} {metrics[k]}" for k in list(metrics)[:3]
                         if not isinstance(metrics[k], dict))
    aliases = f" [{', '.join(v.aliases)}]" if v.aliases else ""
    base = f"{card.base_model} {card.base_model_fingerprint[:12]}" if card else f"ERROR {v.error}"
    created = card.created_at if card else ""
    return f"{v.advisor:14} {v.version:5}{aliases:14} {created:21} {base}  {head}"


def _eval_files(eval_dir: str) -> tuple[str, dict[str, Path]]:
    """A `mondrian eval` folder: its metrics.json, and its report.md to keep in the version."""
    metrics_file = str(Path(eval_dir) / "metrics.json")
    extra = {"eval_report.md": Path(eval_dir) / "report.md"}
    for p in (Path(metrics_file), extra["eval_report.md"]):
        if not p.is_file():
            fail(FileNotFoundError(f"{eval_dir}: no {p.name} (a `mondrian eval` output folder?)"))
    return metrics_file, extra


@adapters.command("publish")
@click.argument("source", required=False, type=click.Path(exists=True, file_okay=False))
@click.option("--run", "run_id", help="Publish this training run's adapter (looked up in --db).")
@RUNS_DB_OPTION
@click.option("--advisor", help="Advisor [the run's].")
@click.option("--model", "model_spec",
              help="Base model spec, when publishing a folder without --run.")
@click.option("--metrics", "metrics_file", type=click.Path(exists=True, dir_okay=False),
              help="JSON file of evaluation metrics for the card.")
@click.option("--eval", "eval_dir", type=click.Path(exists=True, file_okay=False),
              help="A `mondrian eval` output folder: its metrics.json goes on the card and its "
                   "report.md (base vs adapter) into the version as eval_report.md.")
@click.option("--parent", help="Parent version [what production points at].")
@click.option("--alias", "alias", help="Point this alias (e.g. candidate) at the new version.")
@ROOT_OPTION
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def adapters_publish(source: str | None, run_id: str | None, db_path: str, advisor: str | None,
                     model_spec: str | None, metrics_file: str | None, eval_dir: str | None,
                     parent: str | None, alias: str | None, root: str | None,
                     as_json: bool) -> None:
    """Publish a training run (--run) or an adapter folder (SOURCE --advisor --model)."""
    reg = Registry(root)
    extra = None
    if eval_dir:
        if metrics_file:
            raise click.UsageError("give --eval or --metrics, not both")
        metrics_file, extra = _eval_files(eval_dir)
    metrics = json.loads(Path(metrics_file).read_text()) if metrics_file else None
    if run_id:
        store = open_run_store(db_path)
        run = store.get(run_id)
        store.close()
        if run is None:
            fail(KeyError(f"no run '{run_id}' in {db_path}"))
        version = registry_call(reg.publish_run, run, advisor, metrics=metrics, parent=parent,
                                extra_files=extra)
    else:
        if not (source and advisor and model_spec):
            raise click.UsageError("give --run RUN_ID, or SOURCE with --advisor and --model")
        card = base_model(model_spec)
        version = registry_call(reg.publish, source, advisor, base_model=model_spec,
                                base_model_fingerprint=card.fingerprint, metrics=metrics,
                                parent=parent, extra_files=extra)
    if alias:
        registry_call(reg.set_alias, version.advisor, alias, version.version)
        version = reg.show(version.advisor, version.version)
    if as_json:
        echo_json(version.to_dict())
    else:
        click.echo(f"published {version.advisor} {version.version}: {version.path}")


@adapters.command("import")
@click.argument("source", type=click.Path(exists=True, file_okay=False))
@click.option("--advisor", required=True)
@click.option("--model", "model_spec", required=True, help="The base model it was trained on.")
@ROOT_OPTION
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def adapters_import(source: str, advisor: str, model_spec: str, root: str | None,
                    as_json: bool) -> None:
    """Import an adapter trained by plain `python -m mlx_lm lora`."""
    card = base_model(model_spec)
    version = registry_call(Registry(root).import_adapter, source, advisor,
                            base_model=model_spec, base_model_fingerprint=card.fingerprint)
    if as_json:
        echo_json(version.to_dict())
    else:
        click.echo(f"imported {version.advisor} {version.version}: {version.path}")


@adapters.command("list")
@click.argument("advisor", required=False)
@ROOT_OPTION
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def adapters_list(advisor: str | None, root: str | None, as_json: bool) -> None:
    """Published versions, oldest first."""
    versions = registry_call(Registry(root).list, advisor)
    if as_json:
        echo_json([v.to_dict() for v in versions])
        return
    if not versions:
        click.echo("no versions published yet")
    for v in versions:
        click.echo(_version_line(v))


@adapters.command("show")
@click.argument("advisor")
@click.argument("ref", default="production")
@ROOT_OPTION
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def adapters_show(advisor: str, ref: str, root: str | None, as_json: bool) -> None:
    """One version (or alias): its card, and the prompt it is asked with (null: not pinned,
    i.e. the advisor's current one)."""
    v = registry_call(Registry(root).show, advisor, ref)
    try:
        data = {**v.to_dict(), "prompt": read_prompt(v.path)}
    except ConfigError as exc:
        fail(exc)
    if as_json:
        echo_json(data)
        return
    click.echo(json.dumps(data, indent=2, default=str))


@adapters.command("verify")
@click.argument("advisor")
@click.argument("ref", required=False)
@ROOT_OPTION
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def adapters_verify(advisor: str, ref: str | None, root: str | None, as_json: bool) -> None:
    """Check every file's sha256 (one version, or all of the advisor's); exit 1 on any failure."""
    reg = Registry(root)
    refs = [ref] if ref else [v.version for v in registry_call(reg.list, advisor)]
    reports = {r: registry_call(reg.verify, advisor, r) for r in refs}
    if as_json:
        echo_json({r: rep.to_dict() for r, rep in reports.items()})
    else:
        for r, rep in reports.items():
            click.echo(f"{advisor} {r}: {'ok' if rep.ok else 'FAILED'}"
                       + ("" if rep.ok else f" ({rep.describe()})"))
    if not all(rep.ok for rep in reports.values()):
        sys.exit(1)


@adapters.command("reindex")
@click.argument("advisor")
@click.argument("ref")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Dataset folder whose retrieval_index.json to use (rebuilt by `mondrian dataset` "
                   "after new jobs were linked).")
@click.option("--alias", "alias", help="Point this alias (e.g. production) at the new version.")
@ROOT_OPTION
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def adapters_reindex(advisor: str, ref: str, data_dir: str, alias: str | None, root: str | None,
                     as_json: bool) -> None:
    """Publish REF's weights with the dataset's newer retrieval index: newly linked jobs are
    answered from at serve time, without retraining."""
    reg = Registry(root)
    version = registry_call(reg.reindex, advisor, ref, Path(data_dir) / INDEX_FILE)
    if alias:
        registry_call(reg.set_alias, advisor, alias, version.version)
    if as_json:
        echo_json(version.to_dict())
        return
    card = version.card
    click.echo(f"{advisor} {version.version}: {card.parent}'s weights with index "
               f"{card.retrieval_index[:12]}" + (f"; {alias} -> {version.version}" if alias else ""))


@adapters.command("alias")
@click.argument("advisor")
@click.argument("alias", required=False)
@click.argument("version", required=False)
@ROOT_OPTION
def adapters_alias(advisor: str, alias: str | None, version: str | None,
                   root: str | None) -> None:
    """Show the aliases (ADVISOR), or point ALIAS at VERSION."""
    reg = Registry(root)
    if alias and version:
        registry_call(reg.set_alias, advisor, alias, version)
        click.echo(f"{advisor} {alias} -> {version}")
        return
    if alias:
        raise click.UsageError("give both ALIAS and VERSION to set an alias")
    for name, target in registry_call(reg.aliases, advisor).items():
        click.echo(f"{name:12} -> {target}")


@adapters.command("rollback")
@click.argument("advisor")
@click.option("--alias", default="production", show_default=True)
@ROOT_OPTION
def adapters_rollback(advisor: str, alias: str, root: str | None) -> None:
    """Move ALIAS back to the version it pointed at before."""
    target = registry_call(Registry(root).rollback, advisor, alias)
    click.echo(f"{advisor} {alias} -> {target}")


@adapters.command("export")
@click.argument("advisor")
@click.argument("ref")
@click.option("--fuse", is_flag=True, required=True,
              help="Fuse the adapter into the base (mlx-lm fuse).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Output model folder.")
@click.option("--model", "model_spec", help="Base model spec [the card's].")
@click.option("--dequantize", is_flag=True)
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@ROOT_OPTION
def adapters_export(advisor: str, ref: str, fuse: bool, out: str, model_spec: str | None,
                    dequantize: bool, force: bool, root: str | None) -> None:
    """Export a verified version fused into its base model, as an mlx-lm model folder."""
    reg = Registry(root)
    v = registry_call(reg.show, advisor, ref)
    card = base_model(model_spec or v.card.base_model)
    path = registry_call(export_fused, reg, advisor, ref, card.path, out,
                         base_model_fingerprint=card.fingerprint, dequantize=dequantize,
                         overwrite=force)
    click.echo(f"fused {advisor} {v.version} into {path}")
