"""Exact merge of two partial attentions through their log-sum-exp.

If ``(o1, l1)`` attends to key set S1 and ``(o2, l2)`` to a disjoint set S2, then attention over
S1 ∪ S2 is ``L = logaddexp(l1, l2)``, ``O = e^{l1 - L} · o1 + e^{l2 - L} · o2``. Rows where both
sides are empty (``-inf``) stay zero with ``lse = -inf``. On CUDA the merge is one Triton pass
(:mod:`blocksieve.ops.merge_triton`); elsewhere it runs in PyTorch.
"""

from __future__ import annotations

import torch


def merge(out1: torch.Tensor, lse1: torch.Tensor, out2: torch.Tensor, lse2: torch.Tensor) -> tuple:
    """Merge two partial attentions over disjoint key sets.

    Args:
        out1, out2: ``[B, H, L, D]`` partial outputs (any float dtype, same shape).
        lse1, lse2: ``[B, H, L]`` natural-log normalisers (``-inf`` for empty rows).
    Returns:
        ``(out [B, H, L, D] in out1's dtype, lse [B, H, L] fp32)``.
    """
    if out1.shape != out2.shape:
        raise ValueError(f"out1 {tuple(out1.shape)} and out2 {tuple(out2.shape)} must have the same shape")
    if lse1.shape != out1.shape[:-1] or lse2.shape != out2.shape[:-1]:
        raise ValueError(f"lse1/lse2 must have shape {tuple(out1.shape[:-1])} (out without its last dim)")
    if out1.device != out2.device or lse1.device != out1.device or lse2.device != out1.device:
        raise ValueError(f"out1, lse1, out2, lse2 must be on one device, got {out1.device}, {lse1.device}, {out2.device}, {lse2.device}")
    if out1.is_cuda:
        try:
            from blocksieve.ops.merge_triton import merge_triton
        except ImportError:  # Triton not installed: the PyTorch merge below is exact too
            pass
        else:
            return merge_triton(out1, lse1, out2, lse2)
    l1, l2 = lse1.float(), lse2.float()
    lse = torch.logaddexp(l1, l2)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    w1 = torch.where(torch.isfinite(l1), torch.exp(l1 - safe), torch.zeros_like(l1))[..., None]
    w2 = torch.where(torch.isfinite(l2), torch.exp(l2 - safe), torch.zeros_like(l2))[..., None]
    out = w1 * out1.float() + w2 * out2.float()
    return out.to(out1.dtype), lse
