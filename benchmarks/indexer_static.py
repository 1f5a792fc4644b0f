"""Static view of the row-blocked indexer kernel for Hopper, compiled on the CPU (no GPU needed).

Compiles :func:`blocksieve.ops.indexer_topk._indexer_topk_rows_kernel` for ``sm_90`` with the
launch of a method (``--method dsa``: 2 rows × 64 heads, ``misa``: 8 rows × 8 routed heads, or
``--rows/--heads``), then reports what Nsight Compute would need a GPU for only partly: registers
and spill stack per thread (``cuobjdump --dump-resource-usage``), shared memory, and per source
line the SASS instructions and local-memory spills (``nvdisasm -g``: ``STL``/``LDL``). Static
counts, not executed ones: a line inside the key-tile loop runs once per tile, the compaction
(``_keep_top``) a few times per row, the final sort once per row. Lines are of the files as
compiled (Triton's ``standard.py`` holds ``tl.sum``, ``tl.cumsum`` and ``tl.sort``). The key-tile
loop is also counted on its own (the innermost loop around the MMA): its instructions per tile,
spills, shared-memory accesses and barriers are what every (row, key) pair pays.

Uses the ``ptxas``/``cuobjdump``/``nvdisasm`` that ship with Triton; the local Triton version may
generate other code than the GPU machine's (3.9 here, 3.6 there), so compare variants with each
other, and time the one worth it on the GPU (``benchmarks/indexer_launch_sweep.py``)::

    python -m benchmarks.indexer_static --method misa --top 15

``--all`` compiles every kernel of the module in the launches the methods use (row-blocked and
one-row scans, the split merge) and prints registers, spills and sizes: the compiler rejects
type errors that the interpreter lets through, so this is the check to run before GPU time.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from blocksieve.ops import indexer_topk, whole_row_topk
from blocksieve.ops._triton_utils import next_pow2

METHODS = {"dsa": (2, 64), "misa": (8, 8)}
"""Rows per program and indexer heads of each method's prefill scan (``select.token_topk``)."""


def compile_rows_kernel(rows: int, heads: int, block_n: int, num_warps: int, num_stages: int, tma: bool, topk: int, d: int):
    """The compiled kernel (``triton.compile`` for sm_90) with the constexprs ``indexer_topk`` would pass."""
    chunk, cap, keep = indexer_topk._buffer_shape(topk, block_n)
    sig = {"p_q": "*bf16", "p_k": "*bf16", "desc_k": f"tensordesc<bf16[{block_n}, {d}]>" if tma else "*bf16"}
    sig.update({"p_w": "*fp32", "p_buf": "*i64", "p_stg": "*i32", "p_out": "*i32"})
    sig.update({n: "i64" for n in ("s_qb", "s_qs", "s_qt", "s_qh", "s_kb", "s_ks", "s_kl", "s_wb", "s_ws", "s_wt", "s_ob", "s_os", "s_ot")})
    sig.update({n: "i32" for n in ("S", "POS0", "LKV", "H", "T0", "NT_ROWS", "NT_BLOCKS", "TOTAL", "NPROG")})
    consts = dict(
        TOPK=topk, KP=next_pow2(topk), CAP=cap, KEEP=keep, SUB=min(indexer_topk.LIST_CHUNK, cap), BQ=rows, HP=max(next_pow2(heads), 16 // rows), D=d, BLOCK_N=block_n,
        CHUNK=chunk, ADMIT=min(chunk * block_n, indexer_topk.ADMIT_SLOTS // rows), STAGED=rows <= indexer_topk.STAGED_MAX_ROWS, RELU=True, CAUSAL=True, POS_MULT=1, FORCE_ENDS=False, TMA=tma,
    )
    return _compile(indexer_topk._indexer_topk_rows_kernel, sig, consts, num_warps=num_warps, num_stages=num_stages)


def _compile(fn, sig: dict, consts: dict, **options):
    """``triton.compile`` of ``fn`` for sm_90 with its typed arguments ``sig`` and constexprs ``consts``."""
    sig = {**sig, **{n: "constexpr" for n in consts}}
    return triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32), options=options)


