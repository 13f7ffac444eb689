"""Training throughput: `mondrian train` vs `python -m mlx_lm lora --train`, in one run.

Same base model, same data (the demo workspace's fit-query dataset), same
hyperparameters (batch, layers, rank, lr, mask_prompt, max_seq_length, iters,
seed), on the tiny 5M llama and on SmolLM2-135M. Both sides use OpenBLAS (the
peer gets it through LD_PRELOAD). Throughput is measured the way mlx-lm reports
it: trained (loss) tokens per second, averaged over report windows after the
first (which includes compilation); validation time is excluded on both sides.
We also report our effective tokens per second: every non-pad token of the sequences trained.

    python scripts/bench_train.py [--models tiny,smollm2] [--workspace DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mondrian
from mondrian.models.sources import resolve
from mondrian.train.runs import RunStore

SETUPS = {
    "tiny": {"model": "tiny:llama", "num_layers": 6, "batch_size": 8, "iters": 60,
             "learning_rate": 1e-3, "steps_per_report": 10, "max_seq_length": 512},
    "smollm2": {"model": "smollm2-135m", "num_layers": 16, "batch_size": 8, "iters": 15,
                "learning_rate": 2e-4, "steps_per_report": 3},
}
COMMON = {"lora_parameters": {"rank": 8, "scale": 20.0, "dropout": 0.0}, "mask_prompt": True,
          "max_seq_length": 512, "seed": 0, "fine_tune_type": "lora"}  # per-model values win


def workspace_dataset(root: Path) -> Path:
    data = root / "datasets" / "fit-query"
    if not (data / "train.jsonl").exists():
        from mondrian.core.contracts import get_advisor
        from mondrian.core.workspace import load_workspace
        from mondrian.dataset.build import build_dataset
        from mondrian.demo.workspace import write_demo_workspace
        from mondrian.link.linker import link_workspace

        write_demo_workspace(root, overwrite=True)
        ws = load_workspace(root)
        link_workspace(ws, progress=False)
        build_dataset(root / "manifest", get_advisor("fit-query"), data, data_root=ws.data_path)
    return data


def run_ours(setup: dict, data: Path, tmp: Path) -> dict:
    from mondrian.train.config import TrainConfig
    from mondrian.train.run import train

    cfg = TrainConfig(**(COMMON | setup), data=str(data), adapter_path=str(tmp / "ours"),
                      steps_per_eval=10_000, val_batches=1, save_every=10_000, db=str(tmp / "runs.db"))
    result = train(cfg, progress=False)
    store = RunStore(tmp / "runs.db")
    rows = store.metrics(result.run_id)
    store.close()

    def series(name):
        return [v for s, n, v in rows if n == name]

    loss_tps = series("loss_tokens_per_s")[1:]
    return {"loss_tokens_per_s": statistics.mean(loss_tps), "tokens_per_s": statistics.mean(series("tokens_per_s")[1:]),
            "steps_per_s": statistics.mean(series("steps_per_s")[1:]), "final_train_loss": result.final_train_loss}


def run_peer(setup: dict, data: Path, model_path: str, tmp: Path) -> dict:
    cfg = COMMON | setup | {"model": model_path, "data": str(data), "adapter_path": str(tmp / "peer"),
                            "train": True, "steps_per_eval": 10_000, "val_batches": 1, "save_every": 10_000}
    (tmp / "peer.yaml").write_text(json.dumps(cfg))
    env = dict(os.environ)
    st = mondrian.core.blas.status()
    if st.backend == "openblas":
        env["LD_PRELOAD"] = st.path
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run([sys.executable, "-m", "mlx_lm", "lora", "-c", str(tmp / "peer.yaml")],
                          capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode:
        raise RuntimeError(f"mlx_lm lora failed:\n{proc.stderr[-3000:]}")
    # mlx-lm's TrainUI lines: "  <iter>    <loss> ▼    <trained tokens/s>    <trained total>k"
    text = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout)
    reports = re.findall(r"^\s*(\d+)\s+([\d.]+) [▼▲]\s+([\d,]+)\s+[\d.]+k\s*$", text, re.M)
    if len(reports) < 2:
        raise RuntimeError(f"could not read mlx_lm's reports:\n{text[-3000:]}")
    later = reports[1:]
    return {"loss_tokens_per_s": statistics.mean(float(r[2].replace(",", "")) for r in later),
            "final_train_loss": float(reports[-1][1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,smollm2")
    ap.add_argument("--workspace", default=str(Path(tempfile.gettempdir()) / "mondrian-bench-ws"))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_train.json"))
    args = ap.parse_args()
    data = workspace_dataset(Path(args.workspace))
    results = {}
    for name in args.models.split(","):
        setup = SETUPS[name]
        card = resolve(setup["model"])
        tmp = Path(tempfile.mkdtemp(prefix=f"bench_train_{name}_"))
        try:
            peer = run_peer(setup, data, card.path, tmp)
            ours = run_ours(setup, data, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        ratio = ours["loss_tokens_per_s"] / peer["loss_tokens_per_s"]
        results[name] = {"setup": COMMON | setup, "mondrian": ours, "mlx_lm": peer, "ratio": round(ratio, 3)}
        print(f"{name:8} trained tokens/s: mondrian {ours['loss_tokens_per_s']:8.1f}  "
              f"mlx_lm lora {peer['loss_tokens_per_s']:8.1f}  ratio {ratio:.2f}x   "
              f"(final train loss {ours['final_train_loss']:.3f} vs {peer['final_train_loss']:.3f}; "
              f"mondrian effective (non-pad) tokens/s {ours['tokens_per_s']:.0f})")
    out = {"benchmark": "bench_train", "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores",
           "blas": mondrian.core.blas.status().to_dict(), "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
