"""S2O's ``rank="lse"`` statistic in Triton: the log mass each segment's mean query gives each past key block.

For the segment means ``qs [B, Hq, NS, D]`` (fp32) and keys ``k [B, Hkv, L, D]`` it writes

    s[b, h, i, j] = log Σ_{t ∈ block j} exp(scale · qs[b, h, i] · k[b, h // G, t])

for every key block ``j`` wholly before segment ``i`` (``(j + 1) · block_k <= seg_first(i)``,
``seg_first(i) = base + i · segment``, the blocks S2O may rank) and ``-inf`` elsewhere: the same
values as :func:`blocksieve.select.score.block_logsumexp` on those blocks, whose other entries
S2O's ranking leaves out anyway. Scores are never stored: each program takes ``BLOCK_S`` segment
means of one query head, walks the key blocks up to its last segment's start (about half of the
``NS × L`` pairs in all) and reduces each ``BLOCK_K``-key block to its log-sum-exp in registers.

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

from blocksieve.ops._triton_utils import last_dim_contiguous
from blocksieve.ops.alloc import empty_output

__all__ = ["kernel_supports", "segment_block_lse_triton"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

BLOCK_S = 64
"""Segment means (query rows) per program."""
BLOCKS_PER_STEP = 4
"""Key blocks per loop step: their log-sum-exps are stored as one ``[BLOCK_S, BLOCKS_PER_STEP]`` tile."""
NUM_WARPS = 4
"""Warps per program."""

LOG2E = 1.4426950408889634


# fmt: off
@triton.jit
def _segment_lse_kernel(
    QS, K, OUT,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_kl,
    stride_ob, stride_oh, stride_os,
    num_heads, group, ns, nk, base, qk_scale,
    SEGMENT: tl.constexpr, BLOCK_K: tl.constexpr, NB: tl.constexpr, BLOCK_S_: tl.constexpr, D: tl.constexpr,
    IEEE: tl.constexpr,
):
    # fmt: on
    i_bh = tl.program_id(1)
    i_b = i_bh // num_heads
    i_h = i_bh % num_heads
    o_s = tl.program_id(0) * BLOCK_S_ + tl.arange(0, BLOCK_S_)  # [BS] segment ids
    m_s = o_s < ns
    n_past = tl.minimum((base + o_s * SEGMENT) // BLOCK_K, nk)  # [BS] blocks wholly before each segment
    n_past = tl.where(m_s, n_past, 0)
    o_d = tl.arange(0, D)
    p_q = QS + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh + o_s[:, None].to(tl.int64) * stride_qs + o_d[None, :]
    b_q = tl.load(p_q, mask=m_s[:, None], other=0.0)  # [BS, D] fp32
    if not IEEE:
        b_q = b_q.to(K.dtype.element_ty)
    p_k = K + i_b.to(tl.int64) * stride_kb + (i_h // group).to(tl.int64) * stride_kh
    p_o = OUT + i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh + o_s[:, None].to(tl.int64) * stride_os
    o_t = tl.arange(0, BLOCK_K)  # [BK] keys of one block
    o_j = tl.arange(0, NB)  # [NB] blocks of one step
    n_hi = tl.max(n_past, 0)  # blocks this program computes (its last segment's)
    for j0 in range(0, n_hi, NB):  # NB blocks per step, written as one [BS, NB] tile
        b_out = tl.full((BLOCK_S_, NB), float("-inf"), tl.float32)
        for jj in tl.static_range(NB):
            o_k = (j0 + jj) * BLOCK_K + o_t
            b_k = tl.load(p_k + o_k[:, None].to(tl.int64) * stride_kl + o_d[None, :], mask=(o_k < n_hi * BLOCK_K)[:, None], other=0.0)
            if IEEE:
                b_sc = tl.dot(b_q, tl.trans(b_k), input_precision="ieee")
            else:
                b_sc = tl.dot(b_q, tl.trans(b_k))  # [BS, BK] fp32
            b_sc = b_sc * qk_scale  # log2 domain
            b_m = tl.max(b_sc, 1)
            b_lse = (b_m + tl.log2(tl.sum(tl.exp2(b_sc - b_m[:, None]), 1))) * 0.6931471805599453  # [BS] natural log
            b_out = tl.where(o_j[None, :] == jj, b_lse[:, None], b_out)
        o_jj = j0 + o_j
        b_out = tl.where(o_jj[None, :] < n_past[:, None], b_out, float("-inf"))
        tl.store(p_o + o_jj[None, :], b_out, mask=m_s[:, None] & (o_jj[None, :] < nk))
    for j0 in range(tl.cdiv(n_hi, NB) * NB, nk, NB):  # the rest of the row: blocks no segment of this program sees
        o_jj = j0 + o_j
        tl.store(p_o + o_jj[None, :], tl.full((BLOCK_S_, NB), float("-inf"), tl.float32), mask=m_s[:, None] & (o_jj[None, :] < nk))


def _tiles_ok(d: int, block_k: int) -> bool:
    """Head dim and key block are both powers of two >= 16 (the MMA tile sizes)."""
    return all(x >= 16 and not x & (x - 1) for x in (d, block_k))


def kernel_supports(k: torch.Tensor, block_k: int) -> bool:
    """Whether :func:`segment_block_lse_triton` takes these keys and key blocks (the device aside)."""
    return _tiles_ok(k.shape[-1], block_k) and k.dtype in SUPPORTED_DTYPES


def segment_block_lse_triton(qs: torch.Tensor, k: torch.Tensor, block_k: int, scale: float, segment: int, base: int) -> torch.Tensor:
    """``[B, Hq, NS, NK]`` fp32 block log-sum-exp of the segment means ``qs [B, Hq, NS, D]`` (see module docstring).

    ``k [B, Hkv, L, D]`` (fp16, bf16 or fp32; ``Hq`` a multiple of ``Hkv``), ``NK = ceil(L / block_k)``;
    ``base >= 0`` is the absolute key position where segment 0 starts (S2O's segments are aligned
    so that ``base = Lkv - Lq - (Lkv - Lq) % segment``).
    """
    b, hq, ns, d = qs.shape
    hkv, lkv = k.shape[1], k.shape[2]
    if k.shape[0] != b or k.shape[3] != d or hq % hkv:
        raise ValueError(f"qs {tuple(qs.shape)} and k {tuple(k.shape)} must share B and D, with Hq a multiple of Hkv")
    if not _tiles_ok(d, block_k):
        raise ValueError(f"block_k={block_k} and D={d} must be powers of two >= 16 for the Triton path")
    if k.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"k has dtype {k.dtype}: the kernel takes float16, bfloat16 or float32 keys")
    if qs.device != k.device:
        raise ValueError(f"qs is on {qs.device} and k on {k.device}: put both on one device")
    if base < 0:
        raise ValueError(f"base={base} must be >= 0 (the key position where segment 0 starts)")
    nk = math.ceil(lkv / block_k)
    qs = last_dim_contiguous(qs.float())
    k = last_dim_contiguous(k)
    out = empty_output(b, hq, ns, nk, dtype=torch.float32, device=qs.device)
    ieee = k.dtype == torch.float32
    grid = (triton.cdiv(ns, BLOCK_S), b * hq)
    _segment_lse_kernel[grid](
        qs, k, out, qs.stride(0), qs.stride(1), qs.stride(2), k.stride(0), k.stride(1), k.stride(2),
        out.stride(0), out.stride(1), out.stride(2), hq, hq // hkv, ns, nk, base, scale * LOG2E,
        SEGMENT=segment, BLOCK_K=block_k, NB=BLOCKS_PER_STEP, BLOCK_S_=BLOCK_S, D=d, IEEE=ieee,
        num_warps=NUM_WARPS, num_stages=2,
    )
    return out
