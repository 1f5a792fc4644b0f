"""Launch options and rows per program of MoBA's gate kernel (GPU), on bench_selection's inputs.

For each MoBA setting of :mod:`benchmarks.bench_selection` (the paper's 512/top-3 and FlashMoBA's
128/top-8) and length: the selection (``m.select``: pooling plus the gate kernel) from a CUDA graph
with :data:`blocksieve.ops.moba_gate.GATE_LAUNCH` set to each ``(num_warps, num_stages)``,
:data:`~blocksieve.ops.moba_gate.ROWS` to each rows-per-program target and
:data:`~blocksieve.ops.moba_gate.BN` to each chunk width; each variant's layout is compared with
the default launch's. ``--base FILE ...`` also times earlier ``moba_gate.py`` files (each one's
``moba_layout`` at its own defaults, named by its file stem) on the same inputs, before and after the
variants, for an A/B in one run. The bar
of the block-methods issue is 10 % of the random 10 %-density layout's attention time, measured
here too. Writes ``$OUT/moba_launch_sweep_<gpu>.json``::

    python -u -m benchmarks.moba_launch_sweep --out $OUT [--base old_moba_gate.py ...]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

import torch

import blocksieve
from benchmarks.bench_selection import METHODS, attend_fn, graph_timed, random_layout, synthetic, timed
from benchmarks.common import device_tag, environment, write_result
from blocksieve.ops import moba_gate

VARIANTS = [(4, 1, 64, 128), (4, 1, 64, 64), (8, 1, 64, 128), (4, 1, 32, 128), (8, 1, 64, 64)]
"""``(num_warps, num_stages, ROWS, BN)``, the default first; each layout is compared with the first variant's."""


def load_module(path: Path):
    spec = importlib.util.spec_from_file_location(f"moba_gate_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def base_row(m, q, k, base, ref) -> dict:
    """The earlier gate's selection time (graph) and whether its layout equals the default's."""
    current = moba_gate.moba_layout
    moba_gate.moba_layout = base.moba_layout  # MoBA.select imports it from the module at call time
    try:
        lay = m.select(q, k)
        return dict(select_graph_ms=graph_timed(lambda: m.select(q, k)), same_layout=bool(torch.equal(lay.indices, ref)))
    finally:
        moba_gate.moba_layout = current


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="32768,131072")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--base", type=Path, nargs="*", default=[], help="earlier moba_gate.py files to time on the same inputs")
    args = ap.parse_args(argv)
    bases = {p.stem: load_module(p) for p in args.base}
    rows = []
    default = moba_gate.GATE_LAUNCH, moba_gate.ROWS, moba_gate.BN
    for length in (int(x) for x in args.lengths.split(",")):
        q, k, v = synthetic(length)
        fn, backend = attend_fn(q, k, v, random_layout(q, k, 0.1))
        bar = timed(fn) * 0.1
        for name in ("moba", "moba_b128_top8"):
            m = blocksieve.method(METHODS[name][0], **METHODS[name][1])
            ref = m.select(q, k).indices.clone()
            common = dict(L=length, method=name, bar_ms=bar, attend_backend=backend)
            for stem, base in bases.items():
                rows.append(dict(common, variant=f"{stem}, before", **base_row(m, q, k, base, ref)))
                print(rows[-1], flush=True)
            for warps, stages, per, bn in VARIANTS:
                moba_gate.GATE_LAUNCH, moba_gate.ROWS, moba_gate.BN = dict(num_warps=warps, num_stages=stages), per, bn
                lay = m.select(q, k)
                ms = graph_timed(lambda: m.select(q, k))
                rows.append(dict(common, num_warps=warps, num_stages=stages, rows=per, bn=bn, select_graph_ms=ms,
                                 share_of_sparse10=ms / (bar * 10), same_layout=bool(torch.equal(lay.indices, ref))))
                print(rows[-1], flush=True)
            moba_gate.GATE_LAUNCH, moba_gate.ROWS, moba_gate.BN = default
            for stem, base in bases.items():
                rows.append(dict(common, variant=f"{stem}, after", **base_row(m, q, k, base, ref)))
                print(rows[-1], flush=True)
        torch.cuda.empty_cache()
    res = {"environment": environment(), "variants": VARIANTS, "bases": [str(p) for p in args.base], "rows": rows}
    print("wrote", write_result(f"moba_launch_sweep_{device_tag()}.json", res, Path(args.out)))


if __name__ == "__main__":
    main()
