"""The advisor service: the engine's workers behind A/B routing, fallback, shadow, the request
log and feedback; `mondrian.serve.app` puts it behind FastAPI (routes: `mondrian.serve.http`).
Which versions serve is the control plane's job (`mondrian.serve.control`).

A request (`Service.answer`) names an advisor and optionally pins a version (alias or vN);
it is answered with the parsed object, the arm, the version that served it and whether it
met the advisor's contract. `/v1/chat/completions` is the OpenAI-compatible form of the same.

Prompts are built per version by `mondrian.core.retrieval.prompt_messages`: a version whose
folder holds a retrieval index (it was trained with one) shows its k nearest examples, the
base and versions without one show none; the row records which examples the answer saw. A
version is asked with the system prompt and input settings it was trained with (its prompt.json,
`Advisor.asked_as`); answers are checked against the advisor's contract as it is now.

Every routed request's row is committed to the `requests` table before its answer is sent
(`mondrian.serve.requests_log`, group commit), so an answered request survives a kill -9.
The row keeps the input and the answer as `log_payloads` says (full, hash or off); with
`full`, a request's image is kept once by its sha256 in the image store. Users' verdicts on
answers go to the `feedback` table (`mondrian.serve.feedback`).
The service never imports `lora`: the CLI hands it a model resolver.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from dataclasses import dataclass

from mondrian.core.contracts import Advisor, loads_strict
from mondrian.core.db import create_request_tables
from mondrian.core.image_store import ImageStore
from mondrian.core.retrieval import RetrievalIndex
from mondrian.serve.config import ServiceConfig
from mondrian.serve.control import ControlPlane, ModelResolver, Served
from mondrian.serve.engine import Answer
from mondrian.serve.errors import ServiceError
from mondrian.serve.feedback import FeedbackStore, Verdict
from mondrian.serve.prompts import Prompts
from mondrian.serve.requests_log import (
    RequestLog,
    now_iso,
    payload_fields,
)
from mondrian.serve.rollout import Judge
from mondrian.serve.routing import Plan, ResolvedArm
from mondrian.serve.uploads import checked_input
from mondrian.serve.vision import VisionWorker

log = logging.getLogger("mondrian.serve")


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


class Service(ControlPlane):
    def __init__(self, cfg: ServiceConfig, resolve_model: ModelResolver, advisors: dict[str, Advisor],
                 judge: Judge | None = None):
        super().__init__(cfg, resolve_model, advisors, judge)
        self.log = RequestLog(cfg.db_path) if cfg.db_path else RequestLog.disabled()
        self.images = ImageStore(cfg.images_folder()) if cfg.images_folder() else None
        self.feedback = FeedbackStore(cfg.db_path, advisors) if cfg.db_path else None
        if cfg.db_path:
            create_request_tables(cfg.db_path)

    def close(self) -> None:
        if self._stop.is_set():
            return
        super().close()
        self.log.close()
        if self.feedback is not None:
            self.feedback.close()

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
        prompts = Prompts(served.worker, text, image, self.cfg.max_prompt_tokens,
                          lambda version: self.asked(served.advisor, version))
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
        } | payload_fields(self.cfg.log_payloads, text, image_key, final.generation.text if final else None)
        if plan.shadow and pin is None:
            self._shadow(served, plan, request_id, prompts, limit, received, sticky_key, image_key)
        if image is not None and self.images is not None:  # the row never names an image not kept
            await asyncio.to_thread(self.images.keep, image, image_key)
        await self._record(row)  # committed before the answer leaves
        if final is None:
            raise ServiceError(500, f"{advisor}: generation failed ({out.error}); request {request_id}")
        return {"request_id": request_id, "advisor": advisor, "arm": arm.name,
                "version": final.version, "answer": out.obj, "text": final.generation.text,
                "contract_ok": bool(out.ok), "fallback": out.fallback,
                "finish_reason": final.generation.finish_reason, "latency_ms": round(latency_ms, 3),
                "usage": usage(final)}

    def record_feedback(self, request_id: str, verdict: Verdict) -> dict:
        if self.feedback is None:
            raise ServiceError(409, "this service records no requests (started with --db ''), so no feedback")
        return self.feedback.record(request_id, verdict)

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

    def asked(self, contract: Advisor, version: str | None) -> tuple[Advisor, RetrievalIndex | None]:
        """How a loaded version is asked: the contract with the prompt the version was trained
        with, and its retrieval index (the base: the contract as it is, no examples)."""
        if not version:
            return contract, None
        key = (contract.name, version)
        return self._asked.get(key, contract), self._indexes.get(key)

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
                received: str, sticky_key: str | None, image_key: str | None) -> None:
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
                answer = a.generation.text
            except Exception as exc:  # noqa: BLE001
                row |= {"status": 500, "error": f"{type(exc).__name__}: {exc}"}
                answer = None
            row |= payload_fields(self.cfg.log_payloads, prompts.text, image_key, answer)
            self.log.submit(row)

        fut.add_done_callback(done)


def usage(answer: Answer) -> dict:
    """OpenAI's usage object, with what the decoder saved: prompt tokens whose KV state came
    from the prefix cache (`prompt_tokens_details.cached_tokens`, OpenAI's own field), and
    the answer's model calls and grammar-forced tokens (ours)."""
    gen = answer.generation
    return {"prompt_tokens": answer.prompt_tokens, "completion_tokens": gen.tokens,
            "total_tokens": answer.prompt_tokens + gen.tokens,
            "prompt_tokens_details": {"cached_tokens": gen.prefix_hit},
            "completion_tokens_details": {"model_calls": gen.model_calls, "forced_tokens": gen.forced}}
