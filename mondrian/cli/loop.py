"""Closing the loop: `mondrian feedback` (a verdict on a served request, from the command line)
and `mondrian harvest` (judged requests -> jobs for the next round)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from mondrian.cli.common import (
    ADVISORS_DIR_OPTION,
    WORKSPACE_OPTION,
    advisors_in,
    echo_json,
    fail,
    open_workspace,
)
from mondrian.core.contracts import load_advisors
from mondrian.core.db import VERDICTS, DBError
from mondrian.link.harvest import SKIP_REASONS, harvest
from mondrian.serve.errors import ServiceError
from mondrian.serve.feedback import FeedbackStore, Verdict


@click.command()
@click.argument("request_id")
@click.option("--verdict", required=True, type=click.Choice(VERDICTS), help="What the user said of the answer.")
@click.option("--answer", help="The right answer, as JSON or @FILE (with --verdict corrected).")
@click.option("--user", default="", help="Who judged; one current verdict per (request, user).")
@click.option("--db", "db_path", default="mondrian.db", show_default=True, type=click.Path(dir_okay=False),
              help="The service's requests database.")
@ADVISORS_DIR_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the recorded verdict as JSON.")
def feedback(request_id: str, verdict: str, answer: str | None, user: str, db_path: str,
             advisors_dirs: tuple[str, ...], as_json: bool) -> None:
    """Record a verdict on a served request, as POST /v1/requests/{id}/feedback does."""
    if not Path(db_path).is_file():
        fail(DBError(f"{db_path}: no such database (pass --db)"))
    body: dict = {"verdict": verdict, "user": user}
    if answer is not None:
        try:
            text = Path(answer[1:]).read_text(encoding="utf-8") if answer.startswith("@") else answer
            body["answer"] = json.loads(text)
        except (OSError, UnicodeDecodeError) as exc:
            fail(ValueError(f"--answer {answer}: cannot read it ({exc})"))
        except json.JSONDecodeError as exc:
            fail(ValueError(f"--answer is not JSON ({exc})"))
    store = FeedbackStore(db_path, advisors_in(advisors_dirs))
    try:
        out = store.record(request_id, Verdict.from_body(body))
    except ServiceError as exc:
        raise click.ClickException(f"{exc.status}: {exc.message}") from None
    finally:
        store.close()
    if as_json:
        echo_json(out)
        return
    state = "recorded" if out["changed"] else "unchanged (the same verdict was already recorded)"
    click.echo(f"{request_id}: {out['verdict']} by {out['user'] or '(anonymous)'}, revision {out['revision']}, {state}")


@click.command("harvest")
@WORKSPACE_OPTION
@click.option("--requests-db", type=click.Path(dir_okay=False),
              help="The service's requests database [the workspace's job database].")
@click.option("--image-store", type=click.Path(file_okay=False),
              help="Where the service kept request images [request-images/ beside the requests db].")
@click.option("--advisor", "advisors", multiple=True, help="Only this advisor's requests (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def harvest_cmd(workspace: str, requests_db: str | None, image_store: str | None, advisors: tuple[str, ...],
                as_json: bool) -> None:
    """Turn served requests with feedback into jobs: accepted -> the served answer,
    corrected -> the correction; every request seen is harvested or skipped with a reason."""
    ws = open_workspace(workspace)
    if requests_db and not Path(requests_db).is_file():
        fail(DBError(f"{requests_db}: no such database"))
    try:
        summary = harvest(ws, load_advisors([ws.advisors_path]), requests_db, image_store, list(advisors) or None)
    except (DBError, ValueError) as exc:
        fail(exc)
    if as_json:
        echo_json(summary.to_dict())
        return
    for reason, n in summary.skipped.items():
        click.echo(f"  skipped {reason:20} {n:6}  {SKIP_REASONS[reason]}")
    click.echo(f"  harvested jobs by verdict: {summary.by_verdict or 'none'}")
    click.echo(summary.line())
