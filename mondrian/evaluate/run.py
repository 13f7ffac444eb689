"""Evaluate a LoRA adapter against its base model: same rows, one model load, paired statistics.

`evaluate()` loads the base model once with the adapter's LoRA layers installed, and answers
every row of a dataset split (`mondrian.evaluate.rows`) twice with greedy decoding, batched
through `decode.Decoder` (mondrian's decode loop, the one the service runs, with a prefix
cache per call: every row shares the system prompt):

- arm `base`: every LoRA layer's `scale` set to 0, which gives the base model's logits bit
  for bit (the LoRA matmuls still run; a test checks the logits against a plain load);
- arm `adapter`: the adapter's own scale;
- with `constrained=True`, also `base_constrained` and `adapter_constrained`: the same, with
  llguidance's JSON-Schema mask applied to the logits (see `SchemaConstraint`).

The rows are a dataset split, or a questions file such as the hand-written set. Prompts
carry retrieved examples exactly as the service builds them: a split's rows as the dataset
wrote them, questions and the advisor's critical cases (`cases:` in its YAML) through
`mondrian.core.retrieval.prompt_messages` with the adapter's own index (the dataset's when
only the base is evaluated; none for an adapter trained without one) and the adapter's own
pinned prompt (`Advisor.asked_as`; the advisor's current one when it pins none). They are asked in
the same batches. Scoring and statistics are `mondrian.evaluate.metrics`; the report files
are `mondrian.evaluate.report`. The run is recorded in the runs database as kind "eval"
(config, fingerprints, summary) with per-metric rows at step 0.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tqdm import tqdm

from mondrian.core.adapters import CONFIG, WEIGHTS, AdapterError, read_config
from mondrian.core.config import ConfigError
from mondrian.core.contracts import Advisor, read_prompt
from mondrian.core.fingerprint import file_sha256
from mondrian.core.retrieval import INDEX_FILE, RetrievalError, RetrievalIndex, prompt_messages
from mondrian.evaluate.metrics import ABS_TOL, REL_TOL, RESAMPLES, EvalError
from mondrian.evaluate.report import (
    ADAPTER,
    BASE,
    CONSTRAINED_SUFFIX,
    EvalReport,
    evaluate_answers,
    write_report,
)
from mondrian.evaluate.rows import EvalRow, load_questions, load_rows
from mondrian.models import upstream
from mondrian.models.constrained import SchemaConstraint, list_caps
from mondrian.models.generation import AdapterSwitch, chat_prompt, generate_batch
from mondrian.models.sources import ModelCard, ModelError, resolve
from mondrian.train.loop import runs_db
from mondrian.train.runs import RunStore

__all__ = ["EvalError", "evaluate"]


def _adapter_folder(adapter_path: str | Path) -> tuple[Path, dict]:
    folder = Path(adapter_path)
    if not folder.is_dir():
        raise EvalError(f"adapter folder {folder} does not exist")
    for name in (CONFIG, WEIGHTS):
        if not (folder / name).is_file():
            raise EvalError(f"{folder}: no {name} (an adapter folder written by `mondrian train` or `mlx_lm lora`)")
    try:
        cfg = read_config(folder)
    except AdapterError as exc:
        raise EvalError(str(exc)) from None
    kind = cfg.get("fine_tune_type", "lora")
    if kind != "lora":
        raise EvalError(f"{folder}: fine_tune_type {kind!r}: only LoRA adapters can be switched off to get the base")
    return folder, cfg


def _parent_run(folder: Path) -> str | None:
    best = folder / "best" / "best.json"
    try:
        return json.loads(best.read_text()).get("run_id") if best.is_file() else None
    except (json.JSONDecodeError, OSError):
        return None


def _base_card(base_model: str | None, adapter_cfg: dict) -> tuple[str, ModelCard]:
    spec = base_model or adapter_cfg.get("model")
    if not spec:
        raise EvalError("no base model: give one (the adapter's config does not name it)")
    try:
        return spec, resolve(spec)
    except ModelError as exc:
        raise EvalError(str(exc)) from exc


def _case_messages(advisor: Advisor, index: RetrievalIndex | None) -> list[list[dict]]:
    """Each critical case as the chat the advisor's model answers (the one prompt builder)."""
    return [prompt_messages(advisor, c.input, index)[0] for c in advisor.cases]


def _index(adapter: Path | None, data_dir: Path) -> RetrievalIndex | None:
    """The retrieval index prompts are built with: the adapter's own (trained with it); the
    dataset's for the base alone; None for an adapter trained without one."""
    path = (adapter if adapter is not None else data_dir) / INDEX_FILE
    if not path.is_file():
        return None
    try:
        return RetrievalIndex.load(path)
    except RetrievalError as exc:
        raise EvalError(str(exc)) from None


