"""The Triton selection paths against the PyTorch rules on real attention (CPU, Triton interpreter).

The kernel tests use random inputs; this runs each block selector both ways on q/k captured from a
real model on real text and counts the layout rows (query block × head) that differ, with the
density each path keeps. Row differences can only come from near-ties (the two paths sum in
different orders); the S2O row is its plan (block order), compared row by row too.

Usage (CPU; the interpreter is slow, a few minutes per layer)::

    TRITON_INTERPRET=1 python -m benchmarks.kernel_paths_real --model smollm2-135m --texts kjv austen --length 4096

Writes ``benchmarks/results/kernel_paths_real_<model>_<length>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

import blocksieve
from benchmarks.common import RESULTS, environment
from benchmarks.fidelity_blocks import load_layers

METHODS = {
    "moba": ("moba", {}),
    "moba_b128_top8": ("moba", {"moba_block": 128, "top_k": 8}),
    "vertical_slash": ("vertical_slash", {}),
    "flexprefill": ("flexprefill", {}),
    "pbs": ("pbs", {}),
    "s2o": ("s2o", {}),
    "xattention": ("xattention", {}),
}


def rows_of(method, q, k):
    """``(ids [B·H·NQ, K], counts)`` of the method's choice: its layout, or for S2O its plan's order."""
    if method.name == "s2o":
        order, forced = method.plan(q, k)
        return order.flatten(0, 2), forced.flatten()
    if method.name == "pbs":
        _, lay, _ = method.plan(q, k)
    else:
        lay = method.select(q, k)
    return lay.indices.flatten(0, 2), lay.counts.flatten()


def compare(name: str, q: torch.Tensor, k: torch.Tensor) -> dict:
    meth, cfg = METHODS[name]
    got = rows_of(blocksieve.method(meth, **cfg, backend="triton"), q, k)
    want = rows_of(blocksieve.method(meth, **cfg, backend="torch"), q, k)
    same_shape = got[0].shape == want[0].shape
    equal = (got[0] == want[0]).all(-1) & (got[1] == want[1]) if same_shape else torch.zeros(len(want[1]), dtype=torch.bool)
    return {
        "rows": len(want[1]),
        "rows_equal": float(equal.float().mean()),
        "kept_blocks_triton": int(got[1].sum()),
        "kept_blocks_torch": int(want[1].sum()),
    }


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--texts", nargs="+", default=["kjv", "austen"])
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--layers", type=int, nargs="+", default=[6, 16, 25])
    ap.add_argument("--methods", default=",".join(METHODS))
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not torch.cuda.is_available():
        raise SystemExit("no GPU: set TRITON_INTERPRET=1 to run the Triton paths in the interpreter")
    out = RESULTS / f"kernel_paths_real_{args.model}_{args.length}.json"
    res = {"environment": environment(), "model": args.model, "length": args.length, "layers": args.layers, "rows": []}
    t0 = time.time()
    for text in args.texts:
        for layer, (q, k, _) in load_layers(args.model, text, args.length, args.layers).items():
            for name in args.methods.split(","):
                row = {"text": text, "layer": layer, "method": name, **compare(name, q, k)}
                res["rows"].append(row)
                print(f"[{time.time() - t0:6.0f}s] {row}", flush=True)
                res["wall_s"] = round(time.time() - t0, 1)
                out.write_text(json.dumps(res, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
