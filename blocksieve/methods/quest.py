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

The bounds of a page are one pooled key ``[max ‖ min]`` (``pool_keys(k, page, "bounds")``, in the
cache's dtype: exact) and its bound is the dot product with ``[relu(q) ‖ min(q, 0)]``
(:func:`~blocksieve.select.score.bound_query`), so page selection is a linear token indexer over
pages. One decode row per head (``Lq = 1``) on CUDA (``backend="auto"``; ``"triton"`` also under
``TRITON_INTERPRET=1``) takes the fused score + top-k scan of :mod:`blocksieve.ops.indexer_topk`
over the complete pages (no page-score tensor, no sort, no host synchronisation: CUDA-graph
capturable); other inputs score pages with a matmul and ``torch.topk`` (the CPU path; same pages up
to fp32 rounding of near-equal bounds). The bounds live in a buffer with spare pages
(:func:`~blocksieve.select.token_topk.update_pooled`): a step re-reduces only the pages from the
last one it saw, in place.

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
from blocksieve.select.indexer import Indexer
from blocksieve.select.score import bound_query, grouped_dot
from blocksieve.select.token_topk import flat_ids, update_pooled


@dataclass(frozen=True)
class QuestConfig:
    page: int = 16
    token_budget: int = 2048
    block_q: int = 64
    dense_layers: int = 2
    backend: str = "auto"


FUSED_MAX_HEAD_DIM = 128
"""Largest head dim of the fused decode scan: its page keys ``[max ‖ min]`` are ``2D`` wide."""


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
        if c.backend not in ("auto", "triton", "torch"):
            raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {c.backend!r}")

    def init_state(self) -> dict:
        """Empty decode state: no page bounds yet."""
        return {"bounds": None, "keys": 0}

    def _bounds(self, k: torch.Tensor, state: dict) -> tuple:
        """``(bounds [B, Hkv, P, 2D], new state)``: page bounds of the cache, re-reducing pages from the state's last one.

        A state taken on a longer cache (a new sequence) is not reused.
        """
        n = state["keys"] if state["bounds"] is not None and state["keys"] <= k.shape[2] else 0
        bounds = update_pooled(state["bounds"] if n else None, n, k, self.config.page, "bounds")
        return bounds, {"bounds": bounds, "keys": k.shape[2]}

    def _fused(self, q: torch.Tensor) -> bool:
        """Whether this step takes the fused scan: one decode row, a head dim it handles, the backend."""
        c = self.config
        d = q.shape[3]
        fits = q.shape[2] == 1 and 8 <= d <= FUSED_MAX_HEAD_DIM and d & (d - 1) == 0
        return fits and (c.backend == "triton" or (c.backend == "auto" and q.is_cuda))

    def _fused_layout(self, q: torch.Tensor, k: torch.Tensor, bounds: torch.Tensor) -> BlockLayout:
        """One decode row per query head: the top pages by the fused linear-indexer scan over the
        complete pages (each KV head's query heads are its index set's rows), the own page appended."""
        c = self.config
        b, hq, _, d = q.shape
        hkv, lkv = k.shape[1], k.shape[2]
        own, keep = (lkv - 1) // c.page, c.token_budget // c.page
        if own <= keep:  # every page fits the budget; the width is the torch path's, min(keep, pages) + 1
            ids = torch.arange(min(keep, own + 1) + 1, dtype=torch.int32, device=q.device)
            idx = torch.where(ids <= own, ids, -1).expand(b, hq, 1, -1).contiguous()
        else:
            g = hq // hkv
            qi = bound_query(q).to(bounds.dtype).reshape(b, hkv, g, 1, 2 * d)
            w = torch.ones(b, hkv, g, 1, device=q.device)
            ids = flat_ids(Indexer(qi, bounds[:, :, :own], w, "linear", causal=False), keep, "triton")  # ascending
            idx = torch.cat([ids.reshape(b, hq, 1, keep), torch.full((b, hq, 1, 1), own, dtype=torch.int32, device=q.device)], -1)
        counts = torch.full((b, hq, 1), min(own + 1, idx.shape[-1]), dtype=torch.int32, device=q.device)
        return BlockLayout(idx, counts, c.block_q, c.page, 1, lkv, True)

    def select_step(self, q: torch.Tensor, k: torch.Tensor, state: Optional[dict] = None) -> tuple:
        """Pages for new queries ``q [B, Hq, Lq, D]`` against the cache ``k [B, Hkv, Lkv, D]``: ``(layout, state)``."""
        c = self.config
        b, hq, lq, d = q.shape
        lkv = k.shape[2]
        bounds, state = self._bounds(k, state or self.init_state())
        if self._fused(q):
            return self._fused_layout(q, k, bounds), state
        nq = math.ceil(lq / c.block_q)
        bound = grouped_dot(bound_query(q.float()), bounds)  # [B, Hq, Lq, P]
        rows = torch.nn.functional.pad(bound, (0, 0, 0, nq * c.block_q - lq))
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
