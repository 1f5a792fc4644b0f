"""``s2o``: rank key blocks per segment, read them in that order, stop inside the kernel.

After S2O (ordered sparse attention with early stopping, 2025; the paper's body and code were not
reachable, so this follows its description). Queries are split into segments of ``segment`` rows;
each segment ranks the key blocks wholly before it by ``mean(q_seg) · mean(k_blk)`` and keeps the
ranking as an index list (no data movement). Every query block of ``block_q`` rows first reads its
segment's own keys densely under the causal mask (seeding the running max and sum), then walks the
ranked blocks from most to least important and stops once a block's share of the normaliser
falls below ``tau`` for every row of the tile (:mod:`blocksieve.ops.early_stop`). The number of
blocks read therefore adapts per query block and head. Per query head (``H = Hq``).

Addition: the first ``sink_blocks`` key blocks (attention sinks) are read right after the own
segment, before the ranked blocks. A mean-pooled key hides the one sink token, so the ranking
often places it late; without it the walk stops early on real attention (recall 0.68 at 20 %
density on SmolLM2, see docs/dev/blocks_notes.md). ``sink_blocks=0`` gives the plain rule.

Ranking statistic (``rank``): ``"mean"`` (default) scores a block by ``mean(q_seg) · mean(k_blk)``;
``"lse"`` by ``log Σ_{j ∈ blk} exp(mean(q_seg) · k_j / √d)``, the mass the segment's mean query
gives the block (:func:`blocksieve.select.score.block_logsumexp`, O(segments · L · D) instead of
O(segments · blocks · D)), which does not average one strong key away; ``"sample"`` by the summed softmax mass that
``rank_rows`` strided query rows of the segment give the block (an estimate of the segment's
true block mass; ``rank_rows / segment`` of the dense score cost, 1/32 by default).

:meth:`S2O.__call__` runs the early-stopping kernel in one pass. :meth:`S2O.select` returns the
blocks that pass reads, as an ordinary BlockLayout: the stop rule needs only ``q`` and ``k``, so
it runs the same walk without values (about half the attention's work) — for evaluation.

Defaults (``segment=128, block_q=64, block_k=64, tau=0.1``) were measured on real attention
(docs/dev/blocks_notes.md); the paper does not state them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from blocksieve.layout import BlockLayout
from blocksieve.methods.base import SparseMethod
from blocksieve.methods.registry import register
from blocksieve.select.choose import CHUNK_ELEMENTS, importance_order
from blocksieve.select.force import own_segment_blocks, segment_start
from blocksieve.select.pool import mean_pool
from blocksieve.select.score import block_logsumexp, grouped_dot


@dataclass(frozen=True)
class S2OConfig:
    segment: int = 128
    block_q: int = 64
    block_k: int = 64
    tau: float = 0.1
    sink_blocks: int = 1
    rank: str = "mean"
    rank_rows: int = 4
    backend: str = "auto"


def _pack(x: torch.Tensor) -> torch.Tensor:
    """Move the non-negative entries of each row to the front, keeping their order; -1 after."""
    n = x.shape[-1]
    key = torch.where(x >= 0, torch.arange(n, device=x.device), n + torch.arange(n, device=x.device))
    return torch.gather(x, -1, key.argsort(-1))


def sampled_block_logmass(q: torch.Tensor, k: torch.Tensor, segment: int, rows: int, block_k: int, off: int) -> torch.Tensor:
    """``log`` of the summed causal softmax mass of ``rows`` strided query rows of each segment per key block, ``[B, Hq, NS, NK]``.

    Row ``i`` of segment ``s`` is the last row of its ``segment / rows`` stride (clamped into the
    input; segment ``s`` starts ``off`` rows before query ``s · segment``). Computed in the log
    domain (tiny masses keep their order instead of underflowing to ties). Chunked over segments.
    """
    b, hq, lq, d = q.shape
    lkv = k.shape[2]
    ns = -(-(lq + off) // segment)
    nk = -(-lkv // block_k)
    stride = segment // rows
    out = torch.empty(b, hq, ns, nk, device=q.device)
    step = max(1, CHUNK_ELEMENTS // max(1, b * hq * rows * nk * block_k))
    for s0 in range(0, ns, step):
        s1 = min(ns, s0 + step)
        local = torch.arange(s0, s1, device=q.device)[:, None] * segment + torch.arange(rows, device=q.device) * stride + stride - 1 - off
        local = local.clamp(0, lq - 1).flatten()  # [(s1-s0) · rows]
        sc = grouped_dot(q[:, :, local], k, d**-0.5)
        pos = (lkv - lq) + local
        sc = sc.masked_fill(torch.arange(lkv, device=q.device)[None, :] > pos[:, None], float("-inf"))
        logp = torch.nn.functional.pad(sc - sc.logsumexp(-1, keepdim=True), (0, nk * block_k - lkv), value=float("-inf"))
        logp = logp.reshape(b, hq, s1 - s0, rows, nk, block_k).transpose(3, 4).flatten(-2)
        out[:, :, s0:s1] = logp.logsumexp(-1)
    return out


@register
class S2O(SparseMethod):
    """Ordered key blocks with in-kernel early stopping (see module docstring)."""

    name = "s2o"
    summary = "per-segment importance order of key blocks, stop when a block's share < tau (S2O)"
    Config = S2OConfig

    def check_config(self) -> None:
        c = self.config
        if c.block_q <= 0 or c.block_k <= 0 or c.segment <= 0:
            raise ValueError("segment, block_q and block_k must be positive")
        if c.segment % c.block_q or c.segment % c.block_k:
            raise ValueError(f"segment={c.segment} must be a multiple of block_q={c.block_q} and block_k={c.block_k}")
        if c.sink_blocks < 0:
            raise ValueError(f"sink_blocks must be >= 0, got {c.sink_blocks}")
        if not 0.0 <= c.tau < 1.0:
            raise ValueError(f"tau must lie in [0, 1), got {c.tau}")
        if c.rank not in ("mean", "lse", "sample"):
            raise ValueError(f"rank must be 'mean', 'lse' or 'sample' (see the module docstring), got {c.rank!r}")
        if c.rank_rows <= 0 or c.segment % c.rank_rows:
            raise ValueError(f"rank_rows={c.rank_rows} must be a positive divisor of segment={c.segment}")
        if c.backend not in ("auto", "triton", "torch"):
            raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {c.backend!r}")

    def segment_scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Ranking score of every key block for every query segment, ``[B, Hq, NS, NK]`` fp32."""
        c = self.config
        lq, d = q.shape[2], q.shape[3]
        lkv = k.shape[2]
        off = (lkv - lq) % c.segment
        if c.rank == "sample":
            return sampled_block_logmass(q, k, c.segment, c.rank_rows, c.block_k, off)
        qs = mean_pool(torch.nn.functional.pad(q, (0, 0, off, 0)), c.segment)  # [B, Hq, NS, D]
        if c.rank == "mean":
            return grouped_dot(qs, mean_pool(k, c.block_k))
        return block_logsumexp(qs, k, c.block_k, d**-0.5)

    def plan(self, q: torch.Tensor, k: torch.Tensor) -> tuple:
        """``(order int32 [B, Hq, NQ, K], forced int32 [B, Hq, NQ])``: own segment, sinks, then ranked blocks."""
        c = self.config
        b, hq, lq, _ = q.shape
        lkv = k.shape[2]
        off = (lkv - lq) % c.segment  # align segments to absolute positions
        s = self.segment_scores(q, k)  # [B, Hq, NS, NK]
        seg_first = (torch.arange(s.shape[2], device=q.device) * c.segment + (lkv - lq - off))  # [NS]
        ends = (torch.arange(s.shape[-1], device=q.device) + 1) * c.block_k
        sink = torch.arange(s.shape[-1], device=q.device) < c.sink_blocks
        ranked, _ = importance_order(s.masked_fill((ends[None, :] > seg_first[:, None]) | sink, float("-inf")))
        seg_of_block = (segment_start(c.block_q, lq, lkv, c.segment, q.device) - (lkv - lq - off)) // c.segment
        own = own_segment_blocks(c.block_q, c.block_k, lq, lkv, c.segment, q.device)  # [NQ, W]
        first = segment_start(c.block_q, lq, lkv, c.segment, q.device)
        sinks = torch.arange(c.sink_blocks, device=q.device).expand(own.shape[0], -1)
        sinks = torch.where((sinks + 1) * c.block_k <= first[:, None], sinks, -1)  # only sinks before the segment
        head = torch.cat([own, sinks], -1)
        forced = (head >= 0).sum(-1, dtype=torch.int32).expand(b, hq, -1).contiguous()
        order = torch.cat([head.expand(b, hq, -1, -1), ranked[:, :, seg_of_block]], -1)
        return _pack(order).to(torch.int32), forced

    def select(self, q: torch.Tensor, k: torch.Tensor) -> BlockLayout:
        c = self.config
        order, forced = self.plan(q, k)
        from blocksieve.ops.early_stop import early_stop_attention  # imports Triton: only when run

        _, _, n_read = early_stop_attention(q, k, None, order, forced, c.tau, c.block_q, c.block_k, backend=c.backend)
        cols = torch.arange(order.shape[-1], device=q.device)
        read = torch.where(cols < n_read[..., None], order, -1)
        return BlockLayout.from_candidates(read, c.block_q, c.block_k, q.shape[2], k.shape[2], True)

    def __call__(self, q, k, v, *, scale=None, return_lse=False):
        """One early-stopping pass: ``out [B, Hq, Lq, D]`` (or ``(out, lse)``)."""
        c = self.config
        order, forced = self.plan(q, k)
        from blocksieve.ops.early_stop import early_stop_attention

        out, lse, _ = early_stop_attention(q, k, v, order, forced, c.tau, c.block_q, c.block_k, scale, backend=c.backend)
        return (out, lse) if return_lse else out