def compile_row_kernel(tiles: bool, packed: bool, ascending: bool, tma: bool, topk: int = 2048, block_n: int = 128, heads: int = 64, d: int = 128):
    """The one-row-per-program scan (HISA's stages, decode splits) for sm_90, as ``indexer_topk`` launches it."""
    chunk, cap, keep = indexer_topk._buffer_shape(topk, block_n)
    sig = {"p_q": "*bf16", "p_k": "*bf16", "desc_k": f"tensordesc<bf16[{block_n}, {d}]>" if tma else "*bf16", "p_w": "*fp32"}
    sig.update({"p_tiles": "*i32" if tiles else "*i64", "p_buf": "*i64", "p_out": "*i64" if packed else "*i32"})
    sig.update({n: "i64" for n in ("s_qb", "s_qs", "s_qt", "s_qh", "s_kb", "s_ks", "s_kl", "s_wb", "s_ws", "s_wt", "s_ob", "s_os", "s_ot")})
    sig.update({n: "i32" for n in ("S", "POS0", "LKV", "H", "T0", "NT_ROWS", "NUM_TILES", "TOTAL", "NPROG", "SPLITS")})
    consts = dict(
        TOPK=topk, KP=next_pow2(topk), CAP=cap, KEEP=keep, SUB=min(indexer_topk.LIST_CHUNK, cap), HP=max(16, next_pow2(heads)), D=d, BLOCK_N=block_n, CHUNK=chunk,
        RELU=True, CAUSAL=True, POS_MULT=1, FORCE_ENDS=False, HAS_TILES=tiles, TILES_ASCENDING=ascending, PACKED=packed, TMA=tma,
    )
    return _compile(indexer_topk._indexer_topk_kernel, sig, consts, num_warps=4)


def compile_whole_row_kernel(tiles: bool, width: int, topk: int = 2048, block_n: int = 128, heads: int = 64, d: int = 128, ascending: bool = True):
    """The whole-row scan (:mod:`blocksieve.ops.whole_row_topk`, HISA's stages) for sm_90, TMA tiles."""
    sig = {"p_q": "*bf16", "p_k": "*bf16", "desc_k": f"tensordesc<bf16[{block_n}, {d}]>", "p_w": "*fp32", "p_tiles": "*i32", "p_scr": "*i32", "p_out": "*i32"}
    sig.update({n: "i64" for n in ("s_qb", "s_qs", "s_qt", "s_qh", "s_kb", "s_ks", "s_kl", "s_wb", "s_ws", "s_wt", "s_ob", "s_os", "s_ot")})
    sig.update({n: "i32" for n in ("S", "POS0", "LKV", "H", "T0", "NT_ROWS", "NUM_TILES", "TOTAL", "NPROG")})
    consts = dict(
        TOPK=topk, KP=next_pow2(topk), NP=width, SUB=min(whole_row_topk.SELECT_CHUNK, width), HP=max(16, next_pow2(heads)), D=d, BLOCK_N=block_n,
        RELU=True, CAUSAL=True, POS_MULT=1 if tiles else 128, FORCE_ENDS=not tiles, HAS_TILES=tiles, SORT=not ascending, TMA=True,
    )
    return _compile(whole_row_topk._whole_row_topk_kernel, sig, consts, num_warps=4)


