"""Attention where each chunk of query rows shares one key set, plus each row's causal local window.

TokenSelect's prefill rows (``blocksieve.methods.tokenselect``): every row of a chunk attends the
chunk's shared keys (the initial window and the chunk's top-k) and its own last ``local`` keys. As
a TokenLayout that is ``init + topk + local`` gathered keys per row, which the token-sparse kernel
reads row by row. Here the rows of a group of chunks are computed as dense attention instead: per
chunk the shared keys and the window span (the ``local + chunk - 1`` keys any of its windows
touches) are gathered once, and the chunk's rows (the ``G`` query heads of a KV head stacked along
the rows, so K/V are not repeated per query head) attend them through PyTorch's SDPA with a boolean
mask that keeps, per row, the shared keys it can see causally and its window. Exact: the same keys
and the same softmax as the layout. Memory: one group's gathered K/V and mask, at most
:data:`MASK_ELEMENTS` mask entries; no ``Lq × Lkv`` tensor.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from blocksieve.ops.checks import resolve_scale

__all__ = ["shared_window_attention"]

MASK_ELEMENTS = 1 << 27
"""Most mask entries (``B · S · chunks · G · chunk · width``) a group of chunks holds (128 MiB of bool)."""


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shared: torch.Tensor, chunk: int, local: int) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q must be [B, Hq, Lq, D] and k, v [B, Hkv, Lkv, D] with the same B and D, got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[1] % k.shape[1] or q.shape[2] > k.shape[2]:
        raise ValueError(f"need Hq % Hkv == 0 and Lq <= Lkv (right-aligned queries), got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if chunk <= 0 or local < 0:
        raise ValueError(f"chunk must be positive and local >= 0, got chunk={chunk}, local={local}")
    nc = -(-q.shape[2] // chunk)
    if shared.dim() != 4 or shared.shape[0] != q.shape[0] or shared.shape[1] not in (1, k.shape[1]) or shared.shape[2] != nc:
        raise ValueError(f"shared must be [B, 1 or Hkv, chunks={nc}, S] key ids, got {tuple(shared.shape)}")


def shared_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    shared: torch.Tensor,
    chunk: int,
    local: int,
    floor: int = 0,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Rows in chunks: the chunk's shared keys they can see, plus their window (module docstring).

    Row ``t`` (position ``p = Lkv - Lq + t``, chunk ``t // chunk``) attends the shared ids ``s >= 0``
    with ``s <= p``, and the window ``[max(floor, p - local + 1), p]``. The caller keeps the shared
    ids and the windows disjoint (TokenSelect: shared ids lie before ``floor`` or before the chunk's
    first window), as a layout holding both would not repeat a key.

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lkv, D]`` (``Hq % Hkv == 0``, ``Lq <= Lkv``).
        shared: int ``[B, S, ceil(Lq / chunk), W_s]`` key ids per chunk, -1 for none; ``S = 1`` (all
            KV heads) or ``Hkv``.
        chunk, local, floor: rows per chunk, window length, first key a window may hold.
        scale: softmax scale (``1/sqrt(D)`` by default).
    Returns:
        ``[B, Hq, Lq, D]`` in ``q``'s dtype; a row that sees no key gets zeros.
    """
    _check(q, k, v, shared, chunk, local)
    b, hq, lq, d = q.shape
    hkv, lkv = k.shape[1], k.shape[2]
    s, nc, w_s = shared.shape[1], shared.shape[2], shared.shape[3]
    g = hq // hkv
    span = local + chunk - 1
    width = w_s + span
    dev = q.device
    first = lkv - lq
    out = torch.empty_like(q)
    row = torch.arange(chunk, device=dev)
    step = max(1, MASK_ELEMENTS // max(1, b * s * g * chunk * width))
    ar_b, ar_h = torch.arange(b, device=dev)[:, None, None], torch.arange(hkv, device=dev)[None, :, None]
    for c0 in range(0, nc, step):
        c1 = min(nc, c0 + step)
        n = c1 - c0
        pos = first + torch.arange(c0, c1, device=dev)[:, None] * chunk + row  # [n, chunk] row positions
        win = pos[:, :1] - local + 1 + torch.arange(span, device=dev)  # [n, span] the chunk's window span
        ids_s = shared[:, :, c0:c1].long()  # [B, S, n, W_s]
        ids = torch.cat([ids_s, win.expand(b, s, n, span)], -1)  # [B, S, n, width]
        see_s = (ids_s[..., None, :] >= 0) & (ids_s[..., None, :] <= pos[:, :, None])  # [B, S, n, chunk, W_s]
        w = win[:, None, :]
        see_w = (w >= floor) & (w >= pos[:, :, None] - local + 1) & (w <= pos[:, :, None]) & (w < lkv)  # [n, chunk, span]
        mask = torch.cat([see_s, see_w.expand(b, s, n, chunk, span)], -1)  # [B, S, n, chunk, width]
        mask = mask[:, :, :, None].expand(b, s, n, g, chunk, width).permute(0, 2, 1, 3, 4, 5).reshape(b * n, s, g * chunk, width)
        flat = ids.clamp(0, lkv - 1).reshape(b, s, n * width).expand(b, hkv, n * width)
        kg, vg = (x[ar_b, ar_h, flat].reshape(b, hkv, n, width, d).transpose(1, 2).reshape(b * n, hkv, width, d) for x in (k, v))
        r0, r1 = c0 * chunk, min(lq, c1 * chunk)
        qc = F.pad(q[:, :, r0:r1], (0, 0, 0, n * chunk - (r1 - r0)))  # [B, Hq, n·chunk, D]
        qc = qc.reshape(b, hkv, g, n, chunk, d).permute(0, 3, 1, 2, 4, 5).reshape(b * n, hkv, g * chunk, d)
        o = F.scaled_dot_product_attention(qc, kg, vg, attn_mask=mask, scale=resolve_scale(scale, d))
        o = torch.where(mask.any(-1, keepdim=True), o, 0.0)  # rows that see nothing: zeros, not NaN
        o = o.reshape(b, n, hkv, g, chunk, d).permute(0, 2, 3, 1, 4, 5).reshape(b, hq, n * chunk, d)
        out[:, :, r0:r1] = o[:, :, : r1 - r0]
    return out
