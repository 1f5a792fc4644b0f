"""Token indexer speed on one GPU: flat DSA scan vs HISA vs MISA, prefill and decode, plus end to end.

DSA-form indexer (H_I = 64 heads, d_I = 128, one shared key, ReLU, bf16), top-k 2048, B = 1 for
prefill (all queries), B = 8 with one query for decode. Every method is checked against the
PyTorch path on a smaller problem before anything is timed; a failed check stops the run.
End to end: indexer + ``blocksieve.attend`` (Triton token-sparse kernel, Hq = 32, Hkv = 8, D = 128,
the layout shared by all heads) vs cuDNN dense SDPA. Peak extra memory = the CUDA allocator's
peak during the call minus what was allocated before it.

    python -u -m benchmarks.bench_indexer --out $OUT/indexer_h200.json [--lengths 32768 131072] 2>&1 | tee $OUT/log.txt

Decode times exclude pooling: a decoding model keeps the pooled keys in the method's state and
re-pools only the newest block (``update_pooled``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from benchmarks.common import environment, median_time
from blocksieve.ops import attend
from blocksieve.select.indexer import candidate_scores, dsa_indexer
from blocksieve.select.token_topk import expand_heads, flat_topk, hisa_topk, misa_topk, pool_keys

H_I, D_I, TOPK = 64, 128, 2048


def make_indexer(b, lq, lkv, device="cuda"):
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(b, lq, H_I, D_I, device=device, generator=g).to(torch.bfloat16)
    k = torch.randn(b, lkv, D_I, device=device, generator=g).to(torch.bfloat16)
    k[:, 1::3] += k[:, 0:1]  # some structure so that blocks differ
    w = torch.randn(b, lq, H_I, device=device, generator=g) / H_I
    return dsa_indexer(q, k, w)


def methods(m=64):
    """The timed selectors (HISA with ``m`` blocks of 128)."""
    return {
        "dsa": lambda ix, be: flat_topk(ix, TOPK, be),
        "hisa": lambda ix, be: hisa_topk(ix, TOPK, 128, m, backend=be),
        "misa": lambda ix, be: misa_topk(ix, TOPK, 8, 1024, backend=be),
    }


def selected_scores(ix, layout, rows):
    """Sorted scores of the selected keys of some rows (tie-robust comparison of two top-k's)."""
    cand = layout.indices[:, :, rows].long()
    out = []
    for i, r in enumerate(rows.tolist()):
        sc = candidate_scores(ix, r, r + 1, cand[:, :, i : i + 1])
        out.append(sc.sort(-1).values)
    return torch.cat(out, 2)


def check(lkv=8192):
    """Triton vs torch path on the same inputs (scores of the chosen keys must agree)."""
    ix = make_indexer(1, lkv, lkv)
    rows = torch.tensor([0, 100, 4095, 5000, lkv - 1])
    res = {}
    for name, fn in methods(16).items():  # m·B = 2048 < L: the coarse stage runs
        a, b = fn(ix, "triton"), fn(ix, "torch")
        sa, sb = selected_scores(ix, a, rows), selected_scores(ix, b, rows)
        fin = torch.isfinite(sb)
        ok = torch.equal(torch.isfinite(sa), fin) and torch.allclose(sa[fin], sb[fin], rtol=1e-3, atol=1e-3)
        res[name] = bool(ok)
    dec = make_indexer(8, 1, lkv)
    for name, fn in methods(16).items():
        sa, sb = selected_scores(dec, fn(dec, "triton"), torch.tensor([0])), selected_scores(dec, fn(dec, "torch"), torch.tensor([0]))
        fin = torch.isfinite(sb)
        res[f"{name}_decode"] = bool(torch.equal(torch.isfinite(sa), fin) and torch.allclose(sa[fin], sb[fin], rtol=1e-3, atol=1e-3))
    return res


def timed(fn, repeats):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return {"ms": median_time(fn, repeats=repeats, warmup=0), "peak_extra_mib": peak / 2**20}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    result = {"environment": environment(), "config": {"H_I": H_I, "d_I": D_I, "topk": TOPK, "hisa": "block 128, m 64, mean",
              "misa": "h 8 of 64, block 1024", "dtype": "bf16"}}
    result["correctness"] = check()
    print("correctness", result["correctness"], flush=True)
    if not all(result["correctness"].values()):
        args.out.write_text(json.dumps(result, indent=1))
        sys.exit("correctness check failed: no timings reported")
    rows = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for n in args.lengths:
        ix = make_indexer(1, n, n)
        for name, fn in methods().items():
            r = {"mode": "prefill", "L": n, "method": name, **timed(lambda: fn(ix, "triton"), args.repeats)}
            rows.append(r)
            print(r, flush=True)
        if n <= 32768:
            r = {"mode": "prefill", "L": n, "method": "dsa_torch_chunked", **timed(lambda: flat_topk(ix, TOPK, "torch"), 1)}
            rows.append(r)
            print(r, flush=True)
        dec = make_indexer(8, 1, n)
        pooled = {"hisa": pool_keys(dec.k, 128), "misa": pool_keys(dec.k, 1024)}  # decode state: kept up to date per step
        step = {
            "dsa": lambda: flat_topk(dec, TOPK),
            "hisa": lambda: hisa_topk(dec, TOPK, 128, 64, pooled=pooled["hisa"]),
            "misa": lambda: misa_topk(dec, TOPK, 8, 1024, pooled=pooled["misa"]),
        }
        for name, fn in step.items():
            r = {"mode": "decode_b8", "L": n, "method": name, **timed(fn, 10)}
            rows.append(r)
            print(r, flush=True)
        del dec
        result["timings"] = rows
        args.out.write_text(json.dumps(result, indent=1))  # partial results survive a later failure
        if n == max(args.lengths):
            result["end_to_end"] = end_to_end(ix, n, args.repeats)
            print(result["end_to_end"], flush=True)
        del ix
        torch.cuda.empty_cache()
    for r in rows:
        base = next(x["ms"] for x in rows if x["L"] == r["L"] and x["mode"] == r["mode"] and x["method"] == "dsa")
        r["speedup_vs_dsa"] = base / r["ms"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


def end_to_end(ix, n, repeats, hq=32, hkv=8, d=128):
    g = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(1, hq, n, d, device="cuda", generator=g, dtype=torch.bfloat16)
    k = torch.randn(1, hkv, n, d, device="cuda", generator=g, dtype=torch.bfloat16)
    v = torch.randn(1, hkv, n, d, device="cuda", generator=g, dtype=torch.bfloat16)
    out = {}
    lay = expand_heads(hisa_topk(ix, TOPK), hkv)
    out["attend_only"] = timed(lambda: attend(q, k, v, lay), repeats)
    del lay
    for name, fn in methods().items():
        out[name] = timed(lambda: attend(q, k, v, expand_heads(fn(ix, "triton"), hkv)), 1)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def dense():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    out["cudnn_dense"] = timed(dense, repeats)
    for name in list(methods()) + ["attend_only"]:
        out[name]["speedup_vs_cudnn"] = out["cudnn_dense"]["ms"] / out[name]["ms"]
    return out


if __name__ == "__main__":
    main()
