"""Link throughput: 100,000 jobs, cold (empty image cache) and warm (relink), in one run.

The synthetic workspace mixes the two advisors like production: fit-query jobs with
inline answers, photo-critic jobs with a unique small PNG each and a hash-named
analysis file. Prints jobs/s cold and warm and writes scripts/results/bench_link.json.

    python scripts/bench_link.py [--jobs 100000] [--photo-share 0.3] [--workspace DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

import mondrian  # noqa: F401  (BLAS preload before anything imports mlx)
from mondrian.core.db import create_jobs_table, open_db
from mondrian.core.workspace import load_workspace
from mondrian.demo.questions import generate
from mondrian.link.linker import link_workspace

CRITIQUE = {"dominant_color": "white", "primary_colors": ["blue", "red"], "block_count": 6,
            "balance": "balanced", "composition_score": 7.5, "color_score": 6.0,
            "balance_score": 8.2, "comment": "A calm grid with two primary accents."}


def build(folder: Path, n_jobs: int, photo_share: float, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    data = folder / "data"
    (data / "images").mkdir(parents=True)
    (data / "analyses").mkdir()
    n_photo = int(n_jobs * photo_share)
    examples = generate(n_jobs - n_photo, seed=seed)
    rows = []
    for i in range(n_photo):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, format="PNG")
        name = f"images/IMG_{i:06d}.png"
        (data / name).write_bytes(buf.getvalue())
        analysis = f"analyses/{hashlib.sha1(name.encode()).hexdigest()}.json"
        (data / analysis).write_text(json.dumps(CRITIQUE))
        rows.append({"job_id": f"p{i}", "advisor": "photo-critic", "status": "completed",
                     "image_path": name, "analysis_path": analysis})
    for i, ex in enumerate(examples):
        rows.append({"job_id": f"f{i}", "advisor": "fit-query", "status": "completed",
                     "input_text": ex.question, "analysis_json": json.dumps(ex.answer)})
    db = open_db(folder / "mondrian.db", create=True)
    create_jobs_table(db)
    db["jobs"].insert_all(rows, batch_size=5000)
    db.conn.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=100_000)
    ap.add_argument("--photo-share", type=float, default=0.3)
    ap.add_argument("--workspace", help="Build here (default: a temp folder, removed after)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_link.json"))
    args = ap.parse_args()
    folder = Path(args.workspace or tempfile.mkdtemp(prefix="bench_link_"))
    try:
        if not (folder / "mondrian.db").exists():
            t = time.perf_counter()
            build(folder, args.jobs, args.photo_share)
            print(f"built {args.jobs:,} jobs in {time.perf_counter() - t:.1f} s")
        shutil.rmtree(folder / ".mondrian", ignore_errors=True)  # cold: no image cache
        ws = load_workspace(folder)
        runs = {}
        for kind in ("cold", "warm"):
            t = time.perf_counter()
            summary = link_workspace(ws, progress=False)
            dt = time.perf_counter() - t
            runs[kind] = {"seconds": round(dt, 3), "jobs_per_s": round(summary.total / dt),
                          "linked": summary.linked, "rejected": summary.rejected,
                          "cache": summary.cache, "conserved": summary.conserved}
            print(f"{kind}: {summary.line()} in {dt:.2f} s = {summary.total / dt:,.0f} jobs/s "
                  f"(image cache {summary.cache})")
        ratio = runs["warm"]["jobs_per_s"] / runs["cold"]["jobs_per_s"]
        print(f"warm / cold: {ratio:.2f}x; target >= 10,000 jobs/s warm: "
              f"{'met' if runs['warm']['jobs_per_s'] >= 10_000 else 'NOT met'}")
        result = {"benchmark": "bench_link", "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores",
                  "jobs": args.jobs, "photo_share": args.photo_share, "runs": runs,
                  "warm_over_cold": round(ratio, 2)}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"written to {args.out}")
    finally:
        if not args.workspace:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
