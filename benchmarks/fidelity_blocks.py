"""Fidelity of the block-level LLM methods on real attention: recall, output error, selection time.

For each captured layer (real q/k/v after RoPE from one dense forward of a pretrained model over a
real text), every method is run over a sweep of its main knob; each point gives density, recall
(mean and 5th percentile over query rows, per layer and head, averaged over layers), relative L2
error of the method's own output (``m(q, k, v)``, so PBS's permuted path and S2O's early-stopping
pass are what is measured) and selection time. The oracle (true top blocks by mass) is swept at
each method's own block size. Values at 5/10/20 % density are linear interpolations along each
method's sweep. Quest is evaluated in decode: each of the last ``--decode-rows`` positions is one
step against its prefix, compared with the exact page top-k (true page mass) of the same size.

Memory: selection sees the whole layer; judging streams one query head and one chunk of rows at a
time (:class:`RowChunk`: exact probabilities of the chunk aggregated per 64-key block), so nothing
of size ``L × L`` is held — 16K contexts fit in a few GiB. ``--heads`` judges a subset of heads.

Usage::

    python benchmarks/fidelity_blocks.py --model smollm2-135m --text kjv --length 4096 --layers 8,20
    python benchmarks/fidelity_blocks.py --model qwen2.5-coder-0.5b --length 16384 --layers 5,12,20 --heads 0,4,8,12
    python benchmarks/fidelity_blocks.py ... --replot --merge _xatt_flex   # redraw, adding another run's sweeps

Writes ``benchmarks/results/fidelity_blocks_<model>_<text>_<length><suffix>.json`` and
``docs/img/pareto_blocks_<model>_<text>_<length><suffix>.png``. Contexts above 8K use the papers'
block sizes (``SWEEPS_LONG``), shorter ones 64-token blocks (``SWEEPS``).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import blocksieve  # noqa: E402
from blocksieve.layout import query_positions  # noqa: E402
from blocksieve.methods.oracle import select_from_mass  # noqa: E402

TARGETS = (0.05, 0.10, 0.20)
ORACLE_DENSITIES = (0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.45, 0.7)

# name → (registered method, fixed config, knob, knob values, oracle (block_q, block_k)). Blocks are
# scaled to 64 for 4K-token contexts (the papers' 128-256 are tuned for 32K-128K; at 4K their forced
# diagonal/segment part alone exceeds 10 % density); the paper defaults are the methods' Config.
SWEEPS = {
    "moba": ("moba", dict(moba_block=128, block_q=64, block_k=128), "top_k", (1, 2, 3, 4, 6), (64, 128)),
    "moba_sink": ("moba", dict(moba_block=128, block_q=64, block_k=128, sink_blocks=1), "top_k", (1, 2, 3, 4, 6), (64, 128)),
    "xattention": ("xattention", dict(block=64), "tau", (0.3, 0.5, 0.7, 0.8, 0.9, 0.95), (64, 64)),
    "vertical_slash": ("vertical_slash", dict(local_slashes=64), "vertical_size", (4, 8, 16, 32, 64), (64, 64)),
    "flexprefill": ("flexprefill", dict(block=64), "gamma", (0.2, 0.35, 0.5, 0.7, 0.8, 0.9), (64, 64)),
    "pbs": ("pbs", dict(segment=128, block=64), "tau", (0.1, 0.3, 0.5, 0.7, 0.8, 0.9), (64, 64)),
    "block_select": ("pbs", dict(segment=128, block=64, permute=False), "tau", (0.1, 0.3, 0.5, 0.7, 0.8, 0.9), (64, 64)),
    "s2o": ("s2o", dict(segment=64, backend="torch"), "tau", (0.3, 0.2, 0.1, 0.05, 0.02, 0.01), (64, 64)),
    "s2o_lse": ("s2o", dict(segment=64, rank="lse", backend="torch"), "tau", (0.3, 0.2, 0.1, 0.05, 0.02, 0.01), (64, 64)),
    "s2o_sample": ("s2o", dict(segment=64, rank="sample", backend="torch"), "tau", (0.3, 0.2, 0.1, 0.05, 0.02, 0.01), (64, 64)),
}
# Long contexts (16K+): the papers' blocks and segments.
SWEEPS_LONG = {
    "moba": ("moba", dict(moba_block=512, block_q=64, block_k=128), "top_k", (2, 3, 4, 6, 8), (64, 512)),
    "moba_128": ("moba", dict(moba_block=128, block_q=64, block_k=128), "top_k", (4, 8, 12, 16, 24, 32), (64, 128)),
    "moba_128_sink": ("moba", dict(moba_block=128, block_q=64, block_k=128, sink_blocks=1), "top_k", (4, 8, 12, 16, 24), (64, 128)),
    "xattention": ("xattention", dict(), "tau", (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995), (128, 128)),
    "vertical_slash": ("vertical_slash", dict(local_slashes=64), "vertical_size", (4, 8, 16, 32, 64, 128), (64, 64)),
    "flexprefill": ("flexprefill", dict(), "gamma", (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98), (128, 128)),
    "pbs": ("pbs", dict(), "tau", (0.3, 0.7, 0.9, 0.95, 0.98, 0.99), (128, 128)),
    "block_select": ("pbs", dict(permute=False), "tau", (0.3, 0.7, 0.9, 0.95, 0.98, 0.99), (128, 128)),
    "s2o": ("s2o", dict(backend="torch"), "tau", (0.1, 0.03, 0.01, 0.003, 0.001, 0.0003), (64, 64)),
    "s2o_lse": ("s2o", dict(rank="lse", backend="torch"), "tau", (0.1, 0.03, 0.01, 0.003, 0.001, 0.0003), (64, 64)),
    "s2o_sample": ("s2o", dict(rank="sample", rank_rows=16, backend="torch"), "tau", (0.1, 0.03, 0.01, 0.003, 0.001, 0.0003), (64, 64)),
}
OPTIONAL_SWEEPS = {
    "xattention_stride4": ("xattention", dict(block=64, stride=4), "tau", (0.3, 0.5, 0.7, 0.8, 0.9, 0.95), (64, 64)),
    "flexprefill_vs_only": ("flexprefill", dict(block=64, tau=0.0), "gamma", (0.2, 0.35, 0.5, 0.7, 0.8, 0.9), (64, 64)),
    "flexprefill_tau0.3": ("flexprefill", dict(block=64, tau=0.3), "gamma", (0.2, 0.35, 0.5, 0.7, 0.8, 0.9), (64, 64)),
    "flexprefill_qa_only": ("flexprefill", dict(block=64, tau=1.0), "gamma", (0.2, 0.35, 0.5, 0.7, 0.8, 0.9), (64, 64)),
}
"""Variants beyond the papers' defaults, run only when ``--methods`` names them (64-token blocks: for 4K-8K).
``xattention_stride4``: antidiagonals every 4 rows instead of 8, twice the scoring work, a finer estimate.
``flexprefill_*``: its JS threshold ``tau`` (0.1 in the paper) at 0 (every head vertical-slash), 0.3,
and 1 (every head query-aware: ``sqrt(JSD) <= sqrt(ln 2) < 1``)."""
LINKED = {"vertical_slash": lambda x: dict(slash_size=6 * x)}  # MInference's ~1:6 vertical:slash ratio


def load_layers(model: str, text: str, length: int, layers):
    """``{layer: (q, k, v)}`` fp32 CPU (:func:`blocksieve.eval.captures.load_capture`; a cached default capture is reused)."""
    from blocksieve.eval.captures import load_capture

    return load_capture(model=model, text=text, length=length, layers=layers)


BASE = 64
"""Granularity of the per-row dense aggregates; every layout's ``block_k`` must be a multiple."""
ALIGN = 512
"""Keys per row chunk are cut at the chunk's last visible key, rounded up to this (largest block_k)."""


