"""S2O's reading order in Triton: rank each segment's past key blocks and write the order rows directly.

Same result as the PyTorch path of :meth:`blocksieve.methods.s2o.S2O.plan` (``segment_order_torch``
there): from the segment scores ``s [B, Hq, NS, NK]`` fp32, the order of every query block ``n`` is

    own segment blocks (up to the block's last row), sinks wholly before the segment,
    the past non-sink blocks by descending score (ties: lower id first), then -1,

``order int32 [B, Hq, NQ, K]`` with ``K = W + sink_blocks + NK`` (``W`` the own-segment width of
:func:`blocksieve.select.force.own_segment_blocks`) and ``forced int32 [B, Hq, NQ]`` (own + sinks).
Blocks whose score is not ``> -inf`` (NaN or ``-inf``) are left out, as in the PyTorch path.

One program per (segment, batch·head): it loads the segment's score row, packs each valid entry
into an int32 key ``(rank_key(score) << 12) | (4095 - id)`` (:func:`blocksieve.methods.s2o.rank_key`:
the score's order-preserving bits at 11 mantissa bits, the same rule as the PyTorch path), sorts
the keys descending in registers (``tl.sort``) and writes the rows of the segment's query blocks (usually
``segment / block_q``): head, ranked ids, -1 fill. Segment ``s`` has ``~s · segment / block_k`` past
blocks, so segments are launched in a few buckets of growing sort width (``MIN_SORT`` .. ``NK``
rounded up to a power of two), which cuts the sorting work by about a third. Nothing but the
outputs is written, nothing is synchronised with the host (CUDA-graph capturable).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from blocksieve.methods.s2o import RANK_DROP_BITS
from blocksieve.ops._triton_utils import interpreting, next_pow2, on_input_device

__all__ = ["MAX_BLOCKS", "segment_order_triton"]

MAX_BLOCKS = 1 << RANK_DROP_BITS
"""Largest number of key blocks ``NK`` (ids fit the key's low bits); beyond it use the PyTorch path."""
MIN_SORT = 256
"""Sort width of the first bucket of segments (early segments have few past blocks)."""
FILL = 1024
"""Entries of -1 written per step after a row's ranked part."""


# fmt: off
@triton.jit
def _segment_order_kernel(
    S, ORDER, FORCED, stride_sb, stride_sh, stride_ss,
    s_lo, num_heads, nq, nk, kw, q_len, kv_len, base,
    SEGMENT: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, SINKS: tl.constexpr, OWN_W: tl.constexpr,
    HP: tl.constexpr, SORT: tl.constexpr, FILL_N: tl.constexpr, DROP: tl.constexpr, ID_MASK: tl.constexpr,
):
    # fmt: on
    i_s = s_lo + tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // num_heads
    i_h = i_bh % num_heads
    d0 = kv_len - q_len
    seg_first = base + i_s * SEGMENT  # absolute position of the segment's first key
    n_past = tl.minimum(seg_first // BLOCK_K, nk)  # blocks wholly before the segment
    o_j = tl.arange(0, SORT)  # [SORT] block ids
    m_j = (o_j >= SINKS) & (o_j < n_past)
    p_s = S + i_b.to(tl.int64) * stride_sb + i_h.to(tl.int64) * stride_sh + i_s.to(tl.int64) * stride_ss
    b_s = tl.load(p_s + o_j, mask=m_j, other=float("-inf"))  # [SORT] fp32
    m_ok = m_j & (b_s > float("-inf"))  # NaN and -inf are left out
    b_s = tl.where(b_s == 0.0, 0.0, b_s)  # -0.0 ties with +0.0
    bits = b_s.to(tl.int32, bitcast=True)
    bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # order-preserving as signed int32
    bits = tl.where(m_ok, (bits >> DROP) << DROP, -2147483648)  # rank_key << DROP; invalid below every score
    key = bits | (ID_MASK - o_j)  # [SORT] int32, ties: lower id is larger
    key = tl.sort(key, descending=True)
    n_valid = tl.sum(m_ok.to(tl.int32), 0)
    ranked = tl.where(o_j < n_valid, ID_MASK - (key & ID_MASK), -1)  # [SORT]
    n_sink = tl.minimum(seg_first // BLOCK_K, SINKS)
    own_lo = seg_first // BLOCK_K
    o_c = tl.arange(0, HP)  # [HP] head slots
    n_lo = tl.maximum(seg_first - d0 + BLOCK_Q - 1, 0) // BLOCK_Q  # query blocks whose first row is in the segment
    n_hi = tl.minimum((seg_first + SEGMENT - d0 + BLOCK_Q - 1) // BLOCK_Q, nq)
    o_f = tl.arange(0, FILL_N)  # [FILL_N]
    for n in range(n_lo, n_hi):
        last = tl.minimum((n + 1) * BLOCK_Q, q_len) - 1 + d0
        n_own = tl.minimum(last // BLOCK_K - own_lo + 1, OWN_W)
        forced = n_own + n_sink
        meta = (i_b * num_heads + i_h) * nq + n
        p_o = ORDER + meta.to(tl.int64) * kw
        head = tl.where(o_c < n_own, own_lo + o_c, o_c - n_own)  # [HP] own blocks, then sinks
        tl.store(p_o + o_c, head, mask=o_c < forced)
        tl.store(p_o + forced + o_j, ranked, mask=o_j < nk)
        for t in range(forced + tl.minimum(nk, SORT), kw, FILL_N):
            tl.store(p_o + t + o_f, tl.full([FILL_N], -1, tl.int32), mask=t + o_f < kw)
        tl.store(FORCED + meta, forced)


@on_input_device
def segment_order_triton(
    scores: torch.Tensor, segment: int, block_q: int, block_k: int, q_len: int, kv_len: int, sink_blocks: int,
    out: tuple | None = None, num_warps: int | None = None,
) -> tuple:
    """S2O's ``(order int32 [B, Hq, NQ, K], forced int32 [B, Hq, NQ])`` from ``scores [B, Hq, NS, NK]`` fp32.

    ``NS = ceil((q_len + off) / segment)`` segments aligned to absolute positions
    (``off = (kv_len - q_len) % segment``), ``NK = ceil(kv_len / block_k) <= MAX_BLOCKS``; ``out``
    optionally gives the two output buffers (every entry is written); ``num_warps`` per program
    (a launch knob; default 4 for sorts up to 512 entries, else 16: at 128K tokens on an H200 the
    whole ranking took 3.17 / 3.45 / 2.82 ms with 4 / 8 / 16 warps for every width). CUDA, or the
    CPU under ``TRITON_INTERPRET=1``.
    """
    b, hq, ns, nk = scores.shape
    off = (kv_len - q_len) % segment
    nq = math.ceil(q_len / block_q)
    if scores.dtype != torch.float32 or ns != math.ceil((q_len + off) / segment) or nk != math.ceil(kv_len / block_k):
        raise ValueError(
            f"scores must be fp32 [B, Hq, NS={math.ceil((q_len + off) / segment)}, NK={math.ceil(kv_len / block_k)}] "
            f"for q_len={q_len}, kv_len={kv_len}, segment={segment}, block_k={block_k}; got {scores.dtype} {tuple(scores.shape)}"
        )
    if nk > MAX_BLOCKS:
        raise ValueError(f"NK={nk} key blocks exceed MAX_BLOCKS={MAX_BLOCKS}: use the PyTorch path (S2O backend='torch')")
    if scores.device.type != "cuda" and not interpreting():
        raise ValueError(f"scores are on {scores.device}: segment_order_triton needs CUDA (or TRITON_INTERPRET=1)")
    own_w = math.ceil((segment + block_q) / block_k) + 1
    kw = own_w + sink_blocks + nk
    if out is None:
        out = (torch.empty(b, hq, nq, kw, dtype=torch.int32, device=scores.device),
               torch.empty(b, hq, nq, dtype=torch.int32, device=scores.device))
    order, forced = out
    if tuple(order.shape) != (b, hq, nq, kw) or tuple(forced.shape) != (b, hq, nq) or not (order.is_contiguous() and forced.is_contiguous()):
        raise ValueError(f"out must be contiguous int32 buffers [B, Hq, NQ, K] = {(b, hq, nq, kw)} and [B, Hq, NQ]")
    if scores.stride(-1) != 1:
        scores = scores.contiguous()
    base = kv_len - q_len - off
    seg_blocks = segment // block_k
    s0, width = 0, MIN_SORT
    while s0 < ns:  # segment s has min(NK, base / block_k + s · segment / block_k) past blocks: contiguous buckets
        s1 = ns if width >= nk else min(ns, max(s0, (width - base // block_k) // seg_blocks + 1))
        if s1 > s0:
            sort = min(width, next_pow2(nk))
            _segment_order_kernel[(s1 - s0, b * hq)](
                scores, order, forced, scores.stride(0), scores.stride(1), scores.stride(2),
                s0, hq, nq, nk, kw, q_len, kv_len, base,
                SEGMENT=segment, BLOCK_Q=block_q, BLOCK_K=block_k, SINKS=sink_blocks, OWN_W=own_w,
                HP=next_pow2(own_w + sink_blocks), SORT=sort, FILL_N=FILL, DROP=RANK_DROP_BITS, ID_MASK=MAX_BLOCKS - 1, num_warps=num_warps or (4 if sort <= 512 else 16),
            )
        s0, width = s1, width * 2
    return order, forced
