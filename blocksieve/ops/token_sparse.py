"""Token-sparse attention (Triton) over a :class:`~blocksieve.layout.TokenLayout`.

Each program serves one query row of one layout head and gathers that row's selected K/V rows
by index, ``BLOCK_N`` at a time. For a group-shared layout (``H == Hkv``) the program stacks the
``G`` query heads of the group in the M dimension of the tile, so each gathered KV row is loaded
once for all of them. The same kernel does prefill (many rows, one split) and decode
(``Lq`` = 1..16): when there are too few rows to fill the GPU the selected tokens are split over
several programs (flash-decoding) that write normalised partial outputs and their LSE, and a
second kernel combines them: ``out = sum_s exp(lse_s - lse) * out_s``, ``lse = logsumexp_s lse_s``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from blocksieve.layout import TokenLayout
from blocksieve.ops._triton_utils import (
    check_kernel_inputs,
    interpreting,
    last_dim_contiguous,
    mma_operand,
    next_pow2,
    on_input_device,
    sm_count,
    upcast_dots,
)
from blocksieve.ops.alloc import empty_output
from blocksieve.ops.checks import resolve_scale

__all__ = ["token_sparse_attention"]

LOG2E = 1.4426950408889634
MIN_TOKENS_PER_SPLIT = 128


@triton.jit
def _token_sparse_fwd_kernel(
    Q, K, V, O, LSE, IDX,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_os, stride_ob, stride_oh, stride_ol,
    stride_ls, stride_lb, stride_lh,
    stride_ib, stride_ih, stride_il,
    q_len, kv_len, n_layout_heads, group, heads_per_layout, n_sel, split_len, qk_scale,
    D: tl.constexpr, HEADS: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
):
    i_i = tl.program_id(0)  # query rows on the x axis: up to 2^31 - 1 (y and z stop at 65,535)
    i_bh = tl.program_id(1)
    i_s = tl.program_id(2)
    i_b = i_bh // n_layout_heads
    i_lh = i_bh % n_layout_heads
    i_hkv = (i_lh * heads_per_layout) // group
    b64 = i_b.to(tl.int64)

    o_g = tl.arange(0, HEADS)  # [HEADS] query head within the layout head's group
    o_d = tl.arange(0, D)  # [D]
    o_c = tl.arange(0, BLOCK_N)  # [BLOCK_N]
    m_row = o_g < heads_per_layout  # [HEADS]
    o_hq = (i_lh * heads_per_layout + o_g).to(tl.int64)  # [HEADS]
    pos = kv_len - q_len + i_i

    p_q = Q + b64 * stride_qb + o_hq[:, None] * stride_qh + i_i.to(tl.int64) * stride_ql + o_d[None, :]  # [HEADS, D]
    b_q = tl.load(p_q, mask=m_row[:, None], other=0.0)  # [HEADS, D]
    p_idx = IDX + b64 * stride_ib + i_lh.to(tl.int64) * stride_ih + i_i.to(tl.int64) * stride_il
    p_k = K + b64 * stride_kb + i_hkv.to(tl.int64) * stride_kh
    p_v = V + b64 * stride_vb + i_hkv.to(tl.int64) * stride_vh

    m_i = tl.full([HEADS], float("-inf"), tl.float32)
    l_i = tl.zeros([HEADS], tl.float32)
    acc = tl.zeros([HEADS, D], tl.float32)
    lo = i_s * split_len
    hi = tl.minimum(lo + split_len, n_sel)
    o_n = lo + o_c  # [BLOCK_N] slot in the row's token list
    b_tok = tl.load(p_idx + o_n, mask=o_n < hi, other=-1)  # [BLOCK_N] absolute key positions
    for _ in range(lo, hi, BLOCK_N):
        m_key = (b_tok >= 0) & (b_tok < kv_len)  # [BLOCK_N]
        if CAUSAL:
            m_key = m_key & (b_tok <= pos)
        o_kv = b_tok.to(tl.int64)
        b_k = tl.load(p_k + o_kv[:, None] * stride_kl + o_d[None, :], mask=m_key[:, None], other=0.0)  # [BLOCK_N, D]
        b_v = tl.load(p_v + o_kv[:, None] * stride_vl + o_d[None, :], mask=m_key[:, None], other=0.0)  # [BLOCK_N, D]
        o_n += BLOCK_N
        b_tok = tl.load(p_idx + o_n, mask=o_n < hi, other=-1)  # [BLOCK_N] next chunk, loaded one step ahead
        b_s = tl.dot(mma_operand(b_q, UPCAST), mma_operand(tl.trans(b_k), UPCAST)) * qk_scale  # [HEADS, BLOCK_N]
        b_s = tl.where(m_key[None, :], b_s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(b_s, 1))  # [HEADS]
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        b_p = tl.exp2(b_s - m_use[:, None])  # [HEADS, BLOCK_N]
        alpha = tl.exp2(m_i - m_use)  # [HEADS]
        l_i = l_i * alpha + tl.sum(b_p, 1)
        acc = tl.dot(mma_operand(b_p.to(b_v.dtype), UPCAST), mma_operand(b_v, UPCAST), acc * alpha[:, None])  # [HEADS, D]
        m_i = m_new

    m_empty = l_i == 0.0  # [HEADS]
    b_o = acc / tl.where(m_empty, 1.0, l_i)[:, None]  # [HEADS, D]
    b_lse = tl.where(m_empty, float("-inf"), (m_i + tl.log2(tl.where(m_empty, 1.0, l_i))) * 0.6931471805599453)
    o_out = i_s.to(tl.int64) * stride_os + b64 * stride_ob + i_i.to(tl.int64) * stride_ol
    tl.store(O + o_out + o_hq[:, None] * stride_oh + o_d[None, :], b_o.to(O.dtype.element_ty), mask=m_row[:, None])
    o_lse = i_s.to(tl.int64) * stride_ls + b64 * stride_lb + i_i.to(tl.int64)
    tl.store(LSE + o_lse + o_hq * stride_lh, b_lse, mask=m_row)


@triton.jit
def _combine_splits_kernel(
    OP, LP, O, LSE, n_rows, n_splits,
    D: tl.constexpr, SPLITS: tl.constexpr,
):
    """Merge ``n_splits`` normalised partials ``OP [S, R, D]``, ``LP [S, R]`` into ``O [R, D]``, ``LSE [R]``."""
    i_r = tl.program_id(0).to(tl.int64)
    o_s = tl.arange(0, SPLITS)  # [SPLITS]
    o_d = tl.arange(0, D)  # [D]
    m_s = o_s < n_splits  # [SPLITS]
    b_l = tl.load(LP + o_s * n_rows + i_r, mask=m_s, other=float("-inf"))  # [SPLITS]
    b_m = tl.max(b_l, 0)
    b_m = tl.where(b_m == float("-inf"), 0.0, b_m)
    b_w = tl.exp(b_l - b_m)  # [SPLITS]
    b_sum = tl.sum(b_w, 0)
    p_o = OP + (o_s.to(tl.int64) * n_rows + i_r)[:, None] * D + o_d[None, :]  # [SPLITS, D]
    b_o = tl.load(p_o, mask=m_s[:, None], other=0.0)  # [SPLITS, D]
    b_out = tl.sum(b_o * b_w[:, None], 0) / tl.where(b_sum == 0.0, 1.0, b_sum)  # [D]
    tl.store(O + i_r * D + o_d, b_out.to(O.dtype.element_ty))
    tl.store(LSE + i_r, tl.where(b_sum == 0.0, float("-inf"), b_m + tl.log(tl.where(b_sum == 0.0, 1.0, b_sum))))


def _num_splits(rows: int, n_sel: int, block_n: int, sms: int) -> tuple:
    """``(n_splits, split_len)``: split the token list when ``rows`` programs cannot fill ``sms``."""
    want = max(1, min(triton.cdiv(4 * sms, rows), triton.cdiv(n_sel, MIN_TOKENS_PER_SPLIT)))
    split_len = triton.cdiv(triton.cdiv(n_sel, want), block_n) * block_n
    return triton.cdiv(n_sel, split_len), split_len


@on_input_device
def _token_sparse_fwd_impl(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor, causal: bool, scale: float
) -> tuple:
    b, hq, q_len, d = q.shape
    hkv, kv_len = k.shape[1], k.shape[2]
    h_lay, n_sel = indices.shape[1], indices.shape[3]
    heads_per_layout = hq // h_lay
    block_n = 32 if d == 256 or interpreting() else 64
    n_splits, split_len = _num_splits(b * h_lay * q_len, n_sel, block_n, sm_count(q))
    out = empty_output(b, hq, q_len, d, dtype=q.dtype, device=q.device)
    lse = empty_output(b, hq, q_len, dtype=torch.float32, device=q.device)
    if n_splits == 1:
        o_part, l_part = out[None], lse[None]
    else:
        o_part = empty_output(n_splits, b, hq, q_len, d, dtype=torch.float32, device=q.device)
        l_part = empty_output(n_splits, b, hq, q_len, dtype=torch.float32, device=q.device)
    _token_sparse_fwd_kernel[(q_len, b * h_lay, n_splits)](
        q, k, v, o_part, l_part, indices,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o_part.stride(0), o_part.stride(1), o_part.stride(2), o_part.stride(3),
        l_part.stride(0), l_part.stride(1), l_part.stride(2),
        indices.stride(0), indices.stride(1), indices.stride(2),
        q_len, kv_len, h_lay, hq // hkv, heads_per_layout, n_sel, split_len, scale * LOG2E,
        D=d, HEADS=max(16, next_pow2(heads_per_layout)), BLOCK_N=block_n, CAUSAL=causal,
        UPCAST=upcast_dots(q.dtype), num_warps=4, num_stages=3,
    )
    if n_splits > 1:
        rows = b * hq * q_len
        _combine_splits_kernel[(rows,)](o_part, l_part, out, lse, rows, n_splits, D=d, SPLITS=next_pow2(n_splits), num_warps=4)
    return out, lse


@torch.library.custom_op("blocksieve::token_sparse_fwd", mutates_args=())
def _token_sparse_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return _token_sparse_fwd_impl(q, k, v, indices, causal, scale)


@_token_sparse_fwd_op.register_fake
def _(q, k, v, indices, causal, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


def token_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout, scale: Optional[float] = None
) -> tuple:
    """Attention over the key tokens a :class:`TokenLayout` keeps (Triton, forward only).

    Args:
        q: ``[B, Hq, Lq, D]`` float16 / bfloat16, ``D`` in {64, 128, 256}; prefill (any ``Lq``)
            or decode (``Lq`` = 1..16, split over the selected tokens).
        k, v: ``[B, Hkv, Lkv, D]``, same dtype and device; ``Hq % Hkv == 0``.
        layout: TokenLayout with ``H`` in {Hq, Hkv}; ``indices [B, H, Lq, K]`` absolute key
            positions, -1 padded. Positions past the causal limit or ``kv_len`` are ignored.
        scale: softmax scale, default ``1/sqrt(D)``.

    Returns:
        ``(out [B, Hq, Lq, D]`` in q's dtype, ``lse [B, Hq, Lq]`` float32 natural log);
        rows that keep no key give ``out = 0``, ``lse = -inf``.

    Example:
        >>> idx = torch.arange(2048, device="cuda", dtype=torch.int32).expand(8, 8, 1, 2048)
        >>> lay = TokenLayout(idx.contiguous(), q_len=1, kv_len=131072, causal=True)
        >>> out, lse = token_sparse_attention(q, k_cache, v_cache, lay)  # q [8, 32, 1, 128]
    """
    if not isinstance(layout, TokenLayout):
        raise TypeError(f"layout must be a TokenLayout, got {type(layout).__name__}; use block_sparse_attention for BlockLayout")
    check_kernel_inputs(q, k, v, layout)
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    return _token_sparse_fwd_op(q, k, v, last_dim_contiguous(layout.indices), layout.causal, resolve_scale(scale, q.shape[-1]))
