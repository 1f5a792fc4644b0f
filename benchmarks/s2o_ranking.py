"""S2O diagnostics: how much of its error is the ranking, how much the stop rule.

Runs S2O's early-stopping walk with several rankings of the past key blocks per query segment:
``mean`` (``mean(q_seg) · mean(k_blk)``, the paper's), ``lse`` (logsumexp of ``mean(q_seg) · k_j``
over the block's keys) and ``true`` (the segment's real attention mass on the block — an oracle
ranking, not deployable) and ``sample`` (the summed softmax mass of ``rank_rows=4`` strided query
rows per segment, an estimate of ``true``), each swept over ``tau``; and optionally other block sizes.
Cheaper stand-ins for ``lse`` (diagnostic only, not options of the method): ``lseN`` (``lse`` over
the means of ``N`` consecutive keys, ``N`` times fewer scores), ``gauss`` (``μ + σ²/2``, the
log-mean-exp of Gaussian scores, from the block's per-channel key mean and variance), ``bound``
(Quest's channel-wise upper bound from the block's key min/max) and ``submax`` (the best of four
sub-block means). ``pbs`` adds PBS (its ``tau`` sweep) as the reference the issue compares S2O with;
it runs only with ``--heads all`` (PBS permutes per KV group, so it needs the whole layer). Judged
with the streaming evaluator of ``fidelity_blocks.py`` on the selected query heads (S2O is per
query head, so running it on a head subset gives the same selection for those heads).

Usage::

    python benchmarks/s2o_ranking.py --model qwen2.5-coder-0.5b --length 16384 --layers 5,12,20 --heads 0,2,4,6,8,10,12
    python benchmarks/s2o_ranking.py --model smollm2-135m --length 8192 --layers 8,20 --heads all --variants mean,lse,lse2,lse4,gauss,bound,submax,pbs
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
from blocksieve.select.pool import block_mean, minmax_pool  # noqa: E402
from blocksieve.select.score import block_logsumexp, grouped_dot  # noqa: E402

PBS_TAUS = (0.3, 0.5, 0.7, 0.8, 0.9)


class TrueRankS2O(S2O):
    """S2O whose segment ranking is the true attention mass of the segment's rows (oracle ranking)."""

    def segment_scores(self, q, k):
        c = self.config
        off = (k.shape[2] - q.shape[2]) % c.segment
        qp = torch.nn.functional.pad(q, (0, 0, off, 0))  # rows before the first query get no mass
        m = block_mass(qp, k, c.segment, c.block_k, q.shape[-1] ** -0.5)
        return m.clamp_min(1e-30).log()


class CheapRankS2O(S2O):
    """S2O ranked by a cheap stand-in for ``lse`` (``stat``: ``lseN``, ``gauss``, ``bound`` or ``submax``; see the module docstring)."""

    def __init__(self, stat, **kw):
        super().__init__(**kw)
        self.stat = stat

    def segment_scores(self, q, k):
        c, d = self.config, q.shape[-1]
        qs = block_mean(q, c.segment, (k.shape[2] - q.shape[2]) % c.segment)
        if self.stat.startswith("lse"):
            n = int(self.stat[3:])
            return block_logsumexp(qs, block_mean(k, n), c.block_k // n, d**-0.5)
        if self.stat == "gauss":
            mean = block_mean(k, c.block_k)
            var = (block_mean(k.float() ** 2, c.block_k) - mean**2).clamp_min(0)
            return grouped_dot(qs, mean, d**-0.5) + 0.5 * grouped_dot(qs**2, var, 1.0 / d)
        if self.stat == "bound":
            lo, hi = minmax_pool(k, c.block_k)
            return grouped_dot(qs.clamp_min(0), hi) + grouped_dot(qs.clamp_max(0), lo)
        sub = grouped_dot(qs, block_mean(k, c.block_k // 4))  # submax: [B, Hq, NS, 4 · NK]
        nk = -(-k.shape[2] // c.block_k)
        sub = torch.nn.functional.pad(sub, (0, 4 * nk - sub.shape[-1]), value=float("-inf"))
        return sub.unflatten(-1, (nk, 4)).amax(-1)


def s2o_variant(var, cfg, tau, rank_rows):
    if var == "true":
        return TrueRankS2O(**cfg, tau=tau)
    if var in ("mean", "lse", "sample"):
        return blocksieve.method("s2o", **cfg, tau=tau, rank=var, rank_rows=rank_rows)
    return CheapRankS2O(var, **cfg, tau=tau)


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
    every_head = args.heads == "all"
    taus = [float(x) for x in args.taus.split(",")]
    data = load_layers(args.model, args.text, args.length, layers)
    raw, t0 = {}, time.time()
    for li in layers:
        q, k, v = data[li]
        g = q.shape[1] // k.shape[1]
        heads = list(range(q.shape[1])) if every_head else [int(x) for x in args.heads.split(",")]
        if every_head:
            qs, ks, vs = q, k, v
        else:
            kv = [h // g for h in heads]
            qs, ks, vs = q[:, heads].contiguous(), k[:, kv].contiguous(), v[:, kv].contiguous()  # G = 1 on the subset
        specs = []
        for var in args.variants.split(","):
            cfg = dict(segment=2 * args.block, block_q=args.block, block_k=args.block, backend="torch")
            if var == "pbs":
                if not every_head:
                    raise SystemExit("--variants pbs needs --heads all (PBS permutes keys per KV group)")
                for tau in PBS_TAUS:
                    m = blocksieve.method("pbs", segment=2 * args.block, block=args.block, tau=tau, backend="torch")
                    t1 = time.perf_counter()
                    specs.append(Spec(var, {"tau": tau}, m.plan(qs, ks), time.perf_counter() - t1, heads, q.shape[2]))
                continue
            for tau in taus:
                m = s2o_variant(var, cfg, tau, args.rank_rows)
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
