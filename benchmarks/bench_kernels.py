"""Benchmark the Triton kernels against cuDNN dense SDPA and FlexAttention on one GPU.

Block-sparse prefill: bf16, D=128, Hq=32, Hkv=8, B=1, causal, per-query-head layouts of
sink block + diagonal band + random earlier blocks at several densities, for N in
{8K, 32K, 128K} and key blocks 128/64/32 (query block 128). Token-sparse decode: 128K context,
2,048 tokens per KV group, batch 8, against dense SDPA decode.

Every point is checked before it is timed: the exact chunked oracle on the last 256 query rows
of 4 heads, and FlexAttention's full output (when Flex runs). A point whose check fails reports
no time. Medians from ``triton.testing.do_bench``; TFLOP/s count only the query-key pairs the
layout keeps (4·D per pair, the causal convention of ANCHORS.md); ratios are to cuDNN dense
causal measured in the same run. Results go to JSON after every point, so a cut-off run keeps
what it measured.

Usage::

    PYTHONUNBUFFERED=1 python benchmarks/bench_kernels.py --out benchmarks/results/kernels_h200.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from blocksieve.layout import BlockLayout, TokenLayout, causal_block_mask
from blocksieve.ops.block_sparse import (
    _block_sparse_fwd_impl,
    _block_sparse_fwd_tma_tuned,
    _block_sparse_fwd_tuned,
    block_sparse_attention,
)
from blocksieve.ops.reference import reference_attention
from blocksieve.ops.token_sparse import token_sparse_attention

HQ, HKV, D, BQ = 32, 8, 128, 128
DTYPE = torch.bfloat16
DEVICE = "cuda"
CHECK_ROWS, CHECK_HEADS = 256, 4


def median_ms(fn, rep: int = 200) -> float:
    return triton.testing.do_bench(fn, warmup=50, rep=rep, return_mode="median")


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref.float()).norm() / ref.float().norm()).item()


def sparse_layout(n: int, bk: int, density: float, seed: int) -> BlockLayout:
    """Sink block + diagonal band + random earlier blocks, per query head, near ``density``."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    nq, nk = math.ceil(n / BQ), math.ceil(n / bk)
    visible = causal_block_mask(BQ, bk, n, n, DEVICE)  # [NQ, NK]
    ks = torch.arange(nk, device=DEVICE)
    q_first = torch.arange(nq, device=DEVICE) * BQ
    forced = (ks[None, :] == 0) | ((ks[None, :] + 1) * bk > q_first[:, None])  # sink + blocks the diagonal touches
    forced = (forced & visible).expand(1, HQ, nq, nk)
    base = BlockLayout.from_block_mask(forced.contiguous(), BQ, bk, n, n, True).density()
    p = min(1.0, max(0.0, (density - base) / (1.0 - base))) if density < 1.0 else 1.0
    rand = torch.rand(1, HQ, nq, nk, device=DEVICE, generator=g) < p
    return BlockLayout.from_block_mask(forced | rand, BQ, bk, n, n, True)


def flex_block_mask(layout: BlockLayout) -> BlockMask:
    """Same selection for FlexAttention, with fully visible blocks marked full (its fast path)."""
    idx, bk, nk = layout.indices.long(), layout.block_k, layout.num_k_blocks
    valid = idx >= 0
    q_first = torch.arange(layout.num_q_blocks, device=idx.device)[:, None] * layout.block_q
    full = valid & ((idx + 1) * bk - 1 <= q_first) & ((idx + 1) * bk <= layout.kv_len)
    partial = valid & ~full

    def pack(sel):
        keyed = torch.where(sel, idx, nk + torch.arange(idx.shape[-1], device=idx.device))
        out = keyed.sort(-1).values
        out = torch.where(out < nk, out, 0)
        out = torch.nn.functional.pad(out, (0, nk - out.shape[-1])) if out.shape[-1] < nk else out
        return sel.sum(-1).to(torch.int32), out.to(torch.int32).contiguous()

    pc, pi = pack(partial)
    fc, fi = pack(full)
    offset = layout.kv_len - layout.q_len

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + offset

    return BlockMask.from_kv_blocks(pc, pi, fc, fi, BLOCK_SIZE=(layout.block_q, bk), mask_mod=causal,
                                    seq_lengths=(layout.q_len, layout.kv_len))


