"""The service's control plane: which versions each advisor serves, on which worker.

The registry's aliases steer it: `activate` loads and smoke-tests the version on the model's
worker first and only then moves the alias (default `production`) and re-plans the advisor;
`rollback` does the same for the alias's previous version. The routing file is re-read when
it changes (polled), without a restart; a file or version that fails keeps the old plan
serving and is reported in `/admin/state`. One worker per base model holds every loaded
version in a LoRA slot; a version a plan routes to is never evicted. A route with a rollout
policy gets its arms' weights from the rollout's current step, and a background thread moves
it along (`mondrian.serve.rollout`).

`mondrian.serve.service.Service` adds the request path on top.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mondrian.core.config import ConfigError
from mondrian.core.contracts import Advisor, read_prompt
from mondrian.core.retrieval import INDEX_FILE, RetrievalError, RetrievalIndex
from mondrian.models.constrained import SchemaConstraint
from mondrian.models.decode import GenerationError
from mondrian.registry.records import RegistryError
from mondrian.registry.store import Registry
from mondrian.serve.config import ServiceConfig
from mondrian.serve.engine import EngineError, ModelWorker
from mondrian.serve.errors import ServiceError
from mondrian.serve.requests_log import (
    now_iso,
    record_routing,
)
from mondrian.serve.rollout import Judge, Rollouts
from mondrian.serve.routing import AdvisorRoute, Arm, Plan, ResolvedArm, RoutingConfig, load_routing
from mondrian.serve.vision import VisionWorker

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


class ControlPlane:
    def __init__(self, cfg: ServiceConfig, resolve_model: ModelResolver, advisors: dict[str, Advisor],
                 judge: Judge | None = None):
        self.cfg, self.resolve_model, self.contracts = cfg, resolve_model, advisors
        evidence = list(dict.fromkeys(str(p) for p in [cfg.db_path, *cfg.rollout_evidence] if p))
        self.rollouts = (Rollouts(cfg.rollout_db or cfg.db_path, judge, evidence)
                         if judge is not None and cfg.db_path else None)
        self.registry = Registry(cfg.registry_root)
        self.workers: dict[str, ModelWorker] = {}  # by base-model fingerprint
        self._spec_workers: dict[str, ModelWorker] = {}
        self.served: dict[str, Served] = {}
        self._constraints: dict[tuple[str, str], SchemaConstraint] = {}
        # (advisor, version) -> what the version was trained with: its retrieval index, and the
        # contract asking with its pinned prompt (derived once, at load; a version published
        # before prompts were pinned is asked with the advisor's current prompt)
        self._indexes: dict[tuple[str, str], RetrievalIndex | None] = {}
        self._asked: dict[tuple[str, str], Advisor] = {}
        self._pending: set[tuple[str, str]] = set()  # a plan's versions while apply() loads them
        self.routing = RoutingConfig()
        self.routing_mtime: float | None = None
        self.last_reload: dict = {}
        self.events: list[dict] = []
        self.lock = threading.RLock()  # plan changes (admin, reloads) one at a time
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
        if self.rollouts is not None:
            threading.Thread(target=self._roll, name="rollout", daemon=True).start()

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        for w in self.workers.values():
            w.close()

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
                                           max_versions=self.cfg.max_versions,
                                           prefix_cache_mb=self.cfg.prefix_cache_mb))
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
            index = RetrievalIndex.load(path / INDEX_FILE) if (path / INDEX_FILE).is_file() else None
            pinned = read_prompt(path)
            asked = self.contracts[advisor].asked_as(pinned)  # refused here if another advisor's
            asked.shown("1 mw")  # loads what rewriting needs (text2num) before a request does
            if index is not None:  # fitted now, compared as this version's prompts show questions
                if asked.input_spelling:
                    index.speller.warm()
                index.viewed_by(asked).fit()
            worker.load(advisor, version, path)
            self._indexes[(advisor, version)], self._asked[(advisor, version)] = index, asked
        except (RegistryError, EngineError, RetrievalError, ConfigError) as exc:
            raise ServiceError(409, f"refused {advisor} {version}: {exc}") from None
        self._event("loaded", advisor=advisor, version=version,
                    prompt="pinned" if pinned else "not pinned: the advisor's current prompt")

    def apply(self, advisor: str, route: AdvisorRoute | None = None) -> Plan:
        """Resolve an advisor's route (aliases -> versions), load what it needs, then switch to
        it in one assignment. On any failure the old plan keeps serving."""
        with self.lock:
            contract = self.contracts.get(advisor)
            if contract is None:
                raise ServiceError(404, f"unknown advisor {advisor!r} (known: {', '.join(sorted(self.contracts))})")
            route = route or self.route_for(advisor)
            weights = self._rollout_weights(advisor, route)
            arms = tuple(ResolvedArm(a.name, a.version, self._ref(advisor, a.version), weights.get(a.name, a.weight))
                         for a in route.arms)
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

    def _rollout_weights(self, advisor: str, route: AdvisorRoute) -> dict[str, float]:
        """Arm weights a rollout sets (its current step's share), or {} for a plain route."""
        r = route.rollout
        if r is None:
            return {}
        if self.rollouts is None:
            raise ServiceError(400, f"{advisor}: a rollout needs a requests database (--db) and the A/B judge")
        share = self.rollouts.state(advisor, route).share
        return {r.candidate: share, r.control: 100.0 - share}

    def _roll(self) -> None:
        """Check every rollout on its schedule; re-plan when its share (or production) moved."""
        due: dict[str, float] = {}
        while not self._stop.wait(0.2):
            for advisor, served in list(self.served.items()):
                r = served.route.rollout
                if r is None or time.monotonic() < due.get(advisor, 0.0):
                    continue
                due[advisor] = time.monotonic() + r.check_every_s
                try:
                    self._roll_one(advisor, served)
                except Exception as exc:  # noqa: BLE001 - a failed check is reported; serving goes on
                    self._event("rollout-check-failed", advisor=advisor, error=f"{type(exc).__name__}: {exc}")

    def _roll_one(self, advisor: str, served: Served) -> None:
        r = served.route.rollout
        candidate = next(a for a in served.plan.arms if a.name == r.candidate)
        st = self.rollouts.check(advisor, served.route, candidate.version,
                                 lambda version: self.registry.set_alias(advisor, "production", version))
        if st.share != candidate.weight or (st.status == "promoted" and self._production(advisor) not in
                                            {a.version for a in served.plan.arms if a.name == r.control}):
            self.apply(advisor, served.route)
            self._event("rollout", advisor=advisor, action=st.action, share=st.share, reason=st.reason)

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
