"""A/B, in one run, of launch and glue choices in the last-row selectors (GPU, CUDA graphs, bench_selection's inputs).

The cases (each the default against the alternatives named):

* ``tile`` — the last-row sums' default tiles (:data:`blocksieve.ops.last_rows_stats.BLOCK_N` keys,
  :data:`~blocksieve.ops.last_rows_stats.DIAGONAL_PACK_ROWS` rows per tile with the diagonals,
  :data:`~blocksieve.ops.last_rows_stats.PACK_ROWS` without) against others: 32 keys and 128 rows for
  ``flexprefill`` (its tile before session 19), 32 keys and 256 rows for ``pbs`` (the faster with 8 warps).
* ``launch`` — the last-row passes' warps and stages (:func:`blocksieve.ops.last_rows_stats.default_launch`)
  against those before session 19 (8 warps for tiles of 128 rows or more, 3 stages):
  ``vertical_slash`` and ``pbs``.
* ``permute`` — :func:`blocksieve.select.reorder.apply_permutation` (on CUDA ``torch.gather`` with
  the index expanded over the head dim) against :func:`~blocksieve.select.reorder.permute_by_row_copy`,
  as in session 18: ``pbs`` (its plan permutes K).
* ``shape_cache`` — PBS's shape-only parts (segment starts, own-segment layout) cached per shapes
  (:func:`blocksieve.methods.pbs.own_segment_parts`) against built on every call.
* ``mass_threshold`` — ``flexprefill``'s column and diagonal sets by
  :func:`blocksieve.ops.mass_threshold.cumulative_mask_triton` (2-bit digits, about 4 programs per
  multiprocessor) against the sort (:func:`blocksieve.select.choose.cumulative_mask`), 4-bit digits,
  2 or 8 programs per multiprocessor. Session 20's file also has ``before_s20``, the whole kernel path
  before that session (sorts, fp32 query-aware scores, both patterns' rows for every head and a
  ``torch.where``), then a copy of that code kept here; :mod:`benchmarks.ab_trees` with
  ``--baseline`` a checkout of commit ba7c184 times the same path without the copy.
* ``query_aware_scores`` — ``flexprefill``'s block scores of every query block on tensor cores in
  ``tf32x3`` (:func:`blocksieve.methods.flexprefill.query_aware_scores`) against ``torch.matmul`` in fp32.

Each variant's selection is timed from a CUDA graph, the variants alternating twice;
``same_layout`` compares each variant's selection with the default's (another tile changes the
order of the fp32 sums, so near-ties may flip).
``share_of_sparse10`` is the selection time over the random 10 %-density layout's attention time
(the block-methods issue asks for at most 0.10), measured here too. Writes
``$OUT/last_rows_ab_<gpu>.json``::

    python -u -m benchmarks.last_rows_ab --out $OUT [--cases flexprefill:mass_threshold,...]

Session 17's files (``benchmarks/results/last_rows_ab_h100_s17*.json``) A/B'd the choices made then:
32-key tiles for FlexPrefill, four heads per tile for vertical_slash, the unsorted top-k.
``last_rows_ab_h100_s19_call1.json`` A/B'd session 18's choices and kernels kept off main (the
radix-select top-k and digit-search cumulative masks, slower: ``docs/dev/blocks_notes.md``, session 19);
``_call2`` and ``_call4`` the tiles and launches chosen then. ``last_rows_ab_h100_s20.json`` A/B'd
session 20's FlexPrefill changes when the search ran 4-bit digits and one call per set (its
``2_bit_digits`` rows are today's digits, run as two calls).
"""

from __future__ import annotations

import argparse
import contextlib
from unittest import mock

import torch

import blocksieve
from benchmarks.bench_selection import METHODS, attend_fn, graph_timed, plan_fn, random_layout, synthetic, timed
from benchmarks.common import device_tag, environment, sweep_args, write_result
from blocksieve.layout import BlockLayout
from blocksieve.methods import flexprefill, pbs
from blocksieve.ops import last_rows_stats, mass_threshold
from blocksieve.select.choose import cumulative_mask
from blocksieve.select.reorder import permute_by_row_copy
from blocksieve.select.score import grouped_dot


