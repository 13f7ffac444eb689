"""Single-request latency of the fit-query advisor: `mondrian serve` against `mlx_lm.server`,
in one run, plus what each decoder speed-up gives and the service's batch throughput.

Parts (`--parts`, all by default):

1. latency: `mlx_lm.server --model BASE --adapter-path V` (the peer: its LRU prompt cache on,
   greedy) and `mondrian serve` (contract-constrained decoding, prefix cache, fast-forward,
   gathered projection: the defaults) get the same questions one at a time, alternating,
   through the same official OpenAI client. The peer is sent the exact messages mondrian
   builds (system prompt and the version's retrieved examples: `prompt_messages`), so both
   prefill the same prompt (checked: usage.prompt_tokens equal). Recorded: p50 / p95 client
   latency, model calls per answer, forced-token share, prompt tokens served from the
   prefix cache. ratio = our p50 / the peer's p50 (target <= 0.25). Answers-equal: the
   service's answers against our plain loop (token-by-token constrained decoding, no prefix
   cache, full projection) on the same prompts, in-process.
2. ablation (in-process, one request at a time): p50 latency with the speed-ups switched on
   one after another: plain, + prefix cache, + fast-forward, + gathered projection, + overlap.
3. throughput: `bench_service.bench_throughput` (two arms v1:v2 through a `mondrian serve`
   subprocess, 16 concurrent clients, vs in-process `mlx_lm.batch_generate` at the same batch),
   free decoding on both sides (target >= 1.2x).
4. crossover: one row's gathered projection (argmax over k allowed tokens' rows of the output
   matrix) against the full masked projection, by k: where `DecodeOptions.gather_max` sits.
5. quant: prefill and decode-step times of the base in float32, 8-bit and 4-bit (mlx-lm's
   `nn.quantize`, group 64) on this machine, and exact match of the adapter's constrained
   answers on `--quant-rows` test-split rows with each base.

    python scripts/bench_latency.py [--questions 100] [--parts latency,ablation,throughput,crossover,quant]

Questions: the hand-written set (tests/data/fit_query_handwritten.jsonl) first, then the
demo test split, up to --questions. Adapter: --adapter, else the fit-query registry's
production version (`make demo` publishes one).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import mondrian  # first: preloads OpenBLAS before anything imports mlx.core

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from bench_service import ADV, Server, bench_throughput, machine, make_registry  # noqa: E402

from mondrian.core.contracts import get_advisor  # noqa: E402
from mondrian.core.retrieval import RetrievalIndex, prompt_messages  # noqa: E402

PARTS = ("latency", "ablation", "throughput", "crossover", "quant")
TARGETS = {"p50_ratio_max": 0.25, "throughput_ratio_min": 1.2, "absolute_p50_ms_goal": 200}


def pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else xs[0]


def load_questions(n: int, dataset: Path) -> list[str]:
    hand = [json.loads(line)["input"] for line in (ROOT / "tests/data/fit_query_handwritten.jsonl").open()]
    split = [[m for m in json.loads(line)["messages"] if m["role"] == "user"][-1]["content"]
             for line in (dataset / "test.jsonl").open()]
    return (hand + split)[:n]


def production(registry: Path) -> Path:
    aliases = json.loads((registry / ADV / "aliases.json").read_text())["aliases"]
    return registry / ADV / aliases["production"]


class Peer:
    """`python -m mlx_lm server` with the base and the adapter, on a free port, with the same
    BLAS as mondrian (LD_PRELOAD of what mondrian preloads)."""

    def __init__(self, base: Path, adapter: Path, log: Path, max_tokens: int):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        blas = mondrian.core.blas.status()
        if blas.backend == "openblas":
            env["LD_PRELOAD"] = blas.path
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlx_lm", "server", "--model", str(base), "--adapter-path", str(adapter),
             "--port", str(self.port), "--max-tokens", str(max_tokens), "--log-level", "WARNING"],
            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 300
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/v1/models", timeout=2).read()
                return
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"mlx_lm.server did not start:\n{log.read_text()[-2000:]}") from None
                time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return (time.perf_counter() - t) * 1000, out


def bench_latency(card, adapter: Path, registry: Path, tmp: Path, questions: list[str], index, max_tokens: int) -> dict:
    from openai import OpenAI

    adv = get_advisor(ADV)
    peer = Peer(card.path, adapter, tmp / "peer.log", max_tokens)
    ours = Server(tmp, "latency", "--advisor", ADV, "--model", "smollm2-135m", "--root", str(registry),
                  "--db", "", constrained=True)  # the service's default: decoding under the contract
    peer_client = OpenAI(base_url=f"{peer.url}/v1", api_key="none", max_retries=0)
    our_client = OpenAI(base_url=f"{ours.url}/v1", api_key="none", max_retries=0)

    def ask_peer(q):
        msgs, _ = prompt_messages(adv, q, index)
        return peer_client.chat.completions.create(model="default_model", messages=msgs, temperature=0.0,
                                                   max_tokens=max_tokens)

    def ask_ours(q):
        return our_client.chat.completions.create(model=ADV, messages=[{"role": "user", "content": q}],
                                                  temperature=0.0, max_tokens=max_tokens)

    rows = []
    try:
        for q in questions[:3]:  # warm-up: both servers compile, load, fill their prompt caches
            ask_peer(q)
            ask_ours(q)
        for i, q in enumerate(questions):
            first, second = (ask_peer, ask_ours) if i % 2 == 0 else (ask_ours, ask_peer)
            a = timed(lambda f=first, q=q: f(q))
            b = timed(lambda f=second, q=q: f(q))
            (pm, pr), (om, orr) = (a, b) if first is ask_peer else (b, a)
            u = orr.usage.model_dump()
            rows.append({"q": q, "peer_ms": pm, "ours_ms": om, "peer_text": pr.choices[0].message.content,
                         "ours_text": orr.choices[0].message.content, "peer_prompt": pr.usage.prompt_tokens,
                         "ours_prompt": u["prompt_tokens"], "peer_completion": pr.usage.completion_tokens,
                         "ours_completion": u["completion_tokens"],
                         "cached": u["prompt_tokens_details"]["cached_tokens"],
                         "calls": u["completion_tokens_details"]["model_calls"],
                         "forced": u["completion_tokens_details"]["forced_tokens"]})
            print(f"  {i + 1}/{len(questions)} peer {pm:7.0f} ms  ours {om:7.0f} ms  calls {rows[-1]['calls']:3d} "
                  f"forced {rows[-1]['forced']:3d}", flush=True)
    finally:
        peer.stop()
        ours.stop()
    peer_ms, ours_ms = [r["peer_ms"] for r in rows], [r["ours_ms"] for r in rows]
    tokens = sum(r["ours_completion"] for r in rows)
    return {"questions": len(rows), "max_tokens": max_tokens,
            "peer_p50_ms": statistics.median(peer_ms), "peer_p95_ms": pct(peer_ms, 95),
            "ours_p50_ms": statistics.median(ours_ms), "ours_p95_ms": pct(ours_ms, 95),
            "ratio_p50": statistics.median(ours_ms) / statistics.median(peer_ms),
            "ratio_p95": pct(ours_ms, 95) / pct(peer_ms, 95),
            "prompt_tokens_equal": sum(r["peer_prompt"] == r["ours_prompt"] for r in rows) / len(rows),
            "prompt_tokens_mean": statistics.mean(r["ours_prompt"] for r in rows),
            "cached_prompt_share": sum(r["cached"] for r in rows) / sum(r["ours_prompt"] for r in rows),
            "ours_model_calls_per_answer": statistics.mean(r["calls"] for r in rows),
            "ours_tokens_per_answer": tokens / len(rows),
            "peer_decode_steps_per_answer": statistics.mean(r["peer_completion"] for r in rows),
            "forced_token_share": sum(r["forced"] for r in rows) / tokens,
            "answers_equal_to_peer": sum(r["peer_text"] == r["ours_text"] for r in rows) / len(rows),
            "rows": rows}


def in_process(card, adapter: Path):
    from mlx_lm import load

    from mondrian.models.constrained import SchemaConstraint

    model, tok = load(str(card.path), adapter_path=str(adapter))
    model.eval()
    return model, tok, SchemaConstraint(get_advisor(ADV).schema, tok)


def plain_answers(loaded, prompts: list[list[int]], max_tokens: int) -> list[str]:
    """Token-by-token constrained decoding, no prefix cache, full projection: the reference."""
    from mondrian.models.decode import DecodeOptions
    from mondrian.models.generation import generate_batch

    model, tok, con = loaded
    out, _ = generate_batch(model, tok, prompts, batch_size=8, max_tokens=max_tokens,
                            logits_processors=[con.processor() for _ in prompts],
                            options=DecodeOptions(fast_forward=False, gather_max=0, overlap=False), prefix_cache=False)
    return [g.text for g in out]


ABLATION = [  # (name, prefix cache, options)
    ("plain", False, {"fast_forward": False, "gather_max": 0, "overlap": False}),
    ("+ prefix cache", True, {"fast_forward": False, "gather_max": 0, "overlap": False}),
    ("+ fast-forward", True, {"fast_forward": True, "gather_max": 0, "overlap": False}),
    ("+ gathered projection", True, {"fast_forward": True, "overlap": False}),
    ("+ overlap (all on)", True, {}),
]


def bench_ablation(loaded, prompts: list[list[int]], max_tokens: int) -> dict:
    from mondrian.models.decode import DecodeOptions, PrefixCache
    from mondrian.models.generation import generate_batch

    model, tok, con = loaded
    caches = {name: PrefixCache() for name, on, _ in ABLATION if on}
    lat: dict[str, list[float]] = {name: [] for name, _, _ in ABLATION}
    texts: dict[str, list[str]] = {name: [] for name, _, _ in ABLATION}
    for p in [prompts[0]] + prompts:  # the first prompt twice: warm-up (and a cache entry) for every arm
        for name, on, opts in ABLATION:  # interleaved: drift hits every arm alike
            ms, (out, _) = timed(lambda p=p, on=on, opts=opts, name=name: generate_batch(
                model, tok, [p], batch_size=1, max_tokens=max_tokens, logits_processors=[con.processor()],
                options=DecodeOptions(**opts), prefix_cache=caches[name] if on else False))
            lat[name].append(ms)
            texts[name].append(out[0].text)
    plain = texts["plain"][1:]
    return {"prompts": len(prompts), "p50_ms": {k: statistics.median(v[1:]) for k, v in lat.items()},
            "p95_ms": {k: pct(v[1:], 95) for k, v in lat.items()},
            "answers_equal_to_plain": {k: sum(a == b for a, b in zip(v[1:], plain, strict=True)) / len(plain)
                                       for k, v in texts.items()}}


def bench_crossover(card) -> dict:
    """The gathered projection's cost against the full one, for one row's last hidden state,
    by the number of allowed tokens: where gathering stops paying (DecodeOptions.gather_max)."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm import load

    from mondrian.models import upstream
    from mondrian.models.decode import gathered_argmax

    model, _ = load(str(card.path))
    _, head, weight = upstream.split_head(model)
    h = mx.random.normal((weight.shape[1],))
    vocab = weight.shape[0]
    rng = np.random.default_rng(0)

    def median_ms(fn, n=30):
        mx.eval(fn())
        times = []
        for _ in range(n):
            t = time.perf_counter()
            mx.eval(fn())
            times.append((time.perf_counter() - t) * 1000)
        return statistics.median(times)

    mask = np.ones(vocab, dtype=bool)
    full = median_ms(lambda: mx.argmax(mx.where(mx.array(mask), head(h[None])[0], -mx.inf)))
    out = {"full_ms": full, "vocab": vocab, "gathered_ms": {}}
    for k in (16, 256, 1024, 4096, 8192, 16384, 32768):
        allowed = np.zeros(vocab, dtype=bool)
        allowed[rng.choice(vocab, k, replace=False)] = True
        out["gathered_ms"][k] = median_ms(lambda a=allowed: gathered_argmax(h, weight, a)[1])
    out["crossover_tokens"] = max((k for k, ms in out["gathered_ms"].items() if ms < full), default=0)
    return out


