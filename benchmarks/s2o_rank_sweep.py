"""S2O's ranking kernels on the GPU: launch shapes of the ``mean`` and ``lse`` statistics and S2O's selection time.

Per length (default 32K and 128K; one layer, ``Hq=32, Hkv=8, D=128``, bf16, the structured
synthetic q/k of ``bench_selection.py``):

* ``bar_ms`` — ``blocksieve.attend`` on a random 10 %-density layout (the selection budget's base;
  the layout is built before the timing: until session 15 its construction was timed with it);
* ``s2o_mean`` / ``s2o_lse`` — ``S2O.plan`` with the default and the ``lse``
  ranking, eager and from a CUDA graph, with the graph time's share of the bar;
* ``dot`` — :func:`blocksieve.ops.segment_dot.segment_block_dot_triton` (the ``mean`` scores) for
  each launch shape ``(block_s, pack_rows, block_n, warps, precision)``, and ``grouped_dot`` (the
  ``torch.matmul`` it replaced), with ``max_abs_diff`` against ``grouped_dot`` on the past blocks;
* ``kernel`` — :func:`blocksieve.ops.segment_lse.segment_block_lse_triton` alone for each launch
  shape ``(block_s, pack_rows, chunk_blocks, blocks_per_step, warps)``, with ``max_abs_diff``
  against the default shape's output on the computed (finite) entries (``error`` for a shape the
  GPU cannot launch: 128 segments × 4 blocks per step × 8 warps asked for 272 KiB of shared memory
  on an H100 in session 14). ``WHOLE`` chunks and ``pack_rows`` = ``block_s`` are session 14's
  kernel (one head, a whole row of key blocks per program);
* ``lse_vs_torch`` — the default kernel's largest difference from :func:`block_logsumexp` on the
  computed entries, with the mean queries rounded to bf16 as the kernel does (first segments only:
  the PyTorch rule holds every score of a chunk in memory);
* ``d256`` — the same for head dim 256 (``WIDE``: ``Hq=16, Hkv=8``, Gemma-3-12B's shape) over
  ``WIDE_DOT_SHAPES`` / ``WIDE_SHAPES``, its own bar, and ``S2O.plan`` with the kernels
  (``backend="triton"``) against the PyTorch rule, with the share of rows whose order is the same.

Writes ``$OUT/s2o_rank_<gpu>.json`` (sessions 14-15: ``segment_lse_<gpu>*.json``, written by this
script under its old name, ``segment_lse_sweep``). Usage: ``python -m benchmarks.s2o_rank_sweep --out DIR``
"""

from __future__ import annotations

import torch
import triton

import blocksieve
from benchmarks.bench_selection import graph_timed, random_layout, synthetic, timed
from benchmarks.common import device_tag, environment, sweep_args, write_result
from blocksieve.ops import segment_dot, segment_lse
from blocksieve.select.pool import block_mean
from blocksieve.select.score import block_logsumexp, grouped_dot

WHOLE = 1 << 20
"""``chunk_blocks`` that keeps a whole row of key blocks in one program."""
SHAPES = [
    (64, 128, 32, 2, 8),  # the committed default
    (64, 128, 64, 2, 8),
    (64, 64, WHOLE, 4, 4),  # session 14's kernel
    (64, 64, 64, 4, 4),  # chunks only
    (64, 256, WHOLE, 4, 8),  # stacked heads only
    (64, 128, 64, 4, 4),
    (64, 128, 64, 4, 8),
    (64, 128, 64, 2, 4),
    (64, 256, 64, 4, 8),
    (64, 256, 64, 2, 8),
    (64, 128, 16, 2, 8),
    (64, 256, 32, 4, 8),
    (64, 256, 128, 4, 8),
    (32, 256, 64, 4, 8),
    (128, 128, 64, 4, 8),
    (128, 256, 64, 4, 8),
]
"""Launch shapes of the ``lse`` kernel, ``(block_s, pack_rows, chunk_blocks, blocks_per_step, num_warps)``."""
DOT_SHAPES = [
    (32, 128, 128, 8, "tf32x3"),  # the committed default
    (32, 128, 64, 4, "tf32x3"),
    (32, 128, 128, 8, "ieee"),
    (16, 64, 64, 4, "tf32x3"),
    (32, 128, 32, 4, "tf32x3"),
    (64, 128, 64, 4, "tf32x3"),
    (64, 256, 64, 8, "tf32x3"),
    (16, 64, 128, 4, "tf32x3"),
]
"""Launch shapes of the ``mean`` kernel, ``(block_s, pack_rows, block_n, num_warps, precision)``."""


