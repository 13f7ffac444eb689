"""`mondrian demo`: the whole pipeline, end to end, on the embedded default model.

demo data -> link -> dataset -> train -> eval -> publish -> serve -> A/B traffic with feedback
-> report, then the loop's second round: harvest -> link -> dataset -> retrain -> publish ->
A/B again.

Everything is real and small: a short training run (the quality run is `make train-full`), an
evaluation on part of the test split, a published version, a service on 127.0.0.1 that routes
new questions (fresh from the generator, so their answers are known) between the previous
production version (or the base model) and the new version, simulated users who accept a
right answer and correct a wrong one (POST /v1/requests/{id}/feedback), and the analyst's A/B
report read back from the same SQLite file. The second round harvests those verdicts into jobs,
retrains on the grown dataset, and runs the A/B again with the first version as production.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mondrian.ab.report import ab_report, format_report
from mondrian.core.contracts import get_advisor, load_advisors
from mondrian.core.workspace import load_workspace
from mondrian.dataset.build import build_dataset
from mondrian.demo.questions import generate
from mondrian.demo.workspace import write_demo_workspace
from mondrian.evaluate.report import EvalReport
from mondrian.evaluate.run import evaluate
from mondrian.link.harvest import harvest
from mondrian.link.linker import link_workspace
from mondrian.models.sources import ModelCard, resolve
from mondrian.registry.records import Version
from mondrian.registry.store import Registry
from mondrian.serve.app import run_server
from mondrian.serve.config import ServiceConfig
from mondrian.serve.requests_log import now_iso
from mondrian.serve.routing import AdvisorRoute, Arm
from mondrian.serve.service import Service
from mondrian.train.config import load_config
from mondrian.train.loop import TrainResult
from mondrian.train.run import train
from mondrian.train.runs import RunStore

# The LoRA recipe lives in the repository's lora/ folder (recipes are not Python).
CONFIG = Path(__file__).resolve().parents[2] / "lora" / "fit-query.yaml"
VAL_ROWS = 8  # validation rows at the first and last step (16 cost ~45 s of a demo)
ADVISOR = "fit-query"
TRAFFIC_SEED = 2026  # new questions for the A/B (the workspace's jobs use other seeds)


@dataclass
class DemoOptions:
    model: str = "smollm2-135m"
    folder: str = "workspace"
    registry: str | None = None  # registry root [$MONDRIAN_ADAPTERS or ./adapters]
    iters: int = 100  # steps of the recipe's batch (1); ~1.4-1.7 s each on 2 cores (3-example prompts)
    eval_limit: int = 32
    requests: int = 32  # A/B requests per round
    clients: int = 8  # concurrent: the service batches up to 8 rows
    max_tokens: int = 96  # above the longest right answer (Scotland's 16 areas, ~70 tokens): 64 cut it
    max_seq_length: int = 512
    rounds: int = 2  # 2: the loop's second round (harvest -> retrain -> A/B again)
    round2_iters: int = 36  # a short retrain, so make demo stays within 12 min


class _Steps:
    """Numbered step headings ("[3/9] link jobs -> manifest"); details go through `say`."""

    def __init__(self, say: Callable[[str], None], total: int = 9):
        self.say, self.total, self.done = say, total, 0

    def head(self, text: str) -> None:
        self.done += 1
        self.say(f"[{self.done}/{self.total}] {text}")


def _data(opts: DemoOptions, steps: _Steps, card: ModelCard) -> Path:
    """Demo workspace -> link -> dataset; returns the dataset folder."""
    say = steps.say
    root = Path(opts.folder)
    steps.head(f"demo workspace: {root}")
    info = write_demo_workspace(root, overwrite=True)
    say(f"      {info['jobs']} jobs with realistic defects")

    steps.head("link jobs -> manifest")
    ws = load_workspace(root)
    say(f"      {link_workspace(ws, progress=False).line()}")

    steps.head("dataset fit-query -> train/valid/test")
    data = root / "datasets" / ADVISOR
    report = build_dataset(root / "manifest", get_advisor(ADVISOR), data, data_root=ws.data_path,
                           tokenizer_path=card.path, max_seq_length=opts.max_seq_length)
    c = report.counts
    say(f"      train {c['train']}, valid {c['valid']}, test {c['test']}; "
        f"leakage check {'ok' if report.leakage.ok else 'FAILED'}")
    return data


def _train(opts: DemoOptions, steps: _Steps, card: ModelCard, data: Path, db: Path,
           run_dir: Path, init_adapter: Path | None = None) -> TrainResult:
    from mlx_lm.utils import load_config as model_config  # noqa: PLC0415 - heavy: mlx_lm import costs ~1 s; only a demo run needs it

    steps.head(f"train {ADVISOR}: {opts.iters} steps on {opts.model} "
               "(make train runs the full recipe)")
    layers = model_config(Path(card.path)).get("num_hidden_layers", 16)
    cfg = load_config(CONFIG, {"num_layers": min(16, layers), "model": opts.model,  # iters replans the schedule
                               "data": str(data), "adapter_path": str(run_dir),
                               "db": str(db), "iters": opts.iters, "steps_per_eval": opts.iters,
                               "save_every": opts.iters,
                               "max_seq_length": opts.max_seq_length,
                               "init_adapter": str(init_adapter) if init_adapter else None})
    cfg = replace(cfg, val_batches=max(1, VAL_ROWS // cfg.batch_size))
    result = train(cfg, progress=True)
    steps.say(f"      run {result.run_id}: {result.status}, validation loss "
              f"{result.first_val_loss:.3f} -> {result.best_val_loss:.3f} ({result.seconds:.0f} s)")
    return result


def _evaluate(opts: DemoOptions, steps: _Steps, data: Path, db: Path, run_dir: Path,
              run_id: str) -> tuple[EvalReport, dict[str, Any]]:
    """Base vs adapter on part of the test split; returns the report and its summary."""
    steps.head(f"evaluate base vs adapter on {opts.eval_limit} test rows (retrieved examples in "
               "every prompt, decoded under the contract, as the service does)")
    arms = ("base_constrained", "adapter_constrained")
    ev = evaluate(opts.model, run_dir, data, get_advisor(ADVISOR), limit=opts.eval_limit,
                  max_tokens=opts.max_tokens, db=db, constrained=True, arms=arms,
                  out_dir=Path(opts.folder) / "evals" / f"{run_id}-eval", progress=True)
    s = ev.summary()
    for arm in arms:
        name = arm.removesuffix("_constrained")
        steps.say(f"      {name:8s} exact match {s[arm]['exact_match']:.1%}  "
                  f"fields {s[arm]['field_accuracy']:.1%}  compliance {s[arm]['compliance']:.1%}")
    steps.say(f"      report: {Path(ev.out_dir) / 'report.md'}")
    return ev, s


def _publish(opts: DemoOptions, steps: _Steps, db: Path, run_id: str,
             ev: EvalReport) -> tuple[str | None, Version]:
    """Publish the run as the candidate; returns (production version or None, new version)."""
    steps.head("publish")
    reg = Registry(opts.registry)
    previous = reg.aliases(ADVISOR).get("production") if ADVISOR in reg.advisors() else None
    store = RunStore(db)
    run = store.get(run_id)
    store.close()
    out_dir = Path(ev.out_dir)
    version = reg.publish_run(run, ADVISOR, metrics=json.loads((out_dir / "metrics.json").read_text()),
                              extra_files={"eval_report.md": out_dir / "report.md"})
    reg.set_alias(ADVISOR, "candidate", version.version)
    if previous is None:
        steps.say(f"      {version.version} at {version.path} "
                  "(candidate; no production yet: base is the control)")
    else:
        steps.say(f"      {version.version} at {version.path} (candidate; production is {previous})")
    return previous, version


def _start_service(opts: DemoOptions, db: Path, previous: str | None,
                   candidate: str) -> tuple[Service, str]:
    """The advisor service on a free 127.0.0.1 port, routing 50/50; returns it and its URL."""
    arms = [Arm("control", previous, 1.0), Arm("candidate", candidate, 1.0)]
    route = AdvisorRoute(model=opts.model, arms=arms, sticky="user", fallback="none",
                         max_tokens=opts.max_tokens)

    def resolve_model(spec: str) -> tuple[str, str, str]:
        c = resolve(spec)
        return c.name, c.path, c.fingerprint

    service = Service(ServiceConfig(registry_root=opts.registry, db_path=db, max_batch=8),
                      resolve_model, load_advisors())
    service.routing.advisors[ADVISOR] = route
    service.apply(ADVISOR, route)
    ports: list[int] = []
    server = threading.Thread(target=run_server, args=(service, "127.0.0.1", 0),
                              kwargs={"ready": ports.append}, daemon=True)
    server.start()
    while not ports:
        time.sleep(0.01)
    return service, f"http://127.0.0.1:{ports[0]}"


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        return json.loads(resp.read())


def _ab_traffic(opts: DemoOptions, steps: _Steps, db: Path, previous: str | None, version: Version,
                seed: int) -> None:
    """A/B traffic of new questions with known answers; each simulated user accepts a right
    answer and sends the known one as a correction for a wrong one."""
    steps.head("serve on 127.0.0.1: A/B traffic, and users' feedback on every answer")
    service, url = _start_service(opts, db, previous, version.version)
    steps.say(f"      {url}: control={previous or 'base'}, candidate={version.version} "
              "(50/50, sticky by user)")
    contract = get_advisor(ADVISOR)
    traffic = generate(opts.requests, seed=seed)

    def ask(i: int) -> tuple[str, bool]:
        ex = traffic[i]
        a = _post(f"{url}/v1/advisors/{ADVISOR}/analyze", {"text": ex.question, "user": f"user-{seed}-{i}"})
        right = isinstance(a["answer"], dict) and contract.render(a["answer"]) == contract.render(ex.answer)
        verdict = {"verdict": "accepted"} if right else {"verdict": "corrected", "answer": ex.answer}
        _post(f"{url}/v1/requests/{a['request_id']}/feedback", verdict | {"user": f"user-{seed}-{i}"})
        return a["arm"], right

    t0 = time.perf_counter()
    with ThreadPoolExecutor(opts.clients) as pool:
        answers = list(pool.map(ask, range(opts.requests)))
    wall = time.perf_counter() - t0
    by_arm: dict[str, list[bool]] = {}
    for arm, right in answers:
        by_arm.setdefault(arm, []).append(right)
    steps.say(f"      {len(answers)} requests in {wall:.1f} s; "
              + ", ".join(f"{k}: {sum(v)} of {len(v)} right (accepted), {len(v) - sum(v)} corrected"
                          for k, v in sorted(by_arm.items())))
    service.close()


def _second_round(opts: DemoOptions, steps: _Steps, card: ModelCard, db: Path, production: Version) -> dict:
    """harvest -> link -> dataset -> retrain -> publish -> A/B against the first version."""
    root = Path(opts.folder)
    ws = load_workspace(root)
    steps.head("round 2: harvest the judged requests into jobs, relink, rebuild the dataset")
    h = harvest(ws, load_advisors([ws.advisors_path]))
    steps.say(f"      {h.line()}")
    steps.say(f"      {link_workspace(ws, progress=False).line()}")
    data = root / "datasets" / ADVISOR
    report = build_dataset(root / "manifest", get_advisor(ADVISOR), data, data_root=ws.data_path,
                           tokenizer_path=card.path, max_seq_length=opts.max_seq_length)
    steps.say(f"      train {report.counts['train']}, valid {report.counts['valid']}, test {report.counts['test']}")
    run_dir = root / "runs" / f"demo-round2-{time.strftime('%Y%m%d-%H%M%S')}"
    # the retrain continues from production's weights: a few steps on the harvested corrections
    # refine what round 1 learned instead of starting over
    result = _train(replace(opts, iters=opts.round2_iters), steps, card, data, db, run_dir,
                    init_adapter=production.path)
    reg = Registry(opts.registry)
    reg.set_alias(ADVISOR, "production", production.version)  # round 1's candidate is production now
    store = RunStore(db)
    run = store.get(result.run_id)
    store.close()
    version = reg.publish_run(run, ADVISOR, parent=production.version)
    reg.set_alias(ADVISOR, "candidate", version.version)
    steps.say(f"      published {version.version} (candidate; parent and production {production.version})")
    _ab_traffic(opts, steps, db, production.version, version, seed=TRAFFIC_SEED + 1)
    return {"harvest": h.to_dict(), "run": result.to_dict(), "version": version.version}


def run_demo(opts: DemoOptions, say: Callable[[str], None]) -> dict[str, Any]:
    """Run every step, reporting progress through `say`; returns run, eval, version and A/B."""
    steps = _Steps(say, 13 if opts.rounds > 1 else 9)
    steps.head(f"base model: {opts.model}")
    card = resolve(opts.model)
    say(f"      {card.path} (fingerprint {card.fingerprint[:12]})")
    data = _data(opts, steps, card)

    root = Path(opts.folder)
    db = root / "mondrian.db"
    run_dir = root / "runs" / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    result = _train(opts, steps, card, data, db, run_dir)
    ev, summary = _evaluate(opts, steps, data, db, run_dir, result.run_id)
    previous, version = _publish(opts, steps, db, result.run_id, ev)
    since = now_iso()
    _ab_traffic(opts, steps, db, previous, version, seed=TRAFFIC_SEED)
    steps.head(f"A/B report from {db} (mondrian ab report --db {db} --since {since})")
    ab = ab_report(db, advisor=ADVISOR, since=since)
    say(format_report(ab))
    out = {"run": result.to_dict(), "eval": summary, "version": version.version, "ab": ab}
    if opts.rounds > 1:
        since = now_iso()
        out["round2"] = _second_round(opts, steps, card, db, version)
        steps.head(f"round 2 A/B report (mondrian ab report --db {db} --since {since})")
        out["round2"]["ab"] = ab_report(db, advisor=ADVISOR, since=since)
        say(format_report(out["round2"]["ab"]))
    return out
