"""Simulated scratch-list bookkeeping of the fused indexer scan: compactions and bisection passes per row.

Replays, on the CPU, the rule of :mod:`blocksieve.ops.indexer_topk` for one row: keys arrive in
chunks, those whose packed ``(score bits, id)`` beats the threshold are appended, and when the list
has no room for another chunk a bisection on the packed value raises the threshold until between
``topk`` and ``keep`` entries remain (``keep = topk``: the exact top-k every time). Counts the
compactions, bisection passes and appends per row for Gaussian scores, for the kernel's window
(``_buffer_shape``) and for other widths::

    python -m benchmarks.indexer_compaction_sim --lengths 16384 32768 131072

Scores in a real scan are not Gaussian, and the counts say nothing about time; they show how many
counting passes (each one compare and one reduction over the list) a window saves.
"""

from __future__ import annotations

import argparse

import torch

from blocksieve.ops.indexer_topk import EMPTY_SLOT, _buffer_shape


def packed_scores(n: int, seed: int) -> torch.Tensor:
    """Gaussian fp32 scores of ``n`` keys packed like the kernel's ``_pack``: int64 ``bits << 32 | id``."""
    sc = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    bits = sc.view(torch.int32).long()
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (bits << 32) | torch.arange(n)


def simulate(pk: torch.Tensor, topk: int, room: int, cap: int, keep: int) -> dict:
    """Compactions, bisection passes and appends of one row scanning ``pk`` in chunks of ``room`` keys."""
    buf, tau = pk[:0], EMPTY_SLOT
    out = dict(compactions=0, passes=0, appends=0)
    for c0 in range(0, len(pk), room):
        new = pk[c0 : c0 + room]
        new = new[new > tau]
        out["appends"] += len(new)
        buf = torch.cat([buf, new])
        if len(buf) > cap - room:
            out["compactions"] += 1
            lo, hi, c_lo = int(buf.min()), int(buf.max()) + 1, len(buf)
            while c_lo > keep and lo + 1 < hi:
                mid = (lo + hi) // 2
                c = int((buf >= mid).sum())
                out["passes"] += 1
                lo, c_lo, hi = (mid, c, hi) if c >= topk else (lo, c_lo, mid)
            tau = lo
            buf = buf[buf >= tau]
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768, 131072])
    ap.add_argument("--topk", type=int, default=2048)
    ap.add_argument("--block-n", type=int, default=128)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args(argv)
    chunk, cap, keep = _buffer_shape(args.topk, args.block_n)
    room = chunk * args.block_n
    print(f"topk {args.topk}, list of {cap} slots, chunks of {room} keys, kernel window keep = {keep}")
    for n in args.lengths:
        for k_hi in sorted({args.topk, keep, args.topk + (cap - room - args.topk) // 2}):
            runs = [simulate(packed_scores(n, s), args.topk, room, cap, k_hi) for s in range(args.seeds)]
            mean = {key: sum(r[key] for r in runs) / len(runs) for key in runs[0]}
            tag = "exact" if k_hi == args.topk else ("kernel" if k_hi == keep else "wider")
            print(f"  {n:7d} keys, keep <= {k_hi} ({tag}): " + ", ".join(f"{key} {v:.1f}" for key, v in mean.items()))


if __name__ == "__main__":
    main()
