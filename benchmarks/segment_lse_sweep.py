"""S2O's ``rank="lse"`` on the GPU: the fused segment log-sum-exp kernel's launch shapes and S2O's selection time.

Per length (default 32K and 128K; one layer, ``Hq=32, Hkv=8, D=128``, bf16, the structured
synthetic q/k of ``bench_selection.py``):

* ``bar_ms`` — ``blocksieve.attend`` on a random 10 %-density layout (the selection budget's base);
* ``s2o_mean`` / ``s2o_lse`` — ``S2O.plan`` with the default and the ``lse``
  ranking, eager and from a CUDA graph, with the graph time's share of the bar;
* ``kernel`` — :func:`segment_block_lse_triton` alone for each launch shape ``(BLOCK_S,
  BLOCKS_PER_STEP, warps)``, with ``max_abs_diff`` against the default shape's output on the
  computed (finite) entries (``error`` for a shape the GPU cannot launch: (128, 4, 8) asked for
  272 KiB of shared memory on an H100 in session 14);
* ``lse_vs_torch`` — the default kernel's largest difference from :func:`block_logsumexp` on the
  computed entries, with the mean queries rounded to bf16 as the kernel does (first segments only:
  the PyTorch rule holds every score of a chunk in memory).

Writes ``$OUT/segment_lse_<gpu>.json``. Usage: ``python -m benchmarks.segment_lse_sweep --out DIR``
"""

from __future__ import annotations

from unittest import mock

import torch
import triton

import blocksieve
from benchmarks.bench_selection import graph_timed, random_layout, synthetic, timed
from benchmarks.common import device_tag, environment, sweep_args, write_result
from blocksieve.ops import segment_lse
from blocksieve.select.pool import block_mean
from blocksieve.select.score import block_logsumexp

SHAPES = [(64, 4, 4), (64, 8, 4), (64, 2, 4), (128, 4, 8), (128, 2, 8), (32, 4, 4)]
"""Launch shapes ``(BLOCK_S, BLOCKS_PER_STEP, num_warps)``; the first is the committed default."""


def launch(shape, qs, k, base):
    bs, nb, warps = shape
    knobs = {"BLOCK_S": bs, "BLOCKS_PER_STEP": nb, "NUM_WARPS": warps}
    with mock.patch.multiple(segment_lse, **knobs):
        return segment_lse.segment_block_lse_triton(qs, k, 64, 128**-0.5, 128, base)


def main():
    lengths, out_dir = sweep_args()
    res = dict(environment(), shapes=SHAPES, lengths={})
    for length in lengths:
        q, k, v = synthetic(length)
        row = dict(bar_ms=timed(lambda: blocksieve.attend(q, k, v, random_layout(q, k, 0.1))))
        for name, rank in (("s2o_mean", "mean"), ("s2o_lse", "lse")):
            m = blocksieve.method("s2o", rank=rank)
            eager = timed(lambda: m.plan(q, k))
            graph = graph_timed(lambda: m.plan(q, k))
            row[name] = dict(select_ms=eager, select_graph_ms=graph, graph_share_of_bar=graph / row["bar_ms"])
        qs, base = block_mean(q, 128), 0
        ref = launch(SHAPES[0], qs, k, base)
        fin = torch.isfinite(ref)
        row["kernel"] = {}
        for shape in SHAPES:
            try:
                out = launch(shape, qs, k, base)
            except triton.runtime.errors.OutOfResources as e:  # a shape too large for this GPU's shared memory
                row["kernel"][str(shape)] = dict(error=str(e))
                continue
            diff = float((out[fin] - ref[fin]).abs().max()) if torch.equal(torch.isfinite(out), fin) else float("nan")
            row["kernel"][str(shape)] = dict(ms=timed(lambda: launch(shape, qs, k, base)), max_abs_diff=diff)
        n = 64  # first segments against every key: enough to hold in memory
        want = block_logsumexp(qs[:, :, :n].bfloat16().float(), k.float(), 64, 128**-0.5)
        got = ref[:, :, :n]
        ok = torch.isfinite(got)
        row["lse_vs_torch"] = dict(segments=n, max_abs_diff=float((got[ok] - want[ok]).abs().max()), finite=int(ok.sum()))
        res["lengths"][str(length)] = row
        print(length, row, flush=True)
    print("wrote", write_result(f"segment_lse_{device_tag()}.json", res, out_dir))


if __name__ == "__main__":
    main()
