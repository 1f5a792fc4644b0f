"""A/B of the fused indexer kernel on one GPU: this checkout's ``ops/indexer_topk.py`` against a baseline copy.

A kernel change is judged against the kernel it replaces, timed in the same run on the same
machine. The baseline is a copy of the module from an earlier commit, e.g.::

    git show 0fad883:blocksieve/ops/indexer_topk.py > .xcache/indexer_topk_base.py
    python -u -m benchmarks.indexer_ab --baseline .xcache/indexer_topk_base.py --out $OUT

(``.xcache`` is ignored by git: pass it to the GPU machine with ``carry``.) For each length it
times the flat prefill scans of DSA (all 64 heads) and MISA (its 8 routed heads) with each module
and each launch of ``LAUNCHES``, on the synthetic DSA-form indexer of :mod:`benchmarks.bench_indexer`,
and reports the share of rows whose ids equal the first launch's of the same method (the
baseline's): fp32 head sums added in another order may swap keys of near-equal score. The
checked comparison with the PyTorch rule is :mod:`benchmarks.bench_indexer`'s ``correctness``
stage. The variants compile in parallel subprocesses first. Writes ``$OUT/indexer_ab_<gpu>.json`` (``h100``, ``h200``: :func:`benchmarks.common.device_tag`).
``--smoke`` runs the same at toy sizes (on the CPU: ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.bench_indexer import SIZES, log, make_indexer, timed
from benchmarks.common import device_tag, environment
from blocksieve.ops import indexer_topk as current
from blocksieve.select.token_topk import route_heads

LAUNCHES = [
    ("base", "dsa", 2, 128, 4), ("new", "dsa", 2, 128, 4), ("new", "dsa", 2, 64, 4),
    ("base", "misa", 8, 128, 4), ("new", "misa", 8, 128, 4), ("new", "misa", 8, 64, 4), ("new", "misa", 16, 64, 4),
]
"""(module, method, rows per program, key tile, warps); the first launch of each method is its reference."""


def load_baseline(path: Path):
    """The baseline kernel module, imported from a file under its own name."""
    spec = importlib.util.spec_from_file_location("indexer_topk_base", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def scan(launch, modules, ix, routed, topk):
    """``fn()`` running one launch's flat scan (all rows, causal)."""
    mod, method, rows, block_n, warps = launch
    src = routed if method == "misa" else ix
    return lambda: modules[mod].indexer_topk(src.q, src.k, src.w, topk, row_block=rows, block_n=block_n, num_warps=warps, num_stages=2)


def indexers(c, n):
    """The DSA-form indexer at length ``n`` and MISA's routed one (its ``misa_h`` heads per row gathered)."""
    ix = make_indexer(c, 1, n, n, "cuda" if torch.cuda.is_available() else "cpu")
    return ix, ix.with_heads(route_heads(ix, c["misa_h"], c["misa_block"]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", type=Path, required=True, help="a copy of ops/indexer_topk.py from the commit to compare with")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--smoke", action="store_true", help="toy sizes (CPU: TRITON_INTERPRET=1)")
    ap.add_argument("--warm", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    c = dict(SIZES["smoke" if args.smoke else "full"])
    modules = {"base": load_baseline(args.baseline), "new": current}
    if args.warm is not None:  # compile one launch (a subprocess of the parallel warm-up)
        scan(LAUNCHES[args.warm], modules, *indexers(c, c["lengths"][0]), c["topk"])()
        return
    t0 = time.time()
    base_cmd = [sys.executable, "-m", "benchmarks.indexer_ab", "--baseline", str(args.baseline), "--out", str(args.out)]
    procs = [subprocess.Popen(base_cmd + ["--smoke"] * args.smoke + ["--warm", str(i)]) for i in range(len(LAUNCHES))]
    res = {"environment": environment(), "baseline": str(args.baseline), "warmup_failed": [i for i, p in enumerate(procs) if p.wait()]}
    res["warmup_s"], res["rows"] = round(time.time() - t0, 1), []
    out = args.out / f"indexer_ab_{device_tag()}.json"
    for n in c["lengths"]:
        ix, routed = indexers(c, n)
        first = {}
        for launch in LAUNCHES:
            fn = scan(launch, modules, ix, routed, c["topk"])
            ids = fn()
            ref = first.setdefault(launch[1], ids)
            row = dict(zip(("module", "method", "row_block", "block_n", "num_warps"), launch), L=n)
            row.update(rows_equal_to_reference=(ids == ref).all(-1).float().mean().item(), **timed(fn, c["repeats"]))
            res["rows"].append(row)
            log(row)
            out.write_text(json.dumps(res, indent=1))
        del ix, routed, first
        torch.cuda.empty_cache()
    log("wrote", out)


if __name__ == "__main__":
    main()
