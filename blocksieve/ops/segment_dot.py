"""S2O's default ``rank="mean"`` statistic in Triton: each segment's mean query against each past key block's mean key.

For the segment means ``qs [B, Hq, NS, D]`` and the key-block means ``kb [B, Hkv, NK, D]`` (both
fp32) it writes

    s[b, h, i, j] = qs[b, h, i] · kb[b, h // G, j]

for every key block ``j`` wholly before segment ``i`` (``(j + 1) · block_k <= base + i · segment``,
the blocks S2O may rank) and ``-inf`` elsewhere: the values of
:func:`blocksieve.select.score.grouped_dot` on the entries S2O's ranking reads. It replaces that
``torch.matmul``, which runs in SIMT fp32 on the GPU (0.42 ms at 128K tokens on an H100,
``Hq=32, Hkv=8, D=128``) on every pair, then an elementwise pass over the ``[B, Hq, NS, NK]``
result.

One program per (tile of ``BLOCK_S`` segments, tile of ``BLOCK_N`` key blocks, KV head, pack of
query heads): the segment means of up to ``PACK_ROWS // BLOCK_S`` heads of a KV group are stacked
as the rows of one product, so each tile of block means is loaded once for them. Tiles wholly at or
above the causal edge only store ``-inf``. The product runs on tensor cores as three TF32 products
(``input_precision="tf32x3"``, about fp32 accuracy); fp32 FMA (``"ieee"``) is a launch option.
Nothing is synchronised with the host.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from blocksieve.ops._triton_utils import (
    check_segment_operands,
    last_dim_contiguous,
    mask_flags,
    mma_sizes_ok,
    on_input_device,
    segment_grid,
    segment_rows,
)
from blocksieve.ops.alloc import empty_output

__all__ = ["kernel_supports", "segment_block_dot_triton"]

BLOCK_S = 32
"""Segment means (query rows) of one head per program."""
PACK_ROWS = 128
"""Most query rows per program (heads of a KV group stacked), at head dims up to 128 (:func:`default_tiles`)."""
BLOCK_N = 128
"""Key blocks per program, at head dims up to 128 (:func:`default_tiles`)."""
NUM_WARPS = 8
"""Warps per program."""
AUTO_MAX_HEAD_DIM = 128
"""Largest head dim that S2O's ``backend="auto"`` sends to this kernel. At 256 channels its tiles are
halved (:func:`default_tiles`; the head-dim-128 tiles ask for 256 KiB of shared memory) and it is
no faster than :func:`~blocksieve.select.score.grouped_dot` (H100, session 16, ``Hq=16, Hkv=8``,
two runs: 0.077-0.107 / 0.473-0.475 ms against 0.070-0.114 / 0.468-0.472 ms at 32K / 128K;
``benchmarks/results/s2o_rank_h100_s16*.json``), so "auto" keeps ``torch.matmul`` there."""
PRECISIONS = ("tf32x3", "ieee")


# fmt: off
@triton.jit
def _segment_dot_kernel(
    QS, KB, OUT, HEADS_ON,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_kn,
    stride_ob, stride_oh, stride_os,
    num_kv_heads, group, n_packs, ns, nk, n_tiles, base,
    SEGMENT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S_: tl.constexpr, BLOCK_N_: tl.constexpr, HP: tl.constexpr,
    D: tl.constexpr, PRECISION: tl.constexpr, HAS_HEAD_MASK: tl.constexpr,
):
    # fmt: on
    i_tile = tl.program_id(0) % n_tiles  # segment tiles of one key tile are neighbours: they read the same block means
    o_j = tl.program_id(0) // n_tiles * BLOCK_N_ + tl.arange(0, BLOCK_N_)  # [BN] key blocks
    i_b, i_kvh, o_s, o_h, m_r, n_past = segment_rows(
        tl.program_id(1), i_tile, num_kv_heads, n_packs, group, ns, nk, base, SEGMENT, BLOCK_K, BLOCK_S_, HP
    )  # [R] rows: segment ids, query heads, valid rows, blocks wholly before each segment
    if HAS_HEAD_MASK:
        p_on = HEADS_ON + i_b.to(tl.int64) * num_kv_heads * group + o_h
        if tl.max(tl.load(p_on, mask=m_r, other=0).to(tl.int32), 0) == 0:
            return  # no row of a head on: nothing written
    o_d = tl.arange(0, D)
    p_o = OUT + i_b.to(tl.int64) * stride_ob + o_h[:, None] * stride_oh + o_s[:, None].to(tl.int64) * stride_os + o_j[None, :]
    m_o = m_r[:, None] & (o_j < nk)[None, :]
    if tl.max(n_past, 0) > tl.min(o_j, 0):  # some row sees a block of this tile
        p_q = QS + i_b.to(tl.int64) * stride_qb + o_h[:, None] * stride_qh + o_s[:, None].to(tl.int64) * stride_qs + o_d[None, :]
        b_q = tl.load(p_q, mask=m_r[:, None], other=0.0)  # [R, D] fp32
        p_k = KB + i_b.to(tl.int64) * stride_kb + i_kvh.to(tl.int64) * stride_kh + o_j[:, None].to(tl.int64) * stride_kn + o_d[None, :]
        b_k = tl.load(p_k, mask=(o_j < nk)[:, None], other=0.0)  # [BN, D] fp32
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION)  # [R, BN]
        tl.store(p_o, tl.where(o_j[None, :] < n_past[:, None], b_s, float("-inf")), mask=m_o)
    else:
        tl.store(p_o, tl.full((HP * BLOCK_S_, BLOCK_N_), float("-inf"), tl.float32), mask=m_o)


def _head_dim_ok(d: int) -> bool:
    """The kernel takes head dim ``d``: a power of two from 16 to 256."""
    return mma_sizes_ok(d) and d <= 256


def default_tiles(d: int) -> tuple[int, int]:
    """``(pack_rows, block_n)`` for head dim ``d``: ``PACK_ROWS`` and ``BLOCK_N`` up to 128 channels,
    halved for each doubling above, so that the fp32 operands, ``(pack_rows + block_n) · d · 4`` bytes,
    stay at 128 KiB of shared memory."""
    shrink = max(1, d // 128)
    return PACK_ROWS // shrink, BLOCK_N // shrink


def kernel_supports(d: int) -> bool:
    """Whether S2O's ``backend="auto"`` runs :func:`segment_block_dot_triton` for head dim ``d``: the kernel
    takes it, and it is at most ``AUTO_MAX_HEAD_DIM``."""
    return _head_dim_ok(d) and d <= AUTO_MAX_HEAD_DIM


@on_input_device
def segment_block_dot_triton(
    qs: torch.Tensor,
    kb: torch.Tensor,
    block_k: int,
    segment: int,
    base: int,
    block_s: int = BLOCK_S,
    pack_rows: int | None = None,
    block_n: int | None = None,
    num_warps: int = NUM_WARPS,
    precision: str = "tf32x3",
    head_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[B, Hq, NS, NK]`` fp32 scores of the segment means ``qs [B, Hq, NS, D]`` against the key-block means ``kb [B, Hkv, NK, D]``.

    Past blocks get ``qs · kb``, every other entry ``-inf`` (module docstring). ``block_k`` is the
    key-block size ``kb`` was pooled with; ``base >= 0`` the absolute key position where segment 0
    starts (as for :func:`blocksieve.ops.segment_lse.segment_block_lse_triton`). ``D`` a power of
    two from 16 to 256. Launch knobs (they change the speed, not the result beyond rounding):
    ``block_s`` and ``block_n`` (powers of two >= 16), ``pack_rows``, ``num_warps``; ``precision``
    ``"tf32x3"`` (tensor cores) or ``"ieee"`` (fp32 FMA). ``pack_rows`` and ``block_n`` default to
    :func:`default_tiles` of the head dim. ``head_mask`` (bool ``[B, Hq]``): write only the rows of
    these heads (the others are left undefined; programs with no head on return at once).
    """
    b, hq, ns, d = qs.shape
    tiles = default_tiles(d)
    pack_rows = tiles[0] if pack_rows is None else pack_rows
    block_n = tiles[1] if block_n is None else block_n
    hkv, nk = kb.shape[1], kb.shape[2]
    check_segment_operands(qs, kb, "kb", base)
    if not _head_dim_ok(d):
        raise ValueError(f"head dim D={d} must be a power of two from 16 to 256 for the Triton path")
    if block_k <= 0 or segment <= 0:
        raise ValueError(f"block_k={block_k} and segment={segment} must be positive")
    if not mma_sizes_ok(block_s, block_n) or precision not in PRECISIONS:
        raise ValueError(f"block_s={block_s} and block_n={block_n} must be powers of two >= 16, precision one of {PRECISIONS}")
    qs = last_dim_contiguous(qs.float())
    kb = last_dim_contiguous(kb.float())
    out = empty_output(b, hq, ns, nk, dtype=torch.float32, device=qs.device)
    group = hq // hkv
    hp, n_tiles, n_packs = segment_grid(ns, group, block_s, pack_rows)
    grid = (n_tiles * math.ceil(nk / block_n), b * hkv * n_packs)
    flags = mask_flags(head_mask, (b, hq), f"[B={b}, Hq={hq}]", qs.device, out)
    _segment_dot_kernel[grid](
        qs, kb, out, flags, qs.stride(0), qs.stride(1), qs.stride(2), kb.stride(0), kb.stride(1), kb.stride(2),
        out.stride(0), out.stride(1), out.stride(2), hkv, group, n_packs, ns, nk, n_tiles, base,
        SEGMENT=segment, BLOCK_K=block_k, BLOCK_S_=block_s, BLOCK_N_=block_n, HP=hp, D=d, PRECISION=precision,
        HAS_HEAD_MASK=head_mask is not None, num_warps=num_warps,
    )
    return out
