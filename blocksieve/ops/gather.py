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
from blocksieve.ops.alloc import empty_output
from blocksieve.ops.checks import Layout, layout_head_map, resolve_scale
from blocksieve.ops.merge import merge
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


def _fused_attention(q, k, v, bias, nonempty, scale):
    """Attention with an additive ``bias`` (0 / -inf) through PyTorch's fused CPU kernel.

    Shapes: ``q [N, M, D]``, ``k, v [N, S, D]``, ``bias`` broadcastable to ``[N, M, S]``,
    ``nonempty [N, M]`` (rows that keep at least one key). Returns ``(out [N, M, D], lse [N, M])``
    with ``lse = -inf`` and zero output on empty rows. Falls back to the plain masked softmax
    where the fused operator is missing (older PyTorch).
    """
    if _FLASH_CPU is None or q.is_cuda:
        out, lse = masked_softmax_attention(q, k, v, torch.isfinite(bias), scale)
    else:
        out, lse = _FLASH_CPU(q[:, None], k[:, None], v[:, None], 0.0, False, attn_mask=bias[:, None], scale=scale)
        out, lse = out[:, 0], lse[:, 0].to(out.dtype)
    return out, torch.where(nonempty, lse, float("-inf"))  # both paths already give zero output there


_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _compact(idx: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Keep the marked entries of each row, ascending, -1 padded to the widest row: ``[..., K']``."""
    big = torch.iinfo(torch.int64).max
    packed = torch.where(keep, idx, big).sort(-1).values
    width = int(keep.sum(-1).max()) if keep.numel() else 0
    packed = packed[..., :width]
    return torch.where(packed == big, -1, packed)


def _block_gather(q, k, v, layout: BlockLayout, scale: float) -> tuple:
    """Block layout: per chunk of query blocks, fully visible key blocks run with a per-column
    bias only; blocks that straddle the diagonal or the end of the keys get a token mask; the
    two parts merge through their LSE."""
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
    qpos = F.pad(qpos, (0, nq * bq - lq), value=lkv).reshape(nq, 1, bq)  # padded rows: outputs dropped
    qpos = qpos.expand(nq, r, bq).reshape(nq, r * bq)
    first_pos = qpos[:, 0]  # [NQ] position of each query block's first row
    out = empty_output(b, h, nq, r * bq, d, dtype=ct, device=q.device)
    lse = empty_output(b, h, nq, r * bq, dtype=ct, device=q.device)
    step = max(1, TILE_ELEMENTS // max(1, b * h * r * bq * kmax * bk))
    for n0 in range(0, nq, step):
        n1 = min(nq, n0 + step)
        idx = layout.indices[:, :, n0:n1].long()  # [B, H, C, K]
        block_end = (idx + 1) * bk - 1
        full = (idx >= 0) & (block_end < lkv)
        if layout.causal:
            full &= block_end <= first_pos[n0:n1, None]
        parts = []
        for sel, needs_token_mask in ((_compact(idx, full), False), (_compact(idx, (idx >= 0) & ~full), True)):
            if sel.shape[-1]:
                parts.append(_gathered_tile(qp[:, :, n0:n1], kp, vp, kv_head, sel, qpos[n0:n1], layout.causal and needs_token_mask, lkv, scale))
        if not parts:
            out[:, :, n0:n1], lse[:, :, n0:n1] = 0.0, float("-inf")
            continue
        o, s = parts[0] if len(parts) == 1 else merge(*parts[0], *parts[1])
        out[:, :, n0:n1], lse[:, :, n0:n1] = o, s
    out = out.reshape(b, h, nq, r, bq, d).permute(0, 1, 3, 2, 4, 5).reshape(b, hq, nq * bq, d)[:, :, :lq]
    lse = lse.reshape(b, h, nq, r, bq).permute(0, 1, 3, 2, 4).reshape(b, hq, nq * bq)[:, :, :lq]
    return out, lse


def _gathered_tile(qc, kp, vp, kv_head, sel, qpos, causal, lkv, scale):
    """Attend query blocks ``qc [B, H, C, M, D]`` to the key blocks ``sel [B, H, C, K']`` (-1 padded).

    ``kp, vp [B, Hkv, NK, bk, D]``; ``qpos [C, M]`` are the rows' key positions; ``causal``
    applies the token-level mask. Returns ``(out [B, H, C, M, D], lse [B, H, C, M])``.
    """
    b, h, c, m, d = qc.shape
    hkv, nk, bk = kp.shape[1:4]
    valid = sel >= 0
    sel_c = sel.clamp(min=0)
    # One index_select over flattened blocks (much faster than advanced indexing on the CPU).
    rows = (torch.arange(b, device=qc.device)[:, None, None, None] * hkv + kv_head[None, :, None, None]) * nk + sel_c
    kg = kp.reshape(-1, bk * d).index_select(0, rows.flatten()).reshape(b * h * c, -1, d)
    vg = vp.reshape(-1, bk * d).index_select(0, rows.flatten()).reshape(b * h * c, -1, d)
    kpos = (sel_c[..., None] * bk + torch.arange(bk, device=qc.device)).reshape(b, h, c, -1)  # [B, H, C, K'*bk]
    kvalid = valid.repeat_interleave(bk, -1) & (kpos < lkv)
    first_key = torch.where(kvalid, kpos, lkv).amin(-1)  # [B, H, C]; lkv when the row keeps nothing
    if causal:
        keep = kvalid[:, :, :, None, :] & (kpos[:, :, :, None, :] <= qpos[None, None, :, :, None])  # [B, H, C, M, K'*bk]
        nonempty = first_key[..., None] <= qpos[None, None]
    else:
        keep = kvalid[:, :, :, None, :]
        nonempty = (first_key < lkv)[..., None].expand(b, h, c, m)
    bias = torch.where(keep, 0.0, float("-inf")).to(qc.dtype).reshape(b * h * c, keep.shape[3], -1)
    o, s = _fused_attention(qc.reshape(b * h * c, m, d), kg, vg, bias, nonempty.reshape(b * h * c, m), scale)
    return o.reshape(b, h, c, m, d), s.reshape(b, h, c, m)


def _token_gather(q, k, v, layout: TokenLayout, scale: float) -> tuple:
    b, hq, lq, d = q.shape
    hkv, lkv = k.shape[1], k.shape[2]
    h, _, kmax = layout.indices.shape[1:]
    r, kv_head = layout_head_map(h, hq, hkv, q.device)
    ct = _compute_dtype(q.dtype)
    qr = q.to(ct).reshape(b, h, r, lq, d).permute(0, 1, 3, 2, 4)  # [B, H, Lq, R, D]
    kc, vc = k.to(ct), v.to(ct)
    row0 = (torch.arange(b, device=q.device)[:, None] * hkv + kv_head[None, :]) * lkv  # [B, H] first row of each KV head
    kc, vc = kc.reshape(-1, d), vc.reshape(-1, d)
    out = empty_output(b, h, lq, r, d, dtype=ct, device=q.device)
    lse = empty_output(b, h, lq, r, dtype=ct, device=q.device)
    step = max(1, TILE_ELEMENTS // max(1, b * h * kmax * max(r, d // 4)))
    for r0 in range(0, lq, step):
        r1 = min(lq, r0 + step)
        idx = layout.indices[:, :, r0:r1].long()  # [B, H, C, K]
        valid = idx >= 0
        idx_c = idx.clamp(min=0)
        rows = (row0[:, :, None, None] + idx_c).flatten()  # index_select: much faster than advanced indexing
        kg = kc.index_select(0, rows).reshape(*idx.shape, d)  # [B, H, C, K, D]
        vg = vc.index_select(0, rows).reshape(*idx.shape, d)
        if layout.causal:  # layouts are validated shallowly by default: enforce causality here
            valid = valid & (idx <= query_positions(lq, lkv, q.device)[r0:r1, None])
        mask = valid[:, :, :, None, :]  # [B, H, C, 1, K]
        o, s = masked_softmax_attention(qr[:, :, r0:r1], kg, vg, mask, scale)
        out[:, :, r0:r1], lse[:, :, r0:r1] = o, s
    out = out.permute(0, 1, 3, 2, 4).reshape(b, hq, lq, d)
    lse = lse.permute(0, 1, 3, 2).reshape(b, hq, lq)
    return out, lse
