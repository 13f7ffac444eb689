"""`mondrian ab report`: A/B analysis of the service's requests log."""

from __future__ import annotations

import click

from mondrian.ab.report import ab_report, format_report
from mondrian.cli.common import echo_json, fail


@click.group()
def ab() -> None:
    """A/B analysis of the advisor service's served-requests log (SQLite)."""


@ab.command("report")
@click.option("--db", "db_paths", required=True, multiple=True, type=click.Path(dir_okay=False),
              help="The database holding the service's `requests` table; repeat it for service "
                   "replicas that each write their own (one report over all of them).")
@click.option("--advisor", help="Only this advisor.")
@click.option("--control",
              help="The control arm [the arm named 'control', else the first by name].")
@click.option("--since",
              help="Only requests received at or after this ISO 8601 time (naive = UTC).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def ab_report_cmd(db_paths: tuple[str, ...], advisor: str | None, control: str | None, since: str | None,
                  as_json: bool) -> None:
    """Per arm: compliance, fallbacks, errors, latency; outcomes from users' feedback with
    always-valid tests and sequential guardrails; arms vs control; shadow; SRM; the rollout
    timeline; rollback flags."""
    try:
        report = ab_report(db_paths[0] if len(db_paths) == 1 else list(db_paths), advisor=advisor, control=control, since=since)
    except ValueError as exc:  # includes mondrian.core.db.DBError
        fail(exc)
    if as_json:
        echo_json(report)
    else:
        click.echo(format_report(report), nl=False)
