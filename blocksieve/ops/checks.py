"""Input checks shared by every execution path, with errors that name the argument and the fix."""

from __future__ import annotations

from typing import Optional, Union

import torch

from blocksieve.layout import BlockLayout, TokenLayout

Layout = Union[BlockLayout, TokenLayout]
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Optional[Layout] = None) -> None:
    """Validate ``q [B, Hq, Lq, D]``, ``k, v [B, Hkv, Lkv, D]`` and (optionally) their layout."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, H, L, D], got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}: use float16, bfloat16 or float32")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}): cast them to one dtype")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v devices differ ({q.device}, {k.device}, {v.device}): move them to one device")
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q has batch {q.shape[0]}, k has batch {k.shape[0]}: they must match")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q has head dim {q.shape[3]}, k has {k.shape[3]}: they must match")
    hq, hkv = q.shape[1], k.shape[1]
    if hq % hkv:
        raise ValueError(f"k has {hkv} heads, q has {hq}: Hq must be a multiple of Hkv")
    if layout is None:
        return
    if not isinstance(layout, (BlockLayout, TokenLayout)):
        raise TypeError(f"layout must be a BlockLayout or TokenLayout, got {type(layout).__name__}")
    if layout.q_len != q.shape[2] or layout.kv_len != k.shape[2]:
        raise ValueError(
            f"layout was built for q_len={layout.q_len}, kv_len={layout.kv_len} but q has {q.shape[2]} "
            f"rows and k has {k.shape[2]}: rebuild the layout for these lengths"
        )
    if layout.indices.shape[0] != q.shape[0]:
        raise ValueError(f"layout has batch {layout.indices.shape[0]}, q has {q.shape[0]}: they must match")
    layout.check_heads(hq, hkv)
    if layout.indices.device != q.device:
        raise ValueError(f"layout is on {layout.indices.device}, q on {q.device}: move the layout's tensors to q's device")


def resolve_scale(scale: Optional[float], head_dim: int) -> float:
    """Softmax scale, ``1/sqrt(D)`` by default."""
    return head_dim**-0.5 if scale is None else float(scale)


def layout_head_map(num_layout_heads: int, num_q_heads: int, num_kv_heads: int, device=None) -> tuple:
    """Map layout heads to KV heads.

    Returns ``(rows_per_head R, kv_head [H])``: layout head ``l`` covers query heads
    ``[l*R, (l+1)*R)`` (R = G for group-shared layouts, 1 per query head), all of which
    read KV head ``kv_head[l] = l*R // G``.
    """
    r = num_q_heads // num_layout_heads
    g = num_q_heads // num_kv_heads
    return r, torch.arange(num_layout_heads, device=device) * r // g
