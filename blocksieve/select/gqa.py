"""GQA policy: select per query head, or once per KV group from the group's query heads.

A group-shared selection (``H = Hkv``) lets a kernel load each KV tile once for all ``G`` query
heads of the group; a per-head selection (``H = Hq``) follows each head's own pattern.
"""

from __future__ import annotations

import torch

from blocksieve.select.score import masked_softmax

GQA_MODES = ("head", "sum", "max", "vote")


def group_scores(scores: torch.Tensor, num_kv_heads: int, mode: str) -> torch.Tensor:
    """Reduce per-query-head scores ``[B, Hq, ...]`` to ``[B, Hkv, ...]`` (or keep them: ``"head"``).

    Modes: ``"head"`` (per query head, unchanged), ``"sum"`` / ``"max"`` over the group's heads,
    ``"vote"`` (TokenSelect's soft vote: softmax over the last dim per head, then summed, so one
    large-norm head cannot dominate).
    """
    if mode not in GQA_MODES:
        raise ValueError(f"gqa mode {mode!r} is not one of {GQA_MODES}")
    if mode == "head":
        return scores
    b, hq = scores.shape[:2]
    if hq % num_kv_heads:
        raise ValueError(f"{hq} query heads are not a multiple of {num_kv_heads} KV heads")
    x = masked_softmax(scores) if mode == "vote" else scores
    x = x.reshape(b, num_kv_heads, hq // num_kv_heads, *scores.shape[2:])
    if mode == "max":
        return x.amax(2)
    out = x.sum(2)
    if mode == "vote":
        out = out.masked_fill(~torch.isfinite(scores).reshape_as(x).any(2), float("-inf"))
    return out
