"""vertical_slash's two top-k masks: ``torch.topk`` + scatter against :mod:`blocksieve.ops.topk_select` (GPU).

Per length (32K, 128K; bench_selection's structured inputs, ``Hq=32, Hkv=8, D=128``, bf16), the stacked
column and diagonal sums of the last 64 rows are computed once; then, from CUDA graphs, two rounds of:
``vertical_slash_sets`` (two ``torch.topk`` with the forced sets), and ``topk_mask_triton`` at each
launch of :data:`CONFIGS` (digit bits, compaction, entries per step, warps), each checked against a
stable sort's rule (``same_as_sort_rule``); the radix kernel on a heavier-tailed copy of the sums; and
the whole selection with ``topk="torch"`` and ``topk="radix"`` (``same_layout``: the two layouts equal).
Writes ``$OUT/topk_select_sweep_<gpu>.json``::

    python benchmarks/topk_select_sweep.py --out $OUT [--few]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import blocksieve
from benchmarks.bench_selection import graph_timed, synthetic
from benchmarks.common import device_tag, environment
from blocksieve.methods.vertical_slash import vertical_slash_sets
from blocksieve.ops import topk_select as ts
from blocksieve.ops.last_rows_stats import last_rows_sums_triton

CONFIGS = [(bits, compact, 4096, warps) for bits in (4, 8) for compact in (True, False) for warps in (4, 8)] + [(4, True, 2048, 8), (4, True, 8192, 16)]
"""(digit bits, compaction, entries per step, warps) of the radix kernel tried."""
FEW = [(4, True, 4096, 8), (8, False, 4096, 8), (4, False, 4096, 8)]
SIZES, FORCED = (1000, 6096), (30, 100)


def sort_rule(v: torch.Tensor, k: int, forced: int) -> torch.Tensor:
    """The ``k`` largest after forcing the first ``forced``, ties to the lowest index (a stable sort)."""
    v = v.clone()
    v[..., :forced] = float("inf")
    order = torch.sort(v, dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.zeros_like(v, dtype=torch.bool).scatter_(-1, order, True) & (v > float("-inf"))


def sweep(length: int, configs: list, log) -> None:
    q, k, _ = synthetic(length)
    sums = torch.empty(2, 1, q.shape[1], length, dtype=torch.float32, device="cuda")
    last_rows_sums_triton(q, k, 64, q.shape[-1] ** -0.5, out=sums)
    want = torch.stack([sort_rule(sums[i], SIZES[i], FORCED[i]) for i in range(2)])
    old = torch.stack(vertical_slash_sets(sums[0], sums[1], *SIZES, *FORCED))
    defaults = (ts.DIGIT_BITS, ts.COMPACT, ts.BLOCK, ts.NUM_WARPS)
    for rep in range(2):
        fn = lambda: vertical_slash_sets(sums[0], sums[1], *SIZES, *FORCED)  # noqa: E731
        log({"kind": "topk", "L": length, "variant": "torch", "rep": rep, "graph_ms": graph_timed(fn), "differs_from_sort_rule": int((old != want).sum())})
        for bits, compact, block, warps in configs:
            ts.DIGIT_BITS, ts.COMPACT, ts.BLOCK, ts.NUM_WARPS = bits, compact, block, warps
            row = {"kind": "topk", "L": length, "variant": f"radix bits{bits} compact{int(compact)} block{block} warps{warps}", "rep": rep}
            try:
                fn = lambda: ts.topk_mask_triton(sums, SIZES, FORCED)  # noqa: E731
                log(dict(row, graph_ms=graph_timed(fn), same_as_sort_rule=bool(torch.equal(fn(), want))))
            except Exception as e:  # noqa: BLE001 - a launch that does not compile is reported
                log(dict(row, error=f"{type(e).__name__}: {e}"[:300]))
    ts.DIGIT_BITS, ts.COMPACT, ts.BLOCK, ts.NUM_WARPS = defaults
    heavy = sums**3
    want_h = torch.stack([sort_rule(heavy[i], SIZES[i], FORCED[i]) for i in range(2)])
    fn = lambda: ts.topk_mask_triton(heavy, SIZES, FORCED)  # noqa: E731
    log({"kind": "topk_heavy_tail", "L": length, "graph_ms": graph_timed(fn), "same_as_sort_rule": bool(torch.equal(fn(), want_h))})
    a, b = blocksieve.method("vertical_slash"), blocksieve.method("vertical_slash", topk="radix")
    la, lb = a.select(q, k), b.select(q, k)
    same = bool(torch.equal(la.indices, lb.indices) and torch.equal(la.counts, lb.counts))
    for rep in range(2):
        log({"kind": "select", "L": length, "topk": "torch", "rep": rep, "graph_ms": graph_timed(lambda: a.select(q, k))})
        log({"kind": "select", "L": length, "topk": "radix", "rep": rep, "graph_ms": graph_timed(lambda: b.select(q, k)), "same_layout": same})


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--few", action="store_true", help="three launches instead of ten")
    args = ap.parse_args(argv)
    rows, t0 = [], time.time()

    def log(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)

    for n in args.lengths:
        sweep(n, FEW if args.few else CONFIGS, log)
        torch.cuda.empty_cache()
    env = environment()
    res = {"environment": env, "rows": rows, "wall_s": round(time.time() - t0, 1)}
    (args.out / f"topk_select_sweep_{device_tag()}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
