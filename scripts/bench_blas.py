"""fp32 matmul GFLOP/s in MLX with and without the OpenBLAS preload, measured in one run.

Each side runs in its own subprocess (the BLAS is chosen when the process
starts): MONDRIAN_BLAS=off gives MLX's bundled reference BLAS. Prints the table
and the ratio, and writes them to scripts/results/bench_blas.json.

    python scripts/bench_blas.py [--sizes 256,512,1024] [--repeats 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
import mondrian
import mlx.core as mx
sizes, repeats = json.loads(sys.argv[1]), int(sys.argv[2])
out = {"blas": mondrian.core.blas.status().to_dict(), "gflops": {}}
for n in sizes:
    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(a, b, a @ b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - t)
    out["gflops"][str(n)] = 2 * n**3 / best / 1e9
print(json.dumps(out))
"""


def measure(sizes: list[int], repeats: int, blas: str | None) -> dict:
    env = dict(os.environ)
    env.pop("MONDRIAN_BLAS", None)
    if blas:
        env["MONDRIAN_BLAS"] = blas
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(sizes), str(repeats)],
                          env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="256,512,1024")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_blas.json"))
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    fast = measure(sizes, args.repeats, None)
    slow = measure(sizes, args.repeats, "off")
    rows = []
    print(f"{'n':>6} {'reference GFLOP/s':>18} {'mondrian GFLOP/s':>17} {'ratio':>7}")
    for n in map(str, sizes):
        ratio = fast["gflops"][n] / slow["gflops"][n]
        rows.append({"n": int(n), "reference": slow["gflops"][n], "mondrian": fast["gflops"][n], "ratio": ratio})
        print(f"{n:>6} {slow['gflops'][n]:18.1f} {fast['gflops'][n]:17.1f} {ratio:6.1f}x")
    print(f"mondrian BLAS: {fast['blas']['backend']} ({fast['blas']['path'] or fast['blas']['reason']})")
    result = {"benchmark": "bench_blas", "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores",
              "with": fast["blas"], "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
