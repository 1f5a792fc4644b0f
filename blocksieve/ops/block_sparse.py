"""Block-sparse attention forward (Triton) over a :class:`~blocksieve.layout.BlockLayout`.

One program computes one tile of ``BLOCK_M = HEADS * ROWS`` query rows: ``ROWS`` consecutive rows
of one query block for ``HEADS`` query heads that share a KV head (``HEADS > 1`` only for
group-shared layouts, where the stacked heads read the same key blocks, so each KV tile is loaded
once for all of them). It walks the layout's selected key blocks as one concatenated list of
key slots, ``BLOCK_N`` slots per MMA tile: key blocks smaller than the tile (16, 32) are gathered
several to a tile, larger ones are split. Online softmax in base 2 (FlashAttention-2).

Key tiles come in one of two ways. On Hopper (and in the interpreter), when a key block is at least
one tile wide and K/V are contiguous ``[B, H, L, D]``, the tensor memory accelerator copies each
tile from a ``[B*H*L, D]`` descriptor (no per-row addresses in registers); on an H200 this took the
full-density rate from 0.75 to 0.88 of cuDNN at 32K (docs/dev/kernel_notes.md, v4). Otherwise
(16/32-key blocks, strided K/V views, older GPUs) rows are gathered through pointers.

Tiles whose keys are all visible to every row of the program run without any mask; only the
tail of the list (blocks that straddle the causal diagonal or the end of the keys, at most
``block_q / block_k + 2`` entries in a valid causal layout) pays for token masking.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from blocksieve.layout import BlockLayout
from blocksieve.ops._triton_utils import (
    check_kernel_inputs,
    interpreting,
    last_dim_contiguous,
    mma_operand,
    next_pow2,
    on_input_device,
    row_view,
    tma_available,
    upcast_dots,
)
from blocksieve.ops.alloc import empty_output
from blocksieve.ops.checks import resolve_scale

__all__ = ["block_sparse_attention"]

SUPPORTED_BLOCK_Q = (64, 128)
SUPPORTED_BLOCK_K = (16, 32, 64, 128)
LOG2E = 1.4426950408889634


@triton.jit
def _attend_tiles(
    acc, l_i, m_i, b_q, p_idx, cnt, p_k, p_v, stride_kl, stride_vl, desc_k, desc_v, row0, o_pos, t_lo, t_hi, kv_len,
    qk_scale, D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    CAUSAL: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr, WS: tl.constexpr,
):
    """Online-softmax update over key-slot tiles ``[t_lo, t_hi)``; token masks only when ``MASKED``.

    ``TMA``: each tile is one contiguous run of ``BLOCK_N <= BLOCK_K`` keys, copied by the tensor
    memory accelerator from ``desc_k`` / ``desc_v`` (``[rows, D]`` views whose row of key ``j`` is
    ``row0 + j``); otherwise rows are gathered through ``p_k`` / ``p_v`` pointers. ``WS``: Triton's
    warp specialisation of the loop (loads, MMAs and softmax in separate warp groups).
    The block ids of the next tile are loaded one iteration ahead and carried in the loop: loaded
    inside the iteration that uses them, Triton 3.6 pipelining (``num_stages >= 2``, wgmma) gave
    wrong results on an H200 (docs/dev/kernel_notes.md, v0).
    """
    o_d = tl.arange(0, D)  # [D]
    o_n = tl.arange(0, BLOCK_N)  # [BLOCK_N]
    if TMA:
        s_0 = t_lo * BLOCK_N  # first slot of the tile
        blk = tl.load(p_idx + s_0 // BLOCK_K, mask=s_0 // BLOCK_K < cnt, other=0)  # block id of the tile
    else:
        o_s = t_lo * BLOCK_N + o_n  # [BLOCK_N] slot in the concatenated selected blocks
        b_blk = tl.load(p_idx + o_s // BLOCK_K, mask=o_s // BLOCK_K < cnt, other=0)  # [BLOCK_N] block id of each slot
    for _ in tl.range(t_lo, t_hi, warp_specialize=WS):
        if TMA:
            key_0 = blk * BLOCK_K + s_0 % BLOCK_K
            o_key = key_0 + o_n  # [BLOCK_N] absolute key position
            b_k = desc_k.load([row0 + key_0, 0])  # [BLOCK_N, D]
            b_v = desc_v.load([row0 + key_0, 0])  # [BLOCK_N, D]
            if MASKED:  # rows past kv_len belong to the next head (or are TMA's zero fill)
                m_key = o_key < kv_len  # [BLOCK_N]
                b_v = tl.where(m_key[:, None], b_v, 0.0)
            s_0 += BLOCK_N
            blk = tl.load(p_idx + s_0 // BLOCK_K, mask=s_0 // BLOCK_K < cnt, other=0)  # next tile's id
        else:
            o_key = b_blk * BLOCK_K + o_s % BLOCK_K  # [BLOCK_N] absolute key position
            o_kv = o_key.to(tl.int64)
            if MASKED:
                m_key = (o_s // BLOCK_K < cnt) & (o_key < kv_len)  # [BLOCK_N]
                b_k = tl.load(p_k + o_kv[:, None] * stride_kl + o_d[None, :], mask=m_key[:, None], other=0.0)  # [BLOCK_N, D]
                b_v = tl.load(p_v + o_kv[:, None] * stride_vl + o_d[None, :], mask=m_key[:, None], other=0.0)  # [BLOCK_N, D]
            else:
                b_k = tl.load(p_k + o_kv[:, None] * stride_kl + o_d[None, :])  # [BLOCK_N, D]
                b_v = tl.load(p_v + o_kv[:, None] * stride_vl + o_d[None, :])  # [BLOCK_N, D]
            o_s += BLOCK_N
            b_blk = tl.load(p_idx + o_s // BLOCK_K, mask=o_s // BLOCK_K < cnt, other=0)  # [BLOCK_N] next tile's ids
        b_s = tl.dot(mma_operand(b_q, UPCAST), mma_operand(tl.trans(b_k), UPCAST))  # [BLOCK_M, BLOCK_N] raw scores
        if MASKED:
            m_vis = m_key[None, :]  # [1, BLOCK_N]
            if CAUSAL:
                m_vis = m_vis & (o_key[None, :] <= o_pos[:, None])  # [BLOCK_M, BLOCK_N]
            b_s = tl.where(m_vis, b_s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(b_s, 1) * qk_scale)  # [BLOCK_M] running max in log2 units
        if MASKED:
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        else:
            m_use = m_new
        b_p = tl.exp2(b_s * qk_scale - m_use[:, None])  # [BLOCK_M, BLOCK_N] one FMA + exp2 per score
        alpha = tl.exp2(m_i - m_use)  # [BLOCK_M]
        l_i = l_i * alpha + tl.sum(b_p, 1)
        acc = tl.dot(mma_operand(b_p.to(b_v.dtype), UPCAST), mma_operand(b_v, UPCAST), acc * alpha[:, None])  # [BLOCK_M, D]
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _block_sparse_fwd_kernel(
    Q, K, V, O, LSE, IDX, CNT, DESC_K, DESC_V,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_ob, stride_oh, stride_ol,
    stride_lb, stride_lh,
    stride_ib, stride_ih, stride_iq,
    stride_cb, stride_ch, stride_cq,
    q_len, kv_len, n_layout_heads, group, heads_per_layout, n_row_chunks, n_head_chunks, n_q_blocks, qk_scale,
    D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, ROWS: tl.constexpr, HEADS: tl.constexpr,
    BLOCK_N: tl.constexpr, NTAIL: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr,
    WS: tl.constexpr,
):
    BLOCK_M: tl.constexpr = HEADS * ROWS
    i_bh = tl.program_id(0)
    i_m = tl.program_id(1)
    i_b = i_bh // n_layout_heads
    i_lh = i_bh % n_layout_heads
    per_block = n_row_chunks * n_head_chunks
    i_qb = n_q_blocks - 1 - i_m // per_block  # late (heavier, causal) query blocks first
    i_rc = (i_m % per_block) // n_head_chunks
    i_hc = i_m % n_head_chunks
    i_hkv = (i_lh * heads_per_layout) // group

    o_r = tl.arange(0, BLOCK_M)  # [BLOCK_M]
    o_d = tl.arange(0, D)  # [D]
    o_g = i_hc * HEADS + o_r // ROWS  # [BLOCK_M] head within the layout head's group
    o_i = i_qb * BLOCK_Q + i_rc * ROWS + o_r % ROWS  # [BLOCK_M] query row
    m_row = (o_g < heads_per_layout) & (o_i < q_len)  # [BLOCK_M]
    o_hq = (i_lh * heads_per_layout + o_g).to(tl.int64)  # [BLOCK_M] query head
    o_i64 = o_i.to(tl.int64)
    o_pos = kv_len - q_len + o_i  # [BLOCK_M] absolute key position of each row
    b64 = i_b.to(tl.int64)

    p_q = Q + b64 * stride_qb + o_hq[:, None] * stride_qh + o_i64[:, None] * stride_ql + o_d[None, :]  # [BLOCK_M, D]
    b_q = tl.load(p_q, mask=m_row[:, None], other=0.0)  # [BLOCK_M, D]

    cnt = tl.load(CNT + b64 * stride_cb + i_lh * stride_ch + i_qb * stride_cq)
    p_idx = IDX + b64 * stride_ib + i_lh.to(tl.int64) * stride_ih + i_qb.to(tl.int64) * stride_iq
    # entries whose whole block is visible to the first row form a prefix; the rest sit in the tail
    pos_first = kv_len - q_len + i_qb * BLOCK_Q + i_rc * ROWS
    if CAUSAL:
        lim = tl.minimum(pos_first + 1, kv_len)
    else:
        lim = kv_len
    o_t = cnt - NTAIL + tl.arange(0, NTAIL)  # [NTAIL]
    m_t = o_t >= 0
    b_t = tl.load(p_idx + o_t, mask=m_t, other=0)  # [NTAIL]
    n_full = cnt - tl.sum((m_t & ((b_t + 1) * BLOCK_K > lim)).to(tl.int32), 0)
    n_full_tiles = n_full * BLOCK_K // BLOCK_N
    n_tiles = tl.cdiv(cnt * BLOCK_K, BLOCK_N)

    p_k = K + b64 * stride_kb + i_hkv.to(tl.int64) * stride_kh
    p_v = V + b64 * stride_vb + i_hkv.to(tl.int64) * stride_vh
    row0 = (i_b * (n_layout_heads * heads_per_layout // group) + i_hkv) * kv_len  # row of key 0 in DESC_K/DESC_V
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    acc, l_i, m_i = _attend_tiles(
        acc, l_i, m_i, b_q, p_idx, cnt, p_k, p_v, stride_kl, stride_vl, DESC_K, DESC_V, row0, o_pos, 0, n_full_tiles,
        kv_len, qk_scale, D, BLOCK_K, BLOCK_N, False, CAUSAL, UPCAST, TMA, WS,
    )
    acc, l_i, m_i = _attend_tiles(
        acc, l_i, m_i, b_q, p_idx, cnt, p_k, p_v, stride_kl, stride_vl, DESC_K, DESC_V, row0, o_pos, n_full_tiles, n_tiles,
        kv_len, qk_scale, D, BLOCK_K, BLOCK_N, True, CAUSAL, UPCAST, TMA, False,
    )

    m_empty = l_i == 0.0  # [BLOCK_M] rows that kept no key
    b_o = acc / tl.where(m_empty, 1.0, l_i)[:, None]  # [BLOCK_M, D]
    b_lse = tl.where(m_empty, float("-inf"), (m_i + tl.log2(tl.where(m_empty, 1.0, l_i))) * 0.6931471805599453)
    p_o = O + b64 * stride_ob + o_hq[:, None] * stride_oh + o_i64[:, None] * stride_ol + o_d[None, :]  # [BLOCK_M, D]
    tl.store(p_o, b_o.to(O.dtype.element_ty), mask=m_row[:, None])
    tl.store(LSE + b64 * stride_lb + o_hq * stride_lh + o_i64, b_lse, mask=m_row)


def _configs(block_n: tuple) -> list:
    """Autotuning space (CUDA only); :func:`_prune` keeps the ones that suit the tile."""
    return [
        triton.Config({"BLOCK_N": bn} if bn else {}, num_warps=w, num_stages=s)
        for w in (8, 4)
        for bn, s in block_n
    ]


def _num_warps(m: int, d: int) -> int:
    """Warps of a program with ``m`` query rows: 8 for 128-row tiles or D=256 (4 spill the accumulator)."""
    return 8 if m >= 128 or d == 256 else 4


def _prune(configs, named_args, **kwargs):
    """Warps from :func:`_num_warps`; ``BLOCK_N`` 128 for 128-row
    tiles (64 was 8% slower at full density on an H200), 32 only for D=256."""
    meta = {**named_args, **kwargs}  # the constexprs arrive as keyword arguments
    d, m = meta["D"], meta["HEADS"] * meta["ROWS"]
    warps = _num_warps(m, d)
    block_n = (32, 64) if d == 256 else (128,) if m >= 128 else (64, 128)
    # TMA configs carry no BLOCK_N: the launcher fixed it to the descriptors' block shape
    return [c for c in configs if c.num_warps == warps and c.kwargs.get("BLOCK_N", block_n[0]) in block_n]


_TUNE_KEY = ["D", "BLOCK_Q", "BLOCK_K", "ROWS", "HEADS", "CAUSAL", "UPCAST", "TMA", "WS"]
_block_sparse_fwd_tuned = triton.autotune(
    configs=_configs(((128, 3), (64, 3), (128, 2), (64, 4), (32, 3))),
    key=_TUNE_KEY,
    prune_configs_by={"early_config_prune": _prune},
)(_block_sparse_fwd_kernel)
# TMA tiles: BLOCK_N is fixed by the descriptors' block shape, so only warps and stages are tuned.
_block_sparse_fwd_tma_tuned = triton.autotune(
    configs=_configs(((None, 2), (None, 3), (None, 4))),
    key=_TUNE_KEY,
    prune_configs_by={"early_config_prune": _prune},
)(_block_sparse_fwd_kernel)


def _tile_shape(q_len: int, block_q: int, d: int, heads_per_layout: int, m_target: int = 0) -> tuple:
    """``(ROWS, HEADS)`` of a program tile: rows of one query block times stacked query heads."""
    m_target = m_target or (64 if d == 256 else 128)
    rows = next_pow2(min(block_q, q_len))
    heads = min(next_pow2(heads_per_layout), max(1, m_target // rows))
    if rows * heads < 16:  # tl.dot needs 16 rows: pad with masked heads or rows
        if heads_per_layout > 1:
            heads = 16 // rows
        else:
            rows = 16
    return rows, heads


def _tma_block_n(m: int, d: int, block_k: int, force: bool) -> int:
    """Key rows per TMA tile for a program of ``m`` query rows, or 0 for the gather path.

    A tile is as wide as the gather path's (128 keys for 128-row programs, 64 otherwise) or one key
    block when blocks are narrower, down to 64 keys: on an H200, 64-key TMA tiles beat gathering
    two 64-key blocks per 128-key tile at every density, while 32-key TMA tiles lost to the gather
    (``benchmarks/results/kernel_variants_small_blocks_h200.json``). ``force`` allows 32-key tiles.
    """
    block_n = min(64 if d == 256 or m < 128 else 128, block_k)
    return block_n if block_n >= (32 if force else 64) else 0


def _kv_descriptors(k: torch.Tensor, v: torch.Tensor, block_n: int, copy: bool) -> tuple:
    """``(k, v, desc_k, desc_v)``: TMA descriptors of ``block_n`` rows, or ``None`` for the gather path.

    Strided K/V (e.g. ``[B, L, H, D]`` projections viewed as ``[B, H, L, D]``) are copied to
    contiguous memory when ``copy`` (prefill: the copy reads K/V once, the kernel reads them many
    times); otherwise (decode over a long cache) they stay strided and take the gather path.
    """
    if not block_n:
        return k, v, None, None
    k_rows, v_rows = row_view(k), row_view(v)
    if (k_rows is None or v_rows is None) and copy:
        k, v = k.contiguous(), v.contiguous()
        k_rows, v_rows = row_view(k), row_view(v)
    if k_rows is None or v_rows is None:
        return k, v, None, None
    return k, v, TensorDescriptor.from_tensor(k_rows, [block_n, k.shape[-1]]), TensorDescriptor.from_tensor(v_rows, [block_n, v.shape[-1]])


@on_input_device
def _block_sparse_fwd_impl(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor,
    block_q: int, block_k: int, causal: bool, scale: float, tma: Optional[bool] = None, m_target: int = 0,
    ws: bool = False, block_n: int = 0,
) -> tuple:
    """Launch the kernel; ``tma`` (None = when possible), ``m_target`` (0 = default tile rows), ``ws``
    (warp-specialised TMA loop) and ``block_n`` (fixed gather tile, 0 = autotuned) are for benchmarks."""
    b, hq, q_len, d = q.shape
    hkv, kv_len = k.shape[1], k.shape[2]
    h_lay, nq = indices.shape[1], indices.shape[2]
    heads_per_layout = hq // h_lay
    out = empty_output(*q.shape, dtype=q.dtype, device=q.device)
    lse = empty_output(b, hq, q_len, dtype=torch.float32, device=q.device)
    rows, heads = _tile_shape(q_len, block_q, d, heads_per_layout, m_target)
    n_row_chunks = triton.cdiv(min(block_q, q_len), rows)
    n_head_chunks = triton.cdiv(heads_per_layout, heads)
    ntail = next_pow2(block_q // block_k + 2) if causal else 2
    grid = (b * h_lay, nq * n_row_chunks * n_head_chunks)
    if grid[1] > 65535:  # CUDA's y grid limit
        raise ValueError(
            f"{grid[1]} query tiles per head exceed the kernel's grid (65,535): use block_q=128 or attend in query chunks"
        )
    tma_n = _tma_block_n(rows * heads, d, block_k, bool(tma)) if tma is not False and tma_available(q) else 0
    k, v, desc_k, desc_v = _kv_descriptors(k, v, tma_n, copy=q_len * 4 >= kv_len)
    if tma and desc_k is None:
        raise ValueError("tma=True needs block_k >= the TMA tile and k, v laid out as contiguous [B, H, L, D]")
    args = (
        q, k, v, out, lse, indices, counts, desc_k, desc_v,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        indices.stride(0), indices.stride(1), indices.stride(2),
        counts.stride(0), counts.stride(1), counts.stride(2),
        q_len, kv_len, h_lay, hq // hkv, heads_per_layout, n_row_chunks, n_head_chunks, nq, scale * LOG2E,
    )
    meta = dict(D=d, BLOCK_Q=block_q, BLOCK_K=block_k, ROWS=rows, HEADS=heads, NTAIL=ntail, CAUSAL=causal,
                UPCAST=upcast_dots(q.dtype), TMA=desc_k is not None, WS=ws and desc_k is not None)
    if desc_k is not None:
        if interpreting():
            _block_sparse_fwd_kernel[grid](*args, **meta, BLOCK_N=tma_n)
        else:
            _block_sparse_fwd_tma_tuned[grid](*args, **meta, BLOCK_N=tma_n)
    elif interpreting() or block_n:
        _block_sparse_fwd_kernel[grid](*args, **meta, BLOCK_N=block_n or 64, num_warps=_num_warps(rows * heads, d), num_stages=3)
    else:
        _block_sparse_fwd_tuned[grid](*args, **meta)
    return out, lse


@torch.library.custom_op("blocksieve::block_sparse_fwd", mutates_args=())
def _block_sparse_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor,
    block_q: int, block_k: int, causal: bool, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _block_sparse_fwd_impl(q, k, v, indices, counts, block_q, block_k, causal, scale)


@_block_sparse_fwd_op.register_fake
def _(q, k, v, indices, counts, block_q, block_k, causal, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


def block_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, scale: Optional[float] = None
) -> tuple:
    """Attention over the key blocks a :class:`BlockLayout` keeps (Triton, forward only).

    Args:
        q: ``[B, Hq, Lq, D]`` float16 / bfloat16, ``D`` in {64, 128, 256}.
        k, v: ``[B, Hkv, Lkv, D]``, same dtype and device; ``Hq % Hkv == 0``.
        layout: BlockLayout with ``H`` in {Hq, Hkv}, ``block_q`` in {64, 128},
            ``block_k`` in {16, 32, 64, 128}; a causal layout must not select future blocks
            (``layout.validate()`` checks).
        scale: softmax scale, default ``1/sqrt(D)``.

    Returns:
        ``(out [B, Hq, Lq, D]`` in q's dtype, ``lse [B, Hq, Lq]`` float32 natural log);
        rows that keep no key give ``out = 0``, ``lse = -inf``.

    Example:
        >>> mask = torch.ones(1, 8, 4, 4, dtype=torch.bool, device="cuda")
        >>> lay = BlockLayout.from_block_mask(mask, 128, 128, 512, 512, causal=True)
        >>> out, lse = block_sparse_attention(q, k, v, lay)  # q [1, 8, 512, 128] bf16 on CUDA
    """
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout must be a BlockLayout, got {type(layout).__name__}; use token_sparse_attention for TokenLayout")
    check_kernel_inputs(q, k, v, layout)
    if layout.block_q not in SUPPORTED_BLOCK_Q:
        raise ValueError(f"layout.block_q={layout.block_q} is not supported by the Triton kernel: use one of {SUPPORTED_BLOCK_Q}")
    if layout.block_k not in SUPPORTED_BLOCK_K:
        raise ValueError(f"layout.block_k={layout.block_k} is not supported by the Triton kernel: use one of {SUPPORTED_BLOCK_K}")
    scale = resolve_scale(scale, q.shape[-1])
    if scale <= 0:
        raise ValueError(f"scale={scale} must be positive (default 1/sqrt(D))")
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    indices = layout.indices.contiguous()
    return _block_sparse_fwd_op(
        q, k, v, indices, layout.counts, layout.block_q, layout.block_k, layout.causal, scale
    )
