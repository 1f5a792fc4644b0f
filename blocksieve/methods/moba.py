"""``moba``: Mixture of Block Attention — mean-pooled key blocks, top-k gate, own block always kept.

Lu et al., "MoBA: Mixture of Block Attention for Long-Context LLMs" (2025); FlashMoBA (Xiao et al.,
2025). Keys are split into blocks of ``moba_block``; the gate score of block ``i`` for a query
is ``q · mean(K[block i])`` (fp32). Future blocks and the query's own block are excluded from the
gate; the top ``top_k - 1`` fully-past blocks are kept, plus the own block(s) under the causal
mask. Each query head gates independently (``H = Hq``).

Defaults are the paper's 8K setting, ``moba_block=512, top_k=3``; the 1M setting is
``moba_block=4096, top_k=12``. FlashMoBA's finer setting ``moba_block=128, top_k=8`` selects
better at equal sparsity (the gate's signal-to-noise grows as blocks shrink). ``key_conv`` is
FlashMoBA's short causal depthwise key convolution (weights ``[W]``, ``[Hkv, W]`` or
``[Hkv, D, W]`` from a trained model; ``None`` = identity); it sharpens the gate only — attention
reads the keys as given.

Granularity: MoBA gates each query token. Here a gate is taken per query block of ``block_q``
rows using the block's mean query (the kernel's tile), and the chosen ``moba_block`` blocks are
expressed as ``moba_block / block_k`` kernel blocks. ``block_q=64`` is the smallest query tile the
kernel runs; the test checks this exact rule.

``sink_blocks`` (default 0, not in the paper) also keeps the first key blocks (attention sinks),
outside the top-k. MoBA's gate is trained with the model; on a model trained with dense attention
the mean-pooled gate rarely ranks the sink block first, which costs most of its recall: on
SmolLM2-135M (4K) and Qwen2.5-Coder-0.5B (16K) the paper's gate reaches 0.59-0.81 of the oracle's
recall at 10 % density, ``sink_blocks=1`` 0.94-0.99 (docs/dev/blocks_notes.md). Use
``sink_blocks=1`` on models trained with dense attention.

``backend``: ``"auto"`` (default) runs the fused Triton selector
(:func:`blocksieve.ops.moba_gate.moba_layout`, same layout up to near-ties in the gate) on CUDA for
head dims up to 512 (``moba_gate.MAX_HEAD_DIM``) and the PyTorch path below elsewhere; ``"triton"`` /
``"torch"`` force one (``"triton"`` on the CPU needs ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from blocksieve.layout import BlockLayout
from blocksieve.methods.base import SparseMethod
from blocksieve.methods.registry import register
from blocksieve.select.choose import expand_block_ids, topk_ids
from blocksieve.select.force import query_block_span
from blocksieve.select.pool import causal_key_conv, mean_pool
from blocksieve.select.score import grouped_dot


@dataclass(frozen=True)
class MoBAConfig:
    moba_block: int = 512
    top_k: int = 3
    block_q: int = 64
    block_k: int = 128
    key_conv: Any | None = None
    sink_blocks: int = 0
    backend: str = "auto"


BACKENDS = ("auto", "triton", "torch")


@register
class MoBA(SparseMethod):
    """Per-head top-k of mean-pooled key blocks plus the own block (see module docstring)."""

    name = "moba"
    summary = "mean-pooled block top-k gate + own block, per query head (MoBA / FlashMoBA)"
    Config = MoBAConfig

    def check_config(self) -> None:
        c = self.config
        if c.top_k < 1:
            raise ValueError(f"top_k must be >= 1 (it counts the own block), got {c.top_k}")
        if c.block_q <= 0 or c.block_k <= 0 or c.moba_block <= 0:
            raise ValueError("moba_block, block_q and block_k must be positive")
        if c.sink_blocks < 0:
            raise ValueError(f"sink_blocks must be >= 0, got {c.sink_blocks}")
        if c.moba_block % c.block_k:
            raise ValueError(f"moba_block={c.moba_block} must be a multiple of block_k={c.block_k}")
        if c.backend not in BACKENDS:
            raise ValueError(f"backend={c.backend!r} is not one of {BACKENDS}")

    def select(self, q: torch.Tensor, k: torch.Tensor) -> BlockLayout:
        c = self.config
        b, hq, lq, _ = q.shape
        lkv = k.shape[2]
        kg = k if c.key_conv is None else causal_key_conv(k, torch.as_tensor(c.key_conv))
        if c.backend == "triton" or (c.backend == "auto" and q.is_cuda):
            from blocksieve.ops.moba_gate import MAX_HEAD_DIM, moba_layout

            if c.backend == "triton" or q.shape[-1] <= MAX_HEAD_DIM:
                return moba_layout(
                    q, kg, moba_block=c.moba_block, top_k=c.top_k, block_q=c.block_q, block_k=c.block_k, sink_blocks=c.sink_blocks
                )
        gate = grouped_dot(mean_pool(q, c.block_q), mean_pool(kg, c.moba_block))  # [B, Hq, NQ, NKm]
        first, last = query_block_span(c.block_q, lq, lkv, q.device)
        ends = (torch.arange(gate.shape[-1], device=q.device) + 1) * c.moba_block - 1
        gate = gate.masked_fill(ends[None, :] >= first[:, None], float("-inf"))  # own and future blocks
        chosen = topk_ids(gate, c.top_k - 1) if c.top_k > 1 else gate.new_empty(*gate.shape[:3], 0).long()
        own_lo, own_hi = first // c.moba_block, last // c.moba_block
        span = math.ceil((c.block_q - 1) / c.moba_block) + 1
        own = own_lo[:, None] + torch.arange(span, device=q.device)
        own = torch.where(own <= own_hi[:, None], own, -1).expand(b, hq, -1, -1)
        sink = torch.arange(c.sink_blocks, device=q.device).expand(b, hq, gate.shape[2], -1)
        coarse = torch.cat([chosen, own, sink], -1)
        fine = expand_block_ids(coarse, c.moba_block // c.block_k)
        return BlockLayout.from_candidates(fine, c.block_q, c.block_k, lq, lkv, True)
