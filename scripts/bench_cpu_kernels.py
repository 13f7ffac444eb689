"""mondrian's CPU kernels (mondrian.models.cpu_kernels) against the stock MLX ops, in one run.

Per op: nanoseconds an element for exp, softmax and SiLU on a 4M-element float32 array.
Per model: SmolLM2-135M on rows of the fit-query train split (batch 8, loss on every
answer, LoRA rank 8 on the last 16 layers, as lora/fit-query.yaml): the forward pass, and
the loss with its gradient (what a training step computes), with the kernels (default) and
with MONDRIAN_CPU_KERNELS=off (mlx-lm's model code as shipped), alternating, the best of
`--repeats`. Timings on a shared 2-core machine drift by tens of percent across minutes:
compare the two columns, measured back to back, not runs at different times.

    python scripts/bench_cpu_kernels.py [--data workspace/datasets/fit-query] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

# isort: off
import mondrian  # noqa: F401 - preloads OpenBLAS before mlx is imported
# isort: on
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402

from mondrian.models import cpu_kernels, upstream  # noqa: E402
from mondrian.models.sources import resolve  # noqa: E402
from mondrian.train import text  # noqa: E402


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up: graph, allocations, JIT-compiled kernels
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def both(fn, repeats: int) -> dict:
    """fn timed with the kernels and without, alternating so drift hits both sides alike."""
    times = {"stock": float("inf"), "mondrian": float("inf")}
    for _ in range(repeats):
        for side, env in (("stock", "off"), ("mondrian", "on")):
            os.environ["MONDRIAN_CPU_KERNELS"] = env
            times[side] = min(times[side], best_of(fn, 1))
    os.environ.pop("MONDRIAN_CPU_KERNELS", None)
    return times | {"speedup": times["stock"] / times["mondrian"]}


def ops(repeats: int) -> dict:
    x = mx.random.normal((4_000_000,)) * 4
    s = mx.random.normal((8, 9, 128, 432))
    mx.eval(x, s)
    pairs = {"exp": (lambda: mx.exp(x), lambda: cpu_kernels.exp(x), x.size),
             "softmax": (lambda: mx.softmax(s, axis=-1), lambda: cpu_kernels.softmax(s), s.size),
             "silu": (lambda: nn.silu(x), lambda: cpu_kernels.silu(x), x.size)}
    out = {}
    for name, (stock, ours, n) in pairs.items():
        a = best_of(lambda f=stock: mx.eval(f()), repeats) / n * 1e9
        b = best_of(lambda f=ours: mx.eval(f()), repeats) / n * 1e9
        out[name] = {"stock_ns_per_element": a, "mondrian_ns_per_element": b, "speedup": a / b}
        print(f"{name:8} stock {a:6.2f} ns/el   mondrian {b:6.2f} ns/el   x{a / b:.2f}", flush=True)
    return out


def model_steps(data: Path, repeats: int) -> dict:
    from mlx_lm.tuner.utils import linear_to_lora_layers

    card = resolve("smollm2-135m")
    model, tokenizer = upstream.load_lm(card.path)
    split = text.load_split(data, "train", tokenizer, mask_prompt=True, all_turns=True)
    idx = np.random.default_rng(0).choice(len(split), 8, replace=False).tolist()
    batch, lengths = text.make_batch(split, idx, 512)
    positions, valid = text.loss_positions(np.array(lengths), batch.shape[1], [split.earlier[i] for i in idx])
    model.freeze()
    linear_to_lora_layers(model, 16, {"rank": 8, "scale": 20.0, "dropout": 0.0})
    loss_and_grad = nn.value_and_grad(model, text.make_loss(model, answer_only=True))

    def forward():
        mx.eval(model(batch[:, :-1]))

    def step():
        (loss, _), grad = loss_and_grad(model, batch, lengths, positions, valid)
        mx.eval(loss, grad)

    out = {"batch": list(batch.shape), "loss_positions": int(valid.sum().item())}
    for name, fn in (("forward", forward), ("loss_and_gradient", step)):
        out[name] = both(fn, repeats)
        r = out[name]
        print(f"{name:18} stock {r['stock']:6.2f} s   mondrian {r['mondrian']:6.2f} s   x{r['speedup']:.2f}",
              flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="workspace/datasets/fit-query", type=Path)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_cpu_kernels.json"))
    args = ap.parse_args()
    result = {"when": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "machine": platform.platform(),
              "cpus": os.cpu_count(), "mlx": mx.__version__, "ops": ops(args.repeats),
              "smollm2_135m": model_steps(args.data, args.repeats)}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