class Spec:
    """One selection to judge on real attention, with its accumulators.

    ``layout``: a causal BlockLayout (``H = Hq`` or ``Hkv``), or for PBS ``(perm, permuted layout,
    own-segment layout)`` from :meth:`PBS.plan` (the exact selection of ``m(q, k, v)`` in
    permuted key space; no ``block_k = 1`` expansion).
    """

    def __init__(self, name, point, layout, select_s, heads, lq):
        self.name, self.point, self.layout, self.select_s = name, point, layout, select_s
        self.recall = torch.zeros(len(heads), lq)
        self.err2 = self.ref2 = self.kept = self.visible = 0.0

    def result(self):
        q = torch.quantile(self.recall, 0.05, dim=-1)
        return dict(self.point, density=self.kept / self.visible, recall_mean=float(self.recall.mean()),
                    recall_p5=float(q.mean()), rel_l2=math.sqrt(self.err2 / self.ref2), select_s=self.select_s)


class RowChunk:
    """Dense quantities of one head over query rows ``[r0, r1)``, aggregated per key block.

    ``p [C, Lk]`` are the exact causal probabilities of the rows (keys cut at ``Lk``, the chunk's
    last visible key rounded up to ``ALIGN``); for a key-block size ``bk`` it offers per row the
    block mass, the probability-weighted values ``Σ_j p_j v_j`` and the visible-key count. The exact
    attention restricted to a selection is ``Σ_sel pv / Σ_sel mass``; its recall is ``Σ_sel mass``.
    """

    def __init__(self, q_rows, k, v, pos, scale):
        self.pos = pos
        lk = min(k.shape[0], ((int(pos[-1]) + 1 + ALIGN - 1) // ALIGN) * ALIGN)
        self.lk, self.k, self.v = lk, k[:lk], v[:lk]
        s = (q_rows @ self.k.T) * scale
        s = s.masked_fill(torch.arange(lk)[None, :] > pos[:, None], float("-inf"))
        self.p = torch.softmax(s, -1)  # [C, Lk]
        self.dense = self.p @ self.v  # [C, D]
        self._agg = {}

    def _aggregate(self, p, v, vis, bk):
        c, lk = p.shape
        nk = math.ceil(lk / bk)
        pad = nk * bk - lk
        pb = torch.nn.functional.pad(p, (0, pad)).reshape(c, nk, bk)
        vb = torch.nn.functional.pad(v, (0, 0, 0, pad)).reshape(nk, bk, -1)
        pv = torch.bmm(pb.transpose(0, 1), vb).transpose(0, 1)  # [C, NK, D]
        cnt = torch.nn.functional.pad(vis, (0, pad)).reshape(c, nk, bk).sum(-1)
        return pb.sum(-1), pv, cnt

    def blocks(self, bk, perm=None):
        """``(mass [C, NK], pv [C, NK, D], visible count [C, NK])`` at block ``bk`` (keys permuted by ``perm``)."""
        key = (bk, None if perm is None else id(perm))
        if key not in self._agg:
            if bk > BASE:
                m, pv, cnt = self.blocks(BASE, perm)
                r = bk // BASE
                nk = math.ceil(m.shape[1] / r)
                f = lambda x: torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, nk * r - m.shape[1])).reshape(x.shape[0], nk, r, *x.shape[2:]).sum(2)
                self._agg[key] = (f(m), f(pv), f(cnt))
            elif perm is None:
                vis = (torch.arange(self.lk)[None, :] <= self.pos[:, None]).float()
                self._agg[key] = self._aggregate(self.p, self.v, vis, bk)
            else:
                pm = perm[: self.lk]  # permutations stay inside segments: the cut is closed under them
                vis = (pm[None, :] <= self.pos[:, None]).float()
                self._agg[key] = self._aggregate(self.p[:, pm], self.v[pm], vis, bk)
        return self._agg[key]

    def gather(self, layout, hh, rows, bk_perm=None):
        """``(mass, numerator [C, D], kept pairs)`` of ``layout``'s head ``hh`` over these rows."""
        mass, pv, cnt = self.blocks(layout.block_k, bk_perm)
        nk = mass.shape[1]
        qb = rows // layout.block_q
        ids = layout.indices[0, hh].long()[qb]  # [C, K]
        ids = torch.where((ids >= 0) & (ids < nk), ids, nk)
        sel = torch.zeros(ids.shape[0], nk + 1).scatter_(1, ids, 1.0)[:, :nk]
        num = torch.bmm(sel[:, None, :], pv).squeeze(1)
        return (mass * sel).sum(-1), num, float((cnt * sel).sum())