def compile_split_kernels(tiles: bool, width: int, topk: int = 2048, block_n: int = 128, heads: int = 64, d: int = 128) -> tuple:
    """Decode's split whole rows for sm_90: the scoring kernel (TMA tiles) and the selection kernel."""
    sig = {"p_q": "*bf16", "p_k": "*bf16", "desc_k": f"tensordesc<bf16[{block_n}, {d}]>", "p_w": "*fp32", "p_tiles": "*i32", "p_scr": "*i32"}
    sig.update({n: "i64" for n in ("s_qb", "s_qs", "s_qt", "s_qh", "s_kb", "s_ks", "s_kl", "s_wb", "s_ws", "s_wt")})
    sig.update({n: "i32" for n in ("S", "POS0", "LKV", "H", "T0", "NT_ROWS", "NUM_TILES", "PER_SPLIT")})
    consts = dict(
        NP=width, HP=max(16, next_pow2(heads)), D=d, BLOCK_N=block_n, RELU=True, CAUSAL=True, POS_MULT=1 if tiles else 128,
        FORCE_ENDS=not tiles, HAS_TILES=tiles, TMA=True,
    )
    score = _compile(whole_row_topk._split_score_kernel, sig, consts, num_warps=4)
    sig = {"p_tiles": "*i32", "p_scr": "*i32", "p_out": "*i32", **{n: "i64" for n in ("s_ob", "s_os", "s_ot")}}
    sig.update({n: "i32" for n in ("S", "NT_ROWS", "NUM_TILES", "N_SLOTS")})
    consts = dict(TOPK=topk, KP=next_pow2(topk), NP=width, SUB=width, BLOCK_N=block_n, HAS_TILES=tiles, SORT=False)
    return score, _compile(whole_row_topk._split_select_kernel, sig, consts, num_warps=whole_row_topk.SELECT_WARPS)


def compile_merge_kernel(n: int, kk: int, topk: int, sort: bool):
    """The one-program-per-row split merge (``merge_splits``) for sm_90."""
    consts = dict(
        N=n, PART=next_pow2(n), NP=next_pow2(n), K_SEL=kk, TOPK=topk, KP=next_pow2(topk), FILL=-1, AS_IDS=True, SORT=sort,
        SUB=min(indexer_topk.MERGE_CHUNK, next_pow2(n)),
    )
    return _compile(indexer_topk._merge_kernel, {"p_in": "*i64", "p_out": "*i32"}, consts, num_warps=4 if n <= 2048 else 8)


