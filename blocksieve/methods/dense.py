"""``dense``: every causally visible key block (density 1). The baseline every method is compared to."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from blocksieve.layout import BlockLayout, causal_block_mask
from blocksieve.methods.base import SparseMethod
from blocksieve.methods.registry import register


@dataclass(frozen=True)
class DenseConfig:
    block_q: int = 128
    block_k: int = 128
    causal: bool = True


@register
class Dense(SparseMethod):
    """Full (causal) attention expressed as a layout shared by each KV group."""

    name = "dense"
    summary = "all visible key blocks (density 1); the exact baseline"
    Config = DenseConfig
    supports_decode = True

    def select(self, q: torch.Tensor, k: torch.Tensor) -> BlockLayout:
        c = self.config
        b, hkv, lq, lkv = q.shape[0], k.shape[1], q.shape[2], k.shape[2]
        mask = causal_block_mask(c.block_q, c.block_k, lq, lkv, q.device) if c.causal else None
        if mask is None:
            nq, nk = -(-lq // c.block_q), -(-lkv // c.block_k)
            mask = torch.ones(nq, nk, dtype=torch.bool, device=q.device)
        return BlockLayout.from_block_mask(mask.expand(b, hkv, *mask.shape), c.block_q, c.block_k, lq, lkv, c.causal)

    def select_step(self, q, k, state=None):
        return self.select(q, k), state
