"""S2O diagnostics: how much of its error is the ranking, how much the stop rule.

Runs S2O's early-stopping walk with several rankings of the past key blocks per query segment:
``mean`` (``mean(q_seg) · mean(k_blk)``, the paper's), ``lse`` (logsumexp of ``mean(q_seg) · k_j``
over the block's keys) and ``true`` (the segment's real attention mass on the block — an oracle
ranking, not deployable) and ``sample`` (the summed softmax mass of ``rank_rows=4`` strided query
rows per segment, an estimate of ``true``), each swept over ``tau``; and optionally other block sizes. Judged with
the streaming evaluator of ``fidelity_blocks.py`` on the selected query heads (S2O is per query
head, so running it on a head subset gives the same selection for those heads).

Usage::

    python benchmarks/s2o_ranking.py --model qwen2.5-coder-0.5b --length 16384 --layers 5,12,20 --heads 0,2,4,6,8,10,12
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from fidelity_blocks import Spec, evaluate_head, interp, load_layers, mean_points  # noqa: E402

import blocksieve  # noqa: E402
from blocksieve.methods.oracle import block_mass  # noqa: E402
from blocksieve.methods.s2o import S2O  # noqa: E402


class TrueRankS2O(S2O):
    """S2O whose segment ranking is the true attention mass of the segment's rows (oracle ranking)."""

    def segment_scores(self, q, k):
        c = self.config
        off = (k.shape[2] - q.shape[2]) % c.segment
        qp = torch.nn.functional.pad(q, (0, 0, off, 0))  # rows before the first query get no mass
        m = block_mass(qp, k, c.segment, c.block_k, q.shape[-1] ** -0.5)
        return m.clamp_min(1e-30).log()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--text", default="kjv")
    ap.add_argument("--length", type=int, default=16384)
    ap.add_argument("--layers", default="12")
    ap.add_argument("--heads", default="0,2,4,6,8,10,12")
    ap.add_argument("--taus", default="0.1,0.03,0.01,0.003,0.001,0.0003")
    ap.add_argument("--variants", default="mean,lse,sample,true")
    ap.add_argument("--rank-rows", type=int, default=4)
    ap.add_argument("--block", type=int, default=64, help="block_q = block_k; segment = 2 x block")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    layers = [int(x) for x in args.layers.split(",")]
    heads = [int(x) for x in args.heads.split(",")]
    taus = [float(x) for x in args.taus.split(",")]
    data = load_layers(args.model, args.text, args.length, layers)
    raw, t0 = {}, time.time()
    for li in layers:
        q, k, v = data[li]
        g = q.shape[1] // k.shape[1]
        kv = [h // g for h in heads]
        qs, ks, vs = q[:, heads].contiguous(), k[:, kv].contiguous(), v[:, kv].contiguous()  # G = 1 on the subset
        specs = []
        for var in args.variants.split(","):
            cfg = dict(segment=2 * args.block, block_q=args.block, block_k=args.block, backend="torch")
            for tau in taus:
                m = TrueRankS2O(**cfg, tau=tau) if var == "true" else blocksieve.method("s2o", **cfg, tau=tau, rank=var, rank_rows=args.rank_rows)
                t1 = time.perf_counter()
                specs.append(Spec(var, {"tau": tau}, m.select(qs, ks), time.perf_counter() - t1, heads, q.shape[2]))
            print(f"[{time.time() - t0:5.0f}s] layer {li} {var} selected", flush=True)
        for hi in range(len(heads)):
            evaluate_head(qs, ks, vs, hi, hi, specs, 1024)
        for var in args.variants.split(","):
            pts = [sp.result() for sp in specs if sp.name == var]
            raw.setdefault(var, []).append(pts)
            print(f"[{time.time() - t0:5.0f}s] layer {li} {var}: " + " ".join(f"{p['density']:.4f}/{p['recall_mean']:.4f}/{p['rel_l2']:.4f}" for p in pts), flush=True)
    res = {var: mean_points(v) for var, v in raw.items()}
    table = {var: {f"{d:.3f}": {key: interp(pts, key, d) for key in ("recall_mean", "recall_p5", "rel_l2")} for d in (0.02, 0.05, 0.1, 0.2)} for var, pts in res.items()}
    out = dict(model=args.model, text=args.text, length=args.length, layers=layers, heads=heads, block=args.block,
               command="python " + " ".join(sys.argv), sweeps=res, at_density=table)
    path = Path(args.out) if args.out else ROOT / "benchmarks/results" / f"s2o_ranking_{args.model}_{args.text}_{args.length}_b{args.block}_r{args.rank_rows}.json"
    path.write_text(json.dumps(out, indent=1))
    print(json.dumps(table, indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
