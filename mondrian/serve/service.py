"""The advisor service: the engine's workers behind A/B routing, fallback, shadow and the
request log; `mondrian.serve.app` puts it behind FastAPI (routes: `mondrian.serve.http`).

A request (`Service.answer`) names an advisor and optionally pins a version (alias or vN);
it is answered with the parsed object, the arm, the version that served it and whether it
met the advisor's contract. `/v1/chat/completions` is the OpenAI-compatible form of the same.

The registry's aliases are the control plane: `activate` loads and smoke-tests the version on
the model's worker first and only then moves the alias (default `production`) and re-plans
the advisor; `rollback` does the same for the alias's previous version. The routing file is
re-read when it changes (polled), without a restart; a file or version that fails keeps the
old plan serving and is reported in `/admin/state`.

Prompts are built per version by `mondrian.core.retrieval.prompt_messages`: a version whose
folder holds a retrieval index (it was trained with one) shows its k nearest examples, the
base and versions without one show none; the row records which examples the answer saw.

Every routed request's row is committed to the `requests` table before its answer is sent
(`mondrian.serve.requests_log`, group commit), so an answered request survives a kill -9.
The service never imports `lora`: the CLI hands it a model resolver.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mondrian.core.config import ConfigError
from mondrian.core.contracts import Advisor, loads_strict
from mondrian.core.db import create_request_tables
from mondrian.core.retrieval import INDEX_FILE, RetrievalError, RetrievalIndex
from mondrian.models.constrained import SchemaConstraint
from mondrian.models.generation import GenerationError
from mondrian.registry.records import RegistryError
from mondrian.registry.store import Registry
from mondrian.serve.config import ServiceConfig
from mondrian.serve.engine import Answer, EngineError, ModelWorker
from mondrian.serve.errors import ServiceError
from mondrian.serve.prompts import Prompts
from mondrian.serve.requests_log import RequestLog, now_iso, record_routing
from mondrian.serve.routing import AdvisorRoute, Arm, Plan, ResolvedArm, RoutingConfig, load_routing
from mondrian.serve.uploads import checked_input
from mondrian.serve.vision import VisionWorker

log = logging.getLogger("mondrian.serve")

# spec -> (name, folder, fingerprint); given by the CLI (mondrian.models.sources.resolve) or a test
ModelResolver = Callable[[str], tuple[str, Path, str]]


@dataclass
class Served:
    plan: Plan
    worker: ModelWorker
    advisor: Advisor
    route: AdvisorRoute
    constraint: SchemaConstraint | None = None  # the contract's grammar; None = free decoding

    def processor(self) -> Callable | None:
        """A fresh logits processor for one request (each holds its own grammar state)."""
        return self.constraint.processor() if self.constraint else None


@dataclass
class _Outcome:
    """What decoding one request came to: the assigned arm's answer (None: it failed), the
    answer returned (after a fallback, if any), its parsed object and contract check."""

    first: Answer | None = None
    final: Answer | None = None
    obj: object = None
    ok: bool | None = None
    error: str | None = None
    fallback: str | None = None
    fallback_reason: str | None = None


class Service:
    def __init__(self, cfg: ServiceConfig, resolve_model: ModelResolver, advisors: dict[str, Advisor]):
        self.cfg, self.resolve_model, self.contracts = cfg, resolve_model, advisors
        self.registry = Registry(cfg.registry_root)
        self.workers: dict[str, ModelWorker] = {}  # by base-model fingerprint
        self._spec_workers: dict[str, ModelWorker] = {}
        self.served: dict[str, Served] = {}
        self._constraints: dict[tuple[str, str], SchemaConstraint] = {}
        self._indexes: dict[tuple[str, str], RetrievalIndex | None] = {}  # (advisor, version)
        self._pending: set[tuple[str, str]] = set()  # a plan's versions while apply() loads them
        self.routing = RoutingConfig()
        self.routing_mtime: float | None = None
        self.last_reload: dict = {}
        self.events: list[dict] = []
        self.lock = threading.RLock()  # plan changes (admin, reloads) one at a time
        self.log = RequestLog(cfg.db_path) if cfg.db_path else RequestLog.disabled()
        if cfg.db_path:
            create_request_tables(cfg.db_path)
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
                worker = (VisionWorker(name, path, fingerprint, max_versions=self.cfg.max_versions) if vision
                          else ModelWorker(name, path, fingerprint, max_batch=self.cfg.max_batch,
                                           max_versions=self.cfg.max_versions))
                worker.keep = lambda w=worker: self._kept(w)
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
            index = RetrievalIndex.load(path / INDEX_FILE).fit() if (path / INDEX_FILE).is_file() else None
            worker.load(advisor, version, path)
            self._indexes[(advisor, version)] = index
        except (RegistryError, EngineError, RetrievalError) as exc:
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
            needed = {(advisor, v) for v in plan.versions() | {production} if v}
            others = self._kept(worker, but=advisor)
            if len(needed | others) > worker.max_versions:
                raise ServiceError(409, f"{advisor}: the plan needs {len(needed | others)} versions loaded on "
                                        f"{worker.name} ({len(needed)} its own); the limit is {worker.max_versions} "
                                        "(start the service with a larger --max-versions)")
            self._pending = needed  # kept while they load, before the plan is in self.served
            try:
                for version in sorted(plan.versions()):
                    self.ensure_loaded(advisor, version, worker)
            finally:
                self._pending = set()
            if self.cfg.db_path:
                record_routing(self.cfg.db_path, plan.routing_id, advisor, plan.describe())
            self.served[advisor] = Served(plan, worker, contract, route, self._constraint(contract, worker))
            self._event("plan", advisor=advisor, routing_id=plan.routing_id,
                        arms={a.name: a.version or "base" for a in arms})
            return plan

    def _kept(self, worker: ModelWorker | VisionWorker, but: str | None = None) -> set[tuple[str, str]]:
        """The versions a worker must keep loaded: every version a served plan routes to (arms,
        shadow, fallback) and each advisor's production, plus a plan being applied."""
        kept = set(self._pending) if but is None else set()
        for name, s in list(self.served.items()):
            if s.worker is worker and name != but:
                kept |= {(name, v) for v in s.plan.versions() | {self._production(name)} if v}
        return kept

    def _constraint(self, contract: Advisor, worker: ModelWorker | VisionWorker) -> SchemaConstraint | None:
        """The advisor's grammar on the worker's tokenizer, built once (~2 s) and kept; lists
        are capped by the contract's own maxItems and never repeat an item."""
        if not self.cfg.constrained or isinstance(worker, VisionWorker):
            return None
        key = (contract.fingerprint, worker.fingerprint)
        if key not in self._constraints:
            try:
                self._constraints[key] = SchemaConstraint(contract.schema, worker.tokenizer)
            except GenerationError as exc:
                raise ServiceError(400, f"advisor {contract.name}: {exc} (serve it with --unconstrained)") from None
        return self._constraints[key]

    def load_version(self, advisor: str, ref: str) -> str:
        """Verify and load `ref` (alias or vN) on the advisor's worker; returns the version."""
        served = self.serving(advisor)
        version = self._ref(advisor, ref)
        self.ensure_loaded(advisor, version, served.worker)
        return version

    def activate(self, advisor: str, ref: str, alias: str = "production") -> dict:
        with self.lock:
            served = self.serving(advisor)
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
            served = self.serving(advisor)
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

    def serving(self, advisor: str) -> Served:
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

    async def answer(self, advisor: str, text: str | None, *, user: str | None = None, endpoint: str = "analyze",
                     pin: str | None = None, max_tokens: int | None = None, image: bytes | None = None) -> dict:
        """Route, decode, check and record one request. Text advisors take `text`; image
        advisors take `image` (the uploaded bytes) and optional `text` beside it."""
        t0, received = time.perf_counter(), now_iso()
        served = self.serving(advisor)
        if self.log.problem:  # known already: refuse before spending a decode on it
            raise ServiceError(503, f"{self.log.problem}; requests are refused until the service restarts")
        vision = isinstance(served.worker, VisionWorker)
        text, image_key = await checked_input(advisor, vision, text, image, max_tokens, self.cfg.max_input_chars,
                                              user=user, pin=pin)
        plan, worker = served.plan, served.worker
        raw_key = {"user": user, "image": image_key}.get(plan.sticky)
        sticky_key = hashlib.sha256(raw_key.encode()).hexdigest() if raw_key and plan.sticky == "user" else raw_key
        arm = await self._arm(served, pin, raw_key)
        prompts = Prompts(served.advisor, served.worker, text, image, self.cfg.max_prompt_tokens,
                          lambda version: self.index(advisor, version))
        prompts.get(arm.version)  # a prompt over the limit is the client's 413, before any decoding
        limit = max_tokens or plan.max_tokens
        request_id = f"req-{uuid.uuid4().hex}"
        out = await self._decode(served, arm, prompts, limit, may_fall_back=pin is None)
        ans, final = out.first, out.final
        latency_ms = (time.perf_counter() - t0) * 1000
        row = {
            "request_id": request_id, "received_at": received, "advisor": advisor, "endpoint": endpoint,
            "arm": arm.name, "assigned_version": arm.version,
            "served_version": final.version if final is not None else None,
            "base_model": worker.name, "base_fingerprint": worker.fingerprint, "routing_id": plan.routing_id,
            "sticky_key": sticky_key, "shadow_of": None, "status": 200 if final is not None else 500,
            "contract_ok": None if ans is None else int(bool(out.ok)), "fallback": out.fallback,
            "fallback_reason": out.fallback_reason, "error": out.error, "latency_ms": latency_ms,
            "queue_ms": ans.queue_s * 1000 if ans else None,
            "prompt_tokens": ans.prompt_tokens if ans else (None if vision else len(prompts.get(arm.version))),
            "completion_tokens": final.generation.tokens if final is not None else None,
            "constrained": int(served.constraint is not None),
            "examples": prompts.examples(final.version if final is not None else arm.version),
        }
        if plan.shadow and pin is None:
            self._shadow(served, plan, request_id, prompts, limit, received, sticky_key)
        await self._record(row)  # committed before the answer leaves
        if final is None:
            raise ServiceError(500, f"{advisor}: generation failed ({out.error}); request {request_id}")
        return {"request_id": request_id, "advisor": advisor, "arm": arm.name,
                "version": final.version, "answer": out.obj, "text": final.generation.text,
                "contract_ok": bool(out.ok), "fallback": out.fallback,
                "finish_reason": final.generation.finish_reason, "latency_ms": round(latency_ms, 3),
                "usage": {"prompt_tokens": final.prompt_tokens, "completion_tokens": final.generation.tokens,
                          "total_tokens": final.prompt_tokens + final.generation.tokens}}

    def problems(self) -> list[str]:
        """What keeps the service from answering and keeping what it answers (for /health)."""
        problem = self.log.check()
        return [problem] if problem else []

    async def _record(self, row: dict) -> None:
        """Commit the request's row, or refuse the request: an answer the log cannot keep is
        not acknowledged (503, and a log line, never a 200 for a lost row)."""
        try:
            await asyncio.wrap_future(self.log.submit(row))
        except Exception as exc:  # noqa: BLE001 - any row the log cannot keep (SQLite error, file gone)
            log.error("request %s not recorded: %s: %s", row["request_id"], type(exc).__name__, exc)
            raise ServiceError(503, f"request {row['request_id']} could not be recorded "
                                    f"({type(exc).__name__}: {exc}); its answer is withheld") from None

    async def _arm(self, served: Served, pin: str | None, raw_key: str | None) -> ResolvedArm:
        """The arm a request is assigned (by its sticky key), or the version it pins (loaded now)."""
        if pin is None:
            return served.plan.assign(raw_key)
        advisor = served.plan.advisor
        version = self._ref(advisor, None if pin == "base" else pin)
        if version:
            await asyncio.to_thread(self.ensure_loaded, advisor, version, served.worker)
        return ResolvedArm("pinned", pin, version, 0.0)

    def index(self, advisor: str, version: str | None) -> RetrievalIndex | None:
        """The retrieval index a loaded version was trained with (None: base, or none)."""
        return self._indexes.get((advisor, version)) if version else None

    async def _decode(self, served: Served, arm: ResolvedArm, prompts: Prompts, limit: int,
                      may_fall_back: bool) -> _Outcome:
        """The arm's answer, checked against the contract; on an error or a broken contract the
        plan's fallback answers instead (not for a pinned version)."""
        plan, contract = served.plan, served.advisor

        async def run(version: str | None) -> Answer:
            key = (plan.advisor, version) if version else None
            prompt = prompts.get(version)
            return await asyncio.wrap_future(served.worker.submit(key, prompt, limit, served.processor()))

        out, why = _Outcome(), None
        try:
            out.first = out.final = await run(arm.version)
            out.obj, out.ok, why = self._check(contract, out.first.generation.text)
        except Exception as exc:  # noqa: BLE001 - recorded, then fallback or 500
            out.error = f"{type(exc).__name__}: {exc}"
        target = plan.fallback_version
        if (out.error or not out.ok) and plan.fallback != "none" and target != arm.version and may_fall_back:
            out.fallback_reason = f"error: {out.error}" if out.error else f"contract: {why}"
            try:
                out.final = await run(target)
                out.obj, _, _ = self._check(contract, out.final.generation.text)
                out.fallback = plan.fallback if target else "base"
            except Exception as exc:  # noqa: BLE001
                out.error = (out.error or "") + f"; fallback failed: {type(exc).__name__}: {exc}"
                out.final = None
        return out

    def _shadow(self, served: Served, plan: Plan, request_id: str, prompts: Prompts, limit: int,
                received: str, sticky_key: str | None) -> None:
        """The shadow version answers too, off the request path; only its row is kept."""
        t0 = time.perf_counter()
        try:
            prompt = prompts.get(plan.shadow)
        except ServiceError:
            return  # the shadow's examples made the prompt too long: nothing to compare
        fut = served.worker.submit((plan.advisor, plan.shadow), prompt, limit, served.processor())

        def done(f):
            row = {"request_id": f"{request_id}:shadow", "received_at": received, "advisor": plan.advisor,
                   "endpoint": "shadow", "arm": "shadow", "assigned_version": plan.shadow,
                   "served_version": None, "base_model": served.worker.name,
                   "base_fingerprint": served.worker.fingerprint, "routing_id": plan.routing_id,
                   "sticky_key": sticky_key, "shadow_of": request_id,
                   "constrained": int(served.constraint is not None),
                   "examples": prompts.examples(plan.shadow),
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