def evaluate_head(q, k, v, h, hi, specs, chunk):
    """Accumulate every spec's recall, output error and kept pairs for query head ``h`` (row index ``hi``)."""
    lq, lkv, d = q.shape[2], k.shape[2], q.shape[3]
    g = q.shape[1] // k.shape[1]
    kh = h // g
    pos_all = query_positions(lq, lkv)
    for r0 in range(0, lq, chunk):
        rows = torch.arange(r0, min(lq, r0 + chunk))
        rc = RowChunk(q[0, h, rows], k[0, kh], v[0, kh], pos_all[rows], d**-0.5)
        ref2 = float(rc.dense.double().pow(2).sum())
        visible = float((pos_all[rows] + 1).sum())
        hix = lambda lay: {q.shape[1]: h, 1: 0}.get(lay.indices.shape[1], kh)  # per q head, one head, per KV head
        for sp in specs:
            lay = sp.layout
            if isinstance(lay, tuple):  # PBS: permuted earlier segments + own segment in place
                perm, permuted, diag = lay
                rec1, num1, kept1 = rc.gather(permuted, hix(permuted), rows, perm[0, kh])
                rec2, num2, kept2 = rc.gather(diag, hix(diag), rows)
                rec, num, kept = rec1 + rec2, num1 + num2, kept1 + kept2
            else:
                rec, num, kept = rc.gather(lay, hix(lay), rows)
            out = num / rec.clamp_min(1e-30)[:, None]
            sp.recall[hi, rows] = rec
            sp.err2 += float((out - rc.dense).double().pow(2).sum())
            sp.ref2 += ref2
            sp.kept += kept
            sp.visible += visible


