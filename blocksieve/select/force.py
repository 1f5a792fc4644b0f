"""Forced key blocks every query block keeps: attention sinks, a local window, the diagonal.

Each function returns candidate key-block ids ``[NQ, C]`` (int64, possibly out of range or
repeated); :meth:`blocksieve.layout.BlockLayout.from_candidates` cleans and merges them with a
top-k. Work is O(NQ · C), never O(NQ · NK).
"""

from __future__ import annotations

import math

import torch


def sink_blocks(num_q_blocks: int, block_k: int, sink_tokens: int, device=None) -> torch.Tensor:
    """The key blocks holding the first ``sink_tokens`` keys, for every query block: ``[NQ, S]``."""
    s = math.ceil(sink_tokens / block_k) if sink_tokens > 0 else 0
    return torch.arange(s, device=device).expand(num_q_blocks, s)


def query_block_span(block_q: int, q_len: int, kv_len: int, device=None) -> tuple:
    """Absolute key positions of the first and last row of each query block, two ``[NQ]`` int64."""
    nq = math.ceil(q_len / block_q)
    first = torch.arange(nq, device=device) * block_q + (kv_len - q_len)
    last = torch.clamp(torch.arange(1, nq + 1, device=device) * block_q, max=q_len) - 1 + (kv_len - q_len)
    return first, last


def local_blocks(block_q: int, block_k: int, q_len: int, kv_len: int, local_tokens: int, device=None) -> torch.Tensor:
    """Key blocks within ``local_tokens`` before each query block, and its diagonal: ``[NQ, W]``.

    A query block whose rows sit at positions ``[p0, p1]`` keeps every key block overlapping
    ``[p0 - local_tokens, p1]``; entries past ``p1`` are returned as -1.
    """
    first, last = query_block_span(block_q, q_len, kv_len, device)
    lo = torch.clamp(first - local_tokens, min=0) // block_k  # [NQ]
    width = math.ceil((block_q + local_tokens) / block_k) + 1
    cand = lo[:, None] + torch.arange(width, device=device)
    return torch.where(cand * block_k <= last[:, None], cand, -1)


def diagonal_blocks(block_q: int, block_k: int, q_len: int, kv_len: int, device=None) -> torch.Tensor:
    """The key blocks overlapping each query block's own positions: ``[NQ, W]`` (-1 beyond)."""
    return local_blocks(block_q, block_k, q_len, kv_len, 0, device)


def segment_start(block_q: int, q_len: int, kv_len: int, segment: int, device=None) -> torch.Tensor:
    """Absolute position where the segment of ``segment`` keys holding each query block's first row starts, ``[NQ]``."""
    first, _ = query_block_span(block_q, q_len, kv_len, device)
    return first // segment * segment


def own_segment_blocks(block_q: int, block_k: int, q_len: int, kv_len: int, segment: int, device=None) -> torch.Tensor:
    """Key blocks from the start of each query block's segment up to its last row: ``[NQ, W]`` (-1 beyond).

    With ``segment`` a multiple of ``block_k`` these blocks lie wholly inside the segment (PBS-Attn's
    and S2O's dense intra-segment part).
    """
    lo = segment_start(block_q, q_len, kv_len, segment, device) // block_k
    _, last = query_block_span(block_q, q_len, kv_len, device)
    width = math.ceil((segment + block_q) / block_k) + 1
    cand = lo[:, None] + torch.arange(width, device=device)
    return torch.where(cand * block_k <= last[:, None], cand, -1)
