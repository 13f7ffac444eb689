"""What several command groups share: JSON output, errors, the registry/runs/model options."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from mondrian.core.config import ConfigError
from mondrian.core.workspace import Workspace, load_workspace
from mondrian.models.sources import ModelCard, ModelError, resolve
from mondrian.registry.records import RegistryError
from mondrian.train.runs import RunStore

T = TypeVar("T")

ROOT_OPTION = click.option("--root", type=click.Path(file_okay=False),
                           help="Registry root [$MONDRIAN_ADAPTERS or ./adapters].")

RUNS_DB_OPTION = click.option("--db", "db_path", default="workspace/mondrian.db",
                              show_default=True, type=click.Path(dir_okay=False),
                              help="The database holding the runs.")


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
