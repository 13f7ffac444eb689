"""The service's HTTP routes: module-level FastAPI handlers that get the `Service` through
dependency injection (`get_service` reads `app.state.service`, which `app.create_app` sets).

Public routes (`router`): `GET /health`, `GET /v1/models`, `POST /v1/advisors/{advisor}/analyze`
(JSON or a multipart form with an image), `POST /v1/chat/completions` (OpenAI-compatible,
greedy, non-streaming; its `id` is the request id), `POST /v1/requests/{request_id}/feedback`.
Admin routes (`admin_router`, bearer token): `GET /admin/state`,
`POST /admin/advisors/{advisor}/load|activate|rollback`, `POST /admin/reload`. Errors are
OpenAI's error object (`guards.error_response`); body size and arrival time are bounded by
`guards.BodyGuard`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from mondrian.core.contracts import lone_surrogate
from mondrian.serve import openapi
from mondrian.serve.errors import ServiceError
from mondrian.serve.feedback import Verdict
from mondrian.serve.guards import error_response
from mondrian.serve.service import Service
from mondrian.serve.uploads import data_url_bytes, read_analyze_form

ANALYZE_FIELDS = ("max_tokens", "text", "user", "version")


async def service_error_handler(_request: Request, exc: ServiceError) -> JSONResponse:
    return error_response(exc.status, exc.message, "server_error" if exc.status >= 500 else "invalid_request_error")


async def validation_error_handler(_request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(422, "malformed request: " + "; ".join(
        f"{'.'.join(map(str, e.get('loc', [])))}: {e.get('msg')}" for e in exc.errors()[:5]))


def get_service(request: Request) -> Service:
    """The service this app serves (`create_app` stores it in `app.state`)."""
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


def require_admin(request: Request, service: ServiceDep) -> None:
    """Admin routes need `Authorization: Bearer <the service's admin token>`."""
    token = service.cfg.admin_token
    if not token:
        raise ServiceError(403, "admin endpoints are off: start the service with --admin-token "
                                "(or MONDRIAN_ADMIN_TOKEN)")
    got = request.headers.get("authorization", "")
    if not got.startswith("Bearer ") or not hmac.compare_digest(got[7:].encode(), token.encode()):
        raise ServiceError(401, "admin endpoints need 'Authorization: Bearer <token>'")


router = APIRouter()
admin_router = APIRouter(dependencies=[Depends(require_admin)])


async def read_json(request: Request, service: Service) -> dict:
    """The body as a JSON object (BodyGuard bounds its size and arrival time)."""
    body = await request.body()
    try:
        text = body.decode("utf-8")
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ServiceError(400, f"the body is not JSON ({exc})") from None
    except RecursionError:
        raise ServiceError(400, "the body is JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise ServiceError(400, "the body must be a JSON object")
    bad = lone_surrogate(text, data)
    if bad:
        raise ServiceError(400, f"the body holds a lone surrogate {bad}, which is not text")
    return data


def field(data: dict, name: str, kind: type | tuple[type, ...], required: bool = False,
          default: Any = None) -> Any:
    """`data[name]`, which must be of `kind` (bool is not an int); missing or null -> default."""
    if name not in data or data[name] is None:
        if required:
            raise ServiceError(400, f"field '{name}' is required")
        return default
    value = data[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ServiceError(400, f"field '{name}' must be {names}, got {type(value).__name__}")
    return value


@router.get("/health")
async def health(service: ServiceDep) -> JSONResponse:
    """200 when the service can answer and keep what it answers; 503 (with the problems) when
    it cannot, so a load balancer or a supervisor takes it out of rotation."""
    problems = service.problems()
    body = {"status": "error" if problems else "ok", "problems": problems, "advisors": sorted(service.served),
            "models": [w.name for w in service.workers.values()]}
    return JSONResponse(body, status_code=503 if problems else 200)


@router.get("/v1/models")
async def models(service: ServiceDep) -> dict:
    data = []
    for name, s in sorted(service.served.items()):
        data.append({"id": name, "object": "model", "created": 0, "owned_by": "mondrian",
                     "base_model": s.worker.name})
        for v in service.registry.list(name):
            data.append({"id": f"{name}@{v.version}", "object": "model", "created": 0,
                         "owned_by": "mondrian", "aliases": list(v.aliases)})
    return {"object": "list", "data": data}


@router.post("/v1/advisors/{advisor}/analyze", openapi_extra=openapi.ANALYZE)
async def analyze(advisor: str, request: Request, service: ServiceDep) -> dict:
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await read_analyze_form(request)
        return await service.answer(advisor, form.text, user=form.user, max_tokens=form.max_tokens,
                                    pin=form.pin, image=form.image)
    data = await read_json(request, service)
    unknown = sorted(set(data) - set(ANALYZE_FIELDS))
    if unknown:
        raise ServiceError(400, f"unknown field(s) {', '.join(unknown)} (known: {', '.join(ANALYZE_FIELDS)})")
    return await service.answer(advisor, field(data, "text", str, required=True), user=field(data, "user", str),
                                max_tokens=field(data, "max_tokens", int), pin=field(data, "version", str))


def chat_input(messages: list) -> tuple[str, bytes | None]:
    """The last user message's text and the image of a chat (at most one), from OpenAI
    messages whose content is a string or a list of text and image_url parts."""
    texts, images = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ServiceError(400, f"messages[{i}] must be an object with role system, user or assistant")
        if m["role"] != "user":
            continue
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: text, and images as data URLs
            images = [data_url_bytes(p.get("image_url"), f"messages[{i}]") for p in content
                      if isinstance(p, dict) and p.get("type") == "image_url"] or images
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(content, str):
            raise ServiceError(400, f"messages[{i}].content must be a string or a list of content parts")
        texts.append(content)
    if not texts:
        raise ServiceError(400, "messages has no user message")
    if len(images) > 1:
        raise ServiceError(400, "one image per request")
    return texts[-1], images[0] if images else None


@router.post("/v1/chat/completions", openapi_extra=openapi.CHAT)
async def chat(request: Request, service: ServiceDep) -> dict:
    data = await read_json(request, service)
    model = field(data, "model", str, required=True)
    messages = field(data, "messages", list, required=True)
    if data.get("stream"):
        raise ServiceError(400, "stream=true is not supported; ask without streaming")
    if field(data, "temperature", (int, float), default=0) != 0:
        raise ServiceError(400, "only greedy decoding is served (temperature 0): answers must be reproducible")
    if field(data, "n", int, default=1) != 1:
        raise ServiceError(400, "n must be 1")
    max_tokens = field(data, "max_tokens", int)  # 0 is refused as out of range, not read as unset
    if max_tokens is None:
        max_tokens = field(data, "max_completion_tokens", int)
    user = field(data, "user", str)
    advisor, _, pin = model.partition("@")
    if advisor not in service.served:
        raise ServiceError(404, f"model {model!r}: no such advisor served here "
                                f"(models: {', '.join(sorted(service.served))}; pin a version as advisor@vN)")
    text, image = chat_input(messages)
    out = await service.answer(advisor, text, user=user, endpoint="chat", pin=pin or None,
                               max_tokens=max_tokens, image=image)
    return {
        # the id is the request id, so a client can send feedback on it (/v1/requests/{id}/feedback)
        "id": out["request_id"], "object": "chat.completion", "created": int(time.time()),
        "model": f"{advisor}@{out['version'] or 'base'}",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": out["text"]},
                     "finish_reason": "length" if out["finish_reason"] == "length" else "stop",
                     "logprobs": None}],
        "usage": out["usage"],
        "mondrian": {k: out[k] for k in ("request_id", "arm", "version", "contract_ok", "fallback")},
    }


@router.post("/v1/requests/{request_id}/feedback", openapi_extra=openapi.FEEDBACK)
async def feedback(request_id: str, request: Request, service: ServiceDep) -> dict:
    """A user's verdict on an answer the service gave (the `id` a route returned)."""
    verdict = Verdict.from_body(await read_json(request, service))
    return await asyncio.to_thread(service.record_feedback, request_id, verdict)


