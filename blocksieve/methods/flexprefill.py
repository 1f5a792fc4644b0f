"""``flexprefill``: per head, query-aware block selection or vertical-slash, chosen by a JS test.

Lai et al., "FlexPrefill: A Context-Aware Sparse Attention Mechanism for Efficient Long-Sequence
Inference" (ICLR 2025). For each head, the last ``block`` queries ``Q̂`` attend densely:
``ā`` = their mean attention summed per key block; ``â`` = softmax of the pooled last query block
against the mean-pooled key blocks. If ``sqrt(JSD(ā, â)) < tau`` the pooled estimate is
trustworthy and the head uses the **query-aware** pattern: every query block scores key blocks by
``softmax(mean(q_blk) · mean(k_blk) / √d)`` and keeps the smallest set reaching ``gamma``.
Otherwise it uses **vertical-slash**: from ``Q̂``'s attention, the smallest sets of columns and of
diagonals whose normalised mass reaches ``gamma`` each, turned into blocks. Both keep the first
block and the diagonal block(s). Per query head (``H = Hq``).

Defaults: ``block=128, gamma=0.9, tau=0.1`` (the paper's; gamma 0.9–0.95 in its experiments).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from blocksieve.layout import BlockLayout, causal_block_mask
from blocksieve.methods.base import SparseMethod
from blocksieve.methods.registry import register
from blocksieve.select.choose import chunked_layout, cumulative_mask, vertical_slash_block_mask
from blocksieve.select.force import diagonal_blocks
from blocksieve.select.pool import mean_pool
from blocksieve.select.score import grouped_dot, last_rows_probs, masked_softmax, slash_sums


@dataclass(frozen=True)
class FlexPrefillConfig:
    block: int = 128
    gamma: float = 0.9
    tau: float = 0.1


def js_distance(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """``sqrt(JSD(p, q))`` (natural log) along the last dim of two distributions."""
    p = p / p.sum(-1, keepdim=True).clamp_min(eps)
    q = q / q.sum(-1, keepdim=True).clamp_min(eps)
    m = 0.5 * (p + q)

    def kl(a, b):
        return (a * (torch.log(a.clamp_min(eps)) - torch.log(b.clamp_min(eps)))).sum(-1)

    return (0.5 * kl(p, m) + 0.5 * kl(q, m)).clamp_min(0).sqrt()


@register
class FlexPrefill(SparseMethod):
    """Query-aware or vertical-slash per head by a Jensen–Shannon test (see module docstring)."""

    name = "flexprefill"
    summary = "per-head query-aware blocks (gamma) or vertical-slash, chosen by JS distance (FlexPrefill)"
    Config = FlexPrefillConfig

    def check_config(self) -> None:
        c = self.config
        if c.block <= 0:
            raise ValueError(f"block must be positive, got {c.block}")
        if not 0.0 < c.gamma <= 1.0:
            raise ValueError(f"gamma must lie in (0, 1], got {c.gamma}")
        if c.tau < 0:
            raise ValueError(f"tau must be >= 0, got {c.tau}")

    def query_aware_heads(self, q: torch.Tensor, k: torch.Tensor) -> tuple:
        """``(use_query_aware bool [B, Hq], probs of the last block's rows [B, Hq, R, Lkv])``."""
        c = self.config
        lq, lkv, d = q.shape[2], k.shape[2], q.shape[3]
        nk = -(-lkv // c.block)
        probs = last_rows_probs(q, k, c.block, d**-0.5)  # [B, Hq, R, Lkv]
        a_true = torch.nn.functional.pad(probs.mean(2), (0, nk * c.block - lkv)).reshape(*probs.shape[:2], nk, c.block).sum(-1)
        q_last = q[:, :, lq - probs.shape[2] :].float().mean(2, keepdim=True)
        s = grouped_dot(q_last, mean_pool(k, c.block), d**-0.5)[:, :, 0]  # [B, Hq, NK]
        last_pos = lkv - 1
        s = s.masked_fill(torch.arange(nk, device=q.device) * c.block > last_pos, float("-inf"))
        return js_distance(a_true, masked_softmax(s)) < c.tau, probs

    def select(self, q: torch.Tensor, k: torch.Tensor) -> BlockLayout:
        c = self.config
        b, hq, lq, d = q.shape
        lkv = k.shape[2]
        use_qa, probs = self.query_aware_heads(q, k)
        cols = cumulative_mask(probs.sum(2), c.gamma)
        slashes = cumulative_mask(slash_sums(probs, lq, lkv), c.gamma)
        qp, kp = mean_pool(q, c.block), mean_pool(k, c.block)
        allowed = causal_block_mask(c.block, c.block, lq, lkv, q.device)
        diag = diagonal_blocks(c.block, c.block, lq, lkv, q.device)

        def mask_fn(n0: int, n1: int) -> torch.Tensor:
            s = grouped_dot(qp[:, :, n0:n1], kp, d**-0.5).masked_fill(~allowed[n0:n1], float("-inf"))
            qa = cumulative_mask(masked_softmax(s), c.gamma)
            vs = vertical_slash_block_mask(cols, slashes, n0, n1, c.block, c.block, lq, lkv)
            keep = torch.where(use_qa[:, :, None, None], qa, vs)
            forced = torch.zeros(n1 - n0, keep.shape[-1] + 1, dtype=torch.bool, device=q.device)
            forced.scatter_(-1, torch.where(diag[n0:n1] >= 0, diag[n0:n1], keep.shape[-1]), True)
            forced[:, 0] = True
            return keep | forced[:, :-1]

        return chunked_layout(mask_fn, b, hq, c.block, c.block, lq, lkv, True)