WIDE = dict(d=256, hq=16, hkv=8)
"""The head-dim-256 case (Gemma-3-12B's attention shape). Its launch shapes: first the defaults (the
``lse`` kernel's are those of head dim 128; the dot kernel's :func:`~blocksieve.ops.segment_dot.default_tiles`),
then neighbours (the dot kernel's head-dim-128 tiles need 256 KiB of shared memory and fail)."""
WIDE_SHAPES = [(64, 128, 32, 2, 8), (64, 64, 32, 2, 8), (64, 64, 32, 2, 4), (32, 64, 32, 2, 4), (64, 64, 64, 2, 8), (64, 128, 32, 1, 8)]
WIDE_DOT_SHAPES = [
    (32, 64, 64, 8, "tf32x3"),
    (32, 128, 128, 8, "tf32x3"),
    (32, 64, 64, 4, "tf32x3"),
    (16, 64, 64, 4, "tf32x3"),
    (32, 128, 64, 8, "tf32x3"),
    (32, 64, 128, 8, "tf32x3"),
]


def launch(shape, qs, k, base):
    d = qs.shape[-1]
    return segment_lse.segment_block_lse_triton(qs, k, 64, d**-0.5, 128, base, *shape[:4], num_warps=shape[4])


def launch_dot(shape, qs, kb, base):
    return segment_dot.segment_block_dot_triton(qs, kb, 64, 128, base, *shape[:3], num_warps=shape[3], precision=shape[4])


def try_timed(fn):
    """``(output, ms)`` of a kernel launch, or ``(None, error)`` for a shape too large for this GPU's shared memory."""
    try:
        return fn(), timed(fn)
    except triton.runtime.errors.OutOfResources as e:
        return None, str(e)


def dot_rows(q, k, shapes=DOT_SHAPES) -> dict:
    """The ``mean`` scores: each launch shape and ``grouped_dot``, ms and difference on the past blocks."""
    qs, kb = block_mean(q, 128), block_mean(k, 64)
    want = grouped_dot(qs, kb)
    past = torch.isfinite(segment_dot.segment_block_dot_triton(qs, kb, 64, 128, 0))
    rows = {"grouped_dot": dict(ms=timed(lambda: grouped_dot(qs, kb)))}
    for shape in shapes:
        out, ms = try_timed(lambda: launch_dot(shape, qs, kb, 0))
        rows[str(shape)] = dict(error=ms) if out is None else dict(ms=ms, max_abs_diff=float((out[past] - want[past]).abs().max()))
    return rows


def lse_rows(q, k, shapes=SHAPES) -> dict:
    """The ``lse`` kernel: each launch shape, ms and difference from the default launch on the computed entries,
    and the default's difference from :func:`block_logsumexp` on the first 64 segments."""
    qs, d = block_mean(q, 128), q.shape[-1]
    ref = segment_lse.segment_block_lse_triton(qs, k, 64, d**-0.5, 128, 0)
    fin = torch.isfinite(ref)
    rows = {}
    for shape in shapes:
        out, ms = try_timed(lambda: launch(shape, qs, k, 0))
        if out is None:
            rows[str(shape)] = dict(error=ms)
            continue
        diff = float((out[fin] - ref[fin]).abs().max()) if torch.equal(torch.isfinite(out), fin) else float("nan")
        rows[str(shape)] = dict(ms=ms, max_abs_diff=diff)
    n = 64  # first segments against every key: enough to hold in memory
    want = block_logsumexp(qs[:, :, :n].bfloat16().float(), k.float(), 64, d**-0.5)
    got = ref[:, :, :n]
    ok = torch.isfinite(got)
    rows["lse_vs_torch"] = dict(segments=n, max_abs_diff=float((got[ok] - want[ok]).abs().max()), finite=int(ok.sum()))
    return rows


