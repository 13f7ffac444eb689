"""Quality per wall-clock minute: plain mlx-lm vs `mondrian train`, with and without retrieval.

On the demo workspace's fit-query data and SmolLM2-135M, in one run:

part `arms`: each arm trains for the same wall-clock budget (the process is stopped with
SIGTERM when it runs out; both trainers keep their last saved adapter), then `mondrian eval`
scores it on the whole test split and on the hand-written set, decoded freely and under the
contract's grammar:
  (a) `python -m mlx_lm lora` with the old recipe (lora/fit-query.yaml before retrieval:
      16 layers, rank 8, batch 8, lr 2e-4 constant, masked prompt, max_seq_length 256), on the
      dataset built without retrieval;
  (b) `mondrian train` with the new recipe (lora/fit-query.yaml), on the dataset without
      retrieval, its steps (and cosine decay) scaled by how much shorter those rows are, so
      that it spends the budget rather than stopping at the retrieval recipe's step count;
  (c) `mondrian train` with the new recipe, on the retrieval dataset (`make train`'s path).
  The base model is scored the same way once per dataset (with `--base`).

part `seeds`: plain mlx-lm and our loop (its defaults) on the *same* recipe (the old one, same
iters), seeds 0..N-1 each, each adapter scored on the test split (free decoding): does our loop
cost quality? Reported: mean and spread of exact match and field accuracy per trainer, and the
paired difference.

part `ablations`: our loop on the seeds part's recipe, iters and seeds with one setting changed
at a time (length bucketing on, mlx-lm's full-vocabulary loss, no mx.compile, a lower learning
rate), each adapter scored the same way; read against the seeds part's two trainers (the same
seeds give the same runs: both trainers are deterministic for a seed). A run redoes only the
variants it names; each records when it ran and our loop's defaults then (`ours_defaults`).

part `recipe`: `make train`'s recipe (lora/fit-query.yaml on the retrieval dataset) with one set
of changes per variant (`--recipe-variants "{}; {answer_turns: all}; ..."`, YAML mappings: config
keys, plus `retrieval_method: nearest` for a dataset whose prompts show the k nearest examples
instead of the covering ones), each trained to the end as `make train` trains, then scored by
`mondrian eval --max-tokens 128` under the grammar (what the service serves) on the test split
and the hand-written set: exact match, field accuracy, compliance, per-field accuracy, the
training wall time and the validation loss. A run adds to the variants already in the file.

Results: scripts/results/bench_quality.json (every number, per arm and set); the README
table is copied from its printout.

    python scripts/bench_quality.py [--parts arms,seeds,ablations,recipe] [--budget-min 12] [--seeds 3]
                                    [--seed-iters 30] [--ablations NAME,...] [--base]
                                    [--recipe-variants "{}; {answer_turns: all}"] [--workspace workspace]

A run rewrites only the parts it ran; the other parts' results stay in the file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import yaml

import mondrian
from mondrian.core.contracts import get_advisor
from mondrian.core.workspace import load_workspace
from mondrian.dataset.build import build_dataset
from mondrian.models.sources import resolve
from mondrian.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
HANDWRITTEN = ROOT / "tests" / "data" / "fit_query_handwritten.jsonl"
NEW_RECIPE = ROOT / "lora" / "fit-query.yaml"
OLD_RECIPE = {"fine_tune_type": "lora", "num_layers": 16, "lora_parameters": {"rank": 8, "scale": 20.0, "dropout": 0.0},
              "batch_size": 8, "learning_rate": 2e-4, "mask_prompt": True, "max_seq_length": 256}
ADV = "fit-query"
MAX_TOKENS = 128  # every score decodes up to this, as the README's recipe evaluation does
OURS_DEFAULTS = {k: getattr(TrainConfig(), k) for k in ("bucket_batches", "answer_only_logits")}
# One setting of the old recipe changed at a time: (config overrides, environment).
ABLATIONS = {
    "bucket_batches: 8": ({"bucket_batches": 8}, {}),  # the default until 2026-12-06
    "answer_only_logits: false": ({"answer_only_logits": False}, {}),
    "MONDRIAN_COMPILE=0": ({}, {"MONDRIAN_COMPILE": "0"}),
    "learning_rate: 1e-4": ({"learning_rate": 1e-4}, {}),
}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    st = mondrian.core.blas.status()
    if st.backend == "openblas":
        env["LD_PRELOAD"] = st.path  # the peer gets the same BLAS as we do
    return env


def datasets(ws: Path) -> dict[str, Path]:
    """The retrieval dataset (make data's) and the same rows built without retrieval."""
    advisor = get_advisor(ADV)
    out = {"retrieval": ws / "datasets" / ADV, "plain": ws / "datasets" / f"{ADV}-plain"}
    if not (out["retrieval"] / "train.jsonl").is_file():
        raise SystemExit(f"{out['retrieval']}: missing (run `make data` first)")
    if not (out["plain"] / "train.jsonl").is_file():
        build_dataset(ws / "manifest", replace(advisor, retrieval=None), out["plain"],
                      data_root=load_workspace(ws).data_path)
    return out


def _run_for(cmd: list[str], budget_s: float | None, log: Path, env: dict | None = None) -> float:
    """Run `cmd`; SIGTERM it when `budget_s` runs out (then wait for it to save). Wall seconds."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env() | (env or {}), cwd=ROOT)
        try:
            proc.wait(timeout=budget_s)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=600)
    return time.perf_counter() - t0


def train_peer(data: Path, out: Path, model_path: str, seed: int, iters: int, budget_s: float | None) -> dict:
    cfg = OLD_RECIPE | {"model": model_path, "data": str(data), "adapter_path": str(out), "train": True,
                        "iters": iters, "seed": seed, "steps_per_report": 5, "steps_per_eval": 100_000,
                        "val_batches": 1, "save_every": 5 if budget_s else iters}
    out.mkdir(parents=True, exist_ok=True)
    (out / "peer.yaml").write_text(json.dumps(cfg))
    wall = _run_for([sys.executable, "-m", "mlx_lm", "lora", "-c", str(out / "peer.yaml")], budget_s, out / "log.txt")
    if not (out / "adapters.safetensors").is_file():
        raise RuntimeError(f"mlx_lm lora saved no adapter:\n{(out / 'log.txt').read_text()[-2000:]}")
    saved = sorted(out.glob("*_adapters.safetensors"))
    return {"trainer": "mlx_lm lora", "wall_s": round(wall, 1),
            "steps": int(saved[-1].name.split("_")[0]) if saved else iters}


def train_ours(config: dict, out: Path, budget_s: float | None, env: dict | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    wall = _run_for([sys.executable, "-m", "mondrian.cli", "train", "--config", str(out / "config.yaml"),
                     "--json"], budget_s, out / "log.txt", env)
    if not (out / "run" / "last" / "adapters.safetensors").is_file():
        raise RuntimeError(f"mondrian train saved no adapter:\n{(out / 'log.txt').read_text()[-2000:]}")
    with sqlite3.connect(out / "runs.db") as conn:
        steps = conn.execute("SELECT max(step) FROM run_metrics WHERE name = 'train_loss'").fetchone()[0]
    return {"trainer": "mondrian train", "wall_s": round(wall, 1), "steps": steps}


def score(adapter: Path | None, data: Path, out: Path, arms: str, questions: Path | None = None,
          max_tokens: int = MAX_TOKENS) -> dict:
    """`mondrian eval` of the given arms; {arm: headline metrics} (the whole report: out/report.json)."""
    cmd = [sys.executable, "-m", "mondrian.cli", "eval", "--model", "smollm2-135m", "--advisor", ADV,
           "--data", str(data), "--arms", arms, "--max-tokens", str(max_tokens), "--db", str(out / "runs.db"),
           "--out", str(out), "--no-progress", "--json"]
    if adapter is not None:
        cmd += ["--adapter", str(adapter)]
    if questions is not None:
        cmd += ["--questions", str(questions)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"mondrian eval failed:\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout)
    keep = ("parse_rate", "compliance", "exact_match", "field_accuracy", "critical_passed")
    return {arm: {k: m.get(k) for k in keep} for arm, m in summary.items()
            if isinstance(m, dict) and "exact_match" in m}


def scores(adapter: Path | None, data: Path, out: Path, arms: str) -> dict:
    return {"test": score(adapter, data, out / "test", arms),
            "handwritten": score(adapter, data, out / "handwritten", arms, HANDWRITTEN)}


def _mean_chars(data: Path) -> float:
    rows = (data / "train.jsonl").read_text().splitlines()
    return sum(map(len, rows)) / len(rows)


def stretched(recipe: dict, factor: float) -> dict:
    """The recipe with `factor` times its steps (the cosine decay stretched to match): rows
    without retrieval are about a third as long, so the same wall budget runs more steps."""
    iters = max(1, round(recipe["iters"] * factor))
    out = recipe | {"iters": iters}
    sched = recipe.get("lr_schedule")
    if sched and sched.get("name") == "cosine_decay":
        args = list(sched["arguments"])
        args[1] = iters - sched.get("warmup", 0)
        out["lr_schedule"] = sched | {"arguments": args}
    return out


def part_arms(sets: dict[str, Path], tmp: Path, budget_s: float, model_path: str, base: bool,
              progress: Callable[[dict], None] = lambda partial: None) -> dict:
    new = yaml.safe_load(NEW_RECIPE.read_text())
    # (c) runs the recipe as make train does; (b)'s rows are shorter, so its steps are scaled by
    # the length ratio to spend the same budget (the budget's SIGTERM still caps both)
    factor = _mean_chars(sets["retrieval"]) / _mean_chars(sets["plain"])
    plain = stretched(new, factor)
    # a checkpoint every 7 steps, so a run the budget stops keeps its last step's adapter anyway
    eval_every = {"steps_per_eval": 100_000, "val_batches": 1}
    out: dict = {"length_ratio": round(factor, 2), "iters_b": plain["iters"], "iters_c": new["iters"],
                 "max_tokens": MAX_TOKENS}
    if base:
        for name, data in sets.items():
            out[f"base ({name} prompts)"] = {"scores": scores(None, data, tmp / f"base-{name}", "base,base_constrained")}
    arms = {
        "(a) mlx_lm lora, old recipe": lambda d: train_peer(sets["plain"], d, model_path, 0, 10_000, budget_s),
        "(b) mondrian train, new recipe, no retrieval": lambda d: train_ours(
            plain | eval_every | {"data": str(sets["plain"]), "adapter_path": str(d / "run"), "db": str(d / "runs.db")},
            d, budget_s),
        "(c) mondrian train, new recipe, retrieval": lambda d: train_ours(
            new | eval_every | {"data": str(sets["retrieval"]), "adapter_path": str(d / "run"), "db": str(d / "runs.db")},
            d, budget_s),
    }
    for i, (name, run) in enumerate(arms.items()):
        folder = tmp / f"arm{i}"
        info = run(folder)
        # the last step's adapter (best/ would be chosen on one validation batch)
        adapter = folder if info["trainer"] == "mlx_lm lora" else folder / "run" / "last"
        data = sets["retrieval"] if "retrieval" in name and "no retrieval" not in name else sets["plain"]
        out[name] = info | {"scores": scores(adapter, data, folder / "eval", "adapter,adapter_constrained")}
        print(json.dumps({name: out[name]}), flush=True)
        progress(out | {"complete": False})  # a 2 h part survives a stop
    return out | {"complete": True}


def _seed_config(sets: dict[str, Path], folder: Path, iters: int, seed: int) -> dict:
    """Our loop on the old recipe, as the seeds and ablations parts run it."""
    return OLD_RECIPE | {"model": "smollm2-135m", "data": str(sets["plain"]), "iters": iters, "seed": seed,
                         "adapter_path": str(folder / "run"), "db": str(folder / "runs.db"), "advisor": ADV,
                         "steps_per_eval": 100_000, "val_batches": 1, "save_every": iters}


def _mean_sd(runs: list[dict]) -> dict:
    return {m: {"mean": round(statistics.mean(r[m] for r in runs), 4),
                "sd": round(statistics.stdev(r[m] for r in runs), 4) if len(runs) > 1 else None}
            for m in ("exact_match", "field_accuracy", "compliance", "parse_rate")}


def part_seeds(sets: dict[str, Path], tmp: Path, seeds: int, iters: int, model_path: str,
               progress: Callable[[dict], None] = lambda partial: None) -> dict:
    out: dict[str, list] = {"mlx_lm lora": [], "mondrian train": []}
    for seed in range(seeds):
        peer_dir, ours_dir = tmp / f"peer-{seed}", tmp / f"ours-{seed}"
        peer = train_peer(sets["plain"], peer_dir, model_path, seed, iters, None)
        out["mlx_lm lora"].append(peer | {"seed": seed, **score(peer_dir, sets["plain"], peer_dir / "eval", "adapter")["adapter"]})
        ours = train_ours(_seed_config(sets, ours_dir, iters, seed), ours_dir, None)
        out["mondrian train"].append(ours | {"seed": seed, **score(ours_dir / "run" / "last", sets["plain"], ours_dir / "eval", "adapter")["adapter"]})
        print(json.dumps({"seed": seed, "peer": out["mlx_lm lora"][-1], "ours": out["mondrian train"][-1]}), flush=True)
        progress({"iters": iters, "recipe": OLD_RECIPE, "runs": out, "complete": False})  # a 1 h part survives a stop
    summary = {}
    for trainer, runs in out.items():
        summary[trainer] = _mean_sd(runs)
        summary[trainer]["wall_s_mean"] = round(statistics.mean(r["wall_s"] for r in runs), 1)
    diffs = [o["exact_match"] - p["exact_match"] for o, p in zip(out["mondrian train"], out["mlx_lm lora"], strict=True)]
    summary["ours_minus_peer_exact_match"] = {"per_seed": [round(d, 4) for d in diffs], "mean": round(statistics.mean(diffs), 4)}
    return {"iters": iters, "recipe": OLD_RECIPE, "ours_defaults": OURS_DEFAULTS, "runs": out, "summary": summary,
            "complete": True}


def part_ablations(sets: dict[str, Path], tmp: Path, seeds: int, iters: int, names: list[str],
                   kept: dict | None = None, progress: Callable[[dict], None] = lambda partial: None) -> dict:
    """Each named change over `seeds` seeds; the variants in `kept` that this run does not redo
    stay (each variant records when it ran and our loop's defaults then)."""
    variants = dict((kept or {}).get("variants", {}))
    for name in names:
        overrides, env = ABLATIONS[name]
        runs: list[dict] = []
        for seed in range(seeds):
            folder = tmp / f"{list(ABLATIONS).index(name)}-{seed}"
            info = train_ours(_seed_config(sets, folder, iters, seed) | overrides, folder, None, env)
            runs.append(info | {"seed": seed, **score(folder / "run" / "last", sets["plain"], folder / "eval",
                                                      "adapter")["adapter"]})
            print(json.dumps({name: runs[-1]}), flush=True)
            variants[name] = {"change": ABLATIONS[name], "ours_defaults": OURS_DEFAULTS, "when": _now(),
                              "runs": runs, "summary": _mean_sd(runs), "complete": seed == seeds - 1}
            progress({"iters": iters, "recipe": OLD_RECIPE, "variants": variants})
    return {"iters": iters, "recipe": OLD_RECIPE, "variants": variants}


def recipe_dataset(ws: Path, method: str) -> Path:
    """The retrieval dataset with another way of choosing the examples (built once)."""
    advisor = get_advisor(ADV)
    if method == advisor.retrieval.method:
        return ws / "datasets" / ADV
    out = ws / "datasets" / f"{ADV}-{method}"
    if not (out / "train.jsonl").is_file():
        build_dataset(ws / "manifest", replace(advisor, retrieval=replace(advisor.retrieval, method=method)), out,
                      data_root=load_workspace(ws).data_path)
    return out


def _per_field(report: Path) -> dict:
    """Accuracy per field from an eval report: correct / (rows where expected or produced)."""
    counts: dict[str, dict[str, int]] = {}
    for row in json.loads(report.read_text())["rows"]:
        for arm in row["arms"].values():
            for name, verdict in arm["fields"].items():
                counts.setdefault(name, {}).setdefault(verdict, 0)
                counts[name][verdict] += 1
    return {name: {"accuracy": round(c.get("correct", 0) / sum(c.values()), 4), **c} for name, c in counts.items()}


def part_recipe(ws: Path, tmp: Path, variants: list[str], kept: dict | None,
                progress: Callable[[dict], None] = lambda partial: None) -> dict:
    recipe = yaml.safe_load(NEW_RECIPE.read_text())
    done = dict((kept or {}).get("variants", {}))
    for i, text in enumerate(variants):
        change = yaml.safe_load(text) or {}
        if not isinstance(change, dict):
            raise SystemExit(f"--recipe-variants: {text!r} is not a mapping")
        method = change.pop("retrieval_method", get_advisor(ADV).retrieval.method)
        data = recipe_dataset(ws, method)
        folder = tmp / f"recipe-{i}"
        config = recipe | change | {"data": str(data), "adapter_path": str(folder / "run"), "db": str(folder / "runs.db")}
        info = train_ours(config, folder, None)
        with sqlite3.connect(folder / "runs.db") as conn:
            val = [v for (v,) in conn.execute("SELECT value FROM run_metrics WHERE name = 'val_loss' ORDER BY step")]
        result = info | {"change": text, "retrieval_method": method, "when": _now(),
                         "val_loss_first": val[0] if val else None, "val_loss_best": min(val) if val else None}
        for name, questions in (("test", None), ("handwritten", HANDWRITTEN)):
            out = folder / "eval" / name
            score(folder / "run", data, out, "adapter_constrained", questions)
            m = json.loads((out / "report.json").read_text())["arms"]["adapter_constrained"]
            result[name] = {k: m.get(k) for k in ("exact_match", "field_accuracy", "compliance", "longest_tokens",
                                                  "truncated")} | {"fields": _per_field(out / "report.json")}
        done[text] = result
        print(json.dumps({text: {k: result[k] for k in ("wall_s", "steps", "val_loss_best")}
                          | {s: result[s]["exact_match"] for s in ("test", "handwritten")}}), flush=True)
        progress({"recipe": recipe, "variants": done})
    return {"recipe": recipe, "variants": done}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="arms,seeds,ablations")
    ap.add_argument("--budget-min", type=float, default=12.0, help="wall-clock budget of each arm's training")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--seed-iters", type=int, default=30)
    ap.add_argument("--ablations", default=",".join(ABLATIONS), help=f"which ({', '.join(ABLATIONS)})")
    ap.add_argument("--base", action="store_true", help="also score the base model on both datasets")
    ap.add_argument("--recipe-variants", default="{}",
                    help="recipe part: ';'-separated YAML mappings of changes to lora/fit-query.yaml")
    ap.add_argument("--workspace", default=str(ROOT / "workspace"))
    ap.add_argument("--out", default=str(ROOT / "scripts" / "results" / "bench_quality.json"))
    args = ap.parse_args()
    names = [n.strip() for n in args.ablations.split(",") if n.strip()]
    unknown = [n for n in names if n not in ABLATIONS]
    if unknown:
        ap.error(f"--ablations: unknown {unknown} (known: {list(ABLATIONS)})")
    sets = datasets(Path(args.workspace))
    model_path = resolve("smollm2-135m").path
    out = Path(args.out)
    kept = json.loads(out.read_text()) if out.is_file() else {}  # the parts this run does not redo
    result = kept | {"benchmark": "bench_quality", "when": _now(),
              "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores",
              "new_recipe": yaml.safe_load(NEW_RECIPE.read_text()), "old_recipe": OLD_RECIPE}
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        if "seeds" in args.parts:
            def save(partial: dict) -> None:
                out.write_text(json.dumps(result | {"seeds": partial}, indent=2) + "\n")
            result["seeds"] = part_seeds(sets, Path(tmp) / "seeds", args.seeds, args.seed_iters, model_path, save) | {"when": _now()}
            out.write_text(json.dumps(result, indent=2) + "\n")
        if "ablations" in args.parts:
            def save_ablations(partial: dict) -> None:
                out.write_text(json.dumps(result | {"ablations": partial}, indent=2) + "\n")
            result["ablations"] = part_ablations(sets, Path(tmp) / "ablations", args.seeds, args.seed_iters, names,
                                                 kept.get("ablations"), save_ablations)
            out.write_text(json.dumps(result, indent=2) + "\n")
        if "recipe" in args.parts:
            def save_recipe(partial: dict) -> None:
                out.write_text(json.dumps(result | {"recipe": partial}, indent=2) + "\n")
            variants = [v.strip() for v in args.recipe_variants.split(";") if v.strip()]
            result["recipe"] = part_recipe(Path(args.workspace), Path(tmp) / "recipe", variants,
                                           kept.get("recipe"), save_recipe)
            out.write_text(json.dumps(result, indent=2) + "\n")
        if "arms" in args.parts:
            result["budget_min"] = args.budget_min
            def save_arms(partial: dict) -> None:
                out.write_text(json.dumps(result | {"arms": partial | {"when": _now()}}, indent=2) + "\n")
            result["arms"] = part_arms(sets, Path(tmp) / "arms", args.budget_min * 60, model_path, args.base,
                                       save_arms) | {"when": _now()}
            out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k in ("seeds", "ablations", "arms", "recipe")}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
