"""A/B of the exact top-k threshold inside the indexer kernels: bisection vs radix select (5- or 8-bit digits).

Every exact top-k of the fused indexer (each row's last compaction, the one-program split merge of
decode) finds a threshold over a list of packed ``(score bits, id)`` values:
``EXACT_DIGIT_BITS = 0`` bisects (about 15-20 counting passes), 5 or 8 runs a radix select (about
4-6 histogram passes; Triton's ``tl.histogram`` costs more per element with more bins). Which
is faster depends on the GPU, so each variant is timed in the same run on the paths that use it:

* ``merge``: :func:`merge_splits` of B = 8 rows of 16 × 512 packed entries (HISA's decode merge);
* ``decode_{dsa,hisa,misa}``: one B = 8 decode step at ``L`` keys, from a CUDA graph;
* ``prefill_{dsa,hisa,misa}``: the methods' prefill at ``L``.

Each variant's layouts are compared with the bisection's (share of rows with the same ids). Same
synthetic DSA-form indexer as :mod:`benchmarks.bench_indexer`. Writes
``$OUT/indexer_exact_ab_h200.json``::

    python -u -m benchmarks.indexer_exact_ab --out $OUT
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.bench_indexer import SIZES, decode_fns, graph_replay, log, make_indexer, prefill_fns, timed
from benchmarks.common import environment
from blocksieve.ops import indexer_topk as kernels

VARIANTS = (0, 5, 8)
"""``EXACT_DIGIT_BITS`` values timed; the first is the reference for the id comparison."""


def random_lists(rows: int, splits: int, per: int, device: str) -> torch.Tensor:
    """Packed ``(score bits, id)`` lists as HISA's decode splits leave them: ``[rows, splits·per]`` int64, ids ascending."""
    sc = torch.randn(rows, splits * per, device=device)
    bits = sc.view(torch.int32).long()
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (bits << 32) | torch.arange(splits * per, device=device)


def cases(c: dict, device: str) -> dict:
    """Name → ``fn()`` returning ids or a layout, for every path an exact threshold runs on."""
    out = {"merge": lambda p=random_lists(c["decode_batch"], 16, 512, device): kernels.merge_splits(p, c["topk"], c["topk"], True)}
    for n in c["lengths"]:
        ix = make_indexer(c, 1, n, n, device)
        for name, fn in prefill_fns(c).items():
            out[f"prefill_{name}_{n}"] = lambda fn=fn, ix=ix: fn(ix, "triton").indices
        for name, fn in decode_fns(c, make_indexer(c, c["decode_batch"], 1, n, device, seed=2)).items():
            out[f"decode_{name}_{n}"] = lambda fn=fn: fn("triton").indices
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--smoke", action="store_true", help="toy sizes (CPU: TRITON_INTERPRET=1)")
    args = ap.parse_args(argv)
    c = dict(SIZES["smoke" if args.smoke else "full"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    res = {"environment": environment(), "config": {k: str(v) for k, v in c.items()}, "rows": []}
    out = args.out / "indexer_exact_ab_h200.json"
    t0 = time.time()
    fns = cases(c, device)
    ref = {}
    for digit in VARIANTS:
        kernels.EXACT_DIGIT_BITS = digit
        for name, fn in fns.items():
            ids = fn()
            ref.setdefault(name, ids)
            row = {"digit_bits": digit, "case": name, "rows_equal_to_bisection": (ids == ref[name]).all(-1).float().mean().item()}
            row.update(timed(fn, 5 if name.startswith("prefill") else 20))
            if name.startswith(("decode", "merge")):
                row.update(graph_replay(fn))
            res["rows"].append(row)
            log(row)
            out.write_text(json.dumps(res, indent=1))
    res["wall_s"] = round(time.time() - t0, 1)
    out.write_text(json.dumps(res, indent=1))
    log("wrote", out)


if __name__ == "__main__":
    main()