def plan_rows(q, k, bar_ms=None) -> dict:
    """``S2O.plan`` per ranking: the kernels (``backend="triton"``; from a CUDA graph) against the PyTorch
    rule (``backend="torch"``, eager), and the share of query blocks whose reading order is the same in
    both (the kernels round differently: near-ties may swap)."""
    rows = {}
    for rank in ("mean", "lse"):
        fast, slow = (blocksieve.method("s2o", rank=rank, backend=b) for b in ("triton", "torch"))
        (o_fast, f_fast), (o_slow, f_slow) = fast.plan(q, k), slow.plan(q, k)
        same = float(((o_fast == o_slow).all(-1) & (f_fast == f_slow)).float().mean())
        graph = graph_timed(lambda: fast.plan(q, k))
        row = dict(triton_eager_ms=timed(lambda: fast.plan(q, k)), triton_graph_ms=graph, torch_eager_ms=timed(lambda: slow.plan(q, k), reps=3), rows_same_order=same)
        if bar_ms is not None:
            row["graph_share_of_bar"] = graph / bar_ms
        rows[rank] = row
    return rows


def default_row(length) -> dict:
    """Head dim 128: the bar, ``S2O.plan`` at the defaults, and every launch shape of both kernels."""
    q, k, v = synthetic(length)
    bar_layout = random_layout(q, k, 0.1)
    row = dict(bar_ms=timed(lambda: blocksieve.attend(q, k, v, bar_layout)))
    for name, rank in (("s2o_mean", "mean"), ("s2o_lse", "lse")):
        m = blocksieve.method("s2o", rank=rank)
        eager = timed(lambda: m.plan(q, k))
        graph = graph_timed(lambda: m.plan(q, k))
        row[name] = dict(select_ms=eager, select_graph_ms=graph, graph_share_of_bar=graph / row["bar_ms"])
    row["dot"] = dot_rows(q, k)
    row["kernel"] = lse_rows(q, k)
    row["lse_vs_torch"] = row["kernel"].pop("lse_vs_torch")
    return row


def wide_row(length) -> dict:
    """Head dim 256 (``WIDE``): its bar, both kernels' launch shapes, ``S2O.plan`` kernels vs PyTorch."""
    q, k, v = synthetic(length, **WIDE)
    bar_layout = random_layout(q, k, 0.1)
    bar = timed(lambda: blocksieve.attend(q, k, v, bar_layout))
    return dict(WIDE, bar_ms=bar, dot=dot_rows(q, k, WIDE_DOT_SHAPES), kernel=lse_rows(q, k, WIDE_SHAPES), plan=plan_rows(q, k, bar))


def main():
    lengths, out_dir = sweep_args()
    res = dict(environment(), shapes=SHAPES, dot_shapes=DOT_SHAPES, wide_shapes=WIDE_SHAPES, wide_dot_shapes=WIDE_DOT_SHAPES, lengths={})
    for length in lengths:
        row = default_row(length)
        torch.cuda.empty_cache()
        row["d256"] = wide_row(length)
        torch.cuda.empty_cache()
        res["lengths"][str(length)] = row
        print(length, row, flush=True)
    print("wrote", write_result(f"s2o_rank_{device_tag()}.json", res, out_dir))


if __name__ == "__main__":
    main()
