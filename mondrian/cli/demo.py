"""`mondrian demo`: the whole pipeline on the embedded default model."""

from __future__ import annotations

import click

from mondrian.cli.common import ROOT_OPTION, echo_json, fail
from mondrian.core.config import ConfigError
from mondrian.models.sources import ModelError
from mondrian.registry.records import RegistryError
from mondrian.train.loop import TrainError


@click.command()
@click.option("--model", "model_spec", default="smollm2-135m", show_default=True,
              help="Model spec.")
@click.option("--workspace", "folder", default="workspace", show_default=True,
              type=click.Path(file_okay=False), help="Where the demo workspace is (re)built.")
@ROOT_OPTION
@click.option("--iters", type=click.IntRange(1),
              help="Training steps of round 1  [default: DemoOptions.iters, mondrian/demo/run.py].")
@click.option("--eval-limit", default=32, show_default=True, type=click.IntRange(1),
              help="Test rows evaluated.")
@click.option("--requests", "n_requests", default=32, show_default=True, type=click.IntRange(1),
              help="A/B requests sent to the service, per round.")
@click.option("--max-seq-length", default=512, show_default=True, type=click.IntRange(16),
              help="Training sequence limit (tiny models' tokenizers need more).")
@click.option("--rounds", default=2, show_default=True, type=click.IntRange(1, 2),
              help="2: also the loop's second round (harvest the feedback -> retrain -> A/B again).")
@click.option("--round2-iters", type=click.IntRange(1),
              help="Training steps of the second round's retrain  [default: DemoOptions.round2_iters].")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON at the end.")
def demo(model_spec: str, folder: str, root: str | None, iters: int | None, eval_limit: int,
         n_requests: int, max_seq_length: int, rounds: int, round2_iters: int | None, as_json: bool) -> None:
    """The whole pipeline on the embedded default: demo data -> link -> dataset -> train -> eval
    -> publish -> serve -> A/B traffic with users' feedback -> report; then harvest -> retrain ->
    publish -> A/B again."""
    # heavy: the demo serves (fastapi + uvicorn, ~1 s); `mondrian --help` stays fast
    from mondrian.demo.run import DemoOptions, run_demo  # noqa: PLC0415 - heavy: fastapi + uvicorn
    steps = {k: v for k, v in (("iters", iters), ("round2_iters", round2_iters)) if v is not None}
    opts = DemoOptions(model=model_spec, folder=folder, registry=root, eval_limit=eval_limit,
                       requests=n_requests, max_seq_length=max_seq_length, rounds=rounds, **steps)
    try:
        out = run_demo(opts, lambda line: click.echo(line, err=True))
    except (ModelError, TrainError, ConfigError, RegistryError) as exc:
        fail(exc)
    if as_json:
        echo_json(out)
