"""S2O's ``rank="lse"`` statistic in Triton: the log mass each segment's mean query gives each past key block.

For the segment means ``qs [B, Hq, NS, D]`` (fp32) and keys ``k [B, Hkv, L, D]`` it writes

    s[b, h, i, j] = log Σ_{t ∈ block j} exp(scale · qs[b, h, i] · k[b, h // G, t])

for every key block ``j`` wholly before segment ``i`` (``(j + 1) · block_k <= seg_first(i)``,
``seg_first(i) = base + i · segment``, the blocks S2O may rank) and ``-inf`` elsewhere: the same
values as :func:`blocksieve.select.score.block_logsumexp` on those blocks, whose other entries
S2O's ranking leaves out anyway. Scores are never stored: each program takes ``BLOCK_S`` segment
means of up to ``PACK_ROWS // BLOCK_S`` query heads of one KV group (stacked as the rows of one MMA
operand, so a key tile is loaded once for them), walks one chunk of ``CHUNK_BLOCKS`` key blocks up
to its last segment's start (about half of the ``NS × L`` pairs in all) and reduces each
``BLOCK_K``-key block to its log-sum-exp in registers.

Precision: the mean queries are rounded to the keys' dtype for the tensor-core product (bf16 keeps
8 significant bits, so a score may differ from the fp32 rule by about ``2⁻⁹ · |q̄| · |k|`` and
near-ties may rank differently than on the PyTorch path); fp32 keys use an exact fp32 product.
Nothing is synchronised with the host.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from blocksieve.ops._triton_utils import check_segment_operands, last_dim_contiguous, mma_sizes_ok, on_input_device, segment_grid, segment_rows
from blocksieve.ops.alloc import empty_output

__all__ = ["kernel_supports", "segment_block_lse_triton"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

BLOCK_S = 64
"""Segment means (query rows) of one head per program."""
PACK_ROWS = 128
"""Most query rows per program: the segment means of :func:`heads_per_pass` heads of a KV group are
stacked so that each key tile is loaded once for them all. Also the fastest of the launch shapes
timed at head dim 256 (H100, session 16, ``Hq=16, Hkv=8``: 0.238 / 2.16 ms at 32K / 128K against
0.327 / 3.66 ms with 64 rows; ``benchmarks/results/s2o_rank_h100_s16.json``)."""
CHUNK_BLOCKS = 32
"""Key blocks per program: a row of key blocks is split over ``ceil(NK / CHUNK_BLOCKS)`` programs
(each block's log-sum-exp is independent), so the last segments' long rows do not hold up the
launch."""
BLOCKS_PER_STEP = 2
"""Key blocks per loop step: their log-sum-exps are stored as one ``[rows, BLOCKS_PER_STEP]`` tile."""
NUM_WARPS = 8
"""Warps per program."""
AUTO_MAX_HEAD_DIM = 256
"""Largest head dim that S2O's ``backend="auto"`` sends to this kernel: the default launch ran on a GPU
at 128 and 256 channels (sessions 15-16), no larger."""

LOG2E = 1.4426950408889634


# fmt: off
@triton.jit
def _segment_lse_kernel(
    QS, K, OUT,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_kl,
    stride_ob, stride_oh, stride_os,
    num_kv_heads, group, n_packs, ns, nk, n_tiles, chunk, base, qk_scale,
    SEGMENT: tl.constexpr, BLOCK_K: tl.constexpr, NB: tl.constexpr, BLOCK_S_: tl.constexpr, HP: tl.constexpr,
    D: tl.constexpr, IEEE: tl.constexpr,
):
    # fmt: on
    i_tile = tl.program_id(0) % n_tiles  # tiles of one chunk are neighbours: they read the same keys
    c0 = tl.program_id(0) // n_tiles * chunk  # this program's key blocks: [c0, c1)
    c1 = tl.minimum(c0 + chunk, nk)
    i_b, i_kvh, o_s, o_h, m_r, n_past = segment_rows(
        tl.program_id(1), i_tile, num_kv_heads, n_packs, group, ns, nk, base, SEGMENT, BLOCK_K, BLOCK_S_, HP
    )  # [R] rows: segment ids, query heads, valid rows, blocks wholly before each segment
    n_hi = tl.minimum(tl.max(n_past, 0), c1)  # blocks this program computes: [c0, n_hi)
    o_d = tl.arange(0, D)
    p_q = QS + i_b.to(tl.int64) * stride_qb + o_h[:, None] * stride_qh + o_s[:, None].to(tl.int64) * stride_qs + o_d[None, :]
    b_q = tl.load(p_q, mask=(m_r & (n_past > c0))[:, None], other=0.0)  # [R, D] fp32, rows with blocks in the chunk
    if not IEEE:
        b_q = b_q.to(K.dtype.element_ty)
    p_k = K + i_b.to(tl.int64) * stride_kb + i_kvh.to(tl.int64) * stride_kh
    p_o = OUT + i_b.to(tl.int64) * stride_ob + o_h[:, None] * stride_oh + o_s[:, None].to(tl.int64) * stride_os
    o_t = tl.arange(0, BLOCK_K)  # [BK] keys of one block
    o_j = tl.arange(0, NB)  # [NB] blocks of one step
    for j0 in range(c0, n_hi, NB):  # NB blocks per step, written as one [R, NB] tile
        b_out = tl.full((HP * BLOCK_S_, NB), float("-inf"), tl.float32)
        for jj in tl.static_range(NB):
            o_k = (j0 + jj) * BLOCK_K + o_t
            b_k = tl.load(p_k + o_k[:, None].to(tl.int64) * stride_kl + o_d[None, :], mask=(o_k < n_hi * BLOCK_K)[:, None], other=0.0)
            if IEEE:
                b_sc = tl.dot(b_q, tl.trans(b_k), input_precision="ieee")
            else:
                b_sc = tl.dot(b_q, tl.trans(b_k))  # [R, BK] fp32
            b_sc = b_sc * qk_scale  # log2 domain
            b_m = tl.max(b_sc, 1)
            b_lse = (b_m + tl.log2(tl.sum(tl.exp2(b_sc - b_m[:, None]), 1))) * 0.6931471805599453  # [R] natural log
            b_out = tl.where(o_j[None, :] == jj, b_lse[:, None], b_out)
        o_jj = j0 + o_j
        b_out = tl.where(o_jj[None, :] < n_past[:, None], b_out, float("-inf"))
        tl.store(p_o + o_jj[None, :], b_out, mask=m_r[:, None] & (o_jj[None, :] < c1))
    n_done = c0 + tl.cdiv(tl.maximum(n_hi - c0, 0), NB) * NB
    for j0 in range(n_done, c1, NB):  # the rest of the chunk: blocks no segment of this program sees
        o_jj = j0 + o_j
        tl.store(p_o + o_jj[None, :], tl.full((HP * BLOCK_S_, NB), float("-inf"), tl.float32), mask=m_r[:, None] & (o_jj[None, :] < c1))


def kernel_supports(k: torch.Tensor, block_k: int) -> bool:
    """Whether S2O's ``backend="auto"`` runs :func:`segment_block_lse_triton` on these keys and key blocks
    (the device aside): the kernel takes them, and the head dim is at most ``AUTO_MAX_HEAD_DIM``."""
    d = k.shape[-1]
    return mma_sizes_ok(d, block_k) and k.dtype in SUPPORTED_DTYPES and d <= AUTO_MAX_HEAD_DIM


@on_input_device
def segment_block_lse_triton(
    qs: torch.Tensor,
    k: torch.Tensor,
    block_k: int,
    scale: float,
    segment: int,
    base: int,
    block_s: int = BLOCK_S,
    pack_rows: int = PACK_ROWS,
    chunk_blocks: int = CHUNK_BLOCKS,
    blocks_per_step: int = BLOCKS_PER_STEP,
    num_warps: int = NUM_WARPS,
) -> torch.Tensor:
    """``[B, Hq, NS, NK]`` fp32 block log-sum-exp of the segment means ``qs [B, Hq, NS, D]`` (see module docstring).

    ``k [B, Hkv, L, D]`` (fp16, bf16 or fp32; ``Hq`` a multiple of ``Hkv``), ``NK = ceil(L / block_k)``;
    ``base >= 0`` is the absolute key position where segment 0 starts (S2O's segments are aligned
    so that ``base = Lkv - Lq - (Lkv - Lq) % segment``). Launch knobs (they change the speed, not
    the result): ``block_s`` segments per program (a power of two >= 16), ``pack_rows`` most rows
    per program (heads of a KV group stacked), ``chunk_blocks`` key blocks per program (>= 1),
    ``blocks_per_step`` (a power of two) and ``num_warps``.
    """
    b, hq, ns, d = qs.shape
    hkv, lkv = k.shape[1], k.shape[2]
    check_segment_operands(qs, k, "k", base)
    if not mma_sizes_ok(d, block_k):
        raise ValueError(f"block_k={block_k} and D={d} must be powers of two >= 16 for the Triton path")
    if k.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"k has dtype {k.dtype}: the kernel takes float16, bfloat16 or float32 keys")
    if not mma_sizes_ok(block_s) or chunk_blocks < 1 or blocks_per_step < 1 or blocks_per_step & (blocks_per_step - 1):
        raise ValueError(
            f"block_s={block_s} must be a power of two >= 16, chunk_blocks={chunk_blocks} >= 1 and "
            f"blocks_per_step={blocks_per_step} a power of two"
        )
    nk = math.ceil(lkv / block_k)
    qs = last_dim_contiguous(qs.float())
    k = last_dim_contiguous(k)
    out = empty_output(b, hq, ns, nk, dtype=torch.float32, device=qs.device)
    group = hq // hkv
    hp, n_tiles, n_packs = segment_grid(ns, group, block_s, pack_rows)
    grid = (n_tiles * triton.cdiv(nk, chunk_blocks), b * hkv * n_packs)
    _segment_lse_kernel[grid](
        qs, k, out, qs.stride(0), qs.stride(1), qs.stride(2), k.stride(0), k.stride(1), k.stride(2),
        out.stride(0), out.stride(1), out.stride(2), hkv, group, n_packs, ns, nk, n_tiles,
        chunk_blocks, base, scale * LOG2E,
        SEGMENT=segment, BLOCK_K=block_k, NB=blocks_per_step, BLOCK_S_=block_s, HP=hp, D=d,
        IEEE=k.dtype == torch.float32, num_warps=num_warps, num_stages=2,
    )
    return out
