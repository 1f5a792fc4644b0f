"""Where the block selectors' time goes on one GPU: pooling bandwidth and per-method kernel profiles.

* ``pool`` rows — :func:`blocksieve.select.pool.block_mean` (the block means every GPU selector
  uses) on the benchmark's bf16 ``q [1, 32, L, 128]`` (blocks 64 and 512) and ``k [1, 8, L, 128]``
  (128, 512): median ms and the read bandwidth it reached (bytes of the input / time).
* ``s2o_sort`` rows — S2O's ranking step alone at the benchmark's default config: the Triton
  :func:`blocksieve.ops.segment_rank.segment_order_triton` (``tl.sort`` per segment, rows written;
  the default launch and 4, 8, 16 warps per program for every sort width)
  against a stable descending ``torch.sort`` of the same ``[B, Hq, NS, NK]`` scores (the sort only);
* ``sums`` rows — the last-row sums kernel (:func:`blocksieve.ops.last_rows_stats.last_rows_sums_triton`)
  as pbs (128 rows, columns only), vertical_slash (64 rows, diagonals too) and flexprefill (128
  rows) call it, and for 64 rows, columns only; with 64- and 32-key tiles (128 lost to 64 for
  every caller in session 14, 16 to both in session 17) and 128 or 256 query rows per tile
  (``pack_rows``: a KV group's heads stacked; the 64-key variants run twice, to show the run-to-run
  spread); ``max_abs_diff`` against 64 keys, one head per pass (session 18's file also has a
  keys-major tile, ``K · Qᵀ``, for the diagonal callers: slower for every tile, removed);
* ``launch`` rows — the same calls at each caller's default tiles with 4, 8 or 16 warps and 1 to 4
  pipeline stages (:data:`LAUNCHES`), and the GPU kernels of the default launch (``by_name``);
* ``cumsel`` rows — FlexPrefill's query-aware rows (block 128, every head) from a CUDA graph with
  256-2048 row entries per warp of the cumulative-mass kernel (:func:`cumsel_rows`);
* ``flexparts`` rows — FlexPrefill's pieces that run for some heads only (:func:`flexparts_rows`): the
  queries' block means, the first pass with its tile masses, the second pass under a head mask;
* ``search`` rows — FlexPrefill's threshold search per digit width, step and programs per SM (:func:`search_rows`);
* ``profile`` rows — the GPU kernels of one eager selection (``plan`` for PBS and S2O) of each
  method of :mod:`benchmarks.bench_selection` on its structured synthetic inputs (torch profiler):
  total kernel time, kernel count, and the kernels grouped by name, largest first.

Writes ``$OUT/selection_profile_h200.json``::

    python -u -m benchmarks.selection_profile --out $OUT [--lengths 32768 131072] [--parts sums,launch,profile]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

import blocksieve
from benchmarks.bench_indexer import kernel_timeline, log
from benchmarks.bench_selection import METHODS, plan_fn, synthetic, timed
from benchmarks.common import device_tag, environment
from blocksieve.select.pool import block_mean

def pool_rows(x: torch.Tensor, name: str, block: int) -> list:
    """Time of ``block_mean(x, block)`` and the read bandwidth it reaches."""
    ms = timed(lambda: block_mean(x, block), 5)
    row = {"kind": "pool", "input": name, "L": x.shape[2], "block": block, "variant": "torch.block_mean", "ms": ms}
    row["read_TBps"] = x.numel() * x.element_size() / 1e9 / ms
    log(row)
    return [row]


def s2o_sort_rows(q: torch.Tensor, k: torch.Tensor) -> list:
    """Time of S2O's ranking kernel and of a plain ``torch.sort`` of the same segment scores."""
    from blocksieve.ops.segment_rank import segment_order_triton

    m = blocksieve.method("s2o")
    c = m.config
    scores = m.segment_scores(q, k)
    args = (scores, c.segment, c.block_q, c.block_k, q.shape[2], k.shape[2], c.sink_blocks)
    rows = []
    variants = [(f"segment_order_triton, {w or 'default'} warps", lambda w=w: segment_order_triton(*args, num_warps=w)) for w in (None, 4, 8, 16)]
    for label, fn in variants + [("torch.sort(stable, descending)", lambda: torch.sort(scores, stable=True, dim=-1, descending=True))]:
        rows.append({"kind": "s2o_sort", "L": q.shape[2], "variant": label, "scores_shape": list(scores.shape), "ms": timed(fn, 5)})
        log(rows[-1])
    return rows


