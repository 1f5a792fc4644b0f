"""Permutations of keys within segments (PBS-Attn): important keys packed into fewer blocks.

A permutation ``perm [B, H, L]`` maps new position ``i`` to original position ``perm[..., i]``;
it only moves keys inside their own segment, so segment boundaries (and therefore which queries
can see a whole segment) are unchanged.
"""

from __future__ import annotations

import torch


def segment_sort(importance: torch.Tensor, segment: int) -> torch.Tensor:
    """Sort positions by ``importance [B, H, L]`` (descending) inside each full segment.

    The tail after the last full segment keeps its order. Returns ``perm [B, H, L]`` int64.
    """
    if segment <= 0:
        raise ValueError(f"segment must be a positive int, got {segment}")
    b, h, length = importance.shape
    full = (length // segment) * segment
    base = torch.arange(length, device=importance.device).expand(b, h, length)
    if full == 0:
        return base.clone()
    order = importance[..., :full].reshape(b, h, -1, segment).argsort(dim=-1, descending=True, stable=True)
    seg0 = torch.arange(0, full, segment, device=importance.device)[:, None]
    return torch.cat([(order + seg0).reshape(b, h, full), base[..., full:]], -1)


def apply_permutation(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``x [B, H, L, D]`` reordered along L by ``perm [B, H, L]``: ``out[..., i, :] = x[..., perm[i], :]``.

    On CUDA :func:`permute_by_gather`, elsewhere :func:`permute_by_row_copy`: each is the faster where
    it runs. PBS's selection took 0.706 ms with the gather and 0.759 ms with the row copy at 32K on an
    H100 (``last_rows_ab_h100_s19_call1.json``), while on a 2-core CPU a ``[1, 8, 16384, 128]`` bf16 K
    took 115 ms with the gather and 16.6 ms with the row copy (session 18).
    """
    b, h, length, _ = x.shape
    if perm.shape != (b, h, length):
        raise ValueError(f"perm must be [B, H, L] = {(b, h, length)} to reorder x {tuple(x.shape)}, got {tuple(perm.shape)}")
    return permute_by_gather(x, perm) if x.is_cuda else permute_by_row_copy(x, perm)


def permute_by_gather(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """:func:`apply_permutation` as one ``torch.gather`` with the index expanded over ``D`` (no shape check)."""
    return torch.gather(x, 2, perm[..., None].expand(-1, -1, -1, x.shape[-1]))


def permute_by_row_copy(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """:func:`apply_permutation` copying whole rows of the flattened ``[B · H · L, D]`` (``index_select``; no shape check)."""
    b, h, length, d = x.shape
    rows = (perm + torch.arange(0, b * h * length, length, device=perm.device).view(b, h, 1)).reshape(-1)
    return x.reshape(b * h * length, d).index_select(0, rows).view(b, h, length, d)


def invert_permutation(perm: torch.Tensor) -> torch.Tensor:
    """The inverse permutation: ``inv[perm[i]] = i``."""
    ar = torch.arange(perm.shape[-1], device=perm.device).expand_as(perm)
    return torch.empty_like(perm).scatter_(-1, perm, ar)
