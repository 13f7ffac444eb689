"""Data-parallel training on this machine: `mondrian train` in one process vs two ranks under
`mlx.launch` (ring backend on loopback), on the tiny llama and on SmolLM2-135M.

For each model the same config (global batch, steps, seed) runs twice, as subprocesses started
the same way: one process (OpenBLAS with both cores) and 2 ranks (one core each: the machine has
2). Reported: trained tokens/s of each (the world's, from `--json`), speed-up = 2 ranks / 1,
scaling efficiency = speed-up / 2, and the all-reduce time per step: a ring `all_sum` of a
buffer the size of the adapter's gradients (what each step averages), timed alone under
`mlx.launch`, median of 50.

    python scripts/bench_dist.py [--models tiny:llama,smollm2-135m] [--iters 12]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mondrian  # noqa: F401 - first: preloads OpenBLAS before anything imports mlx.core

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent
RECIPES = {  # per model: the LoRA layout and batch of its shipped or test recipe
    "tiny:llama": {"num_layers": 4, "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0},
                   "batch_size": 8, "learning_rate": 2e-3, "max_seq_length": 2048},
    "smollm2-135m": {"num_layers": 16, "lora_parameters": {"rank": 8, "scale": 20.0, "dropout": 0.0},
                     "batch_size": 8, "learning_rate": 3e-4, "max_seq_length": 512},
}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(ranks: int, script: list[str], env: dict) -> subprocess.CompletedProcess:
    cmd = ([str(BIN / "mlx.launch"), "--backend", "ring", "--hosts", "127.0.0.1", "-n", str(ranks),
            "--starting-port", str(_port()), "--python", sys.executable] if ranks > 1 else [sys.executable])
    return subprocess.run(cmd + script, cwd=ROOT, capture_output=True, text=True, env=os.environ | env, timeout=3600)


def train_once(model: str, data: Path, folder: Path, ranks: int, iters: int) -> dict:
    import yaml

    cfg = {"model": model, "advisor": "fit-query", "data": str(data), "adapter_path": str(folder / "run"),
           "iters": iters, "mask_prompt": True, "steps_per_report": iters,
           "steps_per_eval": 10_000, "val_batches": 1, "save_every": 10_000, "seed": 0, **RECIPES[model]}
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    env = {"OPENBLAS_NUM_THREADS": "1"} if ranks > 1 else {}
    t = time.perf_counter()
    proc = _launch(ranks, [str(BIN / "mondrian"), "train", "--config", str(folder / "config.yaml"), "--json"], env)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{model} x{ranks}: {proc.stderr[-2000:]}")
    out = json.JSONDecoder().raw_decode(proc.stdout[proc.stdout.index("{"):])[0]  # rank 0's --json
    return {"ranks": ranks, "tokens_per_s": out["tokens_per_s"], "tokens": out["tokens"],
            "train_seconds": out["tokens"] / out["tokens_per_s"], "wall_s": wall}


def allreduce_ms(n_params: int, repeats: int = 50) -> float:
    """Median ms of a 2-rank ring all_sum of n_params float32 (run under mlx.launch)."""
    proc = _launch(2, [__file__, "--allreduce-worker", str(n_params), str(repeats)], {"OPENBLAS_NUM_THREADS": "1"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("allreduce_ms ")]
    if not lines:
        raise RuntimeError(proc.stderr[-2000:])
    return float(lines[0].split()[1])


def allreduce_worker(n: int, repeats: int) -> None:
    import mlx.core as mx
    import mlx.nn as nn

    group = mx.distributed.init()
    grads = {"g": mx.ones((n,))}
    mx.eval(nn.average_gradients(grads, group=group))  # warm-up: connections
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        mx.eval(nn.average_gradients(grads, group=group))
        times.append((time.perf_counter() - t) * 1000)
    if group.rank() == 0:
        print(f"allreduce_ms {statistics.median(times):.4f}", flush=True)


def trainable_params(model: str) -> int:
    from mlx.utils import tree_flatten
    from mlx_lm import load

    from mondrian.models.sources import resolve
    from mondrian.train.config import TrainConfig
    from mondrian.train.text import prepare_model

    m, _ = load(resolve(model).path)
    prepare_model(m, TrainConfig(model=model, data="", num_layers=RECIPES[model]["num_layers"],
                                 lora_parameters=RECIPES[model]["lora_parameters"]))
    return sum(v.size for _, v in tree_flatten(m.trainable_parameters()))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--allreduce-worker":
        allreduce_worker(int(sys.argv[2]), int(sys.argv[3]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny:llama,smollm2-135m")
    ap.add_argument("--iters", type=int, default=12)
    ap.add_argument("--data", default=str(ROOT / "workspace/datasets/fit-query"))
    ap.add_argument("--out", default=str(ROOT / "scripts/results/bench_dist.json"))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_service import machine

    result = {"benchmark": "bench_dist", "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **machine(),
              "iters": args.iters, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            print(f"{model}: 1 process, then 2 ranks", flush=True)
            one = train_once(model, Path(args.data), Path(tmp) / f"{model}-1", 1, args.iters)
            two = train_once(model, Path(args.data), Path(tmp) / f"{model}-2", 2, args.iters)
            n = trainable_params(model)
            ar = allreduce_ms(n)
            speedup = two["tokens_per_s"] / one["tokens_per_s"]
            step_s = two["train_seconds"] / args.iters
            result["models"][model] = {"when": result["when"], "one_process": one, "two_ranks": two, "speedup": speedup,
                                       "scaling_efficiency": speedup / 2, "trainable_params": n,
                                       "allreduce_ms_per_step": ar,
                                       "allreduce_share_of_step": ar / 1000 / step_s}
            print(json.dumps(result["models"][model], indent=1), flush=True)
    out = Path(args.out)
    if out.exists():  # models not run this time are kept, with the date they were measured
        old = json.loads(out.read_text())
        for model, entry in old.get("models", {}).items():
            result["models"].setdefault(model, entry | {"when": entry.get("when", old["when"])})
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