def launch_before_s19(diagonals: bool, rows: int, tile_rows: int) -> tuple:
    """The last-row passes' launch before session 19: 8 warps for tiles of 128 rows or more, else 4; 3 stages."""
    return (8 if tile_rows >= 128 else 4), 3


def fingerprint(result) -> list:
    """The tensors a selection returned (a layout's ids; each part of a plan's tuple), to compare variants."""
    parts = (result,) if isinstance(result, BlockLayout) else result
    return [p if isinstance(p, torch.Tensor) else p.indices for p in parts]


def fp32_scores(qp, kp, block, offset, scale):
    """FlexPrefill's query-aware scores before session 20: ``torch.matmul`` in fp32 (SIMT on the GPU)."""
    return lambda n0, n1: grouped_dot(qp[:, :, n0:n1], kp, scale)


def patched(*changes):
    """A context factory setting ``(module, attribute, value)`` changes for one variant."""

    def enter():
        stack = contextlib.ExitStack()
        for owner, name, value in changes:
            stack.enter_context(mock.patch.object(owner, name, value))
        return stack

    return enter


CASES = {
    ("vertical_slash", "launch"): {"8_warps_3_stages": patched((last_rows_stats, "default_launch", launch_before_s19))},
    ("pbs", "launch"): {"8_warps_3_stages": patched((last_rows_stats, "default_launch", launch_before_s19))},
    ("flexprefill", "tile"): {"32_keys_128_rows": patched((last_rows_stats, "BLOCK_N", 32), (last_rows_stats, "DIAGONAL_PACK_ROWS", 128))},
    ("pbs", "tile"): {"32_keys_256_rows": patched((last_rows_stats, "BLOCK_N", 32), (last_rows_stats, "PACK_ROWS", 256))},
    ("pbs", "permute"): {"index_select": patched((pbs, "apply_permutation", permute_by_row_copy))},
    ("pbs", "shape_cache"): {"uncached": patched((pbs, "own_segment_parts", pbs.own_segment_parts.__wrapped__))},
    ("flexprefill", "mass_threshold"): {
        "sort": patched((mass_threshold, "cumulative_mask_triton", lambda mass, tau: cumulative_mask(mass, tau))),
        "4_bit_digits": patched((mass_threshold, "DIGIT_BITS", 4), (mass_threshold, "PASSES", 8)),
        "2_programs_per_sm": patched((mass_threshold, "PROGRAMS_PER_SM", 2)),
        "8_programs_per_sm": patched((mass_threshold, "PROGRAMS_PER_SM", 8)),
    },
    ("flexprefill", "query_aware_scores"): {"fp32_matmul": patched((flexprefill, "query_aware_scores", fp32_scores))},
}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="", help="method:choice pairs to run, comma-separated (default: every case)")
    args, rest = ap.parse_known_args(argv)
    lengths, out = sweep_args(rest)
    wanted = {tuple(c.split(":")) for c in args.cases.split(",") if c}
    cases = {key: alt for key, alt in CASES.items() if not wanted or key in wanted}
    rows = []
    for length in lengths:
        q, k, v = synthetic(length)
        run, backend = attend_fn(q, k, v, random_layout(q, k, 0.10))
        sparse10 = timed(run)
        for (name, choice), alternatives in cases.items():
            meth, cfg = METHODS[name]
            m = blocksieve.method(meth, **cfg)
            fn = plan_fn(m, q, k)
            ref = [t.clone() for t in fingerprint(fn())]
            variants = {"default": contextlib.nullcontext, **alternatives}
            for rep in range(2):
                for variant, context in variants.items():
                    with context():
                        same = all(torch.equal(a, b) for a, b in zip(fingerprint(fn()), ref))
                        ms = graph_timed(fn)
                    rows.append(dict(L=length, method=name, choice=choice, variant=variant, rep=rep, select_graph_ms=ms,
                                     share_of_sparse10=ms / sparse10, sparse10_ms=sparse10, attend_backend=backend, same_layout=same))
                    print(rows[-1], flush=True)
        del q, k, v
        torch.cuda.empty_cache()
        path = write_result(f"last_rows_ab_{device_tag()}.json", {"environment": environment(), "rows": rows}, out)  # after each length
    print("wrote", path)


if __name__ == "__main__":
    main()
