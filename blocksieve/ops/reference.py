"""Exact PyTorch oracle for attention over a layout.

Computes softmax attention in fp32 (or fp64) over exactly the keys the layout keeps, chunked
over query rows so that no ``Lq × Lkv`` tensor is ever built for more than a chunk of rows.
Used by the tests and the GPU correctness checks; slow but simple.
"""

from __future__ import annotations

from typing import Optional

import torch

from blocksieve.layout import BlockLayout, query_positions
from blocksieve.ops.checks import Layout, check_qkv, layout_head_map, resolve_scale

CHUNK_ELEMENTS = 1 << 25
"""Score entries per chunk (128 MiB of fp32)."""


def row_mask(layout: Layout, r0: int, r1: int) -> torch.Tensor:
    """Boolean mask ``[B, H, r1 - r0, Lkv]`` of the keys the layout keeps for rows ``[r0, r1)``."""
    dev = layout.indices.device
    kv_len = layout.kv_len
    if isinstance(layout, BlockLayout):
        rows = torch.arange(r0, r1, device=dev) // layout.block_q
        idx = layout.indices[:, :, rows]  # [B, H, C, K]
        nk = layout.num_k_blocks
        bm = torch.zeros(*idx.shape[:3], nk + 1, dtype=torch.bool, device=dev)
        bm.scatter_(-1, torch.where(idx >= 0, idx, nk).long(), True)
        mask = bm[..., :nk].repeat_interleave(layout.block_k, -1)[..., :kv_len]
    else:
        idx = layout.indices[:, :, r0:r1]
        mask = torch.zeros(*idx.shape[:3], kv_len + 1, dtype=torch.bool, device=dev)
        mask.scatter_(-1, torch.where(idx >= 0, idx, kv_len).long(), True)
        mask = mask[..., :kv_len]
    if layout.causal:
        pos = query_positions(layout.q_len, kv_len, dev)[r0:r1]
        mask = mask & (torch.arange(kv_len, device=dev)[None, :] <= pos[:, None])
    return mask


def masked_softmax_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> tuple:
    """Softmax attention with a boolean mask, safe for empty rows.

    Shapes: ``q [..., M, D]``, ``k, v [..., N, D]``, ``mask [..., M, N]`` → ``out [..., M, D]``,
    ``lse [..., M]`` (natural log; ``-inf`` and zero output where a row keeps nothing).
    """
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    denom = p.sum(-1, keepdim=True)
    out = torch.matmul(p, v) / torch.where(denom > 0, denom, torch.ones_like(denom))
    lse = (m + torch.log(denom)).squeeze(-1)
    return out, lse


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: Layout,
    scale: Optional[float] = None,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple:
    """Exact attention over ``layout`` in ``compute_dtype``.

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lkv, D]``.
        layout: a BlockLayout or TokenLayout for these shapes.
        scale: softmax scale, default ``1/sqrt(D)``.
        compute_dtype: float32 (default) or float64 for golden values.

    Returns:
        ``(out [B, Hq, Lq, D], lse [B, Hq, Lq])`` in ``compute_dtype``.
    """
    check_qkv(q, k, v, layout)
    b, hq, lq, d = q.shape
    hkv, lkv = k.shape[1], k.shape[2]
    scale = resolve_scale(scale, d)
    h = layout.indices.shape[1]
    r, kv_head = layout_head_map(h, hq, hkv, q.device)
    qf = q.to(compute_dtype).reshape(b, h, r, lq, d)
    kf, vf = k.to(compute_dtype)[:, kv_head], v.to(compute_dtype)[:, kv_head]  # [B, H, Lkv, D]
    out = torch.empty(b, h, r, lq, d, dtype=compute_dtype, device=q.device)
    lse = torch.empty(b, h, r, lq, dtype=compute_dtype, device=q.device)
    chunk = max(1, CHUNK_ELEMENTS // max(1, b * hq * lkv))
    for r0 in range(0, lq, chunk):
        r1 = min(lq, r0 + chunk)
        mask = row_mask(layout, r0, r1)[:, :, None]  # [B, H, 1, C, Lkv]
        o, s = masked_softmax_attention(qf[:, :, :, r0:r1], kf[:, :, None], vf[:, :, None], mask, scale)
        out[:, :, :, r0:r1], lse[:, :, :, r0:r1] = o, s
    return out.reshape(b, hq, lq, d), lse.reshape(b, hq, lq)


def dense_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: Optional[float] = None,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple:
    """Dense (optionally right-aligned causal) attention, chunked; returns ``(out, lse)``."""
    check_qkv(q, k, v)
    b, hq, lq, d = q.shape
    hkv, lkv = k.shape[1], k.shape[2]
    scale = resolve_scale(scale, d)
    g = hq // hkv
    qf = q.to(compute_dtype).reshape(b, hkv, g, lq, d)
    kf, vf = k.to(compute_dtype)[:, :, None], v.to(compute_dtype)[:, :, None]
    out = torch.empty(b, hkv, g, lq, d, dtype=compute_dtype, device=q.device)
    lse = torch.empty(b, hkv, g, lq, dtype=compute_dtype, device=q.device)
    chunk = max(1, CHUNK_ELEMENTS // max(1, b * hq * lkv))
    keys = torch.arange(lkv, device=q.device)
    for r0 in range(0, lq, chunk):
        r1 = min(lq, r0 + chunk)
        pos = query_positions(lq, lkv, q.device)[r0:r1]
        mask = keys[None, :] <= pos[:, None] if causal else torch.ones(r1 - r0, lkv, dtype=torch.bool, device=q.device)
        o, s = masked_softmax_attention(qf[:, :, :, r0:r1], kf, vf, mask, scale)
        out[:, :, :, r0:r1], lse[:, :, :, r0:r1] = o, s
    return out.reshape(b, hq, lq, d), lse.reshape(b, hq, lq)
