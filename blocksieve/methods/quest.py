"""``quest``: query-aware page selection for decode from per-page key bounds.

Tang et al., "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference" (ICML 2024).
The key cache is split into pages of ``page`` tokens; each page keeps the channel-wise minimum
and maximum of its keys, maintained incrementally as the cache grows (:meth:`Quest.select_step`
state: only pages completed since the last step are reduced). A query's page score is the upper
bound ``Σ_d max(q_d · max_d, q_d · min_d) ≥ q · k`` for every key of the page; each head keeps the
page holding its current position plus the top ``token_budget / page`` other pages. Per query head.

Decode rows (``Lq`` new queries, right-aligned to the cache) are grouped in query blocks of
``block_q``; a block's page score is the sum of its rows' bounds (one block for ordinary decode).
The layout is a BlockLayout with ``block_k = page``.

Defaults: ``page=16``, ``token_budget=2048`` (the paper uses 1–4K). ``dense_layers=2`` records the
paper's practice of running the first two layers densely; ``select`` works per layer and does not
know its layer index, so an integration reads this flag and calls dense attention there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from blocksieve.layout import BlockLayout
from blocksieve.methods.base import SparseMethod
from blocksieve.methods.registry import register
from blocksieve.select.choose import topk_ids
from blocksieve.select.force import query_block_span
from blocksieve.select.pool import minmax_pool
from blocksieve.select.score import page_upper_bound


@dataclass(frozen=True)
class QuestConfig:
    page: int = 16
    token_budget: int = 2048
    block_q: int = 64
    dense_layers: int = 2


@register
class Quest(SparseMethod):
    """Page min/max bounds, top pages to a token budget (see module docstring)."""

    name = "quest"
    summary = "per-page key min/max upper bounds, top pages to a token budget, for decode (Quest)"
    Config = QuestConfig
    supports_decode = True

    def check_config(self) -> None:
        c = self.config
        if c.page <= 0 or c.block_q <= 0:
            raise ValueError("page and block_q must be positive")
        if c.token_budget < c.page:
            raise ValueError(f"token_budget={c.token_budget} must be at least one page ({c.page} tokens)")
        if c.dense_layers < 0:
            raise ValueError(f"dense_layers must be >= 0, got {c.dense_layers}")

    def init_state(self) -> dict:
        """Empty decode state: no pages summarised yet."""
        return {"kmin": None, "kmax": None, "pages": 0}

    def _bounds(self, k: torch.Tensor, state: dict) -> tuple:
        """Page bounds of the whole cache, reducing only pages completed since the state was taken."""
        c = self.config
        full = k.shape[2] // c.page
        done = state["pages"] if state["kmin"] is not None and state["pages"] <= full else 0
        lo, hi = minmax_pool(k[:, :, done * c.page : full * c.page], c.page)
        if done:
            lo, hi = torch.cat([state["kmin"], lo], 2), torch.cat([state["kmax"], hi], 2)
        new_state = {"kmin": lo, "kmax": hi, "pages": full}
        if k.shape[2] > full * c.page:  # the partial last page is reduced afresh each step
            plo, phi = minmax_pool(k[:, :, full * c.page :], c.page)
            lo, hi = torch.cat([lo, plo], 2), torch.cat([hi, phi], 2)
        return lo, hi, new_state

    def select_step(self, q: torch.Tensor, k: torch.Tensor, state: Optional[dict] = None) -> tuple:
        """Pages for new queries ``q [B, Hq, Lq, D]`` against the cache ``k [B, Hkv, Lkv, D]``: ``(layout, state)``."""
        c = self.config
        b, hq, lq, d = q.shape
        lkv = k.shape[2]
        lo, hi, state = self._bounds(k, state or self.init_state())
        nq = math.ceil(lq / c.block_q)
        rows = torch.nn.functional.pad(page_upper_bound(q, lo, hi), (0, 0, 0, nq * c.block_q - lq))
        score = rows.reshape(b, hq, nq, c.block_q, -1).sum(3)  # [B, Hq, NQ, P]
        _, last = query_block_span(c.block_q, lq, lkv, q.device)
        starts = torch.arange(score.shape[-1], device=q.device) * c.page
        own_page = last // c.page  # [NQ] the page holding the block's last row: always kept
        drop = (starts[None, :] > last[:, None]) | (torch.arange(score.shape[-1], device=q.device)[None, :] == own_page[:, None])
        chosen = topk_ids(score.masked_fill(drop, float("-inf")), c.token_budget // c.page)
        own = own_page[None, None, :, None].expand(b, hq, -1, 1)
        layout = BlockLayout.from_candidates(torch.cat([chosen, own], -1), c.block_q, c.page, lq, lkv, True)
        return layout, state

    def select(self, q: torch.Tensor, k: torch.Tensor) -> BlockLayout:
        return self.select_step(q, k, None)[0]