def bench_quant(card, adapter: Path, dataset: Path, rows: int, max_tokens: int, index) -> dict:
    """Per base precision: a prompt's prefill and a 1-token decode step on their own, and the
    advisor's single-request latency and exact match (constrained, every speed-up on) on the
    first `rows` test-split rows, prompts built as the service builds them."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm import load
    from mlx_lm.tuner.utils import load_adapters

    lines = [json.loads(line)["messages"] for line in (dataset / "test.jsonl").open()][:rows]
    out = {}
    for bits in (None, 8, 4):
        model, tok = load(str(card.path))
        if bits:  # the base quantized, then the adapter's LoRA layers on it (mlx-lm's QLoRA order)
            nn.quantize(model, group_size=64, bits=bits)
        model = load_adapters(model, str(adapter))
        model.eval()
        name = "fp32" if bits is None else f"{bits}bit"
        out[name] = quant_arm(model, tok, lines, max_tokens, index)
        print(f"  {name}: {out[name]}", flush=True)
        del model
        mx.clear_cache()
    return out


def quant_arm(model, tok, lines: list[list[dict]], max_tokens: int, index) -> dict:
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from mondrian.evaluate.metrics import score_answer
    from mondrian.models.constrained import SchemaConstraint
    from mondrian.models.generation import chat_prompt, generate_batch

    adv = get_advisor(ADV)
    con = SchemaConstraint(adv.schema, tok)
    prompts = [chat_prompt(tok, prompt_messages(adv, m[-2]["content"], index)[0]) for m in lines]
    cache = make_prompt_cache(model)
    pre, _ = timed(lambda: mx.eval(model(mx.array([prompts[0]]), cache=cache)))
    step = min(timed(lambda: mx.eval(model(mx.array([[prompts[0][-1]]]), cache=cache)))[0] for _ in range(5))
    lat, exact = [], 0
    for p, m in zip(prompts, lines, strict=True):
        ms, (gens, _) = timed(lambda p=p: generate_batch(model, tok, [p], batch_size=1, max_tokens=max_tokens,
                                                         logits_processors=[con.processor()]))
        lat.append(ms)
        exact += score_answer(adv, json.loads(m[-1]["content"]), gens[0].text).exact  # as `mondrian eval` scores it
    return {"prefill_ms": pre, "prefill_tokens": len(prompts[0]), "decode_step_ms": step,
            "request_p50_ms": statistics.median(lat), "exact_match": exact / len(lines), "rows": len(lines)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=100)
    ap.add_argument("--ablation-questions", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--registry", default=str(ROOT / "adapters"))
    ap.add_argument("--adapter", help="adapter folder (default: the registry's fit-query production version)")
    ap.add_argument("--dataset", default=str(ROOT / "workspace/datasets/fit-query"))
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--throughput-prompts", type=int, default=32)
    ap.add_argument("--quant-rows", type=int, default=4,
                    help="test rows per base precision (a 4-bit prefill on CPU takes tens of seconds)")
    ap.add_argument("--out", default=str(ROOT / "scripts/results/bench_latency.json"))
    args = ap.parse_args()
    from mondrian.models.generation import chat_prompt
    from mondrian.models.sources import resolve

    parts = set(args.parts.split(","))
    card = resolve("smollm2-135m")
    registry = Path(args.registry)
    adapter = Path(args.adapter) if args.adapter else production(registry)
    dataset = Path(args.dataset)
    index_file = adapter / "retrieval_index.json"
    index = RetrievalIndex.load(index_file) if index_file.exists() else None
    questions = load_questions(args.questions, dataset)
    result = {"benchmark": "bench_latency", "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              **machine(), "model": "smollm2-135m", "adapter": str(adapter.relative_to(ROOT) if adapter.is_relative_to(ROOT) else adapter),
              "retrieval": index is not None, "targets": TARGETS}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if parts & {"latency", "ablation"}:  # one in-process load and the service's prompts, for both
            loaded = in_process(card, adapter)
            prompts = [chat_prompt(loaded[1], prompt_messages(get_advisor(ADV), q, index)[0]) for q in questions]
        if "latency" in parts:
            print("latency: mlx_lm.server vs mondrian serve, one request at a time", flush=True)
            lat = bench_latency(card, adapter, registry, tmp, questions, index, args.max_tokens)
            ref = plain_answers(loaded, prompts, args.max_tokens)
            lat["answers_equal_to_token_by_token"] = sum(
                r["ours_text"] == t for r, t in zip(lat["rows"], ref, strict=True)) / len(ref)
            result["latency"] = lat
        if "ablation" in parts:
            print("ablation: in-process, one request at a time", flush=True)
            result["ablation"] = bench_ablation(loaded, prompts[:args.ablation_questions], args.max_tokens)
        if "throughput" in parts:
            print("throughput: two arms through mondrian serve vs batch_generate", flush=True)
            # the adapter's weights without its retrieval index: batch_generate gets the plain
            # advisor prompts, so the service must serve the same ones
            plain = tmp / "plain-adapter"
            plain.mkdir()
            for name in ("adapters.safetensors", "adapter_config.json"):
                shutil.copy(adapter / name, plain / name)
            reg_root, info = make_registry(card, "smollm2-135m", tmp, str(plain))
            result["throughput"] = bench_throughput(card, "smollm2-135m", reg_root, tmp,
                                                    questions[:args.throughput_prompts], max_tokens=32,
                                                    max_batch=16, concurrency=16, rounds=2, diagnostics=False)
            result["throughput"]["adapters"] = info
        if "crossover" in parts:
            print("crossover: gathered vs full projection", flush=True)
            result["crossover"] = bench_crossover(card)
        if "quant" in parts:
            print("quant: float32 vs 8-bit vs 4-bit base", flush=True)
            result["quant"] = bench_quant(card, adapter, dataset, args.quant_rows, args.max_tokens, index)
    result["total_s"] = time.perf_counter() - t0
    met = {}
    if "latency" in result:
        met["p50_ratio"] = result["latency"]["ratio_p50"] <= TARGETS["p50_ratio_max"]
    if "throughput" in result:
        met["throughput_ratio"] = result["throughput"]["ratio"] >= TARGETS["throughput_ratio_min"]
    for part in parts & set(result):
        result[part]["when"] = result["when"]  # parts of one file may come from different runs
    out = Path(args.out)
    if parts != set(PARTS) and out.exists():  # a partial run updates its parts, keeps the others
        old = json.loads(out.read_text())
        for part in set(PARTS) - parts:
            if part in old:
                old[part].setdefault("when", old["when"])
        result = old | {k: v for k, v in result.items() if k != "met"}
    result["met"] = {**result.get("met", {}), **met}
    out.write_text(json.dumps(result, indent=1) + "\n")
    summary = {k: v for k, v in result.get("latency", {}).items() if k != "rows"}
    print(json.dumps({"latency": summary, "ablation": result.get("ablation"),
                      "throughput_ratio": result.get("throughput", {}).get("ratio"), "quant": result.get("quant"),
                      "met": met}, indent=1))


if __name__ == "__main__":
    main()