VARIANTS = {
    "rows, MISA (8 x 8 heads), TMA": lambda: compile_rows_kernel(8, 8, 128, 4, 2, True, 2048, 128),
    "rows, DSA (2 x 64 heads), TMA": lambda: compile_rows_kernel(2, 64, 128, 4, 2, True, 2048, 128),
    "rows, MISA, gathered tiles": lambda: compile_rows_kernel(8, 8, 128, 4, 2, False, 2048, 128),
    "row, flat (HISA's pooled scan shape)": lambda: compile_row_kernel(False, False, False, True, topk=64),
    "row, ascending tiles (HISA's candidates)": lambda: compile_row_kernel(True, False, True, True),
    "row, tiles in any order": lambda: compile_row_kernel(True, False, False, False),
    "row, decode split (packed)": lambda: compile_row_kernel(True, True, True, True, topk=512),
    "whole row, HISA's 64 candidate tiles": lambda: compile_whole_row_kernel(True, 8192),
    "whole row, pooled scan at 128K (1,024 blocks, top-64)": lambda: compile_whole_row_kernel(False, 1024, topk=64),
    "split whole rows, HISA's candidates: scoring": lambda: compile_split_kernels(True, 8192)[0],
    "split whole rows, HISA's candidates: selection": lambda: compile_split_kernels(True, 8192)[1],
    "split whole rows, pooled scan at 128K: selection": lambda: compile_split_kernels(False, 1024, topk=64)[1],
    "merge, 16 x 512 ascending": lambda: compile_merge_kernel(8192, 2048, 2048, False),
    "merge, 2 x 64, sorted": lambda: compile_merge_kernel(128, 64, 64, True),
}
"""Every kernel of ``ops/indexer_topk.py`` and ``ops/whole_row_topk.py`` in the launches the methods use (``--all``)."""


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def static_report(kernel) -> dict:
    """Registers, spill stack, shared memory and per-line SASS / spill counts of a compiled kernel."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", cubin], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_tool("nvdisasm"), "-g", "-c", cubin], capture_output=True, text=True, check=True).stdout
    res = dict(re.findall(r"(REG|STACK):(\d+)", usage))
    loop = tile_loop(sass)
    lines, spills, where = collections.Counter(), collections.Counter(), None
    for text in sass.splitlines():
        loc = re.search(r'## File "([^"]+)", line (\d+)', text)
        if loc:
            where = f"{os.path.basename(loc.group(1))}:{loc.group(2)}"
        elif re.search(r"/\*[0-9a-f]{4,}\*/", text):
            lines[where] += 1
            spills[where] += bool(re.search(r"\b(STL|LDL)\b", text))
    return {
        "registers": int(res.get("REG", 0)), "spill_stack_bytes": int(res.get("STACK", 0)), "shared_bytes": kernel.metadata.shared,
        "sass": sum(lines.values()), "spill_instructions": sum(spills.values()), "lines": lines, "spills": spills,
        "loop_sass": len(loop), "loop_spills": sum(bool(re.search(r"\b(STL|LDL)\b", t)) for t in loop),
        "loop_shared": sum(bool(re.search(r"\b(STS|LDS|LDSM)\b", t)) for t in loop),
        "loop_barriers": sum(bool(re.search(r"\bBAR\b", t)) for t in loop),
    }


def tile_loop(sass: str) -> list:
    """SASS instructions of the innermost loop around the first ``HGMMA`` (the key-tile loop), in order.

    The loop is the shortest span from a label to a backward branch to it that holds the MMA; its
    length is the static instruction count of one tile (the body is straight-line code: the stores
    and the scan are predicated, not branched around)."""
    text = sass.splitlines()
    labels = {m.group(1): i for i, t in enumerate(text) if (m := re.match(r"^(\.L_x_\d+):", t))}
    mma = next((i for i, t in enumerate(text) if "HGMMA" in t), None)
    spans = [
        (labels[m.group(1)], i) for i, t in enumerate(text)
        if (m := re.search(r"BRA `\((\.L_x_\d+)\)", t)) and m.group(1) in labels and mma is not None and labels[m.group(1)] <= mma <= i
    ]
    if not spans:
        return []
    lo, hi = min(spans, key=lambda s: s[1] - s[0])
    return [t for t in text[lo : hi + 1] if re.search(r"/\*[0-9a-f]{4,}\*/", t)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=sorted(METHODS), default="misa")
    ap.add_argument("--rows", type=int, default=None, help="rows per program (default: the method's)")
    ap.add_argument("--heads", type=int, default=None, help="indexer heads per row (default: the method's)")
    ap.add_argument("--block-n", type=int, default=128)
    ap.add_argument("--num-warps", type=int, default=4)
    ap.add_argument("--num-stages", type=int, default=2)
    ap.add_argument("--no-tma", action="store_true")
    ap.add_argument("--topk", type=int, default=2048)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--top", type=int, default=12, help="source lines to list")
    ap.add_argument("--all", action="store_true", help="compile every kernel variant (a check before GPU time) and summarise each")
    args = ap.parse_args(argv)
    if args.all:
        for name, build in VARIANTS.items():
            rep = static_report(build())
            print(f"{name}: {rep['registers']} registers, {rep['spill_instructions']} spill instructions, {rep['sass']} SASS; loop {rep['loop_sass']}")
        return
    rows, heads = METHODS[args.method]
    rows, heads = args.rows or rows, args.heads or heads
    k = compile_rows_kernel(rows, heads, args.block_n, args.num_warps, args.num_stages, not args.no_tma, args.topk, args.dim)
    rep = static_report(k)
    print(
        f"{args.method}: {rows} rows x {heads} heads, block_n {args.block_n}, {args.num_warps} warps, {args.num_stages} stages: "
        f"{rep['registers']} registers, {rep['spill_stack_bytes']} B spill stack, {rep['shared_bytes']} B shared, "
        f"{rep['sass']} SASS instructions, {rep['spill_instructions']} spill loads/stores\n"
        f"  key-tile loop: {rep['loop_sass']} SASS instructions per tile, {rep['loop_spills']} spill, "
        f"{rep['loop_shared']} shared-memory loads/stores, {rep['loop_barriers']} barriers"
    )
    for where, n in rep["lines"].most_common(args.top):
        print(f"  {where:24s} {n:6d} SASS  {rep['spills'][where]:4d} spill")


if __name__ == "__main__":
    main()
