"""The fused indexer kernels against the PyTorch rules on real attention (CPU, Triton interpreter).

The kernel tests use random inputs; this runs DSA, HISA and MISA† both ways with the training-free
GQA scorer (each KV group's summed attention logits) on q/k captured from a real model on real
text, and compares every row's chosen keys: the share of rows with the same key set, and the share
whose chosen keys have the same sorted scores (ties may be broken either way: the kernel sums the
group's heads in fp32 in another order than the PyTorch path). MISA's rows are scored by the
full indexer, the ranking its re-scoring ends with.

Usage (CPU; the interpreter is slow, a few minutes per layer at 2K)::

    TRITON_INTERPRET=1 python -m benchmarks.indexer_paths_real --model smollm2-135m --text kjv --length 2048 --layers 16

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
from blocksieve.select.token_topk import flat_topk, hisa_topk, misa_topk


def methods(length: int, topk: int) -> dict:
    """Name → ``fn(ix, backend) -> TokenLayout`` at the sizes of the fidelity benchmark."""
    h = HisaConfig.for_prompt(length, topk)
    return {
        "dsa": lambda ix, be: flat_topk(ix, topk, be),
        "hisa": lambda ix, be: hisa_topk(ix, topk, h.block, h.m, backend=be),
        "misa_h": lambda ix, be: misa_topk(ix, topk, 1, 256, rescore=4 * topk, backend=be),
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
    args = ap.parse_args(argv)
    caps = load_capture(model=args.model, text=args.text, length=args.length, layers=args.layers)
    res = {"environment": environment(), "model": args.model, "text": args.text, "length": args.length, "topk": args.topk, "layers": {}}
    out = RESULTS / f"indexer_paths_real_{args.model}_{args.text}_{args.length}.json"
    for layer, (q, k, _) in caps.items():
        ix = gqa_indexer(q, k)
        res["layers"][str(layer)] = row = {}
        for name, fn in methods(args.length, args.topk).items():
            t0 = time.time()
            got, want = fn(ix, "triton"), fn(ix, "torch")
            row[name] = {**compare(ix, got, want), "seconds": round(time.time() - t0, 1)}
            print(f"layer {layer} {name}: {row[name]}", flush=True)
            out.write_text(json.dumps(res, indent=1))  # after each method: a long run keeps what it finished
    print("wrote", out)


if __name__ == "__main__":
    main()
