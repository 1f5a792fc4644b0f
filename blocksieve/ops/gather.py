"""Fast PyTorch execution path (used on the CPU): gather the kept keys, then dense attention.

For a :class:`~blocksieve.layout.BlockLayout` each chunk of query blocks gathers its selected
key blocks into one contiguous ``[K · block_k, D]`` tile per (batch, layout head, query block) and
runs batched matrix products on it, so the work is proportional to the kept blocks. For a
:class:`~blocksieve.layout.TokenLayout` each query row gathers its own keys. The G query heads
of a group-shared layout are stacked as rows of one tile, so each gathered key serves all of them.
Arithmetic is fp32 (fp64 for fp64 inputs); outputs are cast back to the input dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from blocksieve.layout import BlockLayout, TokenLayout, query_positions
from blocksieve.ops.checks import Layout, layout_head_map, resolve_scale
from blocksieve.ops.reference import masked_softmax_attention

TILE_ELEMENTS = 1 << 23
"""Score entries per processed chunk (32 MiB of fp32): keeps the working set in cache-sized pieces."""


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def gather_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout, scale: Optional[float] = None) -> tuple:
    """Attention over ``layout`` by gathering kept keys; inputs are assumed checked.

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lkv, D]``.
    Returns:
        ``(out [B, Hq, Lq, D] in q.dtype, lse [B, Hq, Lq] fp32)``.
    """
    scale = resolve_scale(scale, q.shape[-1])
    if isinstance(layout, BlockLayout):
        out, lse = _block_gather(q, k, v, layout, scale)
    else:
        out, lse = _token_gather(q, k, v, layout, scale)
    return out.to(q.dtype), lse.to(torch.float32)


def _block_gather(q, k, v, layout: BlockLayout, scale: float) -> tuple:
    b, hq, lq, d = q.shape
    hkv, lkv = k.shape[1], k.shape[2]
    h, nq, kmax = layout.indices.shape[1:]
    bq, bk, nk = layout.block_q, layout.block_k, layout.num_k_blocks
    r, kv_head = layout_head_map(h, hq, hkv, q.device)
    ct = _compute_dtype(q.dtype)
    # Pad to whole blocks; queries become [B, H, NQ, R*bq, D] (R heads stacked as rows).
    qp = F.pad(q, (0, 0, 0, nq * bq - lq)).to(ct).reshape(b, h, r, nq, bq, d)
    qp = qp.permute(0, 1, 3, 2, 4, 5).reshape(b, h, nq, r * bq, d)
    kp = F.pad(k, (0, 0, 0, nk * bk - lkv)).to(ct).reshape(b, hkv, nk, bk, d)
    vp = F.pad(v, (0, 0, 0, nk * bk - lkv)).to(ct).reshape(b, hkv, nk, bk, d)
    qpos = query_positions(lq, lkv, q.device)
    qpos = F.pad(qpos, (0, nq * bq - lq), value=-1).reshape(nq, 1, bq)  # padded rows see nothing
    qpos = qpos.expand(nq, r, bq).reshape(nq, r * bq)
    ar_b = torch.arange(b, device=q.device)[:, None, None, None]
    ar_h = kv_head[None, :, None, None]
    offs = torch.arange(bk, device=q.device)
    out = torch.empty(b, h, nq, r * bq, d, dtype=ct, device=q.device)
    lse = torch.empty(b, h, nq, r * bq, dtype=ct, device=q.device)
    step = max(1, TILE_ELEMENTS // max(1, b * h * r * bq * kmax * bk))
    for n0 in range(0, nq, step):
        n1 = min(nq, n0 + step)
        idx = layout.indices[:, :, n0:n1].long()  # [B, H, C, K]
        valid = idx >= 0
        idx_c = idx.clamp(min=0)
        kg = kp[ar_b, ar_h, idx_c].reshape(b, h, n1 - n0, kmax * bk, d)
        vg = vp[ar_b, ar_h, idx_c].reshape(b, h, n1 - n0, kmax * bk, d)
        kpos = (idx_c[..., None] * bk + offs).reshape(b, h, n1 - n0, kmax * bk)
        kvalid = (valid[..., None].expand(-1, -1, -1, -1, bk).reshape_as(kpos)) & (kpos < lkv)
        mask = kvalid[:, :, :, None, :]  # [B, H, C, 1, K*bk]
        if layout.causal:
            mask = mask & (kpos[:, :, :, None, :] <= qpos[n0:n1, :, None])
        else:
            mask = mask & (qpos[n0:n1, :, None] >= 0)
        o, s = masked_softmax_attention(qp[:, :, n0:n1], kg, vg, mask, scale)
        out[:, :, n0:n1], lse[:, :, n0:n1] = o, s
    out = out.reshape(b, h, nq, r, bq, d).permute(0, 1, 3, 2, 4, 5).reshape(b, hq, nq * bq, d)[:, :, :lq]
    lse = lse.reshape(b, h, nq, r, bq).permute(0, 1, 3, 2, 4).reshape(b, hq, nq * bq)[:, :, :lq]
    return out, lse


def _token_gather(q, k, v, layout: TokenLayout, scale: float) -> tuple:
    b, hq, lq, d = q.shape
    hkv, lkv = k.shape[1], k.shape[2]
    h, _, kmax = layout.indices.shape[1:]
    r, kv_head = layout_head_map(h, hq, hkv, q.device)
    ct = _compute_dtype(q.dtype)
    qr = q.to(ct).reshape(b, h, r, lq, d).permute(0, 1, 3, 2, 4)  # [B, H, Lq, R, D]
    kc, vc = k.to(ct), v.to(ct)
    ar_b = torch.arange(b, device=q.device)[:, None, None, None]
    ar_h = kv_head[None, :, None, None]
    out = torch.empty(b, h, lq, r, d, dtype=ct, device=q.device)
    lse = torch.empty(b, h, lq, r, dtype=ct, device=q.device)
    step = max(1, TILE_ELEMENTS // max(1, b * h * kmax * max(r, d // 4)))
    for r0 in range(0, lq, step):
        r1 = min(lq, r0 + step)
        idx = layout.indices[:, :, r0:r1].long()  # [B, H, C, K]
        valid = idx >= 0
        idx_c = idx.clamp(min=0)
        kg, vg = kc[ar_b, ar_h, idx_c], vc[ar_b, ar_h, idx_c]  # [B, H, C, K, D]
        if layout.causal:  # layouts are validated shallowly by default: enforce causality here
            valid = valid & (idx <= query_positions(lq, lkv, q.device)[r0:r1, None])
        mask = valid[:, :, :, None, :]  # [B, H, C, 1, K]
        o, s = masked_softmax_attention(qr[:, :, r0:r1], kg, vg, mask, scale)
        out[:, :, r0:r1], lse[:, :, r0:r1] = o, s
    out = out.permute(0, 1, 3, 2, 4).reshape(b, hq, lq, d)
    lse = lse.permute(0, 1, 3, 2).reshape(b, hq, lq)
    return out, lse
