"""A/B, in one run, of two choices in the last-row selectors (GPU, CUDA graphs, bench_selection's inputs).

* ``wide_block_n`` — the key tile width of the last-row sums when more than 64 rows take the
  diagonals (:data:`blocksieve.ops.last_rows_stats.WIDE_BLOCK_N`, 32 by default) against 64, the
  width of every call before session 17: ``flexprefill`` (128 rows).
* ``pack`` — the most query rows stacked per tile when at most 64 rows take the diagonals
  (:data:`blocksieve.ops.last_rows_stats.DIAGONAL_PACK_ROWS`, 256 by default) against 128, as before
  session 17: ``vertical_slash`` (64 rows).
* ``topk`` — :func:`blocksieve.select.choose.topk_mask` (unsorted top-k) against the same mask from a
  sorted top-k, as before session 17: ``vertical_slash`` (two top-ks of 1,000 and 6,096 per head).

Each variant's selection is timed from a CUDA graph, the default and the old choice alternating
twice; ``same_layout`` compares each variant's block ids with the default's (the tile width changes
the order of the fp32 sums, so near-ties may flip). ``share_of_sparse10`` is the selection time over
the random 10 %-density layout's attention time (the block-methods issue asks for at most 0.10),
measured here too. Writes ``$OUT/last_rows_ab_<gpu>.json``::

    python -u -m benchmarks.last_rows_ab --out $OUT

Session 17's file (``benchmarks/results/last_rows_ab_h100_s17.json``) also has ``pbs`` rows: the
rule then gave 32-key tiles to every call of more than 64 rows; PBS (columns only) was 0.6-1 % slower
with them, so it keeps 64 and its case was dropped here.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import torch

import blocksieve
from benchmarks.bench_selection import METHODS, attend_fn, graph_timed, plan_fn, random_layout, synthetic, timed
from benchmarks.common import device_tag, environment, sweep_args, write_result
from blocksieve.ops import last_rows_stats
from blocksieve.methods import vertical_slash


def sorted_topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``topk_mask`` as it was before session 17: the top-k sorted."""
    k = min(int(k), scores.shape[-1])
    vals, idx = scores.topk(k, -1)
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, vals > float("-inf"))


OLD = {
    "wide_block_n": lambda: mock.patch.object(last_rows_stats, "WIDE_BLOCK_N", 64),
    "pack": lambda: mock.patch.object(last_rows_stats, "DIAGONAL_PACK_ROWS", 128),
    "topk": lambda: mock.patch.object(vertical_slash, "topk_mask", sorted_topk_mask),
}
CASES = [("flexprefill", "wide_block_n"), ("vertical_slash", "pack"), ("vertical_slash", "topk")]


def main(argv=None):
    lengths, out = sweep_args(argv)
    rows = []
    for length in lengths:
        q, k, v = synthetic(length)
        run, backend = attend_fn(q, k, v, random_layout(q, k, 0.10))
        sparse10 = timed(run)
        for name, choice in CASES:
            meth, cfg = METHODS[name]
            m = blocksieve.method(meth, **cfg)
            fn = plan_fn(m, q, k)
            ref = fn().indices.clone()
            for rep in range(2):
                for variant in ("default", "old"):
                    with OLD[choice]() if variant == "old" else contextlib.nullcontext():
                        same = bool(torch.equal(fn().indices, ref))
                        ms = graph_timed(fn)
                    rows.append(dict(L=length, method=name, choice=choice, variant=variant, rep=rep, select_graph_ms=ms,
                                     share_of_sparse10=ms / sparse10, sparse10_ms=sparse10, attend_backend=backend, same_layout=same))
                    print(rows[-1], flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    print("wrote", write_result(f"last_rows_ab_{device_tag()}.json", {"environment": environment(), "rows": rows}, out))


if __name__ == "__main__":
    main()
