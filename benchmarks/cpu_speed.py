"""CPU speed of the gather path vs dense SDPA on the same CPU (fp32, causal).

Usage: python benchmarks/cpu_speed.py [--length 8192] [--out benchmarks/results]
Writes cpu_speed.json: median times, densities and the ratio to dense SDPA measured in the same run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import RESULTS, environment, median_time, write_result
from blocksieve import attend
from blocksieve.eval.synthetic import banded_random_layout
from blocksieve.ops.reference import reference_attention


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--densities", default="0.05,0.1,0.2")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    n, hq, hkv, d = args.length, args.heads, args.kv_heads, args.head_dim
    q = torch.randn(1, hq, n, d)
    k = torch.randn(1, hkv, n, d)
    v = torch.randn(1, hkv, n, d)
    dense_ms = median_time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), args.repeats)
    rows = []
    for dens in [float(x) for x in args.densities.split(",")]:
        for shared in (True, False):
            lay = banded_random_layout(1, hkv if shared else hq, n, n, args.block, args.block, dens, seed=1)
            # correctness on a slice of rows before timing: the last 256 query rows
            tail = banded_random_layout(1, hkv if shared else hq, 256, n, args.block, args.block, dens, seed=2)
            got = attend(q[:, :, -256:], k, v, tail)
            want, _ = reference_attention(q[:, :, -256:], k, v, tail)
            err = float((got - want).abs().max())
            if err > 1e-4:
                raise SystemExit(f"correctness check failed (max abs error {err:.2e}); no timing reported")
            ms = median_time(lambda: attend(q, k, v, lay), args.repeats)
            rows.append({"density": round(lay.density(), 4), "layout_heads": "per KV group" if shared else "per query head",
                         "sparse_ms": round(ms, 2), "dense_sdpa_ms": round(dense_ms, 2), "speedup_vs_dense": round(dense_ms / ms, 2),
                         "max_abs_error_vs_reference": err})
            print(f"density {lay.density():.3f} {'shared' if shared else 'per-head':8s}: {ms:8.1f} ms  dense SDPA {dense_ms:8.1f} ms  ×{dense_ms / ms:.2f}")
    payload = {"benchmark": "cpu gather path vs dense SDPA", "environment": environment(),
               "shape": {"B": 1, "Hq": hq, "Hkv": hkv, "L": n, "D": d, "dtype": "float32", "causal": True, "block": args.block},
               "results": rows}
    print("wrote", write_result("cpu_speed.json", payload, args.out))


if __name__ == "__main__":
    main()
