"""The HTTP layer alone (mondrian/serve/http.py), in process, over a fake service: the route
table and its OpenAPI document, the service reaching every handler through dependency
injection, request parsing (JSON, multipart, OpenAI chat messages with a data-URL image),
admin auth before anything else, and OpenAI-shaped errors. tests/test_service.py runs the
real service over real HTTP."""

from __future__ import annotations

import base64
import io
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from mondrian.serve.app import create_app
from mondrian.serve.config import ServiceConfig
from mondrian.serve.errors import ServiceError

TOKEN = "tok"
ROUTES = {
    ("GET", "/health"), ("GET", "/v1/models"), ("POST", "/v1/advisors/{advisor}/analyze"),
    ("POST", "/v1/chat/completions"), ("GET", "/admin/state"), ("POST", "/admin/advisors/{advisor}/load"),
    ("POST", "/admin/advisors/{advisor}/activate"), ("POST", "/admin/advisors/{advisor}/rollback"),
    ("POST", "/admin/reload"), ("POST", "/v1/requests/{request_id}/feedback"),
}


class FakeService:
    """What the routes use of `Service`, recording the calls."""

    def __init__(self, token: str | None = TOKEN):
        self.cfg = ServiceConfig(admin_token=token, max_body_bytes=4096)
        self.served = {"adv": SimpleNamespace(worker=SimpleNamespace(name="tiny"))}
        self.workers = {"fp": SimpleNamespace(name="tiny")}
        self.registry = SimpleNamespace(list=lambda name: [SimpleNamespace(version="v1", aliases=("production",))])
        self.calls: list[tuple] = []
        self.closed = False
        self.problem_list: list[str] = []

    def problems(self) -> list[str]:
        return self.problem_list

    async def answer(self, advisor, text, **kw) -> dict:
        self.calls.append(("answer", advisor, text, kw))
        return {"request_id": "req-abc", "advisor": advisor, "arm": "control", "version": "v1", "answer": None,
                "text": "hi", "contract_ok": False, "fallback": None, "finish_reason": "length",
                "latency_ms": 1.0, "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}

    def serving(self, advisor):
        if advisor not in self.served:
            raise ServiceError(404, f"advisor {advisor!r} is not served here")
        return self.served[advisor]

    def state(self) -> dict:
        return {"advisors": sorted(self.served)}

    def load_version(self, advisor, ref):
        self.calls.append(("load", advisor, ref))
        return "v1"

    def activate(self, advisor, ref, alias="production"):
        self.calls.append(("activate", advisor, ref, alias))
        return {"advisor": advisor, "version": ref, "alias": alias}

    def rollback(self, advisor, alias="production"):
        self.calls.append(("rollback", advisor, alias))
        return {"advisor": advisor, "alias": alias}

    def reload(self):
        return {"adv": "rid"}

    def record_feedback(self, request_id, verdict):
        self.calls.append(("feedback", request_id, verdict))
        if request_id != "req-abc":
            raise ServiceError(404, f"no served request {request_id!r}")
        return {"request_id": request_id, "verdict": verdict.verdict, "changed": True}

    def close(self):
        self.closed = True


@pytest.fixture
def service():
    return FakeService()


@pytest.fixture
def client(service):
    with TestClient(create_app(service)) as c:
        yield c
    assert service.closed  # the app's lifespan closes the service


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "blue").save(buf, "PNG")
    return buf.getvalue()


def _error(resp, status: int, text: str) -> None:
    body = resp.json()
    assert resp.status_code == status and text in body["error"]["message"], (resp.status_code, body)
    assert body["error"]["code"] == status
    assert body["error"]["type"] == ("server_error" if status >= 500 else "invalid_request_error")


def test_routes_and_openapi_document(service):
    doc = create_app(service).openapi()
    assert {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops} == ROUTES
    analyze = doc["paths"]["/v1/advisors/{advisor}/analyze"]["post"]
    assert [p["name"] for p in analyze["parameters"]] == ["advisor"]  # the service is injected, not a parameter


def test_public_routes_reach_the_service(client, service):
    assert client.get("/health").json() == {"status": "ok", "problems": [], "advisors": ["adv"], "models": ["tiny"]}
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids == ["adv", "adv@v1"]
    r = client.post("/v1/advisors/adv/analyze", json={"text": "solar", "user": "u", "max_tokens": 5, "version": "v1"})
    assert r.status_code == 200 and r.json()["text"] == "hi"
    assert service.calls[-1] == ("answer", "adv", "solar", {"user": "u", "max_tokens": 5, "pin": "v1"})
    png = _png()
    r = client.post("/v1/advisors/adv/analyze", data={"text": "look", "max_tokens": "3"},
                    files={"image": ("a.png", png, "image/png")})
    assert r.status_code == 200
    assert service.calls[-1] == ("answer", "adv", "look", {"user": None, "max_tokens": 3, "pin": None, "image": png})


