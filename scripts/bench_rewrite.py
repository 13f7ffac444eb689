"""What showing a question rewritten costs: `Advisor.shown` per question, each rewrite setting on its own.

Times fit-query's `shown` (the one call training rows, evaluation and the service make) over the
hand-written set and the dataset's indexed questions, with the advisor's settings as shipped
and with each of `input_units`, `input_spelling` and `input_synonyms` turned off, and writes
scripts/results/bench_rewrite.json (README, Retrieval-augmented prompts).

    python scripts/bench_rewrite.py [--data workspace/datasets/fit-query] [--repeats 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import mondrian  # noqa: F401 - first: it loads the fast BLAS before mlx
from mondrian.core.contracts import get_advisor
from mondrian.core.retrieval import INDEX_FILE, RetrievalIndex

OUT = Path(__file__).parent / "results" / "bench_rewrite.json"
HANDWRITTEN = Path(__file__).parents[1] / "tests" / "data" / "fit_query_handwritten.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="workspace/datasets/fit-query", help="dataset folder (its retrieval index)")
    ap.add_argument("--repeats", type=int, default=5, help="passes over the questions per arm")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args()

    advisor = get_advisor("fit-query")
    index = RetrievalIndex.load(Path(args.data) / INDEX_FILE)
    speller = index.speller.warm()
    questions = [json.loads(line)["input"] for line in HANDWRITTEN.read_text().splitlines() if line.strip()]
    questions += [e.input for e in index.examples]
    arms = {"as shipped": advisor, "no input_synonyms": replace(advisor, input_synonyms=None),
            "no input_spelling": replace(advisor, input_spelling=False),
            "no input_units": replace(advisor, input_units=None)}
    result = {"questions": len(questions), "repeats": args.repeats, "ms_per_question": {}}
    for name, arm in arms.items():
        arm.shown("1 mw", speller)  # compiles its patterns and loads text2num, as a version load does
        start = time.perf_counter()
        for _ in range(args.repeats):
            for q in questions:
                arm.shown(q, speller)
        result["ms_per_question"][name] = round((time.perf_counter() - start) * 1000 / (args.repeats * len(questions)), 4)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    if args.json:
        print(json.dumps(result))
    else:
        for name, ms in result["ms_per_question"].items():
            print(f"{name:20s} {ms:.4f} ms a question ({len(questions)} questions x {args.repeats})")
        print(f"written: {OUT}")


if __name__ == "__main__":
    main()
