"""Text LoRA training on the tiny llama: exact resume after kill -9, best adapter, runs in SQLite."""

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest
import yaml

from mondrian.core.config import ConfigError
from mondrian.train.config import load_config
from mondrian.train.loop import TrainError
from mondrian.train.run import train
from mondrian.train.runs import RunStore
from tests.helpers import ROOT, pipeline_dataset


@pytest.fixture(scope="module")
def fit_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train") / "ws"
    return root, pipeline_dataset(root, "fit-query", n_fit=300, n_photo=0, seed=1)


def _config(tmp_path: Path, data: Path, **kw) -> Path:
    cfg = {"model": "tiny:llama", "data": str(data), "adapter_path": str(tmp_path / "run"),
           "advisor": "fit-query", "num_layers": 4, "batch_size": 4, "iters": 24,
           "learning_rate": 2e-3, "mask_prompt": True, "max_seq_length": 1024,
           "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.1}, "steps_per_report": 4,
           "steps_per_eval": 8, "val_batches": 2, "save_every": 4, "seed": 3} | kw
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _weights(folder: Path) -> dict:
    return mx.load(str(folder / "adapters.safetensors"))


def test_kill_9_then_resume_matches_an_uninterrupted_run(fit_data, tmp_path):
    """The acceptance test: SIGKILL mid-run, `--resume`, same final adapter (dropout on)."""
    _, data = fit_data
    straight = load_config(_config(tmp_path / "a", data))
    train(straight, progress=False)

    cfg_path = _config(tmp_path / "b", data)
    ckpts = tmp_path / "b" / "run" / "checkpoints"
    proc = subprocess.Popen([sys.executable, "-m", "mondrian.cli", "train", "--config", str(cfg_path),
                             "--no-progress"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (ckpts / "step-0000008" / "trainer_state.json").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "b" / "run" / "last").exists()  # it really died mid-run

    store = RunStore(data.parent.parent / "mondrian.db")
    killed = [r for r in store.list() if r["adapter_path"] == str((tmp_path / "b" / "run").resolve())]
    assert [r["status"] for r in killed] == ["interrupted"]  # pid gone: read as interrupted
    store.close()

    res = subprocess.run([sys.executable, "-m", "mondrian.cli", "train", "--config", str(cfg_path),
                          "--resume", "--json"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    resumed = json.loads(res.stdout)
    assert resumed["status"] == "completed" and resumed["steps"] == 24
    a, b = _weights(tmp_path / "a" / "run" / "last"), _weights(tmp_path / "b" / "run" / "last")
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert mx.allclose(a[k], b[k], atol=1e-6).item(), k
    assert not mx.allclose(a[next(iter(a))], mx.zeros_like(a[next(iter(a))])).item()


def test_resume_with_gradient_accumulation_is_exact(fit_data, tmp_path):
    """Accumulating 2 steps per update, with saves asked for at odd steps: checkpoints land on
    update boundaries only, so a run stopped (as a kill would) and resumed ends where an
    uninterrupted one does."""
    _, data = fit_data
    kw = {"iters": 11, "grad_accumulation_steps": 2, "save_every": 3, "steps_per_eval": 100,
          "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0}}
    train(load_config(_config(tmp_path / "a", data, **kw)), progress=False)
    cfg = load_config(_config(tmp_path / "b", data, **kw))
    assert train(cfg, progress=False, stop_after=5).status == "interrupted"
    saved = sorted(p.name for p in (tmp_path / "b" / "run" / "checkpoints").iterdir())
    assert saved == ["step-0000004"]  # asked at 3, written at the boundary after it
    assert train(cfg, resume=True, progress=False).steps == 11
    a, b = _weights(tmp_path / "a" / "run" / "last"), _weights(tmp_path / "b" / "run" / "last")
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert mx.allclose(a[k], b[k], atol=1e-6).item(), k


def test_best_adapter_and_run_record(fit_data, tmp_path):
    root, data = fit_data
    result = train(load_config(_config(tmp_path, data, iters=16, steps_per_eval=4)), progress=False)
    out = Path(result.adapter_path)
    assert result.status == "completed" and result.first_val_loss > result.best_val_loss
    store = RunStore(root / "mondrian.db")
    run = store.get(result.run_id)
    vals = [(s, v) for s, n, v in store.metrics(result.run_id) if n == "val_loss"]
    trains = [v for s, n, v in store.metrics(result.run_id) if n == "train_loss"]
    store.close()
    assert run["status"] == "completed" and run["advisor"] == "fit-query"
    assert run["dataset_fingerprint"] and len(run["base_model_fingerprint"]) == 64
    assert [s for s, _ in vals] == [0, 4, 8, 12, 16] and len(trains) == 4
    best_step, best_val = min(vals, key=lambda sv: sv[1])
    assert json.loads((out / "best" / "best.json").read_text())["step"] == best_step
    assert result.best_val_loss == pytest.approx(best_val)
    assert (out / "adapters.safetensors").read_bytes() == (out / "best" / "adapters.safetensors").read_bytes()
    assert (out / "loss_curve.svg").read_text().startswith("<svg")

    from mlx_lm import generate, load  # the peer loads our adapter folder as its own

    model, tok = load(_tiny_path(), adapter_path=str(out))
    assert isinstance(generate(model, tok, "wind in kent", max_tokens=3), str)


def _tiny_path() -> str:
    from mondrian.models.sources import resolve

    return resolve("tiny:llama").path


def test_early_stopping(fit_data, tmp_path):
    _, data = fit_data
    result = train(load_config(_config(tmp_path, data, learning_rate=1.0, iters=40, steps_per_eval=2,
                                       early_stopping_patience=2)), progress=False)
    assert result.stopped_early and result.steps < 40 and result.status == "completed"


def test_errors_before_training(fit_data, tmp_path):
    _, data = fit_data
    n_train, n_valid = (len((data / f"{s}.jsonl").read_text().splitlines()) for s in ("train", "valid"))
    assert n_valid < 40 < n_train < 1000
    with pytest.raises(TrainError, match=f"train split has {n_train} rows, fewer than batch_size 1000"):
        train(load_config(_config(tmp_path, data, batch_size=1000)), progress=False)
    with pytest.raises(TrainError, match=f"valid split has {n_valid} rows, fewer than batch_size 40"):
        train(load_config(_config(tmp_path, data, batch_size=40)), progress=False)
    with pytest.raises(TrainError, match="longer than max_seq_length 16 and would be truncated"):
        train(load_config(_config(tmp_path, data, max_seq_length=16)), progress=False)
    with pytest.raises(TrainError, match="does not exist"):
        train(load_config(_config(tmp_path, tmp_path / "nope")), progress=False)
    with pytest.raises(TrainError, match="num_layers 7 > the model's 6 language layers"):
        train(load_config(_config(tmp_path, data, num_layers=7)), progress=False)
    with pytest.raises(TrainError, match="no Linear 'self_attn.nope' in block model.layers.2"):
        train(load_config(_config(tmp_path, data, lora_parameters={"rank": 4, "scale": 10.0, "dropout": 0.0,
                                                                  "keys": ["self_attn.nope"]})), progress=False)
    with pytest.raises(ConfigError, match="unknown key\\(s\\) learning_rat "):
        load_config(_config(tmp_path, data, learning_rat=1e-3))
    with pytest.raises(ConfigError, match="alpha"):
        load_config(_config(tmp_path, data, lora_parameters={"rank": 8, "alpha": 16}))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_tokenizer_model_mismatch_is_refused(fit_data, tmp_path, smollm2):
    import shutil

    from mondrian.models.sources import resolve

    _, data = fit_data
    mixed = tmp_path / "mixed"
    shutil.copytree(resolve("tiny:llama").path, mixed)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(smollm2.path) / name, mixed / name)
    (mixed / "mondrian_model.json").unlink()
    with pytest.raises(TrainError, match="tokenizer and model do not match"):
        train(load_config(_config(tmp_path, data, model=str(mixed))), progress=False)


def test_runs_cli(fit_data, tmp_path):
    from click.testing import CliRunner

    from mondrian.cli import cli

    root, data = fit_data
    runner = CliRunner()
    res = runner.invoke(cli, ["train", "--config", str(_config(tmp_path, data, iters=8)), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "completed after 8 steps" in res.output
    listed = json.loads(runner.invoke(cli, ["runs", "list", "--db", str(root / "mondrian.db"), "--json"]).output)
    run_id = listed[0]["run_id"]
    shown = runner.invoke(cli, ["runs", "show", run_id, "--db", str(root / "mondrian.db"),
                                "--svg", str(tmp_path / "c.svg")])
    assert shown.exit_code == 0 and "val_loss" in shown.output and (tmp_path / "c.svg").is_file()
    res = runner.invoke(cli, ["train", "--config", str(_config(tmp_path, data, iters=8))])
    assert res.exit_code == 1 and "--resume" in res.output  # will not overwrite a run's checkpoints


def test_validation_subset_spans_all_lengths():
    from mondrian.train.text import Split, val_batches

    split = Split("valid", [[1] * n for n in range(10, 110)], [0] * 100)
    chosen = val_batches(split, batch_size=4, n=5)
    lengths = [len(split.tokens[i]) for b in chosen for i in b]
    assert len(chosen) == 5 and min(lengths) == 10 and max(lengths) == 109  # not just the shortest
    assert len(val_batches(split, batch_size=4, n=-1)) == 25
    assert len(val_batches(split, batch_size=4, n=1)) == 1


def test_batches_are_random_draws_by_default():
    """Length bucketing makes each batch one kind of row; it cost quality (README, Training), so
    by default a batch is a random draw. Either way every row trains once per epoch and the plan
    is a pure function of (seed, epoch), which exact resume needs."""
    from mondrian.train.config import TrainConfig
    from mondrian.train.text import batch_plan

    lengths = [100 + (i * 37) % 200 for i in range(200)]  # 200 rows, lengths 100..299

    def spread(plan: list[list[int]]) -> float:  # mean (longest - shortest) inside a batch
        return statistics.mean(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in plan)

    default = batch_plan(lengths, 8, seed=0, epoch=0, bucket=TrainConfig().bucket_batches)
    bucketed = batch_plan(lengths, 8, seed=0, epoch=0, bucket=8)
    for plan in (default, bucketed):
        assert sorted(i for b in plan for i in b) == list(range(200))
    assert default == batch_plan(lengths, 8, seed=0, epoch=0, bucket=TrainConfig().bucket_batches)
    assert default != batch_plan(lengths, 8, seed=0, epoch=1, bucket=TrainConfig().bucket_batches)
    assert spread(bucketed) < 40 < 100 < spread(default)


def test_sigterm_validates_the_step_it_stops_at(fit_data, tmp_path):
    """Stopped between evaluations, the run measures its last step, so the adapter kept as
    the best is not the untrained one that only step 0 was measured against."""
    _, data = fit_data
    cfg_path = _config(tmp_path, data, iters=400, steps_per_eval=1000, save_every=1000)
    proc = subprocess.Popen([sys.executable, "-m", "mondrian.cli", "train", "--config", str(cfg_path), "--json"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    db = data.parent.parent / "mondrian.db"
    deadline = time.time() + 300
    while True:  # wait for the first training report (step 4), then stop the run
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() < deadline, "no training report in time"
        store = RunStore(db)
        mine = [r for r in store.list() if r["adapter_path"] == str((tmp_path / "run").resolve())]
        reported = mine and any(n == "train_loss" for _, n, _ in store.metrics(mine[0]["run_id"]))
        store.close()
        if reported:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    result = json.loads(out)
    assert result["status"] == "interrupted" and 4 <= result["steps"] < 400, err[-2000:]
    store = RunStore(db)
    vals = [(s, v) for s, n, v in store.metrics(result["run_id"]) if n == "val_loss"]
    store.close()
    assert [s for s, _ in vals] == [0, result["steps"]]
    best = json.loads((tmp_path / "run" / "best" / "best.json").read_text())
    assert best["step"] == (result["steps"] if vals[1][1] < vals[0][1] else 0)


def test_init_adapter_starts_a_new_run_from_an_adapters_weights(fit_data, tmp_path):
    """`init_adapter`: the new run's step-0 validation loss is the given adapter's own (the
    weights were loaded, not a fresh LoRA init), and an adapter of another layout is refused."""
    _, data = fit_data
    kw = {"iters": 4, "steps_per_eval": 4, "save_every": 4,
          "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0}}
    first = train(load_config(_config(tmp_path / "a", data, **kw)), progress=False)
    adapter = tmp_path / "a" / "run"  # the best adapter by validation loss
    second = train(load_config(_config(tmp_path / "b", data, init_adapter=str(adapter), **kw)), progress=False)
    assert second.first_val_loss == pytest.approx(first.best_val_loss, rel=1e-5)
    assert abs(second.first_val_loss - first.first_val_loss) > 1e-3  # not where a fresh run starts
    other = kw | {"lora_parameters": {"rank": 8, "scale": 10.0, "dropout": 0.0}}
    with pytest.raises(TrainError, match=r"init_adapter .*rank 4 \(config: 8\)"):
        train(load_config(_config(tmp_path / "c", data, init_adapter=str(adapter), **other)), progress=False)
    with pytest.raises(TrainError, match="no adapters.safetensors"):
        train(load_config(_config(tmp_path / "d", data, init_adapter=str(tmp_path), **kw)), progress=False)


def _chat_rows(n: int, shots: int) -> list[dict]:
    """Chat rows as retrieval builds them: a system prompt, `shots` solved examples, the question."""
    rows = []
    for i in range(n):
        turns = [{"role": "system", "content": "Answer in JSON."}]
        for j in range(shots + 1):
            turns += [{"role": "user", "content": f"wind sites in kent over {10 * i + j} kw"},
                      {"role": "assistant", "content": json.dumps({"capacity_min_kw": 10 * i + j})}]
        rows.append({"messages": turns})
    return rows


def test_answer_turns_all_puts_loss_on_every_answer_and_validates_on_the_last(tmp_path):
    """answer_turns: all trains each solved example of a retrieval row as well as its answer:
    the spans are exactly the assistant turns (decoded back), the gathered loss equals the plain
    masked cross-entropy over the same positions, and validation scores the last answer only."""
    import mlx.nn as nn
    import numpy as np
    from mlx_lm import load

    from mondrian.train.config import TrainConfig
    from mondrian.train.text import load_split, loss_positions, make_batch, make_loss

    data = tmp_path / "data"
    data.mkdir()
    for name, n in (("train", 8), ("valid", 8)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _chat_rows(n, shots=2)))
    model, tok = load(_tiny_path())
    last = load_split(data, "train", tok, mask_prompt=True)
    every = load_split(data, "train", tok, mask_prompt=True, all_turns=True)
    assert last.earlier is None and last.tokens == every.tokens and last.offsets == every.offsets
    row = _chat_rows(8, shots=2)[3]["messages"]
    spans = every.earlier[3]
    assert len(spans) == 2  # the two solved examples; the last answer is the offset's
    for (s, e), answer in zip(spans, (row[2]["content"], row[4]["content"]), strict=True):
        assert tok.decode(every.tokens[3][s:e]).startswith(answer)  # the answer, then the end-of-turn
        assert answer not in tok.decode(every.tokens[3][:s])[-len(answer):]

    idx = list(range(4))
    batch, lengths = make_batch(every, idx, 1024)
    pos_last, valid_last = loss_positions(np.array(lengths), batch.shape[1])
    pos_all, valid_all = loss_positions(np.array(lengths), batch.shape[1], [every.earlier[i] for i in idx])
    answer_tokens = sum(e - s for i in idx for s, e in every.earlier[i])
    assert valid_all.sum().item() == valid_last.sum().item() + answer_tokens
    # by hand: cross-entropy of every target position inside an answer, averaged
    logits = model(batch[:, :-1])
    hand = []
    for r in idx:
        toks = every.tokens[r]
        for s, e in [*every.earlier[r], (every.offsets[r], len(toks))]:
            for t in range(s, e):  # token t is predicted at position t - 1
                hand.append(nn.losses.cross_entropy(logits[r, t - 1][None], mx.array([toks[t]])).item())
    for answer_only in (True, False):
        loss, ntoks = make_loss(model, answer_only)(model, batch, lengths, pos_all, valid_all)
        assert ntoks.item() == len(hand)
        assert loss.item() == pytest.approx(sum(hand) / len(hand), rel=1e-4)

    with pytest.raises(ConfigError, match="answer_turns must be 'last' or 'all'"):
        TrainConfig(answer_turns="some").check()
    with pytest.raises(ConfigError, match="answer_turns: all needs mask_prompt: true"):
        TrainConfig(answer_turns="all", mask_prompt=False).check()


def test_answer_turns_all_run_validates_like_last(tmp_path):
    """The same data and seed: training on every answer takes more loss tokens per step, and
    step 0's validation loss (before any update) is the same number: the last answers' loss."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train", "valid"):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _chat_rows(8, shots=2)))
    runs = {turns: train(load_config(_config(tmp_path / turns, data, iters=2, steps_per_eval=2, save_every=2,
                                             answer_turns=turns)), progress=False)
            for turns in ("last", "all")}
    assert runs["all"].status == runs["last"].status == "completed"
    assert runs["all"].first_val_loss == pytest.approx(runs["last"].first_val_loss, rel=1e-6)
    assert runs["all"].loss_tokens > 2 * runs["last"].loss_tokens  # three answers a row instead of one


def test_mix_alpha_draws_rare_answer_shapes_more_often():
    """mix_alpha 1 is the data's own mix (every row once an epoch); 0.5 gives each answer shape
    a share proportional to the square root of its count; 0 makes shapes equally common. The
    plan stays a pure function of (seed, epoch)."""
    from collections import Counter

    from mondrian.train.config import TrainConfig
    from mondrian.train.text import answer_shape, batch_plan, mix_weights

    def row(answer) -> dict:
        return {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}]}

    assert answer_shape(row('{"technology":"Wind","query_type":"search"}')) == "query_type,technology"
    assert answer_shape(row("not json")) == answer_shape(row("[1]")) == ""
    shapes = ["common"] * 900 + ["rare"] * 100  # 9:1
    assert mix_weights(shapes, 1.0) is None
    for alpha, rare_share in ((0.5, 1 / 4), (0.0, 1 / 2)):  # sqrt: 30:10; flat: 1:1
        w = mix_weights(shapes, alpha)
        assert w.sum() == pytest.approx(1.0) and w[900:].sum() == pytest.approx(rare_share)
        plan = batch_plan([10] * 1000, 8, seed=0, epoch=0, bucket=1, weights=w)
        assert plan == batch_plan([10] * 1000, 8, seed=0, epoch=0, bucket=1, weights=w)
        drawn = Counter(shapes[i] for b in plan for i in b)
        assert sum(drawn.values()) == 1000
        assert drawn["rare"] / 1000 == pytest.approx(rare_share, abs=0.05)
    with pytest.raises(ConfigError, match="mix_alpha must be a number from 0 to 1"):
        TrainConfig(mix_alpha=2).check()


def test_the_stratified_mix_spreads_each_shape_and_repeats_no_row():
    """mix_draw: stratified gives every shape its count**alpha quota, spread through the epoch
    (a run of the first 300 steps holds each share to within 2 rows, where random draws
    miss by chance), and repeats no row while its shape has rows left."""
    from collections import Counter

    import numpy as np

    from mondrian.train.config import TrainConfig
    from mondrian.train.text import batch_plan, stratified_order

    shapes = ["a"] * 700 + ["b"] * 200 + ["c"] * 90 + ["d"] * 10
    counts = Counter(shapes)
    share = {k: v ** 0.75 for k, v in counts.items()}
    total = sum(share.values())
    plan = batch_plan([10] * 1000, 1, seed=3, epoch=0, bucket=1, strata=(shapes, 0.75))
    assert plan == batch_plan([10] * 1000, 1, seed=3, epoch=0, bucket=1, strata=(shapes, 0.75))
    assert plan != batch_plan([10] * 1000, 1, seed=3, epoch=1, bucket=1, strata=(shapes, 0.75))
    order = [b[0] for b in plan]
    assert len(order) == 1000
    full = Counter(shapes[i] for i in order)
    for k in counts:
        assert abs(full[k] - 1000 * share[k] / total) < 1  # the quota, rounded
        first = Counter(shapes[i] for i in order[:300])
        assert abs(first[k] - 300 * share[k] / total) <= 2  # spread, not bunched
        drawn = [i for i in order if shapes[i] == k]
        # without replacement: a row comes back only after its shape's every row was drawn
        assert len(set(drawn[:counts[k]])) == min(len(drawn), counts[k])
    # alpha 1 is the data's own mix: one permutation of the rows
    assert sorted(stratified_order(shapes, 1.0, np.random.default_rng(0))) == list(range(1000))
    with pytest.raises(ConfigError, match="mix_draw must be"):
        TrainConfig(mix_draw="sorted").check()


def test_a_shorter_run_replans_the_recipes_cosine_decay():
    """A 64-step run of the recipe (the demo's length when this was written): the replanned
    schedule warms up in proportion and ends at the recipe's last rate, where the recipe's own
    schedule would still be near its peak at step 64 (an adapter trained so ended worse than
    step 0 in make demo)."""
    from mlx_lm.tuner.utils import build_schedule

    from mondrian.train.config import scaled_schedule

    recipe = load_config(ROOT / "lora" / "fit-query.yaml")
    peak, _, last = recipe.lr_schedule["arguments"]
    short = scaled_schedule(recipe.lr_schedule, recipe.iters, 64)
    assert short["warmup"] == round(recipe.lr_schedule["warmup"] * 64 / recipe.iters)
    lr = build_schedule(short)
    assert float(lr(short["warmup"])) == pytest.approx(peak, rel=1e-6)
    assert float(lr(64)) == pytest.approx(last, rel=0.05)  # mlx-lm counts the joined steps from 1
    assert float(build_schedule(recipe.lr_schedule)(64)) > 0.9 * peak
    assert scaled_schedule(recipe.lr_schedule, recipe.iters, recipe.iters) == recipe.lr_schedule
    assert scaled_schedule({"name": "linear_schedule", "arguments": [1e-4, 0, 10]}, 300, 64)["arguments"] == [1e-4, 0, 10]
    assert scaled_schedule(None, 300, 64) is None


def test_cli_iters_override_replans_the_cosine_schedule(fit_data, tmp_path):
    """`mondrian train --iters 8` on a config planned for 40 steps: the run's schedule warms up
    in proportion and decays over the 8 steps (recorded in adapter_config.json), and the rate
    logged at its last report is the schedule's last, not near the peak."""
    from click.testing import CliRunner

    from mondrian.cli import cli

    root, data = fit_data
    schedule = {"name": "cosine_decay", "warmup": 5, "arguments": [2e-3, 35, 1e-5]}
    config = _config(tmp_path, data, iters=40, lr_schedule=schedule, steps_per_eval=100)
    res = CliRunner().invoke(cli, ["train", "--config", str(config), "--iters", "8", "--no-progress"])
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert saved["iters"] == 8 and saved["lr_schedule"] == schedule | {"warmup": 1, "arguments": [2e-3, 7, 1e-5]}
    store = RunStore(root / "mondrian.db")
    try:
        run = store.list(kind="train")[0]
        rates = store.metrics(run["run_id"], "learning_rate")
    finally:
        store.close()
    assert run["config"]["lr_schedule"] == saved["lr_schedule"]
    # the 40-step plan would still be at 1.98e-3 (of a 2e-3 peak) at step 8; the replanned one
    # logs the rate of its next-to-last updates, well down the decay
    assert rates and rates[-1][0] == 8 and rates[-1][2] < 0.25 * 2e-3
