"""Token indexer speed on one GPU: flat DSA scan vs HISA vs MISA, prefill and decode, plus end to end.

DSA-form indexer (H_I = 64 heads, d_I = 128, one shared key, ReLU, bf16), top-k 2048; HISA with
blocks of 128 and m = 64 (8192 candidates), MISA routing 8 of 64 heads over blocks of 1024.

Stages, each written to the JSON as soon as it is done (a later failure keeps the earlier ones):

1. ``warmup`` — the Triton kernel variants are compiled in parallel subprocesses (one per method
   and mode, plus the attention kernel) into Triton's disk cache, so that compilation costs about
   two variants' time, not eight.
2. ``correctness`` — each method's Triton path against the PyTorch path on a 16K problem (prefill,
   rows on both sides of HISA's ``m·block`` gate) and on a B = 8 decode step; the sorted scores of
   the chosen keys must agree (tie-robust). A method that fails is not timed.
3. ``prefill`` at each length, B = 1, all queries; the chunked PyTorch scan only up to 32K.
4. ``decode``: B = 8, one new query against ``L`` cached keys, the step a decoding model runs: the
   pooled keys of the previous step (kept, as a decoding model keeps them, with room for more
   blocks) are updated in place for the new token only (``update_pooled``), then the top-k. Peak
   extra memory is the CUDA allocator's peak during one call minus what was allocated before it
   (the returned layout included: ``B·Lq·topk·4`` bytes). ``graph_ms``: the same
   step replayed from a CUDA graph, without the host's launch cost (eager decode is host-bound).
5. ``end_to_end`` at the largest length: indexer + ``blocksieve.attend`` (Triton token-sparse kernel,
   Hq = 32, Hkv = 8, D = 128, the index set shared by all heads) vs cuDNN dense causal SDPA.

On an H200 (about 4 minutes)::

    python -u -m benchmarks.bench_indexer --out $OUT/indexer_h200.json 2>&1 | tee $OUT/indexer_log.txt

``--decode-only`` times only the decode steps and adds each one's GPU kernel timeline.
``--smoke`` runs every stage at toy sizes (on the CPU: ``TRITON_INTERPRET=1``, fp16, 3-8 minutes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import environment, median_time
from blocksieve.ops import attend, whole_row_topk
from blocksieve.select import token_topk
from blocksieve.select.indexer import candidate_scores, dsa_indexer
from blocksieve.select.token_topk import (
    _hisa_late, expand_heads, flat_topk, hisa_topk, misa_topk, pool_keys, route_heads, update_pooled,
)

SIZES = {
    "full": dict(h_i=64, d_i=128, topk=2048, hisa_block=128, hisa_m=64, misa_h=8, misa_block=1024,
                 lengths=[32768, 131072], check_len=16384, decode_batch=8, torch_max=32768, repeats=3,
                 hq=32, hkv=8, d=128, dtype=torch.bfloat16),
    "smoke": dict(h_i=4, d_i=16, topk=16, hisa_block=16, hisa_m=4, misa_h=2, misa_block=32,
                  lengths=[64, 96], check_len=96, decode_check_len=2100, decode_batch=2, torch_max=128, repeats=1,
                  hq=4, hkv=2, d=64, dtype=torch.float16),  # the Triton 3.9 interpreter mis-multiplies bf16
}
METHODS = ("dsa", "hisa", "misa")


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def make_indexer(c, b, lq, lkv, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(b, lq, c["h_i"], c["d_i"], device=device, generator=g).to(c["dtype"])
    k = torch.randn(b, lkv, c["d_i"], device=device, generator=g).to(c["dtype"])
    k[:, 1::3] += k[:, 0:1]  # some structure so that blocks differ
    w = torch.randn(b, lq, c["h_i"], device=device, generator=g) / c["h_i"]
    return dsa_indexer(q, k, w)


def prefill_fns(c):
    """Method → ``fn(ix, backend) -> TokenLayout`` (H = 1)."""
    return {
        "dsa": lambda ix, be: flat_topk(ix, c["topk"], be),
        "hisa": lambda ix, be: hisa_topk(ix, c["topk"], c["hisa_block"], c["hisa_m"], backend=be),
        "misa": lambda ix, be: misa_topk(ix, c["topk"], c["misa_h"], c["misa_block"], backend=be),
    }


def decode_fns(c, dec):
    """Method → ``fn(backend)``: one decode step for the newest key of ``dec`` (its last position).

    The state a decoding model carries (pooled keys of the first ``L - 1`` keys) is built once; the
    step updates it for the new key only, as :class:`~blocksieve.methods.hisa.Hisa` does.
    """
    n = dec.kv_len
    prev = {blk: update_pooled(None, 0, dec.k[:, :, : n - 1], blk, "mean") for blk in (c["hisa_block"], c["misa_block"])}

    def hisa(be):
        pooled = update_pooled(prev[c["hisa_block"]], n - 1, dec.k, c["hisa_block"], "mean")
        return hisa_topk(dec, c["topk"], c["hisa_block"], c["hisa_m"], pooled=pooled, backend=be)

    def misa(be):
        pooled = update_pooled(prev[c["misa_block"]], n - 1, dec.k, c["misa_block"], "mean")
        return misa_topk(dec, c["topk"], c["misa_h"], c["misa_block"], pooled=pooled, backend=be)

    return {"dsa": lambda be: flat_topk(dec, c["topk"], be), "hisa": hisa, "misa": misa}


def selected_scores(ix, layout, rows):
    """Sorted scores of the selected keys of some rows (tie-robust comparison of two top-k's)."""
    cand = layout.indices[:, :, rows].long()
    out = [candidate_scores(ix, r, r + 1, cand[:, :, i : i + 1]).sort(-1).values for i, r in enumerate(rows.tolist())]
    return torch.cat(out, 2)


def same_choice(ix, a, b, rows) -> bool:
    sa, sb = selected_scores(ix, a, rows), selected_scores(ix, b, rows)
    fin = torch.isfinite(sb)
    return bool(torch.equal(torch.isfinite(sa), fin) and torch.allclose(sa[fin], sb[fin], rtol=1e-3, atol=1e-3))


def check(c, device) -> dict:
    """Triton vs PyTorch path, prefill and decode, on rows around HISA's gate (``m·block``)."""
    n, gate = c["check_len"], c["hisa_block"] * c["hisa_m"]
    ix = make_indexer(c, 1, n, n, device)
    g = torch.Generator().manual_seed(1)
    rows = torch.cat([torch.tensor([0, 1, gate - 1, gate, gate + 1, n - 1]), torch.randint(0, n, (10,), generator=g)]).unique()
    res = {}

    def scorer(name, x):  # MISA ranks by its routed heads: compare under that score (ReLU zeros tie)
        return x.with_heads(route_heads(x, c["misa_h"], c["misa_block"])) if name == "misa" else x

    for name, fn in prefill_fns(c).items():
        res[name] = same_choice(scorer(name, ix), fn(ix, "triton"), fn(ix, "torch"), rows)
        log("check", name, res[name])
    n = c.get("decode_check_len", n)  # smoke: long enough for split rows (``splits > 1``)
    dec = make_indexer(c, c["decode_batch"], 1, n, device, seed=2)
    fns = decode_fns(c, dec)
    for name, fn in fns.items():
        res[f"{name}_decode"] = same_choice(scorer(name, dec), fn("triton"), fn("torch"), torch.tensor([0]))
        log("check", f"{name}_decode", res[f"{name}_decode"])
    for blk in (c["hisa_block"], c["misa_block"]):  # the incremental state equals pooling from scratch
        inc = update_pooled(pool_keys(dec.k[:, :, : n - 1], blk), n - 1, dec.k, blk, "mean")
        res[f"update_pooled_{blk}"] = bool(torch.equal(inc, pool_keys(dec.k, blk)))
    return res


def timed(fn, repeats):
    """Median ms of ``fn()`` after one untimed call that also gives the peak extra memory (CUDA only)."""
    peak = None
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return {"ms": median_time(fn, repeats=repeats, warmup=0), "peak_extra_mib": peak}


def graph_replay(fn) -> dict:
    """GPU time of ``fn`` replayed from a CUDA graph (a decoding server's setting: no host launch cost)."""
    if not torch.cuda.is_available():
        return {}
    import triton

    try:
        return {"graph_ms": triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")}
    except Exception as e:  # noqa: BLE001 - a step that cannot be captured says why
        return {"graph_error": f"{type(e).__name__}: {e}"[:200]}


def kernel_timeline(fn) -> list:
    """The GPU kernels of one ``fn()`` call in launch order: ``[(name, ms)]`` (torch profiler, CUDA only)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    return [(e.name[:80], round(e.device_time / 1e3, 4)) for e in events]


def add_speedups(rows):
    for r in rows:
        base = next((x for x in rows if (x["L"], x["mode"], x["method"]) == (r["L"], r["mode"], "dsa")), None)
        if base is not None:
            r["speedup_vs_dsa"] = base["ms"] / r["ms"]
            if "graph_ms" in r and "graph_ms" in base:
                r["graph_speedup_vs_dsa"] = base["graph_ms"] / r["graph_ms"]


def end_to_end(c, ix, ok, device) -> dict:
    n, hq, hkv, d = ix.kv_len, c["hq"], c["hkv"], c["d"]
    g = torch.Generator(device=device).manual_seed(1)
    q, k, v = (torch.randn(1, h, n, d, device=device, generator=g, dtype=c["dtype"]) for h in (hq, hkv, hkv))
    out = {"shape": {"L": n, "Hq": hq, "Hkv": hkv, "D": d, "topk": c["topk"], "dtype": str(c["dtype"]), "causal": True}}
    fns = prefill_fns(c)
    lay = expand_heads(fns["dsa"](ix, "triton"), hkv)
    out["attend_only"] = timed(lambda: attend(q, k, v, lay, backend="triton"), c["repeats"])
    log("e2e attend_only", out["attend_only"])
    lay = None
    for name in (m for m in METHODS if ok[m]):
        fn = fns[name]
        out[name] = timed(lambda fn=fn: attend(q, k, v, expand_heads(fn(ix, "triton"), hkv), backend="triton"), c["repeats"])
        log("e2e", name, out[name])

    def dense():
        if device == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    out["cudnn_dense"] = timed(dense, c["repeats"])
    log("e2e cudnn_dense", out["cudnn_dense"])
    for name in [m for m in METHODS if ok[m]] + ["attend_only"]:
        out[name]["speedup_vs_cudnn"] = out["cudnn_dense"]["ms"] / out[name]["ms"]
    return out


def warm(c, variant, device):
    """Compile one group of kernel variants (runs in a subprocess; Triton caches the binaries on disk)."""
    late = c["hisa_block"] * 8  # rows past HISA's gate: its coarse stage runs for them
    n = c["hisa_block"] * c["hisa_m"] + late
    ix = make_indexer(c, 1, n, n, device)
    if variant == "prefill_hisa":  # its early rows are the dsa variant: compile only the coarse and fine stages
        pooled = pool_keys(ix.k, c["hisa_block"])
        _hisa_late(ix, n - late, c["topk"], c["hisa_block"], c["hisa_m"], pooled, "triton")
    elif variant.startswith("prefill_"):
        prefill_fns(c)[variant.split("_")[1]](ix, "triton")
    elif variant.startswith("decode_"):
        decode_fns(c, make_indexer(c, c["decode_batch"], 1, n, device))[variant.split("_")[1]]("triton")
    elif variant == "attend":
        n = 2 * c["topk"]
        q, k, v = (torch.randn(1, h, n, c["d"], device=device, dtype=c["dtype"]) for h in (c["hq"], c["hkv"], c["hkv"]))
        lay = flat_topk(make_indexer(c, 1, n, n, device), c["topk"], "torch")
        attend(q, k, v, expand_heads(lay, c["hkv"]), backend="triton")
    if device == "cuda":
        torch.cuda.synchronize()


def warmup(args) -> dict:
    """One subprocess per variant group, all at once; returns their wall time and failures."""
    t0 = time.time()
    groups = [f"prefill_{m}" for m in METHODS] + [f"decode_{m}" for m in METHODS] + ["attend"]
    base = [sys.executable, "-m", "benchmarks.bench_indexer", "--out", str(args.out)] + (["--smoke"] if args.smoke else [])
    base += ["--split-min-keys", str(args.split_min_keys)] if args.split_min_keys else []
    base += ["--whole-split-min-keys", str(args.whole_split_min_keys)] if args.whole_split_min_keys else []
    base += ["--select-warps", str(args.select_warps)] if args.select_warps else []
    procs = {v: subprocess.Popen(base + ["--warm", v], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for v in groups}
    failed = {}
    for v, p in procs.items():
        text, _ = p.communicate()
        if p.returncode:
            failed[v] = text[-2000:]
            log("warmup", v, "FAILED", text[-2000:])
    return {"wall_s": time.time() - t0, "failed": failed}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--lengths", type=int, nargs="+", default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--smoke", action="store_true", help="toy sizes (CPU: set TRITON_INTERPRET=1)")
    ap.add_argument("--no-warmup", action="store_true", help="compile in the main process instead")
    ap.add_argument("--decode-only", action="store_true", help="time only the decode steps (with their GPU kernel timelines)")
    ap.add_argument("--split-min-keys", type=int, default=None, help="token_topk.SPLIT_MIN_KEYS for this run (decode launch shapes)")
    ap.add_argument("--whole-split-min-keys", type=int, default=None, help="token_topk.WHOLE_SPLIT_MIN_KEYS for this run (HISA's decode)")
    ap.add_argument("--select-warps", type=int, default=None, help="whole_row_topk.SELECT_WARPS for this run (HISA's decode)")
    ap.add_argument("--warm", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    c = dict(SIZES["smoke" if args.smoke else "full"])
    c["lengths"] = args.lengths or c["lengths"]
    c["repeats"] = args.repeats or c["repeats"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.split_min_keys:
        token_topk.SPLIT_MIN_KEYS = c["split_min_keys"] = args.split_min_keys
    if args.whole_split_min_keys:
        token_topk.WHOLE_SPLIT_MIN_KEYS = c["whole_split_min_keys"] = args.whole_split_min_keys
    if args.select_warps:
        whole_row_topk.SELECT_WARPS = c["select_warps"] = args.select_warps
    if args.warm:
        warm(c, args.warm, device)
        return
    t_start = time.time()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"environment": environment(), "config": {k: str(v) if k == "dtype" else v for k, v in c.items()},
              "command": " ".join(sys.argv), "stages_s": {}}

    def save(stage):
        result["stages_s"][stage] = round(time.time() - t_start, 1)
        args.out.write_text(json.dumps(result, indent=1))
        log("wrote", args.out, "after", stage)

    if not args.no_warmup:
        result["warmup"] = warmup(args)
        save("warmup")
    result["correctness"] = ok = check(c, device)
    save("correctness")
    bad = [m for m in METHODS if not (ok[m] and ok[f"{m}_decode"])]
    if bad:
        log("correctness failed for", bad, ": not timed")
    rows = result["timings"] = []
    for n in c["lengths"]:
        ix = make_indexer(c, 1, n, n, device)
        for name, fn in prefill_fns(c).items():
            if ok[name] and not args.decode_only:
                rows.append({"mode": "prefill", "L": n, "method": name, **timed(lambda fn=fn, ix=ix: fn(ix, "triton"), c["repeats"])})
                log(rows[-1])
        if n <= c["torch_max"] and not args.decode_only:
            rows.append({"mode": "prefill", "L": n, "method": "dsa_torch_chunked", **timed(lambda ix=ix: flat_topk(ix, c["topk"], "torch"), 1)})
            log(rows[-1])
        add_speedups(rows)
        save(f"prefill_{n}")
        dec = make_indexer(c, c["decode_batch"], 1, n, device, seed=2)
        for name, fn in decode_fns(c, dec).items():
            if ok[f"{name}_decode"]:
                rows.append({"mode": f"decode_b{c['decode_batch']}", "L": n, "method": name, **timed(lambda fn=fn: fn("triton"), 10)})
                rows[-1].update(graph_replay(lambda fn=fn: fn("triton")))
                if args.decode_only and device == "cuda":
                    rows[-1]["timeline"] = kernel_timeline(lambda fn=fn: fn("triton"))
                log(rows[-1])
        dec = None
        add_speedups(rows)
        save(f"decode_{n}")
        if n == max(c["lengths"]) and not args.decode_only:
            result["end_to_end"] = end_to_end(c, ix, ok, device)
            save("end_to_end")
        ix = None
        if device == "cuda":
            torch.cuda.empty_cache()
    log(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