def oracle_tail(q, k, v, layout) -> tuple:
    """Exact fp32 oracle ``(out, lse)`` for the last CHECK_ROWS query rows of the first CHECK_HEADS heads."""
    nq_tail = CHECK_ROWS // layout.block_q
    hk = CHECK_HEADS // (HQ // HKV)
    sub = BlockLayout(layout.indices[:, :CHECK_HEADS, -nq_tail:].contiguous(), layout.counts[:, :CHECK_HEADS, -nq_tail:].contiguous(),
                      layout.block_q, layout.block_k, CHECK_ROWS, layout.kv_len, True)
    return reference_attention(q[:, :CHECK_HEADS, -CHECK_ROWS:], k[:, :hk], v[:, :hk], sub)


def tail_errors(out, lse, ref, ref_lse) -> tuple:
    """``(relative out error, max lse error)`` of a full output against :func:`oracle_tail`'s."""
    o, l = out[:, :CHECK_HEADS, -CHECK_ROWS:], lse[:, :CHECK_HEADS, -CHECK_ROWS:]
    fin = torch.isfinite(ref_lse)
    return rel_err(o, ref), (l - ref_lse)[fin].abs().max().item()


class Bench:
    def __init__(self, out_path: str, budget_s: float):
        self.out_path, self.t0, self.budget_s = out_path, time.time(), budget_s
        props = torch.cuda.get_device_properties(0)
        self.res = {
            "gpu": torch.cuda.get_device_name(0), "sms": props.multi_processor_count,
            "torch": torch.__version__, "triton": triton.__version__, "cudnn": torch.backends.cudnn.version(),
            "command": " ".join([sys.executable.split("/")[-1]] + sys.argv),
            "shape": {"B": 1, "Hq": HQ, "Hkv": HKV, "D": D, "dtype": "bf16", "causal": True, "block_q": BQ},
            "dense": [], "block_sparse": [], "decode": [], "variants": [], "tuned_configs": {},
        }

    def left(self) -> float:
        return self.budget_s - (time.time() - self.t0)

    def save(self):
        with open(self.out_path, "w") as f:
            json.dump(self.res, f, indent=1)


def inputs_and_dense(n: int) -> tuple:
    """``(q, k, v, cuDNN dense causal ms, its TFLOP/s)`` for ``n`` tokens (seeded by ``n``)."""
    torch.manual_seed(n)
    q = torch.randn(1, HQ, n, D, device=DEVICE, dtype=DTYPE)
    k = torch.randn(1, HKV, n, D, device=DEVICE, dtype=DTYPE)
    v = torch.randn(1, HKV, n, D, device=DEVICE, dtype=DTYPE)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        t_dense = median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    return q, k, v, t_dense, 4 * D * HQ * (n * (n + 1) / 2) / t_dense / 1e9