def _asked(advisor: Advisor, adapter: Path | None, data_dir: Path) -> Advisor:
    """The advisor asking with the prompt the adapter was trained with (the dataset's for the
    base alone); as it is when none is pinned."""
    try:
        return advisor.asked_as(read_prompt(adapter if adapter is not None else data_dir))
    except ConfigError as exc:
        raise EvalError(str(exc)) from None


def _prompt_notes(adapter: Path | None, data_dir: Path, split_rows: bool) -> list[str]:
    """Say so when the adapter pins no prompt, or a split's rows were built with another."""
    if adapter is None:
        return []
    try:
        ours, theirs = read_prompt(adapter), read_prompt(data_dir)
    except ConfigError as exc:
        raise EvalError(str(exc)) from None
    if ours is None:
        return ["the adapter pins no prompt (trained on a dataset built before prompts were pinned, "
                "or by plain mlx_lm): questions are asked with the advisor's current prompt"]
    if split_rows and theirs is not None and theirs != ours:
        return [f"{data_dir}'s rows were built with another prompt (system prompt or input settings) "
                "than the adapter was trained with"]
    return []


def _answer_arms(model: Any, tokenizer: Any, prompts: list[str], plan: list[str], *,
                 switch: AdapterSwitch | None, constraint: SchemaConstraint | None, batch_size: int,
                 max_tokens: int, progress: bool) -> tuple[dict, dict]:
    """Every prompt through every arm of `plan`: arm -> generations, arm -> (seconds,
    answers, tokens) of its batched run."""
    gens_by_arm, walls = {}, {}
    try:
        for arm in plan:
            if switch:
                switch.set(arm.startswith(ADAPTER))
            procs = [constraint.processor() for _ in prompts] if arm.endswith(CONSTRAINED_SUFFIX) else None
            bar = tqdm(total=len(prompts), desc=arm, unit="answer", file=sys.stderr) if progress else None
            try:
                gens, wall = generate_batch(model, tokenizer, prompts, batch_size=batch_size, max_tokens=max_tokens,
                                            logits_processors=procs, progress=bar.update if bar else None)
            finally:
                if bar:
                    bar.close()
            gens_by_arm[arm] = gens
            walls[arm] = (wall, len(gens), sum(g.tokens for g in gens))
    finally:
        if switch:
            switch.set(True)
    return gens_by_arm, walls


def _index_notes(adapter: Path | None, data_dir: Path, index: RetrievalIndex | None, split_rows: bool) -> list[str]:
    """Say so when a split's prompts (built by the dataset) used another index than the adapter's."""
    if adapter is None or not split_rows:
        return []
    theirs = data_dir / INDEX_FILE
    if index is None and theirs.is_file():
        return [f"the adapter was trained without retrieval, but {data_dir}'s rows carry retrieved examples"]
    if index is not None and not theirs.is_file():
        return [f"the adapter was trained with retrieval, but {data_dir}'s rows carry no examples"]
    if index is not None and file_sha256(theirs) != index.fingerprint:
        return [f"{data_dir}'s retrieval index is not the one the adapter was trained with (rebuilt since)"]
    return []


def _generate_and_score(card: ModelCard, adapter: Path | None, advisor: Advisor, rows: list[EvalRow],
                        data_dir: Path, index: RetrievalIndex | None, config: dict, notes: list[str], *,
                        batch_size: int, max_tokens: int, constrained: bool, seed: int, resamples: int,
                        progress: bool, only: tuple[str, ...] = ()) -> EvalReport:
    model, tokenizer = upstream.load_lm(card.path, adapter_path=str(adapter) if adapter else None)
    prompts = [chat_prompt(tokenizer, r.messages) for r in rows]
    prompts += [chat_prompt(tokenizer, m) for m in _case_messages(advisor, index)]
    plan = [BASE] + ([ADAPTER] if adapter else [])
    constraint = None
    if constrained or (only and any(a.endswith(CONSTRAINED_SUFFIX) for a in only)):
        train = data_dir / "train.jsonl"  # lists capped at the longest the training data holds
        caps = list_caps(r.reference for r in load_rows(data_dir, "train", advisor)) if train.is_file() else {}
        constraint = SchemaConstraint(advisor.schema, tokenizer, max_items=caps)
        config["grammar_list_caps"] = caps
        config["grammar_warnings"] = constraint.warnings
        config["grammar_rewrites"] = constraint.rewrites
        plan += [arm + CONSTRAINED_SUFFIX for arm in list(plan)]
    if only:
        unknown = sorted(set(only) - set(plan))
        if unknown:
            raise EvalError(f"arm(s) {', '.join(unknown)} cannot run here (arms: {', '.join(plan)})")
        plan = [arm for arm in plan if arm in only]
    gens, walls = _answer_arms(model, tokenizer, prompts, plan, switch=AdapterSwitch(model) if adapter else None,
                               constraint=constraint, batch_size=batch_size, max_tokens=max_tokens,
                               progress=progress)
    answers = {arm: g[: len(rows)] for arm, g in gens.items()}
    crit = {arm: g[len(rows):] for arm, g in gens.items()} if advisor.cases else None
    return evaluate_answers(advisor, rows, answers, critical=crit, walls=walls, seed=seed,
                            resamples=resamples, config=config, notes=notes)