def largest_difference(got: tuple, base: tuple) -> float:
    """Largest absolute difference between two ``(cols, diags or None)`` results of the last-row sums."""
    return max((g - w).abs().max().item() for g, w in zip(got, base) if g is not None)


TILES = ((64, 128), (64, 256), (64, 128), (64, 256), (32, 128), (32, 256))
"""(key tile width, rows per tile) of the sums; the 64-key ones twice, for the run-to-run spread."""


def sums_rows(q: torch.Tensor, k: torch.Tensor) -> list:
    """Time of the last-row sums kernel per caller's shape, key tile width and rows packed per tile."""
    from blocksieve.ops.last_rows_stats import last_rows_sums_triton

    rows = []
    for label, r, diagonals in (("pbs", 128, False), ("columns", 64, False), ("vertical_slash", 64, True), ("flexprefill", 128, True)):
        base = last_rows_sums_triton(q, k, r, q.shape[-1] ** -0.5, diagonals, pack_rows=1)
        for block_n, pack in TILES:
            fn = lambda b=block_n, p=pack: last_rows_sums_triton(q, k, r, q.shape[-1] ** -0.5, diagonals, block_n=b, pack_rows=p)  # noqa: E731
            diff = largest_difference(fn(), base)
            row = {"kind": "sums", "L": q.shape[2], "as": label, "rows": r, "diagonals": diagonals, "block_n": block_n, "pack_rows": pack}
            rows.append(dict(row, ms=timed(fn), max_abs_diff=diff))
            log(rows[-1])
    return rows


LAUNCHES = tuple((w, s) for w in (4, 8, 16) for s in (1, 2, 3, 4))
"""(warps, pipeline stages) of the last-row sums' two passes tried at each caller's default tiles."""


def launch_rows(q: torch.Tensor, k: torch.Tensor) -> list:
    """Time of the last-row sums call per caller at its default tiles and each launch of :data:`LAUNCHES`
    (the default launch first and last, for the spread), and its GPU kernels at the default launch."""
    from blocksieve.ops.last_rows_stats import last_rows_sums_triton

    rows = []
    for label, r, diagonals in (("pbs", 128, False), ("vertical_slash", 64, True), ("flexprefill", 128, True)):
        base = last_rows_sums_triton(q, k, r, q.shape[-1] ** -0.5, diagonals)
        for i, (warps, stages) in enumerate(((None, None), *LAUNCHES, (None, None))):
            fn = lambda w=warps, s=stages: last_rows_sums_triton(q, k, r, q.shape[-1] ** -0.5, diagonals, num_warps=w, num_stages=s)  # noqa: E731
            row = {"kind": "launch", "L": q.shape[2], "as": label, "rows": r, "diagonals": diagonals, "num_warps": warps, "num_stages": stages}
            try:
                diff = largest_difference(fn(), base)
                rows.append(dict(row, ms=timed(fn), max_abs_diff=diff))
            except Exception as e:  # noqa: BLE001 - a launch that does not fit (shared memory, registers) is reported
                rows.append(dict(row, error=f"{type(e).__name__}: {e}"[:300]))
            if i == 0:
                rows[-1].update(grouped(kernel_timeline(fn)))
            log({k_: v for k_, v in rows[-1].items() if k_ != "by_name"}, rows[-1].get("by_name", [])[:6])
    return rows


CUMSEL_ENTRIES_PER_WARP = (256, 512, 1024, 2048)
"""Row entries per warp of the cumulative-mass row kernel tried in ``cumsel`` rows."""


