"""The fused indexer kernels against the PyTorch rules on real attention (CPU, Triton interpreter).

The kernel tests use random inputs; this runs DSA, HISA and MISA† both ways with the training-free
GQA scorer (each KV group's summed attention logits) on q/k captured from a real model on real
text, and compares every row's chosen keys: the share of rows with the same key set, and the share
whose chosen keys have the same sorted scores (ties may be broken either way: the kernel sums the
group's heads in fp32 in another order than the PyTorch path). MISA's rows are scored by the
full indexer, the ranking its re-scoring ends with.

``--decode-steps N`` also runs the last ``N`` positions as decode steps (one query against its
prefix, HISA's pooled keys kept by ``update_pooled`` as a decoding model keeps them): the few rows
of a step are split over programs (split whole rows for rows of at most 8,192 keys), the launch
shapes a GPU decode uses.

Usage (CPU; the interpreter is slow, a few minutes per layer at 2K)::

    TRITON_INTERPRET=1 python -m benchmarks.indexer_paths_real --model smollm2-135m --text kjv --length 2048 --layers 16 [--decode-steps 16]

Writes ``benchmarks/results/indexer_paths_real_<model>_<text>_<length>.json``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.common import RESULTS, environment
from blocksieve.methods.hisa import HisaConfig
from blocksieve.select.indexer import candidate_scores, gqa_indexer
from blocksieve.select.token_topk import flat_topk, hisa_topk, misa_topk, update_pooled


def methods(length: int, topk: int) -> dict:
    """Name → ``fn(ix, backend) -> TokenLayout`` at the sizes of the fidelity benchmark."""
    h = HisaConfig.for_prompt(length, topk, block=16)  # the kernels' smallest block
    return {
        "dsa": lambda ix, be: flat_topk(ix, topk, be),
        "hisa": lambda ix, be: hisa_topk(ix, topk, h.block, h.m, backend=be),
        "misa_h": lambda ix, be: misa_topk(ix, topk, 1, 256, rescore=4 * topk, backend=be),
    }


def decode_steps(q: torch.Tensor, k: torch.Tensor, steps: int, length: int, topk: int) -> dict:
    """The last ``steps`` positions as decode steps, both backends: ``{method: compare(...)}`` over all steps' rows."""
    h = HisaConfig.for_prompt(length, topk, block=16)  # the kernels' smallest block
    n0 = k.shape[2] - steps
    pooled = {be: update_pooled(None, 0, k[:, :, :n0], h.block, "mean") for be in ("triton", "torch")}
    got = {name: [] for name in methods(length, topk)}
    for t in range(n0, k.shape[2]):
        ix = gqa_indexer(q[:, :, t : t + 1], k[:, :, : t + 1])
        for be in ("triton", "torch"):
            pooled[be] = update_pooled(pooled[be], t, ix.k, h.block, "mean")
        steps_fns = {
            "dsa": lambda be: flat_topk(ix, topk, be),
            "hisa": lambda be: hisa_topk(ix, topk, h.block, h.m, pooled=pooled[be], backend=be),
            "misa_h": lambda be: methods(length, topk)["misa_h"](ix, be),
        }
        for name, fn in steps_fns.items():
            got[name].append(compare(ix, fn("triton"), fn("torch")))
    return {
        name: {"rows": sum(r["rows"] for r in rs), **{f: sum(r[f] * r["rows"] for r in rs) / sum(r["rows"] for r in rs) for f in ("same_set", "same_scores")}}
        for name, rs in got.items()
    }


def compare(ix, a, b) -> dict:
    """Rows with equal key sets, and rows whose chosen keys' sorted scores agree (``rtol`` 1e-4)."""
    ia, ib = a.indices.long(), b.indices.long()
    same_set = (ia.sort(-1).values == ib.sort(-1).values).all(-1)
    sa = candidate_scores(ix, 0, ix.q_len, ia).sort(-1).values
    sb = candidate_scores(ix, 0, ix.q_len, ib).sort(-1).values
    fin = torch.isfinite(sb)
    close = (torch.isfinite(sa) == fin) & torch.isclose(torch.where(fin, sa, 0), torch.where(fin, sb, 0), rtol=1e-4, atol=1e-5)
    return {"rows": int(same_set.numel()), "same_set": same_set.float().mean().item(), "same_scores": close.all(-1).float().mean().item()}


def main(argv=None) -> None:
    from blocksieve.eval.captures import load_capture

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--text", default="kjv")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--layers", type=int, nargs="+", default=[16])
    ap.add_argument("--topk", type=int, default=256)
    ap.add_argument("--decode-steps", type=int, default=0, help="also run the last N positions as decode steps")
    ap.add_argument("--decode-only", action="store_true", help="skip the prefill comparisons")
    args = ap.parse_args(argv)
    caps = load_capture(model=args.model, text=args.text, length=args.length, layers=args.layers)
    res = {"environment": environment(), "model": args.model, "text": args.text, "length": args.length, "topk": args.topk, "layers": {}}
    out = RESULTS / f"indexer_paths_real_{args.model}_{args.text}_{args.length}.json"
    for layer, (q, k, _) in caps.items():
        ix = gqa_indexer(q, k)
        res["layers"][str(layer)] = row = {}
        for name, fn in methods(args.length, args.topk).items() if not args.decode_only else ():
            t0 = time.time()
            got, want = fn(ix, "triton"), fn(ix, "torch")
            row[name] = {**compare(ix, got, want), "seconds": round(time.time() - t0, 1)}
            print(f"layer {layer} {name}: {row[name]}", flush=True)
            out.write_text(json.dumps(res, indent=1))  # after each method: a long run keeps what it finished
        if args.decode_steps:
            t0 = time.time()
            for name, r in decode_steps(q, k, args.decode_steps, args.length, args.topk).items():
                row[f"{name}_decode"] = {**r, "steps": args.decode_steps, "seconds_all_methods": round(time.time() - t0, 1)}
                print(f"layer {layer} {name} decode: {row[f'{name}_decode']}", flush=True)
            out.write_text(json.dumps(res, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
