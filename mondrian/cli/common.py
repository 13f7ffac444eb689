"""What several command groups share: JSON output, errors, the registry/runs/model options."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from mondrian.core.config import ConfigError
from mondrian.core.contracts import Advisor, load_advisors
from mondrian.core.workspace import Workspace, holding, load_workspace
from mondrian.models.sources import ModelCard, ModelError, resolve
from mondrian.registry.records import RegistryError
from mondrian.train.runs import RunStore

T = TypeVar("T")

ROOT_OPTION = click.option("--root", type=click.Path(file_okay=False),
                           help="Registry root [$MONDRIAN_ADAPTERS or ./adapters].")

RUNS_DB_OPTION = click.option("--db", "db_path", default="workspace/mondrian.db",
                              show_default=True, type=click.Path(dir_okay=False),
                              help="The database holding the runs.")


ADVISORS_DIR_OPTION = click.option(
    "--advisors-dir", "advisors_dirs", multiple=True, type=click.Path(file_okay=False, exists=True),
    help="A folder of extra advisor contracts (YAML), such as a workspace's advisors/; repeatable "
         "(a later file of the same name wins).")


def advisors_in(dirs: Sequence[str | Path]) -> dict[str, Advisor]:
    """The shipped advisors and those in `dirs`; a broken YAML is a clean error naming it."""
    try:
        return load_advisors(list(dirs))
    except ConfigError as exc:
        fail(exc)


def advisor_near(name: str, dirs: Sequence[str], data_dir: Path) -> Advisor:
    """The named contract: shipped, in `dirs`, or (with none given) in the advisors folder of
    the workspace holding `data_dir`, where `mondrian dataset` found it."""
    if not dirs:
        ws = holding(data_dir)
        dirs = [str(load_workspace(ws).advisors_path)] if ws is not None else []
    found = advisors_in([d for d in dirs if Path(d).is_dir()])
    if name not in found:
        fail(ConfigError(f"unknown advisor {name!r} (known: {', '.join(sorted(found))}; "
                         "give --advisors-dir for a workspace's own)"))
    return found[name]


WORKSPACE_OPTION = click.option(
    "-w", "--workspace", "workspace", default=".", show_default=True,
    type=click.Path(file_okay=False),
    help="Workspace folder (holds mondrian.yaml, the job DB, the data root).")


def open_workspace(folder: str) -> Workspace:
    """The workspace in `folder`; a bad mondrian.yaml is a clean exit 1."""
    try:
        return load_workspace(folder)
    except ConfigError as exc:
        fail(exc)


def echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, ensure_ascii=False))


def fail(exc: Exception) -> NoReturn:
    """A known error: its message on stderr and exit 1, no traceback."""
    raise click.ClickException(str(exc)) from exc


def base_model(spec: str) -> ModelCard:
    try:
        return resolve(spec)
    except ModelError as exc:
        fail(exc)


def registry_call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    try:
        return fn(*args, **kwargs)
    except (RegistryError, FileNotFoundError) as exc:
        fail(exc)


def open_run_store(db_path: str) -> RunStore:
    # RunStore would create an empty database; a mistyped --db should say so instead.
    if not Path(db_path).is_file():
        fail(FileNotFoundError(f"{db_path}: no such database (pass --db)"))
    return RunStore(db_path)
