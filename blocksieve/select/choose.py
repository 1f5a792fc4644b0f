"""Choosing key blocks from scores: top-k, smallest set reaching a cumulative mass, importance order.

Choosers work on a chunk of query blocks (``[B, H, C, NK]`` scores) and return boolean masks or
ordered ids; :func:`chunked_layout` runs a per-chunk mask function over all query blocks and
assembles the :class:`~blocksieve.layout.BlockLayout` without host synchronisation and without
holding more than one chunk of scores.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from blocksieve.layout import BlockLayout, causal_block_mask

CHUNK_ELEMENTS = 1 << 26
"""Score entries per chunk of query blocks (256 MiB of fp32)."""


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` largest scores along the last dim (``-inf`` entries never; ``+inf`` forces an entry).

    The top-k is taken unsorted: a mask needs no order, and without the sort of the ``k`` winners
    vertical_slash's selection (two top-ks of 1,000 and 6,096 per head) takes 14-15 % less time at
    32K on CUDA (H100, ``benchmarks/results/last_rows_ab_h100_s17*.json``).
    """
    k = min(int(k), scores.shape[-1])
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    vals, idx = scores.topk(k, -1, sorted=False)
    out = torch.zeros_like(scores, dtype=torch.bool)
    return out.scatter_(-1, idx, vals > float("-inf"))