def run_block_sparse(bench: Bench, ns, bks, densities):
    flex = torch.compile(flex_attention, dynamic=False)
    for n in ns:
        q, k, v, t_dense, dense_rate = inputs_and_dense(n)
        bench.res["dense"].append({"N": n, "cudnn_ms": t_dense, "cudnn_tflops": dense_rate})
        print(f"N={n:6d} cuDNN dense causal {t_dense:8.3f} ms {dense_rate:6.1f} TFLOP/s", flush=True)
        for bk in bks:
            for dens in densities:
                if bench.left() < 30:
                    print("time budget reached: stopping", flush=True)
                    return
                lay = sparse_layout(n, bk, dens, seed=n + bk)
                kept = int(lay.kept_pairs().sum())
                flops = 4 * D * kept
                row = {"N": n, "block_k": bk, "target_density": dens, "density": kept / (HQ * n * (n + 1) / 2)}
                base_mem = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                out, lse = block_sparse_attention(q, k, v, lay)
                torch.cuda.synchronize()
                row["extra_mem_bytes"] = torch.cuda.max_memory_allocated() - base_mem - out.numel() * 2 - lse.numel() * 4
                ref, ref_lse = oracle_tail(q, k, v, lay)
                row["oracle_rel_err"], row["oracle_lse_max_err"] = tail_errors(out, lse, ref, ref_lse)
                row["nan"] = bool(out.isnan().any() or lse.isnan().any())
                ok = (not row["nan"]) and row["oracle_rel_err"] < 1e-2 and row["oracle_lse_max_err"] < 1e-2
                row["correct"] = ok
                fmask, kopts, flex_ok = None, ({"BLOCK_N": bk} if bk < 64 else None), False
                try:
                    fmask = flex_block_mask(lay)
                    f_out, f_lse = flex(q, k, v, block_mask=fmask, enable_gqa=True, return_lse=True, kernel_options=kopts)
                    row["flex_oracle_rel_err"], row["flex_oracle_lse_max_err"] = tail_errors(f_out, f_lse, ref, ref_lse)
                    flex_ok = row["flex_oracle_rel_err"] < 1e-2 and row["flex_oracle_lse_max_err"] < 1e-2
                    del f_out, f_lse
                except Exception as e:  # Flex may not support a block shape; record why
                    row["flex_error"] = repr(e)[:300]
                row["flex_correct"] = flex_ok
                del out, lse
                if ok:
                    t = median_ms(lambda: block_sparse_attention(q, k, v, lay))
                    row.update(blocksieve_ms=t, blocksieve_tflops=flops / t / 1e9, speedup_vs_cudnn=t_dense / t,
                               rate_vs_cudnn=(flops / t / 1e9) / dense_rate)
                    if flex_ok:
                        tf = median_ms(lambda: flex(q, k, v, block_mask=fmask, enable_gqa=True, return_lse=True, kernel_options=kopts))
                        row.update(flex_ms=tf, flex_tflops=flops / tf / 1e9, blocksieve_vs_flex=tf / t)
                del ref, ref_lse
                bench.res["block_sparse"].append(row)
                bench.save()
                print(f"N={n:6d} bk={bk:3d} dens={row['density']:.3f} ok={ok} "
                      f"bs={row.get('blocksieve_ms', float('nan')):8.3f} ms ({row.get('blocksieve_tflops', 0):5.0f} TF/s, "
                      f"x{row.get('speedup_vs_cudnn', 0):5.2f} vs cuDNN, rate {row.get('rate_vs_cudnn', 0):.2f}) "
                      f"flex={row.get('flex_ms', float('nan')):8.3f} ms  err={row['oracle_rel_err']:.1e}", flush=True)
                lay = fmask = None  # freed before the next point (not del: the timing lambdas above name them)
            bench.res["tuned_configs"][f"bk{bk}"] = {
                str(key): str(cfg) for tuner in (_block_sparse_fwd_tuned, _block_sparse_fwd_tma_tuned) for key, cfg in tuner.cache.items()
            }
        q = k = v = None  # freed before the next length
        torch.cuda.empty_cache()


VARIANTS = {  # kernel launch options compared by --variants (see _block_sparse_fwd_impl)
    "gather": dict(tma=False),
    "tma": dict(tma=True),
    "gather_m64": dict(tma=False, m_target=64),
    "tma_m64": dict(tma=True, m_target=64),
    "tma_ws": dict(tma=True, ws=True),
    "gather_n64": dict(tma=False, block_n=64),
    "gather_n32": dict(tma=False, block_n=32),
}


def run_variants(bench: Bench, ns, bks, densities, names):
    """Time every launch variant of the block-sparse kernel on the same layouts (each checked first)."""
    for n in ns:
        q, k, v, t_dense, dense_rate = inputs_and_dense(n)
        for bk in bks:
            for dens in densities:
                lay = sparse_layout(n, bk, dens, seed=n + bk)
                flops = 4 * D * int(lay.kept_pairs().sum())
                ref, ref_lse = oracle_tail(q, k, v, lay)
                args = (q, k, v, lay.indices, lay.counts, BQ, bk, True, 1.0 / math.sqrt(D))
                for name in names:
                    opts = VARIANTS[name]
                    if bench.left() < 30:
                        print("time budget reached: stopping", flush=True)
                        return
                    row = {"N": n, "block_k": bk, "target_density": dens, "variant": name, "cudnn_ms": t_dense}
                    try:
                        out, lse = _block_sparse_fwd_impl(*args, **opts)
                        err, lse_err = tail_errors(out, lse, ref, ref_lse)
                        row.update(oracle_rel_err=err, correct=bool(err < 1e-2 and lse_err < 1e-2 and not out.isnan().any()))
                        del out, lse
                        if row["correct"]:
                            t = median_ms(lambda: _block_sparse_fwd_impl(*args, **opts))
                            row.update(ms=t, rate_vs_cudnn=(flops / t / 1e9) / dense_rate, speedup_vs_cudnn=t_dense / t)
                    except Exception as e:  # a variant may not apply (block too short) or not compile
                        row["error"] = repr(e)[:300]
                    bench.res["variants"].append(row)
                    bench.save()
                    print(f"N={n:6d} bk={bk:3d} dens={dens:.2f} {name:10s} ok={row.get('correct')} "
                          f"{row.get('ms', float('nan')):8.3f} ms rate {row.get('rate_vs_cudnn', 0):.2f} "
                          f"{row.get('error', '')[:80]}", flush=True)
                del lay, ref, ref_lse
        del q, k, v
        torch.cuda.empty_cache()