def test_chat_completions(client, service):
    png = _png()
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    r = client.post("/v1/chat/completions", json={"model": "adv@v2", "user": "u", "max_tokens": 7, "messages": [
        {"role": "system", "content": "ignored"},
        {"role": "user", "content": [{"type": "text", "text": "what "}, {"type": "image_url", "image_url": {"url": url}},
                                     {"type": "text", "text": "is this"}]}]})
    body = r.json()
    assert r.status_code == 200 and body["id"] == "req-abc" and body["model"] == "adv@v1"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "hi"}
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["total_tokens"] == 4
    assert service.calls[-1] == ("answer", "adv", "what is this",
                                 {"user": "u", "endpoint": "chat", "pin": "v2", "max_tokens": 7, "image": png})
    msgs = [{"role": "user", "content": "x"}]
    _error(client.post("/v1/chat/completions", json={"model": "adv", "messages": msgs, "temperature": 0.5}),
           400, "greedy")
    _error(client.post("/v1/chat/completions", json={"model": "adv", "messages": msgs, "n": 2}), 400, "n must be 1")
    _error(client.post("/v1/chat/completions", json={"model": "adv", "messages": [{"role": "tool"}]}), 400, "role")
    _error(client.post("/v1/chat/completions", json={"model": "adv", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]}), 400, "data URL")
    _error(client.post("/v1/chat/completions", json={"model": "nope", "messages": msgs}), 404, "no such advisor")


def test_bad_requests_are_openai_errors(client):
    _error(client.post("/v1/advisors/adv/analyze", content=b"{nope"), 400, "not JSON")
    _error(client.post("/v1/advisors/adv/analyze", json=[1]), 400, "JSON object")
    _error(client.post("/v1/advisors/adv/analyze", json={"text": "x", "extra": 1}), 400, "unknown field(s) extra")
    _error(client.post("/v1/advisors/adv/analyze", json={"text": "x", "max_tokens": True}), 400, "must be int")
    _error(client.post("/v1/advisors/adv/analyze", json={"text": "x" * 5000}), 413, "the limit is 4096")
    _error(client.post("/v1/advisors/adv/analyze", files={"user": (None, "u")}), 400, "'text' field or an 'image'")


def test_admin_auth_comes_first(client, service):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    _error(client.get("/admin/state"), 401, "Bearer")
    _error(client.post("/admin/advisors/adv/load", content=b"{nope"), 401, "Bearer")  # before the body is read
    assert client.get("/admin/state", headers=auth).json() == {"advisors": ["adv"]}
    _error(client.post("/admin/advisors/nope/load", json={}, headers=auth), 404, "not served")  # 404 before 400
    _error(client.post("/admin/advisors/adv/load", json={}, headers=auth), 400, "'version' is required")
    assert client.post("/admin/advisors/adv/load", json={"version": "production"}, headers=auth).json() == \
        {"advisor": "adv", "version": "v1", "loaded": True}
    assert client.post("/admin/advisors/adv/activate", json={"version": "v2"}, headers=auth).json()["alias"] == \
        "production"
    assert client.post("/admin/advisors/adv/rollback", headers=auth).status_code == 200  # no body at all
    assert service.calls[-1] == ("rollback", "adv", "production")
    assert client.post("/admin/reload", headers=auth).json() == {"routing_ids": {"adv": "rid"}}
    with TestClient(create_app(FakeService(token=None))) as off:
        _error(off.get("/admin/state", headers=auth), 403, "--admin-token")


def test_feedback_route_parses_the_verdict_and_reaches_the_service(client, service):
    from mondrian.serve.feedback import Verdict

    r = client.post("/v1/requests/req-abc/feedback", json={"verdict": "corrected", "answer": {"a": 1}, "user": "u"})
    assert r.status_code == 200 and r.json()["changed"] is True
    assert service.calls[-1] == ("feedback", "req-abc", Verdict("corrected", {"a": 1}, "u"))
    _error(client.post("/v1/requests/req-x/feedback", json={"verdict": "accepted"}), 404, "no served request")
    n = len(service.calls)
    _error(client.post("/v1/requests/req-abc/feedback", json={"verdict": "meh"}), 400, "field 'verdict'")
    _error(client.post("/v1/requests/req-abc/feedback", json=["accepted"]), 400, "JSON object")
    assert len(service.calls) == n  # refused before the service is asked
