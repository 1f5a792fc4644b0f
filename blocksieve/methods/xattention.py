"""``xattention``: block scores from strided antidiagonal sums, kept up to a cumulative threshold.

Xu et al., "XAttention: Block Sparse Attention with Antidiagonal Scoring" (ICML 2025). Inside each
``block × block`` tile of ``q · kᵀ`` the sum of every ``stride``-th antidiagonal is a cheap
proxy of the tile's mass: groups of ``stride`` query rows (reversed) and key rows are reshaped
into ``stride · D``-wide vectors whose dot products are those antidiagonal sums
(:func:`~blocksieve.select.pool.antidiagonal_pool`). A causal softmax over key groups, summed
within tiles and normalised per query block, gives the block mass; each query block keeps the
smallest set of blocks whose mass reaches ``tau``, plus the first block and the diagonal block(s).
Per query head (``H = Hq``).

Defaults: ``block=128, stride=8, tau=0.9`` (the paper's).

``backend``: ``"auto"`` (default) computes the block mass with the fused Triton kernel of
:mod:`blocksieve.ops.antidiagonal_mass` on CUDA (two passes over the key groups, never storing the
scores; the ``[B, Hq, NQ, NK]`` fp32 mass is then chosen from chunk by chunk) and with PyTorch
elsewhere, which builds the scores a chunk of query blocks at a time (``N/stride × N/stride`` per
head would not fit at long lengths); ``"triton"`` / ``"torch"`` force one.
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
    backend: str = "auto"


BACKENDS = ("auto", "triton", "torch")


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
        if c.backend not in BACKENDS:
            raise ValueError(f"backend={c.backend!r} is not one of {BACKENDS}")

    def _use_triton(self, q: torch.Tensor, k: torch.Tensor) -> bool:
        """``"auto"`` picks the kernel on CUDA for the inputs it takes."""
        if self.config.backend != "auto" or not q.is_cuda:
            return self.config.backend == "triton"
        from blocksieve.ops.antidiagonal_mass import kernel_supports

        return kernel_supports(q, k)

    def select(self, q: torch.Tensor, k: torch.Tensor) -> BlockLayout:
        c = self.config
        b, hq, lq, d = q.shape
        lkv = k.shape[2]
        if self._use_triton(q, k):
            from blocksieve.ops.antidiagonal_mass import antidiagonal_mass

            full = antidiagonal_mass(q, k, c.block, c.stride, d**-0.5)  # [B, Hq, NQ, NK]

            def block_mass(n0: int, n1: int) -> torch.Tensor:
                return full[:, :, n0:n1]

            cost = None
        else:
            q_r, k_r = antidiagonal_pool(q, k, c.stride)

            def block_mass(n0: int, n1: int) -> torch.Tensor:
                return antidiagonal_block_mass(q_r, k_r, n0, n1, c.block, c.stride, lq, lkv, d**-0.5)

            cost = (c.block // c.stride) * k_r.shape[2]  # antidiagonal scores per query block and head
        diag = diagonal_blocks(c.block, c.block, lq, lkv, q.device)  # [NQ, W]

        def mask_fn(n0: int, n1: int) -> torch.Tensor:
            keep = cumulative_mask(block_mass(n0, n1), c.tau)
            keep[..., 0] = True
            forced = torch.zeros(n1 - n0, keep.shape[-1] + 1, dtype=torch.bool, device=q.device)
            forced.scatter_(-1, torch.where(diag[n0:n1] >= 0, diag[n0:n1], keep.shape[-1]), True)
            return keep | forced[:, :-1]

        return chunked_layout(mask_fn, b, hq, c.block, c.block, lq, lkv, True, row_cost=cost)
