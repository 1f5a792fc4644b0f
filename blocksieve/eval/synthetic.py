"""Synthetic layouts for kernel benchmarks: a sink block, a local band and random earlier blocks.

These layouts measure speed at a chosen density; they say nothing about selection quality
(judge selectors on real attention, :mod:`blocksieve.eval.captures`).
"""

from __future__ import annotations

import math

import torch

from blocksieve.layout import BlockLayout, causal_last_key


def banded_random_layout(
    batch: int,
    heads: int,
    q_len: int,
    kv_len: int,
    block_q: int,
    block_k: int,
    density: float,
    local_blocks: int = 2,
    seed: int = 0,
    device=None,
) -> BlockLayout:
    """Causal layout of about ``density``: block 0, ``local_blocks`` diagonal blocks, random others.

    Each query block keeps ``round(density · visible_blocks)`` blocks (at least the forced ones);
    random blocks are drawn uniformly among the earlier visible ones, without a ``[NQ, NK]``
    score matrix larger than the layout itself times ``NK``.
    """
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    nq, nk = math.ceil(q_len / block_q), math.ceil(kv_len / block_k)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    last_block = causal_last_key(block_q, q_len, kv_len) // block_k  # [NQ] last visible key block
    visible = last_block + 1
    want = torch.clamp((density * visible.double()).round().long(), min=1)
    kmax = int(min(nk, want.max() + local_blocks + 1))
    # Random priorities; forced blocks get priority > 1, invisible ones -1; take the top kmax.
    prio = torch.rand(batch, heads, nq, nk, generator=gen)
    cols = torch.arange(nk)
    forced = (cols[None, :] == 0) | ((cols[None, :] <= last_block[:, None]) & (cols[None, :] > last_block[:, None] - local_blocks))
    prio = torch.where(forced, prio + 2, prio)
    prio = torch.where(cols[None, :] <= last_block[:, None], prio, torch.full_like(prio, -1.0))
    top = prio.topk(kmax, -1)
    rank = torch.arange(kmax)
    keep = (top.values >= 0) & ((rank < want[:, None]) | (top.values >= 2))
    cand = torch.where(keep, top.indices, -1)
    return BlockLayout.from_candidates(cand.to(device), block_q, block_k, q_len, kv_len, causal=True)
