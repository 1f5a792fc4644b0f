"""``hisa``: hierarchical indexer — pooled key blocks first, exact token scores on the survivors.

"HISA: Hierarchical Indexer for Sparse Attention" (2025), a drop-in for DSA's flat scan:

1. mean-pool (or max-pool) the indexer keys in blocks of ``block = 128``;
2. score the blocks with the same indexer, ``J[t,b] = Σ_j w[t,j]·act(q[t,j]·k̄_b)``, over the causal
   blocks; force the first block (sink) and the last (local, partly in the future);
3. keep the top ``m = 64`` blocks → ``m·block = 8192`` candidate tokens;
4. exact token scores on the candidates with the token-level causal mask; top ``topk = 2048``.

Rows whose prefix fits in ``m·block`` tokens are exact DSA and skip the coarse stage. Decode keeps
the pooled keys in the state and pools only the newest block again each step.
Scorer and head sharing as in :mod:`blocksieve.methods.dsa`.
"""

from __future__ import annotations

from dataclasses import dataclass

from blocksieve.methods.dsa import IndexerMethod
from blocksieve.methods.registry import register
from blocksieve.select.indexer import Indexer
from blocksieve.select.token_topk import hisa_topk, update_pooled


@dataclass(frozen=True)
class HisaConfig:
    topk: int = 2048
    block: int = 128
    m: int = 64
    pool: str = "mean"
    act: str = "linear"
    backend: str = "auto"

    @classmethod
    def for_prompt(cls, length: int, topk: int, block: int = 4, **kw) -> "HisaConfig":
        """The paper's sizes scaled to a short prompt: blocks of 4, ``m·block = clamp(4·topk, 5·length/8, 3·length/4)``.

        The paper keeps 4·topk candidates (8192 for top-2048, 6 % of 128K) in blocks of 128 (a
        1,024th of 128K). On 4K-16K prompts with the training-free scorer the DSA top-k is spread
        over the whole prefix: IoU >= 0.99 with DSA needs 5/8 of it as candidates, and blocks of 4
        (128 scaled by length/128K at 4K) to rank them; blocks of 16 missed on Gemma-3
        (``docs/dev/tokens_notes.md``). At this size HISA scores about as many keys as DSA: a
        fidelity setting for short prompts, not a speed-up (blocks under 16 keys also run the
        coarse stage in PyTorch on CUDA: the Triton scan's MMA tiles need 16).
        """
        cand = min(3 * length // 4, max(5 * length // 8, 4 * topk))
        return cls(topk=topk, block=block, m=max(2, cand // block), **kw)


@register
class Hisa(IndexerMethod):
    """Block-then-token hierarchical indexer (per KV group)."""

    name = "hisa"
    summary = "HISA: pooled-block indexer picks m blocks, exact token top-k inside them"
    Config = HisaConfig

    def check_config(self) -> None:
        super().check_config()
        c = self.config
        if c.block <= 0 or c.block & (c.block - 1):
            raise ValueError(f"block must be a power of two, got {c.block}")
        if c.m < 2:
            raise ValueError(f"m must be >= 2 (the first and the last block are always kept), got {c.m}")
        if c.pool not in ("mean", "max"):
            raise ValueError(f"pool={c.pool!r} is not 'mean' or 'max'")

    def _choose(self, ix: Indexer, state: dict) -> tuple:
        c = self.config
        pooled = update_pooled(state.get("pooled"), state.get("pooled_len", 0), ix.k, c.block, c.pool)
        state.update(pooled=pooled, pooled_len=ix.kv_len)
        return hisa_topk(ix, c.topk, c.block, c.m, c.pool, pooled, c.backend), state
