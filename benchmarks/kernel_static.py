"""Static cost of Triton kernels for sm_90 without a GPU: registers, spills, shared memory, layout conversions, SASS.

``triton.compile`` targets Hopper on any machine; ``ptxas -v`` (in the Triton wheel) reports registers and
spills and ``nvdisasm`` the SASS. Use the device's Triton for figures that hold there: install it beside
the venv's and put it first on the path::

    pip install --no-deps --target /tmp/t36 triton==3.6.0
    PYTHONPATH=/tmp/t36:. python benchmarks/kernel_static.py [--kernels sums,row_stats,topk]

Integer arguments that the runtime would find divisible by 16 (pointers, strides, lengths) are
declared so (:func:`compile_report`'s ``div16``): without that the loads stay scalar and the spill
figures are several times too high. Rows: each kernel at vertical_slash's and FlexPrefill's launches
(session 24 read the last-row sums pass's spills and shared memory this way, ``docs/dev/blocks_notes.md``).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TTGIR_OPS = ("ttg.convert_layout", "ttg.local_alloc", "ttng.warp_group_dot", "tt.gather", "tt.reshape", "tt.histogram")


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_report(fn, signature: dict, constexprs: dict, num_warps: int, num_stages: int, div16=()) -> dict:
    """Compile ``fn`` for sm_90: ``{regs, spill_stores, spill_loads, smem, ttgir op counts, sass_ops}``.

    ``signature``: argument name → Triton type (``"*bf16"``, ``"i32"``, ``"fp32"``, ``"constexpr"``);
    ``div16``: the names the runtime would specialise as divisible by 16."""
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div16}
    cc = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages))
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        open(ptx, "w").write(cc.asm["ptx"])
        open(cubin, "wb").write(cc.asm["cubin"])
        info = subprocess.run([_tool("ptxas"), "-v", "--gpu-name=sm_90a", ptx, "-o", os.devnull], capture_output=True, text=True).stderr
        sass = subprocess.run([_tool("nvdisasm"), "-c", cubin], capture_output=True, text=True).stdout
    num = lambda pattern: int(m.group(1)) if (m := re.search(pattern, info)) else None  # noqa: E731
    ops = collections.Counter(m.group(1).split(".")[0] for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", sass))
    return {
        "regs": num(r"Used (\d+) registers"),
        "spill_stores": num(r"(\d+) bytes spill stores"),
        "spill_loads": num(r"(\d+) bytes spill loads"),
        "smem": cc.metadata.shared,
        **{op: cc.asm["ttgir"].count(op + " ") for op in TTGIR_OPS},
        "sass_instructions": sum(ops.values()),
        "sass_top": dict(ops.most_common(8)),
    }


def _last_rows_signature(pointers: dict, ints: list, constexprs: dict) -> dict:
    sig = dict(pointers)
    sig.update({n: "i32" for n in ints})
    sig["qk_scale"] = "fp32"
    sig.update({n: "constexpr" for n in constexprs})
    return sig


STRIDES = ["stride_qb", "stride_qh", "stride_ql", "stride_kb", "stride_kh", "stride_kl"]
LAUNCHES = {  # name: (constexprs beyond D=128 bf16, warps, stages)
    "vertical_slash": (dict(BLOCK_R=64, HP=4, N_CHUNKS=2), 4, 2),
    "flexprefill": (dict(BLOCK_R=128, HP=2, N_CHUNKS=3), 8, 3),
}


def last_rows_rows() -> list:
    from blocksieve.ops.last_rows_stats import _row_stats_kernel, _sums_kernel

    rows = []
    for launch, (extra, warps, stages) in LAUNCHES.items():
        base = dict(D=128, BLOCK_N=64, BLOCK_D=128, UPCAST=False, PREC="tf32", **extra)
        sums_c = dict(base, DIAGONALS=True, HAS_HEAD_MASK=False)
        ints = STRIDES + ["q_len", "kv_len", "rows", "num_kv_heads", "group", "n_tiles", "tiles_per_span"]
        ptrs = {"Q": "*bf16", "K": "*bf16", "BIAS": "*fp32", "COLS": "*fp32", "BANDS": "*fp32", "HEADS_ON": "*i8"}
        div = list(ptrs) + STRIDES + ["q_len", "kv_len", "rows", "n_tiles"]
        rows.append({"kernel": "_sums_kernel", "launch": launch, "warps": warps, "stages": stages,
                     **compile_report(_sums_kernel, _last_rows_signature(ptrs, ints, sums_c), sums_c, warps, stages, div)})
        stats_c = {k: v for k, v in base.items() if k != "N_CHUNKS"}
        stats_c["TILE_STATS"] = launch == "flexprefill"
        ptrs = {"Q": "*bf16", "K": "*bf16", "M": "*fp32", "L": "*fp32", "TILE_M": "*fp32", "TILE_L": "*fp32"}
        ints = STRIDES + ["q_len", "kv_len", "rows", "num_kv_heads", "group", "n_span", "n_tiles", "tiles_per_span"]
        div = list(ptrs) + STRIDES + ["q_len", "kv_len", "rows", "n_tiles"]
        rows.append({"kernel": "_row_stats_kernel", "launch": launch, "warps": warps, "stages": stages,
                     **compile_report(_row_stats_kernel, _last_rows_signature(ptrs, ints, stats_c), stats_c, warps, stages, div)})
    return rows


def topk_rows() -> list:
    from blocksieve.ops import topk_select as ts

    sig = {"X": "*fp32", "OUT": "*i1", "KEYS": "*i32"}
    sig.update({n: "i32" for n in ("n", "rows_a", "k_a", "k_b", "forced_a", "forced_b", "stride_x", "stride_o")})
    sig.update({n: "constexpr" for n in ("BLOCK", "DIGIT_BITS", "COMPACT")})
    rows = []
    for bits, compact in ((4, True), (8, False)):
        c = dict(BLOCK=ts.BLOCK, DIGIT_BITS=bits, COMPACT=compact)
        rows.append({"kernel": "_topk_mask_kernel", "launch": f"bits{bits} compact{int(compact)}", "warps": ts.NUM_WARPS, "stages": 1,
                     **compile_report(ts._topk_mask_kernel, sig, c, ts.NUM_WARPS, 1, ["X", "OUT", "KEYS", "n", "stride_x", "stride_o"])})
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernels", default="last_rows,topk")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    rows = []
    rows += last_rows_rows() if "last_rows" in args.kernels else []
    rows += topk_rows() if "topk" in args.kernels else []
    for r in rows:
        print({k: v for k, v in r.items() if k != "sass_top"})
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"triton": triton.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