def run_decode(bench: Bench, kv_len: int = 131072, n_sel: int = 2048, batch: int = 8):
    torch.manual_seed(0)
    q = torch.randn(batch, HQ, 1, D, device=DEVICE, dtype=DTYPE)
    k = torch.randn(batch, HKV, kv_len, D, device=DEVICE, dtype=DTYPE)
    v = torch.randn(batch, HKV, kv_len, D, device=DEVICE, dtype=DTYPE)
    dense = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
    t_dense = median_ms(dense, rep=100)
    t_dense_graph = triton.testing.do_bench_cudagraph(dense, rep=100, return_mode="median")
    for h in (HKV, HQ):
        scores = torch.rand(batch, h, 1, kv_len, device=DEVICE)
        lay = TokenLayout.from_topk(scores.topk(n_sel, -1).indices.to(torch.int32), 1, kv_len, True)
        base_mem = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out, lse = token_sparse_attention(q, k, v, lay)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base_mem - out.numel() * 2 - lse.numel() * 4
        ref, ref_lse = reference_attention(q, k, v, lay)
        row = {"kv_len": kv_len, "tokens": n_sel, "batch": batch, "layout_heads": h, "extra_mem_bytes": extra,
               "oracle_rel_err": rel_err(out, ref), "oracle_lse_max_err": (lse - ref_lse).abs().max().item(),
               "dense_sdpa_ms": t_dense, "dense_sdpa_graph_ms": t_dense_graph}
        row["correct"] = row["oracle_rel_err"] < 1e-2 and row["oracle_lse_max_err"] < 1e-2 and not out.isnan().any().item()
        if row["correct"]:
            t = median_ms(lambda: token_sparse_attention(q, k, v, lay), rep=100)
            tg = triton.testing.do_bench_cudagraph(lambda: token_sparse_attention(q, k, v, lay), rep=100, return_mode="median")
            kv_bytes = batch * h * n_sel * D * 2 * 2
            row.update(blocksieve_ms=t, speedup_vs_dense=t_dense / t, blocksieve_graph_ms=tg,
                       speedup_vs_dense_graph=t_dense_graph / tg, gathered_kv_gbps_graph=kv_bytes / tg / 1e6)
        bench.res["decode"].append(row)
        bench.save()
        print(f"decode kv={kv_len} sel={n_sel} B={batch} H_layout={h}: dense {t_dense:.3f} ms (graph {t_dense_graph:.3f}), "
              f"blocksieve {row.get('blocksieve_ms', float('nan')):.4f} ms (x{row.get('speedup_vs_dense', 0):.1f}), "
              f"graph {row.get('blocksieve_graph_ms', float('nan')):.4f} ms (x{row.get('speedup_vs_dense_graph', 0):.1f}), "
              f"err {row['oracle_rel_err']:.1e}, extra mem {extra / 2**20:.1f} MiB", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/kernels_h200.json")
    ap.add_argument("--ns", default="32768,131072,8192", help="sequence lengths, first one tunes the kernel")
    ap.add_argument("--block-k", default="128,64,32")
    ap.add_argument("--densities", default="0.05,0.1,0.2,0.5,1.0")
    ap.add_argument("--budget-s", type=float, default=540.0, help="stop starting new points after this")
    ap.add_argument("--variants", action="store_true", help="compare kernel launch variants instead of the sweep")
    ap.add_argument("--variant-names", default=",".join(VARIANTS), help="subset of the variants to time")
    ap.add_argument("--no-decode", action="store_true", help="skip the token-sparse decode benchmark")
    args = ap.parse_args()
    torch._dynamo.config.recompile_limit = 64  # FlexAttention recompiles per (N, block) shape
    bench = Bench(args.out, args.budget_s)
    if args.variants:
        run_variants(bench, [int(x) for x in args.ns.split(",")], [int(x) for x in args.block_k.split(",")],
                     [float(x) for x in args.densities.split(",")], args.variant_names.split(","))
        bench.res["elapsed_s"] = time.time() - bench.t0
        bench.save()
        return
    if not args.no_decode:
        run_decode(bench)
    run_block_sparse(bench, [int(x) for x in args.ns.split(",")], [int(x) for x in args.block_k.split(",")],
                     [float(x) for x in args.densities.split(",")])
    bench.res["elapsed_s"] = time.time() - bench.t0
    bench.save()


if __name__ == "__main__":
    main()
