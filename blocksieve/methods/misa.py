"""``misa`` and ``misa_h``: route each query to a few indexer heads, score with those only.

"MISA: Mixture of Indexer Sparse Attention" (2025). Router: mean-pool the indexer keys in blocks of
``block = 1024``; head score ``E[t,j] = Σ_b |w[t,j]·act(q[t,j]·k̄_b)|`` over the causal blocks; keep
the top ``h = 8`` heads per query. ``misa`` takes the top ``topk`` tokens by the routed heads' score
over the whole prefix. ``misa_h`` (MISA†) keeps the top ``rescore = 8192`` by the routed score and
re-ranks them with all heads.

For GQA models without an indexer the pool is the query heads of a KV group (``h`` is clipped to
``G``; use ``h < G`` for the routing to matter, e.g. ``h=1`` for SmolLM2's ``G = 3``).
"""

from __future__ import annotations

from dataclasses import dataclass

from blocksieve.methods.dsa import IndexerMethod
from blocksieve.methods.registry import register
from blocksieve.select.indexer import Indexer
from blocksieve.select.token_topk import misa_topk, update_pooled


@dataclass(frozen=True)
class MisaConfig:
    topk: int = 2048
    h: int = 8
    block: int = 1024
    rescore: int = 0
    act: str = "linear"
    backend: str = "auto"


@dataclass(frozen=True)
class MisaHConfig(MisaConfig):
    rescore: int = 8192


@register
class Misa(IndexerMethod):
    """Routed-head indexer (per KV group)."""

    name = "misa"
    summary = "MISA: each query scores with its top-h routed indexer heads"
    Config = MisaConfig

    def check_config(self) -> None:
        super().check_config()
        c = self.config
        if c.h <= 0 or c.block <= 0 or c.rescore < 0:
            raise ValueError(f"h and block must be positive and rescore >= 0, got h={c.h}, block={c.block}, rescore={c.rescore}")

    def _choose(self, ix: Indexer, state: dict) -> tuple:
        c = self.config
        pooled = update_pooled(state.get("pooled"), state.get("pooled_len", 0), ix.k, c.block, "mean")
        state.update(pooled=pooled, pooled_len=ix.kv_len)
        return misa_topk(ix, c.topk, c.h, c.block, c.rescore, pooled, c.backend), state


@register
class MisaH(Misa):
    """MISA†: routed-head top-``rescore``, re-ranked with all heads."""

    name = "misa_h"
    summary = "MISA-dagger: routed heads shortlist 8192 tokens, all heads re-rank them"
    Config = MisaHConfig
