"""How sure an adapter is of a capacity bound's direction: teacher-forced on the test split.

For every test row whose answer holds exactly one capacity bound, the expected answer is fed up
to the bound's key, and the script prints the probability the adapter gives `capacity_max_kw`
against `capacity_min_kw` at the one token where the two keys differ. A right but unsure
model reads near 0.5; a model that has not learnt a phrase reads near the wrong end. (README,
Training: "The bound direction is not a near tie".)

    python scripts/probe_bounds.py ADAPTER [--data workspace/datasets/fit-query] [--json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import mondrian  # noqa: F401 - first: it loads the fast BLAS before mlx

MIN, MAX = "capacity_min_kw", "capacity_max_kw"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("adapter", help="adapter folder (e.g. workspace/runs/fit-query-...)")
    ap.add_argument("--data", default="workspace/datasets/fit-query", help="dataset folder")
    ap.add_argument("--model", default="smollm2-135m", help="base model spec")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args()

    import mlx.core as mx

    from mondrian.models.sources import resolve
    from mondrian.models.upstream import load_lm

    model, tok = load_lm(str(resolve(args.model).path), adapter_path=args.adapter)
    key_min = tok.encode(f'"{MIN}"', add_special_tokens=False)
    key_max = tok.encode(f'"{MAX}"', add_special_tokens=False)
    at = next(i for i, (a, b) in enumerate(zip(key_min, key_max, strict=False)) if a != b)
    out = []
    for line in (Path(args.data) / "test.jsonl").read_text().splitlines():
        messages = json.loads(line)["messages"]
        answer = messages[-1]["content"]
        fields = json.loads(answer)
        if (MIN in fields) == (MAX in fields):
            continue
        key = MAX if MAX in fields else MIN
        prefix = answer[: answer.index(f'"{key}"')]
        prompt = tok.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False) + prefix
        ids = tok.encode(prompt, add_special_tokens=False) + key_min[:at]
        p = mx.softmax(model(mx.array([ids]))[0, -1].astype(mx.float32))
        p_min, p_max = p[key_min[at]].item(), p[key_max[at]].item()
        out.append({"expected": key, "p_max": round(p_max / (p_min + p_max), 4), "question": messages[-2]["content"]})
    out.sort(key=lambda r: (r["expected"], r["p_max"]))
    if args.json:
        print(json.dumps(out, indent=1))
        return
    for r in out:
        print(f"expects {r['expected'][9:12]}  P(max | min or max) = {r['p_max']:.3f}  {r['question']}")
    wrong = sum((r["p_max"] > 0.5) != (r["expected"] == MAX) for r in out)
    print(f"{len(out)} rows with one bound; {wrong} lean the wrong way")


if __name__ == "__main__":
    main()
