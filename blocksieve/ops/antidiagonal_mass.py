"""XAttention's block mass fused in Triton: strided antidiagonal scores, causal softmax, tile sums.

Same result as :func:`blocksieve.select.score.antidiagonal_block_mass` over all query blocks, without
the ``[B, Hq, L/S, L/S]`` scores. With ``S = stride`` and ``P = block / S`` groups per block, query
group ``m`` and key group ``n`` score

    ``s[m, n] = scale / S · Σ_{i<S} q[m·S + S-1-i] · k[n·S + i]``  (zero rows past Lq / Lkv),

visible iff ``n·S <= pos(m) = (Lkv - Lq) + m·S + S - 1``. Each group row takes the softmax of its
visible scores; ``mass[qb, kb]`` sums them over the ``P × P`` groups of the tile and divides by the
number of real group rows of query block ``qb`` (the PyTorch path divides by the row's total, equal
up to fp32 rounding), so every row of the output sums to 1.

The antidiagonal reshaping is folded into the loads: the MMA's reduction over ``S·D`` channels is
a loop over ``(i, D-chunk)`` that reads query rows ``m·S + S-1-i`` and key rows ``n·S + i`` of the
original ``q``/``k`` (any strides but the last), so neither ``q_r`` nor ``k_r`` is built. A program
owns the ``G`` query heads of one KV head (or a power-of-two slice of them) times ``QT`` query
blocks: ``M = heads · QT · P`` group rows (128 at the defaults) share every key tile it loads. Two
kernels over the visible key groups, heaviest (last) query tiles first:

1. :func:`_row_stats_kernel` — online row max ``m`` and normaliser ``l`` (log2 units) per group row.
2. :func:`_mass_kernel` — ``p = exp2(s - m) / l``; a key tile covers ``KT`` whole key blocks, so its
   ``[M, KT·P]`` probabilities reduce (``tl.reshape`` + two sums) to final ``[heads·QT, KT]`` tile
   masses, stored once (no atomics); key blocks past the causal limit are stored as zeros.

Cost per (batch, query head): about ``(L/S)² / 2`` causal group pairs times ``S·D`` multiply-adds per
pass, i.e. ``L² · D / S`` FLOPs per pass (8.8 TFLOP per pass at 128K tokens, Hq=32, D=128, S=8). Memory: the output ``[B, Hq, NQ, NK]`` fp32 and ``[B, Hq, L/S]`` row stats; no host
synchronisation.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from blocksieve.ops._triton_utils import interpreting, last_dim_contiguous, mma_operand, next_pow2, on_input_device, upcast_dots
from blocksieve.ops.alloc import empty_output

__all__ = ["antidiagonal_mass", "kernel_supports"]

LOG2E = 1.4426950408889634
TARGET_ROWS = 128
"""Group rows per program (query heads of a KV group × query blocks × groups per block)."""
BLOCK_N = 128
"""Key groups per tile (rounded to whole key blocks; at least one block)."""
BLOCK_D = 64
"""Channels of one ``q``/``k`` row per MMA step (the reduction over ``S·D`` loops over them)."""
ZERO_TILE = 64
"""Key blocks per store when zero-filling the blocks past the causal limit."""
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _scores(
    p_qrow, p_krow, o_qrow, o_krow, m_q, m_k, o_d, q_len, kv_len, stride_ql, stride_kl,
    D: tl.constexpr, S: tl.constexpr, BLOCK_D: tl.constexpr, M: tl.constexpr, BN: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """``[M, BN]`` antidiagonal sums ``Σ_i q[o_qrow + S-1-i] · k[o_krow + i]``: ``S`` row pairs × ``D / BLOCK_D`` chunks.

    ``p_qrow [M]`` / ``p_krow [BN]`` point at rows ``o_qrow + S-1`` / ``o_krow`` (channel 0).
    """
    ND: tl.constexpr = (D + BLOCK_D - 1) // BLOCK_D
    acc = tl.zeros([M, BN], dtype=tl.float32)
    for kk in range(S * ND):
        i = kk // ND
        o_dd = (kk % ND) * BLOCK_D + o_d  # [BD]
        m_qi = m_q & (o_qrow + (S - 1 - i) < q_len)  # [M]
        m_ki = m_k & (o_krow + i < kv_len)  # [BN]
        if D % BLOCK_D == 0:
            m_qt, m_kt = m_qi[:, None], m_ki[:, None]
        else:
            m_qt, m_kt = m_qi[:, None] & (o_dd < D)[None, :], m_ki[:, None] & (o_dd < D)[None, :]
        b_q = tl.load(p_qrow[:, None] - i * stride_ql + o_dd[None, :], mask=m_qt, other=0.0)  # [M, BD]
        b_k = tl.load(p_krow[:, None] + i * stride_kl + o_dd[None, :], mask=m_kt, other=0.0)  # [BN, BD]
        acc = tl.dot(mma_operand(b_q, UPCAST), tl.trans(mma_operand(b_k, UPCAST)), acc, input_precision=PREC)
    return acc


@triton.jit
def _tile_rows(
    i_hb, i_t, num_kv_heads, group, q_len, kv_len, n_qgroups, stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, Q, K,
    S: tl.constexpr, PER: tl.constexpr, PP: tl.constexpr, HP: tl.constexpr, QT: tl.constexpr, M: tl.constexpr,
):  # fmt: skip
    """Row bookkeeping of a program: pointers, first row of each group row, validity, query heads, visible key groups."""
    n_hc = tl.cdiv(group, HP)
    i_b = i_hb // (num_kv_heads * n_hc)
    i_kh = (i_hb // n_hc) % num_kv_heads
    i_hc = i_hb % n_hc
    o_m = tl.arange(0, M)  # [M] = (head, query block, group in block)
    o_g = i_hc * HP + o_m // (QT * PP)  # [M] head within the KV group
    o_qb = i_t * QT + (o_m // PP) % QT  # [M] query block
    o_r = o_m % PP
    o_grp = o_qb * PER + o_r  # [M] query group m
    m_q = (o_g < group) & (o_r < PER) & (o_grp < n_qgroups)
    o_h = i_kh * group + o_g  # [M] query head
    o_qrow = o_grp * S  # [M] first q row of the group
    p_qrow = Q + i_b.to(tl.int64) * stride_qb + o_h.to(tl.int64) * stride_qh + (o_qrow + S - 1).to(tl.int64) * stride_ql
    p_k = K + i_b.to(tl.int64) * stride_kb + i_kh.to(tl.int64) * stride_kh
    o_pos = (kv_len - q_len) + o_qrow + S - 1  # [M] position of the group's last row
    last = tl.minimum((i_t + 1) * QT * PER, n_qgroups) - 1
    n_vis = tl.minimum(tl.cdiv(kv_len, S), ((kv_len - q_len) + last * S + S - 1) // S + 1)  # key groups seen
    return i_b, o_h, o_grp, o_qrow, m_q, p_qrow, p_k, o_pos, n_vis


@triton.jit
def _row_stats_kernel(
    Q, K, ML,
    stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
    q_len, kv_len, num_kv_heads, group, n_qgroups, n_qtiles, qk_scale,
    D: tl.constexpr, S: tl.constexpr, PER: tl.constexpr, PP: tl.constexpr, HP: tl.constexpr, QT: tl.constexpr,
    KT: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    M: tl.constexpr = HP * QT * PP
    BN: tl.constexpr = KT * PP
    i_hb = tl.program_id(0)
    i_t = n_qtiles - 1 - tl.program_id(1)  # heaviest tiles first
    i_b, o_h, o_grp, o_qrow, m_q, p_qrow, p_k, o_pos, n_vis = _tile_rows(
        i_hb, i_t, num_kv_heads, group, q_len, kv_len, n_qgroups, stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, Q, K,
        S, PER, PP, HP, QT, M,
    )  # fmt: skip
    o_c = tl.arange(0, BN)  # [BN] = (key block in tile, group in block)
    o_d = tl.arange(0, BLOCK_D)
    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], dtype=tl.float32)
    for kb0 in range(0, tl.cdiv(n_vis, PER), KT):
        o_key = (kb0 + o_c // PP) * PER + o_c % PP  # [BN] key group n
        m_k = (o_c % PP < PER) & (o_key < n_vis)
        o_krow = o_key * S  # [BN] first k row of the group
        b_s = _scores(
            p_qrow, p_k + o_krow.to(tl.int64) * stride_kl, o_qrow, o_krow, m_q, m_k, o_d, q_len, kv_len, stride_ql, stride_kl,
            D, S, BLOCK_D, M, BN, UPCAST, PREC,
        ) * qk_scale  # fmt: skip
        m_vis = m_q[:, None] & m_k[None, :] & (o_key[None, :] * S <= o_pos[:, None])  # [M, BN]
        b_s = tl.where(m_vis, b_s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(b_s, 1))  # [M]
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_use) + tl.sum(tl.exp2(b_s - m_use[:, None]), 1)
        m_i = m_new
    o_row = (i_b * num_kv_heads * group + o_h).to(tl.int64) * n_qgroups + o_grp  # [M] row of [B, Hq, L/S]
    tl.store(ML + 2 * o_row, m_i, mask=m_q)
    tl.store(ML + 2 * o_row + 1, l_i, mask=m_q)


@triton.jit
def _mass_kernel(
    Q, K, ML, OUT,
    stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
    q_len, kv_len, num_kv_heads, group, n_qgroups, n_qtiles, nq, nk, qk_scale,
    D: tl.constexpr, S: tl.constexpr, PER: tl.constexpr, PP: tl.constexpr, HP: tl.constexpr, QT: tl.constexpr,
    KT: tl.constexpr, BLOCK_D: tl.constexpr, ZT: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    M: tl.constexpr = HP * QT * PP
    BN: tl.constexpr = KT * PP
    R: tl.constexpr = HP * QT
    i_hb = tl.program_id(0)
    i_t = n_qtiles - 1 - tl.program_id(1)
    i_b, o_h, o_grp, o_qrow, m_q, p_qrow, p_k, o_pos, n_vis = _tile_rows(
        i_hb, i_t, num_kv_heads, group, q_len, kv_len, n_qgroups, stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, Q, K,
        S, PER, PP, HP, QT, M,
    )  # fmt: skip
    o_row = (i_b * num_kv_heads * group + o_h).to(tl.int64) * n_qgroups + o_grp  # [M]
    b_m = tl.load(ML + 2 * o_row, mask=m_q, other=0.0)  # [M]
    b_l = tl.load(ML + 2 * o_row + 1, mask=m_q, other=1.0)  # [M]
    b_inv = tl.where(m_q & (b_l > 0), 1.0 / b_l, 0.0)  # [M]
    # output rows (head, query block), each normalised by its count of real group rows
    o_rr = tl.arange(0, R)  # [R]
    n_hc = tl.cdiv(group, HP)
    o_hr = ((i_hb // n_hc) % num_kv_heads) * group + (i_hb % n_hc) * HP + o_rr // QT  # [R] query head
    o_qbr = i_t * QT + o_rr % QT  # [R] query block
    m_rr = ((i_hb % n_hc) * HP + o_rr // QT < group) & (o_qbr < nq)
    count = tl.maximum(tl.minimum(n_qgroups - o_qbr * PER, PER), 1).to(tl.float32)  # [R]
    p_out = OUT + ((i_b * num_kv_heads * group + o_hr).to(tl.int64) * nq + o_qbr) * nk  # [R]
    o_c = tl.arange(0, BN)
    o_j = tl.arange(0, KT)  # [KT]
    o_d = tl.arange(0, BLOCK_D)
    n_kb = tl.cdiv(n_vis, PER)
    for kb0 in range(0, n_kb, KT):
        o_key = (kb0 + o_c // PP) * PER + o_c % PP  # [BN]
        m_k = (o_c % PP < PER) & (o_key < n_vis)
        o_krow = o_key * S  # [BN] first k row of the group
        b_s = _scores(
            p_qrow, p_k + o_krow.to(tl.int64) * stride_kl, o_qrow, o_krow, m_q, m_k, o_d, q_len, kv_len, stride_ql, stride_kl,
            D, S, BLOCK_D, M, BN, UPCAST, PREC,
        ) * qk_scale  # fmt: skip
        m_vis = m_q[:, None] & m_k[None, :] & (o_key[None, :] * S <= o_pos[:, None])  # [M, BN]
        b_p = tl.where(m_vis, tl.exp2(b_s - b_m[:, None]) * b_inv[:, None], 0.0)  # [M, BN]
        b_t = tl.sum(tl.sum(tl.reshape(b_p, (R, PP, KT, PP)), 3), 1)  # [R, KT] tile masses
        o_kb = kb0 + o_j
        tl.store(p_out[:, None] + o_kb[None, :], b_t / count[:, None], mask=m_rr[:, None] & (o_kb < nk)[None, :])
    o_z = tl.arange(0, ZT)  # [ZT]
    for kb0 in range(tl.cdiv(n_kb, KT) * KT, nk, ZT):
        o_kb = kb0 + o_z
        tl.store(p_out[:, None] + o_kb[None, :], tl.zeros([R, ZT], tl.float32), mask=m_rr[:, None] & (o_kb < nk)[None, :])


def kernel_supports(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether :func:`antidiagonal_mass` accepts these inputs (the device aside)."""
    dtype_ok = q.dtype in SUPPORTED_DTYPES and k.dtype == q.dtype
    return dtype_ok and q.dim() == k.dim() == 4 and 0 < q.shape[2] <= k.shape[2] and q.shape[1] % k.shape[1] == 0


