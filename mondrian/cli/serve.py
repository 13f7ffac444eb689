"""`mondrian serve`, and `mondrian service ...`: the admin client of a running service."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import click

from mondrian.ab.rollout import judge
from mondrian.cli.common import (
    ADVISORS_DIR_OPTION,
    ROOT_OPTION,
    advisors_in,
    base_model,
    echo_json,
    fail,
)
from mondrian.core.config import ConfigError
from mondrian.core.db import PAYLOAD_MODES
from mondrian.serve.config import ServiceConfig
from mondrian.serve.errors import ServiceError
from mondrian.serve.service import Service


def _resolve_model(spec: str) -> tuple[str, str, str]:
    card = base_model(spec)
    return card.name, card.path, card.fingerprint


def _admin_token(token: str | None, token_file: str | None) -> str | None:
    """--admin-token, or the first line of --admin-token-file (one of them at most)."""
    if token and token_file:
        raise click.UsageError("give the admin token one way: --admin-token or --admin-token-file")
    if token_file:
        lines = Path(token_file).read_text(encoding="utf-8").splitlines()
        token = lines[0].strip() if lines else ""
        if not token:
            raise click.ClickException(f"{token_file}: the admin token file is empty")
    return token


def replica_options(fn):
    """--rollout-db and --rollout-evidence: service replicas that each write their own --db."""
    fn = click.option("--rollout-evidence", multiple=True, type=click.Path(dir_okay=False),
                      help="Another replica's requests database for the rollout judge to read with --db "
                           "(repeat it; every replica's log, so each decision sees all the traffic).")(fn)
    return click.option("--rollout-db", type=click.Path(dir_okay=False),
                        help="Where rollout timelines live [--db]. Replicas that each write their own --db "
                             "point this at one shared file: each decision is then taken once, under its "
                             "write lock.")(fn)


@click.command()
@click.option("--advisor", "advisors", multiple=True,
              help="Serve this advisor (its production alias, or the base model when it has "
                   "none). Repeatable; advisors in --routing are served too.")
@click.option("--routing", "routing_path", type=click.Path(dir_okay=False),
              help="Routing file (arms, weights, shadow, sticky, fallback); "
                   "re-read when it changes.")
@click.option("--model", "model_spec",
              help="Base model spec when the route and the registry do not say.")
@click.option("--db", "db_path", default="mondrian.db", show_default=True,
              help="SQLite file for the requests table ('' = do not record).")
@ADVISORS_DIR_OPTION
@ROOT_OPTION
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int, help="0 = any free port.")
@click.option("--admin-token", envvar="MONDRIAN_ADMIN_TOKEN",
              help="Bearer token for /admin. Prefer $MONDRIAN_ADMIN_TOKEN or --admin-token-file: "
                   "a token on the command line shows in `ps`. Without one the admin endpoints are off.")
@click.option("--admin-token-file", type=click.Path(dir_okay=False, exists=True),
              help="Read the admin token from this file (its first line).")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(min=1),
              help="Requests decoded together.")
@click.option("--prefix-cache-mb", default=256.0, show_default=True, type=click.FloatRange(min=0),
              help="Memory for the KV state of prompt prefixes (system prompt, chat template), kept per "
                   "LoRA version and reused by later requests; 0 turns it off.")
@replica_options
@click.option("--max-versions", default=8, show_default=True, type=click.IntRange(min=1),
              help="LoRA versions loaded per base model. Versions a routing plan serves are never "
                   "evicted; a plan that needs more is refused (409).")
@click.option("--ready-file", type=click.Path(dir_okay=False),
              help="Write the port here once listening.")
@click.option("--unconstrained", is_flag=True,
              help="Decode text advisors freely; by default their answers are decoded under the "
                   "contract's JSON-Schema grammar (lists unique and capped).")
@click.option("--log-payloads", type=click.Choice(PAYLOAD_MODES), default="full", show_default=True,
              help="What a requests row keeps: full = the input and answer texts (and each image once, "
                   "by hash, in --image-store), hash = only their sha256s, off = neither.")
@click.option("--image-store", type=click.Path(file_okay=False),
              help="Folder for request images under --log-payloads full [request-images/ beside --db].")
def serve(advisors: tuple[str, ...], routing_path: str | None, model_spec: str | None,
          db_path: str, advisors_dirs: tuple[str, ...], root: str | None, host: str, port: int, admin_token: str | None,
          admin_token_file: str | None, max_batch: int, prefix_cache_mb: float, rollout_db: str | None,
          rollout_evidence: tuple[str, ...], max_versions: int, ready_file: str | None,
          unconstrained: bool, log_payloads: str, image_store: str | None) -> None:
    """Serve advisors over HTTP: hot-swapped LoRA versions, A/B arms, a requests log."""
    # heavy: fastapi + uvicorn (~1 s) load only when serving; `mondrian --help` stays fast
    from mondrian.serve.app import run_server  # noqa: PLC0415 - heavy: fastapi + uvicorn

    admin_token = _admin_token(admin_token, admin_token_file)
    cfg = ServiceConfig(registry_root=root, db_path=db_path or None, routing_path=routing_path,
                        advisors=list(advisors), model=model_spec, admin_token=admin_token,
                        max_batch=max_batch, prefix_cache_mb=prefix_cache_mb, max_versions=max_versions,
                        rollout_db=rollout_db, rollout_evidence=list(rollout_evidence), constrained=not unconstrained,
                        log_payloads=log_payloads, image_store=image_store)
    service = Service(cfg, _resolve_model, advisors_in(advisors_dirs), judge=judge)
    try:
        service.start()
    except ServiceError as exc:
        service.close()
        raise click.ClickException(exc.message) from None
    except ConfigError as exc:
        service.close()
        fail(exc)

    def ready(bound: int) -> None:
        for name, s in service.served.items():
            arms = ", ".join(f"{a.name}={a.version or 'base'} ({a.weight:g})" for a in s.plan.arms)
            click.echo(f"serving {name} on {s.worker.name}: {arms}", err=True)
        click.echo(f"listening on http://{host}:{bound} (admin {'on' if admin_token else 'off'})",
                   err=True)
        if ready_file:
            Path(ready_file).write_text(str(bound))

    run_server(service, host, port, ready=ready)  # returns on SIGINT/SIGTERM, the log flushed
    click.echo("stopped", err=True)


def _admin_call(url: str, token: str | None, method: str, path: str,
                body: dict | None = None) -> dict:
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


URL_OPTION = click.option("--url", default="http://127.0.0.1:8000", show_default=True,
                          envvar="MONDRIAN_URL", help="The service [$MONDRIAN_URL].")
TOKEN_OPTION = click.option("--token", envvar="MONDRIAN_ADMIN_TOKEN",
                            help="Admin token; prefer $MONDRIAN_ADMIN_TOKEN (a token on the command line shows in `ps`).")


@click.group()
def service() -> None:
    """Control a running service: load, activate and roll back versions, reload routing."""


@service.command("state")
@URL_OPTION
@TOKEN_OPTION
def service_state(url: str, token: str | None) -> None:
    """Plans, loaded versions and recent events (JSON)."""
    echo_json(_admin_call(url, token, "GET", "/admin/state"))


@service.command("load")
@click.argument("advisor")
@click.argument("version")
@URL_OPTION
@TOKEN_OPTION
def service_load(advisor: str, version: str, url: str, token: str | None) -> None:
    """Verify, load and smoke-test VERSION on the running model (nothing serves it yet)."""
    echo_json(_admin_call(url, token, "POST", f"/admin/advisors/{advisor}/load",
                          {"version": version}))


@service.command("activate")
@click.argument("advisor")
@click.argument("version")
@click.option("--alias", default="production", show_default=True)
@URL_OPTION
@TOKEN_OPTION
def service_activate(advisor: str, version: str, alias: str, url: str, token: str | None) -> None:
    """Point ALIAS at VERSION and serve it, without reloading the base model."""
    echo_json(_admin_call(url, token, "POST", f"/admin/advisors/{advisor}/activate",
                          {"version": version, "alias": alias}))


@service.command("rollback")
@click.argument("advisor")
@click.option("--alias", default="production", show_default=True)
@URL_OPTION
@TOKEN_OPTION
def service_rollback(advisor: str, alias: str, url: str, token: str | None) -> None:
    """Point ALIAS back at its previous version and serve it."""
    echo_json(_admin_call(url, token, "POST", f"/admin/advisors/{advisor}/rollback",
                          {"alias": alias}))


@service.command("reload")
@URL_OPTION
@TOKEN_OPTION
def service_reload(url: str, token: str | None) -> None:
    """Re-read the routing file now (it is also re-read when it changes)."""
    echo_json(_admin_call(url, token, "POST", "/admin/reload"))
