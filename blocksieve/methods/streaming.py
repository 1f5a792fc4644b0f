"""``streaming``: StreamingLLM's static pattern — attention sinks plus a local window.

Xiao et al., "Efficient Streaming Language Models with Attention Sinks" (ICLR 2024). Every query
keeps the first ``sink_tokens`` keys and the ``local_tokens`` keys before it, at block granularity
(blocks that overlap either range are kept whole; the causal mask still applies per token).
The static floor every adaptive method must beat.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from blocksieve.layout import BlockLayout
from blocksieve.methods.base import SparseMethod
from blocksieve.methods.registry import register
from blocksieve.select.force import local_blocks, sink_blocks


@dataclass(frozen=True)
class StreamingConfig:
    sink_tokens: int = 64
    local_tokens: int = 1024
    block_q: int = 64
    block_k: int = 64


@register
class Streaming(SparseMethod):
    """Sink + local window, shared by each KV group (``H = Hkv``)."""

    name = "streaming"
    summary = "attention sinks + local window (StreamingLLM); static"
    Config = StreamingConfig
    supports_decode = True

    def check_config(self) -> None:
        c = self.config
        if c.sink_tokens < 0 or c.local_tokens < 0:
            raise ValueError("sink_tokens and local_tokens must be >= 0")
        if c.block_q <= 0 or c.block_k <= 0:
            raise ValueError("block_q and block_k must be positive")

    def select(self, q: torch.Tensor, k: torch.Tensor) -> BlockLayout:
        c = self.config
        b, hkv, lq, lkv = q.shape[0], k.shape[1], q.shape[2], k.shape[2]
        nq = math.ceil(lq / c.block_q)
        cand = torch.cat(
            [
                sink_blocks(nq, c.block_k, c.sink_tokens, q.device),
                local_blocks(c.block_q, c.block_k, lq, lkv, c.local_tokens, q.device),
            ],
            dim=1,
        )
        return BlockLayout.from_candidates(cand.expand(b, hkv, *cand.shape), c.block_q, c.block_k, lq, lkv, True)

    def select_step(self, q, k, state=None):
        return self.select(q, k), state
