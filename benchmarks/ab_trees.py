"""Selection time of the same methods in two source trees, this one and a baseline checkout, alternating (GPU).

An A/B of a change against the code before it, in one run on one card, without keeping the old
code beside the new: the baseline is a checkout of an earlier commit in a directory
(``git worktree add DIR REV``, or ``git archive REV | tar -x -C DIR``). Each round runs one child
process per tree (baseline first), each child importing ``blocksieve`` and
:mod:`benchmarks.bench_selection` from its own tree and timing, per length, every method's selection
(``plan`` or ``select``, bench_selection's inputs and defaults) from a CUDA graph and eagerly, and
the random 10 %-density layout's attention (the bar: selection at most 0.1 of it). ``layout_digest``
is a hash of the layout ids a selection returned, so that rows of the two trees with equal digests
chose the same blocks. Compare the graph times: the eager ones are host-bound and were not
comparable between the trees in session 22 (the tree run second in each round was slower eagerly in
both A/Bs of one call, whichever it was). Writes ``$OUT/ab_trees_<gpu>.json``::

    python benchmarks/ab_trees.py --baseline DIR --baseline-rev REV --methods flexprefill,vertical_slash \\
        [--lengths 32768,131072] [--rounds 2] --out $OUT
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def digest(result) -> str:
    """Short hash of the id tensors of a selection (a layout, or each layout of a plan's tuple)."""
    import torch

    parts = result if isinstance(result, tuple) else (result,)
    h = hashlib.sha256()
    for p in parts:
        t = p if isinstance(p, torch.Tensor) else p.indices
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def child(tree: Path, methods: list, lengths: list) -> list:
    """Rows of one tree: imports its ``blocksieve`` and ``benchmarks`` (``tree`` first on the path)."""
    sys.path.insert(0, str(tree))
    import torch

    import blocksieve
    from benchmarks.bench_selection import METHODS, attend_fn, graph_timed, plan_fn, random_layout, synthetic, timed

    assert Path(blocksieve.__file__).resolve().is_relative_to(tree.resolve()), f"imported {blocksieve.__file__}, not {tree}"
    rows = []
    for length in lengths:
        q, k, v = synthetic(length)
        run, backend = attend_fn(q, k, v, random_layout(q, k, 0.10))
        sparse10 = timed(run)
        for name in methods:
            meth, cfg = METHODS[name]
            fn = plan_fn(blocksieve.method(meth, **cfg), q, k)
            graph_ms = graph_timed(fn)
            rows.append(dict(L=length, method=name, select_graph_ms=graph_ms, select_eager_ms=timed(fn), sparse10_ms=sparse10,
                             share_of_sparse10=graph_ms / sparse10, attend_backend=backend, layout_digest=digest(fn())))
        del q, k, v
        torch.cuda.empty_cache()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", type=Path, help="directory holding a checkout of the baseline commit")
    ap.add_argument("--baseline-rev", default="", help="the baseline's commit, recorded in the output")
    ap.add_argument("--methods", default="flexprefill,vertical_slash")
    ap.add_argument("--lengths", default="32768,131072")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # internal: measure this tree, print JSON rows
    args = ap.parse_args(argv)
    methods, lengths = args.methods.split(","), [int(x) for x in args.lengths.split(",")]
    if args.child:
        print(json.dumps(child(args.child, methods, lengths)))
        return
    if args.baseline is None or not (args.baseline / "blocksieve").is_dir():
        raise SystemExit(f"--baseline must be a directory holding a checkout with blocksieve/, got {args.baseline}")
    sys.path.insert(0, str(HERE))
    from benchmarks.common import device_tag, environment, write_result

    rows = []
    for rnd in range(args.rounds):
        for tree, label in ((args.baseline, "baseline"), (HERE, "current")):
            cmd = [sys.executable, __file__, "--child", str(tree), "--methods", args.methods, "--lengths", args.lengths]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True)
            for row in json.loads(out.stdout.strip().splitlines()[-1]):
                rows.append(dict(row, tree=label, round=rnd))
                print(rows[-1], flush=True)
            path = write_result(f"ab_trees_{device_tag()}.json", {"environment": environment(), "baseline_rev": args.baseline_rev, "rows": rows}, args.out)
    print("wrote", path)


if __name__ == "__main__":
    main()
