"""``xattention``: block scores from strided antidiagonal sums, kept up to a cumulative threshold.

Xu et al., "XAttention: Block Sparse Attention with Antidiagonal Scoring" (ICML 2025). Inside each
``block × block`` tile of ``q · kᵀ`` the sum of every ``stride``-th antidiagonal is a cheap
proxy of the tile's mass: groups of ``stride`` query rows (reversed) and key rows are reshaped
into ``stride · D``-wide vectors whose dot products are those antidiagonal sums
(:func:`~blocksieve.select.pool.antidiagonal_pool`). A causal softmax over key groups, summed
within tiles and normalised per query block, gives the block mass; each query block keeps the
smallest set of blocks whose mass reaches ``tau``, plus the first block and the diagonal block(s).
Per query head (``H = Hq``).

Defaults: ``block=128, stride=8, tau=0.9`` (the paper's). Scores are built a chunk of query
blocks at a time (``N/stride × N/stride`` per head would not fit at long lengths).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from blocksieve.layout import BlockLayout
from blocksieve.methods.base import SparseMethod
from blocksieve.methods.registry import register
from blocksieve.select.choose import chunked_layout, cumulative_mask
from blocksieve.select.force import diagonal_blocks
from blocksieve.select.pool import antidiagonal_pool
from blocksieve.select.score import antidiagonal_block_mass


@dataclass(frozen=True)
class XAttentionConfig:
    block: int = 128
    stride: int = 8
    tau: float = 0.9


@register
class XAttention(SparseMethod):
    """Antidiagonal block scoring + cumulative threshold (see module docstring)."""

    name = "xattention"
    summary = "strided antidiagonal block scores, cumulative mass tau, first + diagonal blocks (XAttention)"
    Config = XAttentionConfig

    def check_config(self) -> None:
        c = self.config
        if c.stride <= 0 or c.block <= 0 or c.block % c.stride:
            raise ValueError(f"block={c.block} must be a positive multiple of stride={c.stride}")
        if not 0.0 < c.tau <= 1.0:
            raise ValueError(f"tau must lie in (0, 1], got {c.tau}")

    def select(self, q: torch.Tensor, k: torch.Tensor) -> BlockLayout:
        c = self.config
        b, hq, lq, d = q.shape
        lkv = k.shape[2]
        q_r, k_r = antidiagonal_pool(q, k, c.stride)
        diag = diagonal_blocks(c.block, c.block, lq, lkv, q.device)  # [NQ, W]

        def mask_fn(n0: int, n1: int) -> torch.Tensor:
            mass = antidiagonal_block_mass(q_r, k_r, n0, n1, c.block, c.stride, lq, lkv, d**-0.5)
            keep = cumulative_mask(mass, c.tau)
            keep[..., 0] = True
            forced = torch.zeros(n1 - n0, keep.shape[-1] + 1, dtype=torch.bool, device=q.device)
            forced.scatter_(-1, torch.where(diag[n0:n1] >= 0, diag[n0:n1], keep.shape[-1]), True)
            return keep | forced[:, :-1]

        cost = (c.block // c.stride) * k_r.shape[2]  # antidiagonal scores per query block and head
        return chunked_layout(mask_fn, b, hq, c.block, c.block, lq, lkv, True, row_cost=cost)
