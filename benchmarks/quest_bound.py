"""Why Quest's page bound misses the exact page top-k: looseness by page size and RoPE channel.

For the last ``--rows`` positions of each captured layer (each a decode step against its prefix):

* recall of Quest (min/max page bound), of Quest with the first (sink) page forced as well
  (``quest_sink``, same budget) and of the exact page top-k (true page mass) at the same token
  budget, for several page sizes (``page=1`` makes the bound exact);
* the bound's slack ``bound - max_{j in page} q·k_j`` split by RoPE channel pair (rotate-half
  layout: channels ``i`` and ``i + D/2`` share frequency ``θ^(-2i/D)``), in fast / middle / slow
  thirds of the frequencies — how much of the looseness the fast-rotating channels cause;
* Spearman correlation between the bound and the true page mass over the visible pages;
* with ``--spread-scales``, the recall of pages ranked by ``q · centre + a · Σ |q| · half-range``
  (``a = 1`` is the bound, ``a = 0`` the page's centre key): whether a less pessimistic estimate
  from the same min/max ranks better.

Usage::

    python benchmarks/quest_bound.py --model qwen2.5-coder-0.5b --length 16384 --layers 5,12,20 --threads 1
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
sys.path.insert(0, str(ROOT / "benchmarks"))

from fidelity_blocks import load_layers  # noqa: E402

from blocksieve.select.pool import minmax_pool  # noqa: E402
from blocksieve.select.score import page_upper_bound  # noqa: E402


def rank(x):
    return x.argsort(-1).argsort(-1).float()


def spearman(a, b):
    ra, rb = rank(a), rank(b)
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    return (ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1)).clamp_min(1e-30)


def step_stats(q_t, k, t, page, budget, scales=()):
    """One decode step at position ``t``: Quest and exact page top-k recall, slack split, Spearman.

    ``scales``: also the recall of ``q · center + a · Σ |q| · half-range`` per page for each ``a``
    (``quest_spread_<a>``): 1 is Quest's bound, 0 the page's centre estimate."""
    hq, d = q_t.shape
    g = hq // k.shape[0]
    kk = k[:, : t + 1].repeat_interleave(g, 0)  # [Hq, t+1, D]
    s = torch.einsum("hd,hjd->hj", q_t, kk)
    p = torch.softmax(s * d**-0.5, -1)
    npg = math.ceil((t + 1) / page)
    pad = npg * page - t - 1
    pm = torch.nn.functional.pad(p, (0, pad)).reshape(hq, npg, page).sum(-1)
    lo, hi = minmax_pool(k[None, :, : t + 1], page)
    bound = page_upper_bound(q_t[None, :, None], lo, hi)[0, :, 0]  # [Hq, NP]
    own = t // page
    n = min(budget // page, npg - 1)

    def top(score, forced=(own,)):
        sc = score.clone()
        sc[:, list(forced)] = float("-inf")
        keep = torch.zeros_like(pm, dtype=torch.bool).scatter_(-1, sc.topk(n + 1 - len(forced), -1).indices, True)
        keep[:, list(forced)] = True
        return float((pm * keep).sum(-1).mean())

    smax = torch.nn.functional.pad(s, (0, pad), value=float("-inf")).reshape(hq, npg, page).amax(-1)
    # per-channel slack of the bound at the key attaining the page max, grouped by RoPE frequency
    arg = torch.nn.functional.pad(s, (0, pad), value=float("-inf")).reshape(hq, npg, page).argmax(-1)
    kidx = (torch.arange(npg)[None, :] * page + arg).clamp(max=t)
    kbest = torch.gather(kk, 1, kidx[..., None].expand(-1, -1, d))  # [Hq, NP, D]
    hi_q, lo_q = hi[0].repeat_interleave(g, 0), lo[0].repeat_interleave(g, 0)
    per_ch = torch.maximum(q_t[:, None] * hi_q, q_t[:, None] * lo_q) - q_t[:, None] * kbest  # [Hq, NP, D] >= 0
    half = d // 2
    pair = per_ch[..., :half] + per_ch[..., half:]  # [Hq, NP, D/2], pair i has frequency θ^(-2i/D)
    thirds = [pair[..., a:b].sum(-1).mean() for a, b in ((0, half // 3), (half // 3, 2 * half // 3), (2 * half // 3, half))]
    vis = slice(0, npg)
    if scales:
        center = torch.einsum("hd,hpd->hp", q_t, (hi_q + lo_q) / 2)
        spread = torch.einsum("hd,hpd->hp", q_t.abs(), (hi_q - lo_q) / 2)
    return dict(
        quest=top(bound), quest_sink=top(bound, {own, 0}), exact=top(pm.log()), slack=float((bound - smax)[:, vis].mean()),
        slack_fast=float(thirds[0]), slack_mid=float(thirds[1]), slack_slow=float(thirds[2]),
        spearman=float(spearman(bound, pm).mean()), **{f"quest_spread_{a:g}": top(center + a * spread) for a in scales},
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--text", default="kjv")
    ap.add_argument("--length", type=int, default=16384)
    ap.add_argument("--layers", default="5,12,20")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--pages", default="1,4,8,16,32")
    ap.add_argument("--budgets", default="0.1,2048", help="token budgets: fractions of the length or token counts")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--spread-scales", default="", help="also rank pages by centre + a · spread for these a, e.g. 0,0.25,0.5,0.75,1")
    ap.add_argument("--out", type=Path, default=None, help="result file (default benchmarks/results/quest_bound_<model>_<text>_<length>.json)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    layers = [int(x) for x in args.layers.split(",")]
    data = load_layers(args.model, args.text, args.length, layers)
    budgets = [int(float(b) * args.length) if float(b) < 1 else int(b) for b in args.budgets.split(",")]
    scales = [float(a) for a in args.spread_scales.split(",") if a]
    res, t0 = [], time.time()
    for li in layers:
        q, k, _ = data[li]
        lq = q.shape[2]
        for page in (int(x) for x in args.pages.split(",")):
            for budget in budgets:
                rows = [step_stats(q[0, :, t], k[0], t, page, budget, scales) for t in range(lq - args.rows, lq)]
                row = {key: sum(r[key] for r in rows) / len(rows) for key in rows[0]}
                res.append(dict(layer=li, page=page, budget=budget, **row))
                print(f"[{time.time() - t0:5.0f}s] layer {li} page {page:3d} budget {budget:5d}: "
                      + " ".join(f"{a}={b:.3f}" for a, b in row.items()), flush=True)
    out = dict(model=args.model, text=args.text, length=args.length, layers=layers, rows=args.rows,
               command="python " + " ".join(sys.argv), results=res)
    path = args.out or ROOT / "benchmarks/results" / f"quest_bound_{args.model}_{args.text}_{args.length}.json"
    path.write_text(json.dumps(out, indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