def cumsel_rows(q: torch.Tensor, k: torch.Tensor) -> list:
    """Time from a CUDA graph of FlexPrefill's query-aware rows (:func:`blocksieve.ops.cumulative_select.cumulative_select_chunked`
    over its block scores, every head) per :data:`blocksieve.ops.cumulative_select.ENTRIES_PER_WARP` of
    :data:`CUMSEL_ENTRIES_PER_WARP`, twice each, alternating; ``same_rows`` against the default's."""
    from unittest import mock

    from benchmarks.bench_selection import graph_timed
    from blocksieve.methods.flexprefill import query_aware_scores
    from blocksieve.ops import cumulative_select as cs

    block, (b, hq, n, d) = 128, q.shape
    nb = -(-n // block)
    scores = query_aware_scores(block_mean(q, block), block_mean(k, block), block, 0, d**-0.5)
    limit = cs.causal_limit(block, block, n, n, q.device)
    fn = lambda: cs.cumulative_select_chunked(scores, b, hq, nb, nb, 0.9, limit=limit)  # noqa: E731
    ref = fn()
    rows = []
    for rep in range(2):
        for per_warp in CUMSEL_ENTRIES_PER_WARP:
            with mock.patch.object(cs, "ENTRIES_PER_WARP", per_warp):
                same = all(torch.equal(a, b_) for a, b_ in zip(fn(), ref))
                rows.append({"kind": "cumsel", "L": n, "key_blocks": nb, "entries_per_warp": per_warp, "rep": rep, "graph_ms": graph_timed(fn), "same_rows": same})
            log(rows[-1])
    return rows


BLOCK_MEAN_LAUNCHES = ((128, 8), (128, 4), (64, 8), (64, 4))
"""(rows per load, warps) of :func:`blocksieve.ops.head_block_mean.block_mean_triton` tried in ``flexparts`` rows."""

STATS_LAUNCHES = ((128, 4, 3), (128, 8, 3), (256, 4, 2), (256, 8, 2), (256, 16, 3))
"""(rows per tile, warps, stages) of the first pass with tile masses tried in ``flexparts`` rows (default: 256, 8, 3)."""


def flexparts_rows(q: torch.Tensor, k: torch.Tensor) -> list:
    """Time from a CUDA graph of FlexPrefill's per-head pieces at block 128, twice each, alternating:
    the queries' block means (PyTorch's, and the head-masked kernel's with every head on per launch of
    :data:`BLOCK_MEAN_LAUNCHES` and with every head off), the first pass with and without the tile masses
    (at its default launch and those of :data:`STATS_LAUNCHES`, ``max_abs_diff`` against the default's),
    and the second pass (diagonals too) without a head mask, with every head on and with every head off;
    ``max_abs_diff`` against PyTorch's means / the unmasked sums."""
    from benchmarks.bench_selection import graph_timed
    from blocksieve.ops.head_block_mean import block_mean_triton
    from blocksieve.ops.last_rows_stats import last_rows_stats_triton, last_rows_sums_triton

    block, (b, hq, n, d) = 128, q.shape
    scale = d**-0.5
    on, off = torch.ones(b, hq, dtype=torch.bool, device=q.device), torch.zeros(b, hq, dtype=torch.bool, device=q.device)
    means = block_mean(q, block)
    bias = last_rows_stats_triton(q, k, block, scale)[0]
    sums = last_rows_sums_triton(q, k, block, scale, bias=bias)
    stats = last_rows_stats_triton(q, k, block, scale, mass_tile=64)
    variants = [("block_mean torch", lambda: block_mean(q, block), lambda r: (r - means).abs().max().item())]
    for bl, w in BLOCK_MEAN_LAUNCHES:
        variants.append((f"block_mean_triton all on, {bl} rows, {w} warps", lambda bl=bl, w=w: block_mean_triton(q, block, on, bl, w), lambda r: (r - means).abs().max().item()))
    variants += [
        ("block_mean_triton all off", lambda: block_mean_triton(q, block, off), None),
        ("stats pass", lambda: last_rows_stats_triton(q, k, block, scale), None),
        ("stats pass with tile masses", lambda: last_rows_stats_triton(q, k, block, scale, mass_tile=64), None),
    ]
    for pack, w, st in STATS_LAUNCHES:
        label = f"stats pass with tile masses, {pack} rows per tile, {w} warps, {st} stages"
        variants.append((label, lambda pack=pack, w=w, st=st: last_rows_stats_triton(q, k, block, scale, 64, pack, w, st), lambda r: largest_difference(r, stats)))
    variants += [
        ("sums pass, no head mask", lambda: last_rows_sums_triton(q, k, block, scale, bias=bias), lambda r: largest_difference(r, sums)),
        ("sums pass, every head on", lambda: last_rows_sums_triton(q, k, block, scale, bias=bias, head_mask=on), lambda r: largest_difference(r, sums)),
        ("sums pass, every head off", lambda: last_rows_sums_triton(q, k, block, scale, bias=bias, head_mask=off), None),
    ]
    rows = []
    for rep in range(2):
        for label, fn, diff in variants:
            rows.append({"kind": "flexparts", "L": n, "variant": label, "rep": rep, "graph_ms": graph_timed(fn)})
            if diff is not None:
                rows[-1]["max_abs_diff"] = diff(fn())
            log(rows[-1])
    return rows


SEARCH_LAUNCHES = ((2, 1024, 4), (2, 2048, 4), (2, 1024, 8), (2, 2048, 8), (4, 512, 4), (4, 1024, 4))
"""(bits per digit, entries per step, programs per SM) of :func:`blocksieve.ops.mass_threshold.cumulative_mask_triton`
tried in ``search`` rows (the first is the default)."""


def search_rows(q: torch.Tensor, k: torch.Tensor) -> list:
    """Time from a CUDA graph of FlexPrefill's threshold search over its stacked column and diagonal sums
    (block 128, every head, gamma 0.9) per launch of :data:`SEARCH_LAUNCHES`, twice each, alternating;
    ``same_mask`` against the default launch's mask."""
    from unittest import mock

    from benchmarks.bench_selection import graph_timed
    from blocksieve.ops import mass_threshold as mt
    from blocksieve.ops.last_rows_stats import last_rows_sums_triton

    b, hq, n, d = q.shape
    sums = torch.empty(2, b, hq, n, dtype=torch.float32, device=q.device)
    last_rows_sums_triton(q, k, 128, d**-0.5, out=sums)
    ref = mt.cumulative_mask_triton(sums, 0.9)
    rows = []
    for rep in range(2):
        for bits, block, per_sm in SEARCH_LAUNCHES:
            with mock.patch.multiple(mt, DIGIT_BITS=bits, PASSES=32 // bits, BLOCK=block, PROGRAMS_PER_SM=per_sm):
                fn = lambda: mt.cumulative_mask_triton(sums, 0.9)  # noqa: E731
                row = {"kind": "search", "L": n, "digit_bits": bits, "block": block, "programs_per_sm": per_sm, "rep": rep}
                row.update(graph_ms=graph_timed(fn), same_mask=torch.equal(fn(), ref))
            rows.append(row)
            log(row)
    return rows


def grouped(timeline: list) -> dict:
    """Kernel time and count per kernel name, largest first."""
    acc = defaultdict(lambda: [0.0, 0])
    for name, ms in timeline:
        acc[name][0] += ms
        acc[name][1] += 1
    total = sum(ms for _, ms in timeline)
    return {
        "kernel_ms_total": round(total, 4),
        "kernels": len(timeline),
        "by_name": [{"name": n, "ms": round(v[0], 4), "count": v[1]} for n, v in sorted(acc.items(), key=lambda kv: -kv[1][0])],
    }


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--parts", default="pool,sort,sums,profile", help="which kinds of rows to measure")
    args = ap.parse_args(argv)
    out = args.out / f"selection_profile_{device_tag()}.json"
    res = {"environment": environment(), "rows": []}
    t0 = time.time()
    parts = args.parts.split(",")
    for n in args.lengths:
        q, k, _ = synthetic(n)
        for name, x, block in (("q", q, 64), ("q", q, 512), ("k", k, 128), ("k", k, 512)) if "pool" in parts else ():
            res["rows"] += pool_rows(x, name, block)
        res["rows"] += s2o_sort_rows(q, k) if "sort" in parts else []
        res["rows"] += sums_rows(q, k) if "sums" in parts else []
        res["rows"] += launch_rows(q, k) if "launch" in parts else []
        res["rows"] += cumsel_rows(q, k) if "cumsel" in parts else []
        res["rows"] += flexparts_rows(q, k) if "flexparts" in parts else []
        res["rows"] += search_rows(q, k) if "search" in parts else []
        for label in args.methods.split(",") if "profile" in parts else ():
            name, cfg = METHODS[label]
            fn = plan_fn(blocksieve.method(name, **cfg), q, k)
            row = {"kind": "profile", "method": label, "L": n, "eager_ms": timed(fn), **grouped(kernel_timeline(fn))}
            res["rows"].append(row)
            log({k_: v for k_, v in row.items() if k_ != "by_name"}, row["by_name"][:6])
        del q, k
        torch.cuda.empty_cache()
        res["wall_s"] = round(time.time() - t0, 1)
        out.write_text(json.dumps(res, indent=1))
    log("wrote", out)


if __name__ == "__main__":
    main()