def topk_ids(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Ids of the ``k`` largest scores along the last dim, -1 where the score is ``-inf``."""
    k = min(int(k), scores.shape[-1])
    vals, idx = scores.topk(k, -1)
    return torch.where(vals > float("-inf"), idx, -1)


def cumulative_mask(mass: torch.Tensor, tau: float) -> torch.Tensor:
    """Smallest set of entries whose mass reaches ``tau`` of the row's total (nucleus / top-p).

    ``mass [..., N]`` is non-negative (need not be normalised). An entry is kept iff the mass of
    the entries ranked strictly before it is below ``tau · total``; rows of zero mass keep nothing.
    """
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"tau must lie in (0, 1], got {tau}")
    vals, idx = mass.sort(-1, descending=True)
    total = vals.sum(-1, keepdim=True)
    before = vals.cumsum(-1) - vals
    keep = (before < tau * total) & (vals > 0)
    return torch.zeros_like(keep).scatter_(-1, idx, keep)


def importance_order(scores: torch.Tensor) -> tuple:
    """Entries ranked from highest to lowest score: ``(ids [..., N] with -1 for -inf, count [...])``."""
    vals, idx = scores.sort(-1, descending=True)
    ok = vals > float("-inf")
    return torch.where(ok, idx, -1), ok.sum(-1, dtype=torch.int32)


def vertical_slash_block_mask(
    columns: torch.Tensor, slashes: torch.Tensor, n0: int, n1: int, block_q: int, block_k: int, q_len: int, kv_len: int
) -> torch.Tensor:
    """Key blocks that hold a chosen column or cross a chosen diagonal, for query blocks ``[n0, n1)``.

    Args:
        columns: bool ``[B, H, Lkv]``, chosen key positions (vertical lines).
        slashes: bool ``[B, H, Lkv]``, chosen diagonal offsets ``d`` (key = query position - d).
    Returns:
        bool ``[B, H, n1-n0, NK]``. A query block whose rows sit at positions ``[p0, p1]`` meets
        diagonal ``d`` in key block ``j`` iff ``d ∈ [p0 - (j+1)·block_k + 1, p1 - j·block_k]``;
        counted with a prefix sum over ``slashes``, so the cost is O(chunk · NK).
    """
    b, h, lkv = columns.shape
    nk = math.ceil(lkv / block_k)
    dev = columns.device
    col_blocks = torch.nn.functional.pad(columns, (0, nk * block_k - lkv)).reshape(b, h, nk, block_k).any(-1)
    csum = torch.nn.functional.pad(slashes.to(torch.int32).cumsum(-1), (1, 0))  # [B, H, Lkv + 1]
    rows = torch.arange(n0, n1, device=dev)
    p0 = rows * block_q + (kv_len - q_len)
    p1 = torch.clamp((rows + 1) * block_q, max=q_len) - 1 + (kv_len - q_len)
    j = torch.arange(nk, device=dev)
    lo = (p0[:, None] - (j[None, :] + 1) * block_k + 1).clamp(0, lkv)  # [C, NK]
    hi = (p1[:, None] - j[None, :] * block_k + 1).clamp(0, lkv)
    hits = csum[..., hi.flatten()] - csum[..., lo.flatten()]
    return col_blocks[:, :, None, :] | (hits.reshape(b, h, n1 - n0, nk) > 0)


def compact_ids(mask: torch.Tensor, width: int) -> torch.Tensor:
    """Ids of the ``True`` entries of ``mask [..., N]`` in increasing order, ``[..., width]`` int32, -1 padded.

    O(N): the running count of kept entries gives each one its slot, and the ids are scattered
    there; slots past ``width`` go to a spare column that is cut off, so rows with more entries
    keep their ``width`` lowest ids. No sort and no host synchronisation.
    """
    slot = mask.cumsum(-1, dtype=torch.int32) - 1
    slot = torch.where(mask & (slot < width), slot, width).long()
    ar = torch.arange(mask.shape[-1], dtype=torch.int32, device=mask.device).expand_as(slot)
    out = torch.full((*mask.shape[:-1], width + 1), -1, dtype=torch.int32, device=mask.device)
    return out.scatter_(-1, slot, ar)[..., :width]


def chunked_layout(
    mask_fn: Callable[[int, int], torch.Tensor],
    batch: int,
    heads: int,
    block_q: int,
    block_k: int,
    q_len: int,
    kv_len: int,
    causal: bool = True,
    width: int | None = None,
    row_cost: int | None = None,
) -> BlockLayout:
    """Build a BlockLayout from ``mask_fn(n0, n1) -> bool [B, H, n1-n0, NK]`` evaluated in chunks.

    Future blocks are dropped for causal layouts. The layout keeps ``min(width, NK)`` columns
    (default NK); rows with more selected blocks are truncated to their lowest ids, so pass a
    width that bounds the selection when one is known. ``row_cost`` is the number of score entries
    ``mask_fn`` builds per query block and head (default NK); chunks hold ``CHUNK_ELEMENTS`` of them.
    """
    nq, nk = math.ceil(q_len / block_q), math.ceil(kv_len / block_k)
    width = nk if width is None else max(1, min(width, nk))
    step = max(1, CHUNK_ELEMENTS // max(1, batch * heads * max(nk, row_cost or 0)))
    ids, cnts = [], []
    for n0 in range(0, nq, step):
        n1 = min(nq, n0 + step)
        m = mask_fn(n0, n1)
        if causal:
            m = m & causal_block_mask(block_q, block_k, q_len, kv_len, m.device)[n0:n1]
        ids.append(compact_ids(m, width))
        cnts.append(m.sum(-1, dtype=torch.int32).clamp_max(width))
    return BlockLayout(torch.cat(ids, 2).contiguous(), torch.cat(cnts, 2), block_q, block_k, q_len, kv_len, causal)


def vertical_slash_layout(
    columns: torch.Tensor,
    slashes: torch.Tensor,
    block_q: int,
    block_k: int,
    q_len: int,
    kv_len: int,
    width: int | None = None,
    backend: str = "auto",
) -> BlockLayout:
    """Causal layout of the key blocks that hold a chosen column or cross a chosen diagonal.

    ``columns``/``slashes`` are bool ``[B, H, Lkv]`` as in :func:`vertical_slash_block_mask`; rows
    keep ``min(width, NK)`` ids (default NK), the lowest when more are chosen. ``backend="triton"``
    (the default on CUDA) writes each row directly with
    :func:`blocksieve.ops.last_rows_stats.vertical_slash_layout_triton`; ``"torch"`` (the default
    elsewhere) runs :func:`chunked_layout` over :func:`vertical_slash_block_mask`.
    """
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend={backend!r} is not one of ('auto', 'triton', 'torch')")
    b, h = columns.shape[:2]
    nk = math.ceil(kv_len / block_k)
    width = nk if width is None else max(1, min(width, nk))
    if backend == "triton" or (backend == "auto" and columns.is_cuda):
        from blocksieve.ops.last_rows_stats import vertical_slash_layout_triton

        ids, counts = vertical_slash_layout_triton(columns, slashes, block_q, block_k, q_len, kv_len, width)
        return BlockLayout(ids, counts, block_q, block_k, q_len, kv_len, True)

    def mask_fn(n0: int, n1: int) -> torch.Tensor:
        return vertical_slash_block_mask(columns, slashes, n0, n1, block_q, block_k, q_len, kv_len)

    return chunked_layout(mask_fn, b, h, block_q, block_k, q_len, kv_len, True, width)


def expand_block_ids(ids: torch.Tensor, factor: int) -> torch.Tensor:
    """Coarse block ids ``[..., C]`` → the ``factor`` fine blocks each covers, ``[..., C·factor]`` (-1 stays -1)."""
    fine = ids[..., None] * factor + torch.arange(factor, device=ids.device)
    return torch.where(ids[..., None] >= 0, fine, -1).flatten(-2)
