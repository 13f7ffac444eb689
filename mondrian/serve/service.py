"""The advisor service: FastAPI over the engine, A/B routing, fallback, shadow, request log.

Endpoints (all JSON):

- `POST /v1/advisors/{advisor}/analyze` — `{"text": ..., "user": ...}` (or a multipart form
  with `text`, `user` and an `image` file); answers with the parsed object, the arm, the
  version that served it and whether it met the advisor's contract.
- `POST /v1/chat/completions` — OpenAI-compatible; `model` is `advisor` (routed) or
  `advisor@version` (pinned: alias or vN); `user` is the sticky key. Greedy, non-streaming.
- `GET /v1/models`, `GET /health`.
- Admin (bearer token): `GET /admin/state`, `POST /admin/advisors/{advisor}/load`,
  `.../activate`, `.../rollback`, `POST /admin/reload`.

The registry's aliases are the control plane: `activate` loads and smoke-tests the version on
the model's worker first and only then moves the alias (default `production`) and re-plans
the advisor; `rollback` does the same for the alias's previous version. The routing file is
re-read when it changes (polled), without a restart; a file or version that fails keeps the
old plan serving and is reported in `/admin/state`.

Every routed request's row is committed to the `requests` table before its answer is sent
(`mondrian.serve.requests_log`, group commit), so an answered request survives a kill -9.
The service never imports `lora`: the CLI hands it a model resolver.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from mondrian.core.config import ConfigError
from mondrian.core.contracts import Advisor, loads_strict
from mondrian.registry.store import Registry, RegistryError
from mondrian.serve.engine import EngineError, ModelWorker
from mondrian.serve.requests_log import RequestLog, create_tables, now_iso, record_routing
from mondrian.serve.routing import AdvisorRoute, Arm, Plan, ResolvedArm, RoutingConfig, load_routing
from mondrian.serve.vision import VisionRequest, VisionWorker

# spec -> (name, folder, fingerprint); given by the CLI (mondrian.models.sources.resolve) or a test
ModelResolver = Callable[[str], tuple[str, Path, str]]


class ServiceError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class ServiceConfig:
    registry_root: str | Path | None = None
    db_path: str | Path | None = None  # requests log; None = not recorded
    routing_path: str | Path | None = None
    advisors: list[str] = field(default_factory=list)  # served with the default route if not in the file
    model: str | None = None  # default base model spec
    admin_token: str | None = None
    max_body_bytes: int = 8 << 20
    max_input_chars: int = 4000
    max_prompt_tokens: int = 1024
    max_batch: int = 8
    poll_s: float = 0.5


@dataclass
class Served:
    plan: Plan
    worker: ModelWorker
    advisor: Advisor
    route: AdvisorRoute


class Service:
    def __init__(self, cfg: ServiceConfig, resolve_model: ModelResolver, advisors: dict[str, Advisor]):
        self.cfg, self.resolve_model, self.contracts = cfg, resolve_model, advisors
        self.registry = Registry(cfg.registry_root)
        self.workers: dict[str, ModelWorker] = {}  # by base-model fingerprint
        self._spec_workers: dict[str, ModelWorker] = {}
        self.served: dict[str, Served] = {}
        self.routing = RoutingConfig()
        self.routing_mtime: float | None = None
        self.last_reload: dict = {}
        self.events: list[dict] = []
        self.lock = threading.RLock()  # plan changes (admin, reloads) one at a time
        self.log = RequestLog(cfg.db_path) if cfg.db_path else RequestLog.disabled()
        if cfg.db_path:
            import sqlite3

            with sqlite3.connect(str(cfg.db_path)) as conn:
                create_tables(conn)
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    # ---- lifecycle

    def start(self) -> None:
        """Load the routing file (if any) and every advisor's plan; fails loudly at startup."""
        if self.cfg.routing_path:
            self.routing = load_routing(self.cfg.routing_path)
            self.routing_mtime = Path(self.cfg.routing_path).stat().st_mtime
        names = list(self.routing.advisors) + [a for a in self.cfg.advisors if a not in self.routing.advisors]
        if not names:
            raise ConfigError("nothing to serve: name advisors (--advisor) or a routing file with advisors")
        for name in names:
            self.apply(name)
        if self.cfg.routing_path:
            self._watcher = threading.Thread(target=self._watch, name="routing-watch", daemon=True)
            self._watcher.start()

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        for w in self.workers.values():
            w.close()
        self.log.close()

    def _event(self, kind: str, **info) -> None:
        self.events.append({"at": now_iso(), "event": kind, **info})
        del self.events[:-200]

    # ---- plans

    def route_for(self, advisor: str) -> AdvisorRoute:
        route = self.routing.advisors.get(advisor)
        if route is not None:
            return route
        arm = Arm("production", "production") if self._production(advisor) else Arm("base", None)
        return AdvisorRoute(arms=[arm])

    def _production(self, advisor: str) -> str | None:
        return self.registry.aliases(advisor).get("production")  # {} for an advisor with no versions

    def _ref(self, advisor: str, ref: str | None) -> str | None:
        if ref is None:
            return None
        try:
            return self.registry.show(advisor, ref).version
        except RegistryError as exc:
            raise ServiceError(404, f"{advisor}: no version or alias {ref!r} ({exc})") from None

    def _worker(self, spec: str, vision: bool = False) -> ModelWorker | VisionWorker:
        """The worker for a model spec: resolved once per spec (a folder without a card is hashed
        to resolve, and plans are re-made on every activate), one worker per fingerprint. Image
        advisors get a `VisionWorker` (mlx-vlm), text advisors a `ModelWorker` (mlx-lm)."""
        worker = self._spec_workers.get(spec)
        if worker is None:
            name, path, fingerprint = self.resolve_model(spec)
            worker = self.workers.get(fingerprint)
            if worker is None:
                worker = (VisionWorker(name, path, fingerprint) if vision
                          else ModelWorker(name, path, fingerprint, max_batch=self.cfg.max_batch))
                try:
                    worker.wait_ready(600)
                except EngineError as exc:
                    worker.close()
                    raise ServiceError(400, f"model {spec}: {exc}") from None
                self.workers[fingerprint] = worker
            self._spec_workers[spec] = worker
        if isinstance(worker, VisionWorker) != vision:
            raise ServiceError(400, f"model {spec} is served as a {'vision' if not vision else 'text'} model "
                                    f"here; an {'image' if vision else 'text'} advisor cannot share it")
        return worker

    def ensure_loaded(self, advisor: str, version: str, worker: ModelWorker) -> None:
        """Verify (checksums, base fingerprint) and load a version on its worker, once."""
        if (advisor, version) in worker.versions:
            return
        try:
            path = self.registry.resolve(advisor, version, worker.fingerprint)
            worker.load(advisor, version, path)
        except (RegistryError, EngineError) as exc:
            raise ServiceError(409, f"refused {advisor} {version}: {exc}") from None
        self._event("loaded", advisor=advisor, version=version)

    def apply(self, advisor: str, route: AdvisorRoute | None = None) -> Plan:
        """Resolve an advisor's route (aliases -> versions), load what it needs, then switch to
        it in one assignment. On any failure the old plan keeps serving."""
        with self.lock:
            contract = self.contracts.get(advisor)
            if contract is None:
                raise ServiceError(404, f"unknown advisor {advisor!r} (known: {', '.join(sorted(self.contracts))})")
            route = route or self.route_for(advisor)
            arms = tuple(ResolvedArm(a.name, a.version, self._ref(advisor, a.version), a.weight) for a in route.arms)
            if not arms:
                raise ServiceError(400, f"{advisor}: the route has no arms")
            production = self._production(advisor)
            fallback_version = {"production": production, "base": None, "none": None}[route.fallback]
            spec = route.model or self.cfg.model
            if spec is None:
                version = next((a.version for a in arms if a.version), production)
                if version is None:
                    raise ServiceError(400, f"{advisor}: name the base model (route `model:` or --model)")
                spec = self.registry.show(advisor, version).card.base_model
            worker = self._worker(spec, vision=contract.input_kind == "image")
            plan = Plan(advisor, arms, self._ref(advisor, route.shadow), route.sticky, route.fallback,
                        fallback_version, route.max_tokens)
            for version in sorted(plan.versions()):
                self.ensure_loaded(advisor, version, worker)
            if self.cfg.db_path:
                record_routing(self.cfg.db_path, plan.routing_id, advisor, plan.describe())
            self.served[advisor] = Served(plan, worker, contract, route)
            self._event("plan", advisor=advisor, routing_id=plan.routing_id,
                        arms={a.name: a.version or "base" for a in arms})
            return plan

    def activate(self, advisor: str, ref: str, alias: str = "production") -> dict:
        with self.lock:
            served = self._served(advisor)
            version = self._ref(advisor, ref)
            self.ensure_loaded(advisor, version, served.worker)  # smoke-tested before anything moves
            previous = self.registry.aliases(advisor).get(alias)
            try:
                self.registry.set_alias(advisor, alias, version)
            except RegistryError as exc:
                raise ServiceError(400, str(exc)) from None
            plan = self.apply(advisor, served.route)
            return {"advisor": advisor, "alias": alias, "version": version, "previous": previous,
                    "routing_id": plan.routing_id}

    def rollback(self, advisor: str, alias: str = "production") -> dict:
        with self.lock:
            served = self._served(advisor)
            try:
                target = self.registry.rollback_target(advisor, alias)
            except RegistryError as exc:
                raise ServiceError(409, str(exc)) from None
            self.ensure_loaded(advisor, target, served.worker)
            try:
                version = self.registry.rollback(advisor, alias)
            except RegistryError as exc:
                raise ServiceError(409, str(exc)) from None
            plan = self.apply(advisor, served.route)
            return {"advisor": advisor, "alias": alias, "version": version, "routing_id": plan.routing_id}

    def reload(self) -> dict:
        """Re-read the routing file and re-plan every advisor; all or nothing."""
        with self.lock:
            if not self.cfg.routing_path:
                raise ServiceError(400, "the service was started without a routing file")
            try:
                routing = load_routing(self.cfg.routing_path)
                old = self.routing
                self.routing = routing
                try:
                    plans = {name: self.apply(name) for name in
                             list(routing.advisors) + [a for a in self.served if a not in routing.advisors]}
                except Exception:
                    self.routing = old
                    for name in list(self.served):
                        self.apply(name)
                    raise
            except (ConfigError, ServiceError, RegistryError) as exc:
                msg = exc.message if isinstance(exc, ServiceError) else str(exc)
                self.last_reload = {"at": now_iso(), "ok": False, "error": msg}
                self._event("reload-refused", error=msg)
                raise ServiceError(409, f"routing reload refused, the old plan keeps serving: {msg}") from None
            self.last_reload = {"at": now_iso(), "ok": True}
            return {name: p.routing_id for name, p in plans.items()}

    def _watch(self) -> None:
        path = Path(self.cfg.routing_path)
        while not self._stop.wait(self.cfg.poll_s):
            try:
                mtime = path.stat().st_mtime
            except OSError:
                continue
            if mtime != self.routing_mtime:
                self.routing_mtime = mtime
                try:
                    self.reload()
                except ServiceError:
                    pass  # recorded in last_reload / events

    def _served(self, advisor: str) -> Served:
        served = self.served.get(advisor)
        if served is None:
            raise ServiceError(404, f"advisor {advisor!r} is not served here (served: {', '.join(sorted(self.served))})")
        return served

    def state(self) -> dict:
        return {
            "advisors": {name: {"plan": s.plan.describe(), "routing_id": s.plan.routing_id,
                                "model": s.worker.name, "base_fingerprint": s.worker.fingerprint}
                         for name, s in self.served.items()},
            "models": {w.name: {"fingerprint": fp, "loaded": {f"{a}@{v}": lv.slot for (a, v), lv in w.versions.items()},
                                **w.stats()} for fp, w in self.workers.items()},
            "last_reload": self.last_reload, "events": self.events[-20:],
        }

    # ---- answering

    def _check(self, contract: Advisor, text: str) -> tuple[object, bool, str | None]:
        try:
            obj = loads_strict(text)
        except ValueError as exc:
            return None, False, f"not JSON: {exc}"
        problems = contract.violations(obj)
        return obj, not problems, "; ".join(map(str, problems[:3])) or None

    async def answer(self, advisor: str, text: str, *, user: str | None = None, endpoint: str = "analyze",
                     pin: str | None = None, max_tokens: int | None = None, image: bytes | None = None) -> dict:
        """Route, decode, check and record one request. Text advisors take `text`; image
        advisors take `image` (the uploaded bytes) and optional `text` beside it."""
        t0, received = time.perf_counter(), now_iso()
        served = self._served(advisor)
        vision = isinstance(served.worker, VisionWorker)
        if vision and image is None:
            raise ServiceError(400, f"advisor {advisor} takes an image: upload it as the multipart field 'image' "
                                    "(or an image_url data URL in a chat message)")
        # decoding checks the image off the event loop (a large one takes a while)
        image_sha256 = await asyncio.to_thread(_image_sha256, image) if image is not None else None
        if not vision and image is not None:  # corrupt bytes got their own 400 first
            raise ServiceError(400, f"advisor {advisor} takes text; send the question as 'text', not an image")
        text = text or ""
        if not isinstance(text, str) or (not vision and not text.strip()):
            raise ServiceError(400, "the input text is empty")
        if len(text) > self.cfg.max_input_chars:
            raise ServiceError(413, f"input text is {len(text)} characters; the limit is {self.cfg.max_input_chars}")
        if max_tokens is not None and (not isinstance(max_tokens, int) or not 1 <= max_tokens <= 4096):
            raise ServiceError(400, f"max_tokens {max_tokens!r} must be an integer in 1..4096")
        plan, worker, contract = served.plan, served.worker, served.advisor
        raw_key = {"user": user, "image": image_sha256}.get(plan.sticky)
        sticky_key = hashlib.sha256(raw_key.encode()).hexdigest() if raw_key and plan.sticky == "user" else raw_key
        if pin is not None:
            version = self._ref(advisor, None if pin == "base" else pin)
            if version:
                await asyncio.to_thread(self.ensure_loaded, advisor, version, worker)
            arm = ResolvedArm("pinned", pin, version, 0.0)
        else:
            arm = plan.assign(raw_key)
        if vision:  # image first, then any text: how mondrian/dataset/build.py writes the training rows
            parts = [{"type": "image"}] + ([{"type": "text", "text": text}] if text.strip() else [])
            prompt = VisionRequest(worker.vision_prompt([{"role": "system", "content": contract.system_prompt},
                                                         {"role": "user", "content": parts}]), image)
        else:
            prompt = worker.prompt_tokens([{"role": "system", "content": contract.system_prompt},
                                           {"role": "user", "content": text}])
            if len(prompt) > self.cfg.max_prompt_tokens:
                raise ServiceError(413, f"the prompt is {len(prompt)} tokens; the limit is {self.cfg.max_prompt_tokens}")
        limit = max_tokens or plan.max_tokens
        request_id = f"req-{uuid.uuid4().hex}"

        async def run(version: str | None):
            fut = worker.submit((advisor, version) if version else None, prompt, limit)
            return await asyncio.wrap_future(fut)

        ans, error, obj, ok, why = None, None, None, None, None
        try:
            ans = await run(arm.version)
            obj, ok, why = self._check(contract, ans.generation.text)
        except Exception as exc:  # noqa: BLE001 - recorded, then fallback or 500
            error = f"{type(exc).__name__}: {exc}"
        final, fallback, fallback_reason = ans, None, None
        target = plan.fallback_version
        if (error or not ok) and plan.fallback != "none" and target != arm.version and pin is None:
            fallback_reason = f"error: {error}" if error else f"contract: {why}"
            try:
                final = await run(target)
                obj, _, _ = self._check(contract, final.generation.text)
                fallback = plan.fallback if target else "base"
            except Exception as exc:  # noqa: BLE001
                error = (error or "") + f"; fallback failed: {type(exc).__name__}: {exc}"
                final = None
        status = 200 if final is not None else 500
        latency_ms = (time.perf_counter() - t0) * 1000
        row = {
            "request_id": request_id, "received_at": received, "advisor": advisor, "endpoint": endpoint,
            "arm": arm.name, "assigned_version": arm.version,
            "served_version": final.version if final is not None else None,
            "base_model": worker.name, "base_fingerprint": worker.fingerprint, "routing_id": plan.routing_id,
            "sticky_key": sticky_key, "shadow_of": None, "status": status,
            "contract_ok": None if ans is None else int(bool(ok)), "fallback": fallback,
            "fallback_reason": fallback_reason, "error": error, "latency_ms": latency_ms,
            "queue_ms": ans.queue_s * 1000 if ans else None, "prompt_tokens": ans.prompt_tokens if ans else (None if vision else len(prompt)),
            "completion_tokens": final.generation.tokens if final is not None else None,
        }
        if plan.shadow and pin is None:
            self._shadow(served, plan, request_id, prompt, limit, received, sticky_key)
        await asyncio.wrap_future(self.log.submit(row))  # committed before the answer leaves
        if final is None:
            raise ServiceError(500, f"{advisor}: generation failed ({error}); request {request_id}")
        return {"request_id": request_id, "advisor": advisor, "arm": arm.name,
                "version": final.version, "answer": obj, "text": final.generation.text,
                "contract_ok": bool(ok), "fallback": fallback, "finish_reason": final.generation.finish_reason,
                "latency_ms": round(latency_ms, 3),
                "usage": {"prompt_tokens": final.prompt_tokens, "completion_tokens": final.generation.tokens,
                          "total_tokens": final.prompt_tokens + final.generation.tokens}}

    def _shadow(self, served: Served, plan: Plan, request_id: str, prompt: list[int] | VisionRequest, limit: int,
                received: str, sticky_key: str | None) -> None:
        """The shadow version answers too, off the request path; only its row is kept."""
        t0 = time.perf_counter()
        fut = served.worker.submit((plan.advisor, plan.shadow), prompt, limit)

        def done(f):
            row = {"request_id": f"{request_id}:shadow", "received_at": received, "advisor": plan.advisor,
                   "endpoint": "shadow", "arm": "shadow", "assigned_version": plan.shadow,
                   "served_version": None, "base_model": served.worker.name,
                   "base_fingerprint": served.worker.fingerprint, "routing_id": plan.routing_id,
                   "sticky_key": sticky_key, "shadow_of": request_id,
                   "latency_ms": (time.perf_counter() - t0) * 1000}
            try:
                a = f.result()
                _, ok, _ = self._check(served.advisor, a.generation.text)
                row |= {"status": 200, "served_version": a.version, "contract_ok": int(ok),
                        "prompt_tokens": a.prompt_tokens, "completion_tokens": a.generation.tokens,
                        "queue_ms": a.queue_s * 1000}
            except Exception as exc:  # noqa: BLE001
                row |= {"status": 500, "error": f"{type(exc).__name__}: {exc}"}
            self.log.submit(row)

        fut.add_done_callback(done)


