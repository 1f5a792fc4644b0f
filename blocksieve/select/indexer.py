"""Token indexers: multi-head scorers of every (query, key) pair, in the DeepSeek DSA form.

An :class:`Indexer` scores key ``s`` for query row ``t`` of index set ``r`` as

    I[r, t, s] = Σ_j w[r, t, j] · act(q[r, t, j] · k[r, s])

with ``act`` = ReLU (DSA's lightning indexer) or the identity. ``S`` index sets share nothing:
the DSA form has one set (one shared indexer key, MQA); the training-free form for ordinary GQA
models has one set per KV head, whose "indexer heads" are the group's ``G`` query heads
(``w = 1/sqrt(D)``, identity: the summed attention logits of the group). Selections built from
an indexer are TokenLayouts with ``H = S``.

Scores are computed here in PyTorch for chunks of query rows (dense against all keys, on pooled
keys, or on gathered candidates); :mod:`blocksieve.ops.indexer_topk` fuses scoring and top-k on
the GPU. Queries are right-aligned to the keys as everywhere in blocksieve.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from blocksieve.layout import query_positions
from blocksieve.ops.checks import resolve_scale

ACTIVATIONS = ("relu", "linear")


@dataclass(frozen=True, eq=False)
class Indexer:
    """Multi-head token scorer (see the module docstring).

    Attributes:
        q: ``[B, S, Lq, H_I, d]`` indexer queries (S index sets, H_I indexer heads).
        k: ``[B, S, Lkv, d]`` indexer keys (one per index set).
        w: ``[B, S, Lq, H_I]`` fp32 head weights (may be negative).
        act: ``"relu"`` or ``"linear"``.
        causal: right-aligned causal mask (key ``s`` visible to row ``t`` iff ``s <= Lkv - Lq + t``).
    """

    q: torch.Tensor
    k: torch.Tensor
    w: torch.Tensor
    act: str = "relu"
    causal: bool = True

    def __post_init__(self) -> None:
        if self.act not in ACTIVATIONS:
            raise ValueError(f"act={self.act!r} is not one of {ACTIVATIONS}")
        if self.q.dim() != 5 or self.k.dim() != 4 or self.w.dim() != 4:
            raise ValueError(
                f"indexer wants q [B, S, Lq, H_I, d], k [B, S, Lkv, d], w [B, S, Lq, H_I]; got "
                f"{tuple(self.q.shape)}, {tuple(self.k.shape)}, {tuple(self.w.shape)}"
            )
        b, s, lq, h, d = self.q.shape
        if self.k.shape[:2] != (b, s) or self.k.shape[3] != d:
            raise ValueError(f"k {tuple(self.k.shape)} must be [B={b}, S={s}, Lkv, d={d}] to match q")
        if tuple(self.w.shape) != (b, s, lq, h):
            raise ValueError(f"w must be [B, S, Lq, H_I] = {(b, s, lq, h)}, got {tuple(self.w.shape)}")
        if self.causal and lq > self.k.shape[2]:
            raise ValueError(f"q_len={lq} exceeds kv_len={self.k.shape[2]}: causal queries need q_len <= kv_len")

    @property
    def q_len(self) -> int:
        return self.q.shape[2]

    @property
    def kv_len(self) -> int:
        return self.k.shape[2]

    @property
    def num_sets(self) -> int:
        return self.q.shape[1]

    @property
    def num_heads(self) -> int:
        return self.q.shape[3]

    def positions(self, r0: int = 0, r1: Optional[int] = None) -> torch.Tensor:
        """Absolute key position of rows ``[r0, r1)``, int64 ``[r1 - r0]``."""
        return query_positions(self.q_len, self.kv_len, self.q.device)[r0:r1]

    def with_heads(self, heads: torch.Tensor) -> "Indexer":
        """The indexer restricted to per-row head subsets ``heads`` int64 ``[B, S, Lq, h]`` (MISA routing)."""
        q = torch.gather(self.q, 3, heads[..., None].expand(*heads.shape, self.q.shape[-1]))
        return Indexer(q, self.k, torch.gather(self.w, 3, heads), self.act, self.causal)

    def with_keys(self, k: torch.Tensor) -> "Indexer":
        """Same queries and weights against other keys ``[B, S, N, d]`` (e.g. pooled blocks), non-causal."""
        return Indexer(self.q, k.to(self.k.dtype), self.w, self.act, causal=False)

    def combine(self, logits: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``Σ_j w_j · act(logits_j)``: logits ``[..., H_I, N]``, w ``[..., H_I]`` → ``[..., N]`` fp32."""
        x = logits.float()
        if self.act == "relu":
            x = torch.relu(x)
        return (x * w[..., None].float()).sum(-2)