# ---- admin (require_admin runs before each handler)


@admin_router.get("/admin/state")
async def admin_state(service: ServiceDep) -> dict:
    return service.state()


@admin_router.post("/admin/advisors/{advisor}/load", openapi_extra=openapi.LOAD)
async def admin_load(advisor: str, request: Request, service: ServiceDep) -> dict:
    data = await read_json(request, service)
    service.serving(advisor)  # an advisor not served is a 404 before a missing field's 400
    version = await asyncio.to_thread(service.load_version, advisor, field(data, "version", str, required=True))
    return {"advisor": advisor, "version": version, "loaded": True}


@admin_router.post("/admin/advisors/{advisor}/activate", openapi_extra=openapi.ACTIVATE)
async def admin_activate(advisor: str, request: Request, service: ServiceDep) -> dict:
    data = await read_json(request, service)
    ref = field(data, "version", str, required=True)
    alias = field(data, "alias", str, default="production")
    return await asyncio.to_thread(service.activate, advisor, ref, alias)


@admin_router.post("/admin/advisors/{advisor}/rollback", openapi_extra=openapi.ROLLBACK)
async def admin_rollback(advisor: str, request: Request, service: ServiceDep) -> dict:
    data = await read_json(request, service) if int(request.headers.get("content-length") or 0) else {}
    return await asyncio.to_thread(service.rollback, advisor, field(data, "alias", str, default="production"))


@admin_router.post("/admin/reload")
async def admin_reload(service: ServiceDep) -> dict:
    return {"routing_ids": await asyncio.to_thread(service.reload)}