# ---------------------------------------------------------------------------------------------
# HTTP


def _image_sha256(data: bytes, limit_pixels: int = 40_000_000) -> str:
    """Check that the bytes are a decodable image (corrupt bytes -> 400) and return their sha256."""
    from PIL import Image

    if not data:
        raise ServiceError(400, "the image is empty")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > limit_pixels:
                raise ServiceError(413, f"the image is {im.width}x{im.height}; the limit is {limit_pixels} pixels")
            im.verify()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except ServiceError:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow raises many kinds for corrupt bytes
        raise ServiceError(400, f"the image bytes are not a readable image ({type(exc).__name__}: {exc})") from None
    return hashlib.sha256(data).hexdigest()


def _data_url(image_url, where: str) -> bytes:
    """The bytes of an OpenAI `image_url` part given as a base64 data URL (the service fetches
    nothing from the network)."""
    import base64
    import binascii

    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str) or not url.startswith("data:") or ";base64," not in url:
        raise ServiceError(400, f"{where}: image_url must be a base64 data URL (data:image/png;base64,...); "
                                "the service does not fetch URLs")
    try:
        return base64.b64decode(url.split(";base64,", 1)[1], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ServiceError(400, f"{where}: image_url is not valid base64 ({exc})") from None


def create_app(service: Service) -> FastAPI:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_app):
        yield
        service.close()  # uvicorn re-raises SIGTERM after shutdown: close here, not after run()

    app = FastAPI(title="mondrian advisor service", lifespan=lifespan)

    def error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
        # OpenAI's error shape, so the openai client raises a typed error with our message
        return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)

    @app.exception_handler(ServiceError)
    async def _service_error(_request, exc: ServiceError):
        return error(exc.status, exc.message, "server_error" if exc.status >= 500 else "invalid_request_error")

    @app.exception_handler(RequestValidationError)
    async def _validation(_request, exc: RequestValidationError):
        return error(422, "malformed request: " + "; ".join(
            f"{'.'.join(map(str, e.get('loc', [])))}: {e.get('msg')}" for e in exc.errors()[:5]))

    @app.middleware("http")
    async def _limit_body(request: Request, call_next):
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > service.cfg.max_body_bytes):
            return error(413, f"the body is {size} bytes; the limit is {service.cfg.max_body_bytes}")
        return await call_next(request)

    async def read_json(request: Request) -> dict:
        body = await request.body()
        if len(body) > service.cfg.max_body_bytes:
            raise ServiceError(413, f"the body is {len(body)} bytes; the limit is {service.cfg.max_body_bytes}")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ServiceError(400, f"the body is not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ServiceError(400, "the body must be a JSON object")
        return data

    def field(data: dict, name: str, kind, required: bool = False, default=None):
        if name not in data or data[name] is None:
            if required:
                raise ServiceError(400, f"field '{name}' is required")
            return default
        value = data[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise ServiceError(400, f"field '{name}' must be {names}, got {type(value).__name__}")
        return value

    def admin(request: Request) -> None:
        token = service.cfg.admin_token
        if not token:
            raise ServiceError(403, "admin endpoints are off: start the service with --admin-token "
                                    "(or MONDRIAN_ADMIN_TOKEN)")
        got = request.headers.get("authorization", "")
        if not got.startswith("Bearer ") or not hmac.compare_digest(got[7:].encode(), token.encode()):
            raise ServiceError(401, "admin endpoints need 'Authorization: Bearer <token>'")

    @app.get("/health")
    async def health():
        return {"status": "ok", "advisors": sorted(service.served),
                "models": [w.name for w in service.workers.values()]}

    @app.get("/v1/models")
    async def models():
        data = []
        for name, s in sorted(service.served.items()):
            data.append({"id": name, "object": "model", "created": 0, "owned_by": "mondrian",
                         "base_model": s.worker.name})
            for v in service.registry.list(name):
                data.append({"id": f"{name}@{v.version}", "object": "model", "created": 0,
                             "owned_by": "mondrian", "aliases": list(v.aliases)})
        return {"object": "list", "data": data}

    @app.post("/v1/advisors/{advisor}/analyze")
    async def analyze(advisor: str, request: Request):
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            try:
                form = await request.form()
            except Exception as exc:  # noqa: BLE001
                raise ServiceError(400, f"malformed multipart body ({exc})") from None
            text, user, pin = form.get("text"), form.get("user"), form.get("version")
            upload = form.get("image")
            image = await upload.read() if upload is not None and hasattr(upload, "read") else None
            if image is None and not isinstance(text, str):
                raise ServiceError(400, "a form needs a 'text' field or an 'image' file")
            try:
                max_tokens = int(form["max_tokens"]) if form.get("max_tokens") is not None else None
            except ValueError:
                raise ServiceError(400, f"max_tokens {form.get('max_tokens')!r} must be an integer") from None
            return await service.answer(advisor, text if isinstance(text, str) else None,
                                        user=user if isinstance(user, str) else None, max_tokens=max_tokens,
                                        pin=pin if isinstance(pin, str) else None, image=image)
        else:
            data = await read_json(request)
            unknown = sorted(set(data) - {"text", "user", "max_tokens", "version"})
            if unknown:
                raise ServiceError(400, f"unknown field(s) {', '.join(unknown)} (known: max_tokens, text, user, version)")
            text = field(data, "text", str, required=True)
            user = field(data, "user", str)
            max_tokens = field(data, "max_tokens", int)
            pin = field(data, "version", str)
            return await service.answer(advisor, text, user=user, max_tokens=max_tokens, pin=pin)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        data = await read_json(request)
        model = field(data, "model", str, required=True)
        messages = field(data, "messages", list, required=True)
        if data.get("stream"):
            raise ServiceError(400, "stream=true is not supported; ask without streaming")
        temperature = field(data, "temperature", (int, float), default=0)
        if temperature != 0:
            raise ServiceError(400, "only greedy decoding is served (temperature 0): answers must be reproducible")
        n = field(data, "n", int, default=1)
        if n != 1:
            raise ServiceError(400, "n must be 1")
        max_tokens = field(data, "max_tokens", int) or field(data, "max_completion_tokens", int)
        user = field(data, "user", str)
        advisor, _, pin = model.partition("@")
        if advisor not in service.served:
            raise ServiceError(404, f"model {model!r}: no such advisor served here "
                                    f"(models: {', '.join(sorted(service.served))}; pin a version as advisor@vN)")
        texts, images = [], []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise ServiceError(400, f"messages[{i}] must be an object with role system, user or assistant")
            if m["role"] == "user":
                content = m.get("content")
                if isinstance(content, list):  # OpenAI content parts: text, and images as data URLs
                    images = [_data_url(p.get("image_url"), f"messages[{i}]") for p in content
                              if isinstance(p, dict) and p.get("type") == "image_url"] or images
                    content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
                if not isinstance(content, str):
                    raise ServiceError(400, f"messages[{i}].content must be a string or a list of content parts")
                texts.append(content)
        if not texts:
            raise ServiceError(400, "messages has no user message")
        if len(images) > 1:
            raise ServiceError(400, "one image per request")
        out = await service.answer(advisor, texts[-1], user=user, endpoint="chat", pin=pin or None,
                                   max_tokens=max_tokens, image=images[0] if images else None)
        usage = out["usage"]
        return {
            "id": f"chatcmpl-{out['request_id'][4:]}", "object": "chat.completion", "created": int(time.time()),
            "model": f"{advisor}@{out['version'] or 'base'}",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": out["text"]},
                         "finish_reason": "length" if out["finish_reason"] == "length" else "stop",
                         "logprobs": None}],
            "usage": usage,
            "mondrian": {k: out[k] for k in ("request_id", "arm", "version", "contract_ok", "fallback")},
        }

    # ---- admin

    @app.get("/admin/state")
    async def admin_state(request: Request):
        admin(request)
        return service.state()

    @app.post("/admin/advisors/{advisor}/load")
    async def admin_load(advisor: str, request: Request):
        admin(request)
        data = await read_json(request)
        served = service._served(advisor)
        version = service._ref(advisor, field(data, "version", str, required=True))
        await asyncio.to_thread(service.ensure_loaded, advisor, version, served.worker)
        return {"advisor": advisor, "version": version, "loaded": True}

    @app.post("/admin/advisors/{advisor}/activate")
    async def admin_activate(advisor: str, request: Request):
        admin(request)
        data = await read_json(request)
        ref = field(data, "version", str, required=True)
        alias = field(data, "alias", str, default="production")
        return await asyncio.to_thread(service.activate, advisor, ref, alias)

    @app.post("/admin/advisors/{advisor}/rollback")
    async def admin_rollback(advisor: str, request: Request):
        admin(request)
        data = await read_json(request) if int(request.headers.get("content-length") or 0) else {}
        return await asyncio.to_thread(service.rollback, advisor, field(data, "alias", str, default="production"))

    @app.post("/admin/reload")
    async def admin_reload(request: Request):
        admin(request)
        return {"routing_ids": await asyncio.to_thread(service.reload)}

    return app


def run_server(service: Service, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning",
               ready: Callable[[int], None] | None = None) -> None:
    """Serve until SIGINT/SIGTERM. `ready(port)` is called once the socket listens."""
    import signal
    import socket

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)  # connections wait in the backlog until uvicorn accepts
    config = uvicorn.Config(create_app(service), log_level=log_level, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    if ready:
        ready(sock.getsockname()[1])
    # uvicorn re-raises the SIGINT/SIGTERM it caught once it has shut down; these handlers take
    # that re-raise, so the shutdown finishes here (service closed, log flushed) and not by signal
    main = threading.current_thread() is threading.main_thread()  # (uvicorn handles no signals elsewhere)
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        server.run(sockets=[sock])
    finally:
        service.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
