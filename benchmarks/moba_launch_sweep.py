"""Launch options and rows per program of MoBA's gate kernel (GPU), on bench_selection's inputs.

For each MoBA setting of :mod:`benchmarks.bench_selection` (the paper's 512/top-3 and FlashMoBA's
128/top-8) and length: the selection (``m.select``: pooling plus the gate kernel) from a CUDA graph
with :data:`blocksieve.ops.moba_gate.GATE_LAUNCH` set to each ``(num_warps, num_stages)`` and
:data:`~blocksieve.ops.moba_gate.ROWS` to each rows-per-program target; each variant's layout is
compared with the default launch's. The bar of the block-methods issue is 10 % of the random
10 %-density layout's attention time, measured here too. Writes ``$OUT/moba_launch_sweep_<gpu>.json``::

    python -u -m benchmarks.moba_launch_sweep --out $OUT
"""

from __future__ import annotations

import torch

import blocksieve
from benchmarks.bench_selection import METHODS, attend_fn, graph_timed, random_layout, synthetic, timed
from benchmarks.common import device_tag, environment, sweep_args, write_result
from blocksieve.ops import moba_gate

VARIANTS = [(4, 3, 32), (4, 1, 32), (8, 1, 32), (8, 2, 32), (4, 1, 16)]
"""``(num_warps, num_stages, ROWS)``; each layout is compared with the first variant's."""


def main(argv=None):
    lengths, out_dir = sweep_args(argv)
    rows = []
    default = moba_gate.GATE_LAUNCH, moba_gate.ROWS
    for length in lengths:
        q, k, v = synthetic(length)
        fn, backend = attend_fn(q, k, v, random_layout(q, k, 0.1))
        bar = timed(fn) * 0.1
        for name in ("moba", "moba_b128_top8"):
            m = blocksieve.method(METHODS[name][0], **METHODS[name][1])
            ref = None
            for warps, stages, per in VARIANTS:
                moba_gate.GATE_LAUNCH, moba_gate.ROWS = dict(num_warps=warps, num_stages=stages), per
                lay = m.select(q, k)
                ref = lay.indices.clone() if ref is None else ref
                ms = graph_timed(lambda: m.select(q, k))
                rows.append(dict(L=length, method=name, num_warps=warps, num_stages=stages, rows=per, select_graph_ms=ms,
                                 share_of_sparse10=ms / (bar * 10), bar_ms=bar, same_layout=bool(torch.equal(lay.indices, ref)), attend_backend=backend))
                print(rows[-1], flush=True)
        moba_gate.GATE_LAUNCH, moba_gate.ROWS = default
        torch.cuda.empty_cache()
    print("wrote", write_result(f"moba_launch_sweep_{device_tag()}.json", {"environment": environment(), "variants": VARIANTS, "rows": rows}, out_dir))


if __name__ == "__main__":
    main()