def evaluate(base_model: str | None, adapter_path: str | Path | None, data_dir: str | Path, advisor: Advisor, *,
             split: str = "test", limit: int | None = None, batch_size: int = 16, max_tokens: int = 256,
             db: str | Path | None = None, out_dir: str | Path | None = None, constrained: bool = False,
             seed: int = 0, resamples: int = RESAMPLES, progress: bool = False,
             questions: str | Path | None = None, arms: tuple[str, ...] = ()) -> EvalReport:
    """Base vs adapter on the same rows of `data_dir/<split>.jsonl` (or of the `questions`
    file, when given); see the module docstring. `arms` runs only those arms (e.g.
    ("adapter_constrained",) when the base's numbers are known already).

    `base_model` is a model spec (`mondrian.models.sources.resolve`); None takes the adapter's own
    `adapter_config.json` "model". Without an adapter only the base arm runs. `db` defaults to
    the mondrian.db of the workspace holding the data (as training does); `out_dir` to
    `<db folder>/evals/<run_id>`. The run is recorded as kind "eval" (failed / interrupted
    if it does not finish).
    """
    if batch_size < 1 or max_tokens < 1:
        raise EvalError("batch_size and max_tokens must be positive")
    data_dir = Path(data_dir)
    if advisor.input_kind != "text":
        raise EvalError(f"advisor {advisor.name}: only text advisors can be evaluated here")
    adapter, adapter_cfg = (None, {}) if adapter_path is None else _adapter_folder(adapter_path)
    index = _index(adapter, data_dir)
    asked = _asked(advisor, adapter, data_dir)  # same schema; the prompt the adapter was taught with
    if questions is not None:
        rows, split = load_questions(questions, asked, index, limit), f"questions:{Path(questions).name}"
        rows_file = Path(questions)
    else:
        rows, rows_file = load_rows(data_dir, split, advisor, limit), data_dir / f"{split}.jsonl"
    spec, card = _base_card(base_model, adapter_cfg)
    config = {"advisor": advisor.name, "advisor_fingerprint": advisor.fingerprint, "base_model": spec,
              "base_model_path": card.path, "base_model_fingerprint": card.fingerprint,
              "adapter_path": str(adapter.resolve()) if adapter else None,
              "adapter_sha256": file_sha256(adapter / WEIGHTS) if adapter else None,
              "adapter_trained_on": adapter_cfg.get("model"), "data": str(data_dir), "split": split,
              "rows": len(rows), "limit": limit, "dataset_fingerprint": file_sha256(rows_file),
              "retrieval_index": index.fingerprint if index else None,
              "prompt": asked.prompt_settings(),
              "batch_size": batch_size, "max_tokens": max_tokens, "constrained": constrained,
              "arms": list(arms) or None,
              "decoding": "greedy", "seed": seed, "resamples": resamples,
              "abs_tol": ABS_TOL, "rel_tol": REL_TOL}
    notes = _index_notes(adapter, data_dir, index, questions is None)
    notes += _prompt_notes(adapter, data_dir, questions is None)
    if adapter_cfg.get("model") and Path(adapter_cfg["model"]).resolve() != Path(card.path).resolve():
        notes.append(f"the adapter was trained on {adapter_cfg['model']}, evaluated on {card.path}")

    db_path = runs_db(SimpleNamespace(db=db), data_dir)
    db_path.parent.mkdir(parents=True, exist_ok=True)
    store = RunStore(db_path)
    run_id = store.start("eval", advisor.name, config, config["dataset_fingerprint"], spec, card.fingerprint,
                         config["adapter_path"], parent_run_id=_parent_run(adapter) if adapter else None)
    try:
        report = _generate_and_score(card, adapter, asked, rows, data_dir, index, config, notes, batch_size=batch_size,
                                     max_tokens=max_tokens, constrained=constrained, seed=seed,
                                     resamples=resamples, progress=progress, only=tuple(arms))
        report.run_id = run_id
        write_report(report, Path(out_dir) if out_dir else store.path.parent / "evals" / run_id)
        store.log(run_id, 0, report.metric_rows())
        store.finish(run_id, "completed", report.summary())
        return report
    except KeyboardInterrupt:
        store.finish(run_id, "interrupted", error="interrupted")
        raise
    except BaseException as exc:
        store.finish(run_id, "failed", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        store.close()
