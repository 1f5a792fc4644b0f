"""``dsa``: DeepSeek Sparse Attention's lightning indexer, flat scan — the exact token top-k baseline.

DeepSeek-AI, "DeepSeek-V3.2-Exp: Boosting Long-Context Efficiency with DeepSeek Sparse Attention"
(2025). Each query scores every causal key, ``I[t,s] = Σ_j w[t,j]·ReLU(q_I[t,j]·k_I[s])``, and
attends to the top ``topk = 2048`` keys; no sink or local window is forced.

The trained indexer weights are not available for the models blocksieve evaluates, so
:meth:`Dsa.select` scores with the attention's own ``q·k``: one index set per KV group whose
indexer heads are the group's query heads (:func:`~blocksieve.select.indexer.gqa_indexer`;
``act="linear"`` sums the group's logits, ``"relu"`` is the DSA form). The DSA form proper, with
caller-given indexer tensors, is :meth:`Dsa.select_indexer`. On CUDA the scan is the fused Triton
score + top-k kernel (:mod:`blocksieve.ops.indexer_topk`), which never stores the logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from blocksieve.layout import TokenLayout
from blocksieve.methods.base import SparseMethod
from blocksieve.methods.registry import register
from blocksieve.select.indexer import ACTIVATIONS, Indexer, dsa_indexer, gqa_indexer
from blocksieve.select.token_topk import BACKENDS, expand_heads, flat_topk


class IndexerMethod(SparseMethod):
    """Shared frame of the indexer methods (dsa, hisa, misa): a config with ``topk``, ``act``, ``backend``.

    Subclasses implement ``_choose(ix, state) -> (TokenLayout with H = S, state)``.
    """

    supports_decode = True

    def check_config(self) -> None:
        c = self.config
        if c.topk <= 0:
            raise ValueError(f"topk must be positive, got {c.topk}")
        if c.act not in ACTIVATIONS:
            raise ValueError(f"act={c.act!r} is not one of {ACTIVATIONS}")
        if c.backend not in BACKENDS:
            raise ValueError(f"backend={c.backend!r} is not one of {BACKENDS}")

    def _choose(self, ix: Indexer, state: dict) -> tuple:
        raise NotImplementedError

    def select(self, q: torch.Tensor, k: torch.Tensor) -> TokenLayout:
        """Top-k keys per query, shared by each KV group: ``TokenLayout [B, Hkv, Lq, K]``."""
        return self._choose(gqa_indexer(q, k, self.config.act), {})[0]

    def select_step(self, q: torch.Tensor, k: torch.Tensor, state=None) -> tuple:
        """Decode: new queries ``q [B, Hq, Lq, D]`` against the cache ``k [B, Hkv, Lkv, D]``."""
        return self._choose(gqa_indexer(q, k, self.config.act), dict(state or {}))

    def select_indexer(self, q_i: torch.Tensor, k_i: torch.Tensor, w: torch.Tensor, heads: int = 1) -> TokenLayout:
        """DSA form: ``q_i [B, Lq, H_I, d_I]``, ``k_i [B, Lkv, d_I]``, ``w [B, Lq, H_I]`` → ``[B, heads, Lq, K]``.

        One index set serves every attention head; ``heads`` repeats it (pass ``Hkv``).
        """
        return expand_heads(self._choose(dsa_indexer(q_i, k_i, w), {})[0], heads)


@dataclass(frozen=True)
class DsaConfig:
    topk: int = 2048
    act: str = "linear"
    backend: str = "auto"


@register
class Dsa(IndexerMethod):
    """Flat indexer scan, exact top-k per query (per KV group)."""

    name = "dsa"
    summary = "DSA lightning indexer: exact token top-k over every causal key (flat scan)"
    Config = DsaConfig

    def _choose(self, ix: Indexer, state: dict) -> tuple:
        return flat_topk(ix, self.config.topk, self.config.backend), state
