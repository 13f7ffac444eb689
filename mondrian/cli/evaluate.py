"""`mondrian eval`: base vs adapter on the same dataset rows."""

from __future__ import annotations

from pathlib import Path

import click

from mondrian.cli.common import (
    ADVISORS_DIR_OPTION,
    ROOT_OPTION,
    advisor_near,
    base_model,
    echo_json,
    fail,
    registry_call,
)
from mondrian.core.adapters import CONFIG, AdapterError, read_config
from mondrian.core.config import ConfigError
from mondrian.evaluate.run import EvalError, evaluate
from mondrian.models.decode import GenerationError
from mondrian.registry.store import Registry


def _resolve_adapter(adapter: str | None, model_spec: str | None, advisor: str | None,
                     root: str | None) -> tuple[Path | None, str | None, str | None]:
    """--adapter as (folder, model spec, advisor): ADVISOR:REF is looked up (and verified)
    in the registry, anything else is a folder."""
    if adapter and ":" in adapter and not Path(adapter).exists():
        name, ref = adapter.split(":", 1)
        reg = Registry(root)
        version = registry_call(reg.show, name, ref)
        spec = model_spec or version.card.base_model
        path = registry_call(reg.resolve, name, ref, base_model(spec).fingerprint)  # verified
        return path, spec, advisor or name
    return (Path(adapter) if adapter else None), model_spec, advisor


def _adapter_config(path: Path | None) -> dict:
    """The folder's adapter_config.json, {} without one (then --advisor and --data must say)."""
    if path is None or not (path / CONFIG).is_file():
        return {}
    try:
        return read_config(path)
    except AdapterError as exc:
        fail(exc)


@click.command("eval")
@click.option("--adapter", "adapter",
              help="An adapter folder, or ADVISOR:REF of the registry (e.g. fit-query:v1, "
                   "fit-query:production). Without it only the base answers.")
@click.option("--model", "model_spec",
              help="Base model spec [the adapter's model, or its card's].")
@click.option("--data", "data_dir", type=click.Path(file_okay=False),
              help="Dataset folder [the adapter's data].")
@click.option("--advisor", help="Advisor [the adapter's].")
@click.option("--split", default="test", show_default=True)
@click.option("--questions", type=click.Path(dir_okay=False, exists=True),
              help="Answer this JSONL of {input, expected} (e.g. the hand-written set) instead of "
                   "a split; prompts carry the adapter's retrieved examples, as served.")
@click.option("--limit", type=click.IntRange(1), help="Only the first N rows.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1))
@click.option("--max-tokens", default=256, show_default=True, type=click.IntRange(1))
@click.option("--constrained/--unconstrained", default=True, show_default=True,
              help="Also run the arms decoded under the contract's JSON-Schema grammar (lists "
                   "unique, capped at the longest in the training split); --unconstrained runs "
                   "only free decoding.")
@click.option("--arms", default="", metavar="ARM,...",
              help="Run only these arms (base, adapter, base_constrained, adapter_constrained) [all].")
@click.option("--db", "db_path", type=click.Path(dir_okay=False),
              help="Runs database [the data's workspace].")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Report folder [<db folder>/evals/RUN].")
@ADVISORS_DIR_OPTION
@ROOT_OPTION
@click.option("--no-progress", is_flag=True)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def eval_cmd(adapter: str | None, model_spec: str | None, data_dir: str | None,
             advisor: str | None, split: str, questions: str | None, limit: int | None, batch_size: int,
             max_tokens: int, constrained: bool, arms: str, db_path: str | None, out_dir: str | None,
             advisors_dirs: tuple[str, ...], root: str | None, no_progress: bool, as_json: bool) -> None:
    """Base vs adapter on the same rows: compliance, exact match, fields, paired statistics."""
    path, model_spec, advisor = _resolve_adapter(adapter, model_spec, advisor, root)
    cfg = _adapter_config(path)
    advisor = advisor or cfg.get("advisor")
    data_dir = data_dir or cfg.get("data")
    if not advisor or not data_dir:
        raise click.UsageError("name --advisor and --data (the adapter's config does not say)")
    contract = advisor_near(advisor, advisors_dirs, Path(data_dir))
    try:
        report = evaluate(model_spec, path, data_dir, contract, split=split,
                          limit=limit, batch_size=batch_size, max_tokens=max_tokens, db=db_path,
                          out_dir=out_dir, constrained=constrained, questions=questions,
                          arms=tuple(a.strip() for a in arms.split(",") if a.strip()),
                          progress=not (no_progress or as_json))
    except (EvalError, GenerationError, ConfigError) as exc:
        fail(exc)
    summary = report.summary()
    if as_json:
        echo_json(summary | {"run_id": report.run_id})
        return
    click.echo(f"eval run {report.run_id}: {summary['rows']} rows; "
               f"report {report.out_dir}/report.md")
    for arm, m in summary.items():
        if isinstance(m, dict) and "parse_rate" in m:  # arms; the "_vs_" entries are comparisons
            click.echo(f"  {arm:20} parse {m['parse_rate']:.1%}  "
                       f"compliance {m['compliance']:.1%}  "
                       f"exact {m['exact_match']:.1%}  fields {m['field_accuracy']:.1%}"
                       + (f"  critical {m['critical_passed']}/{m['critical_total']}" if "critical_passed" in m else ""))
