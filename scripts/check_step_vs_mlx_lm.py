"""Is our training step mlx-lm's? Same base, same LoRA init, same batches, N steps each.

Runs `mondrian.train.text.make_step` (compiled, answer-only logits) for N steps, then puts the
LoRA weights back to their initial values and runs `mlx_lm.tuner.trainer.train` on exactly the
same batches (our batch plan, our padding), and compares the adapters tensor by tensor.

mlx-lm's `default_loss` counts one position per row more than ours: its mask reaches one past
the last token, so it also trains the pad id (SmolLM2: `<|endoftext|>`) after every row. By
default the mlx-lm side is given the same positions as ours (its loss with each row's length
minus one) so the two steps can be compared; `--pad-target` keeps mlx-lm's extra position.

    python scripts/check_step_vs_mlx_lm.py [--steps 3] [--pad-target] [--data DIR]

Prints and writes scripts/results/check_step_vs_mlx_lm.json: per-step losses of both, and the
largest relative difference (max |ours - theirs| / max |theirs|) over the LoRA tensors.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import mondrian  # noqa: F401 - loads OpenBLAS; mlx is imported after it, in main()

ROOT = Path(__file__).resolve().parents[1]


def _lora(model) -> dict:
    import numpy as np
    from mlx.utils import tree_flatten

    return {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}


def main() -> None:
    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.tuner.trainer import TrainingArgs, default_loss
    from mlx_lm.tuner.trainer import train as mlx_lm_train

    from mondrian.models.sources import resolve
    from mondrian.train.config import TrainConfig, make_optimizer
    from mondrian.train.distributed import world
    from mondrian.train.text import (
        batch_plan,
        load_split,
        make_batch,
        make_loss,
        make_step,
        prepare_model,
    )

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--pad-target", action="store_true", help="keep mlx-lm's extra loss position per row")
    ap.add_argument("--data", default=str(ROOT / "workspace" / "datasets" / "fit-query-plain"))
    ap.add_argument("--out", default=str(ROOT / "scripts" / "results" / "check_step_vs_mlx_lm.json"))
    args = ap.parse_args()
    # the recipe bench_quality's seeds part runs
    cfg = TrainConfig(model="smollm2-135m", data=args.data, num_layers=16, batch_size=8, learning_rate=2e-4,
                      lora_parameters={"rank": 8, "scale": 20.0, "dropout": 0.0}, mask_prompt=True,
                      max_seq_length=256, iters=args.steps, seed=0)
    mx.random.seed(cfg.seed)
    model, tokenizer = load(resolve(cfg.model).path)
    split = load_split(Path(args.data), "train", tokenizer, cfg.mask_prompt)
    prepare_model(model, cfg)
    init = [(k, mx.array(v)) for k, v in tree_flatten(model.trainable_parameters())]
    mx.eval([v for _, v in init])

    step = make_step(model, make_optimizer(cfg), make_loss(model, cfg.answer_only_logits), split, cfg,
                     world())
    model.train()
    t0 = time.perf_counter()
    ours_losses = [step(n)[0] for n in range(1, cfg.iters + 1)]
    ours_s = time.perf_counter() - t0
    ours = _lora(model)

    model.load_weights(init, strict=False)
    mx.eval(model.parameters())
    plan = batch_plan([len(t) for t in split.tokens], cfg.batch_size, cfg.seed, 0, cfg.bucket_batches)

    def batches(dataset, batch_size, max_seq_length, loop=False, seed=None, comm_group=None):
        for idx in plan[:cfg.iters]:
            yield make_batch(split, idx, cfg.max_seq_length)

    def loss(model, batch, lengths):
        if not args.pad_target:  # our positions: up to the row's last token, not one past it
            lengths = mx.stack([lengths[:, 0], lengths[:, 1] - 1], axis=1)
        return default_loss(model, batch, lengths)

    theirs_losses: list[float] = []

    class Record:
        def on_train_loss_report(self, info: dict) -> None:  # every step: steps_per_report is 1
            theirs_losses.append(info["train_loss"])

        def on_val_loss_report(self, info: dict) -> None:
            pass

    targs = TrainingArgs(batch_size=cfg.batch_size, iters=cfg.iters, steps_per_report=1, steps_per_eval=10**9,
                         steps_per_save=10**9, max_seq_length=cfg.max_seq_length,
                         adapter_file=str(Path(args.out).with_suffix(".safetensors")))
    t0 = time.perf_counter()
    mlx_lm_train(model, optim.Adam(learning_rate=cfg.learning_rate), split, None, targs, loss=loss,
                 iterate_batches=batches, training_callback=Record())
    theirs_s = time.perf_counter() - t0
    Path(targs.adapter_file).unlink(missing_ok=True)
    theirs = _lora(model)
    rel = {k: float(np.abs(ours[k] - theirs[k]).max() / (np.abs(theirs[k]).max() + 1e-12)) for k in ours}
    worst = max(rel, key=rel.get)
    result = {"check": "step_vs_mlx_lm", "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "steps": cfg.iters, "pad_target": args.pad_target, "data": args.data,
              "ours_losses": [round(x, 5) for x in ours_losses], "mlx_lm_losses": [round(x, 5) for x in theirs_losses],
              "max_relative_difference": round(rel[worst], 6), "worst_tensor": worst,
              "ours_s": round(ours_s, 1), "mlx_lm_s": round(theirs_s, 1)}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
