"""What limits HISA's IoU with DSA on short prompts: block size, pooling, candidate budget ``m·B``.

For each captured layer and KV group the training-free scorer (the group's summed logits) gives
DSA's exact top-k per row. HISA keeps the top ``m`` blocks of ``B`` keys (first and own block
forced) and takes the top-k of their tokens; every DSA top-k token inside the kept blocks is then
in HISA's top-k, so with ``r`` of them covered the row's IoU is exactly ``r / (2k' - r)``
(``k' = min(k, visible keys)``, no ties), and rows whose prefix fits in ``m·B`` are exact (IoU 1).
That makes a full sweep cheap. Block choosers compared at equal ``m·B``:

* ``mean`` — HISA: mean-pooled keys (for a linear scorer, the block's mean token score);
* ``max`` — per-channel max-pooled keys (the paper's suggested variant);
* ``meanstd`` — ``q·mean + √(2 ln B)·√(Σ_d q_d² var_d)``: the expected best of ``B`` Gaussian token
  scores with the block's per-channel variances (one more pooled vector per block);
* ``submax`` — the best of the block's four sub-block means (four pooled keys per block);
* ``tokenmax`` — the block's best token score (needs every token score: a bound for choosers that
  rank by the block's best key, not a deployable one);
* ``oracle`` — the ``m`` blocks holding the most DSA top-k tokens: the best any block chooser of
  that size can do, so ``oracle < 0.99`` means the budget itself is too small.

Rows are subsampled (every ``--stride``-th query). Usage::

    python benchmarks/hisa_coverage.py --text kjv --length 4096
    python benchmarks/hisa_coverage.py --model qwen2.5-coder-0.5b --text kjv --length 16384 --topk 256 512 1024 2048

Writes ``benchmarks/results/hisa_coverage_<model>_<text>_<length>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from blocksieve.eval.captures import load_capture  # noqa: E402

BLOCKS = (16, 32, 64, 128)
MULTIPLES = (2, 3, 4, 6, 8, 12, 16)
FRACTIONS = (1 / 8, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4)


def block_orders(qb, kh, scores, pos, block):
    """Blocks of each row in the order a chooser keeps them: ``{pool: [R, NB]}`` (forced ends first)."""
    rows, n = scores.shape
    nb = n // block
    blk = torch.arange(nb)
    last = pos // block
    blocked = scores.clamp(min=-1e30).reshape(rows, nb, block)  # future keys only in the forced own block
    kb = kh.reshape(nb, block, -1)
    spread = ((qb**2) @ kb.var(1, unbiased=False).T).sqrt() * math.sqrt(2 * math.log(block))
    sub = qb @ kh.reshape(nb * 4, block // 4, -1).mean(1).T
    choosers = {
        "mean": blocked.mean(-1),
        "max": qb @ kb.amax(1).T,
        "meanstd": blocked.mean(-1) + spread,
        "submax": sub.reshape(rows, nb, 4).amax(-1),
        "tokenmax": blocked.amax(-1),
    }
    out = {}
    for pool, sc in choosers.items():
        sc = sc.masked_fill(blk[None] > last[:, None], float("-inf"))
        sc = sc.masked_fill((blk[None] == 0) | (blk[None] == last[:, None]), float("inf"))
        out[pool] = sc.argsort(-1, descending=True)
    return out


def sweep(cap: dict, topks, stride: int, blocks=BLOCKS) -> list:
    acc = {}
    n_rows = 0
    for layer, (q, k, _) in sorted(cap.items()):
        hq, hkv = q.shape[1], k.shape[1]
        g = hq // hkv
        length = k.shape[2]
        for h in range(hkv):
            pos = torch.arange(0, length, stride)
            qb = q[0, h * g : (h + 1) * g].sum(0)[pos]  # [R, d]: the linear scorer collapses to one head
            kh = k[0, h]
            sc = (qb @ kh.T).masked_fill(torch.arange(length)[None, :] > pos[:, None], float("-inf"))
            n_rows += len(pos)
            orders = {b: block_orders(qb, kh, sc, pos, b) for b in blocks}
            for kk in topks:
                top = sc.topk(kk, -1).indices
                valid = torch.gather(sc, 1, top) > float("-inf")
                kvis = torch.clamp(pos + 1, max=kk)
                budgets = sorted({min(length, c * kk) for c in MULTIPLES} | {int(f * length) for f in FRACTIONS})
                for b in blocks:
                    nb = length // b
                    cnt = torch.zeros(len(pos), nb).scatter_add_(1, top // b, valid.float())  # DSA tokens per block
                    forced = (torch.arange(nb)[None] == 0) | (torch.arange(nb)[None] == (pos // b)[:, None])
                    choosers = dict(orders[b], oracle=cnt.masked_fill(forced, 1e9).argsort(-1, descending=True))
                    for pool, order in choosers.items():
                        cum = torch.gather(cnt, 1, order).cumsum(-1)
                        for cand in budgets:
                            m = cand // b
                            if not 2 <= m <= nb:
                                continue
                            late = pos >= m * b
                            r = cum[:, m - 1]
                            a = acc.setdefault((kk, b, pool, cand, length), [0.0, 0])
                            a[0] += float((r / (2 * kvis - r))[late].sum())
                            a[1] += int(late.sum())
        print(f"layer {layer} done", flush=True)
    return [
        {"k": kk, "block": b, "pool": pool, "candidates": cand, "multiple": cand / kk, "share": cand / length,
         "iou": (s + n_rows - n) / n_rows}
        for (kk, b, pool, cand, length), (s, n) in sorted(acc.items())
    ]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--text", default="kjv")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--topk", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--stride", type=int, default=None, help="query subsampling (default length // 1024)")
    ap.add_argument("--layers", default=None, help="comma-separated layer ids (default: the default capture's layers, see load_capture)")
    ap.add_argument("--blocks", type=int, nargs="+", default=list(BLOCKS), help="block sizes B to sweep (powers of two >= 4)")
    ap.add_argument("--tag", default="", help="suffix of the result file name")
    args = ap.parse_args(argv)
    stride = args.stride or max(1, args.length // 1024)
    cap = load_capture(args.model, args.text, args.length, None if args.layers is None else map(int, args.layers.split(",")))
    t0 = time.time()
    rows = sweep(cap, args.topk, stride, args.blocks)
    result = {"command": " ".join(["python"] + sys.argv), "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "model": args.model, "text": args.text, "length": args.length, "layers": sorted(cap), "stride": stride,
              "seconds": time.time() - t0, "rows": rows}
    path = ROOT / "benchmarks" / "results" / f"hisa_coverage_{args.model}_{args.text}_{args.length}{args.tag}.json"
    path.write_text(json.dumps(result, indent=0))
    for kk in args.topk:
        sub = [r for r in rows if r["k"] == kk]
        budgets = sorted({r["candidates"] for r in sub})
        print(f"k={kk}  m*B:" + "".join(f"{c:8d}" for c in budgets))
        for b in args.blocks:
            for pool in ("mean", "max", "meanstd", "submax", "tokenmax", "oracle"):
                got = {r["candidates"]: r["iou"] for r in sub if r["block"] == b and r["pool"] == pool}
                print(f"  B={b:3d} {pool:6s}" + "".join(f"{got[c]:8.4f}" if c in got else "       -" for c in budgets))
    print(path)


if __name__ == "__main__":
    main()