def dsa_indexer(q_i: torch.Tensor, k_i: torch.Tensor, w: torch.Tensor, causal: bool = True) -> Indexer:
    """DSA lightning-indexer inputs as one index set.

    Args:
        q_i: ``[B, Lq, H_I, d_I]`` indexer queries; k_i: ``[B, Lkv, d_I]`` shared indexer key;
        w: ``[B, Lq, H_I]`` head weights.
    """
    if q_i.dim() != 4 or k_i.dim() != 3 or w.dim() != 3:
        raise ValueError(
            f"dsa_indexer wants q_i [B, Lq, H_I, d_I], k_i [B, Lkv, d_I], w [B, Lq, H_I]; got "
            f"{tuple(q_i.shape)}, {tuple(k_i.shape)}, {tuple(w.shape)}"
        )
    return Indexer(q_i[:, None], k_i[:, None], w[:, None].float(), "relu", causal)


def gqa_indexer(
    q: torch.Tensor, k: torch.Tensor, act: str = "linear", scale: Optional[float] = None, causal: bool = True
) -> Indexer:
    """Training-free indexer from an attention layer's own ``q [B, Hq, Lq, D]``, ``k [B, Hkv, Lkv, D]``.

    One index set per KV head; its indexer heads are the group's ``G = Hq // Hkv`` query heads with
    weight ``scale`` (default ``1/sqrt(D)``). ``act="linear"`` sums the group's attention logits.
    """
    b, hq, lq, d = q.shape
    hkv = k.shape[1]
    if hq % hkv:
        raise ValueError(f"k has {hkv} heads, q has {hq}: Hq must be a multiple of Hkv")
    qi = q.reshape(b, hkv, hq // hkv, lq, d).transpose(2, 3)  # [B, Hkv, Lq, G, D]
    w = torch.full((b, hkv, lq, hq // hkv), resolve_scale(scale, d), dtype=torch.float32, device=q.device)
    return Indexer(qi, k, w, act, causal)


def chunk_rows(ix: Indexer, width: int, budget: int = 1 << 24) -> int:
    """Query rows per chunk so that ``B·S·rows·H_I·width`` score entries stay within ``budget``."""
    b, s, _, h, _ = ix.q.shape
    return max(1, budget // max(1, b * s * h * width))


def _rows(ix: Indexer, r0: int, r1: int) -> tuple:
    """Queries and weights of rows ``[r0, r1)`` in fp32; a linear indexer collapses to one head
    (``Σ_j w_j q_j·k = (Σ_j w_j q_j)·k``)."""
    q, w = ix.q[:, :, r0:r1].float(), ix.w[:, :, r0:r1].float()
    if ix.act == "linear":
        return (q * w[..., None]).sum(3, keepdim=True), torch.ones_like(w[..., :1])
    return q, w


def dense_scores(ix: Indexer, r0: int, r1: int) -> torch.Tensor:
    """Scores of rows ``[r0, r1)`` against every key, ``[B, S, r1 - r0, Lkv]`` fp32, -inf where masked."""
    q, w = _rows(ix, r0, r1)  # [B, S, C, H, d]
    logits = torch.einsum("bsthd,bsnd->bsthn", q, ix.k.float())
    sc = ix.combine(logits, w)
    if ix.causal:
        future = torch.arange(ix.kv_len, device=sc.device)[None, :] > ix.positions(r0, r1)[:, None]
        sc = sc.masked_fill(future, float("-inf"))
    return sc


def candidate_scores(ix: Indexer, r0: int, r1: int, cand: torch.Tensor) -> torch.Tensor:
    """Scores of rows ``[r0, r1)`` at candidate keys ``cand`` int64 ``[B, S, C, M]`` → ``[B, S, C, M]``.

    Candidates that are negative, ``>= Lkv`` or (causal) in the row's future score -inf.
    """
    b, s = cand.shape[:2]
    valid = (cand >= 0) & (cand < ix.kv_len)
    if ix.causal:
        valid &= cand <= ix.positions(r0, r1)[:, None]
    ar_b = torch.arange(b, device=cand.device)[:, None, None, None]
    ar_s = torch.arange(s, device=cand.device)[None, :, None, None]
    q, w = _rows(ix, r0, r1)
    if ix.kv_len <= 4 * cand.shape[-1]:  # cheaper to score every key and pick the candidates
        sc = ix.combine(torch.einsum("bsthd,bsnd->bsthn", q, ix.k.float()), w)
        sc = torch.gather(sc, -1, cand.clamp(0, ix.kv_len - 1))
    else:
        kg = ix.k[ar_b, ar_s, cand.clamp(0, ix.kv_len - 1)]  # [B, S, C, M, d]
        sc = ix.combine(torch.matmul(q, kg.float().transpose(-1, -2)), w)  # logits [B, S, C, H, M]
    return sc.masked_fill(~valid, float("-inf"))
