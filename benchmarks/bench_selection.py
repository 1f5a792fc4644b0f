"""Selection time of the block-level LLM methods vs sparse and dense attention time (GPU).

Per length (default 32K and 128K), one layer: ``Hq=32, Hkv=8, D=128``, bf16, batch 1, causal
prefill. Inputs are synthetic but structured so that adaptive selectors find sparsity: every
256-token chunk of queries and keys carries one of 16 random topic directions (plus noise and an
attention sink at token 0), so a query attends mostly to same-topic chunks — about 1/16 of the
context, like the ~10 % densities the methods target. For each method (paper defaults, plus
FlashMoBA's B=128/top-8 and S2O's ``lse`` ranking through its fused kernel; S2O's PyTorch ``lse`` and
``sample`` rankings only when named in ``--methods``):

* ``select_ms`` — the method's selection (``plan`` for PBS and S2O: ordering/permutation and
  layouts; S2O's stop happens inside its attention pass);
* ``select_graph_ms`` — the same selection replayed from a CUDA graph (captured after warm-up calls
  on a side stream), which removes the launch overhead of many small ops; ``select_graph_error``
  (the exception text) instead when the selection cannot be captured (e.g. a host synchronisation);
* ``select_share_of_sparse10`` / ``select_graph_share_of_sparse10`` — those times over the
  ``sparse_10pct`` attention time (the selection budget is about 0.1);
* ``rows_equal_torch_path`` (MoBA only) — fraction of layout rows the fused Triton selector and
  the PyTorch path (``backend="torch"``) agree on exactly (below 1 only through gate near-ties);
* ``density`` of the layout it produced, ``attend_ms`` of ``blocksieve.attend`` on that layout,
  ``e2e_ms`` of ``m(q, k, v)`` (selection + attention);
* reference rows: ``sparse_10pct`` (a random 10 %-density 128×128 layout through
  ``blocksieve.attend``; FlexAttention if the Triton kernel fails) and ``dense_cudnn`` (PyTorch
  SDPA restricted to the cuDNN backend).

Quest is timed as one decode step (``q_len = 1``) against the whole cache (its state holding the
bounds of the cache but its last key), eager and from a CUDA graph, next to its PyTorch path
(``backend="torch"``, with ``rows_equal_torch_path``), ``blocksieve.attend`` on its layout and dense
SDPA decode; ``timeline`` lists the GPU kernels of one step. TokenSelect (``tokenselect``): prefill
selection, its peak extra memory, attention on its layout and end to end; a decode step that votes
and one that hits its selection cache. Median of 10 CUDA-event timings after one warm-up. Writes
``$OUT/selection_<gpu>.json`` (e.g. ``benchmarks/results/selection_h200.json``).

Usage: ``python benchmarks/bench_selection.py [--lengths 32768,131072] [--methods moba,...|""] [--out DIR]``
(``--methods ""``: the reference rows and Quest only)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import blocksieve  # noqa: E402
from benchmarks.bench_indexer import kernel_timeline  # noqa: E402
from benchmarks.common import device_tag  # noqa: E402
from blocksieve.layout import BlockLayout, causal_block_mask  # noqa: E402
from blocksieve.ops import shared_window  # noqa: E402

METHODS = {
    "moba": ("moba", {}),
    "moba_b128_top8": ("moba", dict(moba_block=128, top_k=8)),
    "xattention": ("xattention", {}),
    "vertical_slash": ("vertical_slash", {}),
    "vertical_slash_radix": ("vertical_slash", dict(topk="radix")),
    "flexprefill": ("flexprefill", {}),
    "flexprefill_vs": ("flexprefill", dict(tau=0.0)),
    "flexprefill_qa": ("flexprefill", dict(tau=1.0)),
    "pbs": ("pbs", {}),
    "s2o": ("s2o", {}),
    "s2o_lse": ("s2o", dict(rank="lse")),
    "s2o_sample16": ("s2o", dict(rank="sample", rank_rows=16)),
}
ON_REQUEST = ("s2o_sample16", "flexprefill_vs", "flexprefill_qa", "vertical_slash_radix")
"""S2O's ``sample`` ranking (PyTorch): 9 s per selection at 128K on an H100, so only on request.
``s2o_lse`` runs through :mod:`blocksieve.ops.segment_lse` on CUDA. ``flexprefill_vs`` / ``flexprefill_qa``
(``tau=0`` / ``tau=1``) send every head to one of FlexPrefill's two patterns: on the synthetic inputs the
JS test sends every head to the query-aware one, on real models at 8K (nearly) every head to
vertical-slash (``docs/dev/blocks_notes.md``, session 20), so the two bound its time either way;
only on request. ``vertical_slash_radix``: both top-k masks by :mod:`blocksieve.ops.topk_select` (session 24,
not yet timed), only on request."""


def timed(fn, reps=10):
    """Median milliseconds of ``fn()`` on the GPU (one warm-up call)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def synthetic(length, hq=32, hkv=8, d=128, topics=16, chunk=256, device="cuda", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    dirs = torch.randn(topics, d, device=device, generator=g)
    tk = torch.randint(0, topics, (hkv, length // chunk + 1), device=device, generator=g)
    tk = tk.repeat_interleave(chunk, 1)[:, :length]  # [Hkv, L]
    k = 0.6 * torch.randn(1, hkv, length, d, device=device, generator=g) + 0.6 * dirs[tk][None]
    k[:, :, 0] += 2.0 * dirs.mean(0)  # sink
    q = 0.6 * torch.randn(1, hq, length, d, device=device, generator=g)
    q += 0.6 * dirs[tk].repeat_interleave(hq // hkv, 0)[None] + 0.2 * dirs.mean(0)
    v = torch.randn(1, hkv, length, d, device=device, generator=g)
    return q.bfloat16(), k.bfloat16(), v.bfloat16()


def random_layout(q, k, density, block=128):
    """Each query block keeps its diagonal block plus random visible blocks: ``density`` of the pairs."""
    lq, lkv = q.shape[2], k.shape[2]
    vis = causal_block_mask(block, block, lq, lkv, q.device)
    r = torch.rand(1, q.shape[1], *vis.shape, device=q.device)
    keep = (r < density) & vis
    keep |= torch.eye(vis.shape[0], vis.shape[1], dtype=torch.bool, device=q.device)
    return BlockLayout.from_block_mask(keep, block, block, lq, lkv, True)


def attend_fn(q, k, v, layout):
    """``blocksieve.attend`` (Triton); FlexAttention when the Triton kernel is missing or fails."""
    try:
        blocksieve.attend(q, k, v, layout)
        torch.cuda.synchronize()
        return (lambda: blocksieve.attend(q, k, v, layout)), "blocksieve.triton"
    except Exception as e:  # noqa: BLE001 - reported in the JSON
        from torch.nn.attention.flex_attention import flex_attention

        fa = torch.compile(flex_attention)
        bm = layout.to_flex_block_mask(q.shape[1])
        return (lambda: fa(q, k, v, block_mask=bm, enable_gqa=True)), f"flex_attention ({type(e).__name__}: {e})"[:300]


def _prefix_pairs(x, k0, width):
    """``Σ_{p <= x} clamp(p - k0 + 1, 0, width)`` elementwise (int64 tensors)."""
    t = torch.clamp(x - k0 + 1, min=0)
    full = torch.clamp(t - width, min=0)
    tt = torch.minimum(t, width)
    return tt * (tt + 1) // 2 + full * width


def density(layout):
    """Kept / visible causal pairs of a BlockLayout in O(NQ · NK) (``layout.density`` builds ``Lq × NK``)."""
    dev = layout.indices.device
    nq, nk = layout.num_q_blocks, layout.num_k_blocks
    off = layout.kv_len - layout.q_len
    r0 = torch.arange(nq, device=dev) * layout.block_q
    r1 = torch.clamp(r0 + layout.block_q, max=layout.q_len) - 1
    k0 = torch.arange(nk, device=dev) * layout.block_k
    width = torch.clamp(k0 + layout.block_k, max=layout.kv_len) - k0
    cell = _prefix_pairs(r1[:, None] + off, k0[None], width[None]) - _prefix_pairs(r0[:, None] + off - 1, k0[None], width[None])
    cell = torch.cat([cell, torch.zeros_like(cell[:, :1])], 1)  # [NQ, NK + 1]; column NK for padding
    idx = torch.where(layout.indices >= 0, layout.indices, nk).long()
    rows = torch.arange(nq, device=dev)[:, None].expand(-1, idx.shape[-1])
    kept = cell[rows, idx].sum((-1, -2)).double().sum()
    return float(kept / (layout.indices.shape[0] * layout.indices.shape[1] * cell.sum()))


def graph_timed(fn, warmup=3):
    """Median milliseconds of ``fn()`` replayed from a CUDA graph.

    As in PyTorch's CUDA-graph recipe: ``warmup`` eager calls on a side stream (Triton compiles,
    the allocator settles), then one capture on ``torch.cuda.graph``'s own stream. Raises whatever
    the capture raises (host synchronisation, CPU tensors, ...); the graph and its memory pool are
    freed before returning.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
        return timed(graph.replay)
    finally:
        del graph
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def error_text(e, limit=400):
    """``Type: message`` of an exception, with the exception it interrupted (a failed capture raises twice)."""
    text = f"{type(e).__name__}: {e}"
    if e.__context__ is not None:
        text += f" (while handling {type(e.__context__).__name__}: {e.__context__})"
    return text[:limit]


def plan_fn(m, q, k):
    return (lambda: m.plan(q, k)) if hasattr(m, "plan") else (lambda: m.select(q, k))


def tokenselect_entry(q, k, v, dense_ms):
    """TokenSelect at its defaults: prefill selection (peak extra memory too), attention on its
    TokenLayout (``attend_ms``; with the selection ``e2e_layout_ms``), end to end through ``m(q, k, v)``
    (shared keys per chunk plus windows; its peak memory and its largest difference from the layout's
    attention), and the same with the masked path forced for every chunk (``e2e_masked_ms``: the
    split path's baseline, see :mod:`blocksieve.ops.shared_window`); one decode step that votes (fresh state) and one that reuses the cached top-k (the
    same query again: a cache hit), with attention on the step's layout."""
    m = blocksieve.method("tokenselect")
    qt = q[:, :, -1:]
    try:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        lay = m.select(q, k)
        entry = dict(select_peak_extra_mib=(torch.cuda.max_memory_allocated() - base) / 2**20, select_ms=timed(lambda: m.select(q, k), 5))
        entry["attend_ms"] = timed(lambda: blocksieve.attend(q, k, v, lay), 5)
        entry["e2e_layout_ms"] = timed(lambda: blocksieve.attend(q, k, v, m.select(q, k)), 5)
        ref = blocksieve.attend(q, k, v, lay)
        lay = None  # freed before the peak-memory run below (not del: the timing lambdas above name it)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        got = m(q, k, v)
        entry["e2e_peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        entry["e2e_max_abs_diff_vs_layout_attend"] = float((got.float() - ref.float()).abs().max())
        del got, ref
        entry["e2e_ms"] = timed(lambda: m(q, k, v), 5)
        entry["e2e_vs_dense"] = entry["e2e_ms"] / dense_ms
        with mock.patch.object(shared_window, "_flash_window_ok", lambda q: False):
            entry["e2e_masked_ms"] = timed(lambda: m(q, k, v), 5)
        step, state = m.select_step(qt, k, None)
        entry["decode_vote_ms"] = timed(lambda: m.select_step(qt, k, None))
        entry["decode_cache_hit_ms"] = timed(lambda: m.select_step(qt, k, state))
        entry["decode_attend_ms"] = timed(lambda: blocksieve.attend(qt, k, v, step))
        return entry
    except Exception as e:  # noqa: BLE001 - reported, the run goes on
        return dict(error=error_text(e))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="32768,131072")
    ap.add_argument("--methods", default=",".join(n for n in METHODS if n not in ON_REQUEST))
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    res = dict(
        gpu=torch.cuda.get_device_name(), torch=torch.__version__, python=platform.python_version(),
        command="python " + " ".join(sys.argv), shape=dict(B=1, Hq=32, Hkv=8, D=128, dtype="bfloat16"), lengths={},
    )
    try:
        import triton

        res["triton"] = triton.__version__
    except ImportError:
        pass
    out_path = Path(args.out) / f"selection_{device_tag()}.json"
    t0 = time.time()
    for length in (int(x) for x in args.lengths.split(",")):
        q, k, v = synthetic(length)
        row = {}
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            try:
                row["dense_cudnn"] = dict(ms=timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)))
            except Exception as e:  # noqa: BLE001
                kr, vr = k.repeat_interleave(4, 1), v.repeat_interleave(4, 1)
                row["dense_cudnn"] = dict(ms=timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, kr, vr, is_causal=True)), note=f"GQA by repeat ({type(e).__name__})")
        lay = random_layout(q, k, 0.1)
        fn, backend = attend_fn(q, k, v, lay)
        row["sparse_10pct"] = dict(ms=timed(fn), density=density(lay), backend=backend)
        print(f"[{time.time() - t0:5.0f}s] L={length} dense {row['dense_cudnn']['ms']:.2f} ms, sparse10% {row['sparse_10pct']['ms']:.2f} ms ({backend})", flush=True)
        for name in filter(None, args.methods.split(",")):
            meth, cfg = METHODS[name]
            m = blocksieve.method(meth, **cfg)
            try:
                sel = timed(plan_fn(m, q, k))
                entry = dict(config=repr(m.config), select_ms=sel, select_share_of_sparse10=sel / row["sparse_10pct"]["ms"])
                if meth not in ("pbs", "s2o"):
                    layout = m.select(q, k)
                    entry["density"] = density(layout)
                    entry["attend_ms"] = timed(lambda: blocksieve.attend(q, k, v, layout))
                if meth == "moba":
                    ref = blocksieve.method(meth, **cfg, backend="torch").select(q, k).indices
                    same = ref.shape == layout.indices.shape  # else 0: the widths differ
                    entry["rows_equal_torch_path"] = float((ref == layout.indices).all(-1).float().mean()) if same else 0.0
                    del ref
                if meth == "s2o":  # the fused early-stopping pass vs attend over the blocks it read
                    layout = m.select(q, k)
                    entry["density"] = density(layout)
                    err = float((m(q, k, v).float() - blocksieve.attend(q, k, v, layout).float()).abs().max())
                    entry["check_max_abs_err_vs_attend"] = err
                    entry["check_ok"] = err < 3e-2
                if meth == "pbs":
                    _, perm_lay, diag = m.plan(q, k)
                    entry["density"] = density(perm_lay) + density(diag)  # disjoint: earlier segments + own segment
                    entry["blocks_permuted"] = float(perm_lay.counts.float().mean())
                entry["e2e_ms"] = timed(lambda: m(q, k, v))
                entry["e2e_vs_dense"] = entry["e2e_ms"] / row["dense_cudnn"]["ms"]
            except Exception as e:  # noqa: BLE001 - reported, the run goes on
                entry = dict(error=f"{type(e).__name__}: {e}"[:400])
            try:
                entry["select_graph_ms"] = graph_timed(plan_fn(m, q, k))
                entry["select_graph_share_of_sparse10"] = entry["select_graph_ms"] / row["sparse_10pct"]["ms"]
            except Exception as e:  # noqa: BLE001 - not capturable: reported, the run goes on
                entry["select_graph_error"] = error_text(e)
            row[name] = entry
            print(f"[{time.time() - t0:5.0f}s] L={length} {name}: {entry}", flush=True)
            torch.cuda.empty_cache()
            res["lengths"][str(length)] = row
            out_path.write_text(json.dumps(res, indent=1))
        # Quest: one decode step against the whole cache (the state holds the bounds of all but the last key).
        qt = q[:, :, -1:]
        m = blocksieve.method("quest")
        try:
            state = m.select_step(qt, k[:, :, :-1], None)[1]
            lay = m.select_step(qt, k, state)[0]
            ref = blocksieve.method("quest", backend="torch").select(qt, k)
            sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(qt, k, v, enable_gqa=True)  # noqa: E731
            entry = dict(
                select_ms=timed(lambda: m.select_step(qt, k, state)),
                select_graph_ms=graph_timed(lambda: m.select_step(qt, k, state)),
                select_fresh_ms=timed(lambda: m.select(qt, k)),
                torch_path_select_ms=timed(lambda: blocksieve.method("quest", backend="torch").select_step(qt, k, state)),
                rows_equal_torch_path=float((lay.indices == ref.indices).all(-1).float().mean()) if lay.shape == ref.shape else 0.0,
                attend_ms=timed(lambda: blocksieve.attend(qt, k, v, lay)),
                attend_graph_ms=graph_timed(lambda: blocksieve.attend(qt, k, v, lay)),
                density=density(lay),
                dense_sdpa_decode_ms=timed(sdpa),
                dense_sdpa_decode_graph_ms=graph_timed(sdpa),
            )
            entry["timeline"] = kernel_timeline(lambda: m.select_step(qt, k, state))
            entry["select_plus_attend_graph_vs_dense_graph"] = (entry["select_graph_ms"] + entry["attend_graph_ms"]) / entry["dense_sdpa_decode_graph_ms"]
            row["quest_decode"] = entry
        except Exception as e:  # noqa: BLE001
            row["quest_decode"] = dict(error=error_text(e))
        print(f"[{time.time() - t0:5.0f}s] L={length} quest: {row['quest_decode']}", flush=True)
        row["tokenselect"] = tokenselect_entry(q, k, v, row["dense_cudnn"]["ms"])
        print(f"[{time.time() - t0:5.0f}s] L={length} tokenselect: {row['tokenselect']}", flush=True)
        res["lengths"][str(length)] = row
        out_path.write_text(json.dumps(res, indent=1))
        q = k = v = None  # frees them before the next length
        torch.cuda.empty_cache()
    print("wrote", out_path)


if __name__ == "__main__":
    main()