def head_block_mass(q, k, h, chunk, bq=64, bk=BASE):
    """Dense mass per (query block, key block) of one head, ``[1, 1, NQ, NK]`` (oracle input)."""
    lq, lkv, d = q.shape[2], k.shape[2], q.shape[3]
    kh = h // (q.shape[1] // k.shape[1])
    pos_all = query_positions(lq, lkv)
    nk = math.ceil(lkv / bk)
    out = torch.zeros(math.ceil(lq / bq), nk)
    for r0 in range(0, lq, chunk):
        rows = torch.arange(r0, min(lq, r0 + chunk))
        pos = pos_all[rows]
        s = (q[0, h, rows] @ k[0, kh].T) * d**-0.5
        p = torch.softmax(s.masked_fill(torch.arange(lkv)[None, :] > pos[:, None], float("-inf")), -1)
        p = torch.nn.functional.pad(p, (0, nk * bk - lkv)).reshape(len(rows), nk, bk).sum(-1)
        out.index_add_(0, rows // bq, p)
    return out[None, None]


def coarsen(mass, bq, bk, base_q=64, base_k=BASE):
    """Sum a ``[1, 1, NQ, NK]`` block mass at (base_q, base_k) into (bq, bk) cells."""
    rq, rk = bq // base_q, bk // base_k
    _, _, nq, nk = mass.shape
    m = torch.nn.functional.pad(mass, (0, -nk % rk, 0, -nq % rq))
    return m.reshape(1, 1, m.shape[2] // rq, rq, m.shape[3] // rk, rk).sum((3, 5))


def select_specs(q, k, names, sweeps, heads, lq, t_start, li):
    """Run every method's sweep on the whole layer (selection sees all heads, as deployed)."""
    specs = []
    for n in names:
        meth, fixed, knob, values, _ = sweeps[n]
        for x in values:
            cfg = dict(fixed, **{knob: x}, **LINKED.get(n, lambda _: {})(x))
            m = blocksieve.method(meth, **cfg)
            t0 = time.perf_counter()
            lay = m.plan(q, k) if meth == "pbs" else m.select(q, k)
            specs.append(Spec(n, {knob: x}, lay, time.perf_counter() - t0, heads, lq))
        print(f"[{time.time() - t_start:6.0f}s] layer {li} {n}: selected", flush=True)
    return specs


def eval_quest(q, k, fracs, rows, page=16, budgets=()):
    """Quest decode vs exact page top-k: per budget, mean recall over the last ``rows`` steps.

    Each of the last ``rows`` positions is one decode step against its prefix; its dense
    probabilities are computed directly (one row per step).
    """
    b, hq, lq, d = q.shape
    g = hq // k.shape[1]
    res = []
    all_budgets = [max(page, int(round(f * lq / page)) * page) for f in fracs] + list(budgets)
    for budget in all_budgets:
        m = blocksieve.method("quest", page=page, token_budget=budget)
        recs, exact, dens, sel = [], [], [], 0.0
        state = None
        for t in range(lq - rows, lq):
            t0 = time.perf_counter()
            lay, state = m.select_step(q[:, :, t : t + 1], k[:, :, : t + 1], state)
            sel += time.perf_counter() - t0
            s = torch.matmul(q[:, :, t : t + 1], k[:, :, : t + 1].repeat_interleave(g, 1).transpose(-1, -2))[:, :, 0]
            p = torch.softmax(s * d**-0.5, -1)  # [B, Hq, t+1]
            npg = math.ceil((t + 1) / page)
            pm = torch.nn.functional.pad(p, (0, npg * page - t - 1)).reshape(b, hq, npg, page).sum(-1)
            chosen = lay.to_block_mask()[:, :, 0]  # [B, Hq, NP]
            recs.append((pm * chosen).sum(-1))
            own = t // page
            others = pm.clone()
            others[..., own] = -1.0
            top = torch.zeros_like(chosen).scatter_(-1, others.topk(min(budget // page, npg - 1), -1).indices, True) if npg > 1 else torch.zeros_like(chosen)
            top[..., own] = True
            exact.append((pm * top).sum(-1))
            dens.append(float(chosen.sum(-1).float().mean()) * page / (t + 1))
        rec, ex = torch.stack(recs, -1), torch.stack(exact, -1)
        res.append(dict(
            budget=budget, density=float(np.mean(dens)), recall_mean=float(rec.mean()),
            recall_p5=float(torch.quantile(rec.flatten(0, 1), 0.05, dim=-1).mean()),
            exact_recall_mean=float(ex.mean()), select_s=sel / rows,
        ))
    return res


def interp(points, key, target):
    pts = sorted((p["density"], p[key]) for p in points)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    if target < xs[0] or target > xs[-1]:
        return None
    return float(np.interp(target, xs, ys))


def mean_points(per_layer):
    """Average the per-layer point lists (same sweep order) into one list."""
    keys = per_layer[0][0].keys()
    return [{k: float(np.mean([pl[i][k] for pl in per_layer])) for k in keys} for i in range(len(per_layer[0]))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--text", default="kjv")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--layers", default="5,15,25")
    ap.add_argument("--heads", default="all", help="query heads to judge, e.g. 0,3,7 (selection always sees all)")
    ap.add_argument("--methods", default=None, help="default: every method of the sweep table for this length")
    ap.add_argument("--decode-rows", type=int, default=32)
    ap.add_argument("--quest-budgets", default="", help="extra Quest token budgets, e.g. 2048")
    ap.add_argument("--chunk", type=int, default=1024, help="query rows per dense chunk")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--suffix", default="", help="appended to the output file names")
    ap.add_argument("--replot", action="store_true", help="only redraw the PNG from the JSON already written")
    ap.add_argument("--merge", default="", help="with --replot: also draw the sweeps of these suffixes' JSONs (they replace same-named ones)")
    args = ap.parse_args()
    tag = f"{args.model}_{args.text}_{args.length}{args.suffix}"
    if args.replot:
        res = json.loads((ROOT / "benchmarks/results" / f"fidelity_blocks_{tag}.json").read_text())
        for suffix in filter(None, args.merge.split(",")):
            other = json.loads((ROOT / "benchmarks/results" / f"fidelity_blocks_{args.model}_{args.text}_{args.length}{suffix}.json").read_text())
            res["sweeps"].update(other["sweeps"])
        plot(res, ROOT / "docs/img" / f"pareto_blocks_{tag}.png")
        return
    torch.set_num_threads(args.threads)
    base = SWEEPS if args.length <= 8192 else SWEEPS_LONG
    sweeps = {**base, **OPTIONAL_SWEEPS}
    layers = [int(x) for x in args.layers.split(",")]
    names = [n for n in (args.methods or ",".join(base)).split(",") if n]
    budgets = [int(x) for x in args.quest_budgets.split(",") if x]
    data = load_layers(args.model, args.text, args.length, layers)
    raw = {n: [] for n in names}
    oracle_raw: dict = {}
    quest_raw = []
    t_start = time.time()
    for li in layers:
        q, k, v = (t.float() for t in data[li])
        lq, lkv = q.shape[2], k.shape[2]
        heads = list(range(q.shape[1])) if args.heads == "all" else [int(x) for x in args.heads.split(",")]
        specs = select_specs(q, k, names, sweeps, heads, lq, t_start, li)
        oracle_keys = sorted({sweeps[n][4] for n in names})
        oracle_specs = {key: [Spec("oracle", {"target": dd}, None, 0.0, heads, lq) for dd in ORACLE_DENSITIES] for key in oracle_keys}
        for hi, h in enumerate(heads):
            mass = head_block_mass(q, k, h, args.chunk)
            for (bq, bk), sps in oracle_specs.items():
                m = coarsen(mass, bq, bk)
                for sp in sps:
                    sp.layout = select_from_mass(m, sp.point["target"], bq, bk, lq, lkv, "head")
            evaluate_head(q, k, v, h, hi, specs + [sp for sps in oracle_specs.values() for sp in sps], args.chunk)
            print(f"[{time.time() - t_start:6.0f}s] layer {li} head {h} evaluated", flush=True)
        for n in names:
            raw[n].append([sp.result() for sp in specs if sp.name == n])
            print(f"[{time.time() - t_start:6.0f}s] layer {li} {n}: " + " ".join(f"{p['density']:.3f}/{p['recall_mean']:.3f}/{p['rel_l2']:.3f}" for p in raw[n][-1]), flush=True)
        for (bq, bk), sps in oracle_specs.items():
            oracle_raw.setdefault(f"{bq}x{bk}", []).append([sp.result() for sp in sps])
        if args.decode_rows > 0:
            quest_raw.append(eval_quest(q, k, (0.05, 0.1, 0.2, 0.3), args.decode_rows, budgets=budgets))
        print(f"[{time.time() - t_start:6.0f}s] layer {li} oracle + quest done", flush=True)
    results = {n: mean_points(raw[n]) for n in names}
    oracles = {key: mean_points(v) for key, v in oracle_raw.items()}
    quest = mean_points(quest_raw) if quest_raw else []
    table = {}
    for n in names:
        okey = "{}x{}".format(*sweeps[n][4])
        table[n] = {}
        for tgt in TARGETS:
            row = {key: interp(results[n], key, tgt) for key in ("recall_mean", "recall_p5", "rel_l2", "select_s")}
            row["oracle_recall_mean"] = interp(oracles[okey], "recall_mean", tgt)
            row["oracle_rel_l2"] = interp(oracles[okey], "rel_l2", tgt)
            if row["recall_mean"] is not None and row["oracle_recall_mean"]:
                row["fraction_of_oracle"] = row["recall_mean"] / row["oracle_recall_mean"]
            table[n][f"{tgt:.2f}"] = row
    table["quest"] = {f"{p['density']:.3f}": p for p in quest}
    out = dict(
        model=args.model, text=args.text, length=args.length, layers=layers, heads=args.heads,
        command="python " + " ".join(sys.argv), torch=torch.__version__, python=platform.python_version(),
        device="cpu", configs={n: dict(method=sweeps[n][0], fixed={a: str(b) for a, b in sweeps[n][1].items()}, knob=sweeps[n][2], oracle="{}x{}".format(*sweeps[n][4])) for n in names},
        sweeps={n: results[n] for n in names}, oracle=oracles, quest=quest, at_density=table,
        wall_s=time.time() - t_start,
    )
    res_path = ROOT / "benchmarks/results" / f"fidelity_blocks_{tag}.json"
    res_path.parent.mkdir(parents=True, exist_ok=True)
    res_path.write_text(json.dumps(out, indent=1))
    plot(out, ROOT / "docs/img" / f"pareto_blocks_{tag}.png")
    print(json.dumps(table, indent=1))
    print("wrote", res_path)


def plot(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)
    for n, pts in res["sweeps"].items():
        pts = sorted(pts, key=lambda p: p["density"])
        ax.plot([p["density"] for p in pts], [p["recall_mean"] for p in pts], "o-", label=n, ms=3)
    for (key, pts), style in zip(res["oracle"].items(), ("--", "-.", ":", (0, (3, 1, 1, 1, 1, 1)))):
        ax.plot([p["density"] for p in pts], [p["recall_mean"] for p in pts], linestyle=style, color="grey", lw=1, label=f"oracle {key}")
    q = sorted(res["quest"], key=lambda p: p["density"])
    ax.plot([p["density"] for p in q], [p["recall_mean"] for p in q], "s-", label="quest (decode)", ms=3)
    ax.plot([p["density"] for p in q], [p["exact_recall_mean"] for p in q], ":", color="k", label="exact page top-k (decode)")
    ax.set_xscale("log")
    ax.set_xlim(0.004 if res["length"] > 8192 else 0.015, 1.0)
    ax.set_xlabel("density (kept / visible query-key pairs)")
    ax.set_ylabel("recall of dense attention mass (mean)")
    ax.set_title(f"{res['model']} · {res['text']} · L={res['length']} · layers {res['layers']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
