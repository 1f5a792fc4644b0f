"""Pooling of queries or keys into blocks: mean, max, min/max bounds, strided antidiagonal, sampled.

All functions take ``x [B, H, L, D]`` and a block size and return one vector per block,
``[B, H, ceil(L / block), D]`` (fp32), counting only the real tokens of a last, partial block.
Cost is O(L · D); nothing quadratic is built.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _blocked(x: torch.Tensor, block: int, fill: float = 0.0, keep_dtype: bool = False) -> tuple:
    """Pad ``x [B, H, L, D]`` to whole blocks: ``([B, H, NB, block, D] fp32, valid [NB, block] bool)``."""
    if block <= 0:
        raise ValueError(f"block must be a positive int, got {block}")
    b, h, length, d = x.shape
    nb = math.ceil(length / block)
    xp = F.pad(x if keep_dtype else x.float(), (0, 0, 0, nb * block - length), value=fill).reshape(b, h, nb, block, d)
    valid = (torch.arange(nb * block, device=x.device) < length).reshape(nb, block)
    return xp, valid


def mean_pool(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean of each block of ``block`` rows: ``[B, H, L, D]`` → ``[B, H, NB, D]`` fp32."""
    xp, valid = _blocked(x, block)
    return xp.sum(3) / valid.sum(1).clamp_min(1)[:, None].to(xp.dtype)


def block_mean(x: torch.Tensor, block: int, off: int = 0) -> torch.Tensor:
    """:func:`mean_pool` (of ``x`` after ``off`` zero rows in front) without an fp32 copy of ``x``.

    ``[B, H, L, D]`` → ``[B, H, NB, D]`` fp32: block sums accumulate in fp32 inside the reduction
    (``sum(dtype=float32)``) over views of ``x``, so a bf16 ``q`` is read once; ``x`` is copied only
    when ``off > 0``. The ``off`` zero rows count in the first block's mean; a last, partial block
    is averaged over its real rows. The selectors' GPU paths use it on long inputs.
    """
    if block <= 0:
        raise ValueError(f"block must be a positive int, got {block}")
    if off:
        x = F.pad(x, (0, 0, off, 0))
    length = x.shape[2]
    full = length // block
    means = x[:, :, : full * block].unflatten(2, (full, block)).sum(3, dtype=torch.float32) / block
    if length == full * block:
        return means
    tail = x[:, :, full * block :].sum(2, keepdim=True, dtype=torch.float32) / (length - full * block)
    return torch.cat([means, tail], 2)


def max_pool(x: torch.Tensor, block: int) -> torch.Tensor:
    """Channel-wise maximum of each block: ``[B, H, L, D]`` → ``[B, H, NB, D]`` fp32."""
    return _blocked(x, block, fill=float("-inf"))[0].amax(3)


def minmax_pool(x: torch.Tensor, block: int) -> tuple:
    """Channel-wise ``(min, max)`` of each block (Quest's page bounds), two ``[B, H, NB, D]`` fp32."""
    lo = _blocked(x, block, fill=float("inf"))[0].amin(3)
    return lo, max_pool(x, block)


def sample_pool(x: torch.Tensor, block: int, samples: int) -> torch.Tensor:
    """``samples`` evenly spaced rows of each block, averaged: a cheap estimate of the mean.

    Rows are taken at offsets ``round((i + 0.5) * block / samples)``; in a partial last block
    offsets past the end fall back to its last row.
    """
    if not 0 < samples <= block:
        raise ValueError(f"samples must lie in [1, block={block}], got {samples}")
    b, h, length, d = x.shape
    nb = math.ceil(length / block)
    offs = ((torch.arange(samples, device=x.device) + 0.5) * block / samples).long()
    rows = torch.arange(nb, device=x.device)[:, None] * block + offs  # [NB, S]
    rows = torch.minimum(rows, torch.full_like(rows, length - 1))
    return x.float()[:, :, rows.flatten()].reshape(b, h, nb, samples, d).mean(3)


def antidiagonal_pool(q: torch.Tensor, k: torch.Tensor, stride: int) -> tuple:
    """XAttention's strided antidiagonal reshaping.

    Groups ``stride`` consecutive rows into one vector of ``stride · D`` channels, the query
    group in reversed row order, so that ``q_r[m] · k_r[n] = Σ_i q[m·S + S-1-i] · k[n·S + i]``:
    the sum of the antidiagonal of the ``S × S`` tile of ``q · kᵀ``.

    Args:
        q: ``[B, Hq, Lq, D]``; k: ``[B, Hkv, Lkv, D]``; lengths are zero-padded to multiples of S.
    Returns:
        ``(q_r [B, Hq, ceil(Lq/S), S·D], k_r [B, Hkv, ceil(Lkv/S), S·D])`` in the inputs' dtype.
    """
    qb = _blocked(q, stride, keep_dtype=True)[0].flip(3)
    kb = _blocked(k, stride, keep_dtype=True)[0]
    return qb.flatten(3), kb.flatten(3)


def causal_key_conv(k: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Short causal depthwise convolution over key positions (FlashMoBA's key conv).

    Args:
        k: ``[B, H, L, D]``.
        weight: ``[W]`` (shared), ``[H, W]`` (per head) or ``[H, D, W]`` (per channel);
            ``weight[..., -1]`` multiplies the current key, ``weight[..., -2]`` the previous one.
    Returns:
        ``[B, H, L, D]`` in fp32: ``Σ_w weight[w] · k[t - (W-1) + w]`` with zeros before position 0.
    """
    b, h, length, d = k.shape
    w = weight.float().to(k.device)
    if w.dim() == 1:
        w = w.expand(h, d, -1)
    elif w.dim() == 2:
        if w.shape[0] != h:
            raise ValueError(f"conv weight has {w.shape[0]} heads, k has {h}: pass [W], [H, W] or [H, D, W]")
        w = w[:, None].expand(h, d, -1)
    elif w.shape[:2] != (h, d):
        raise ValueError(f"conv weight must be [W], [H={h}, W] or [H={h}, D={d}, W]; got {tuple(w.shape)}")
    width = w.shape[-1]
    x = F.pad(k.float().permute(0, 1, 3, 2).reshape(b, h * d, length), (width - 1, 0))
    y = F.conv1d(x, w.reshape(h * d, 1, width), groups=h * d)
    return y.reshape(b, h, d, length).permute(0, 1, 3, 2)
