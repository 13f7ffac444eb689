"""The whole HTTP API fuzzed from its own OpenAPI document (schemathesis), against a real
`mondrian serve` process on the tiny llama: bodies that fit the schema and bodies that break
it, on every route, admin ones included (with the token). Every response is a 2xx or a JSON
4xx, never a 5xx for what a client sent, and the service still answers /health afterwards."""

from __future__ import annotations

import json

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.helpers import ServeProcess

ADV = "fit-query"
TOKEN = "fuzz-token"
EXAMPLES = 25  # per route and mode: bounded, so the suite keeps its time budget


def _cheap(case) -> None:
    """Keep generation short: a valid max_tokens up to 4096 on every example would spend the
    test's budget decoding, not probing."""
    for body in (case.body,) if isinstance(case.body, dict) else ():
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(key), int) and not isinstance(body[key], bool) and body[key] > 8:
                body[key] = 8


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama):
    tmp = tmp_path_factory.mktemp("fuzz")
    srv = ServeProcess(tmp, "--advisor", ADV, "--model", "tiny:llama", "--root", str(tmp / "registry"),
                       "--db", str(tmp / "m.db"), token=TOKEN, timeout=120)
    yield srv
    assert srv.stop() == 0, srv.log.read_text()[-3000:]


def _fuzz(op, mode: GenerationMode, url: str, seen: dict[str, set[int]], failures: list[str]) -> None:
    # valid cases name the served advisor (a random one is only ever a 404)
    fixed = {"advisor": ADV} if mode is GenerationMode.POSITIVE and "{advisor}" in op.path else None

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=mode, path_parameters=fixed))
    def probe(case):
        _cheap(case)
        if mode is GenerationMode.POSITIVE and op.path == "/v1/chat/completions":
            case.body["model"] = ADV  # as with the path: valid cases ask the served advisor
        resp = case.call(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120)
        seen.setdefault(op.label, set()).add(resp.status_code)
        where = f"{op.label} {mode.value}: {resp.status_code} for {case.body!r:.300}"
        if resp.status_code >= 500:
            failures.append(f"{where}: {resp.text[:300]}")
        elif resp.status_code >= 400:
            try:
                body = resp.json()
            except json.JSONDecodeError:
                failures.append(f"{where}: not JSON: {resp.text[:200]!r}")
                return
            if not isinstance(body, dict) or not ("error" in body or "detail" in body):
                failures.append(f"{where}: no error object: {body!r:.200}")

    try:
        probe()
    except Unsatisfiable:
        assert mode is GenerationMode.NEGATIVE, op.label  # a route with no input has no invalid one


def test_every_route_fuzzed_from_the_openapi_document(server):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    seen: dict[str, set[int]] = {}
    failures: list[str] = []
    for result in schema.get_all_operations():
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _fuzz(result.ok(), mode, server.url, seen, failures)
    assert not failures, "\n".join(failures[:20])
    # every route was reached, and the answering ones answered (2xx) as well as refused (4xx)
    assert len(seen) == len(list(schema.get_all_operations()))
    for label in ("POST /v1/advisors/{advisor}/analyze", "POST /v1/chat/completions"):
        assert any(s < 300 for s in seen[label]) and any(400 <= s < 500 for s in seen[label]), (label, seen[label])
    status, health = server.call("GET", "/health")
    assert status == 200 and health["status"] == "ok"