def _check(q: torch.Tensor, k: torch.Tensor, block: int, stride: int) -> None:
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q must be [B, Hq, Lq, D] and k [B, Hkv, Lkv, D] with the same B and D, got {tuple(q.shape)}, {tuple(k.shape)}"
        )
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"k has {k.shape[1]} heads, q has {q.shape[1]}: Hq must be a multiple of Hkv")
    if not 0 < q.shape[2] <= k.shape[2]:
        raise ValueError(f"q has {q.shape[2]} rows and k {k.shape[2]} keys: right-aligned causal queries need 0 < Lq <= Lkv")
    if stride <= 0 or block <= 0 or block % stride:
        raise ValueError(f"block={block} must be a positive multiple of stride={stride}")
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype:
        raise ValueError(f"q, k have dtypes {q.dtype}, {k.dtype}: pass one of {SUPPORTED_DTYPES} for both")
    if q.device.type != "cuda" and not interpreting():
        raise ValueError(f"q is on {q.device}: the kernel needs CUDA (or TRITON_INTERPRET=1); use backend='torch'")


@on_input_device
def antidiagonal_mass(q: torch.Tensor, k: torch.Tensor, block: int, stride: int, scale: float) -> torch.Tensor:
    """XAttention's normalised block mass of every query block (module docstring).

    Args:
        q: ``[B, Hq, Lq, D]`` fp16/bf16/fp32; k: ``[B, Hkv, Lkv, D]`` of the same dtype, ``Lq <= Lkv``
            (queries right-aligned), ``Hq % Hkv == 0``.
        block: tile size ``B_t`` in tokens (query and key blocks); stride: ``S``, dividing ``block``.
        scale: the softmax scale before the ``1/S`` of the antidiagonal sum (``D**-0.5`` usually).
    Returns:
        ``[B, Hq, NQ, NK]`` fp32 with ``NQ = ceil(Lq / block)``, ``NK = ceil(Lkv / block)``: as
        ``antidiagonal_block_mass(*antidiagonal_pool(q, k, stride), 0, NQ, block, stride, Lq, Lkv, scale)``.

    Example:
        >>> mass = antidiagonal_mass(q, k, block=128, stride=8, scale=q.shape[-1] ** -0.5)
    """
    _check(q, k, block, stride)
    b, hq, lq, d = q.shape
    hkv, lkv = k.shape[1], k.shape[2]
    group, per = hq // hkv, block // stride
    pp = next_pow2(per)
    hp = min(next_pow2(group), max(1, TARGET_ROWS // pp))
    qt = max(1, TARGET_ROWS // (hp * pp))
    while hp * qt * pp < 16:
        qt *= 2
    kt = max(1, BLOCK_N // pp, 16 // pp)
    n_qgroups, nq, nk = math.ceil(lq / stride), math.ceil(lq / block), math.ceil(lkv / block)
    n_qtiles = math.ceil(nq / qt)
    grid = (b * hkv * math.ceil(group / hp), n_qtiles)
    meta = {
        "D": d, "S": stride, "PER": per, "PP": pp, "HP": hp, "QT": qt, "KT": kt,
        "BLOCK_D": min(BLOCK_D, max(16, next_pow2(d))),
        "UPCAST": upcast_dots(q.dtype),
        "PREC": "ieee" if q.dtype == torch.float32 else "tf32",
        "num_warps": 8 if hp * qt * pp * kt * pp >= 128 * 64 else 4,
        "num_stages": 3,
    }  # fmt: skip
    q, k = last_dim_contiguous(q), last_dim_contiguous(k)
    args = (*q.stride()[:3], *k.stride()[:3], lq, lkv, hkv, group, n_qgroups, n_qtiles)
    qk_scale = float(scale) / stride * LOG2E
    stats = empty_output(b, hq, n_qgroups, 2, dtype=torch.float32, device=q.device)  # (max, normaliser) in log2 units
    _row_stats_kernel[grid](q, k, stats, *args, qk_scale, **meta)
    out = empty_output(b, hq, nq, nk, dtype=torch.float32, device=q.device)
    _mass_kernel[grid](q, k, stats, out, *args, nq, nk, qk_scale, ZT=ZERO_TILE, **meta)
    return out
