"""``s2o``: rank key blocks per segment, read them in that order, stop inside the kernel.

After S2O (ordered sparse attention with early stopping, 2025; the paper's body and code were not
reachable, so this follows its description). Queries are split into segments of ``segment`` rows;
each segment ranks the key blocks wholly before it by ``mean(q_seg) · mean(k_blk)`` (compared at 11
mantissa bits, ties by lower block id: :func:`rank_key`) and keeps the ranking as an index list (no
data movement). Every query block of ``block_q`` rows first reads its
segment's own keys densely under the causal mask (seeding the running max and sum), then walks the
ranked blocks from most to least important and stops once a block's share of the normaliser
falls below ``tau`` for every row of the tile (:mod:`blocksieve.ops.early_stop`). The number of
blocks read therefore adapts per query block and head. Per query head (``H = Hq``).

Addition: the first ``sink_blocks`` key blocks (attention sinks) are read right after the own
segment, before the ranked blocks. A mean-pooled key hides the one sink token, so the ranking
often places it late; without it the walk stops early on real attention (recall 0.68 at 20 %
density on SmolLM2, see docs/dev/blocks_notes.md). ``sink_blocks=0`` gives the plain rule.

Ranking statistic (``rank``): ``"mean"`` (default) scores a block by ``mean(q_seg) · mean(k_blk)``
(on CUDA, for head dims up to 128, the products of the past blocks only, on tensor cores:
:mod:`blocksieve.ops.segment_dot`);
``"lse"`` by ``log Σ_{j ∈ blk} exp(mean(q_seg) · k_j / √d)``, the mass the segment's mean query
gives the block (:func:`blocksieve.select.score.block_logsumexp`, O(segments · L · D) instead of
O(segments · blocks · D)), which does not average one strong key away (on CUDA a fused kernel,
:mod:`blocksieve.ops.segment_lse`, computes it without storing the scores; elsewhere, or for head
dims and block sizes that are not powers of two >= 16, or head dims above 256, a chunked PyTorch
rule); ``"sample"`` by the summed softmax mass that
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
from blocksieve.select.choose import CHUNK_ELEMENTS
from blocksieve.select.force import own_segment_blocks, segment_start
from blocksieve.select.pool import block_mean
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


RANK_DROP_BITS = 12
"""Low bits of a score's order-preserving int32 that the ranking ignores (11 mantissa bits are kept)."""


def rank_key(s: torch.Tensor) -> torch.Tensor:
    """Ranking key of fp32 scores ``[...]`` → int32 ``[...]``: the order of the scores at 11 mantissa bits.

    The score's order-preserving int32 without its low 12 bits: scores with the same sign, exponent
    and top 11 mantissa bits (at most 2⁻¹¹ relative apart) get one key and rank as ties, lower block
    id first; ``-0.0`` equals ``+0.0``. It lets the Triton ranking sort int32 keys
    ``(key << 12) | (4095 - id)`` instead of int64 ones; the ranking statistics are estimates far
    coarser than 5e-4 anyway.
    """
    bits = s.float().masked_fill(s == 0, 0.0).view(torch.int32)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits) >> RANK_DROP_BITS


