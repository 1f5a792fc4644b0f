"""Attention that walks key blocks in a given order and stops early (S2O's execution).

Each query block has an ordered list of key blocks: ``order`` int32 ``[B, Hq, NQ, K]`` (valid ids
first, in reading order, -1 padded), of which the first ``forced[b, h, n]`` are always read (the
dense intra-segment part, which seeds the running max and sum). After each later block the
program checks the block's share of the normaliser, ``Σ_j exp(s_ij - m_i) / l_i`` (after the
update), for every valid row of the tile; once the largest share is below ``tau`` it stops and
reads no more blocks. The block that triggered the stop has been read and counts.

Two implementations of the same rule:

* :func:`early_stop_torch` — PyTorch, vectorised over all query blocks and heads, one step per
  list position (the loop ends when every query block has stopped); runs anywhere.
* :func:`early_stop_triton` — a Triton kernel, one program per (query block, head), with a
  ``while`` loop that leaves as soon as its tile stops; CUDA, or the CPU under ``TRITON_INTERPRET=1``.

Both return ``(out [B, Hq, Lq, D] or None, lse [B, Hq, Lq] fp32, n_read int32 [B, Hq, NQ])``;
``v=None`` computes only the normaliser and the stop points (selection without values).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from blocksieve.layout import query_positions
from blocksieve.ops._triton_utils import interpreting, last_dim_contiguous, on_input_device
from blocksieve.ops.alloc import empty_output
from blocksieve.ops.checks import resolve_scale

LOG2E = 1.4426950408889634


def _check(q, k, order, forced, block_q, block_k):
    b, hq, lq, d = q.shape
    nq = math.ceil(lq / block_q)
    if order.dim() != 4 or tuple(order.shape[:3]) != (b, hq, nq):
        raise ValueError(f"order must be [B={b}, Hq={hq}, NQ={nq}, K] (one list per query head and block), got {tuple(order.shape)}")
    if tuple(forced.shape) != (b, hq, nq):
        raise ValueError(f"forced must be [B, Hq, NQ] = {(b, hq, nq)}, got {tuple(forced.shape)}")
    if hq % k.shape[1]:
        raise ValueError(f"k has {k.shape[1]} heads, q has {hq}: Hq must be a multiple of Hkv")


def early_stop_torch(
    q: torch.Tensor, k: torch.Tensor, v: Optional[torch.Tensor], order: torch.Tensor, forced: torch.Tensor,
    tau: float, block_q: int, block_k: int, scale: Optional[float] = None, causal: bool = True,
) -> tuple:
    """PyTorch early-stopping attention (see module docstring); fp32 arithmetic.

    Query blocks of all heads are flattened into ``R = B · Hq · NQ`` row groups; step ``j`` gathers
    the ``j``-th listed key block only for the groups still reading, so the work follows the blocks
    actually read.
    """
    _check(q, k, order, forced, block_q, block_k)
    b, hq, lq, d = q.shape
    hkv, lkv = k.shape[1], k.shape[2]
    g, nq, kmax = hq // hkv, order.shape[2], order.shape[3]
    nk = math.ceil(lkv / block_k)
    scale = resolve_scale(scale, d)
    dev = q.device
    n_rows = b * hq * nq
    qp = (F.pad(q.float(), (0, 0, 0, nq * block_q - lq)) * scale).reshape(n_rows, block_q, d)
    kp = F.pad(k.float(), (0, 0, 0, nk * block_k - lkv)).reshape(b * hkv * nk, block_k, d)
    vp = None if v is None else F.pad(v.float(), (0, 0, 0, nk * block_k - lkv)).reshape(b * hkv * nk, block_k, d)
    qpos = F.pad(query_positions(lq, lkv, dev), (0, nq * block_q - lq), value=-1).reshape(nq, block_q)
    qpos = qpos.expand(b * hq, nq, block_q).reshape(n_rows, block_q)
    row_ok = qpos >= 0
    kv_base = ((torch.arange(b, device=dev)[:, None] * hkv + torch.arange(hq, device=dev)[None, :] // g) * nk)
    kv_base = kv_base[:, :, None].expand(b, hq, nq).reshape(n_rows)  # first key block of each group's KV head
    order_f, forced_f = order.reshape(n_rows, kmax).long(), forced.reshape(n_rows)
    m = torch.full((n_rows, block_q), float("-inf"), device=dev)
    l = torch.zeros_like(m)
    acc = None if v is None else torch.zeros(n_rows, block_q, d, device=dev)
    active = torch.ones(n_rows, dtype=torch.bool, device=dev)
    n_read = torch.zeros(n_rows, dtype=torch.int32, device=dev)
    offs = torch.arange(block_k, device=dev)
    for j in range(kmax):
        rows = torch.nonzero(active & (order_f[:, j] >= 0)).flatten()
        if rows.numel() == 0:
            break
        blk = order_f[rows, j]
        s = torch.matmul(qp[rows], kp[kv_base[rows] + blk].transpose(-1, -2))  # [r, bq, bk]
        kpos = blk[:, None] * block_k + offs  # [r, bk]
        vis = (kpos < lkv)[:, None, :] & row_ok[rows][:, :, None]
        if causal:
            vis = vis & (kpos[:, None, :] <= qpos[rows][:, :, None])
        s = s.masked_fill(~vis, float("-inf"))
        m_old = m[rows]
        m_new = torch.maximum(m_old, s.amax(-1))
        m_use = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
        p = torch.exp(s - m_use[..., None])
        alpha = torch.exp(m_old - m_use)
        part = p.sum(-1)
        l_new = l[rows] * alpha + part
        l[rows], m[rows] = l_new, m_new
        if acc is not None:
            acc[rows] = acc[rows] * alpha[..., None] + torch.matmul(p, vp[kv_base[rows] + blk])
        n_read[rows] += 1
        share = torch.where(row_ok[rows] & (l_new > 0), part / l_new.clamp_min(1e-30), torch.zeros_like(l_new)).amax(-1)
        active[rows[(j >= forced_f[rows]) & (share < tau)]] = False
    lse = torch.where(l > 0, m + torch.log(l.clamp_min(1e-30)), torch.full_like(l, float("-inf")))
    lse = lse.reshape(b, hq, nq * block_q)[..., :lq]
    out = None
    if acc is not None:
        out = (acc / l.clamp_min(1e-30)[..., None]).reshape(b, hq, nq * block_q, d)[:, :, :lq].to(q.dtype)
    return out, lse, n_read.reshape(b, hq, nq)


@triton.jit
def _early_stop_kernel(
    Q, K, V, O, LSE, ORDER, FORCED, NREAD,
    stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
    stride_ob, stride_oh, stride_ol, stride_ib, stride_ih, stride_in,
    q_len, kv_len, num_heads, group, nq, kmax, qk_scale, tau,
    D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, HAS_V: tl.constexpr, CAUSAL: tl.constexpr,
):
    i_n = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // num_heads
    i_h = i_bh % num_heads
    i_kh = i_h // group
    o_r = tl.arange(0, BLOCK_Q)  # [BQ]
    o_c = tl.arange(0, BLOCK_K)  # [BK]
    o_d = tl.arange(0, D)  # [D]
    o_i = i_n * BLOCK_Q + o_r  # [BQ] query row
    m_row = o_i < q_len
    o_pos = kv_len - q_len + o_i  # [BQ] absolute position
    b64, h64, kh64 = i_b.to(tl.int64), i_h.to(tl.int64), i_kh.to(tl.int64)
    p_q = Q + b64 * stride_qb + h64 * stride_qh + o_i.to(tl.int64)[:, None] * stride_ql + o_d[None, :]
    b_q = tl.load(p_q, mask=m_row[:, None], other=0.0)  # [BQ, D]
    p_k = K + b64 * stride_kb + kh64 * stride_kh
    p_v = V + b64 * stride_vb + kh64 * stride_vh
    p_idx = ORDER + b64 * stride_ib + h64 * stride_ih + i_n.to(tl.int64) * stride_in
    meta = (i_b * num_heads + i_h) * nq + i_n
    n_forced = tl.load(FORCED + meta)
    m_i = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_Q], 0.0, tl.float32)
    acc = tl.full([BLOCK_Q, D], 0.0, tl.float32)
    j = 0
    blk = tl.load(p_idx)
    go = (kmax > 0) & (blk >= 0)
    while go:
        o_key = blk * BLOCK_K + o_c  # [BK]
        m_key = o_key < kv_len
        o_kv = o_key.to(tl.int64)
        b_k = tl.load(p_k + o_kv[:, None] * stride_kl + o_d[None, :], mask=m_key[:, None], other=0.0)  # [BK, D]
        b_s = tl.dot(b_q, tl.trans(b_k)) * qk_scale  # [BQ, BK] log2 units
        m_vis = m_key[None, :] & m_row[:, None]
        if CAUSAL:
            m_vis = m_vis & (o_key[None, :] <= o_pos[:, None])
        b_s = tl.where(m_vis, b_s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(b_s, 1))  # [BQ]
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        b_p = tl.exp2(b_s - m_use[:, None])  # [BQ, BK]
        alpha = tl.exp2(m_i - m_use)
        part = tl.sum(b_p, 1)  # [BQ]
        l_i = l_i * alpha + part
        if HAS_V:
            b_v = tl.load(p_v + o_kv[:, None] * stride_vl + o_d[None, :], mask=m_key[:, None], other=0.0)  # [BK, D]
            acc = acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v)
        m_i = m_new
        share = tl.where(m_row & (l_i > 0), part / tl.maximum(l_i, 1e-30), 0.0)
        stop = (j >= n_forced) & (tl.max(share, 0) < tau)
        j += 1
        blk = tl.load(p_idx + j, mask=j < kmax, other=-1)
        go = (j < kmax) & (blk >= 0) & (stop == 0)
    tl.store(NREAD + meta, j)
    lse = tl.where(l_i > 0, (m_i + tl.log2(tl.maximum(l_i, 1e-30))) * 0.6931471805599453, float("-inf"))
    tl.store(LSE + (i_b * num_heads + i_h).to(tl.int64) * q_len + o_i, lse, mask=m_row)
    if HAS_V:
        out = acc / tl.maximum(l_i, 1e-30)[:, None]
        p_o = O + b64 * stride_ob + h64 * stride_oh + o_i.to(tl.int64)[:, None] * stride_ol + o_d[None, :]
        tl.store(p_o, out.to(O.dtype.element_ty), mask=m_row[:, None])


@on_input_device
def early_stop_triton(
    q: torch.Tensor, k: torch.Tensor, v: Optional[torch.Tensor], order: torch.Tensor, forced: torch.Tensor,
    tau: float, block_q: int, block_k: int, scale: Optional[float] = None, causal: bool = True,
) -> tuple:
    """Triton early-stopping attention (see module docstring); fp16/bf16, ``D`` a power of two >= 16."""
    _check(q, k, order, forced, block_q, block_k)
    if q.device.type != "cuda" and not interpreting():
        raise ValueError(f"q is on {q.device}: early_stop_triton needs CUDA (or TRITON_INTERPRET=1); use early_stop_torch")
    b, hq, lq, d = q.shape
    nq, kmax = order.shape[2], order.shape[3]
    q, k = last_dim_contiguous(q), last_dim_contiguous(k)
    vv = k if v is None else last_dim_contiguous(v)
    order = order.to(torch.int32).contiguous()
    forced = forced.to(torch.int32).contiguous()
    out = empty_output(*q.shape, dtype=q.dtype, device=q.device) if v is not None else q.new_empty(1, 1, 1, d)
    lse = empty_output(b, hq, lq, dtype=torch.float32, device=q.device)
    n_read = torch.full((b, hq, nq), -1, dtype=torch.int32, device=q.device)
    _early_stop_kernel[(nq, b * hq)](
        q, k, vv, out, lse, order, forced, n_read,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        vv.stride(0), vv.stride(1), vv.stride(2), out.stride(0), out.stride(1), out.stride(2),
        order.stride(0), order.stride(1), order.stride(2),
        lq, k.shape[2], hq, hq // k.shape[1], nq, kmax, resolve_scale(scale, d) * LOG2E, float(tau),
        D=d, BLOCK_Q=block_q, BLOCK_K=block_k, HAS_V=v is not None, CAUSAL=causal,
    )
    return (out if v is not None else None), lse, n_read


def early_stop_attention(q, k, v, order, forced, tau, block_q, block_k, scale=None, causal=True, backend="auto") -> tuple:
    """Dispatch: ``"triton"`` on CUDA (``"auto"``), ``"torch"`` elsewhere."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend={backend!r} is not one of ('auto', 'triton', 'torch')")
    use_triton = backend == "triton" or (backend == "auto" and q.is_cuda)
    fn = early_stop_triton if use_triton else early_stop_torch
    return fn(q, k, v, order, forced, tau, block_q, block_k, scale, causal)
