"""Launch shapes of the fused indexer kernel on one GPU: rows per program, key tile width, warps.

The indexer benchmark (:mod:`benchmarks.bench_indexer`) times each method with its default launch;
this sweep times the kernel calls themselves under other launch shapes, so that each method's
default is the fastest measured and the speed-ups compare best against best:

* ``dsa``: the flat prefill scan (all rows, causal), ``(row_block, block_n, num_warps)``;
* ``misa``: the same scan over the 8 routed heads of each row;
* ``hisa_coarse`` / ``hisa_fine`` / ``hisa_early``: HISA's pooled-block scan, its scan of each
  row's 64 chosen blocks (``block_n`` = 64 splits a 128-key block into two tiles, 128 reads it as
  one) and the exact scan of the rows before the gate, each with the streaming list and with the
  whole-row kernel (``whole_rows``, :mod:`blocksieve.ops.whole_row_topk`);
* ``route``: MISA's head router (``route_heads``, PyTorch and Triton), alone and with the gather of
  the routed heads (``Indexer.with_heads``), and for the B = 8 rows of a decode step (also from a
  CUDA graph);
* ``decode``: the kernel timeline (torch profiler) of one B = 8 decode step of each method.

Same synthetic DSA-form indexer as the benchmark (H_I = 64, d_I = 128, bf16, top-2048). Writes
``$OUT/indexer_launch_sweep_<gpu>.json`` (``h100``, ``h200``: :func:`benchmarks.common.device_tag`)::

    python -u -m benchmarks.indexer_launch_sweep --out $OUT
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.bench_indexer import SIZES, decode_fns, graph_replay, kernel_timeline, log, make_indexer, timed
from benchmarks.common import device_tag, environment
from blocksieve.ops.indexer_topk import indexer_topk
from blocksieve.select.token_topk import pool_keys, route_heads

# (row_block, block_n, num_warps, tma, num_stages); tma None = the default (on for Hopper), stages None = Triton's.
# Session 4 adds more rows per program and 8 warps: each program streams every key tile once for its rows, so
# the rows per program set the key traffic (about L²/2 · 256 B / rows at d = 128, bf16).
# Session 5: the scratch list is compacted LIST_CHUNK entries at a time, so the compaction no longer sets the
# register count: MISA's 8-row scan needs 153 registers with 64-key tiles (3 programs per SM by registers and
# shared memory, against 2 before), HISA's candidate scan 156 (2 stages: 3 per SM); those launches are added.
DSA = [(2, 128, 4, None, 2), (2, 128, 8, None, 2), (4, 128, 8, None, 2), (2, 64, 4, None, 2)]
MISA = [(8, 128, 4, None, 2), (8, 128, 8, None, 2), (8, 64, 4, None, 2), (8, 64, 4, None, 3), (16, 64, 4, None, 2)]
# Session 7: HISA's stages with the whole-row kernel (scores first, one selection in registers); the last
# field is whole_rows.
HISA_COARSE = [(1, 64, 4, None, None, False), (1, 64, 4, None, None, True), (1, 128, 4, None, None, True)]
HISA_FINE = [(1, 128, 4, None, None, False), (1, 128, 4, None, None, True), (1, 128, 4, None, 2, True), (1, 128, 8, None, None, True)]
HISA_EARLY = [(2, 128, 4, None, 2, None), (1, 128, 4, None, None, True), (1, 128, 4, None, 2, True)]
KINDS = ("route", "dsa", "misa", "hisa", "decode")


def sweep(c, n, device, kinds=KINDS) -> list:
    ix = make_indexer(c, 1, n, n, device)
    topk, blk, m = c["topk"], c["hisa_block"], c["hisa_m"]
    rows = []

    def add(kind, shape, fn):
        rb, bn, nw, tma, st, *whole = shape
        row = {"L": n, "kind": kind, "row_block": rb, "block_n": bn, "num_warps": nw, "tma": tma, "num_stages": st}
        rows.append({**row, **({"whole_rows": whole[0]} if whole else {}), **timed(fn, c["repeats"])})
        log(rows[-1])

    for sh in DSA if "dsa" in kinds else []:
        add("dsa", sh, lambda sh=sh: indexer_topk(ix.q, ix.k, ix.w, topk, row_block=sh[0], block_n=sh[1], num_warps=sh[2], tma=sh[3], num_stages=sh[4]))
    dec = make_indexer(c, c["decode_batch"], 1, n, device, seed=2)
    if "route" in kinds:  # MISA's router alone, with the gather of the routed heads, and for a B = 8 decode step
        pooled_r, pooled_d = pool_keys(ix.k, c["misa_block"]), pool_keys(dec.k, c["misa_block"])
        for backend in ("torch", "triton"):
            rows.append({"L": n, "kind": "misa_route", "backend": backend, **timed(lambda b=backend: route_heads(ix, c["misa_h"], c["misa_block"], pooled_r, backend=b), c["repeats"])})
            log(rows[-1])
            rows.append({"L": n, "kind": "misa_route_gather", "backend": backend, **timed(lambda b=backend: ix.with_heads(route_heads(ix, c["misa_h"], c["misa_block"], pooled_r, backend=b)), c["repeats"])})
            log(rows[-1])
            fn = lambda b=backend: route_heads(dec, c["misa_h"], c["misa_block"], pooled_d, backend=b)  # noqa: E731
            rows.append({"L": n, "kind": "misa_route_decode", "backend": backend, **timed(fn, 10), **graph_replay(fn)})
            log(rows[-1])
    routed = ix.with_heads(route_heads(ix, c["misa_h"], c["misa_block"]))
    for sh in MISA if "misa" in kinds else []:
        add("misa", sh, lambda sh=sh: indexer_topk(routed.q, routed.k, routed.w, topk, row_block=sh[0], block_n=sh[1], num_warps=sh[2], tma=sh[3], num_stages=sh[4]))
    r0 = m * blk  # HISA's late rows
    pooled = pool_keys(ix.k, blk).contiguous()
    kw = dict(rows=(r0, n), kv_tokens=n, pos_mult=blk, force_ends=True)
    for sh in HISA_COARSE if "hisa" in kinds else []:
        add("hisa_coarse", sh, lambda sh=sh: indexer_topk(
            ix.q, pooled, ix.w, m, row_block=sh[0], block_n=sh[1], num_warps=sh[2], tma=sh[3], num_stages=sh[4], whole_rows=sh[5], **kw,
        ))
    blocks = indexer_topk(ix.q, pooled, ix.w, m, **kw).long()
    for sh in HISA_FINE if "hisa" in kinds else []:
        bn = sh[1]
        tiles = blocks[..., None] * (blk // bn) + torch.arange(blk // bn, device=blocks.device)
        tiles = torch.where(blocks[..., None] >= 0, tiles, -1).flatten(-2)
        add("hisa_fine", sh, lambda t=tiles, sh=sh: indexer_topk(
            ix.q, ix.k, ix.w, topk, rows=(r0, n), tiles=t, tiles_ascending=True, block_n=sh[1], num_warps=sh[2], tma=sh[3], num_stages=sh[4],
            whole_rows=sh[5],
        ))
    early = (ix.q[:, :, :r0], ix.k[:, :, :r0], ix.w[:, :, :r0])
    for sh in HISA_EARLY if "hisa" in kinds else []:
        add("hisa_early", sh, lambda sh=sh: indexer_topk(
            *early, topk, row_block=sh[0], block_n=sh[1], num_warps=sh[2], tma=sh[3], num_stages=sh[4], whole_rows=sh[5],
        ))
    for name, fn in decode_fns(c, dec).items() if "decode" in kinds else []:
        rows.append({"L": n, "kind": f"decode_{name}", "timeline": kernel_timeline(lambda fn=fn: fn("triton"))})
        log(rows[-1])
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"subset of {','.join(KINDS)}")
    args = ap.parse_args(argv)
    c = dict(SIZES["full"])
    out = args.out / f"indexer_launch_sweep_{device_tag()}.json"
    res = {"environment": environment(), "rows": []}
    t0 = time.time()
    for n in args.lengths:
        res["rows"] += sweep(c, n, "cuda", args.kinds.split(","))
        res["wall_s"] = round(time.time() - t0, 1)
        out.write_text(json.dumps(res, indent=1))
    log("wrote", out)


if __name__ == "__main__":
    main()