def segment_order_torch(
    s: torch.Tensor, segment: int, block_q: int, block_k: int, q_len: int, kv_len: int, sink_blocks: int
) -> tuple:
    """S2O's ``(order int32 [B, Hq, NQ, K], forced int32 [B, Hq, NQ])`` from segment scores ``s [B, Hq, NS, NK]`` fp32.

    Per segment, the past non-sink blocks (wholly before it) with a score ``> -inf`` by descending
    :func:`rank_key`, ties by lower id (a stable sort); per query block the packed head (own segment blocks
    up to its last row, then sinks wholly before the segment) and right after it the ranked list
    of its segment, gathered in O(NQ · K); ``K = W + sink_blocks + NK``, -1 padded.
    """
    b, hq, ns, nk = s.shape
    dev = s.device
    off = (kv_len - q_len) % segment
    blk = torch.arange(nk, device=dev)
    seg_first = torch.arange(ns, device=dev) * segment + (kv_len - q_len - off)  # [NS] absolute
    out = ((blk[None, :] + 1) * block_k > seg_first[:, None]) | (blk < sink_blocks) | ~(s > float("-inf"))
    low = torch.iinfo(torch.int32).min
    vals, idx = rank_key(s).masked_fill(out, low).sort(dim=-1, descending=True, stable=True)
    ranked = torch.where(vals > low, idx, -1).to(torch.int32)  # [B, Hq, NS, NK]
    own = own_segment_blocks(block_q, block_k, q_len, kv_len, segment, dev)  # [NQ, W], valid prefix
    first = segment_start(block_q, q_len, kv_len, segment, dev)  # [NQ]
    n_own = (own >= 0).sum(-1)
    forced = n_own + (first // block_k).clamp(max=sink_blocks)  # [NQ]
    col = torch.arange(own.shape[1] + sink_blocks + nk, device=dev)
    rel = col - n_own[:, None]  # [NQ, K]
    head = torch.where(rel < 0, torch.nn.functional.pad(own, (0, col.numel() - own.shape[1])), rel)  # own, then sinks
    rel = col - forced[:, None]
    src = ((first - (kv_len - q_len - off)) // segment)[:, None] * nk + rel.clamp(0, nk - 1)  # [NQ, K] in [NS · NK]
    got = ranked.flatten(2).gather(-1, src.flatten().expand(b, hq, -1)).view(b, hq, *src.shape)
    order = torch.where(rel < 0, head.to(torch.int32), torch.where(rel < nk, got, -1))
    return order, forced.to(torch.int32).expand(b, hq, -1).contiguous()


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
        qs = block_mean(q, c.segment, off)  # [B, Hq, NS, D]
        base = lkv - lq - off  # absolute key position where segment 0 starts
        kernel = c.backend == "triton" or (c.backend == "auto" and k.is_cuda)  # try a Triton kernel ("auto": where it supports the shapes)
        if c.rank == "mean":
            kb = block_mean(k, c.block_k)  # [B, Hkv, NK, D]
            if kernel:
                from blocksieve.ops.segment_dot import kernel_supports, segment_block_dot_triton  # imports Triton: only when run

                if c.backend == "triton" or kernel_supports(d):
                    return segment_block_dot_triton(qs, kb, c.block_k, c.segment, base)
            return grouped_dot(qs, kb)
        if kernel:
            from blocksieve.ops.segment_lse import kernel_supports, segment_block_lse_triton  # imports Triton: only when run

            if c.backend == "triton" or kernel_supports(k, c.block_k):
                return segment_block_lse_triton(qs, k, c.block_k, d**-0.5, c.segment, base)
        return block_logsumexp(qs, k, c.block_k, d**-0.5)

    def plan(self, q: torch.Tensor, k: torch.Tensor) -> tuple:
        """``(order int32 [B, Hq, NQ, K], forced int32 [B, Hq, NQ])``: own segment, sinks, then ranked blocks.

        The ranking and the rows are written by :mod:`blocksieve.ops.segment_rank` on CUDA (``backend``
        ``"auto"`` or ``"triton"``, ``NK <= MAX_BLOCKS``), else by :func:`segment_order_torch`; both give
        the same result from the same scores.
        """
        c = self.config
        s = self.segment_scores(q, k)  # [B, Hq, NS, NK]
        args = (s, c.segment, c.block_q, c.block_k, q.shape[2], k.shape[2], c.sink_blocks)
        if c.backend == "triton" or (c.backend == "auto" and q.is_cuda):
            from blocksieve.ops.segment_rank import MAX_BLOCKS, segment_order_triton  # imports Triton: only when run

            if s.shape[-1] <= MAX_BLOCKS:
                return segment_order_triton(*args)
        return segment_order_torch(*args)

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
