"""Which similarity should pick a question's solved examples? Measured, not assumed.

The index is the demo workspace's fit-query train split (one example per normalized input, as
`mondrian dataset` builds it). The queries are the valid and test splits, and the hand-written
set (tests/data/fit_query_handwritten.jsonl: typos, abbreviations, short questions). A field of
the expected answer is *covered* when one of the k examples has exactly that value: the model
can copy it. Reported per method: field coverage@k, rows with every field covered, postcode
lists covered (the place table the model would otherwise memorise), and query time.

Methods: the shipped coverage choice (mondrian.core.retrieval: the k of the 64 nearest that
together cover the question's character n-grams best), the same comparing questions as
fit-query shows them (rewritten), the plain k nearest by TF-IDF over
character n-grams within words (scikit-learn, 2-4 shown and typed, and 3-5), TF-IDF over words
(1-2), BM25 over words (bm25s), and k random examples as the floor. The four char_wb 2-4 rows
run the library's own `RetrievalIndex.nearest`.

    python scripts/bench_retrieval.py [--workspace workspace] [--k 4] [--out scripts/results/bench_retrieval.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

import mondrian  # noqa: F401  (BLAS preload before anything imports mlx)
from mondrian.core.contracts import Retrieval, get_advisor
from mondrian.core.retrieval import (
    COVER,
    COVER_SHOWN,
    METHOD,
    NEAREST,
    NEAREST_SHOWN,
    Example,
    RetrievalIndex,
)
from mondrian.dataset.examples import build_index
from mondrian.dataset.rows import collect_rows, read_manifest
from mondrian.dataset.splits import DEFAULT_RATIOS, DEFAULT_SALT

ROOT = Path(__file__).resolve().parents[1]
HANDWRITTEN = ROOT / "tests" / "data" / "fit_query_handwritten.jsonl"


def tfidf(analyzer: str, ngrams: tuple[int, int]):
    from sklearn.feature_extraction.text import TfidfVectorizer

    def make(inputs: list[str]):
        vec = TfidfVectorizer(analyzer=analyzer, ngram_range=ngrams, lowercase=True, sublinear_tf=True)
        matrix = vec.fit_transform(inputs)
        return lambda q: (matrix @ vec.transform([q]).T).toarray().ravel()
    return make


def bm25(inputs: list[str]):
    import bm25s

    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(inputs, stopwords=None, show_progress=False), show_progress=False)

    def score(q: str) -> np.ndarray:
        tokens = bm25s.tokenize([q], stopwords=None, show_progress=False, return_ids=False)[0]
        return retriever.get_scores(tokens)
    return score


def random_scores(inputs: list[str]):
    rng = np.random.default_rng(0)
    return lambda q: rng.random(len(inputs))


def top_k(make):
    """A similarity turned into a choice: the k highest scores, ties in index order."""
    def choose(inputs: list[str]):
        score = make(inputs)

        def top(q: str, k: int) -> list[int]:
            s = np.asarray(score(q), dtype=float)
            return sorted(range(len(inputs)), key=lambda i: (-s[i], i))[:k]
        return top
    return choose


def library(method: str):
    """mondrian's own index with `method` (what training rows, eval and the service use); the
    SHOWN methods compare questions as fit-query shows them, as `prompt_messages` has them do."""
    def choose(inputs: list[str]):
        index = RetrievalIndex([Example(q, "{}", str(i)) for i, q in enumerate(inputs)], 1, method)
        index.viewed_by(get_advisor("fit-query")).fit()
        return lambda q, k: [int(e.group) for e in index.nearest(q, k)]
    return choose


METHODS = {
    f"{COVER} (shipped)": library(COVER),
    f"{COVER_SHOWN} (as shown)": library(COVER_SHOWN),
    f"{NEAREST} (k nearest)": library(NEAREST),
    f"{NEAREST_SHOWN} (k nearest, as shown)": library(NEAREST_SHOWN),
    "tfidf char_wb 3-5": top_k(tfidf("char_wb", (3, 5))),
    "tfidf word 1-2": top_k(tfidf("word", (1, 2))),
    "bm25s word": top_k(bm25),
    "random": top_k(random_scores),
}


def coverage(expected: dict, answers: list[dict]) -> tuple[int, int, bool | None]:
    covered = sum(1 for key, value in expected.items() if any(a.get(key) == value for a in answers))
    places = (any(a.get("postcode_patterns") == expected["postcode_patterns"] for a in answers)
              if "postcode_patterns" in expected else None)
    return covered, len(expected), places


def measure(name: str, make, inputs: list[str], answers: list[dict], queries: list[tuple[str, dict]],
            k: int) -> dict:
    t0 = time.perf_counter()
    choose = make(inputs)
    build_s = time.perf_counter() - t0
    fields = total = full = place_hits = place_rows = 0
    t0 = time.perf_counter()
    for text, expected in queries:
        top = choose(text, k)
        c, n, places = coverage(expected, [answers[i] for i in top])
        fields, total, full = fields + c, total + n, full + (c == n)
        if places is not None:
            place_rows, place_hits = place_rows + 1, place_hits + places
    query_ms = (time.perf_counter() - t0) * 1000 / len(queries)
    return {"method": name, "field_coverage": round(fields / total, 4), "rows_fully_covered": round(full / len(queries), 4),
            "place_lists_covered": round(place_hits / place_rows, 4) if place_rows else None,
            "rows": len(queries), "place_rows": place_rows, "build_s": round(build_s, 3),
            "query_ms": round(query_ms, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", default=str(ROOT / "workspace"))
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--out", default=str(ROOT / "scripts" / "results" / "bench_retrieval.json"))
    args = ap.parse_args()
    random.seed(0)
    advisor = get_advisor("fit-query")
    manifest = Path(args.workspace) / "manifest" / "manifest.jsonl"
    if not manifest.is_file():
        raise SystemExit(f"{manifest}: missing (run `make data` first)")
    rows, _ = collect_rows(read_manifest(manifest), advisor, None, DEFAULT_RATIOS, DEFAULT_SALT)
    index = build_index(replace(advisor, retrieval=Retrieval(args.k)), [r for r in rows if r.split == "train"])
    inputs = [e.input for e in index.examples]
    answers = [json.loads(e.answer) for e in index.examples]
    sets = {
        "valid+test": [(r.text, r.output) for r in rows if r.split in ("valid", "test")],
        "handwritten": [(q["input"], q["expected"]) for q in map(json.loads, HANDWRITTEN.read_text().splitlines())],
    }
    results = {}
    for set_name, queries in sets.items():
        results[set_name] = [measure(name, make, inputs, answers, queries, args.k) for name, make in METHODS.items()]
        print(f"\n{set_name}: {len(queries)} questions, {len(inputs)} indexed examples, k={args.k}")
        print(f"  {'method':30} {'fields':>7} {'rows':>7} {'places':>7} {'ms/query':>9}")
        for r in results[set_name]:
            places = f"{r['place_lists_covered']:.1%}" if r["place_lists_covered"] is not None else "-"
            print(f"  {r['method']:36} {r['field_coverage']:7.1%} {r['rows_fully_covered']:7.1%} {places:>7} {r['query_ms']:9.3f}")
    out = {"k": args.k, "indexed_examples": len(inputs), "shipped_method": METHOD,
           "machine": {"platform": platform.platform(), "processor": platform.processor()},
           "results": results}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
